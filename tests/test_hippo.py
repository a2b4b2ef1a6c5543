"""Tests for ssm.hippo: the reconstruction property of each measure (integrating the continuous system),
the NPLR decomposition (reassembly, unitary V, conjugate-pair halving, unchanged transfer function) and the
S4D diagonal initializations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import rel_err, tol
from numpy.polynomial import laguerre as nplag
from numpy.polynomial import legendre as npleg
from scipy.integrate import solve_ivp

from ssm.hippo import (
    DIAG_INITS,
    MEASURES,
    diag_init,
    nplr,
    nplr_basis,
    rank_correction,
    transition,
)

NEEDED_RANK = {"legt": 2, "legs": 1, "lagt": 1, "fout": 1}
NORMAL_SHIFT = {"legt": 0.0, "legs": -0.5, "lagt": 0.0, "fout": 0.0}  # c in A_hat + P^T P = c I + skew
GAUSS_X, GAUSS_W = npleg.leggauss(200)  # quadrature on [-1, 1] for exact projections


def _f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _c128(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.complex128)


def _close_sorted(x: torch.Tensor, y: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(torch.sort(x).values, torch.sort(y).values, atol=atol, rtol=0)


def _integrate(A: torch.Tensor, B: torch.Tensor, u, t0: float, t1: float, x0: np.ndarray) -> np.ndarray:
    """x(t1) of x' = A x + B u(t) from x(t0) = x0, with a tight 8th-order Runge-Kutta."""
    A_, B_ = A.numpy(), B.numpy()
    sol = solve_ivp(lambda t, x: A_ @ x + B_ * u(t), (t0, t1), x0, method="DOP853", rtol=1e-10, atol=1e-12)
    assert sol.success
    return sol.y[:, -1]


def _rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _fourier_basis(N: int, r: np.ndarray) -> np.ndarray:
    """g_n(r) (len(r), N): 1, 0, sqrt2 cos(2 pi r), sqrt2 sin(2 pi r), sqrt2 cos(4 pi r), ..."""
    j = np.arange(N) // 2
    phase = 2 * np.pi * j[None, :] * r[:, None]
    G = math.sqrt(2) * np.where(np.arange(N) % 2 == 0, np.cos(phase), np.sin(phase))
    G[:, 0] = 1.0
    return G


# ---------------------------------------------------------------- transition: values


def test_transition_small_values():
    s2, pi = math.sqrt(2), math.pi
    A, B = transition("legt", 3)
    torch.testing.assert_close(A, _f64([[-1.0, -1, -1], [3, -3, -3], [-5, 5, -5]]))
    torch.testing.assert_close(B, _f64([1.0, -3, 5]))

    A, B = transition("legs", 3)
    r = [1.0, math.sqrt(3), math.sqrt(5)]
    ref = [[-1.0, 0, 0], [-r[1], -2, 0], [-r[2], -r[1] * r[2], -3]]
    torch.testing.assert_close(A, _f64(ref))
    torch.testing.assert_close(B, _f64(r))

    A, B = transition("lagt", 3)
    torch.testing.assert_close(A, _f64([[-0.5, 0, 0], [-1, -0.5, 0], [-1, -1, -0.5]]))
    torch.testing.assert_close(B, torch.ones(3, dtype=torch.float64))

    A, B = transition("fout", 4)
    ref = [[-2, 0, -2 * s2, 0], [0, 0, 0, 0], [-2 * s2, 0, -4, -2 * pi], [0, 0, 2 * pi, 0]]
    torch.testing.assert_close(A, _f64(ref))
    torch.testing.assert_close(B, _f64([2, 0, 2 * s2, 0]))


@pytest.mark.parametrize("measure", MEASURES)
def test_transition_dtype_and_shape(measure):
    A, B = transition(measure, 6, dtype=torch.float32)
    assert A.shape == (6, 6) and B.shape == (6,)
    assert A.dtype == B.dtype == torch.float32
    A64, B64 = transition(measure, 6)
    torch.testing.assert_close(A, A64.float())
    torch.testing.assert_close(B, B64.float())


