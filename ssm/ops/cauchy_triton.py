"""Optional Triton kernels for the Cauchy and Vandermonde products (CUDA tensors; ``pip install triton``).

Under ``TRITON_INTERPRET=1`` (Triton's interpreter, set before triton is imported) the same kernels run on
CPU tensors, slowly: that is how the test suite runs them without a GPU (``accepts``).

Importing this module does not import triton: ``available()`` checks for it and the kernels are compiled on
first use. Reached through ``backend="triton"`` of ``ssm.ops.cauchy.cauchy`` and
``ssm.ops.vandermonde.vandermonde`` (grouped operands v (W, E, N), w or log x (W, N)).

Two fused kernels per product, on separate real and imaginary planes (Triton has no complex type), never
materializing the (W, N, L) matrix:

    rows:  out[w, e, l] = sum_n a[w, e, n] f(w, n, l)          (one program per (w, e) and block of l)
    cols:  out[w, e, n] = sum_l g[w, e, l] f'(w, n, l)         (one program per (w, e) and block of n)

with f = 1 / (z_l - w_n)^p (Cauchy, p = 1 or 2) or exp(a_n l) (Vandermonde, times l for its gradient;
formed in float64 and rounded once, like the torch backends, so float32 keeps its accuracy at long L).
The backward passes are expressed with the same kernels on conjugated operands (formulas in the docstrings
of ``ssm.ops.cauchy._CauchyChunked`` and ``ssm.ops.vandermonde._VandermondeBlocked``). Indices are int32:
W * E * max(N, L) must stay below 2^31.
"""

from __future__ import annotations

import functools

import torch

from .._checks import single_backward
from .backends import interpreting
from .backends import triton_accepts as accepts
from .backends import triton_available as available

__all__ = ["accepts", "available", "cauchy_triton", "interpreting", "vandermonde_triton", "works"]

