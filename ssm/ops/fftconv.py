"""Causal (and bidirectional) long convolution by real FFTs.

    y_t = sum_{s <= t} K[t - s] u_s + D u_t  [+ sum_{s > t} K_rev[s - t - 1] u_s],        t = 0, ..., L - 1

Both kernels are laid out on one circle of length n (causal taps at 0, 1, ..., anti-causal taps at
n - 1, n - 2, ...), so one rfft of the kernel, one of the input and one irfft give the whole output. The
circular convolution equals the linear one on the first L outputs when no lag that occurs, -(L-1)..(L-1),
lands on a tap of the other kernel, which holds for

    causal only:    n >= L + Lc - 1,
    bidirectional:  n >= max(L + Lc - 1, L + Lr),

with Lc = min(Lk, L) causal taps and Lr = min(Lk, L - 1) anti-causal taps used; n is then rounded up to a
2,3,5-smooth size (``next_fast_len``; for a symbolic L under ``torch.compile`` or ``torch.export`` it is
n + 1, i.e. 2L for a kernel of length L, as a smooth size has no symbolic form). The reference twin is
``ssm.reference.causal_conv_ref``.
"""

from __future__ import annotations

import torch

from .._checks import check_choice, check_int, check_tensor, traced, traced_size

__all__ = ["LAYOUTS", "circular_conv", "fftconv", "next_fast_len"]

LAYOUTS = ("BHL", "BLH")


def next_fast_len(n: int) -> int:
    """Smallest integer >= n whose only prime factors are 2, 3 and 5 (a fast FFT size)."""
    n = check_int("n", n, minimum=1)
    best = 1 << (n - 1).bit_length()  # the next power of two always qualifies
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:  # smallest p35 * 2^k >= n
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


#: The custom convolution works on groups of features whose (B, features, n//2+1) spectrum needs about this
#: many bytes: glibc serves blocks of 32 MiB and more by fresh mmap, whose pages fault in on every use (S4D
#: fwd+bwd at B = 8, H = 256, L = 4096 on a 2-core CPU: a third of the time went to those faults).
GROUP_BYTES = 8 * 2**20


class _CircularConv(torch.autograd.Function):
    """y = irfft(rfft(u, n) rfft(k), n)[..., :L] with a backward of real FFTs only, by groups of features.

    Autograd's own backward of ``rfft`` pads the one-sided gradient to the full spectrum and takes a
    complex FFT (twice the cost of a real one), once for u and once for k. The adjoints of a circular
    convolution are circular correlations, so with G = rfft(g, n) (g zero beyond L):

        grad u = irfft(G conj(K), n)[..., :L],    grad k = irfft(sum_b G conj(U), n),

    exact for any n (the forward truncation is the zero padding of g). u (B, H, L), k (H, n) or (C, H, n)
    with C output channels: y (B, H, L) or (B, C, H, L). Features run in groups of ``GROUP_BYTES`` of
    spectrum; with several groups the backward recomputes U (one rfft) instead of keeping it. The backward is
    itself differentiable (double backward, ``create_graph=True``).
    """

    @staticmethod
    def forward(ctx, u, k, n):
        Bsz, H, L = u.shape
        channels = k.ndim == 3
        Kf = torch.fft.rfft(k, n=n)  # (H, n//2+1) or (C, H, n//2+1)
        y = u.new_empty(Bsz, *k.shape[:-1], L)  # (B, H, L) or (B, C, H, L)
        g = _group(u, n, k.shape[0] if channels else 1)
        for h in range(0, H, g):
            U = torch.fft.rfft(u[:, h:h + g], n=n)  # (B, g, n//2+1)
            y[..., h:h + g, :] = torch.fft.irfft((U.unsqueeze(1) if channels else U) * Kf[..., h:h + g, :],
                                                 n=n)[..., :L]
        # one group: its spectrum is small, kept for the backward; else recomputed there, group by group
        ctx.save_for_backward(u, k, Kf, U if g >= H else None)
        ctx.shape = (n, channels, g)
        return y

    @staticmethod
    def backward(ctx, gy):
        u, k, Kf, U_kept = ctx.saved_tensors
        n, channels, g = ctx.shape  # g: the forward's group size
        H, L = u.shape[1:]
        if torch.is_grad_enabled():
            # create_graph (a double backward): the spectra are taken again from the inputs, so that the
            # graph of this backward (differentiable ops only) reaches u and k
            Kf, U_kept = torch.fft.rfft(k, n=n), None
        parts_u: list = []
        parts_k: list = []
        for h in range(0, H, g):
            G = torch.fft.rfft(gy[..., h:h + g, :], n=n)  # (B, g, n//2+1) or (B, C, g, n//2+1)
            if ctx.needs_input_grad[0]:
                Gu = G * Kf[..., h:h + g, :].conj()
                parts_u.append(torch.fft.irfft(Gu.sum(1) if channels else Gu, n=n)[..., :L])
            if ctx.needs_input_grad[1]:
                U = U_kept if U_kept is not None else torch.fft.rfft(u[:, h:h + g], n=n)
                U = U.unsqueeze(1) if channels else U
                parts_k.append(torch.fft.irfft((G * U.conj()).sum(0), n=n))
        gu = (parts_u[0] if len(parts_u) == 1 else torch.cat(parts_u, 1)) if parts_u else None
        gk = (parts_k[0] if len(parts_k) == 1 else torch.cat(parts_k, -2)) if parts_k else None
        return gu, gk, None


