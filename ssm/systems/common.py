"""Helpers shared by the structured families (argument checks, dtypes, tiny linear solves)."""

from __future__ import annotations

import torch

from .._checks import check_choice, check_int, check_positive, check_shape, check_tensor
from ..ops.cauchy import BACKENDS

KERNEL_DISCS = ("zoh", "bilinear")


def complex_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Common complex dtype of ``tensors`` (complex64 for float32 inputs, complex128 for float64)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_complex:
        dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return dtype


def check_kernel_args(
    Lambda: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor, L: int, disc: str, backend: str
) -> tuple[int, int, int]:
    """Validate the arguments shared by ``dplr_kernel`` and ``diag_kernel``; return (H, N, L)."""
    check_choice("disc", disc, KERNEL_DISCS)
    check_choice("backend", backend, BACKENDS)
    L = check_int("L", L, minimum=1)
    check_tensor("Lambda", Lambda, ndim=2)
    H, N = Lambda.shape
    check_tensor("B", B)
    check_shape("B", B, (H, N), "(H, N) like Lambda")
    check_tensor("C", C, ndim=(2, 3))
    check_shape("C", C, (None,) * (C.ndim - 2) + (H, N), "(H, N) or (channels, H, N) like Lambda")
    check_tensor("dt", dt)
    check_shape("dt", dt, (H,), "(H,) like Lambda's first dimension")
    if dt.is_complex() or not dt.is_floating_point():
        raise ValueError(f"dt must be a real floating tensor; got dtype {dt.dtype}")
    check_positive("dt", dt)
    return H, N, L


def small_solve(K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """K^{-1} V for a batch of small R x R systems, K (..., R, R), V (..., R, X).

    Ranks 1 and 2 (the HiPPO cases) are solved in closed form: torch's batched LU solve on CPU is
    occasionally slower by orders of magnitude for many tiny matrices.
    """
    R = K.shape[-1]
    if R == 1:
        return V / K
    if R == 2:
        a, b, c, d = K[..., 0, 0, None], K[..., 0, 1, None], K[..., 1, 0, None], K[..., 1, 1, None]
        v0, v1 = V[..., 0, :], V[..., 1, :]
        det = a * d - b * c
        return torch.stack([(d * v0 - b * v1) / det, (a * v1 - c * v0) / det], dim=-2)
    return torch.linalg.solve(K, V)
