"""Discretization of continuous linear state-space systems.

The continuous system x'(t) = A x(t) + B u(t) with step dt becomes the discrete recurrence used throughout
the library,

    x_k = Ab x_{k-1} + Bb u_k,        y_k = C x_k + D u_k,

with (Ab, Bb) given by one of the methods below (I is the identity; for the diagonal form every operation
is elementwise with A = diag(Lambda)):

    "zoh"             Ab = exp(dt A),                        Bb = A^{-1} (exp(dt A) - I) B
                                                                = dt phi1(dt A) B,  phi1(z) = (e^z - 1) / z
    "bilinear"        Ab = (I - dt/2 A)^{-1} (I + dt/2 A),   Bb = (I - dt/2 A)^{-1} dt B
    "euler"           Ab = I + dt A,                         Bb = dt B                   (forward Euler)
    "backward_euler"  Ab = (I - dt A)^{-1},                  Bb = (I - dt A)^{-1} dt B

ZOH is exact for an input held constant over each step and is computed so that it stays right for a
singular A (phi1(0) = 1, Bb -> dt B): the dense form reads both blocks off one augmented exponential

    expm(dt [[A, B], [0, 0]]) = [[exp(dt A), dt phi1(dt A) B], [0, 1]],

and the diagonal form evaluates phi1 with an accurate expm1 and a Taylor series near z = 0.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_choice, check_positive, check_tensor

__all__ = ["DISC_METHODS", "discretize", "discretize_diag", "phi1"]

DISC_METHODS = ("zoh", "bilinear", "euler", "backward_euler")

# |z| below which phi1 uses its Taylor series (terms j = 0..7); truncation error < |z|^8 / 9! ~ 3e-22.
_PHI1_SERIES_RADIUS = 1e-2
_PHI1_SERIES_TERMS = 7


def _expm1(z: torch.Tensor) -> torch.Tensor:
    """e^z - 1 without cancellation for small |z|, real or complex.

    For z = x + iy: e^z - 1 = (expm1(x) cos y - 2 sin^2(y/2)) + i e^x sin y.
    """
    if not z.is_complex():
        return torch.expm1(z)
    x, y = z.real, z.imag
    re = torch.expm1(x) * torch.cos(y) - 2 * torch.sin(y / 2) ** 2
    im = torch.exp(x) * torch.sin(y)
    return torch.complex(re, im)


def phi1(z: torch.Tensor) -> torch.Tensor:
    """phi1(z) = (e^z - 1) / z elementwise, with phi1(0) = 1; real or complex, differentiable everywhere.

    Uses ``expm1(z) / z`` away from 0 and the series sum_{j >= 0} z^j / (j + 1)! for |z| < 1e-2.
    """
    small = z.abs() < _PHI1_SERIES_RADIUS
    z_big = torch.where(small, torch.ones_like(z), z)
    z_small = torch.where(small, z, torch.zeros_like(z))
    series = torch.zeros_like(z)
    for j in range(_PHI1_SERIES_TERMS, -1, -1):  # Horner: 1/1! + z (1/2! + z (1/3! + ...))
        series = series * z_small + 1.0 / math.factorial(j + 1)
    return torch.where(small, series, _expm1(z_big) / z_big)


def _check_method(method: str) -> str:
    return check_choice("method", method, DISC_METHODS)


def _check_dt(
    dt: torch.Tensor | float, batch: tuple[int, ...]
) -> tuple[torch.Tensor | float, tuple[int, ...]]:
    """Validate dt (positive, real, broadcastable against ``batch``); return it and the broadcast batch."""
    check_positive("dt", dt)
    if not isinstance(dt, torch.Tensor):
        return float(dt), batch
    if dt.is_complex() or not dt.is_floating_point():
        raise ValueError(f"dt must be a real floating-point tensor; got dtype {dt.dtype}")
    try:
        batch = torch.broadcast_shapes(batch, dt.shape)
    except RuntimeError:
        raise ValueError(
            f"dt must be a scalar or have a shape broadcastable to the leading dims {batch}; "
            f"got {tuple(dt.shape)}"
        ) from None
    return dt, batch


def _check_float(name: str, t: torch.Tensor) -> None:
    if not (t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name} must be a floating-point or complex tensor; got dtype {t.dtype}")


def _result_dtype(*items: torch.Tensor | float) -> torch.dtype:
    dtype = items[0].dtype  # type: ignore[union-attr]
    for t in items[1:]:
        if isinstance(t, torch.Tensor):
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def discretize(
    A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor | float, method: str = "zoh"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Discretize a dense continuous system x' = A x + B u with step dt (equations in the module docstring).

    Args:
        A: (..., N, N) state matrix, real or complex.
        B: (..., N) input vector.
        dt: positive step: a number, or a real tensor broadcastable against the leading dims ``...``
            (e.g. (H,) for one step per feature with A (H, N, N), or with a shared A (N, N)).
        method: one of ``DISC_METHODS``.

    Returns:
        Ab: (*batch, N, N) and Bb: (*batch, N), where ``batch`` broadcasts A's, B's and dt's leading dims;
        dtype is the promotion of the inputs' dtypes. Differentiable in A, B and dt.
    """
    method = _check_method(method)
    check_tensor("A", A)
    check_tensor("B", B)
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be square with shape (..., N, N); got {tuple(A.shape)}")
    N = A.shape[-1]
    if B.ndim < 1 or B.shape[-1] != N:
        raise ValueError(f"B must have shape (..., N) with N = {N} to match A; got {tuple(B.shape)}")
    _check_float("A", A)
    _check_float("B", B)
    try:
        batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"B's leading dims {tuple(B.shape[:-1])} must broadcast with A's {tuple(A.shape[:-2])}"
        ) from None
    dt, batch = _check_dt(dt, batch)
    dtype = _result_dtype(A, B, dt)
    A = A.to(dtype).expand(*batch, N, N)
    B = B.to(dtype).expand(*batch, N)
    dt = torch.as_tensor(dt, dtype=dtype, device=A.device).expand(batch)[..., None]  # (*batch, 1)
    eye = torch.eye(N, dtype=dtype, device=A.device)

    if method == "zoh":
        # expm(dt [[A, B], [0, 0]]) = [[exp(dt A), A^{-1}(exp(dt A) - I) B], [0, 1]]; valid for singular A.
        top = torch.cat([A, B.unsqueeze(-1)], dim=-1) * dt.unsqueeze(-1)  # (*batch, N, N+1)
        M = torch.cat([top, torch.zeros_like(top[..., :1, :])], dim=-2)  # (*batch, N+1, N+1)
        E = torch.linalg.matrix_exp(M)
        return E[..., :N, :N], E[..., :N, N]
    dtA = A * dt.unsqueeze(-1)
    dtB = B * dt
    if method == "euler":
        return eye + dtA, dtB
    if method == "bilinear":
        lhs = eye - dtA / 2
        Ab = torch.linalg.solve(lhs, eye + dtA / 2)
        Bb = torch.linalg.solve(lhs, dtB.unsqueeze(-1)).squeeze(-1)
        return Ab, Bb
    lhs = eye - dtA  # backward_euler
    Ab = torch.linalg.solve(lhs, eye.expand_as(lhs))
    Bb = torch.linalg.solve(lhs, dtB.unsqueeze(-1)).squeeze(-1)
    return Ab, Bb


