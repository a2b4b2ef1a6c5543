"""Slow, obviously-correct float64 / complex128 versions of the library's numerics, for tests.

Everything here uses dense matrices and explicit Python loops so that it can be checked by eye. The fast
paths (structured kernels, FFT convolution) are tested against these functions.

Convention (whole library): the discrete SSM is

    x_k = Ab x_{k-1} + Bb u_k,        y_k = C x_k + D u_k,        x_{-1} = x0 (zeros by default),

so that with x0 = 0 the output is the causal convolution y = K * u + D u with the kernel

    K_k = C Ab^k Bb,        k = 0, ..., L - 1.
"""

from __future__ import annotations

import torch

from ._checks import check_int, check_shape, check_tensor

__all__ = ["causal_conv_ref", "conj_expand", "dense_kernel", "dplr_to_dense", "scan"]


def _wide_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """complex128 if any of ``tensors`` is complex, else float64."""
    return torch.complex128 if any(t is not None and t.is_complex() for t in tensors) else torch.float64


def dplr_to_dense(Lambda: torch.Tensor, P: torch.Tensor, Q: torch.Tensor | None = None) -> torch.Tensor:
    """Assemble the dense matrix of a diagonal-plus-low-rank (DPLR) state matrix.

        A = diag(Lambda) - sum_r P_r Q_r^*        (Q = P when not given)

    where ``P_r Q_r^*`` is the outer product ``P_r[:, None] * conj(Q_r)[None, :]``.

    Args:
        Lambda: (..., N) diagonal.
        P: (R, ..., N) low-rank factors; the leading R is the rank, ``...`` broadcasts against Lambda's.
        Q: (R, ..., N) or None (then Q = P).

    Returns:
        A: (..., N, N) in complex128 (float64 if all inputs are real).
    """
    check_tensor("Lambda", Lambda)
    check_tensor("P", P)
    if Lambda.ndim < 1:
        raise ValueError(f"Lambda must have at least 1 dimension (..., N); got shape {tuple(Lambda.shape)}")
    if P.ndim != Lambda.ndim + 1 or P.shape[-1] != Lambda.shape[-1]:
        raise ValueError(
            f"P must have shape (R, ..., N) with N = {Lambda.shape[-1]} and one more dimension than Lambda "
            f"{tuple(Lambda.shape)}; got {tuple(P.shape)}"
        )
    if Q is None:
        Q = P
    check_tensor("Q", Q)
    if Q.shape != P.shape:
        raise ValueError(f"Q must have the same shape as P {tuple(P.shape)}; got {tuple(Q.shape)}")
    dtype = _wide_dtype(Lambda, P, Q)
    A = torch.diag_embed(Lambda.to(dtype))
    for r in range(P.shape[0]):
        p = P[r].to(dtype)
        q = Q[r].to(dtype).conj()
        A = A - p.unsqueeze(-1) * q.unsqueeze(-2)
    return A


