"""Vandermonde matrix-vector product, the core of the S4D (diagonal) kernel.

    out[..., l] = sum_n v[..., n] x[..., n]^l,        l = 0, ..., L - 1

computed in log space, x^l = exp(l log x), as S4D does; with ``log=True`` the caller passes log x directly
(for ZOH that is dt * Lambda, which avoids an exp followed by a log). ``v`` and ``x`` (..., N) broadcast
against each other; batch dimensions along which ``x`` is broadcast share one (W, N, L) power matrix.

Backends are the ones of ``ssm.ops.cauchy`` (resolved by the same ``resolve_backend``): ``"naive"``
materializes the (W, N, L) power matrix, ``"chunked"`` walks over chunks of l with a recomputing backward
(peak memory O(output)), ``"triton"`` is the optional fused CUDA kernel, ``"auto"`` picks naive or chunked by
the size of the temporary.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from .._checks import check_int
from .cauchy import _chunk_len, _group, _promote, check_operands, resolve_backend

__all__ = ["vandermonde", "vandermonde_ref"]


def _exp_powers(a: torch.Tensor, start: int, length: int, *, transposed: bool = False) -> torch.Tensor:
    """exp(a l) for l = start, ..., start + length - 1: a (W, N) -> (W, N, length), or (W, length, N).

    With s = ceil(sqrt(length)), exp(a (start + s i + j)) = exp(a (start + s i)) exp(a j): about
    2 sqrt(length) complex exponentials per node and one complex product per entry (a complex exp costs
    ~10 products on CPU). Both factors are formed in float64 and rounded once: in float32 the rounding of
    a * l alone costs a phase error |Im a| l 2^-24 (~1e-4 at l ~ 1e4); the price is q + s double
    exponentials per node. ``transposed`` returns the contiguous (W, length, N) layout (for the backward).
    """
    s = max(1, math.isqrt(length - 1) + 1)
    q = -(-length // s)
    wide = a.to(torch.complex128).unsqueeze(-1)
    ell = torch.arange(max(q, s), device=a.device, dtype=torch.float64)
    outer = torch.exp(wide * (start + s * ell[:q])).to(a.dtype)  # (W, N, q)
    inner = torch.exp(wide * ell[:s]).to(a.dtype)  # (W, N, s)
    if transposed:
        E = outer.transpose(-1, -2).unsqueeze(-2) * inner.transpose(-1, -2).unsqueeze(-3)  # (W, q, s, N)
        return E.reshape(*a.shape[:-1], q * s, a.shape[-1])[..., :length, :]
    E = outer.unsqueeze(-1) * inner.unsqueeze(-2)  # (W, N, q, s)
    return E.reshape(*a.shape, q * s)[..., :length]


def _vandermonde_naive(v: torch.Tensor, a: torch.Tensor, length: int) -> torch.Tensor:
    """v (W, E, N), a = log x (W, N) -> (W, E, L), materializing exp(a l) (W, N, L)."""
    return torch.bmm(v, _exp_powers(a, 0, length))


class _VandermondeChunked(torch.autograd.Function):
    """Chunked log-Vandermonde product with a recomputing backward.

    With E[w, n, l] = exp(a[w, n] l) and incoming gradient g (W, E, L):

        grad_v[w, e, n] = sum_l g[w, e, l] conj(E[w, n, l])
        grad_a[w, n]    = sum_e conj(v[w, e, n]) sum_l g[w, e, l] l conj(E[w, n, l])
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, a: torch.Tensor, length: int, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(v, a)
        ctx.length, ctx.chunk = length, chunk
        out = v.new_empty(v.shape[0], v.shape[1], length)
        for s in range(0, length, chunk):
            out[:, :, s : s + chunk] = torch.bmm(v, _exp_powers(a, s, min(chunk, length - s)))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        v, a = ctx.saved_tensors
        need_v, need_a = ctx.needs_input_grad[:2]
        gv = torch.zeros_like(v) if need_v else None
        ta = torch.zeros_like(v) if need_a else None
        for s in range(0, ctx.length, ctx.chunk):
            c = min(ctx.chunk, ctx.length - s)
            ec = _exp_powers(a.conj(), s, c, transposed=True)  # (W, c, N): conj(E)^T
            gc = g[:, :, s : s + c]  # (W, E, c)
            if need_v:
                gv += torch.bmm(gc, ec)
            if need_a:
                ell = torch.arange(s, s + c, device=a.device, dtype=a.real.dtype)
                ta += torch.bmm(gc * ell, ec)
        ga = (v.conj() * ta).sum(1) if need_a else None
        return gv, ga, None, None


def vandermonde(
    v: torch.Tensor, x: torch.Tensor, L: int, *, log: bool = False, backend: str = "auto"
) -> torch.Tensor:
    """Vandermonde product out[..., l] = sum_n v[..., n] x[..., n]^l for l = 0..L-1.

    Args:
        v: (..., N) complex (real is promoted).
        x: (..., N) nodes (nonzero), or their logarithms if ``log=True``; batch shape broadcasts with ``v``'s.
        L: number of powers, >= 1.
        log: ``x`` holds log of the nodes (S4D's log-Vandermonde).
        backend: ``"auto"``, ``"naive"``, ``"chunked"`` or ``"triton"`` (see ``ssm.ops.cauchy``).

    Returns:
        (..., L) complex. Differentiable in ``v`` and ``x``.
    """
    check_operands(v, x, "x")
    length = check_int("L", L, minimum=1)
    v, x = _promote(v, x)
    a = x if log else torch.log(x)
    vg, ag, restore = _group(v, a)
    wsize, esize, n = vg.shape
    itemsize = a.element_size()
    name = resolve_backend(backend, wsize * n * length * itemsize, a.device)
    if name == "naive":
        out = _vandermonde_naive(vg, ag, length)
    elif name == "chunked":
        out = _VandermondeChunked.apply(vg, ag, length, _chunk_len(wsize, n, length, itemsize))
    else:
        from .cauchy_triton import vandermonde_triton

        out = vandermonde_triton(vg, ag, length)
    return restore(out)


def vandermonde_ref(v: torch.Tensor, x: torch.Tensor, L: int, *, log: bool = False) -> torch.Tensor:
    """Reference twin of ``vandermonde``: explicit integer powers, materializing (..., N, L)."""
    v, x = _promote(v, x)
    if log:
        x = torch.exp(x)
    powers = [torch.ones_like(x)]
    for _ in range(1, L):
        powers.append(powers[-1] * x)
    powers = torch.stack(powers, dim=-1)  # (..., N, L)
    return (v.unsqueeze(-1) * powers).sum(-2)
