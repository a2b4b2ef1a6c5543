"""Discretization against scipy (expm, cont2discrete), singular A, batching, complex, dense == diagonal."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.signal
import torch
from conftest import tol

from ssm.discretize import DISC_METHODS, discretize, discretize_diag, phi1

F64 = tol(torch.float64)
C128 = tol(torch.complex128)


def _scipy_ref(A: np.ndarray, B: np.ndarray, dt: float, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Textbook formulas with scipy.linalg.expm / inv, for invertible (I - c A) and (for zoh) A."""
    N = A.shape[0]
    eye = np.eye(N)
    if method == "zoh":
        E = scipy.linalg.expm(dt * A)
        return E, np.linalg.solve(A, (E - eye) @ B)
    if method == "bilinear":
        inv = np.linalg.inv(eye - dt / 2 * A)
        return inv @ (eye + dt / 2 * A), inv @ (dt * B)
    if method == "euler":
        return eye + dt * A, dt * B
    inv = np.linalg.inv(eye - dt * A)
    return inv, inv @ (dt * B)


@pytest.mark.parametrize("method", DISC_METHODS)
@pytest.mark.parametrize("complex_", [False, True])
def test_dense_matches_scipy_batched_per_index_dt(method, complex_):
    H, N = 3, 5
    dtype = torch.complex128 if complex_ else torch.float64
    A = torch.randn(H, N, N, dtype=dtype) - 2 * torch.eye(N)
    B = torch.randn(H, N, dtype=dtype)
    dt = torch.tensor([0.01, 0.1, 0.7], dtype=torch.float64)
    Ab, Bb = discretize(A, B, dt, method)
    assert Ab.shape == (H, N, N) and Bb.shape == (H, N) and Ab.dtype == dtype
    for h in range(H):
        ref_A, ref_B = _scipy_ref(A[h].numpy(), B[h].numpy(), dt[h].item(), method)
        np.testing.assert_allclose(Ab[h].numpy(), ref_A, **tol(dtype))
        np.testing.assert_allclose(Bb[h].numpy(), ref_B, **tol(dtype))


@pytest.mark.parametrize(
    ("method", "scipy_method"),
    [("zoh", "zoh"), ("bilinear", "bilinear"), ("euler", "euler"), ("backward_euler", "backward_diff")],
)
def test_dense_matches_cont2discrete(method, scipy_method):
    N, dt = 4, 0.25
    A = torch.randn(N, N, dtype=torch.float64)
    B = torch.randn(N, dtype=torch.float64)
    Ab, Bb = discretize(A, B, dt, method)
    Ad, Bd, *_ = scipy.signal.cont2discrete(
        (A.numpy(), B.numpy()[:, None], np.eye(N), np.zeros((N, 1))), dt, method=scipy_method
    )
    np.testing.assert_allclose(Ab.numpy(), Ad, **F64)
    np.testing.assert_allclose(Bb.numpy(), Bd[:, 0], **F64)