BLOCK_N = 32
BLOCK_L = 128


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def cauchy_rows(a_re, a_im, z_re, z_im, w_re, w_im, o_re, o_im, E, N, L,
                    POWER: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr):
        # out[row, l] = sum_n a[row, n] / (z[l] - w[row // E, n])^POWER
        row = tl.program_id(0)
        offs_l = tl.program_id(1) * BL + tl.arange(0, BL)
        mask_l = offs_l < L
        zr = tl.load(z_re + offs_l, mask=mask_l, other=0.0)
        zi = tl.load(z_im + offs_l, mask=mask_l, other=0.0)
        acc_r = tl.zeros([BL], dtype=zr.dtype)
        acc_i = tl.zeros([BL], dtype=zr.dtype)
        wrow = row // E
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            mask_n = offs_n < N
            ar = tl.load(a_re + row * N + offs_n, mask=mask_n, other=0.0)
            ai = tl.load(a_im + row * N + offs_n, mask=mask_n, other=0.0)
            wr = tl.load(w_re + wrow * N + offs_n, mask=mask_n, other=0.0)
            wi = tl.load(w_im + wrow * N + offs_n, mask=mask_n, other=0.0)
            dr = zr[None, :] - wr[:, None]  # (BN, BL)
            di = zi[None, :] - wi[:, None]
            if POWER == 2:
                sr = dr * dr - di * di
                si = 2.0 * dr * di
                dr = sr
                di = si
            den = dr * dr + di * di
            qr = (ar[:, None] * dr + ai[:, None] * di) / den  # a / d = a conj(d) / |d|^2
            qi = (ai[:, None] * dr - ar[:, None] * di) / den
            keep = mask_n[:, None] & mask_l[None, :]
            acc_r += tl.sum(tl.where(keep, qr, 0.0), axis=0)
            acc_i += tl.sum(tl.where(keep, qi, 0.0), axis=0)
        tl.store(o_re + row * L + offs_l, acc_r, mask=mask_l)
        tl.store(o_im + row * L + offs_l, acc_i, mask=mask_l)

    @triton.jit
    def cauchy_cols(g_re, g_im, z_re, z_im, w_re, w_im, o_re, o_im, E, N, L,
                    POWER: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr):
        # out[row, n] = sum_l g[row, l] / (z[l] - w[row // E, n])^POWER
        row = tl.program_id(0)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        wrow = row // E
        wr = tl.load(w_re + wrow * N + offs_n, mask=mask_n, other=0.0)
        wi = tl.load(w_im + wrow * N + offs_n, mask=mask_n, other=0.0)
        acc_r = tl.zeros([BN], dtype=wr.dtype)
        acc_i = tl.zeros([BN], dtype=wr.dtype)
        for l0 in range(0, L, BL):
            offs_l = l0 + tl.arange(0, BL)
            mask_l = offs_l < L
            gr = tl.load(g_re + row * L + offs_l, mask=mask_l, other=0.0)
            gi = tl.load(g_im + row * L + offs_l, mask=mask_l, other=0.0)
            zr = tl.load(z_re + offs_l, mask=mask_l, other=0.0)
            zi = tl.load(z_im + offs_l, mask=mask_l, other=0.0)
            dr = zr[None, :] - wr[:, None]  # (BN, BL)
            di = zi[None, :] - wi[:, None]
            if POWER == 2:
                sr = dr * dr - di * di
                si = 2.0 * dr * di
                dr = sr
                di = si
            den = dr * dr + di * di
            qr = (gr[None, :] * dr + gi[None, :] * di) / den
            qi = (gi[None, :] * dr - gr[None, :] * di) / den
            keep = mask_n[:, None] & mask_l[None, :]
            acc_r += tl.sum(tl.where(keep, qr, 0.0), axis=1)
            acc_i += tl.sum(tl.where(keep, qi, 0.0), axis=1)
        tl.store(o_re + row * N + offs_n, acc_r, mask=mask_n)
        tl.store(o_im + row * N + offs_n, acc_i, mask=mask_n)

    @triton.jit
    def vander_rows(v_re, v_im, a_re, a_im, o_re, o_im, E, N, L,
                    BN: tl.constexpr, BL: tl.constexpr):
        # out[row, l] = sum_n v[row, n] exp(a[row // E, n] l); a is float64, exp(a l) is formed in float64
        # (libdevice range reduction) and rounded once, so long kernels keep float32 accuracy.
        row = tl.program_id(0)
        offs_l = tl.program_id(1) * BL + tl.arange(0, BL)
        mask_l = offs_l < L
        wrow = row // E
        vr0 = tl.load(v_re + row * N)
        acc_r = tl.zeros([BL], dtype=vr0.dtype)
        acc_i = tl.zeros([BL], dtype=vr0.dtype)
        ell = offs_l.to(tl.float64)
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            mask_n = offs_n < N
            vr = tl.load(v_re + row * N + offs_n, mask=mask_n, other=0.0)
            vi = tl.load(v_im + row * N + offs_n, mask=mask_n, other=0.0)
            ar = tl.load(a_re + wrow * N + offs_n, mask=mask_n, other=0.0)
            ai = tl.load(a_im + wrow * N + offs_n, mask=mask_n, other=0.0)
            mag = tl.exp(ar[:, None] * ell[None, :])  # (BN, BL), float64
            ph = ai[:, None] * ell[None, :]
            er = (mag * tl.cos(ph)).to(vr.dtype)
            ei = (mag * tl.sin(ph)).to(vr.dtype)
            keep = mask_n[:, None] & mask_l[None, :]
            acc_r += tl.sum(tl.where(keep, vr[:, None] * er - vi[:, None] * ei, 0.0), axis=0)
            acc_i += tl.sum(tl.where(keep, vr[:, None] * ei + vi[:, None] * er, 0.0), axis=0)
        tl.store(o_re + row * L + offs_l, acc_r, mask=mask_l)
        tl.store(o_im + row * L + offs_l, acc_i, mask=mask_l)

    @triton.jit
    def vander_cols(g_re, g_im, a_re, a_im, o_re, o_im, E, N, L,
                    WEIGHT: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr):
        # out[row, n] = sum_l g[row, l] l^WEIGHT exp(a[row // E, n] l); a float64 as in vander_rows
        row = tl.program_id(0)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        wrow = row // E
        ar = tl.load(a_re + wrow * N + offs_n, mask=mask_n, other=0.0)
        ai = tl.load(a_im + wrow * N + offs_n, mask=mask_n, other=0.0)
        gr0 = tl.load(g_re + row * L)
        acc_r = tl.zeros([BN], dtype=gr0.dtype)
        acc_i = tl.zeros([BN], dtype=gr0.dtype)
        for l0 in range(0, L, BL):
            offs_l = l0 + tl.arange(0, BL)
            mask_l = offs_l < L
            gr = tl.load(g_re + row * L + offs_l, mask=mask_l, other=0.0)
            gi = tl.load(g_im + row * L + offs_l, mask=mask_l, other=0.0)
            ell = offs_l.to(tl.float64)
            if WEIGHT == 1:
                gr = gr * ell.to(gr.dtype)
                gi = gi * ell.to(gr.dtype)
            mag = tl.exp(ar[:, None] * ell[None, :])  # (BN, BL), float64
            ph = ai[:, None] * ell[None, :]
            er = (mag * tl.cos(ph)).to(gr.dtype)
            ei = (mag * tl.sin(ph)).to(gr.dtype)
            keep = mask_n[:, None] & mask_l[None, :]
            acc_r += tl.sum(tl.where(keep, gr[None, :] * er - gi[None, :] * ei, 0.0), axis=1)
            acc_i += tl.sum(tl.where(keep, gr[None, :] * ei + gi[None, :] * er, 0.0), axis=1)
        tl.store(o_re + row * N + offs_n, acc_r, mask=mask_n)
        tl.store(o_im + row * N + offs_n, acc_i, mask=mask_n)

    return triton, cauchy_rows, cauchy_cols, vander_rows, vander_cols


