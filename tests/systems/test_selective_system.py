"""ssm.systems.selective: step == one position of the scan, a loop of step == scan, final_state == scan's
state, the head variants against the SSD op, and bad arguments."""

from __future__ import annotations

import pytest
import torch
from conftest import tol

from ssm import systems
from ssm.ops.selective_scan import selective_scan_ref
from ssm.systems import selective

f64 = torch.float64


def operands(b=2, d=6, n=3, L=9, g=None):
    Bshape = (b, n, L) if g is None else (b, g, n, L)
    return {
        "x": torch.randn(b, d, L, dtype=f64), "delta": torch.rand(b, d, L, dtype=f64) * 0.5,
        "A": -torch.rand(d, n, dtype=f64), "B": torch.randn(*Bshape, dtype=f64),
        "C": torch.randn(*Bshape, dtype=f64), "D": torch.randn(d, dtype=f64),
        "z": torch.randn(b, d, L, dtype=f64),
        "delta_bias": torch.randn(d, dtype=f64), "initial_state": torch.randn(b, d, n, dtype=f64),
    }


def test_the_family_declares_its_tier_and_verbs():
    assert systems.selective is selective and "selective" in systems.__all__
    assert selective.TIER == "scan"
    for verb in ("discretize", "step", "scan", "final_state", "step_heads", "scan_heads"):
        assert callable(getattr(selective, verb))


def test_discretize_is_zoh_on_a_and_euler_on_b():
    delta, A, B = torch.rand(2, 4, dtype=f64), -torch.rand(4, 3, dtype=f64), torch.randn(2, 1, 3, dtype=f64)
    dA, dB = selective.discretize(delta, A, B)
    torch.testing.assert_close(dA, torch.exp(delta[..., None] * A))
    torch.testing.assert_close(dB, delta[..., None] * B)


@pytest.mark.parametrize("g", [None, 2])
def test_a_loop_of_step_is_the_scan(g):
    ops = operands(g=g)
    kw = {"delta_bias": ops["delta_bias"], "delta_softplus": True}
    y, last = selective.scan(ops["x"], ops["delta"], ops["A"], ops["B"], ops["C"], ops["D"], ops["z"], **kw,
                             initial_state=ops["initial_state"])
    ref = selective_scan_ref(ops["x"], ops["delta"], ops["A"], ops["B"], ops["C"], ops["D"], ops["z"],
                             ops["delta_bias"], True, initial_state=ops["initial_state"])
    torch.testing.assert_close(y, ref, **tol(f64))
    state, ys = ops["initial_state"], []
    for t in range(ops["x"].shape[-1]):
        yt, state = selective.step(state, ops["x"][..., t], ops["delta"][..., t], ops["A"], ops["B"][..., t],
                                   ops["C"][..., t], ops["D"], ops["z"][..., t], **kw)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, -1), y, **tol(f64))
    torch.testing.assert_close(state, last, **tol(f64))


@pytest.mark.parametrize("form", ["shared", "token", "grouped"])
def test_final_state_is_the_scans_state(form):
    ops = operands(L=300, g=3 if form == "grouped" else None)
    B = ops["A"].new_empty(ops["A"].shape).normal_() if form == "shared" else ops["B"]
    C = torch.randn_like(ops["A"])
    _, last = selective.scan(ops["x"], ops["delta"], ops["A"], B, C, delta_bias=ops["delta_bias"],
                             delta_softplus=True, initial_state=ops["initial_state"])
    h = selective.final_state(ops["x"], ops["delta"], ops["A"], B, delta_bias=ops["delta_bias"],
                              delta_softplus=True, initial_state=ops["initial_state"])
    torch.testing.assert_close(h, last, **tol(f64))


def test_final_state_stable_for_huge_delta():
    x, B = torch.randn(1, 4, 20), torch.randn(1, 3, 20)
    h = selective.final_state(x, torch.full((1, 4, 20), 100.0), torch.full((4, 3), -100.0), B)
    torch.testing.assert_close(h, 100.0 * x[..., -1:] * B[:, None, :, -1], **tol(torch.float32))


def test_head_step_loop_is_the_head_scan():
    b, L, H, P, G, N = 2, 11, 4, 3, 2, 5
    x, z = torch.randn(b, L, H, P, dtype=f64), torch.randn(b, L, H, P, dtype=f64)
    dt, A = torch.randn(b, L, H, dtype=f64), -torch.rand(H, dtype=f64)
    B, C = torch.randn(b, L, G, N, dtype=f64), torch.randn(b, L, G, N, dtype=f64)
    D, bias, h0 = torch.randn(H, P, dtype=f64), torch.randn(H, dtype=f64), torch.randn(b, H, P, N, dtype=f64)
    kw = {"dt_bias": bias, "dt_softplus": True, "dt_limit": (0.05, 1.5)}
    y, last = selective.scan_heads(x, dt, A, B, C, 4, D, z, **kw, initial_states=h0)
    state, ys = h0, []
    for t in range(L):
        yt, state = selective.step_heads(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, z[:, t], **kw)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, **tol(f64))
    torch.testing.assert_close(state, last, **tol(f64))


@pytest.mark.parametrize("call, name", [
    (lambda: selective.step(torch.zeros(2, 6, 3), torch.zeros(2, 6), torch.zeros(2, 6), torch.zeros(6, 3),
                            torch.zeros(2, 4, 3), torch.zeros(2, 3)), "B"),
    (lambda: selective.step(torch.zeros(2, 6), torch.zeros(2, 6), torch.zeros(2, 6), torch.zeros(6, 3),
                            torch.zeros(2, 3), torch.zeros(2, 3)), "state"),
    (lambda: selective.step_heads(torch.zeros(2, 4, 3, 5), torch.zeros(2, 4, 3), torch.zeros(2, 4),
                                  torch.zeros(4), torch.zeros(2, 3, 5), torch.zeros(2, 3, 5)), "B"),
    (lambda: selective.final_state(torch.zeros(2, 6, 5), torch.zeros(2, 6, 5), torch.zeros(6, 3),
                                   torch.zeros(2, 4, 3, 5)), "B"),
    (lambda: selective.scan(torch.zeros(2, 6, 5), torch.zeros(2, 6, 5), torch.zeros(6, 3),
                            torch.zeros(2, 4, 3, 5), torch.zeros(6, 3)), "B"),
    (lambda: selective.scan_heads(torch.zeros(2, 5, 4, 3), torch.zeros(2, 5, 4), torch.zeros(4),
                                  torch.zeros(2, 5, 1, 2), torch.zeros(2, 5, 1, 2), 0), "chunk_size"),
])
def test_bad_arguments_are_named(call, name):
    with pytest.raises(ValueError, match=name):
        call()
