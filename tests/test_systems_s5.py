"""The S5 family (ssm.systems.s5) in float64 against the explicit recurrence and the dense reference.

scan (chunked Blelloch, custom autograd) == the explicit loop for L in 1..300 and both discretizations;
chunked == one pass; step, free_response, final_state and the (H, H, L) transfer matrix agree with the loop
and with ssm.reference.dense_kernel; an S5 system with diagonal B and C and one state per feature is S4D.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from ssm.reference import causal_conv_ref, dense_kernel
from ssm.systems import diag, s5

F64, C128 = torch.float64, torch.complex128
LENGTHS = [1, 2, 3, 5, 8, 17, 31, 64, 100, 127, 128, 129, 255, 256, 257, 300]


def _system(Q=5, H=3, Ch=2, disc="zoh", conj_sym=True) -> s5.S5System:
    Lambda = torch.complex(-0.05 - torch.rand(Q, dtype=F64), 3 * torch.randn(Q, dtype=F64))
    B = torch.randn(Q, H, dtype=C128)
    C = torch.randn(Ch, H, Q, dtype=C128)
    dt = 0.02 + 0.3 * torch.rand(Q, dtype=F64)
    return s5.discretize(Lambda, B, C, dt, disc, conj_sym=conj_sym)


def _loop(sys: s5.S5System, u, x0, channel=0):
    """The explicit recurrence x_k = Ab x_{k-1} + Bb u_k, y_k = f Re(C x_k), written out in float64."""
    Bsz, L, H = u.shape
    f = 2.0 if sys.conj_sym else 1.0
    x = x0.clone()
    ys = torch.zeros(Bsz, L, H, dtype=F64)
    for k in range(L):
        for q in range(sys.Ab.shape[0]):
            x[:, q] = sys.Ab[q] * x[:, q] + (sys.Bb[q] * u[:, k]).sum(-1)
        ys[:, k] = f * torch.einsum("hq,bq->bh", sys.C[channel], x).real
    return ys, x


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
@pytest.mark.parametrize("conj_sym", [True, False])
def test_scan_equals_recurrence(disc, conj_sym):
    sys = _system(disc=disc, conj_sym=conj_sym)
    for L in LENGTHS:
        u = torch.randn(2, L, 3, dtype=F64)
        x0 = torch.randn(2, 5, dtype=C128)
        y_ref, x_ref = _loop(sys, u, x0)
        y, x = s5.scan(sys, u, x0)
        assert rel_err(y, y_ref) < 1e-10, L
        assert rel_err(x, x_ref) < 1e-10, L
        for chunk in (1, 7, 64):  # chunked == one pass (and == the loop)
            y_c, x_c = s5.scan(sys, u, x0, chunk=chunk)
            assert rel_err(y_c, y) < 1e-12 and rel_err(x_c, x) < 1e-12, (L, chunk)


def test_scan_reference_twin_and_channels():
    sys = _system()
    u = torch.randn(3, 40, 3, dtype=F64)
    x0 = torch.randn(3, 5, dtype=C128)
    for channel in (0, 1):
        y_ref, x_ref = _loop(sys, u, x0, channel)
        y_twin, x_twin = s5.scan_ref(sys, u, x0, channel=channel)
        y, x = s5.scan(sys, u, x0, channel=channel)
        assert rel_err(y_twin, y_ref) < 1e-12 and rel_err(x_twin, x_ref) < 1e-12
        assert rel_err(y, y_ref) < 1e-10 and rel_err(x, x_ref) < 1e-10
    # reverse: the recurrence run backward in time == the loop on the flipped input, flipped back
    y_rev, x_rev = s5.scan(sys, u, x0, channel=1, reverse=True)
    y_ref, x_ref = _loop(sys, u.flip(1), x0, 1)
    assert rel_err(y_rev, y_ref.flip(1)) < 1e-10 and rel_err(x_rev, x_ref) < 1e-10


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
@pytest.mark.parametrize("L", [1, 9, 130])
def test_verbs_equal_recurrence(disc, L):
    sys = _system(disc=disc)
    Bsz, H = 3, 3
    u = torch.randn(Bsz, L, H, dtype=F64)
    x0 = torch.randn(Bsz, 5, dtype=C128)
    y_ref, x_ref = _loop(sys, u, x0)
    # step loop
    x, ys = x0, []
    for k in range(L):
        yk, x = s5.step(sys, x, u[:, k])  # (B, Ch, H)
        ys.append(yk[:, 0])
    assert rel_err(torch.stack(ys, 1), y_ref) < 1e-10 and rel_err(x, x_ref) < 1e-10
    # final state (layout (B, H, L) like the other families)
    assert rel_err(s5.final_state(sys, u.transpose(1, 2), x0), x_ref) < 1e-10
    # free response == the recurrence from x0 with zero input
    y_free, _ = _loop(sys, torch.zeros_like(u), x0)
    free = s5.free_response(sys, x0, L)  # (B, Ch, H, L)
    assert rel_err(free[:, 0].transpose(1, 2), y_free) < 1e-10
    # transfer matrix convolution + free response == the recurrence
    K = s5.kernel(sys, L)[0]  # (H, H, L)
    y_conv = sum(causal_conv_ref(u[:, :, j : j + 1].transpose(1, 2).expand(Bsz, H, L), K[:, j])
                 for j in range(H))
    assert rel_err(y_conv + free[:, 0], y_ref.transpose(1, 2)) < 1e-10


@pytest.mark.parametrize("conj_sym", [True, False])
@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_transfer_matrix_equals_dense_reference(conj_sym, disc):
    sys = _system(Q=4, H=3, Ch=2, disc=disc, conj_sym=conj_sym)
    L = 50
    Ab, Bb, C = sys.Ab, sys.Bb, sys.C
    if conj_sym:  # the full system: the conjugates appended
        Ab, Bb, C = torch.cat([Ab, Ab.conj()]), torch.cat([Bb, Bb.conj()]), torch.cat([C, C.conj()], -1)
    # one dense SISO system per (output i, input j): Ab (N, N), column j of Bb, row i of C
    K_ref = dense_kernel(torch.diag_embed(Ab)[None], Bb.T, C[:, :, None], L)  # (Ch, H_out, H_in, L)
    if not conj_sym:
        K_ref = K_ref.real
    assert rel_err(s5.kernel(sys, L), K_ref.real) < 1e-12
    assert K_ref.imag.abs().max() < 1e-10 if conj_sym else True


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_one_state_per_feature_is_s4d(disc):
    """J = P blocks of size one, B and C diagonal, P = H: S5 is H decoupled one-pair S4D systems."""
    H = 4
    Lambda = torch.complex(-0.1 - torch.rand(H, dtype=F64), 2 * torch.randn(H, dtype=F64))
    b, c = torch.randn(H, dtype=C128), torch.randn(H, dtype=C128)
    dt = 0.05 + 0.2 * torch.rand(H, dtype=F64)
    sys5 = s5.discretize(Lambda, torch.diag(b), torch.diag(c)[None], dt, disc, conj_sym=True)
    sys4 = diag.discretize(Lambda[:, None], b[:, None], c[None, :, None], dt, disc)
    L = 64
    K5, K4 = s5.kernel(sys5, L)[0], diag.kernel(sys4, L)[0]  # (H, H, L), (H, L)
    assert rel_err(torch.diagonal(K5, dim1=0, dim2=1).T, K4) < 1e-12
    assert (K5 - torch.diag_embed(K4.T).permute(1, 2, 0)).abs().max() < 1e-13  # off-diagonal zero
    u = torch.randn(2, L, H, dtype=F64)
    y5, _ = s5.scan(sys5, u)
    assert rel_err(y5.transpose(1, 2), causal_conv_ref(u.transpose(1, 2), K4)) < 1e-10
    x0 = torch.randn(2, H, dtype=C128)  # S5's (B, Q) state is S4D's (B, H, 1)
    assert rel_err(s5.free_response(sys5, x0, L), diag.free_response(sys4, x0[..., None], L)) < 1e-10


@pytest.mark.parametrize("chunk", [1, 4, 13, 20])
def test_scan_gradcheck(chunk):
    sys = _system(Q=3, H=2)
    Wb, Wc = (w.detach().requires_grad_() for w in s5.projections(sys, 1))
    a = sys.Ab.detach().requires_grad_()
    u = torch.randn(2, 13, 2, dtype=F64, requires_grad=True)
    x0 = torch.randn(2, 3, dtype=C128, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: s5._Scan.apply(*t, chunk), (u, Wb, Wc, a, x0))


def test_scan_gradients_reach_the_system():
    """Through discretize and the projections: the scan's gradients equal those of the loop (autograd)."""
    Lambda = torch.complex(-0.1 - torch.rand(4, dtype=F64), torch.randn(4, dtype=F64)).requires_grad_()
    B = torch.randn(4, 3, dtype=C128, requires_grad=True)
    C = torch.randn(1, 3, 4, dtype=C128, requires_grad=True)
    dt = (0.1 + 0.1 * torch.rand(4, dtype=F64)).requires_grad_()
    u = torch.randn(2, 30, 3, dtype=F64)
    grads = []
    for fn in (s5.scan, s5.scan_ref):
        y, x = fn(s5.discretize(Lambda, B, C, dt, "zoh"), u)
        (y.square().sum() + x.abs().square().sum()).backward()
        grads.append([t.grad.clone() for t in (Lambda, B, C, dt)])
        for t in (Lambda, B, C, dt):
            t.grad = None
    for g, g_ref in zip(*grads):
        assert rel_err(g, g_ref) < 1e-10


