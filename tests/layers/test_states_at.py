"""``forward(x, return_states_at=positions)``: the states after chosen positions, for every layer, equal to
``forward(x[:, :p+1], return_state=True)[1]`` (float64, exact)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_layer, tol

from ssm.layers import LAYERS
from ssm.layers.base import map_state, state_leaves

CASES = [(name, {}) for name in LAYERS] + [("s4", {"disc": "zoh"})]
IDS = [name + "".join(f"-{v}" for v in kw.values()) for name, kw in CASES]


def assert_states(a, b) -> None:
    for s, t in zip(state_leaves(a), state_leaves(b), strict=True):
        torch.testing.assert_close(s, t, **tol(torch.float64))


@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_states_at_equal_prefix_runs(name, kw):
    layer = make_layer(name, dtype=torch.float64, **kw)
    x = torch.randn(2, 11, 4, dtype=torch.float64)
    state = map_state(lambda t: torch.randn_like(t), layer.default_state(2))
    pos = torch.tensor([6, 0, 10, 6, 3])
    y, last, states = layer(x, state, return_state=True, return_states_at=pos)
    torch.testing.assert_close(y, layer(x, state), **tol(torch.float64))
    assert_states(last, layer(x, state, return_state=True)[1])
    for i, p in enumerate(pos.tolist()):
        prefix = layer(x[:, :p + 1], state, return_state=True)[1]
        assert_states(map_state(lambda t, i=i: t[i], states), prefix)
    y2, states2 = layer(x, return_states_at=[4])  # a list works too; no return_state: (y, states)
    torch.testing.assert_close(y2, layer(x), **tol(torch.float64))
    assert_states(map_state(lambda t: t[0], states2), layer(x[:, :5], return_state=True)[1])


@pytest.mark.parametrize("name", ["s4d", "mamba"])
def test_states_at_bad_arguments(name):
    layer = make_layer(name)
    x = torch.randn(1, 5, 4)
    for bad in (torch.tensor([5]), torch.tensor([-1]), torch.tensor([[1]]), torch.tensor([1.0])):
        with pytest.raises(ValueError, match="return_states_at"):
            layer(x, return_states_at=bad)
    with pytest.raises(ValueError, match="return_states_at"):
        make_layer(name, bidirectional=True)(x, return_states_at=torch.tensor([1]))
    with pytest.raises(ValueError, match="return_states_at"):
        layer(x, lengths=torch.tensor([3]), return_states_at=torch.tensor([1]))


def test_states_at_gradients_flow():
    layer = make_layer("s4d", dtype=torch.float64)
    x = torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True)
    _, states = layer(x, return_states_at=torch.tensor([2]))
    states.abs().sum().backward()
    assert x.grad[:, 3:].abs().max() == 0 and x.grad[:, :3].abs().max() > 0


@pytest.mark.parametrize("diag", [True, False])
def test_scan_states_at_equals_final_state(diag):
    """``ssm.ops.scan.states_at`` (one Krylov basis for several prefixes) against ``final_state`` per prefix,
    for prefixes ending inside, at the end of, and after the blocks."""
    from ssm.ops.scan import final_state, states_at

    H, N = 3, 4
    Ab = (torch.rand(H, N, dtype=torch.float64) * 0.9 if diag
          else torch.randn(H, N, N, dtype=torch.float64) * 0.3)
    Bb = torch.randn(H, N, dtype=torch.float64)
    u = torch.randn(2, H, 37, dtype=torch.float64)
    x0 = torch.randn(2, H, N, dtype=torch.float64)
    ends = [1, 4, 5, 16, 33, 37]
    for block in (4, 256):
        out = states_at(Ab, Bb, u, ends, x0, block=block)
        for e in ends:
            torch.testing.assert_close(out[e], final_state(Ab, Bb, u[..., :e], x0), **tol(torch.float64))
    with pytest.raises(ValueError, match="ends"):
        states_at(Ab, Bb, u, [0])