# ---------------------------------------------------------------- reconstruction by integration


def _u_legt(t):
    t = np.asarray(t, dtype=float)
    return np.sin(17 * t) + 0.5 * np.cos(29 * t + 0.4) + 0.3 * np.sin(3 * t * t)


@pytest.mark.parametrize("N, bound", [(24, 2e-4), (32, 1e-8)])  # measured 9.0e-5 and 2.7e-9
def test_legt_reconstructs_last_unit_of_time(N, bound):
    """u(t - r) ~ sum_n x_n(t) P_n(2r - 1), r in [0, 1], after integrating the LegT system for 2 units."""
    A, B = transition("legt", N)
    r_q, w_q = (GAUSS_X + 1) / 2, GAUSS_W / 2

    def project(t):  # exact shifted-Legendre coefficients of the window
        return (2 * np.arange(N) + 1) * (npleg.legvander(2 * r_q - 1, N - 1).T @ (w_q * _u_legt(t - r_q)))

    t0, t1 = 1.0, 3.0
    x = _integrate(A, B, _u_legt, t0, t1, project(t0))
    r = np.linspace(0, 1, 2001)
    Pr = npleg.legvander(2 * r - 1, N - 1)  # (R, N)
    truth = _u_legt(t1 - r)
    err, best = _rel(Pr @ x, truth), _rel(Pr @ project(t1), truth)
    assert err < bound
    assert err < 2 * best  # the dynamics track the optimal window projection


def _u_smooth(t):
    t = np.asarray(t, dtype=float)
    return np.sin(2.1 * t) + 0.5 * np.cos(5.3 * t + 0.4) + 0.3 * np.sin(0.7 * t * t)


@pytest.mark.parametrize("N, bound", [(24, 2e-5), (32, 1e-8)])  # measured 7.7e-6 and 1.8e-9
def test_legs_reconstructs_whole_history(N, bound):
    """u(s) ~ sum_n x_n(t) sqrt(2n+1) P_n(2s/t - 1), s in [0, t], for x' = (1/t)(A x + B u).

    Integrated in tau = log t (dx/dtau = A x + B u(e^tau)) from the exact projection at t0 = 0.01; LegS is
    exact, so x(t) equals the projection coefficients."""
    A, B = transition("legs", N)
    scale = np.sqrt(2 * np.arange(N) + 1)

    def project(t):
        return scale * (npleg.legvander(GAUSS_X, N - 1).T @ (GAUSS_W / 2 * _u_smooth(t * (GAUSS_X + 1) / 2)))

    t0, t1 = 0.01, 5.0
    x = _integrate(A, B, lambda tau: _u_smooth(np.exp(tau)), math.log(t0), math.log(t1), project(t0))
    assert _rel(x, project(t1)) < 1e-9
    s = np.linspace(0, t1, 2001)
    G = npleg.legvander(2 * s / t1 - 1, N - 1) * scale  # (S, N)
    truth = _u_smooth(s)
    err = _rel(G @ x, truth)
    assert err < bound
    assert err < 1.01 * _rel(G @ project(t1), truth)


def test_lagt_reconstructs_laguerre_history():
    """x_n(t) = int_0^inf u(t-s) L_n(s) e^{-s/2} ds exactly, and u(t - s) ~ sum_n x_n(t) L_n(s) e^{-s/2}."""
    N, t1 = 32, 10.0
    A, B = transition("lagt", N)

    def u(t):  # a bump that has (almost) vanished at t = 0, where the input starts
        t = np.asarray(t, dtype=float)
        return np.exp(-((t - 6) ** 2) / 8) * (np.cos(0.8 * t) + 0.5) * (t >= 0)

    def laguerre_fns(s):
        return nplag.lagvander(s, N - 1) * np.exp(-s / 2)[:, None]  # (S, N), orthonormal on [0, inf)

    x = _integrate(A, B, u, 0.0, t1, np.zeros(N))
    s_q, w_q = t1 * (GAUSS_X + 1) / 2, t1 * GAUSS_W / 2
    exact = laguerre_fns(s_q).T @ (w_q * u(t1 - s_q))
    assert _rel(x, exact) < 1e-9
    s = np.linspace(0, 80, 8001)  # the history is 0 beyond s = t1; the basis decays like e^{-s/2}
    err = _rel(laguerre_fns(s) @ x, u(t1 - s))
    assert err < 1e-2  # measured 4.6e-3: the optimal Laguerre truncation error of this signal


