"""Optional Triton kernels for the forward of SSD, ``mamba_chunk_scan_combined`` (``pip install triton``).

Importing this module does not import triton: ``available()`` checks for it and the kernels are compiled on
first use. Reached through ``backend="triton"`` of ``ssm.ops.ssd.mamba_chunk_scan_combined``; CUDA tensors,
or CPU tensors under ``TRITON_INTERPRET=1`` (tests). Forward only: there is no backward (the caller refuses
tensors that need gradients).

The chunked algorithm of ``ssm.ops.ssd`` in three kernels, with a_t = dt_t A and chunks of Q steps walked in
tiles of ``BLOCK_T`` positions (i rows, j columns):

    chunk_state   (one program per b h, chunk and block of p)
                  s_c = sum_j exp(a_{j+1} + ... + a_{Q-1}) dt_j x_j B_j^T
                  and the chunk's decay exp(a_0 + ... + a_{Q-1}) (0 where a document starts)
    state_passing (per b h and block of p n)
                  h_c = decay_c h_{c-1} + s_c, writing h_{c-1} over s_c
    chunk_scan    (per b h, tile of rows i and block of p)
                  y_i = sum_{j <= i} (C_i . B_j) exp(S[i, j]) dt_j x_j + exp(a_0 + ... + a_i) C_i . h_{c-1}
                  out_i = (y_i + D x_i) * silu(z_i)

Every exponent is a sum of a's (tile sums, a cumsum along the diagonal tile), never a difference of
cumsums, as in the torch path. Positions past l read dt = 0 (decay 1, no input). ``seq_idx`` masks pairs in
different documents and cuts the state where a document starts. Operands are in the compute dtype (float32,
or float64); dt is already biased, softplus-ed and clamped. Indices are int32: every tensor must hold
fewer than 2^31 elements.
"""

from __future__ import annotations

import functools

from .backends import interpreting
from .backends import triton_accepts as accepts
from .backends import triton_available as available

__all__ = ["available", "accepts", "interpreting", "ssd_forward_triton", "BLOCK_T"]