def conj_expand(
    Lambda: torch.Tensor,
    P: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
    C: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Expand conjugate-pair half storage (N/2 states) to the full N-state system.

    A real system whose eigenvalues come in conjugate pairs is often stored with one state per pair; the
    full system is recovered by appending the complex conjugate of every item along the last dimension:

        Lambda_full = [Lambda, conj(Lambda)],  P_full = [P, conj(P)],  B_full = [B, conj(B)], ...

    With the full system the kernel K_k = C Ab^k Bb is real, and equals 2 Re of the half-storage sum.

    Args:
        Lambda: (..., N/2).
        P, B, C: (..., N/2) or None (returned as None).

    Returns:
        (Lambda, P, B, C), each (..., N) or None.
    """
    out = []
    for name, t in (("Lambda", Lambda), ("P", P), ("B", B), ("C", C)):
        if t is None:
            out.append(None)
            continue
        check_tensor(name, t)
        if t.ndim < 1:
            raise ValueError(f"{name} must have at least 1 dimension (..., N/2); got a scalar")
        out.append(torch.cat([t, t.conj()], dim=-1))
    return tuple(out)


def dense_kernel(Ab: torch.Tensor, Bb: torch.Tensor, C: torch.Tensor, L: int) -> torch.Tensor:
    """Convolution kernel of a discrete SSM with a dense state matrix, by explicit powers.

        K[..., k] = C Ab^k Bb = sum_n C_n (Ab^k Bb)_n,        k = 0, ..., L - 1

    (no conjugation of C), computed by the loop x <- Ab x starting from x = Bb.

    Args:
        Ab: (..., N, N) discrete state matrix.
        Bb: (..., N) discrete input vector.
        C: (..., N) or (Ch, ..., N) output vector(s); leading dims broadcast.
        L: kernel length >= 1.

    Returns:
        K: (..., L) or (Ch, ..., L), complex128 if any input is complex (callers take ``.real``), else
        float64.
    """
    check_tensor("Ab", Ab)
    check_tensor("Bb", Bb)
    check_tensor("C", C)
    L = check_int("L", L, minimum=1)
    if Ab.ndim < 2 or Ab.shape[-1] != Ab.shape[-2]:
        raise ValueError(f"Ab must have shape (..., N, N); got {tuple(Ab.shape)}")
    N = Ab.shape[-1]
    if Bb.ndim < 1 or Bb.shape[-1] != N:
        raise ValueError(f"Bb must have shape (..., {N}); got {tuple(Bb.shape)}")
    if C.ndim < 1 or C.shape[-1] != N:
        raise ValueError(f"C must have shape (..., {N}) or (Ch, ..., {N}); got {tuple(C.shape)}")
    dtype = _wide_dtype(Ab, Bb, C)
    Ab, Bb, C = Ab.to(dtype), Bb.to(dtype), C.to(dtype)
    x = Bb
    taps = []
    for _ in range(L):
        taps.append((C * x).sum(-1))
        x = (Ab @ x.unsqueeze(-1)).squeeze(-1)
    return torch.stack(taps, dim=-1)


def scan(
    Ab: torch.Tensor,
    Bb: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    u: torch.Tensor,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence of a discrete SSM, one time step at a time, per channel h:

        x_k = Ab x_{k-1} + Bb u_k,        y_k = Re(C x_k) + D u_k,        x_{-1} = x0.

    Args:
        Ab: (H, N, N).
        Bb: (H, N).
        C: (H, N).
        D: (H,).
        u: (B, H, L) input.
        x0: (B, H, N) initial state, or None for zeros.

    Returns:
        y: (B, H, L) float64 (the real part when the system is complex).
        x_last: (B, H, N) state after the last step, complex128 if the system is complex else float64.
    """
    check_tensor("u", u, ndim=3)
    Bsz, H, L = u.shape
    check_tensor("Ab", Ab, ndim=3)
    N = Ab.shape[-1]
    check_shape("Ab", Ab, (H, N, N), "(H, N, N)")
    check_shape("Bb", check_tensor("Bb", Bb), (H, N), "(H, N)")
    check_shape("C", check_tensor("C", C), (H, N), "(H, N)")
    check_shape("D", check_tensor("D", D), (H,), "(H,)")
    dtype = _wide_dtype(Ab, Bb, C, D, u, x0)
    Ab, Bb, C, D, u = (t.to(dtype) for t in (Ab, Bb, C, D, u))
    if x0 is None:
        x = torch.zeros(Bsz, H, N, dtype=dtype, device=u.device)
    else:
        x = check_shape("x0", check_tensor("x0", x0), (Bsz, H, N), "(B, H, N)").to(dtype)
    ys = []
    for k in range(L):
        uk = u[:, :, k]  # (B, H)
        x = torch.einsum("hnm,bhm->bhn", Ab, x) + Bb * uk.unsqueeze(-1)
        yk = (C * x).sum(-1) + D * uk
        ys.append(yk.real if yk.is_complex() else yk)
    y = torch.stack(ys, dim=-1) if ys else torch.zeros(Bsz, H, 0, dtype=torch.float64, device=u.device)
    return y, x


def causal_conv_ref(
    u: torch.Tensor,
    K: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    K_rev: torch.Tensor | None = None,
) -> torch.Tensor:
    """Direct O(L^2) convolution (the reference for ``ssm.ops.fftconv``):

        y_t = sum_{s <= t} K[t - s] u_s + D u_t  [+ sum_{s > t} K_rev[s - t - 1] u_s]

    built as an explicit Toeplitz matrix T[t, s]. Taps of K beyond L are ignored; missing taps are zero.

    Args:
        u: (B, H, L).
        K: (H, Lk) or (C, H, Lk) kernel.
        D: (H,) or (C, H) skip, or None.
        K_rev: same shape as K, optional anti-causal kernel (lag -1 is K_rev[..., 0]).

    Returns:
        y: (B, H, L), or (B, C, H, L) when K has a channel dim; float64 (complex128 if any input is complex).
    """
    check_tensor("u", u, ndim=3)
    check_tensor("K", K, ndim=(2, 3))
    _, H, L = u.shape
    if K.shape[-2] != H:
        raise ValueError(f"K must have H = {H} rows (K.shape[-2]); got shape {tuple(K.shape)}")
    if K_rev is not None and check_tensor("K_rev", K_rev).shape != K.shape:
        raise ValueError(f"K_rev must have the shape of K {tuple(K.shape)}; got {tuple(K_rev.shape)}")
    dtype = _wide_dtype(u, K, D, K_rev)
    u = u.to(dtype)
    t = torch.arange(L, device=u.device)
    lag = t[:, None] - t[None, :]  # (L, L): T[t, s] uses lag t - s

    def toeplitz(kern: torch.Tensor, lags: torch.Tensor) -> torch.Tensor:
        kern = kern.to(dtype)
        valid = (lags >= 0) & (lags < kern.shape[-1])
        taps = kern[..., lags.clamp(0, kern.shape[-1] - 1)]  # (..., L, L)
        return taps * valid

    T = toeplitz(K, lag)
    if K_rev is not None:
        T = T + toeplitz(K_rev, -lag - 1)
    if K.ndim == 2:
        y = torch.einsum("hts,bhs->bht", T, u)
    else:
        y = torch.einsum("chts,bhs->bcht", T, u)
    if D is not None:
        check_tensor("D", D)
        if D.shape not in ((H,), (K.shape[0], H) if K.ndim == 3 else (H,)):
            raise ValueError(
                f"D must have shape (H,) or (C, H) matching K {tuple(K.shape)}; got {tuple(D.shape)}"
            )
        D = D.to(dtype)
        y = y + (D.unsqueeze(-1) * u if K.ndim == 2 else D.unsqueeze(-1) * u.unsqueeze(1))
    return y