def _planes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.real.contiguous(), x.imag.contiguous()


def _launch(
    kernel_index: int, a: torch.Tensor, b: torch.Tensor | None, c: torch.Tensor, length: int, **const: int
) -> torch.Tensor:
    """Run one kernel on complex operands; ``a`` (W, E, K), ``c`` (W, N); output (W, E, length)."""
    triton, *kernels = _kernels()
    kernel = kernels[kernel_index]
    wsize, esize = a.shape[0], a.shape[1]
    n = c.shape[-1]
    rows = kernel_index in (0, 2)
    out_re = a.real.new_empty(wsize, esize, length)
    out_im = a.real.new_empty(wsize, esize, length)
    block = BLOCK_L if rows else BLOCK_N
    grid = (wsize * esize, triton.cdiv(length, block))
    L = length if rows else a.shape[-1]
    extra = _planes(b) if b is not None else ()
    if kernel_index >= 2:  # Vandermonde: the log-nodes travel in float64
        c = c.to(torch.complex128)
    args = (*_planes(a), *extra, *_planes(c), out_re, out_im, esize, n, L)
    kernel[grid](*args, BN=BLOCK_N, BL=BLOCK_L, **const)
    return torch.complex(out_re, out_im)


class _CauchyTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v, z, w)
        return _launch(0, v, z, w, z.shape[0], POWER=1)

    @staticmethod
    @single_backward("cauchy (backend='triton')", "use backend='naive' or 'chunked' for higher derivatives")
    def backward(ctx, g: torch.Tensor):
        v, z, w = ctx.saved_tensors
        need_v, need_z, need_w = ctx.needs_input_grad
        g = g.contiguous()
        zc, wc, vc = z.conj(), w.conj(), v.conj()
        n = w.shape[-1]
        gv = _launch(1, g, zc, wc, n, POWER=1) if need_v else None
        gw = (vc * _launch(1, g, zc, wc, n, POWER=2)).sum(1) if need_w else None
        gz = -(g * _launch(0, vc, zc, wc, z.shape[0], POWER=2)).sum((0, 1)) if need_z else None
        return gv, gz, gw


class _VandermondeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: torch.Tensor, a: torch.Tensor, length: int) -> torch.Tensor:
        ctx.save_for_backward(v, a)
        return _launch(2, v, None, a, length)

    @staticmethod
    @single_backward("vandermonde (backend='triton')",
                     "use backend='naive' or 'chunked' for higher derivatives")
    def backward(ctx, g: torch.Tensor):
        v, a = ctx.saved_tensors
        need_v, need_a = ctx.needs_input_grad[:2]
        g = g.contiguous()
        ac = a.conj()
        n = a.shape[-1]
        gv = _launch(3, g, None, ac, n, WEIGHT=0) if need_v else None
        ga = (v.conj() * _launch(3, g, None, ac, n, WEIGHT=1)).sum(1) if need_a else None
        return gv, ga, None


def cauchy_triton(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Grouped Cauchy product v (W, E, N), z (L,), w (W, N) -> (W, E, L) with Triton kernels."""
    return _CauchyTriton.apply(v.contiguous(), z.contiguous(), w.contiguous())


def vandermonde_triton(v: torch.Tensor, a: torch.Tensor, L: int) -> torch.Tensor:
    """Grouped log-Vandermonde product v (W, E, N), a = log x (W, N) -> (W, E, L) with Triton kernels."""
    return _VandermondeTriton.apply(v.contiguous(), a.contiguous(), L)


@functools.cache
def works(device: torch.device) -> bool:
    """Whether the Triton Cauchy kernel runs on ``device`` and agrees with the reference on a small probe
    (checked once per device). False without CUDA, without triton, or when compilation or launch fails."""
    if torch.device(device).type != "cuda" or not available():
        return False
    from .cauchy import cauchy_ref

    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(2, 3, 8, dtype=torch.complex64, generator=gen).to(device)
    w = torch.complex(-torch.rand(2, 8, generator=gen), torch.randn(2, 8, generator=gen)).to(device)
    z = torch.complex(torch.zeros(16), torch.linspace(-3, 3, 16)).to(device)
    try:
        out = cauchy_triton(v, z, w)
    except Exception:  # noqa: BLE001 - any compile or launch failure means "fall back to torch"
        return False
    ref = cauchy_ref(v, z, w.unsqueeze(1))
    return bool(torch.allclose(out.cpu(), ref.cpu(), rtol=1e-3, atol=1e-4))
