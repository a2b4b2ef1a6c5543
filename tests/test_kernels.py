"""S4 (DPLR, Cauchy + Woodbury) and S4D (diagonal, Vandermonde) kernels against the dense float64 kernel."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tol
from torch.autograd import gradcheck

from ssm.discretize import discretize
from ssm.hippo import nplr
from ssm.kernels import diag_kernel, dplr_kernel
from ssm.reference import conj_expand, dense_kernel, dplr_to_dense

C128 = torch.complex128
# Structured (Cauchy + Woodbury, Vandermonde, Krylov) against dense float64 powers: 100x the float64 table,
# the conditioning of the Woodbury solve and of the truncation correction on random systems.
F64_STRUCTURED = 100 * tol(C128)["rtol"]
C64 = torch.complex64
DISCS = ["zoh", "bilinear"]


def _random_system(H=2, N=4, R=1, channels=None, dtype=C128, device="cpu"):
    """A random stable DPLR system: Re(Lambda) < 0 and a small low-rank term (A stays stable)."""
    f64 = torch.float64
    Lambda = torch.complex(-0.1 - torch.rand(H, N, dtype=f64), 3 * torch.randn(H, N, dtype=f64))
    P = 0.3 * torch.randn(R, H, N, dtype=C128)
    Q = 0.3 * torch.randn(R, H, N, dtype=C128)
    B = torch.randn(H, N, dtype=C128)
    C = torch.randn(*(() if channels is None else (channels,)), H, N, dtype=C128)
    dt = 0.05 + 0.5 * torch.rand(H, dtype=torch.float64)
    real = torch.float64 if dtype == C128 else torch.float32
    return {
        "Lambda": Lambda.to(dtype=dtype, device=device),
        "P": P.to(dtype=dtype, device=device),
        "Q": Q.to(dtype=dtype, device=device),
        "B": B.to(dtype=dtype, device=device),
        "C": C.to(dtype=dtype, device=device),
        "dt": dt.to(dtype=real, device=device),
    }


def _expand(s):
    """The conj_pairs system written out in full (conjugates appended)."""
    Lambda, P, B, C = conj_expand(s["Lambda"], s["P"], s["B"], s["C"])
    return {**s, "Lambda": Lambda, "P": P, "Q": conj_expand(s["Q"])[0], "B": B, "C": C}


def _dense_ref(s, L, disc, conj_pairs=False):
    """K_k = Re(C Ab^k Bb) from the dense discretized matrix (explicit powers, complex128)."""
    s = {k: v.detach().cpu().to(C128 if v.is_complex() else torch.float64) for k, v in s.items()}
    if conj_pairs:
        s = _expand(s)
    A = dplr_to_dense(s["Lambda"], s["P"], s["Q"])
    Ab, Bb = discretize(A, s["B"], s["dt"], disc)
    return dense_kernel(Ab, Bb, s["C"], L).real


def _dplr(s, L, disc, **kw):
    return dplr_kernel(s["Lambda"], s["P"], s["B"], s["C"], s["dt"], L, s["Q"], disc, **kw)


@pytest.mark.parametrize("conj_pairs", [False, True])
@pytest.mark.parametrize("L", [37, 100, 257])
@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("disc", DISCS)
def test_dplr_matches_dense_kernel(disc, rank, L, conj_pairs):
    s = _random_system(H=3, N=4, R=rank)
    K = _dplr(s, L, disc, conj_pairs=conj_pairs)
    assert K.shape == (3, L) and K.dtype == torch.float64
    assert rel_err(K, _dense_ref(s, L, disc, conj_pairs)) <= F64_STRUCTURED


@pytest.mark.parametrize("L", [1, 2, 3, 4])
@pytest.mark.parametrize("conj_pairs", [False, True])
@pytest.mark.parametrize("disc", DISCS)
def test_dplr_short_kernels(disc, conj_pairs, L):
    s = _random_system(R=2)
    K = _dplr(s, L, disc, conj_pairs=conj_pairs)
    assert rel_err(K, _dense_ref(s, L, disc, conj_pairs)) <= F64_STRUCTURED


@pytest.mark.parametrize("disc", DISCS)
def test_dplr_conj_pairs_is_the_expanded_system(disc):
    s = _random_system(H=2, N=5, R=2, channels=2)
    K_half = _dplr(s, 64, disc, conj_pairs=True)
    K_full = _dplr(_expand(s), 64, disc, conj_pairs=False)
    torch.testing.assert_close(K_half, K_full, **tol(torch.float64))


@pytest.mark.parametrize("disc", DISCS)
def test_dplr_channels_and_default_q(disc):
    s = _random_system(H=2, N=4, R=1, channels=3)
    s["Q"] = s["P"]
    K = dplr_kernel(s["Lambda"], s["P"], s["B"], s["C"], s["dt"], 50, disc=disc)  # Q defaults to P
    assert K.shape == (3, 2, 50)
    assert rel_err(K, _dense_ref(s, 50, disc)) <= F64_STRUCTURED
    K1 = dplr_kernel(s["Lambda"], s["P"], s["B"], s["C"][1], s["dt"], 50, disc=disc)
    torch.testing.assert_close(K[1], K1, **tol(torch.float64))


@pytest.mark.parametrize("disc", DISCS)
def test_dplr_without_low_rank_is_diagonal(disc):
    """Equivalence chain: DPLR with P = 0 (rank 1 of zeros, and rank 0) == the diagonal kernel."""
    s = _random_system(H=2, N=4, R=1, channels=2)
    want = diag_kernel(s["Lambda"], s["B"], s["C"], s["dt"], 40, disc, conj_pairs=True)
    zero = torch.zeros_like(s["P"])
    got = dplr_kernel(s["Lambda"], zero, s["B"], s["C"], s["dt"], 40, disc=disc, conj_pairs=True)
    torch.testing.assert_close(got, want, **tol(torch.float64))
    empty = s["P"][:0]
    got = dplr_kernel(s["Lambda"], empty, s["B"], s["C"], s["dt"], 40, disc=disc, conj_pairs=True)
    torch.testing.assert_close(got, want, **tol(torch.float64))


@pytest.mark.parametrize("disc", DISCS)
def test_hippo_legs_float32(disc):
    """HiPPO-LegS through nplr, N = 64 (32 conjugate pairs), L = 4096: float32 within 1e-4 of float64."""
    H, L = 3, 4096
    Lambda, P, B, _ = nplr("legs", 64, half=True)
    M = Lambda.shape[0]
    s = {
        "Lambda": Lambda.expand(H, M),
        "P": P.unsqueeze(1).expand(1, H, M),
        "Q": P.unsqueeze(1).expand(1, H, M),
        "B": B.expand(H, M),
        "C": torch.randn(H, M, dtype=C128),
        "dt": torch.tensor([1e-3, 1e-2, 1e-1], dtype=torch.float64),
    }
    ref = _dense_ref(s, L, disc, conj_pairs=True)
    assert rel_err(_dplr(s, L, disc, conj_pairs=True), ref) <= F64_STRUCTURED
    s32 = {k: v.to(C64 if v.is_complex() else torch.float32) for k, v in s.items()}
    K32 = _dplr(s32, L, disc, conj_pairs=True)
    assert K32.dtype == torch.float32
    assert rel_err(K32, ref) <= tol(torch.float32)["rtol"]


@pytest.mark.parametrize("L", [1, 37, 256])
@pytest.mark.parametrize("conj_pairs", [False, True])
@pytest.mark.parametrize("disc", DISCS)
def test_diag_matches_dense_kernel(disc, conj_pairs, L):
    s = _random_system(H=3, N=5, R=1, channels=2)
    s["P"] = s["Q"] = torch.zeros_like(s["P"])
    K = diag_kernel(s["Lambda"], s["B"], s["C"], s["dt"], L, disc, conj_pairs=conj_pairs)
    assert K.shape == (2, 3, L)
    assert rel_err(K, _dense_ref(s, L, disc, conj_pairs)) <= F64_STRUCTURED


@pytest.mark.parametrize("disc", DISCS)
def test_diag_float32(disc):
    s = _random_system(H=4, N=16, R=1)
    s["P"] = s["Q"] = torch.zeros_like(s["P"])
    ref = _dense_ref(s, 1000, disc, conj_pairs=True)
    s32 = {k: v.to(C64 if v.is_complex() else torch.float32) for k, v in s.items()}
    K = diag_kernel(s32["Lambda"], s32["B"], s32["C"], s32["dt"], 1000, disc, conj_pairs=True)
    assert K.dtype == torch.float32
    assert rel_err(K, ref) <= tol(torch.float32)["rtol"]


def _backends(device):
    from ssm.ops import cauchy_triton

    extra = ["triton"] if device.type == "cuda" and cauchy_triton.available() else []
    return ["naive", "chunked", "auto"] + extra


@pytest.mark.parametrize("dtype", [C64, C128])
def test_backends_agree(device, dtype):
    s = _random_system(H=4, N=8, R=2, channels=2, dtype=dtype, device=device)
    rtol = tol(dtype)["rtol"]
    for conj_pairs in (False, True):
        Ks = [_dplr(s, 300, "bilinear", conj_pairs=conj_pairs, backend=b) for b in _backends(device)]
        for K in Ks[1:]:
            assert rel_err(K, Ks[0]) <= rtol
        Ks = [diag_kernel(s["Lambda"], s["B"], s["C"], s["dt"], 300, conj_pairs=conj_pairs, backend=b)
              for b in _backends(device)]
        for K in Ks[1:]:
            assert rel_err(K, Ks[0]) <= rtol


def _grad_inputs(s):
    return {k: v.detach().clone().requires_grad_() for k, v in s.items()}


# Every backend and both storages, with an odd L and an even L (whose z = -1 term is set directly).
GRAD_CASES = [
    ("bilinear", "naive", False, 8),
    ("bilinear", "naive", True, 7),
    ("bilinear", "chunked", False, 7),
    ("bilinear", "chunked", True, 8),
    ("zoh", "auto", False, 8),
    ("zoh", "auto", True, 7),
]


@pytest.mark.parametrize("disc,backend,conj_pairs,L", GRAD_CASES)
def test_dplr_gradcheck(disc, backend, conj_pairs, L):
    s = _grad_inputs(_random_system(H=2, N=2, R=1))
    names = ["Lambda", "P", "B", "C", "dt", "Q"]

    def fn(Lambda, P, B, C, dt, Q):
        return dplr_kernel(Lambda, P, B, C, dt, L, Q, disc, conj_pairs=conj_pairs, backend=backend)

    assert gradcheck(fn, tuple(s[k] for k in names))


@pytest.mark.parametrize("conj_pairs", [False, True])
@pytest.mark.parametrize("backend", ["naive", "chunked"])
@pytest.mark.parametrize("disc", DISCS)
def test_diag_gradcheck(disc, backend, conj_pairs):
    s = _grad_inputs(_random_system(H=2, N=3, channels=2))

    def fn(Lambda, B, C, dt):
        return diag_kernel(Lambda, B, C, dt, 9, disc, conj_pairs=conj_pairs, backend=backend)

    assert gradcheck(fn, (s["Lambda"], s["B"], s["C"], s["dt"]))


def test_real_inputs_are_promoted():
    s = _random_system(H=2, N=3, R=1)
    s["Q"] = s["P"]
    K = dplr_kernel(s["Lambda"], s["P"], s["B"].real, s["C"].real, s["dt"], 20, disc="bilinear")
    s["B"], s["C"] = s["B"].real.to(C128), s["C"].real.to(C128)
    assert rel_err(K, _dense_ref(s, 20, "bilinear")) <= F64_STRUCTURED
    K = diag_kernel(-torch.rand(2, 3) - 0.1, torch.randn(2, 3), torch.randn(2, 3), torch.rand(2) + 0.1, 20)
    assert K.dtype == torch.float32


def test_bad_inputs():
    s = _random_system(H=2, N=3, R=1)
    Lambda, P, B, C, dt = s["Lambda"], s["P"], s["B"], s["C"], s["dt"]
    for fn, args in (
        (dplr_kernel, lambda **kw: {"Lambda": Lambda, "P": P, "B": B, "C": C, "dt": dt, "L": 10, **kw}),
        (diag_kernel, lambda **kw: {"Lambda": Lambda, "B": B, "C": C, "dt": dt, "L": 10, **kw}),
    ):
        with pytest.raises(ValueError, match="disc"):
            fn(**args(disc="rk4"))
        with pytest.raises(ValueError, match="backend"):
            fn(**args(backend="cuda"))
        with pytest.raises(ValueError, match="backend"):
            fn(**args(disc="bilinear", backend="triton"))  # CPU tensors
        with pytest.raises(ValueError, match="L"):
            fn(**args(L=0))
        with pytest.raises(ValueError, match="L"):
            fn(**args(L=2.5))
        with pytest.raises(ValueError, match="dt"):
            fn(**args(dt=-dt))
        with pytest.raises(ValueError, match="dt"):
            fn(**args(dt=dt[:1]))
        with pytest.raises(ValueError, match="dt"):
            fn(**args(dt=dt.to(C128)))
        with pytest.raises(ValueError, match="Lambda"):
            fn(**args(Lambda=Lambda[0]))
        with pytest.raises(ValueError, match="B"):
            fn(**args(B=B[:, :2]))
        with pytest.raises(ValueError, match="C"):
            fn(**args(C=C[:1]))
        with pytest.raises(ValueError, match="C"):
            fn(**args(C=C[None, None]))
        with pytest.raises(ValueError, match="conj_pairs"):
            fn(**args(conj_pairs=1))
    with pytest.raises(ValueError, match="P"):
        dplr_kernel(Lambda, P[0], B, C, dt, 10)
    with pytest.raises(ValueError, match="P"):
        dplr_kernel(Lambda, P[..., :2], B, C, dt, 10)
    with pytest.raises(ValueError, match="Q"):
        dplr_kernel(Lambda, P, B, C, dt, 10, Q=torch.cat([P, P]))