@pytest.mark.parametrize("N", [24, 32])
def test_fout_reconstructs_window(N):
    """u(t - r) ~ sum_n x_n(t) g_n(r), r in [0, 1], g = 1, 0, sqrt2 cos(2 pi r), sqrt2 sin(2 pi r), ..."""
    A, B = transition("fout", N)
    r_q, w_q = (GAUSS_X + 1) / 2, GAUSS_W / 2
    r = np.linspace(0, 1, 4001)
    G = _fourier_basis(N, r)

    def periodic(t):  # period 1, harmonics below N/2: represented exactly
        t = np.asarray(t, dtype=float)
        return np.sin(6 * np.pi * t) + 0.4 * np.cos(10 * np.pi * t + 1) + 0.2

    # measured errors 1e-12 and 3e-2 (Gibbs-limited), 1.1-1.2 times the best window projection's
    for u, bound in [(periodic, 1e-9), (_u_smooth, 0.1)]:

        def project(t, u=u):
            return _fourier_basis(N, r_q).T @ (w_q * u(t - r_q))

        t0, t1 = 1.0, 4.0
        x = _integrate(A, B, u, t0, t1, project(t0))
        truth = u(t1 - r)
        err = _rel(G @ x, truth)
        assert err < bound
        assert err < 1.5 * _rel(G @ project(t1), truth) + 1e-11


# ---------------------------------------------------------------- rank correction