def discretize_diag(
    Lambda: torch.Tensor, B: torch.Tensor, dt: torch.Tensor | float, method: str = "zoh"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Discretize a diagonal continuous system x' = diag(Lambda) x + B u with step dt, elementwise:

        "zoh"             Ab = exp(dt Lambda),                          Bb = dt phi1(dt Lambda) B
        "bilinear"        Ab = (1 + dt/2 Lambda) / (1 - dt/2 Lambda),   Bb = dt B / (1 - dt/2 Lambda)
        "euler"           Ab = 1 + dt Lambda,                           Bb = dt B
        "backward_euler"  Ab = 1 / (1 - dt Lambda),                     Bb = dt B / (1 - dt Lambda)

    with phi1(z) = (e^z - 1) / z evaluated stably at z -> 0 (so Lambda = 0 gives Bb = dt B).

    Args:
        Lambda: (..., N) diagonal of A, real or complex.
        B: (..., N).
        dt: positive step: a number, or a real tensor broadcastable against the leading dims ``...``
            (one step per leading index, e.g. (H,) with Lambda (H, N)).
        method: one of ``DISC_METHODS``.

    Returns:
        Ab: (*batch, N) diagonal of the discrete state matrix and Bb: (*batch, N).
    """
    method = _check_method(method)
    check_tensor("Lambda", Lambda)
    check_tensor("B", B)
    if Lambda.ndim < 1:
        raise ValueError(f"Lambda must have shape (..., N); got a scalar {tuple(Lambda.shape)}")
    N = Lambda.shape[-1]
    if B.ndim < 1 or B.shape[-1] != N:
        raise ValueError(f"B must have shape (..., N) with N = {N} to match Lambda; got {tuple(B.shape)}")
    _check_float("Lambda", Lambda)
    _check_float("B", B)
    try:
        batch = torch.broadcast_shapes(Lambda.shape[:-1], B.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"B's leading dims {tuple(B.shape[:-1])} must broadcast with Lambda's {tuple(Lambda.shape[:-1])}"
        ) from None
    dt, batch = _check_dt(dt, batch)
    dtype = _result_dtype(Lambda, B, dt)
    Lambda = Lambda.to(dtype).expand(*batch, N)
    B = B.to(dtype).expand(*batch, N)
    dt = torch.as_tensor(dt, dtype=dtype, device=Lambda.device).expand(batch)[..., None]  # (*batch, 1)
    z = dt * Lambda
    dtB = dt * B
    if method == "zoh":
        return torch.exp(z), dtB * phi1(z)
    if method == "euler":
        return 1 + z, dtB
    if method == "bilinear":
        den = 1 - z / 2
        return (1 + z / 2) / den, dtB / den
    den = 1 - z  # backward_euler
    return 1 / den, dtB / den
