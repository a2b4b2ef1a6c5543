"""torch.export of every layer with a dynamic sequence length: one program for all lengths, equal to eager;
the real route of ONNX export (``ssm.export``) against the usual paths in float64 (the ONNX Runtime checks
are tests/integrations/test_onnx.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tol

import ssm
from ssm.export import StepModule, real_arithmetic
from ssm.layers.base import state_leaves
from ssm.systems import selective

CASES = {
    "s4-bilinear": lambda: ssm.S4(8, 16),
    "s4-zoh": lambda: ssm.S4(8, 16, disc="zoh"),
    "s4d": lambda: ssm.S4D(8, 16),
    "rtf": lambda: ssm.RTF(8, 16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_export_dynamic_length_matches_eager(name):
    layer = CASES[name]().eval()
    length = torch.export.Dim("L", min=2, max=1 << 16)
    program = torch.export.export(layer, (torch.randn(2, 48, 8),), dynamic_shapes={"x": {1: length}})
    exported = program.module()
    with torch.no_grad():
        for L in (37, 100, 2):  # odd, even and the shortest: the traced graph serves every length
            x = torch.randn(2, L, 8)
            torch.testing.assert_close(exported(x), layer(x), **tol(torch.float32))


# ---- the real route (ONNX export): exact against the usual paths in float64 --------------------------------
F64 = {"dtype": torch.float64}
REAL_CASES = {
    "s4-bilinear": lambda bi: ssm.S4(4, 8, bidirectional=bi, **F64),
    "s4-zoh": lambda bi: ssm.S4(4, 8, disc="zoh", bidirectional=bi, **F64),
    "s4d": lambda bi: ssm.S4D(4, 8, bidirectional=bi, **F64),
    "rtf": lambda bi: ssm.RTF(4, 8, bidirectional=bi, **F64),
    "s5": lambda bi: ssm.S5(4, 8, bidirectional=bi, **F64),
    "mamba": lambda bi: ssm.Mamba(8, 4, bidirectional=bi, **F64),
    "mamba2": lambda bi: ssm.Mamba2(8, 4, headdim=4, chunk_size=8, bidirectional=bi, **F64),
}


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("name", list(REAL_CASES))
def test_real_route_forward_equals_forward_float64(name, bidirectional):
    torch.manual_seed(0)
    layer = REAL_CASES[name](bidirectional).eval()
    x = torch.randn(2, 19, layer.d_model, **F64)
    with torch.no_grad():
        ref = layer(x)
        with real_arithmetic(layer):
            got = layer(x)
    torch.testing.assert_close(got, ref, **tol(torch.float64))


@pytest.mark.parametrize("name", list(REAL_CASES))
def test_real_route_step_equals_step_float64(name):
    torch.manual_seed(1)
    layer = REAL_CASES[name](False).eval()
    module = StepModule(layer)
    x = torch.randn(3, 4, layer.d_model, **F64)
    ref, real = layer.default_state(3), module.initial_state(3)
    with torch.no_grad(), real_arithmetic(layer):
        for t in range(x.shape[1]):
            y_ref, ref = layer.step(x[:, t], ref)
            y, *real = module(x[:, t], *real)
            torch.testing.assert_close(y, y_ref, **tol(torch.float64))
    for got, want in zip(state_leaves(module.from_real(tuple(real))), state_leaves(ref)):
        torch.testing.assert_close(got, want, **tol(torch.float64))
    y_plain, *_ = module(x[:, 0], *module.initial_state(3))  # off the route: layer.step on converted states
    torch.testing.assert_close(y_plain, layer.step(x[:, 0], layer.default_state(3))[0], **tol(torch.float64))


def test_scan_loops_equal_the_fast_scans_float64():
    """The export routes of the selective scans (one loop op of ``step``) against the fast paths, with
    grouped B and C, z, D and an initial state."""
    torch.manual_seed(2)
    Bt, D, N, L, G = 2, 6, 3, 11, 2
    x, delta, z = torch.randn(Bt, D, L, **F64), torch.rand(Bt, D, L, **F64), torch.randn(Bt, D, L, **F64)
    A, Bm, Cm = -torch.rand(D, N, **F64), torch.randn(Bt, G, N, L, **F64), torch.randn(Bt, G, N, L, **F64)
    Dv, bias, h0 = torch.randn(D, **F64), torch.randn(D, **F64), torch.randn(Bt, D, N, **F64)
    opts = {"delta_bias": bias, "delta_softplus": True, "initial_state": h0}
    for got, want in zip(selective.scan_loop(x, delta, A, Bm, Cm, Dv, z, **opts),
                         selective.scan(x, delta, A, Bm, Cm, Dv, z, **opts)):
        torch.testing.assert_close(got, want, **tol(torch.float64))
    H, P = 4, 2
    xh, dt = torch.randn(Bt, L, H, P, **F64), torch.randn(Bt, L, H, **F64)
    Ah, Bh, Ch = -torch.rand(H, **F64), torch.randn(Bt, L, G, N, **F64), torch.randn(Bt, L, G, N, **F64)
    hopts = {"dt_bias": torch.randn(H, **F64), "dt_softplus": True,
             "initial_states": torch.randn(Bt, H, P, N, **F64)}
    Dh = torch.randn(H, **F64)
    for got, want in zip(selective.scan_heads_loop(xh, dt, Ah, Bh, Ch, 4, Dh, **hopts),
                         selective.scan_heads(xh, dt, Ah, Bh, Ch, 4, Dh, **hopts)):
        torch.testing.assert_close(got, want, **tol(torch.float64))


def test_real_route_bad_input():
    layer = ssm.S4D(4, 8)
    x = torch.randn(1, 16, 4)
    with real_arithmetic(layer), pytest.raises(ValueError, match="StepModule"):
        layer(x, return_state=True)
    with pytest.raises(ValueError, match="bidirectional"):
        StepModule(ssm.S4D(4, 8, bidirectional=True))
    with pytest.raises(ValueError, match="layer"):
        StepModule(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="seq_idx"):
        selective.scan_heads_loop(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2), -torch.rand(2),
                                  torch.randn(1, 3, 1, 2), torch.randn(1, 3, 1, 2), 4,
                                  seq_idx=torch.zeros(1, 3, dtype=torch.long))
    # An LTI layer traced on the real route without constants computed before the trace: named, not a
    # complex op failing deep inside the exporter.
    with real_arithmetic(), pytest.raises(ValueError, match="real_arithmetic"):
        torch.export.export(layer.eval(), (torch.randn(1, 80, 4),))


def test_export_s5_dynamic_length_matches_eager():
    """S5's scan specialized the length (its chunk loop and Blelloch passes depend on L): under export it
    takes the FFT route ``ssm.systems.s5.scan_conv``, one program for every length."""
    torch.manual_seed(0)
    layer = ssm.S5(4, 4).eval()
    length = torch.export.Dim("L", min=2, max=1 << 16)
    program = torch.export.export(layer, (torch.randn(2, 48, 4),), dynamic_shapes={"x": {1: length}})
    exported = program.module()
    with torch.no_grad():
        for L in (37, 100):
            x = torch.randn(2, L, 4)
            torch.testing.assert_close(exported(x), layer(x), **tol(torch.float32))
