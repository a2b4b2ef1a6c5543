"""ssm.transfer: SSM <-> RTF conversions, the companion recurrence, initialization and stability.

Every kernel is checked against the dense reference K_k = C Ab^k Bb (+ D at k = 0) of ssm.reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import rel_err

from ssm.discretize import discretize, discretize_diag
from ssm.kernels import diag_kernel, dplr_kernel, rtf_kernel
from ssm.reference import causal_conv_ref, conj_expand, dense_kernel, dplr_to_dense, scan
from ssm.transfer import (
    rtf_filter,
    rtf_init,
    rtf_step,
    rtf_to_ssm,
    ssm_to_rtf,
    ssm_to_rtf_dplr,
    stable_denominator,
)

F64, C128 = torch.float64, torch.complex128


def _with_D(K: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    K = K.clone()
    if D is not None:
        K[..., 0] = K[..., 0] + D
    return K


def _stable_dense(H: int, N: int, radius: float = 0.8) -> torch.Tensor:
    A = torch.randn(H, N, N, dtype=F64)
    return radius * A / torch.linalg.eigvals(A).abs().amax(-1)[:, None, None]


def _stable_complex(shape: tuple[int, ...], rmin: float = 0.3, rmax: float = 0.95) -> torch.Tensor:
    radius = rmin + (rmax - rmin) * torch.rand(shape, dtype=F64)
    return torch.polar(radius, 2 * math.pi * torch.rand(shape, dtype=F64))


def _companion_kernel(b: torch.Tensor, a: torch.Tensor, L: int) -> torch.Tensor:
    A, B, C, D = rtf_to_ssm(b, a)
    return _with_D(dense_kernel(A, B, C, L), D)


# ---------------------------------------------------------------------------------------------------------
# SSM -> RTF -> SSM


@pytest.mark.parametrize("N", [1, 4, 16])
def test_dense_round_trip(N):
    H, L = 3, 80
    A, B, C, D = (
        _stable_dense(H, N),
        torch.randn(H, N, dtype=F64),
        torch.randn(H, N, dtype=F64),
        torch.randn(H, dtype=F64),
    )
    K = _with_D(dense_kernel(A, B, C, L), D)
    b, a = ssm_to_rtf(A, B, C, D)
    assert b.shape == (H, N + 1) and a.shape == (H, N) and b.dtype == F64 and a.dtype == F64
    assert rel_err(rtf_kernel(b, a, L), K) < 1e-6
    A2, B2, C2, D2 = rtf_to_ssm(b, a)
    assert A2.shape == (H, N + 1, N + 1) and B2.shape == C2.shape == (H, N + 1) and D2.shape == (H,)
    assert rel_err(_with_D(dense_kernel(A2, B2, C2, L), D2), K) < 1e-6
    # RTF -> SSM -> RTF: the coefficients are recovered
    b3, a3 = ssm_to_rtf(A2, B2, C2, D2)
    assert rel_err(a3[:, :N], a) < 1e-9 and a3[:, N].abs().max() < 1e-9
    assert rel_err(b3[:, : N + 1], b) < 1e-9


@pytest.mark.parametrize("N", [3, 16])
def test_diagonal_real(N):
    H, L = 2, 64
    lam = 1.8 * torch.rand(H, N, dtype=F64) - 0.9
    B, C = torch.randn(H, N, dtype=F64), torch.randn(H, N, dtype=F64)
    b, a = ssm_to_rtf(lam, B, C, 0.5)
    K = _with_D(dense_kernel(torch.diag_embed(lam), B, C, L), torch.full((H,), 0.5, dtype=F64))
    assert b.dtype == F64 and rel_err(rtf_kernel(b, a, L), K) < 1e-6
    assert rel_err(_companion_kernel(b, a, L), K) < 1e-6


@pytest.mark.parametrize("N", [2, 8])
def test_diagonal_conjugate_pairs(N):
    """S4D storage (N/2 complex states, kernel 2 Re(.)) and the explicit 2N-state system give real RTFs."""
    H, L = 3, 64
    lam = _stable_complex((H, N))
    B, C, D = torch.randn(H, N, dtype=C128), torch.randn(H, N, dtype=C128), torch.randn(H, dtype=F64)
    K = _with_D(2 * dense_kernel(torch.diag_embed(lam), B, C, L).real, D)
    b, a = ssm_to_rtf(lam, B, C, D, conj_pairs=True)
    assert b.shape == (H, 2 * N + 1) and a.shape == (H, 2 * N) and b.dtype == a.dtype == F64
    assert rel_err(rtf_kernel(b, a, L), K) < 1e-6
    assert rel_err(_companion_kernel(b, a, L), K) < 1e-6
    lam_f, _, B_f, C_f = conj_expand(lam, None, B, C)
    b2, a2 = ssm_to_rtf(lam_f, B_f, C_f, D)  # conjugate-symmetric: real=None detects it
    assert b2.dtype == a2.dtype == F64
    assert rel_err(b2, b) < 1e-9 and rel_err(a2, a) < 1e-9


def test_complex_system_gives_complex_coefficients():
    H, N, L = 2, 5, 50
    lam = _stable_complex((H, N))
    B, C, D = torch.randn(H, N, dtype=C128), torch.randn(H, N, dtype=C128), torch.randn(H, dtype=C128)
    b, a = ssm_to_rtf(lam, B, C, D)
    assert b.dtype == a.dtype == C128
    K = _with_D(dense_kernel(torch.diag_embed(lam), B, C, L), D)
    assert rel_err(rtf_kernel(b, a, L), K) < 1e-6
    assert rel_err(_companion_kernel(b, a, L), K) < 1e-6
    with pytest.raises(ValueError, match="real"):
        ssm_to_rtf(lam, B, C, D, real=True)


def test_real_flag():
    A, B, C = _stable_dense(2, 3), torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    b, a = ssm_to_rtf(A, B, C, real=False)
    assert b.dtype == a.dtype == C128
    b_r, a_r = ssm_to_rtf(A, B, C)
    torch.testing.assert_close(b.real, b_r)
    torch.testing.assert_close(a.real, a_r)
    lam = _stable_complex((2, 3))
    b2, a2 = ssm_to_rtf(
        torch.cat([lam, lam.conj()], -1), *(torch.cat([t, t.conj()], -1) for t in (B, C)), real=True
    )
    assert b2.dtype == F64


def test_float32_inputs_give_float32_coefficients():
    A, B, C = _stable_dense(2, 6).float(), torch.randn(2, 6), torch.randn(2, 6)
    b, a = ssm_to_rtf(A, B, C, torch.ones(2))
    assert b.dtype == a.dtype == torch.float32
    K = _with_D(dense_kernel(A, B, C, 40), torch.ones(2, dtype=F64))
    assert rel_err(rtf_kernel(b, a, 40), K) < 1e-4


@pytest.mark.parametrize("R", [1, 2])
@pytest.mark.parametrize("same_q", [True, False])
def test_dplr(R, same_q):
    H, N, L = 2, 6, 60
    Lambda = _stable_complex((H, N), 0.2, 0.7)
    P = 0.1 * torch.randn(R, H, N, dtype=C128)
    Q = None if same_q else 0.1 * torch.randn(R, H, N, dtype=C128)
    B, C, D = torch.randn(H, N, dtype=C128), torch.randn(H, N, dtype=C128), torch.randn(H, dtype=F64)
    b, a = ssm_to_rtf_dplr(Lambda, P, Q, B, C, D)
    K = _with_D(dense_kernel(dplr_to_dense(Lambda, P, Q), B, C, L), D)
    assert rel_err(rtf_kernel(b, a, L), K) < 1e-6
    assert rel_err(_companion_kernel(b, a, L), K) < 1e-6


def test_dplr_conjugate_pairs_couple_both_halves():
    """conj_pairs as in dplr_kernel: conjugates of Lambda, P, Q, B, C appended, low rank across halves."""
    H, N, L = 2, 4, 60
    Lambda = _stable_complex((H, N), 0.2, 0.7)
    P = 0.2 * torch.randn(1, H, N, dtype=C128)
    B, C = torch.randn(H, N, dtype=C128), torch.randn(H, N, dtype=C128)
    b, a = ssm_to_rtf_dplr(Lambda, P, None, B, C, conj_pairs=True)
    assert b.dtype == F64 and a.shape == (H, 2 * N)
    Lf, Pf, Bf, Cf = conj_expand(Lambda, P, B, C)
    K = dense_kernel(dplr_to_dense(Lf, Pf), Bf, Cf, L)
    assert K.imag.abs().max() < 1e-12
    assert rel_err(rtf_kernel(b, a, L), K.real) < 1e-6


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_trained_s4d_layer_runs_state_free(disc):
    """diag_kernel (S4D) == rtf_kernel of the converted discretized system."""
    H, N, L = 3, 8, 200
    Lambda = torch.complex(
        -0.5 * torch.ones(H, N, dtype=F64), math.pi * torch.arange(N, dtype=F64).expand(H, N)
    )
    B, C = torch.randn(H, N, dtype=C128), torch.randn(H, N, dtype=C128)
    dt = torch.tensor([0.1, 0.2, 0.5], dtype=F64)
    K = diag_kernel(Lambda, B, C, dt, L, disc, conj_pairs=True)
    Ab, Bb = discretize_diag(Lambda, B, dt, disc)
    b, a = ssm_to_rtf(Ab, Bb, C, conj_pairs=True)
    assert rel_err(rtf_kernel(b, a, L), K) < 1e-6


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_trained_s4_layer_runs_state_free(disc):
    """dplr_kernel (S4) == rtf_kernel of the converted dense discretization of the expanded system."""
    H, N, L = 2, 4, 200
    Lambda = torch.complex(
        -0.5 * torch.ones(H, N, dtype=F64), math.pi * torch.arange(N, dtype=F64).expand(H, N)
    )
    P = 0.5 * torch.randn(1, H, N, dtype=C128)
    B, C = torch.randn(H, N, dtype=C128), torch.randn(H, N, dtype=C128)
    dt = torch.tensor([0.1, 0.3], dtype=F64)
    K = dplr_kernel(Lambda, P, B, C, dt, L, disc=disc, conj_pairs=True)
    Lf, Pf, Bf, Cf = conj_expand(Lambda, P, B, C)
    Ab, Bb = discretize(dplr_to_dense(Lf, Pf), Bf, dt, disc)
    b, a = ssm_to_rtf(Ab, Bb, Cf)
    assert b.dtype == F64
    assert rel_err(rtf_kernel(b, a, L), K) < 1e-6


def _s4d_lin(N: int, dt: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = torch.arange(N // 2, dtype=F64)
    lam = torch.exp(dt * torch.complex(torch.full_like(n, -0.5), math.pi * n)).expand(2, -1)
    return lam, torch.ones(2, N // 2, dtype=C128), torch.randn(2, N // 2, dtype=C128)


@pytest.mark.parametrize(
    "dt,N,accurate",
    [
        (0.1, 16, True),
        (0.1, 64, True),
        (0.1, 128, True),
        (0.01, 4, True),
        (0.01, 8, False),
        (0.01, 16, False),
    ],
)
def test_characteristic_polynomial_conditioning(dt, N, accurate):
    """Documented limit (ssm_to_rtf): clustered poles make the monomial coefficients meaningless.

    S4D-Lin poles exp(dt (-1/2 + i pi n)): spread around the circle for dt = 0.1 (accurate up to N = 128
    and beyond), within an arc of 0.01 pi N / 2 rad of z = 1 for dt = 0.01 (broken from N = 8). The
    companion recurrence from the same coefficients fails alike: the representation is the limit.
    """
    L = 256
    lam, B, C = _s4d_lin(N, dt)
    K = 2 * dense_kernel(torch.diag_embed(lam), B, C, L).real
    b, a = ssm_to_rtf(lam, B, C, conj_pairs=True)
    err_kernel = rel_err(rtf_kernel(b, a, L), K)
    err_companion = rel_err(_companion_kernel(b, a, L), K)
    if accurate:
        assert err_kernel < 1e-6 and err_companion < 1e-6
    elif N == 8:
        assert 1e-5 < err_companion < 1e-2 and err_kernel > 1e-4
    else:
        assert err_companion > 1.0  # the rounded coefficients describe an unstable filter
        assert not (err_kernel < 1e-2)  # large or non-finite


def test_ssm_to_rtf_gradcheck():
    lam = (1.6 * torch.rand(2, 3, dtype=F64) - 0.8).requires_grad_()
    B = torch.randn(2, 3, dtype=F64, requires_grad=True)
    C = torch.randn(2, 3, dtype=F64, requires_grad=True)
    D = torch.randn(2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: ssm_to_rtf(*x), (lam, B, C, D))


def test_rtf_to_ssm_companion_structure():
    b = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    a = torch.tensor([[0.5, -0.25]], dtype=F64)
    A, B, C, D = rtf_to_ssm(b, a)
    expected = torch.tensor([[[-0.5, 0.25, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=F64)
    torch.testing.assert_close(A, expected, rtol=0, atol=0)
    torch.testing.assert_close(B, torch.tensor([[1.0, 0.0, 0.0]], dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(C, b, rtol=0, atol=0)
    assert D.shape == (1,) and D.item() == 0


def test_rtf_to_ssm_pure_delay_needs_the_extra_state():
    """b(w) = w^N, a = 0 (a_N = 0): K = e_N, which no N-state system of this convention can produce."""
    N, L = 4, 10
    b = torch.zeros(1, N + 1, dtype=F64)
    b[0, N] = 1
    a = torch.zeros(1, N, dtype=F64)
    K = _companion_kernel(b, a, L)
    expected = torch.zeros(1, L, dtype=F64)
    expected[0, N] = 1
    torch.testing.assert_close(K, expected, rtol=0, atol=0)
    torch.testing.assert_close(rtf_kernel(b, a, L), expected, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------
# recurrent inference


def _random_rtf(H: int, N: int, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    a = stable_denominator(0.8 * torch.randn(H, N, dtype=F64))
    return torch.randn(H, N + 1, dtype=F64).to(dtype), a.to(dtype)


@pytest.mark.parametrize("N", [0, 1, 5, 12])
def test_filter_chunks_equal_one_pass_equal_step_loop(N):
    Bsz, H, L = 2, 3, 37
    b, a = _random_rtf(H, N)
    u = torch.randn(Bsz, H, L, dtype=F64)
    s0 = torch.randn(Bsz, H, N, dtype=F64)
    y, s = rtf_filter(b, a, u, s0)
    assert y.shape == (Bsz, H, L) and s.shape == (Bsz, H, N)
    ys, st = [], s0
    for t in range(L):
        yt, st = rtf_step(b, a, u[:, :, t], st)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, -1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st, s, rtol=1e-10, atol=1e-10)
    yc, sc = [], s0
    for lo, hi in [(0, 3), (3, 4), (4, 14), (14, 37)]:  # chunks shorter and longer than N
        y_k, sc = rtf_filter(b, a, u[:, :, lo:hi], sc)
        yc.append(y_k)
    torch.testing.assert_close(torch.cat(yc, -1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sc, s, rtol=1e-10, atol=1e-10)


def test_filter_equals_scan_of_companion_realization():
    """rtf_filter(state) == reference.scan of rtf_to_ssm with x_(-1) = (state, 0)."""
    Bsz, H, N, L = 2, 3, 6, 40
    b, a = _random_rtf(H, N)
    u = torch.randn(Bsz, H, L, dtype=F64)
    s0 = torch.randn(Bsz, H, N, dtype=F64)
    A, B, C, D = rtf_to_ssm(b, a)
    y_ref, x_last = scan(A, B, C, D, u, torch.nn.functional.pad(s0, (0, 1)))
    y, s = rtf_filter(b, a, u, s0)
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(s, x_last[..., :N]) < 1e-10


def test_filter_zero_state_is_the_convolution_mode():
    Bsz, H, N, L = 2, 4, 7, 50
    b, a = _random_rtf(H, N)
    u = torch.randn(Bsz, H, L, dtype=F64)
    y, _ = rtf_filter(b, a, u)
    assert rel_err(y, causal_conv_ref(u, rtf_kernel(b, a, L))) < 1e-10


def test_filter_float32_and_complex():
    b, a = _random_rtf(2, 3, torch.float32)
    y, s = rtf_filter(b, a, torch.randn(1, 2, 20))
    assert y.dtype == torch.float32 and s.dtype == F64  # the state in float64 (ssm.systems.rtf)
    y64, _ = rtf_filter(b.double(), a.double(), torch.zeros(1, 2, 20, dtype=F64) + 0)
    assert y64.dtype == F64
    lam = _stable_complex((2, 3))
    bc, ac = ssm_to_rtf(lam, torch.randn(2, 3, dtype=C128), torch.randn(2, 3, dtype=C128))
    u = torch.randn(1, 2, 15, dtype=F64)
    yc, sc = rtf_filter(bc, ac, u)
    st, ys = torch.zeros(1, 2, 3, dtype=C128), []
    for t in range(15):
        yt, st = rtf_step(bc, ac, u[:, :, t], st)
        ys.append(yt)
    assert yc.dtype == C128 and rel_err(yc, torch.stack(ys, -1)) < 1e-10 and rel_err(sc, st) < 1e-10


def test_filter_gradcheck():
    b, a = _random_rtf(2, 3)
    b.requires_grad_()
    a.requires_grad_()
    u = torch.randn(1, 2, 9, dtype=F64, requires_grad=True)
    s0 = torch.randn(1, 2, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: rtf_filter(*x), (b, a, u, s0))


# ---------------------------------------------------------------------------------------------------------
# initialization and stability


def test_rtf_init():
    b, a = rtf_init(512, 7, generator=torch.Generator().manual_seed(0))
    assert b.shape == (512, 8) and a.shape == (512, 7) and b.dtype == a.dtype == torch.float32
    assert bool((a == 0).all())
    assert abs(b.std().item() - 1 / math.sqrt(8)) < 0.02
    torch.testing.assert_close(rtf_kernel(b, a, 20)[:, :8], b, rtol=0, atol=1e-6)  # FIR at init
    b2, _ = rtf_init(512, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(b, b2, rtol=0, atol=0)
    b3, a3 = rtf_init(3, 2, scale=0.01, dtype=F64)
    assert b3.dtype == a3.dtype == F64 and b3.abs().max() < 0.1


def _max_pole_radius(a: torch.Tensor) -> float:
    return max(float(np.abs(np.roots(np.r_[1.0, row])).max()) for row in a.double().numpy())


def _schur_cohn_stable(a: torch.Tensor) -> bool:
    """Schur-Cohn test in extended precision: the step-down recursion gives |k_m| < 1 for every m."""
    for row in a.double().numpy():
        cur = row.astype(np.longdouble)
        for m in range(len(cur), 0, -1):
            k = cur[m - 1]
            if not abs(k) < 1:
                return False
            cur = (cur[: m - 1] - k * cur[: m - 1][::-1]) / (1 - k * k)
    return True


@pytest.mark.parametrize("method", ["reflection", "montel"])
@pytest.mark.parametrize("N", [1, 2, 7, 20])
def test_stable_denominator_is_stable(method, N):
    a_raw = (1.0 if method == "reflection" else 10.0) * torch.randn(50, N, dtype=F64)  # documented range
    a = stable_denominator(a_raw, method)
    assert a.shape == a_raw.shape
    assert _schur_cohn_stable(a)
    if N <= 7:  # np.roots is reliable at this degree; poles of larger N crowd the unit circle
        assert _max_pole_radius(a) < 1
    if method == "montel":
        assert bool((a.abs().sum(-1) < 1).all())
    torch.testing.assert_close(stable_denominator(torch.zeros(3, N), method), torch.zeros(3, N))


def test_reflection_reaches_every_stable_denominator():
    """Step-down (Schur-Cohn) of a stable polynomial gives |k| < 1, and atanh(k) maps back to it."""
    N = 6
    poles = _stable_complex((N // 2,), 0.5, 0.99)
    a = torch.from_numpy(np.real(np.poly(torch.cat([poles, poles.conj()]).numpy()))[1:])
    k, cur = [], a.clone()
    for m in range(N, 0, -1):
        km = cur[m - 1]
        k.append(km)
        cur = (cur[: m - 1] - km * cur[: m - 1].flip(0)) / (1 - km**2)
    k = torch.stack(k[::-1])
    assert bool((k.abs() < 1).all())
    torch.testing.assert_close(stable_denominator(torch.atanh(k)), a, rtol=1e-9, atol=1e-9)
    assert _max_pole_radius(a) > 0.98  # a genuinely aggressive target, outside Montel's region
    assert a.abs().sum() > 1


@pytest.mark.parametrize("method", ["reflection", "montel"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_stable_denominator_margin_survives_saturation(method, dtype):
    """Huge a_raw: tanh rounds to +-1 in float32 and sum |a_raw| / (1 + sum |a_raw|) to 1; the margin keeps
    every (rounded) pole strictly inside the circle."""
    if method == "reflection":
        a_raw = 1e6 * torch.tensor([[1.0], [-1.0]], dtype=dtype)
    else:
        a_raw = 1e12 * torch.randn(50, 6, dtype=dtype)
    a = stable_denominator(a_raw, method)
    if method == "reflection":
        assert bool((a.abs() < 1).all())
    else:
        assert bool((a.abs().sum(-1) < 1).all())
    assert _schur_cohn_stable(a)


@pytest.mark.parametrize("method", ["reflection", "montel"])
def test_stable_denominator_gradient(method):
    a_raw = torch.randn(2, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: stable_denominator(x, method), (a_raw,))


# ---------------------------------------------------------------------------------------------------------
# bad input


def test_ssm_to_rtf_bad_input():
    A, B, C = torch.randn(2, 3, 3), torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="A"):
        ssm_to_rtf(torch.randn(2, 3, 4), B, C)
    with pytest.raises(ValueError, match="A"):
        ssm_to_rtf(torch.randn(2, 4), B, C)
    with pytest.raises(ValueError, match="C"):
        ssm_to_rtf(A, B, torch.randn(2, 4))
    with pytest.raises(ValueError, match="B"):
        ssm_to_rtf(A, torch.ones(2, 3, dtype=torch.int64), C)
    with pytest.raises(ValueError, match="batch"):
        ssm_to_rtf(A, torch.randn(5, 3), C)
    with pytest.raises(ValueError, match="D"):
        ssm_to_rtf(A, B, C, torch.randn(4))
    with pytest.raises(ValueError, match="conj_pairs"):
        ssm_to_rtf(A, B, C, conj_pairs=1)
    with pytest.raises(ValueError, match="real"):
        ssm_to_rtf(A, B, C, real="yes")
    with pytest.raises(ValueError, match="B"):
        ssm_to_rtf(A, torch.tensor(1.0), C)
    with pytest.raises(ValueError, match="diagonal"):  # a shared dense A must carry B's batch dims
        ssm_to_rtf(torch.randn(3, 3), torch.randn(2, 3), torch.randn(2, 3))


def test_zero_state_system_is_a_gain():
    b, a = ssm_to_rtf(torch.zeros(2, 0, 0), torch.zeros(2, 0), torch.zeros(2, 0), torch.tensor([1.5, -2.0]))
    assert a.shape == (2, 0)
    torch.testing.assert_close(b, torch.tensor([[1.5], [-2.0]]))


def test_ssm_to_rtf_dplr_bad_input():
    Lambda, B, C = torch.randn(2, 3, dtype=C128), torch.randn(2, 3, dtype=C128), torch.randn(2, 3, dtype=C128)
    P = torch.randn(1, 2, 3, dtype=C128)
    with pytest.raises(ValueError, match="P"):
        ssm_to_rtf_dplr(Lambda, torch.randn(2, 3, dtype=C128), None, B, C)
    with pytest.raises(ValueError, match="Q"):
        ssm_to_rtf_dplr(Lambda, P, torch.randn(2, 2, 3, dtype=C128), B, C)
    with pytest.raises(ValueError, match="C"):
        ssm_to_rtf_dplr(Lambda, P, None, B, torch.randn(2, 4, dtype=C128))
    with pytest.raises(ValueError, match="Lambda"):
        ssm_to_rtf_dplr(torch.tensor(1.0), P, None, B, C)


def test_rtf_to_ssm_bad_input():
    with pytest.raises(ValueError, match="b and a"):
        rtf_to_ssm(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="b and a"):
        rtf_to_ssm(torch.randn(3, 4), torch.randn(2, 3))
    with pytest.raises(ValueError, match="a"):
        rtf_to_ssm(torch.randn(2, 4), torch.ones(2, 3, dtype=torch.int64))


def test_step_and_filter_bad_input():
    b, a = torch.randn(3, 5), torch.randn(3, 4)
    with pytest.raises(ValueError, match="u_t"):
        rtf_step(b, a, torch.randn(2, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="state"):
        rtf_step(b, a, torch.randn(2, 3), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="b and a"):
        rtf_step(torch.randn(3, 4), a, torch.randn(2, 3), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="u"):
        rtf_filter(b, a, torch.randn(3, 10))
    with pytest.raises(ValueError, match="u"):
        rtf_filter(b, a, torch.randn(2, 4, 10))
    with pytest.raises(ValueError, match="u"):
        rtf_filter(b, a, torch.randn(2, 3, 0))
    with pytest.raises(ValueError, match="state"):
        rtf_filter(b, a, torch.randn(2, 3, 10), torch.zeros(1, 3, 4))


def test_init_and_stability_bad_input():
    with pytest.raises(ValueError, match="H"):
        rtf_init(0, 3)
    with pytest.raises(ValueError, match="N"):
        rtf_init(2, -1)
    with pytest.raises(ValueError, match="scale"):
        rtf_init(2, 3, scale=-1.0)
    with pytest.raises(ValueError, match="dtype"):
        rtf_init(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="method"):
        stable_denominator(torch.randn(2, 3), "tanh")
    with pytest.raises(ValueError, match="a_raw"):
        stable_denominator(torch.randn(2, 3, dtype=C128))
    with pytest.raises(ValueError, match="a_raw"):
        stable_denominator(torch.tensor(0.5))
