"""Streaming edges of state passing: an empty chunk returns the state the stream is in, of the right batch."""

from __future__ import annotations

import pytest
import torch
from conftest import tol

from ssm.layers import LAYERS


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_empty_first_chunk_returns_the_zero_state_of_the_batch(name):
    layer = LAYERS[name](4, 8)
    x = torch.randn(3, 12, 4)
    y0, state = layer(x[:, :0], return_state=True)
    assert y0.shape == (3, 0, 4)
    zero = layer.default_state(3)
    assert state.shape == zero.shape and state.dtype == zero.dtype and not state.any()
    y1, state = layer(x, state, return_state=True)  # the next chunk continues from it
    y_ref, state_ref = layer(x, return_state=True)
    torch.testing.assert_close(y1, y_ref, **tol(torch.float32))
    torch.testing.assert_close(state, state_ref, **tol(state_ref.dtype))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_empty_chunk_keeps_a_given_state(name):
    layer = LAYERS[name](4, 8)
    _, state = layer(torch.randn(2, 5, 4), return_state=True)
    _, same = layer(torch.randn(2, 0, 4), state, return_state=True)
    assert same is state or torch.equal(same, state)
