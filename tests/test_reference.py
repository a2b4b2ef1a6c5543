"""The float64 references themselves, checked against independent formulas (numpy, matrix powers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tol

from ssm.reference import causal_conv_ref, conj_expand, dense_kernel, dplr_to_dense, scan


def _crandn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.complex128)


# ---- dplr_to_dense ----


def test_dplr_to_dense_entries():
    N, R = 5, 2
    Lambda, P, Q = _crandn(N), _crandn(R, N), _crandn(R, N)
    A = dplr_to_dense(Lambda, P, Q)
    lam, p, q = Lambda.numpy(), P.numpy(), Q.numpy()
    expected = np.diag(lam) - sum(np.outer(p[r], np.conj(q[r])) for r in range(R))
    assert A.dtype == torch.complex128
    np.testing.assert_allclose(A.numpy(), expected, rtol=1e-14, atol=1e-14)


def test_dplr_to_dense_defaults_and_batch():
    H, N = 3, 4
    Lambda, P = _crandn(H, N), _crandn(1, H, N)
    A = dplr_to_dense(Lambda, P)
    assert A.shape == (H, N, N)
    for h in range(H):
        expected = torch.diag(Lambda[h]) - torch.outer(P[0, h], P[0, h].conj())
        torch.testing.assert_close(A[h], expected, **tol(torch.complex128))
    # A - diag(Lambda) = -P P^* is Hermitian negative semidefinite
    low_rank = A - torch.diag_embed(Lambda)
    torch.testing.assert_close(low_rank, low_rank.mH, **tol(torch.complex128))
    real = dplr_to_dense(torch.randn(N), torch.randn(1, N))
    assert real.dtype == torch.float64


def test_dplr_to_dense_validation():
    with pytest.raises(ValueError, match="P"):
        dplr_to_dense(_crandn(4), _crandn(4))
    with pytest.raises(ValueError, match="P"):
        dplr_to_dense(_crandn(4), _crandn(1, 5))
    with pytest.raises(ValueError, match="Q"):
        dplr_to_dense(_crandn(4), _crandn(1, 4), _crandn(2, 4))
    with pytest.raises(ValueError, match="Lambda"):
        dplr_to_dense(torch.tensor(1.0), _crandn(1, 1))


# ---- conj_expand ----


def test_conj_expand_gives_real_kernel_twice_real_part():
    H, N2, L = 2, 3, 12
    re, im = torch.randn(2, H, N2, dtype=torch.float64)
    Lambda = torch.complex(-0.5 + 0.2 * re, im)
    B, C = _crandn(H, N2), _crandn(H, N2)
    Lf, Pf, Bf, Cf = conj_expand(Lambda, None, B, C)
    assert Pf is None
    assert Lf.shape == Bf.shape == Cf.shape == (H, 2 * N2)
    torch.testing.assert_close(Lf[..., N2:], Lambda.conj())
    Ab = torch.diag_embed(torch.exp(Lambda))
    Ab_full = torch.diag_embed(torch.exp(Lf))
    K_half = dense_kernel(Ab, B, C, L)
    K_full = dense_kernel(Ab_full, Bf, Cf, L)
    assert K_full.imag.abs().max() < 1e-12
    torch.testing.assert_close(K_full.real, 2 * K_half.real, **tol(torch.float64))


def test_conj_expand_validation():
    with pytest.raises(ValueError, match="B"):
        conj_expand(_crandn(3), B=[1.0, 2.0])
    with pytest.raises(ValueError, match="Lambda"):
        conj_expand(torch.tensor(1.0 + 1j))


# ---- dense_kernel ----


def test_dense_kernel_matches_matrix_powers():
    N, L = 4, 9
    Ab, Bb, C = 0.5 * _crandn(N, N), _crandn(N), _crandn(N)
    K = dense_kernel(Ab, Bb, C, L)
    for k in range(L):
        expected = C @ torch.linalg.matrix_power(Ab, k) @ Bb
        torch.testing.assert_close(K[k], expected, **tol(torch.complex128))


def test_dense_kernel_batch_channels_and_dtype():
    Ch, H, N, L = 3, 2, 4, 6
    Ab, Bb = 0.4 * torch.randn(H, N, N), torch.randn(H, N)
    C = torch.randn(Ch, H, N)
    K = dense_kernel(Ab, Bb, C, L)
    assert K.shape == (Ch, H, L) and K.dtype == torch.float64
    for c in range(Ch):
        torch.testing.assert_close(K[c], dense_kernel(Ab, Bb, C[c], L), **tol(torch.float64))
    assert dense_kernel(Ab, Bb, C.to(torch.complex64), L).dtype == torch.complex128


def test_dense_kernel_validation():
    with pytest.raises(ValueError, match="Ab"):
        dense_kernel(torch.randn(3, 4), torch.randn(4), torch.randn(4), 5)
    with pytest.raises(ValueError, match="Bb"):
        dense_kernel(torch.randn(4, 4), torch.randn(3), torch.randn(4), 5)
    with pytest.raises(ValueError, match="C"):
        dense_kernel(torch.randn(4, 4), torch.randn(4), torch.randn(3), 5)
    with pytest.raises(ValueError, match="L"):
        dense_kernel(torch.randn(4, 4), torch.randn(4), torch.randn(4), 0)


# ---- scan ----


def _system(H: int, N: int, complex_: bool = True):
    mk = _crandn if complex_ else (lambda *s: torch.randn(*s, dtype=torch.float64))
    Ab = 0.3 * mk(H, N, N)
    return Ab, mk(H, N), mk(H, N), torch.randn(H, dtype=torch.float64)


@pytest.mark.parametrize("complex_", [True, False])
def test_scan_equals_kernel_convolution(complex_):
    Bsz, H, N, L = 2, 3, 4, 11
    Ab, Bb, C, D = _system(H, N, complex_)
    u = torch.randn(Bsz, H, L, dtype=torch.float64)
    y, _ = scan(Ab, Bb, C, D, u)
    K = dense_kernel(Ab, Bb, C, L).real  # (H, L)
    expected = torch.zeros_like(y)
    for t in range(L):
        for s in range(t + 1):
            expected[:, :, t] += K[:, t - s] * u[:, :, s]
    expected += D[:, None] * u
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, expected, **tol(torch.float64))


def test_scan_initial_state_and_split():
    Bsz, H, N, L = 2, 2, 3, 10
    Ab, Bb, C, D = _system(H, N)
    u = torch.randn(Bsz, H, L, dtype=torch.float64)
    x0 = _crandn(Bsz, H, N)
    y, x_last = scan(Ab, Bb, C, D, u, x0)
    # zero-input response: y_k = Re(C Ab^{k+1} x0)
    y0, _ = scan(Ab, Bb, C, D, torch.zeros_like(u), x0)
    for k in range(L):
        Apow = torch.linalg.matrix_power(Ab, k + 1)  # (H, N, N)
        expected = torch.einsum("hn,hnm,bhm->bh", C, Apow, x0).real
        torch.testing.assert_close(y0[:, :, k], expected, **tol(torch.float64))
    # linearity: response = zero-input response + zero-state response
    yz, _ = scan(Ab, Bb, C, D, u)
    torch.testing.assert_close(y, y0 + yz, **tol(torch.float64))
    # running two halves with the carried state equals one run
    y1, x1 = scan(Ab, Bb, C, D, u[..., :4], x0)
    y2, x2 = scan(Ab, Bb, C, D, u[..., 4:], x1)
    torch.testing.assert_close(torch.cat([y1, y2], -1), y, **tol(torch.float64))
    torch.testing.assert_close(x2, x_last, **tol(torch.complex128))


def test_scan_validation():
    Ab, Bb, C, D = _system(2, 3)
    u = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="u"):
        scan(Ab, Bb, C, D, u[0])
    with pytest.raises(ValueError, match="Ab"):
        scan(Ab[:, :2], Bb, C, D, u)
    with pytest.raises(ValueError, match="Bb"):
        scan(Ab, Bb[:1], C, D, u)
    with pytest.raises(ValueError, match="C"):
        scan(Ab, Bb, C[:, :2], D, u)
    with pytest.raises(ValueError, match="D"):
        scan(Ab, Bb, C, D[:1], u)
    with pytest.raises(ValueError, match="x0"):
        scan(Ab, Bb, C, D, u, torch.zeros(1, 2, 4))


# ---- causal_conv_ref ----


@pytest.mark.parametrize("Lk", [3, 8, 13])
def test_causal_conv_ref_matches_numpy(Lk):
    Bsz, Ch, H, L = 2, 2, 3, 8
    u = torch.randn(Bsz, H, L, dtype=torch.float64)
    K = torch.randn(Ch, H, Lk, dtype=torch.float64)
    D = torch.randn(Ch, H, dtype=torch.float64)
    y = causal_conv_ref(u, K, D)
    assert y.shape == (Bsz, Ch, H, L)
    for b in range(Bsz):
        for c in range(Ch):
            for h in range(H):
                x = u[b, h].numpy()
                expected = np.convolve(x, K[c, h].numpy())[:L] + D[c, h].item() * x
                np.testing.assert_allclose(y[b, c, h].numpy(), expected, rtol=1e-12, atol=1e-12)
    y2 = causal_conv_ref(u, K[0], D[0])
    torch.testing.assert_close(y2, y[:, 0], **tol(torch.float64))


def test_causal_conv_ref_anticausal_matches_numpy():
    Bsz, H, L = 2, 3, 9
    u = torch.randn(Bsz, H, L, dtype=torch.float64)
    K, K_rev = torch.randn(H, L, dtype=torch.float64), torch.randn(H, L, dtype=torch.float64)
    y = causal_conv_ref(u, K, K_rev=K_rev) - causal_conv_ref(u, K)
    for b in range(Bsz):
        for h in range(H):
            # reversing time turns the anti-causal part into a causal conv with K_rev delayed by one step
            ur = u[b, h].numpy()[::-1]
            kr = np.concatenate([[0.0], K_rev[h].numpy()])
            expected = np.convolve(ur, kr)[:L][::-1]
            np.testing.assert_allclose(y[b, h].numpy(), expected, rtol=1e-12, atol=1e-12)


def test_causal_conv_ref_validation():
    u = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="u"):
        causal_conv_ref(u[0], torch.randn(3, 5))
    with pytest.raises(ValueError, match="K"):
        causal_conv_ref(u, torch.randn(4, 5))
    with pytest.raises(ValueError, match="D"):
        causal_conv_ref(u, torch.randn(3, 5), torch.randn(4))
    with pytest.raises(ValueError, match="K_rev"):
        causal_conv_ref(u, torch.randn(3, 5), K_rev=torch.randn(3, 4))
