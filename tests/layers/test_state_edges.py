"""Streaming edges of state passing: an empty chunk returns the state the stream is in, of the right batch."""

from __future__ import annotations

import pytest
import torch
from conftest import make_layer, tol

from ssm.layers import LAYERS
from ssm.layers.base import state_leaves


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_empty_first_chunk_returns_the_zero_state_of_the_batch(name):
    layer = make_layer(name)
    x = torch.randn(3, 12, 4)
    y0, state = layer(x[:, :0], return_state=True)
    assert y0.shape == (3, 0, 4)
    zeros = state_leaves(layer.default_state(3))
    assert len(state_leaves(state)) == len(zeros)
    for got, zero in zip(state_leaves(state), zeros):
        assert got.shape == zero.shape and got.dtype == zero.dtype and not got.any()
    y1, state = layer(x, state, return_state=True)  # the next chunk continues from it
    y_ref, state_ref = layer(x, return_state=True)
    torch.testing.assert_close(y1, y_ref, **tol(torch.float32))
    for got, ref in zip(state_leaves(state), state_leaves(state_ref)):
        torch.testing.assert_close(got, ref, **tol(ref.dtype))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_empty_chunk_keeps_a_given_state(name):
    layer = make_layer(name)
    _, state = layer(torch.randn(2, 5, 4), return_state=True)
    _, same = layer(torch.randn(2, 0, 4), state, return_state=True)
    assert len(state_leaves(same)) == len(state_leaves(state))
    assert all(torch.equal(a, b) for a, b in zip(state_leaves(same), state_leaves(state)))