def test_float32_scan_is_accurate_over_long_sequences():
    sys64 = _system(Q=8, H=4, Ch=1)
    sys32 = s5.S5System(*(t.to(torch.complex64) if isinstance(t, torch.Tensor) and t.is_complex()
                          else t.float() if isinstance(t, torch.Tensor) else t for t in sys64))
    u = torch.randn(2, 4096, 4, dtype=F64)
    y64, _ = s5.scan(sys64, u)
    y32, _ = s5.scan(sys32, u.float())
    assert rel_err(y32, y64) < 1e-4


def test_scan_conv_the_traced_route_equals_the_recurrence():
    """``scan_conv`` (the route of ``scan`` under torch.compile / torch.export: an FFT convolution over time,
    no in-place update, no loop over L) == the explicit loop, both directions and channels, from a state; its
    autograd gradients == those of ``scan_ref``; float32 over a long sequence like the scan."""
    sys = _system()
    for L in (1, 2, 17, 130):
        u = torch.randn(2, L, 3, dtype=F64)
        x0 = torch.randn(2, 5, dtype=C128)
        for channel, reverse in ((0, False), (1, True)):
            y_ref, x_ref = _loop(sys, u.flip(1) if reverse else u, x0, channel)
            y, x = s5.scan_conv(sys, u, x0, channel=channel, reverse=reverse)
            assert rel_err(y, y_ref.flip(1) if reverse else y_ref) < 1e-12 and rel_err(x, x_ref) < 1e-12, L
    Lambda = torch.complex(-0.1 - torch.rand(4, dtype=F64), torch.randn(4, dtype=F64)).requires_grad_()
    B = torch.randn(4, 3, dtype=C128, requires_grad=True)
    C, dt = torch.randn(1, 3, 4, dtype=C128), torch.full((4,), 0.1, dtype=F64)
    u = torch.randn(2, 30, 3, dtype=F64)
    grads = []
    for fn in (s5.scan_conv, s5.scan_ref):
        y, x = fn(s5.discretize(Lambda, B, C, dt, "zoh"), u)
        grads.append(torch.autograd.grad(y.square().sum() + x.abs().square().sum(), (Lambda, B)))
    for g, g_ref in zip(*grads):
        assert rel_err(g, g_ref) < 1e-10
    sys64 = _system(Q=8, H=4, Ch=1)
    sys32 = s5.S5System(*(t.to(torch.complex64) if isinstance(t, torch.Tensor) and t.is_complex()
                          else t.float() if isinstance(t, torch.Tensor) else t for t in sys64))
    u = torch.randn(2, 4096, 4, dtype=F64)
    assert rel_err(s5.scan_conv(sys32, u.float())[0], s5.scan(sys64, u)[0]) < 1e-4


