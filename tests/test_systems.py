"""The family verbs (ssm.systems): the equivalence chain, in float64 against the explicit recurrence.

dense recurrence (ssm.reference.scan) == dense kernel == diagonal == DPLR == RTF after conversion; for every
family step == kernel convolution, free_response == the recurrence from a state with zero input, and
final_state == the state after the recurrence.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tol

from ssm.reference import causal_conv_ref, dense_kernel, scan
from ssm.systems import dense, diag, dplr
from ssm.transfer import ssm_to_rtf

F64, C128 = torch.float64, torch.complex128


def _dplr_system(H=3, N2=4, R=2, Ch=2, disc="bilinear"):
    Lambda = torch.complex(-0.2 - torch.rand(H, N2, dtype=F64), 3 * torch.randn(H, N2, dtype=F64))
    P = 0.5 * torch.randn(R, H, N2, dtype=C128)
    B = torch.randn(H, N2, dtype=C128)
    C = torch.randn(Ch, H, N2, dtype=C128)
    dt = 0.05 + 0.2 * torch.rand(H, dtype=F64)
    return dplr.discretize(Lambda, P, B, C, dt, disc)


def _diag_system(H=3, N2=4, Ch=2, disc="zoh"):
    Lambda = torch.complex(-0.1 - torch.rand(H, N2, dtype=F64), 3 * torch.randn(H, N2, dtype=F64))
    B = torch.randn(H, N2, dtype=C128)
    C = torch.randn(Ch, H, N2, dtype=C128)
    dt = 0.05 + 0.2 * torch.rand(H, dtype=F64)
    return diag.discretize(Lambda, B, C, dt, disc)


def _as_dense(sys) -> dense.DenseSystem:
    """The real-coordinate dense twin of a DPLR or diagonal half-storage system (full 2x states)."""
    if isinstance(sys, dplr.DPLRSystem):
        return sys.dense
    Ab = torch.diag_embed(torch.cat([sys.Ab, sys.Ab.conj()], -1))
    Bb = torch.cat([sys.Bb, sys.Bb.conj()], -1)
    C = torch.cat([sys.C, sys.C.conj()], -1)
    return dense.DenseSystem(Ab, Bb, C)


def _full_state(sys, x):
    """A half-storage state in the coordinates of ``_as_dense(sys)``."""
    if isinstance(sys, dplr.DPLRSystem):
        return dplr.real_state(x)
    return torch.cat([x, x.conj()], -1)


FAMILIES = [
    ("dplr-bilinear", lambda: _dplr_system(disc="bilinear"), dplr),
    ("dplr-zoh", lambda: _dplr_system(disc="zoh"), dplr),
    ("diag-zoh", lambda: _diag_system(disc="zoh"), diag),
    ("diag-bilinear", lambda: _diag_system(disc="bilinear"), diag),
]


def _recurrence(dsys: dense.DenseSystem, u, x0):
    """y (B, Ch, H, L) and the last state of the explicit recurrence, channel by channel."""
    H = dsys.Ab.shape[0]
    ys = []
    for c in range(dsys.C.shape[0]):
        y, x = scan(dsys.Ab, dsys.Bb, dsys.C[c], torch.zeros(H, dtype=F64), u, x0)
        ys.append(y)
    return torch.stack(ys, 1), x


@pytest.mark.parametrize("name,make,fam", FAMILIES, ids=[f[0] for f in FAMILIES])
@pytest.mark.parametrize("L", [1, 7, 64, 129])
def test_kernel_equals_dense_reference(name, make, fam, L):
    sys = make()
    dsys = _as_dense(sys)
    K_ref = dense_kernel(dsys.Ab, dsys.Bb, dsys.C, L).real
    assert rel_err(fam.kernel(sys, L), K_ref) < tol(F64)["rtol"] * 100
    assert rel_err(dense.kernel(dsys, L).real, K_ref) < tol(F64)["rtol"] * 100


@pytest.mark.parametrize("name,make,fam", FAMILIES, ids=[f[0] for f in FAMILIES])
@pytest.mark.parametrize("L", [1, 5, 33, 300])
def test_state_verbs_equal_recurrence(name, make, fam, L):
    sys = make()
    Bsz, (H, N2) = 3, sys.Lambda.shape
    x0 = torch.randn(Bsz, H, N2, dtype=C128)
    u = torch.randn(Bsz, H, L, dtype=F64)
    dsys = _as_dense(sys)
    y_ref, x_ref = _recurrence(dsys, u, _full_state(sys, x0))
    y_zero_ref, _ = _recurrence(dsys, torch.zeros_like(u), _full_state(sys, x0))
    # free response: the recurrence from x0 with zero input
    assert rel_err(fam.free_response(sys, x0, L), y_zero_ref) < tol(F64)["rtol"]
    # kernel convolution + free response == recurrence from x0
    K = fam.kernel(sys, L)
    y = torch.stack([causal_conv_ref(u, K[c]) for c in range(K.shape[0])], 1) + fam.free_response(sys, x0, L)
    assert rel_err(y, y_ref) < tol(F64)["rtol"]
    # final state (in half storage) == the recurrence's last state
    x_last = fam.final_state(sys, u, x0)
    assert rel_err(_full_state(sys, x_last), x_ref) < tol(F64)["rtol"]
    # a loop of step == the recurrence
    x, ys = x0, []
    for k in range(L):
        yk, x = fam.step(sys, x, u[..., k])
        ys.append(yk)
    assert rel_err(torch.stack(ys, -1), y_ref) < tol(F64)["rtol"]
    assert rel_err(x, x_last) < tol(F64)["rtol"]


@pytest.mark.parametrize("name,make,fam", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_rtf_after_conversion(name, make, fam):
    """The transfer function of every family's system has the same kernel (the last link of the chain)."""
    from ssm.kernels import rtf_kernel

    sys = make()
    dsys = _as_dense(sys)
    L = 50
    K = fam.kernel(sys, L)  # (Ch, H, L)
    Ch, H = K.shape[:2]
    Ab = dsys.Ab.expand(Ch, *dsys.Ab.shape)
    b, a = ssm_to_rtf(Ab, dsys.Bb.expand(Ch, *dsys.Bb.shape), dsys.C, real=True)
    K_rtf = rtf_kernel(b.reshape(Ch * H, -1), a.reshape(Ch * H, -1), L).reshape(Ch, H, L)
    # The monomial coefficients of an order-8 denominator cost ~1e-8 of conditioning (docs/convert_to_rtf.md).
    assert rel_err(K_rtf, K) < 1e-7


