"""Truncated power series by real FFTs: the first L coefficients of 1 / d and of p q / d.

A series is a real tensor (..., L) of its coefficients, a(z) = sum_{k<L} a_k z^k, and every result is taken
mod z^L (the first L coefficients of the exact product or quotient, whatever follows them).

- ``series_inverse(d)``: g = 1 / d (d_0 != 0) by Newton's iteration g <- g (2 - d g), which doubles the
  number of correct coefficients per step. At step m -> 2m only coefficients m..2m-1 of d g are new, and
  they need no more than a circular product of size 2m (the "middle product"): O(L log L) in all.
- ``series_fraction(p, q, d)``: p q / d = p (q g), two products by FFTs of size n >= 2L - 1.

Both are autograd Functions whose backward is FFTs too. With y = p h, h = q g, g = 1 / d and r the incoming
gradient, corr(r, a)_i = sum_{k>=i} r_k a_(k-i) being the adjoint of multiplying by a mod z^L:

    grad p = corr(r, h),  grad h = corr(r, p),  grad q = corr(grad h, g),
    grad d = -corr(grad h, q g^2) = -corr(corr(grad h, h), g)          (dg = -g^2 dd).

Under ``create_graph=True`` the backward is rebuilt from differentiable FFT ops (higher derivatives are
exact); under ``torch.compile`` / ``torch.export`` / ``torch.func`` the same formulas run as plain ops.
The reference twins ``series_inverse_ref`` and ``series_fraction_ref`` use forward substitution and direct
sums in float64.
"""

from __future__ import annotations

import torch

from .._checks import check_tensor, traced, twin_backward
from .fftconv import next_fast_len

__all__ = ["series_fraction", "series_fraction_ref", "series_inverse", "series_inverse_ref"]


def _check_series(name: str, t: torch.Tensor) -> None:
    check_tensor(name, t)
    if t.ndim < 1 or not t.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor of coefficients (..., L); got dtype "
                         f"{t.dtype}")
    if t.shape[-1] < 1:
        raise ValueError(f"{name} must have at least one coefficient; got shape {tuple(t.shape)}")


def _check_leading(d: torch.Tensor) -> None:
    if not traced() and bool((d[..., 0] == 0).any()):
        raise ValueError("d must have a nonzero constant coefficient d[..., 0] (1 / d is not a power series "
                         "otherwise)")


def _newton(d: torch.Tensor) -> torch.Tensor:
    """1 / d mod z^L by Newton's iteration; plain ops (differentiable when grad mode is on)."""
    L = d.shape[-1]
    g = 1 / d[..., :1]
    m = 1
    while m < L:
        m2 = min(2 * m, L)
        n = next_fast_len(m2)
        Gf = torch.fft.rfft(g, n)
        e = torch.fft.irfft(torch.fft.rfft(d[..., :m2], n) * Gf, n)[..., m:m2]  # (d g - 1)[m:m2]
        g = torch.cat([g, -torch.fft.irfft(torch.fft.rfft(e, n) * Gf, n)[..., : m2 - m]], dim=-1)
        m = m2
    return g


def _fraction_plain(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """p q / d mod z^L by plain (differentiable) ops: the traced route and the double-backward twin."""
    L = d.shape[-1]
    n = next_fast_len(2 * L - 1)
    h = torch.fft.irfft(torch.fft.rfft(q, n) * torch.fft.rfft(_newton(d), n), n)[..., :L]
    return torch.fft.irfft(torch.fft.rfft(p, n) * torch.fft.rfft(h, n), n)[..., :L]


class _SeriesInverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d):
        g = _newton(d)
        ctx.save_for_backward(d, g)
        return g

    @staticmethod
    def backward(ctx, gy):
        if torch.is_grad_enabled():
            return twin_backward(_newton, ctx.saved_tensors[:1], ctx.needs_input_grad, (gy,))
        g = ctx.saved_tensors[1]
        L = g.shape[-1]
        n = next_fast_len(3 * L - 2)  # both correlations at once: no lag of g^2 wraps onto the result
        Gc = torch.fft.rfft(g, n).conj()
        return (-torch.fft.irfft(torch.fft.rfft(gy, n) * Gc * Gc, n)[..., :L],)


#: Features per step of ``series_fraction``: its chain of FFTs runs on groups whose spectra take about this
#: many bytes each (measured at H = 256, L = 4096: 1 MiB groups cost 30% more in per-op overhead, 16 MiB and
#: more run slower and less steadily, as their temporaries churn the allocator).
FRACTION_GROUP_BYTES = 4 * 2**20


