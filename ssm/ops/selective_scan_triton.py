"""Optional Triton kernel for the forward pass of the selective scan (``pip install triton``).

Importing this module does not import triton: ``available()`` checks for it and the kernel is compiled on
first use. Reached through ``backend="triton"`` (or ``"auto"`` on CUDA) of
``ssm.ops.selective_scan.selective_scan_fn``; on CPU tensors only under ``TRITON_INTERPRET=1`` (tests).

One program per batch row and block of channels runs the recurrence of ``ssm.ops.selective_scan`` along L
with the (BLOCK_D, N) state in registers, fused: exp(delta A), delta B u, the update and C h, so nothing of
size (B, D, N, L) or (B, D, N, chunk) is ever written. It writes y, the state at every chunk start (what
the torch backward recomputes a chunk from) and the last state; the backward is the torch one.
Operands are time-major as in ``_SelectiveScan``: u, delta (L, B, D); A (D, N); B, C (D, N) or
(L, B, G, N). Indices are int32: L * B * D * N must stay below 2^31.
"""

from __future__ import annotations

import functools

import torch

from .backends import triton_available as available

__all__ = ["available", "selective_scan_forward_triton"]

BLOCK_D = 32


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def scan_fwd(u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, h0_ptr, y_ptr, starts_ptr, last_ptr,
                 L, NB, D, N, B_GS, C_GS, B_PER, C_PER, CHUNK,
                 B_SHARED: tl.constexpr, C_SHARED: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
        # h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = sum_n C_t h_t for one batch row b and
        # channels d in one block; B_t/C_t rows of group d // PER (strides: time NB*GS, batch GS).
        b = tl.program_id(0)
        offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
        offs_n = tl.arange(0, BN)
        mask_d = offs_d < D
        mask = mask_d[:, None] & (offs_n[None, :] < N)
        dn = offs_d[:, None] * N + offs_n[None, :]
        A = tl.load(A_ptr + dn, mask=mask, other=0.0)
        state_off = b * D * N + dn
        h = tl.load(h0_ptr + state_off, mask=mask, other=0.0)
        if B_SHARED:
            Bm = tl.load(B_ptr + dn, mask=mask, other=0.0)
        if C_SHARED:
            Cm = tl.load(C_ptr + dn, mask=mask, other=0.0)
        gB = (offs_d // B_PER)[:, None] * N + offs_n[None, :]
        gC = (offs_d // C_PER)[:, None] * N + offs_n[None, :]
        for t in range(0, L):
            if t % CHUNK == 0:
                tl.store(starts_ptr + (t // CHUNK) * NB * D * N + state_off, h, mask=mask)
            row = (t * NB + b) * D + offs_d
            dt = tl.load(dl_ptr + row, mask=mask_d, other=0.0)
            uu = tl.load(u_ptr + row, mask=mask_d, other=0.0)
            if not B_SHARED:
                Bm = tl.load(B_ptr + (t * NB + b) * B_GS * N + gB, mask=mask, other=0.0)
            if not C_SHARED:
                Cm = tl.load(C_ptr + (t * NB + b) * C_GS * N + gC, mask=mask, other=0.0)
            h = tl.exp(dt[:, None] * A) * h + (dt * uu)[:, None] * Bm
            y = tl.sum(tl.where(mask, h * Cm, 0.0), axis=1)
            tl.store(y_ptr + row, y, mask=mask_d)
        tl.store(last_ptr + state_off, h, mask=mask)

    return triton, scan_fwd


def selective_scan_forward_triton(u, delta, A, Bm, Cm, h0, chunk):
    """y (L, B, D), chunk-start states (ceil(L / chunk), B, D, N) and the last state (B, D, N)."""
    triton, kernel = _kernel()
    length, batch, dim = u.shape
    N = A.shape[1]
    u, delta, A, Bm, Cm, h0 = (t.contiguous() for t in (u, delta, A, Bm, Cm, h0))
    y = torch.empty_like(u)
    starts = u.new_empty((-(-length // chunk), batch, dim, N))
    last = torch.empty_like(h0)

    def groups(M):
        return (1, dim) if M.ndim == 2 else (M.shape[2], dim // M.shape[2])

    (bg, bper), (cg, cper) = groups(Bm), groups(Cm)
    grid = (batch, triton.cdiv(dim, BLOCK_D))
    kernel[grid](u, delta, A, Bm, Cm, h0, y, starts, last, length, batch, dim, N, bg, cg, bper, cper, chunk,
                 B_SHARED=Bm.ndim == 2, C_SHARED=Cm.ndim == 2, BD=BLOCK_D, BN=triton.next_power_of_2(N))
    return y, starts, last