def test_zoh_singular_A():
    N, dt = 3, 0.4
    B = torch.randn(N, dtype=torch.float64)
    Ab, Bb = discretize(torch.zeros(N, N, dtype=torch.float64), B, dt)
    torch.testing.assert_close(Ab, torch.eye(N, dtype=torch.float64), **F64)
    torch.testing.assert_close(Bb, dt * B, **F64)
    # nilpotent A (A^3 = 0): exp(dt A) = I + dt A + dt^2/2 A^2, Bb = (dt I + dt^2/2 A + dt^3/6 A^2) B
    A = torch.diag(torch.ones(N - 1, dtype=torch.float64), 1)
    eye = torch.eye(N, dtype=torch.float64)
    Ab, Bb = discretize(A, B, dt)
    torch.testing.assert_close(Ab, eye + dt * A + dt**2 / 2 * A @ A, **F64)
    torch.testing.assert_close(Bb, (dt * eye + dt**2 / 2 * A + dt**3 / 6 * A @ A) @ B, **F64)
    # one zero eigenvalue next to a nonzero one: Bb equals the integral int_0^dt exp(s A) ds B
    A = torch.tensor([[0.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    B2 = torch.tensor([0.3, -1.1], dtype=torch.float64)
    _, Bb = discretize(A, B2, dt)
    s, w = np.polynomial.legendre.leggauss(30)
    s = dt / 2 * (s + 1)
    integral = sum(wi * scipy.linalg.expm(si * A.numpy()) for si, wi in zip(s, w)) * dt / 2
    np.testing.assert_allclose(Bb.numpy(), integral @ B2.numpy(), **F64)


def test_diag_zoh_stable_near_zero():
    dt = 0.5
    Lambda = torch.tensor([0.0, 1e-14, -1e-9 + 1e-9j, 3e-3j, -1e-2 + 0j, -1.0 + 2.0j], dtype=torch.complex128)
    B = torch.ones_like(Lambda)
    _, Bb = discretize_diag(Lambda, B, dt)
    z = (dt * Lambda).numpy()
    # (e^z - 1)/z from its Taylor series to high order (all |z| here are small or exactly handled)
    series = sum(z**j / float(np.prod(np.arange(1, j + 2))) for j in range(25))
    np.testing.assert_allclose(Bb.numpy(), dt * series, rtol=1e-14, atol=0)
    zr = torch.tensor([0.0, 1e-300, -1e-8, 2e-3, -0.3, 5.0], dtype=torch.float64)
    ref = np.array([1.0, 1.0] + [np.expm1(v) / v for v in zr.numpy()[2:]])
    np.testing.assert_allclose(phi1(zr).numpy(), ref, rtol=1e-15, atol=0)


@pytest.mark.parametrize("method", DISC_METHODS)
def test_diag_equals_dense(method, device):
    H, N = 2, 4
    Lambda = torch.complex(-torch.rand(H, N, dtype=torch.float64), torch.randn(H, N, dtype=torch.float64))
    Lambda[0, 0] = 0.0
    B = torch.randn(H, N, dtype=torch.complex128)
    dt = torch.tensor([0.05, 0.3], dtype=torch.float64)
    Lambda, B, dt = Lambda.to(device), B.to(device), dt.to(device)
    Ab, Bb = discretize_diag(Lambda, B, dt, method)
    Ab_dense, Bb_dense = discretize(torch.diag_embed(Lambda), B, dt, method)
    assert Ab.shape == (H, N) and Ab.device == Lambda.device
    torch.testing.assert_close(torch.diag_embed(Ab), Ab_dense, **C128)
    torch.testing.assert_close(Bb, Bb_dense, **C128)


def test_broadcasting_and_dtypes():
    N = 3
    A = torch.randn(N, N, dtype=torch.float64)
    B = torch.randn(N, dtype=torch.float64)
    dt = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    Ab, Bb = discretize(A, B, dt)  # one shared A, one step per feature
    assert Ab.shape == (4, N, N) and Bb.shape == (4, N)
    for h in range(4):
        torch.testing.assert_close(Ab[h], torch.linalg.matrix_exp(dt[h] * A), **F64)
    Ab, Bb = discretize_diag(torch.randn(4, N), torch.randn(N), 0.1)
    assert Ab.shape == Bb.shape == (4, N) and Ab.dtype == torch.float32
    Ab, Bb = discretize_diag(torch.randn(N, dtype=torch.complex64), torch.randn(N), torch.tensor(0.1))
    assert Ab.dtype == Bb.dtype == torch.complex64


@pytest.mark.parametrize("method", DISC_METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_gradcheck_dense(method, dtype):
    N = 3
    A = (torch.randn(2, N, N, dtype=dtype) - torch.eye(N)).requires_grad_()
    B = torch.randn(2, N, dtype=dtype, requires_grad=True)
    dt = torch.tensor([0.2, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, d: discretize(a, b, d, method), (A, B, dt))


@pytest.mark.parametrize("method", DISC_METHODS)
def test_gradcheck_diag(method):
    N = 4
    Lambda = torch.complex(-torch.rand(2, N, dtype=torch.float64), torch.randn(2, N, dtype=torch.float64))
    Lambda[0, 0] = 1e-5  # exercises the series branch of phi1
    Lambda.requires_grad_()
    B = torch.randn(2, N, dtype=torch.complex128, requires_grad=True)
    dt = torch.tensor([0.2, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, d: discretize_diag(a, b, d, method), (Lambda, B, dt))
    real = (-torch.rand(2, N, dtype=torch.float64)).requires_grad_()
    Br = torch.randn(2, N, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, d: discretize_diag(a, b, d, method), (real, Br, dt))


def test_gradient_at_lambda_zero_is_finite_and_right():
    dt = 0.3
    Lambda = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    _, Bb = discretize_diag(Lambda, torch.ones(2, dtype=torch.float64), dt)
    (g,) = torch.autograd.grad(Bb.sum(), Lambda)
    # d/dLambda [dt phi1(dt Lambda)] at 0 = dt^2 phi1'(0) = dt^2 / 2
    torch.testing.assert_close(g, torch.full((2,), dt**2 / 2, dtype=torch.float64), **F64)


def test_validation():
    A, B = torch.randn(3, 3), torch.randn(3)
    with pytest.raises(ValueError, match="method"):
        discretize(A, B, 0.1, "rk4")
    with pytest.raises(ValueError, match="method"):
        discretize_diag(B, B, 0.1, "forward")
    with pytest.raises(ValueError, match="A"):
        discretize(torch.randn(3, 4), B, 0.1)
    with pytest.raises(ValueError, match="A"):
        discretize(torch.randn(3), B, 0.1)
    with pytest.raises(ValueError, match="A"):
        discretize(torch.ones(3, 3, dtype=torch.int64), B, 0.1)
    with pytest.raises(ValueError, match="B"):
        discretize(A, torch.randn(4), 0.1)
    with pytest.raises(ValueError, match="B"):
        discretize(torch.randn(2, 3, 3), torch.randn(5, 3), 0.1)
    with pytest.raises(ValueError, match="dt"):
        discretize(A, B, 0.0)
    with pytest.raises(ValueError, match="dt"):
        discretize(A, B, torch.tensor([0.1, -0.2]))
    with pytest.raises(ValueError, match="dt"):
        discretize(torch.randn(4, 3, 3), B, torch.full((5,), 0.1))
    with pytest.raises(ValueError, match="dt"):
        discretize(A, B, torch.tensor(0.1 + 0j))
    with pytest.raises(ValueError, match="dt"):
        discretize(A, B, "0.1")
    with pytest.raises(ValueError, match="Lambda"):
        discretize_diag(torch.tensor(1.0), B, 0.1)
    with pytest.raises(ValueError, match="B"):
        discretize_diag(B, torch.randn(4), 0.1)
    with pytest.raises(ValueError, match="B"):
        discretize_diag(torch.randn(2, 3), torch.randn(5, 3), 0.1)
    with pytest.raises(ValueError, match="dt"):
        discretize_diag(torch.randn(4, 3), torch.randn(4, 3), torch.full((5,), 0.1))