def test_bad_arguments_name_the_argument():
    sys = _system()
    with pytest.raises(ValueError, match="disc"):
        s5.discretize(sys.Lambda, sys.B, sys.C, sys.dt, "rk4")
    with pytest.raises(ValueError, match="conj_sym"):
        s5.discretize(sys.Lambda, sys.B, sys.C, sys.dt, "zoh", conj_sym=1)
    with pytest.raises(ValueError, match="B"):
        s5.discretize(sys.Lambda, sys.B[:2], sys.C, sys.dt)
    with pytest.raises(ValueError, match="C"):
        s5.discretize(sys.Lambda, sys.B, sys.C[..., :2], sys.dt)
    with pytest.raises(ValueError, match="dt"):
        s5.discretize(sys.Lambda, sys.B, sys.C, sys.dt[:2])
    u = torch.randn(2, 10, 3, dtype=F64)
    with pytest.raises(ValueError, match="u"):
        s5.scan(sys, u[..., :2])
    with pytest.raises(ValueError, match="channel"):
        s5.scan(sys, u, channel=2)
    with pytest.raises(ValueError, match="chunk"):
        s5.scan(sys, u, chunk=0)
    with pytest.raises(ValueError, match="x0"):
        s5.scan(sys, u, torch.zeros(2, 4, dtype=C128))
    with pytest.raises(ValueError, match="L"):
        s5.kernel(sys, 0)
