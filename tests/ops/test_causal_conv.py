"""ssm.ops.causal_conv: causal_conv1d_fn == causal_conv1d_ref (F.conv1d on [initial_states, x]) in float64 for
channel-first and channel-last inputs, every length against the width; gradcheck of the Function; bad
arguments named."""

from __future__ import annotations

import pytest
import torch
from conftest import tol

from ssm.ops.causal_conv import causal_conv1d_fn, causal_conv1d_ref

f64 = torch.float64


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("L", [1, 3, 4, 17])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_equals_ref(k, L, activation):
    x = torch.randn(2, L, 5, dtype=f64).transpose(1, 2)  # a channel-last view, as the layers pass it
    w, b = torch.randn(5, k, dtype=f64), torch.randn(5, dtype=f64)
    h0 = torch.randn(2, 5, k - 1, dtype=f64)
    for args in ((x, w), (x, w, b), (x, w, b, h0), (x.contiguous(), w, None, h0)):
        out = causal_conv1d_fn(*args, activation=activation)
        torch.testing.assert_close(out, causal_conv1d_ref(*args, activation=activation), **tol(f64))
        assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("L", [2, 6])
def test_gradcheck(L):
    """Every input (x, weight, bias, initial_states), with SiLU and without; L below and above the width."""
    x = torch.randn(2, L, 3, dtype=f64).transpose(1, 2).requires_grad_()
    w, b = torch.randn(3, 4, dtype=f64, requires_grad=True), torch.randn(3, dtype=f64, requires_grad=True)
    h0 = torch.randn(2, 3, 3, dtype=f64, requires_grad=True)
    for activation in (None, "silu"):
        def f(*args, activation=activation):
            return causal_conv1d_fn(*args, activation=activation)

        assert torch.autograd.gradcheck(f, (x, w, b, h0))


@pytest.mark.parametrize("changes, name", [
    ({"x": torch.randn(2, 5)}, "x"),
    ({"weight": torch.randn(4, 3)}, "weight"),
    ({"bias": torch.randn(4)}, "bias"),
    ({"initial_states": torch.randn(2, 5, 3)}, "initial_states"),
    ({"activation": "relu"}, "activation"),
])
def test_bad_arguments_are_named(changes, name):
    kw = {"x": torch.randn(2, 5, 7), "weight": torch.randn(5, 3), "bias": torch.randn(5),
          "initial_states": torch.randn(2, 5, 2), **changes}
    with pytest.raises(ValueError, match=name):
        causal_conv1d_fn(**kw)