class _SeriesFraction(torch.autograd.Function):
    """p (C, M, L), q and d (M, L) -> p q / d (C, M, L), by groups of the M features. For the backward it
    keeps g = 1 / d and h = q g as series (a quarter of the bytes of their spectra, retaken there: at long L
    the spectra would outweigh the rest of the layer's memory)."""

    @staticmethod
    def forward(ctx, p, q, d):
        C, M, L = p.shape
        n = next_fast_len(2 * L - 1)
        size = max(1, FRACTION_GROUP_BYTES // ((n // 2 + 1) * 2 * p.element_size() * C))
        y = p.new_empty(p.shape)
        keep = any(ctx.needs_input_grad)
        g, h = (p.new_empty(M, L) if keep else None for _ in range(2))
        for m in range(0, M, size):
            gm = _newton(d[m:m + size])
            G = torch.fft.rfft(gm, n)
            hm = torch.fft.irfft(torch.fft.rfft(q[m:m + size], n) * G, n)[..., :L]
            Hf = torch.fft.rfft(hm, n)
            y[:, m:m + size] = torch.fft.irfft(torch.fft.rfft(p[:, m:m + size], n) * Hf, n)[..., :L]
            if keep:
                g[m:m + size], h[m:m + size] = gm, hm
        ctx.save_for_backward(p, q, d, g, h)
        ctx.size = size
        return y

    @staticmethod
    def backward(ctx, r):
        if torch.is_grad_enabled():
            return twin_backward(_fraction_plain, ctx.saved_tensors[:3], ctx.needs_input_grad, (r,))
        p, g, h = (ctx.saved_tensors[i] for i in (0, 3, 4))
        C, M, L = r.shape
        n = next_fast_len(2 * L - 1)

        # Correlations as convolutions of reversed sequences, rev(corr(a, b)) = (rev(a) b)[:L]: the whole
        # chain runs on reversed gradients with plain spectra (no conjugates).
        def conv(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
            return torch.fft.irfft(A * B, n)[..., :L]

        need_p, need_q, need_d = ctx.needs_input_grad
        gp = r.new_empty(r.shape) if need_p else None
        gq = r.new_empty(M, L) if need_q else None
        gd = r.new_empty(M, L) if need_d else None
        for m in range(0, M, ctx.size):
            part = slice(m, m + ctx.size)
            R = torch.fft.rfft(r[:, part].flip(-1), n)
            Hf = torch.fft.rfft(h[part], n) if need_p or need_d else None
            if need_p:
                gp[:, part] = conv(R, Hf).flip(-1)
            if need_q or need_d:
                GH = torch.fft.rfft(conv(R, torch.fft.rfft(p[:, part], n)).sum(0), n)  # of rev(grad h)
                G = torch.fft.rfft(g[part], n)
                if need_q:
                    gq[part] = conv(GH, G).flip(-1)
                if need_d:  # grad d = -corr(grad h, q g^2) = -corr(corr(grad h, h), g)
                    gd[part] = -conv(torch.fft.rfft(conv(GH, Hf), n), G).flip(-1)
        return gp, gq, gd


def series_inverse(d: torch.Tensor) -> torch.Tensor:
    """g = 1 / d mod z^L for a real series d (..., L) with d[..., 0] != 0: g (..., L), d's dtype.

    Differentiable (an FFT backward; exact higher derivatives)."""
    _check_series("d", d)
    _check_leading(d)
    if traced() or not (torch.is_grad_enabled() and d.requires_grad):
        return _newton(d)
    return _SeriesInverse.apply(d)


def series_fraction(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """y = p q / d mod z^L for real series q, d (..., L) with d[..., 0] != 0 and p (..., L) or (C, ..., L)
    (C numerators over the same q / d): y has p's shape and the dtype of all three.

    Differentiable (an FFT backward; exact higher derivatives)."""
    for name, t in (("p", p), ("q", q), ("d", d)):
        _check_series(name, t)
    if q.shape != d.shape:
        raise ValueError(f"q must have d's shape {tuple(d.shape)}; got {tuple(q.shape)}")
    if tuple(p.shape[-d.ndim:]) != tuple(d.shape) or p.ndim > d.ndim + 1:
        raise ValueError(f"p must have shape {tuple(d.shape)} or (C, *{tuple(d.shape)}) like d; got "
                         f"{tuple(p.shape)}")
    if not (p.dtype == q.dtype == d.dtype):
        raise ValueError(f"p, q and d must have one dtype; got {p.dtype}, {q.dtype} and {d.dtype}")
    if not (p.device == q.device == d.device):
        raise ValueError(f"p, q and d must be on one device; got {p.device}, {q.device} and {d.device}")
    _check_leading(d)
    if traced():
        return _fraction_plain(p, q, d)
    channels = p.ndim > d.ndim
    L = d.shape[-1]
    y = _SeriesFraction.apply(p.reshape(p.shape[0] if channels else 1, -1, L), q.reshape(-1, L),
                              d.reshape(-1, L))
    return y.reshape(p.shape)


# ---- reference twins: float64, O(L^2) ----


def series_inverse_ref(d: torch.Tensor) -> torch.Tensor:
    """Reference twin of ``series_inverse``: forward substitution g_k = -(sum_{j=1..k} d_j g_(k-j)) / d_0."""
    d = d.to(torch.float64)
    g = [1 / d[..., 0]]
    for k in range(1, d.shape[-1]):
        g.append(-sum(d[..., j] * g[k - j] for j in range(1, k + 1)) / d[..., 0])
    return torch.stack(g, dim=-1)


def _product_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    L = a.shape[-1]
    return torch.stack([sum(a[..., j] * b[..., k - j] for j in range(k + 1)) for k in range(L)], dim=-1)


def series_fraction_ref(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Reference twin of ``series_fraction``: direct sums in float64."""
    return _product_ref(p.to(torch.float64), _product_ref(q.to(torch.float64), series_inverse_ref(d)))