#: Positions per tile along a chunk; a longer chunk is walked tile by tile.
BLOCK_T = 64
#: Head channels (p) per program.
BLOCK_P = 64
#: State elements (p n) per program of the inter-chunk recurrence.
BLOCK_S = 256
_GRID_MAX = 65535  # CUDA's limit on the grid's second and third axes


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def chunk_state(x_ptr, dt_ptr, A_ptr, B_ptr, seq_ptr, s_ptr, decay_ptr,
                    L, H, P, N, Q, NC, HG, NT,
                    sxb, sxl, sxh, sxp, sbb, sbl, sbg, sbn,
                    HAS_SEQ: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                    PREC: tl.constexpr):
        # s_c[p, n] = sum_j exp(R_j) dt_j x_j[p] B_j[n], R_j = a_{j+1} + ... + a_{Q-1}: tiles from the last,
        # R_j = (sum of a after j in its tile) + (sum of the later tiles)
        bh = tl.program_id(0)
        c = tl.program_id(1)
        bb = bh // H
        hh = bh % H
        gg = hh // HG
        A = tl.load(A_ptr + hh)
        offs_p = tl.program_id(2) * BP + tl.arange(0, BP)
        offs_n = tl.arange(0, BN)
        mask_p = offs_p < P
        mask_n = offs_n < N
        t0 = c * Q
        t_end = tl.minimum(t0 + Q, L)
        if HAS_SEQ:
            seq_end = tl.load(seq_ptr + bb * L + t_end - 1)
        acc = tl.zeros((BP, BN), dtype=x_ptr.dtype.element_ty)
        suffix = tl.sum(tl.zeros((BT,), dtype=x_ptr.dtype.element_ty), axis=0)
        for r in range(0, NT):
            offs = (NT - 1 - r) * BT + tl.arange(0, BT)
            t = t0 + offs
            valid = (offs < Q) & (t < L)
            dt = tl.load(dt_ptr + (bb * L + t) * H + hh, mask=valid, other=0.0)
            a = dt * A
            later = tl.sum(tl.where(offs[None, :] > offs[:, None], a[None, :], 0.0), axis=1)
            w = tl.exp(later + suffix) * dt
            if HAS_SEQ:
                seq = tl.load(seq_ptr + bb * L + t, mask=valid, other=-1)
                w = tl.where(seq == seq_end, w, 0.0)
            xt = tl.load(x_ptr + bb * sxb + t[:, None] * sxl + hh * sxh + offs_p[None, :] * sxp,
                         mask=valid[:, None] & mask_p[None, :], other=0.0)
            Bt = tl.load(B_ptr + bb * sbb + t[:, None] * sbl + gg * sbg + offs_n[None, :] * sbn,
                         mask=valid[:, None] & mask_n[None, :], other=0.0)
            acc += tl.dot(tl.trans(xt * w[:, None]), Bt, input_precision=PREC)
            suffix += tl.sum(a, axis=0)
        tl.store(s_ptr + ((bh * NC + c) * P + offs_p[:, None]) * N + offs_n[None, :], acc,
                 mask=mask_p[:, None] & mask_n[None, :])
        if tl.program_id(2) == 0:
            decay = tl.exp(suffix)
            if HAS_SEQ:  # the state entering the chunk belongs to the document of the previous chunk's end
                prev = tl.load(seq_ptr + bb * L + tl.maximum(t0 - 1, 0))
                prev = tl.where(c > 0, prev, 0)
                decay = tl.where(seq_end == prev, decay, 0.0)
            tl.store(decay_ptr + bh * NC + c, decay)

    @triton.jit
    def state_passing(s_ptr, decay_ptr, h0_ptr, last_ptr, NC, PN, HAS_H0: tl.constexpr, BS: tl.constexpr):
        # h_c = decay_c h_{c-1} + s_c along the chunks; s_c is overwritten by h_{c-1}, the state entering c
        bh = tl.program_id(0)
        offs = tl.program_id(1) * BS + tl.arange(0, BS)
        mask = offs < PN
        if HAS_H0:
            h = tl.load(h0_ptr + bh * PN + offs, mask=mask, other=0.0)
        else:
            h = tl.zeros((BS,), dtype=s_ptr.dtype.element_ty)
        for c in range(0, NC):
            ptr = s_ptr + (bh * NC + c) * PN + offs
            s = tl.load(ptr, mask=mask, other=0.0)
            tl.store(ptr, h, mask=mask)
            h = tl.load(decay_ptr + bh * NC + c) * h + s
        tl.store(last_ptr + bh * PN + offs, h, mask=mask)

    @triton.jit
    def chunk_scan(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, seq_ptr, s_ptr, D_ptr, z_ptr, out_ptr,
                   L, H, P, N, Q, NC, HG, NT,
                   sxb, sxl, sxh, sxp, sbb, sbl, sbg, sbn, scb, scl, scg, scn, szb, szl, szh, szp,
                   HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                   BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        # rows i of tile m of chunk c: the diagonal tile, then the earlier tiles from the nearest, with
        # S[i, j] = (a's up to i in tile m) + (the tiles between) + (a's after j in j's tile)
        bh = tl.program_id(0)
        c = tl.program_id(1) // NT
        m = tl.program_id(1) % NT
        bb = bh // H
        hh = bh % H
        gg = hh // HG
        A = tl.load(A_ptr + hh)
        offs_p = tl.program_id(2) * BP + tl.arange(0, BP)
        offs_n = tl.arange(0, BN)
        mask_p = offs_p < P
        mask_n = offs_n < N
        t0 = c * Q
        offs_i = m * BT + tl.arange(0, BT)
        ti = t0 + offs_i
        valid_i = (offs_i < Q) & (ti < L)
        dt_i = tl.load(dt_ptr + (bb * L + ti) * H + hh, mask=valid_i, other=0.0)
        a_i = dt_i * A
        upto = tl.sum(tl.where(offs_i[None, :] <= offs_i[:, None], a_i[None, :], 0.0), axis=1)
        C_i = tl.load(C_ptr + bb * scb + ti[:, None] * scl + gg * scg + offs_n[None, :] * scn,
                      mask=valid_i[:, None] & mask_n[None, :], other=0.0)
        B_i = tl.load(B_ptr + bb * sbb + ti[:, None] * sbl + gg * sbg + offs_n[None, :] * sbn,
                      mask=valid_i[:, None] & mask_n[None, :], other=0.0)
        x_i = tl.load(x_ptr + bb * sxb + ti[:, None] * sxl + hh * sxh + offs_p[None, :] * sxp,
                      mask=valid_i[:, None] & mask_p[None, :], other=0.0)
        # diagonal tile: S[i, j] = a_{j+1} + ... + a_i, a cumsum down the rows of where(i > j, a_i, 0)
        S = tl.cumsum(tl.where(offs_i[:, None] > offs_i[None, :], a_i[:, None], 0.0), axis=0)
        keep = offs_i[:, None] >= offs_i[None, :]
        if HAS_SEQ:
            seq_i = tl.load(seq_ptr + bb * L + ti, mask=valid_i, other=-1)
            keep = keep & (seq_i[:, None] == seq_i[None, :])
        W = tl.dot(C_i, tl.trans(B_i), input_precision=PREC) * tl.exp(tl.where(keep, S, float("-inf")))
        acc = tl.dot(W * dt_i[None, :], x_i, input_precision=PREC)
        between = tl.sum(tl.zeros((BT,), dtype=x_ptr.dtype.element_ty), axis=0)
        for r in range(0, m):
            offs_j = (m - 1 - r) * BT + tl.arange(0, BT)
            tj = t0 + offs_j
            valid_j = tj < L
            dt_j = tl.load(dt_ptr + (bb * L + tj) * H + hh, mask=valid_j, other=0.0)
            a_j = dt_j * A
            after = tl.sum(tl.where(offs_j[None, :] > offs_j[:, None], a_j[None, :], 0.0), axis=1)
            S = upto[:, None] + (between + after)[None, :]
            if HAS_SEQ:
                seq_j = tl.load(seq_ptr + bb * L + tj, mask=valid_j, other=-1)
                S = tl.where(seq_i[:, None] == seq_j[None, :], S, float("-inf"))
            B_j = tl.load(B_ptr + bb * sbb + tj[:, None] * sbl + gg * sbg + offs_n[None, :] * sbn,
                          mask=valid_j[:, None] & mask_n[None, :], other=0.0)
            x_j = tl.load(x_ptr + bb * sxb + tj[:, None] * sxl + hh * sxh + offs_p[None, :] * sxp,
                          mask=valid_j[:, None] & mask_p[None, :], other=0.0)
            W = tl.dot(C_i, tl.trans(B_j), input_precision=PREC) * tl.exp(S)
            acc += tl.dot(W * dt_j[None, :], x_j, input_precision=PREC)
            between += tl.sum(a_j, axis=0)
        # the entering state: exp(a_0 + ... + a_i) C_i . h_{c-1} (between now sums the tiles before m)
        h = tl.load(s_ptr + ((bh * NC + c) * P + offs_p[None, :]) * N + offs_n[:, None],
                    mask=mask_p[None, :] & mask_n[:, None], other=0.0)  # (BN, BP)
        w_in = tl.exp(upto + between)
        if HAS_SEQ:
            prev = tl.load(seq_ptr + bb * L + tl.maximum(t0 - 1, 0))
            prev = tl.where(c > 0, prev, 0)
            w_in = tl.where(seq_i == prev, w_in, 0.0)
        acc += tl.dot(C_i, h, input_precision=PREC) * w_in[:, None]
        if HAS_D:
            acc += x_i * tl.load(D_ptr + hh * P + offs_p, mask=mask_p, other=0.0)[None, :]
        if HAS_Z:
            zz = tl.load(z_ptr + bb * szb + ti[:, None] * szl + hh * szh + offs_p[None, :] * szp,
                         mask=valid_i[:, None] & mask_p[None, :], other=0.0)
            acc = acc * zz / (1.0 + tl.exp(-zz))
        tl.store(out_ptr + ((bb * L + ti[:, None]) * H + hh) * P + offs_p[None, :], acc,
                 mask=valid_i[:, None] & mask_p[None, :])

    return triton, chunk_state, state_passing, chunk_scan


def ssd_forward_triton(x, dt, A, B, C, chunk_size, D=None, z=None, initial_states=None, seq_idx=None):
    """out (b, l, h, p) = (y + D x) * silu(z) and the final state (b, h, p, n), in the operands' dtype.

    x, z (b, l, h, p), B, C (b, l, g, n) of any strides; dt (b, l, h) the final time steps; A (h,);
    D (h, p) or (h,); initial_states (b, h, p, n); seq_idx (b, l) integers. All floating operands in one
    dtype (float32 or float64): ``ssm.ops.ssd`` converts them."""
    triton, chunk_state, state_passing, chunk_scan = _kernels()
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Q = int(chunk_size)
    nc = triton.cdiv(l, Q)
    BP = min(BLOCK_P, max(16, triton.next_power_of_2(p)))
    BN = max(16, triton.next_power_of_2(n))
    BT = _tile(Q, BN, x.element_size())
    if nc * triton.cdiv(min(Q, l), 16) > _GRID_MAX:
        raise ValueError(f"x: length {l} in chunks of {Q} needs more tiles than the Triton grid's "
                         f"{_GRID_MAX}; use backend='torch' or a longer chunk_size")
    if max(x.numel(), b * h * nc * p * n) >= 2**31:
        raise ValueError("x: too large for the Triton kernels' int32 indices; use backend='torch'")
    dtype = x.dtype
    dt, A = dt.contiguous(), A.contiguous()
    states = x.new_empty((b * h, nc, p, n))  # s_c, then the state entering chunk c
    decay = x.new_empty((b * h, nc))
    last = x.new_empty((b, h, p, n))
    out = x.new_empty((b, l, h, p))
    seq = dt if seq_idx is None else seq_idx.contiguous()  # a placeholder pointer when absent
    Dp = dt if D is None else (D[:, None].expand(h, p) if D.ndim == 1 else D).to(dtype).contiguous()
    h0 = dt if initial_states is None else initial_states.to(dtype).contiguous()
    zz = x if z is None else z.to(dtype)
    common = dict(HAS_SEQ=seq_idx is not None, BP=BP, BN=BN, PREC="ieee")

    def states_of_chunks(bt):
        nt = triton.cdiv(min(Q, l), bt)  # tiles per chunk (fewer when l < Q: the rest is past the end)
        chunk_state[(b * h, nc, triton.cdiv(p, BP))](
            x, dt, A, B, seq, states, decay, l, h, p, n, Q, nc, h // g, nt, *x.stride(), *B.stride(), BT=bt,
            **common)

    def outputs(bt):
        nt = triton.cdiv(min(Q, l), bt)
        chunk_scan[(b * h, nc * nt, triton.cdiv(p, BP))](
            x, dt, A, B, C, seq, states, Dp, zz, out, l, h, p, n, Q, nc, h // g, nt,
            *x.stride(), *B.stride(), *C.stride(), *zz.stride(), HAS_D=D is not None, HAS_Z=z is not None,
            BT=bt, **common)

    _shrinking(states_of_chunks, BT)
    state_passing[(b * h, triton.cdiv(p * n, BLOCK_S))](
        states, decay, h0, last, nc, p * n, HAS_H0=initial_states is not None, BS=BLOCK_S)
    _shrinking(outputs, BT)
    return out, last


def _tile(Q: int, BN: int, itemsize: int) -> int:
    """Positions per tile: ``BLOCK_T`` at most, no more than the chunk needs, and BT * BN * itemsize at most
    64 * 128 * 4 bytes (float32 with n = 128 at 64: chunk_scan then takes 146 KiB of shared memory on sm_90,
    within an A100's and an H100's; larger n or float64 halve the tile)."""
    bt = min(BLOCK_T, max(16, 1 << (Q - 1).bit_length()))
    while bt > 16 and bt * BN * itemsize > 64 * 128 * 4:
        bt //= 2
    return bt


def _shrinking(launch, bt: int) -> None:
    """``launch(bt)``, halving bt (down to 16) while the GPU lacks the shared memory for the kernel."""
    from triton.runtime.errors import OutOfResources

    while True:
        try:
            return launch(bt)
        except OutOfResources:
            if bt <= 16:
                raise
            bt //= 2