def _group(u: torch.Tensor, n: int, channels: int) -> int:
    """Features per group: (B, C, group, n//2+1) complex values in about ``GROUP_BYTES``, at least one."""
    per_feature = u.shape[0] * channels * (n // 2 + 1) * 2 * u.element_size()
    return max(1, min(u.shape[1], GROUP_BYTES // per_feature))


def circular_conv(u: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
    """irfft(rfft(u, n) * rfft(k, n), n)[..., :L] for u (B, H, L) and k (H, n) or (C, H, n), real: the
    product of ``fftconv``. Eagerly a custom autograd.Function whose backward takes real FFTs only
    (``_CircularConv``); while traced (torch.compile / export / torch.func) the same three FFTs as plain
    ops, which those transforms differentiate themselves."""
    check_tensor("u", u, ndim=3)
    check_tensor("k", k, ndim=(2, 3))
    if not (u.is_floating_point() and k.is_floating_point()) or u.dtype != k.dtype:
        raise ValueError(f"u and k must be real floating-point tensors of one dtype; got {u.dtype} and "
                         f"{k.dtype}")
    if k.shape[-2] != u.shape[1]:
        raise ValueError(f"k must have shape (H, n) or (C, H, n) with H = {u.shape[1]} from u; got "
                         f"{tuple(k.shape)}")
    if not traced_size(n):
        n = check_int("n", n, minimum=1)
        if u.shape[-1] > n or k.shape[-1] != n:
            raise ValueError(f"n must be >= u's length {u.shape[-1]} and equal k's length {k.shape[-1]}; "
                             f"got {n}")
    if traced() or not (torch.is_grad_enabled() and (u.requires_grad or k.requires_grad)):
        U = torch.fft.rfft(u, n=n)
        U = U.unsqueeze(1) if k.ndim == 3 else U
        return torch.fft.irfft(U * torch.fft.rfft(k, n=n), n=n)[..., : u.shape[-1]]
    return _CircularConv.apply(u, k, n)


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _out_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def fftconv(
    u: torch.Tensor,
    K: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    K_rev: torch.Tensor | None = None,
    layout: str = "BHL",
) -> torch.Tensor:
    """Causal FFT convolution of a batch of sequences with one kernel per feature, plus the D skip.

        y_t = sum_{s <= t} K[t - s] u_s + D u_t                         (causal)
            + sum_{s > t} K_rev[s - t - 1] u_s                          (when K_rev is given)

    Lag 0 is counted once, in K. Taps of K beyond L are ignored and missing taps are zero, so any kernel
    length works; any L works (the FFT size is a 2,3,5-smooth number). Computation is in float32 at least
    (bfloat16 / float16 inputs are upcast) and the result has the promoted dtype of the inputs.

    Args:
        u: (B, H, L) for ``layout="BHL"`` or (B, L, H) for ``layout="BLH"``; real.
        K: (H, Lk) or (C, H, Lk) kernel with C output channels; real.
        D: (H,) or, with channels, (H,) or (C, H) skip; or None.
        K_rev: anti-causal kernel with the shape of K, or None.
        layout: ``"BHL"`` or ``"BLH"``.

    Returns:
        y: same layout as u; with channels (B, C, H, L) for ``"BHL"`` and (B, L, C, H) for ``"BLH"``.
    """
    layout = check_choice("layout", layout, LAYOUTS)
    check_tensor("u", u, ndim=3)
    check_tensor("K", K, ndim=(2, 3))
    for name, t in (("u", u), ("K", K), ("D", D), ("K_rev", K_rev)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a real floating-point tensor; got dtype {t.dtype}")
    if layout == "BLH":
        u = u.transpose(1, 2)
    _, H, L = u.shape
    if L < 1:
        raise ValueError(f"u must have a sequence length L >= 1; got shape {tuple(u.shape)}")
    channels = K.ndim == 3
    if K.shape[-2] != H:
        raise ValueError(
            f"K must have shape (H, Lk) or (C, H, Lk) with H = {H} from u; got {tuple(K.shape)}"
        )
    Lk = K.shape[-1]
    if Lk < 1:
        raise ValueError(f"K must have at least one tap (Lk >= 1); got shape {tuple(K.shape)}")
    if K_rev is not None:
        check_tensor("K_rev", K_rev)
        if K_rev.shape != K.shape:
            raise ValueError(f"K_rev must have the shape of K {tuple(K.shape)}; got {tuple(K_rev.shape)}")
    if D is not None:
        check_tensor("D", D)
        allowed = [(H,)] + ([(K.shape[0], H)] if channels else [])
        if tuple(D.shape) not in allowed:
            want = " or ".join(str(s) for s in allowed)
            raise ValueError(f"D must have shape {want} to match K {tuple(K.shape)}; got {tuple(D.shape)}")

    out_dtype = _out_dtype(u, K, D, K_rev)
    dtype = _compute_dtype(u, K, D, K_rev)
    Lc = min(Lk, L)
    Lr = min(Lk, L - 1) if K_rev is not None else 0
    if traced_size(L):
        # A symbolic L (dynamic under torch.compile / torch.export) has no concrete smooth size: 2L for
        # Lk = L, written so that no comparison of symbolic sizes is left to guard on.
        n = L + Lc if K_rev is None else L + max(Lc - 1, Lr) + 1
    else:
        n = next_fast_len(max(L + Lc - 1, L + Lr))

    parts = [K[..., :Lc].to(dtype), K.new_zeros(*K.shape[:-1], n - Lc - Lr, dtype=dtype)]
    if Lr > 0:
        parts.append(K_rev[..., :Lr].flip(-1).to(dtype))  # lag -j at position n - j
    uc = u.to(dtype)
    y = circular_conv(uc, torch.cat(parts, dim=-1), n)  # (B, H, L) or (B, C, H, L)
    if D is not None:
        y = y + D.to(dtype).unsqueeze(-1) * (uc.unsqueeze(1) if channels else uc)
    y = y.to(out_dtype)
    if layout == "BLH":
        y = y.permute(0, 3, 1, 2) if channels else y.transpose(1, 2)
    return y
