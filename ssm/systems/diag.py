"""The diagonal family (S4D): A = diag(Lambda), one complex mode per conjugate pair or in full.

Pure functions of the structured parameters; ``ssm.layers.S4D`` owns the parameters and calls these.
"""

from __future__ import annotations

import torch

from ..discretize import phi1
from ..ops.vandermonde import vandermonde
from .common import check_kernel_args, complex_dtype


def diag_kernel(
    Lambda: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    dt: torch.Tensor,
    L: int,
    disc: str = "zoh",
    *,
    conj_pairs: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Convolution kernel of a diagonal SSM: the S4D kernel.

    With A_h = diag(Lambda_h) discretized elementwise (``ssm.discretize.discretize_diag``),

        K[h, k] = Re(sum_n C[h, n] Bb[h, n] Ab[h, n]^k),        k = 0, ..., L - 1,

    one Vandermonde product (``ssm.ops.vandermonde``) in log space: log Ab = dt Lambda for ``"zoh"`` (with
    Bb = dt phi1(dt Lambda) B, phi1(x) = (e^x - 1) / x) and log((1 + dt Lambda / 2) / (1 - dt Lambda / 2))
    for ``"bilinear"`` (Bb = dt B / (1 - dt Lambda / 2)). Cost O(H N L), memory per ``backend``.

    With ``conj_pairs=True`` the N states stand for 2N (conjugates appended); as the modes are decoupled
    the kernel is K = 2 Re(sum over the given half).

    Args:
        Lambda: (H, N) complex diagonal of A (real is promoted).
        B: (H, N).
        C: (H, N) or (Ch, H, N).
        dt: (H,) positive real.
        L: kernel length >= 1.
        disc: ``"zoh"`` or ``"bilinear"``.
        conj_pairs: the inputs hold one state per conjugate pair.
        backend: Vandermonde backend: ``"auto"``, ``"naive"``, ``"chunked"`` or ``"triton"``.

    Returns:
        K: (H, L) or (Ch, H, L), real (float32 for complex64 inputs, float64 for complex128).
        Differentiable in Lambda, B, C and dt.
    """
    H, N, L = check_kernel_args(Lambda, B, C, dt, L, disc, backend)
    if not isinstance(conj_pairs, bool):
        raise ValueError(f"conj_pairs must be a bool; got {conj_pairs!r}")
    cdtype = complex_dtype(Lambda, B, C, dt)
    Lambda, B, C = Lambda.to(cdtype), B.to(cdtype), C.to(cdtype)
    dtc = dt.to(cdtype).unsqueeze(-1)  # (H, 1)
    x = dtc * Lambda  # (H, N)
    if disc == "zoh":
        Bb, log_Ab = dtc * B * phi1(x), x
    else:
        den = 1 - x / 2
        Bb, log_Ab = dtc * B / den, torch.log((1 + x / 2) / den)
    K = vandermonde(C * Bb, log_Ab, L, log=True, backend=backend).real  # (..., H, L)
    return 2 * K if conj_pairs else K