def _hat(measure: str, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = transition(measure, N)
    d = nplr_basis(measure, N)
    return A * d[None, :] / d[:, None], B / d


def _sizes(measure: str) -> list[int]:
    return [2, 4, 8, 16, 64] if measure == "fout" else [1, 2, 3, 7, 8, 16, 33, 64]


@pytest.mark.parametrize("measure", MEASURES)
def test_rank_correction_makes_normal(measure):
    for N in _sizes(measure):
        A_hat, _ = _hat(measure, N)
        P = rank_correction(measure, N, NEEDED_RANK[measure])
        assert P.shape == (NEEDED_RANK[measure], N)
        M = A_hat + P.T @ P
        sym = 0.5 * (M + M.T)
        shift = NORMAL_SHIFT[measure] * torch.eye(N, dtype=torch.float64)
        torch.testing.assert_close(sym, shift, atol=1e-12, rtol=0)
        torch.testing.assert_close(M @ M.T, M.T @ M, atol=1e-9 * N**2, rtol=0)


def test_nplr_basis():
    torch.testing.assert_close(nplr_basis("legt", 3), torch.tensor([1.0, 3, 5], dtype=torch.float64).sqrt())
    for measure in ("legs", "lagt", "fout"):
        torch.testing.assert_close(nplr_basis(measure, 4), torch.ones(4, dtype=torch.float64))


def test_rank_correction_padding():
    P = rank_correction("legs", 5, rank=3)
    assert P.shape == (3, 5)
    torch.testing.assert_close(P[0], torch.sqrt(torch.arange(5, dtype=torch.float64) + 0.5))
    assert torch.all(P[1:] == 0)
    P = rank_correction("legt", 4, rank=2, dtype=torch.float32)
    assert P.dtype == torch.float32
    ref = torch.tensor([[1, 0, 5**0.5, 0], [0, 3**0.5, 0, 7**0.5]], dtype=torch.float32)
    torch.testing.assert_close(P, ref)


# ---------------------------------------------------------------- NPLR


def _full_from_half(Lambda, P, B, V):
    """Append the conjugate of every mode of a half=True decomposition."""
    return (
        torch.cat([Lambda, Lambda.conj()]),
        torch.cat([P, P.conj()], dim=-1),
        torch.cat([B, B.conj()]),
        torch.cat([V, V.conj()], dim=-1),
    )


def _reassemble(Lambda, P, V):
    return V @ (torch.diag(Lambda) - P.T @ P.conj()) @ V.conj().T


@pytest.mark.parametrize("measure", MEASURES)
def test_nplr_reassembles(measure):
    need = NEEDED_RANK[measure]
    for N in _sizes(measure):
        A_hat, B_hat = _hat(measure, N)
        for rank in (need, need + 1):
            Lambda, P, B, V = nplr(measure, N, rank)
            assert Lambda.shape == (N,) and P.shape == (rank, N) and B.shape == (N,) and V.shape == (N, N)
            assert Lambda.dtype == P.dtype == B.dtype == V.dtype == torch.complex128
            eye = torch.eye(N, dtype=torch.complex128)
            assert (V.conj().T @ V - eye).abs().max() < 1e-12
            assert rel_err(_reassemble(Lambda, P, V), A_hat.to(torch.complex128)) < 1e-12
            assert rel_err(V @ B, B_hat.to(torch.complex128)) < 1e-12
            P0 = rank_correction(measure, N, rank).to(torch.complex128)
            assert (V @ P.T - P0.T).abs().max() < 1e-12 * max(1.0, float(P0.abs().max()))
            assert torch.all(Lambda.real == NORMAL_SHIFT[measure])
            assert B.imag.abs().max() < 1e-12 and B.real.min() > -1e-12  # phases fixed: V^* B real >= 0
            if rank > need:
                assert P[need:].abs().max() < 1e-12
            # the eigenvalues are those of the normal part, computed independently
            ref = torch.linalg.eigvals(A_hat + P0.real.T @ P0.real)
            assert (ref.real - NORMAL_SHIFT[measure]).abs().max() < 1e-8
            _close_sorted(Lambda.imag, ref.imag, atol=1e-8)


@pytest.mark.parametrize("measure", MEASURES)
def test_nplr_half(measure):
    need = NEEDED_RANK[measure]
    for N in (2, 8, 16, 64):
        A_hat, B_hat = _hat(measure, N)
        Lh, Ph, Bh, Vh = nplr(measure, N, need, half=True)
        M = N // 2
        assert Lh.shape == (M,) and Ph.shape == (need, M) and Bh.shape == (M,) and Vh.shape == (N, M)
        assert torch.all(Lh.imag >= 0) and torch.all(Lh.imag[1:] >= Lh.imag[:-1])
        # the half columns are orthonormal and orthogonal to their conjugates
        assert (Vh.conj().T @ Vh - torch.eye(M, dtype=Vh.dtype)).abs().max() < 1e-12
        assert (Vh.conj().T @ Vh.conj()).abs().max() < 1e-12
        # A_hat = 2 Re(V diag(Lambda) V^*) - P0^T P0
        P0 = rank_correction(measure, N, need)
        A_re = 2 * (Vh @ torch.diag(Lh) @ Vh.conj().T).real - P0.T @ P0
        assert rel_err(A_re, A_hat) < 1e-12
        full = _full_from_half(Lh, Ph, Bh, Vh)
        assert rel_err(_reassemble(full[0], full[1], full[3]), A_hat.to(torch.complex128)) < 1e-12
        # same spectrum as the full decomposition
        Lf = nplr(measure, N, need)[0]
        _close_sorted(full[0].imag, Lf.imag, atol=1e-10)


def _transfer_dense(A, B, C, s):
    """H(s) = C (sI - A)^{-1} B for each s (S,)."""
    eye = torch.eye(A.shape[0], dtype=torch.complex128)
    A, B, C = (x.to(torch.complex128) for x in (A, B, C))
    return torch.stack([C @ torch.linalg.solve(z * eye - A, B) for z in s])


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("half", [False, True])
def test_nplr_transfer_function_unchanged(measure, half):
    """The NPLR system (with C -> C T V, and conjugates appended when half) has the transfer function of the
    original (A, B) of transition(), in the original (for legt: LMU) basis."""
    N = 16
    A, B = transition(measure, N)
    C = torch.randn(N, dtype=torch.float64)
    s = _c128([0.3, 1.0 + 2.0j, 0.5 - 7.0j, 2.0 + 40.0j])
    ref = _transfer_dense(A, B, C, s)

    Lambda, P, Bq, V = nplr(measure, N, NEEDED_RANK[measure], half=half)
    Cq = (C * nplr_basis(measure, N)).to(torch.complex128) @ V  # C T V
    if half:
        Lambda, P, Bq, _ = _full_from_half(Lambda, P, Bq, V)
        Cq = torch.cat([Cq, Cq.conj()])
    got = _transfer_dense(torch.diag(Lambda) - P.T @ P.conj(), Bq, Cq, s)
    assert rel_err(got, ref) < tol(torch.complex128)["rtol"]
    if measure == "legt":  # without C -> C T the transfer function differs
        Cw = C.to(torch.complex128) @ V
        if half:
            Cw = torch.cat([Cw, Cw.conj()])
        assert rel_err(_transfer_dense(torch.diag(Lambda) - P.T @ P.conj(), Bq, Cw, s), ref) > 1e-2


def test_nplr_fout_zero_frequency_pair():
    """FouT's frequency-0 pair (states 0 and 1) has eigenvalue 0; its half mode spans e0 and e1."""
    Lh, _, Bh, Vh = nplr("fout", 8, half=True)
    assert Lh[0] == 0
    assert Vh[2:, 0].abs().max() < 1e-12
    torch.testing.assert_close(Vh[:2, 0].abs(), torch.full((2,), 2**-0.5, dtype=torch.float64))
    torch.testing.assert_close(Bh[0], _c128(2 * 2**-0.5))


def test_nplr_dtype():
    Lambda, P, B, V = nplr("legs", 8, dtype=torch.complex64)
    assert Lambda.dtype == P.dtype == B.dtype == V.dtype == torch.complex64
    ref = nplr("legs", 8)
    for x, y in zip((Lambda, P, B, V), ref):
        torch.testing.assert_close(x, y.to(torch.complex64))


def test_nplr_legs_n2_by_hand():
    # A + P P^T = -I/2 + (sqrt3/2) [[0, 1], [-1, 0]]: eigenvalues -1/2 +- i sqrt3/2, v = (1, i)/sqrt2.
    Lambda, P, B, V = nplr("legs", 2, half=True)
    torch.testing.assert_close(Lambda, _c128([-0.5 + 0.5j * math.sqrt(3)]))
    torch.testing.assert_close(B, _c128([math.sqrt(2)]))
    torch.testing.assert_close(P, _c128([[1.0]]))  # P0 = B / sqrt2
    torch.testing.assert_close(V[:, 0] / V[0, 0], _c128([1, 1j]))


# ---------------------------------------------------------------- diagonal initializations


def test_diag_init_values():
    pi = math.pi
    Lambda, B = diag_init("lin", 4)
    torch.testing.assert_close(Lambda, _c128([-0.5, -0.5 + 1j * pi]))
    torch.testing.assert_close(B, torch.ones(2, dtype=torch.complex128))

    Lambda, _ = diag_init("inv", 4)  # (N/pi)(N/(2n+1) - 1) = 12/pi, 4/(3 pi)
    torch.testing.assert_close(Lambda, _c128([-0.5 + 12j / pi, -0.5 + 4j / (3 * pi)]))

    Lambda, B = diag_init("real", 4)
    torch.testing.assert_close(Lambda, _c128([-1.0, -2.0]))
    torch.testing.assert_close(B, torch.ones(2, dtype=torch.complex128))
    Lambda, B = diag_init("real", 3, half=False)
    torch.testing.assert_close(Lambda, _c128([-1.0, -2.0, -3.0]))
    assert B.shape == (3,)

    Lambda, B = diag_init("lin", 4, half=False)
    torch.testing.assert_close(Lambda, _c128([-0.5, -0.5 + 1j * pi, -0.5, -0.5 - 1j * pi]))
    assert B.shape == (4,)

    Lambda, B = diag_init("legs", 2)
    torch.testing.assert_close(Lambda, _c128([-0.5 + 0.5j * math.sqrt(3)]))
    torch.testing.assert_close(B, _c128([math.sqrt(2)]))


@pytest.mark.parametrize("half", [True, False])
def test_diag_init_legs_is_nplr_diagonal(half):
    Lambda, B = diag_init("legs", 16, half=half, dtype=torch.complex64)
    L_ref, _, B_ref, _ = nplr("legs", 16, half=half)
    assert Lambda.dtype == B.dtype == torch.complex64
    torch.testing.assert_close(Lambda, L_ref.to(torch.complex64))
    torch.testing.assert_close(B, B_ref.to(torch.complex64))
    assert torch.all(Lambda.real == -0.5)


# ---------------------------------------------------------------- bad input


BAD_INPUTS = [
    (lambda: transition("legx", 4), "measure"),
    (lambda: transition("legs", 0), "N"),
    (lambda: transition("legs", 2.5), "N"),
    (lambda: transition("fout", 5), "N"),
    (lambda: transition("legs", 4, dtype=torch.complex64), "dtype"),
    (lambda: rank_correction("foo", 4), "measure"),
    (lambda: rank_correction("legs", 0), "N"),
    (lambda: rank_correction("legs", 4, rank=0), "rank"),
    (lambda: rank_correction("legt", 4, rank=1), "rank"),
    (lambda: rank_correction("fout", 3), "N"),
    (lambda: rank_correction("legs", 4, dtype=torch.int64), "dtype"),
    (lambda: nplr_basis("foo", 4), "measure"),
    (lambda: nplr_basis("legt", -1), "N"),
    (lambda: nplr_basis("legt", 3, dtype=torch.complex128), "dtype"),
    (lambda: nplr("foo", 4), "measure"),
    (lambda: nplr("legs", 0), "N"),
    (lambda: nplr("legt", 4, rank=1), "rank"),
    (lambda: nplr("legs", 4, rank=1.0), "rank"),
    (lambda: nplr("legs", 5, half=True), "N"),
    (lambda: nplr("fout", 5), "N"),
    (lambda: nplr("legs", 4, half=1), "half"),
    (lambda: nplr("legs", 4, dtype=torch.float64), "dtype"),
    (lambda: diag_init("foo", 4), "init"),
    (lambda: diag_init("lin", 0), "N"),
    (lambda: diag_init("lin", 5), "N"),
    (lambda: diag_init("inv", 5, half=False), "N"),
    (lambda: diag_init("real", 5), "N"),
    (lambda: diag_init("legs", 5), "N"),
    (lambda: diag_init("lin", 4, half="yes"), "half"),
    (lambda: diag_init("lin", 4, dtype=torch.float32), "dtype"),
]


@pytest.mark.parametrize("i", range(len(BAD_INPUTS)))
def test_bad_input(i):
    fn, name = BAD_INPUTS[i]
    with pytest.raises(ValueError, match=name):
        fn()


def test_error_lists_choices():
    with pytest.raises(ValueError, match="'legt', 'legs', 'lagt', 'fout'"):
        nplr("hippo", 4)
    with pytest.raises(ValueError, match="'lin', 'inv', 'legs', 'real'"):
        diag_init("hippo", 4)
    assert DIAG_INITS == ("lin", "inv", "legs", "real")
