"""A per-row ``rate`` (B,) tensor: equal to running each row with its own scalar rate (float64, exact)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_layer, tol

from ssm.layers.base import map_state, state_leaves

NAMES = ["s4", "s4d", "s5", "mamba", "mamba2"]


def assert_same(a, b) -> None:
    for s, t in zip(state_leaves(a), state_leaves(b), strict=True):
        torch.testing.assert_close(s, t, **tol(torch.float64))


@pytest.mark.parametrize("name", NAMES)
def test_rate_rows_equal_per_row_runs(name):
    layer = make_layer(name, dtype=torch.float64)
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    state = map_state(lambda t: torch.randn_like(t), layer.default_state(3))
    rate = torch.tensor([0.5, 2.0, 0.5], dtype=torch.float64)
    y, last, at = layer(x, state, rate=rate, return_state=True, return_states_at=torch.tensor([2]))
    xt, st = x[:, 0], state
    yt, st_next = layer.step(xt, st, rate=rate)
    for b in range(3):
        row = map_state(lambda t, b=b: t[b:b + 1], state)
        yb, lb, ab = layer(x[b:b + 1], row, rate=float(rate[b]), return_state=True,
                           return_states_at=torch.tensor([2]))
        torch.testing.assert_close(y[b:b + 1], yb, **tol(torch.float64))
        assert_same(map_state(lambda t, b=b: t[b:b + 1], last), lb)
        assert_same(map_state(lambda t, b=b: t[:, b:b + 1], at), ab)
        ys, ss = layer.step(xt[b:b + 1], row, rate=float(rate[b]))
        torch.testing.assert_close(yt[b:b + 1], ys, **tol(torch.float64))
        assert_same(map_state(lambda t, b=b: t[b:b + 1], st_next), ss)


@pytest.mark.parametrize("name", ["s4d", "mamba", "rtf"])
def test_rate_rows_bad_values(name):
    layer = make_layer(name)
    x = torch.randn(2, 5, 4)
    for bad in (torch.tensor([1.0]), torch.tensor([1, 2]), torch.tensor([1.0, -1.0]),
                torch.tensor([1.0, float("nan")])):
        with pytest.raises(ValueError, match="rate"):
            layer(x, rate=bad)
    if name == "rtf":  # discrete-time: only rate 1
        with pytest.raises(ValueError, match="rate must be 1.0 for RTF"):
            layer(x, rate=torch.tensor([1.0, 2.0]))
        torch.testing.assert_close(layer(x, rate=torch.ones(2)), layer(x))