def test_dense_free_response_blocks_cover_any_length():
    """The blocked free response is exact whatever the block length relative to L (T from 1 to L)."""
    H, N, Bsz = 2, 5, 4
    A = torch.randn(H, N, N, dtype=F64) / N - torch.eye(N, dtype=F64)
    sys = dense.discretize(A, torch.randn(H, N, dtype=F64), torch.randn(3, H, N, dtype=F64),
                           torch.full((H,), 0.3, dtype=F64), "zoh")
    x0 = torch.randn(Bsz, H, N, dtype=F64)
    for L in (1, 2, 3, 17, 100):
        ref, _ = _recurrence(sys, torch.zeros(Bsz, H, L, dtype=F64), x0)
        assert rel_err(dense.free_response(sys, x0, L), ref) < tol(F64)["rtol"]


def test_real_coordinates_round_trip():
    x = torch.randn(2, 3, 3, dtype=C128)
    assert torch.equal(dplr.complex_state(dplr.real_state(x)), x)
    # to_real_coords is the similarity transform of the conjugate-symmetric matrix
    sys = _dplr_system(H=1, N2=3, R=1, Ch=1)
    full = lambda t: torch.cat([t, t.conj()], -1)  # noqa: E731
    Af = torch.diag_embed(full(sys.Lambda)) - torch.einsum("rhn,rhm->hnm", full(sys.P), full(sys.P).conj())
    xf = full(x[:1, :1])[0, 0]
    yr = dplr.to_real_coords(Af)[0] @ dplr.real_state(x[0, 0])
    assert rel_err(dplr.complex_state(yr), (Af[0] @ xf)[:3]) < 1e-13


def test_bad_arguments_name_the_argument():
    sys = _dplr_system()
    with pytest.raises(ValueError, match="disc"):
        dplr.discretize(sys.Lambda, sys.P, sys.B, sys.C, sys.dt, "rk4")
    with pytest.raises(ValueError, match="P"):
        dplr.discretize(sys.Lambda, sys.P[:, :1], sys.B, sys.C, sys.dt, "zoh")
    with pytest.raises(ValueError, match="C"):
        diag.discretize(sys.Lambda, sys.B, sys.C[0], sys.dt, "zoh")
    with pytest.raises(ValueError, match="disc"):
        diag.discretize(sys.Lambda, sys.B, sys.C, sys.dt, "euler")
