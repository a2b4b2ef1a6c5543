"""Helpers shared by the structured families (argument checks, dtypes, tiny linear solves)."""

from __future__ import annotations

import torch

from .._checks import check_choice, check_int, check_positive, check_shape, check_tensor
from ..ops.cauchy import BACKENDS

KERNEL_DISCS = ("zoh", "bilinear")

# Squarings of ``power_rows``: a symbolic exponent (from a dynamic length under torch.compile / torch.export)
# has no concrete bit length, so every exponent below 2^SYMBOLIC_POWER_BITS is served by one traced graph.
SYMBOLIC_POWER_BITS = 31


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


def power_rows(
    W: torch.Tensor, G: torch.Tensor, e: torch.Tensor, bits: int = SYMBOLIC_POWER_BITS
) -> torch.Tensor:
    """W[h, r] G[h]^e[r] by binary powering with a fixed number of squarings, no branch on the values of e.

    The form for a symbolic length (``torch.SymInt`` under ``torch.compile`` / ``torch.export``), where the
    loop of ordinary binary powering would specialize the graph to one length: ``bits`` squarings of G
    whatever e, each bit of e selecting (``torch.where``, so a power that over- or underflows in an unused
    square does no harm) whether the rows take the factor. W (..., R, N), G (..., N, N) broadcasting
    against it, e (R,) integers in [0, 2^bits) -> (..., R, N).
    """
    for j in range(bits):
        take = ((e >> j) & 1).bool().unsqueeze(-1)  # (R, 1)
        # einsum, not @: matmul's reshapes of a symbolic row count would guard on divisibilities.
        W = torch.where(take, torch.einsum("...rn,...nm->...rm", W, G), W)
        if j + 1 < bits:
            G = G @ G
    return W
