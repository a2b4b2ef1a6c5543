"""State-space duality (SSD), the scan of Mamba-2 (Dao & Gu 2024), with mamba_ssm's signature.

Per head h (scalar A_h) and group g(h) = h // (H / G) of the B and C projections, with state (P, N):

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T                  (x_t (P,), B_t, C_t (N,))
    y_t = h_t C_t + D x_t,        out_t = y_t * silu(z_t)

where dt_t = clamp(softplus(dt_t + dt_bias), *dt_limit) (softplus when ``dt_softplus``; the clamp always,
as mamba_ssm). Shapes (mamba_ssm's): x, z (b, l, h, p); dt (b, l, h); A (h,); B, C (b, l, g, n);
D (h, p) or (h,); states (b, h, p, n). ``seq_idx`` (b, l) numbers packed documents (non-decreasing along a
row): the state is zero at the start of every document, and ``initial_states`` belongs to document 0 (the
state resets where seq_idx[t] != seq_idx[t - 1], with seq_idx[-1] = 0, as mamba_ssm's kernels do).

``mamba_chunk_scan_combined`` splits l into chunks of Q = ``chunk_size`` (the last one may be shorter) and,
with a_t = dt_t A, the cumsum cs_i = a_0 + ... + a_i within a chunk and L[i, j] = exp(cs_i - cs_j) for
j <= i in the same document (else 0):

    y_diag[i] = sum_{j <= i} (C_i . B_j) L[i, j] dt_j x_j                (intra-chunk: matmuls, Q x Q)
    s_c       = sum_j exp(cs_{Q-1} - cs_j) dt_j x_j B_j^T                 (state a chunk adds)
    h_c       = exp(cs_{Q-1}) h_{c-1} + s_c                                (inter-chunk recurrence)
    y_off[i]  = exp(cs_i) h_{c-1} C_i                                      (the state entering the chunk)

The exponents are differences of float64 cumsums (``_decay_matrix``, which also factors L when every
dt A <= 0). A custom autograd.Function runs it over groups of chunks (``GROUP_ELEMENTS``) and saves only
its inputs and the state entering each chunk; the backward recomputes every chunk's Q x Q blocks. Memory:
O(b h p n l / Q) saved, O(b h Q^2) temporaries (forward and backward), never a (b, h, l, Q) or (b, l, h, p, n)
tensor. ``mamba_chunk_scan_ref`` is the sequential twin with the same signature. ``backend="triton"`` runs
the same algorithm as Triton kernels (``ssm.ops.ssd_triton``), forward only: for inference, with no input
that requires grad.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_bool, check_int, check_tensor, single_backward
from .backends import OPS, resolve_backend

__all__ = ["mamba_chunk_scan_combined", "mamba_chunk_scan_ref", "BACKENDS"]

BACKENDS = OPS["ssd"].backends  # ("auto", "torch", "triton"), resolved by ssm.ops.backends
#: Whether ``"auto"`` picks the Triton forward for CUDA tensors (off until it has run on a GPU).
AUTO_TRITON = False


def _check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
                return_final_states):
    check_tensor("x", x, 4)
    b, l, h, p = x.shape
    if l < 1:
        raise ValueError(f"x must have length l >= 1; got shape {tuple(x.shape)}")
    if check_tensor("dt", dt, 3).shape != (b, l, h):
        raise ValueError(f"dt must have shape (b, l, h) = {(b, l, h)}; got {tuple(dt.shape)}")
    if check_tensor("A", A, 1).shape != (h,) or A.is_complex():
        raise ValueError(f"A must be real with shape (h,) = ({h},); got {tuple(A.shape)} {A.dtype}")
    check_tensor("B", B, 4)
    g, n = B.shape[2], B.shape[3]
    if B.shape[:2] != (b, l) or g < 1 or h % g:
        raise ValueError(f"B must have shape (b, l, g, n) = ({b}, {l}, g, n) with g dividing h = {h}; "
                         f"got {tuple(B.shape)}")
    if check_tensor("C", C, 4).shape != B.shape:
        raise ValueError(f"C must have B's shape (b, l, g, n) = {tuple(B.shape)}; got {tuple(C.shape)}")
    check_int("chunk_size", chunk_size, minimum=1)
    if D is not None and check_tensor("D", D, (1, 2)).shape not in ((h,), (h, p)):
        raise ValueError(f"D must have shape (h,) = ({h},) or (h, p) = {(h, p)}; got {tuple(D.shape)}")
    if z is not None and check_tensor("z", z, 4).shape != x.shape:
        raise ValueError(f"z must have x's shape (b, l, h, p) = {tuple(x.shape)}; got {tuple(z.shape)}")
    if dt_bias is not None and check_tensor("dt_bias", dt_bias, 1).shape != (h,):
        raise ValueError(f"dt_bias must have shape (h,) = ({h},); got {tuple(dt_bias.shape)}")
    if initial_states is not None and check_tensor("initial_states", initial_states, 4).shape != (b, h, p, n):
        raise ValueError(f"initial_states must have shape (b, h, p, n) = {(b, h, p, n)}; "
                         f"got {tuple(initial_states.shape)}")
    if seq_idx is not None:
        check_tensor("seq_idx", seq_idx, 2)
        if seq_idx.shape != (b, l) or seq_idx.is_floating_point() or seq_idx.is_complex():
            raise ValueError(f"seq_idx must be an integer tensor of shape (b, l) = {(b, l)}; "
                             f"got {tuple(seq_idx.shape)} {seq_idx.dtype}")
        if l > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
            raise ValueError("seq_idx must be non-decreasing along each row (document indices)")
    check_bool("dt_softplus", dt_softplus)
    check_bool("return_final_states", return_final_states)
    ok = isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) for v in dt_limit)
    if not ok or dt_limit[0] > dt_limit[1]:
        raise ValueError(f"dt_limit must be a pair (lo, hi) of numbers with lo <= hi; got {dt_limit!r}")


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


def _dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit, ct: torch.dtype) -> Tensor:
    """dt (+ dt_bias) (then softplus), clamped to dt_limit, in the compute dtype."""
    dt = dt.to(ct)
    if dt_bias is not None:
        dt = dt + dt_bias.to(ct)
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(min=float(dt_limit[0]), max=float(dt_limit[1]))


def _gate(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """out = (y + D x) * silu(z), in x's dtype; y (b, l, h, p)."""
    if D is not None:
        Dc = D.to(y.dtype)
        y = y + x.to(y.dtype) * (Dc[:, None] if Dc.ndim == 1 else Dc)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(x.dtype)


def mamba_chunk_scan_ref(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                         seq_idx=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                         return_final_states=False):
    """Reference twin of ``mamba_chunk_scan_combined``: the recurrence one step at a time (same arguments;
    ``chunk_size`` is checked and otherwise unused)."""
    _check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
                return_final_states)
    ct = _compute_dtype(x, dt, A, B, C, initial_states)
    b, l, h, p = x.shape
    heads_per_group = h // B.shape[2]
    dt = _dt(dt, dt_bias, dt_softplus, dt_limit, ct)
    xc, A = x.to(ct), A.to(ct)
    B = B.to(ct).repeat_interleave(heads_per_group, dim=2)  # (b, l, h, n)
    C = C.to(ct).repeat_interleave(heads_per_group, dim=2)
    state = x.new_zeros((b, h, p, B.shape[-1]), dtype=ct) if initial_states is None else initial_states.to(ct)
    doc = torch.zeros(b, dtype=torch.long, device=x.device)
    ys = []
    for t in range(l):
        if seq_idx is not None:
            keep = (seq_idx[:, t] == doc).to(ct)
            state = state * keep[:, None, None, None]
            doc = seq_idx[:, t]
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (b, h, 1, 1)
        state = decay * state + (dt[:, t, :, None] * xc[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((state * C[:, t, :, None, :]).sum(-1))  # (b, h, p)
    out = _gate(torch.stack(ys, dim=1), x, D, z)
    return (out, state) if return_final_states else out


#: Elements of one (b, chunks, h, Q, Q) temporary: chunks are processed this many Q x Q blocks at a time
#: (at least one chunk), so the op's temporaries stay O(b h Q^2 + GROUP_ELEMENTS) whatever the length.
GROUP_ELEMENTS = 2**21
#: Sub-block size of the factored decay matrix (``_decay_matrix``); chunks that are not a multiple of it, or
#: shorter than two sub-blocks, are computed directly.
SUB = 32


def _spans(l: int, Q: int, per: int) -> list[tuple[int, int, int]]:
    """(t0, k, q): k chunks of q steps from position t0, full chunks ``per`` at a time, then the short last
    chunk of a length that is not a multiple of Q."""
    full = l // Q
    spans = [(c * Q, min(per, full - c), Q) for c in range(0, full, per)]
    if l % Q:
        spans.append((full * Q, 1, l % Q))
    return spans


def _upper(q: int, device, diagonal: int = 1) -> Tensor:
    """(q, q) True where j >= i + diagonal."""
    return torch.ones(q, q, dtype=torch.bool, device=device).triu(diagonal)


def _decay_matrix(cs: Tensor, other_doc: Tensor | None, decays: bool, dtype: torch.dtype) -> Tensor:
    """L[..., i, j] = exp(cs_i - cs_j) for j <= i in the same document, else 0, in ``dtype``; cs (..., q) the
    float64 cumsum of a = dt A within a chunk, ``other_doc`` (..., q, q) True across documents.

    Every exponent is a difference of float64 cumsums (exact to float64 rounding for any realistic |cs|).
    Direct: one exp per entry. Factored (``decays``: every a <= 0, so no factor below exceeds 1; q a multiple
    of ``SUB`` with at least two sub-blocks): for i in sub-block I and j in an earlier sub-block J, with e_J
    the cumsum at the end of J and s_I = e_{I-1} (0 for the first),

        L[i, j] = exp(cs_i - s_I) exp(s_I - e_J) exp(e_J - cs_j)          (u_i K[I, J] v_j)

    so only the diagonal sub-blocks take an exp per entry (q SUB of the q^2 entries), the rest a product."""
    q = cs.shape[-1]
    if not decays or q % SUB or q < 2 * SUB:
        mask = _upper(q, cs.device) if other_doc is None else _upper(q, cs.device) | other_doc
        return (cs[..., :, None] - cs[..., None, :]).masked_fill_(mask, -math.inf).exp_().to(dtype)
    nb = q // SUB
    csb = cs.unflatten(-1, (nb, SUB))  # (..., nb, SUB)
    end = csb[..., -1]
    start = F.pad(end[..., :-1], (1, 0))
    u = (csb - start[..., None]).exp_().to(dtype)  # decay from the start of i's sub-block to i
    v = (end[..., None] - csb).exp_().to(dtype)  # decay from j to the end of j's sub-block
    K = (start[..., :, None] - end[..., None, :]).masked_fill_(_upper(nb, cs.device, 0), -math.inf).exp_()
    L = (u[..., :, :, None, None] * K.to(dtype)[..., :, None, :, None]) * v[..., None, None, :, :]
    diag = (csb[..., :, None] - csb[..., None, :]).masked_fill_(_upper(SUB, cs.device), -math.inf).exp_()
    L.diagonal(dim1=-4, dim2=-2).copy_(diag.movedim(-3, -1))  # (..., nb, SUB, nb, SUB): the sub-blocks
    L = L.view(*cs.shape, q)
    return L if other_doc is None else L.masked_fill_(other_doc, 0.0)


class _Chunks:
    """What the forward and the backward (which recomputes it) need of k consecutive chunks of q steps from
    t0, per head h of group g (hg heads a group):

        dts, cs = cumsum(dt A) in float64 (b, k, g, hg, q);  Bs, Cs (b, k, g, q, n)
        e_in[i] = exp(cs_i)           (the entering state's decay to step i; 0 in a later document)
        E[j] = exp(cs_{q-1} - cs_j)   (step j's decay to the chunk end; 0 in an earlier document), w = E dt

    Two layouts of (b, l, h, p) tensors: position-major ``pm`` (b, k, g, q, hg, p), which the state matmuls
    of a group read as (q, hg p), and head-major (b, k, g, hg, q, p) for the q x q matmuls of each head."""

    def __init__(self, x, dt, A, B, C, seq_idx, decays: bool, t0: int, k: int, q: int):
        b, _, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        hg, ct = h // g, dt.dtype
        self.span = sl = slice(t0, t0 + k * q)
        self.dims = (b, k, g, hg, q, p, n)
        self.xs = self.pm(x).to(ct)
        self.dts = dt[:, sl].view(b, k, q, g, hg).permute(0, 1, 3, 4, 2)
        self.Bs = B[:, sl].to(ct).view(b, k, q, g, n).transpose(2, 3)
        self.Cs = C[:, sl].to(ct).view(b, k, q, g, n).transpose(2, 3)
        cs = (self.dts.double() * A.double().view(g, hg, 1)).cumsum(-1)  # float64: see _decay_matrix
        e_in, E = cs.exp().to(ct), (cs[..., -1:] - cs).exp_().to(ct)
        self.other_doc = None
        if seq_idx is not None:
            seq = seq_idx[:, sl].view(b, k, q)
            # the document of the state entering each chunk: that of the step before it (0 before the first)
            before = torch.arange(k, device=x.device) * q + (t0 - 1)
            prev = torch.where(before >= 0, seq_idx[:, before.clamp(min=0)], 0)  # (b, k)
            zero = e_in.new_zeros(())
            e_in = torch.where((seq == prev[..., None])[:, :, None, None], e_in, zero)
            E = torch.where((seq == seq[..., -1:])[:, :, None, None], E, zero)
            self.other_doc = (seq[..., :, None] != seq[..., None, :])[:, :, None, None]
        self.cs, self.e_in, self.E, self.w, self.decays = cs, e_in, E, E * self.dts, decays
        self.decay = e_in[..., -1]  # (b, k, g, hg): the entering state's decay over the whole chunk

    def pm(self, t: Tensor) -> Tensor:
        """t (b, l, h, p) -> the position-major view (b, k, g, q, hg, p) of these chunks."""
        b, k, g, hg, q, p, _ = self.dims
        return t[:, self.span].view(b, k, q, g, hg, p).transpose(2, 3)

    def per_pm(self, s: Tensor) -> Tensor:
        """A per-step (b, k, g, hg, q) tensor broadcast against the pm layout: (b, k, g, q, hg, 1)."""
        return s.transpose(-1, -2)[..., None]

    def group(self, t: Tensor) -> Tensor:
        """A pm tensor as (b, k, g, q, hg p)."""
        return t.reshape(*t.shape[:4], -1)

    def head_major(self, t: Tensor) -> Tensor:
        """pm (b, k, g, q, hg, p) -> a contiguous head-major (b, k, g, hg, q, p) copy."""
        return t.transpose(3, 4).contiguous()

    def xdt(self) -> Tensor:
        """dt_j x_j, head-major and contiguous (b, k, g, hg, q, p)."""
        b, k, g, hg, q, p, _ = self.dims
        out = self.xs.new_empty((b, k, g, hg, q, p))
        return torch.mul(self.xs.transpose(3, 4), self.dts[..., None], out=out)

    def decay_matrix(self) -> Tensor:
        return _decay_matrix(self.cs, self.other_doc, self.decays, self.dts.dtype)

    def CB(self) -> Tensor:
        """C_i . B_j (b, k, g, 1, q, q), shared by the heads of a group."""
        return torch.matmul(self.Cs, self.Bs.transpose(-1, -2)).unsqueeze(3)


class _SSD(torch.autograd.Function):
    """The chunked SSD scan with a recomputing backward: x (b, l, h, p); dt (b, l, h), already biased,
    softplus'ed and clamped, in the compute dtype; A (h,); B, C (b, l, g, n); D (h, p) or None; z
    (b, l, h, p) or None; h0 (b, h, p, n) or None; ``decays``: every dt A <= 0 (``_decay_matrix``) ->
    (out (b, l, h, p) in x's dtype, final state (b, h, p, n)).

    Saved for the backward: the inputs and the state entering every chunk (b, l / Q, h, p, n); the q x q
    blocks are formed ``GROUP_ELEMENTS`` at a time, in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, h0, seq_idx, chunk_size, decays):
        b, l, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        hg, ct, Q = h // g, dt.dtype, chunk_size
        out = x.new_empty(x.shape)
        H = x.new_empty((b, -(-l // Q), g, hg * p, n), dtype=ct)  # the state entering each chunk
        state = x.new_zeros((b, g, hg * p, n), dtype=ct) if h0 is None else h0.to(ct).reshape(b, g, hg * p, n)
        Dv = None if D is None else D.to(ct).view(g, 1, hg, p)
        for t0, k, q in _spans(l, Q, max(1, GROUP_ELEMENTS // (b * h * Q * Q))):
            c = _Chunks(x, dt, A, B, C, seq_idx, decays, t0, k, q)
            # intra-chunk, per head: y_diag = (L o C B^T) (dt x)
            xdt = c.xdt()
            y_diag = torch.matmul(c.decay_matrix().mul_(c.CB()), xdt)  # (b, k, g, hg, q, p)
            # the state each chunk adds, s = sum_j E_j dt_j x_j B_j^T (a group's heads in one matmul), and the
            # recurrence over the chunks h_c = decay_c h_{c-1} + s_c
            s = torch.matmul(c.group(c.xs * c.per_pm(c.w)).transpose(-1, -2), c.Bs)  # (b, k, g, hg p, n)
            c0 = t0 // Q
            for i in range(k):
                H[:, c0 + i] = state
                state = c.decay[:, i, :, :, None].repeat_interleave(p, -2) * state + s[:, i]
            # the entering state's output y_off[i] = e_in[i] h_in C_i, then y = y_diag + y_off + D x
            y = torch.matmul(c.Cs, H[:, c0:c0 + k].transpose(-1, -2)).view(b, k, g, q, hg, p)
            y.mul_(c.per_pm(c.e_in)).add_(y_diag.transpose(3, 4))
            if Dv is not None:
                y.addcmul_(c.xs, Dv)
            if z is not None:
                y.mul_(F.silu(c.pm(z).to(ct)))
            c.pm(out).copy_(y)
        ctx.save_for_backward(x, dt, A, B, C, D, z, h0, seq_idx, H)
        ctx.chunk_size, ctx.decays = Q, decays
        return out, state.view(b, h, p, n)

    @staticmethod
    @single_backward("mamba_chunk_scan_combined",
                     "use mamba_chunk_scan_ref (plain autograd) for higher derivatives")
    def backward(ctx, gout, gstate):
        x, dt, A, B, C, D, z, h0, seq_idx, H = ctx.saved_tensors
        b, l, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        hg, ct, Q = h // g, dt.dtype, ctx.chunk_size
        gx, gdt, gB, gC = (t.new_empty(t.shape, dtype=ct) for t in (x, dt, B, C))
        gz = None if z is None else z.new_empty(z.shape, dtype=ct)
        gA = A.new_zeros((g, hg), dtype=ct)
        gD = None if D is None else D.new_zeros((g, hg, p), dtype=ct)
        Dv = None if D is None else D.to(ct).view(g, 1, hg, p)
        dstate = gstate.to(ct).reshape(b, g, hg * p, n)  # d loss / d (the state after the current chunk)
        for t0, k, q in reversed(_spans(l, Q, max(1, GROUP_ELEMENTS // (b * h * Q * Q)))):
            c = _Chunks(x, dt, A, B, C, seq_idx, ctx.decays, t0, k, q)
            Hc = H[:, t0 // Q:t0 // Q + k]  # (b, k, g, hg p, n)
            xdt = c.xdt()
            L = c.decay_matrix()
            CB = c.CB()
            M = L * CB
            y_in = torch.matmul(c.Cs, Hc.transpose(-1, -2)).view(b, k, g, q, hg, p)  # h_in C_i, before e_in
            dy = c.pm(gout).to(ct)
            y_diag = None
            if z is not None:  # out = y * silu(z) with y = y_diag + e_in y_in + D x
                y_diag = torch.matmul(M, xdt)
                y = y_in * c.per_pm(c.e_in) + y_diag.transpose(3, 4)
                if Dv is not None:
                    y.addcmul_(c.xs, Dv)
                zc = c.pm(z).to(ct)
                sig = torch.sigmoid(zc)
                c.pm(gz).copy_(dy * y * sig * (1 + zc * (1 - sig)))
                dy = dy * zc * sig
            if Dv is not None:
                gD += (dy * c.xs).sum((0, 1, 3))
            # y_off = e_in (h_in C): d h_in += sum_i e_in[i] dy_i C_i^T, dC_i += e_in[i] h_in^T dy_i,
            # d cs_i += e_in[i] dy_i . (h_in C_i)
            dye = (dy * c.per_pm(c.e_in)).reshape(b, k, g, q, hg * p)
            g_in = torch.matmul(dye.transpose(-1, -2), c.Cs)  # (b, k, g, hg p, n)
            gCc = torch.matmul(dye, Hc)  # (b, k, g, q, n), summed over the group's heads
            gcs = (dy * y_in).sum(-1).transpose(-1, -2).mul_(c.e_in)  # (b, k, g, hg, q)
            # the recurrence backwards: d s_c = d h_c, d h_{c-1} = decay_c d h_c + g_in_c
            ds = torch.empty_like(g_in)
            gdecay = c.decay.new_empty(c.decay.shape)
            for i in reversed(range(k)):
                ds[:, i] = dstate
                gdecay[:, i] = (dstate * Hc[:, i]).view(b, g, hg, -1).sum(-1)
                dstate = c.decay[:, i, :, :, None].repeat_interleave(p, -2) * dstate + g_in[:, i]
            gcs[..., -1] += gdecay * c.decay
            # s = sum_j E_j xdt_j B_j^T: d(E_j xdt_j) = ds B_j, dB_j += ds^T (E_j xdt_j), d cs via E
            dxw = torch.matmul(c.Bs, ds.transpose(-1, -2)).view(b, k, g, q, hg, p)
            gE = (dxw * c.xs).sum(-1).transpose(-1, -2).mul_(c.w)  # d loss / d log E_j
            gcs[..., -1] += gE.sum(-1)
            gcs -= gE
            gBc = torch.matmul(c.group(c.xs * c.per_pm(c.w)), ds)  # (b, k, g, q, n)
            gxdt = dxw.mul_(c.per_pm(c.E))  # pm
            # intra-chunk, y_diag = M xdt with M = L o (C B^T): d xdt += M^T dy, dM = dy xdt^T,
            # d(C B^T) = sum_h dM o L, and d cs from L: rowsum(dM o M) - colsum(dM o M), where
            # rowsum = dy . y_diag and colsum = xdt . (M^T dy)
            dy_hm = c.head_major(dy)
            mt_dy = torch.matmul(M.transpose(-1, -2), dy_hm)  # (b, k, g, hg, q, p)
            dM = torch.matmul(dy_hm, xdt.transpose(-1, -2))
            rows = (dM * M).sum(-1) if y_diag is None else (dy_hm * y_diag).sum(-1)
            gcs += rows - (xdt * mt_dy).sum(-1)
            dCB = dM.mul_(L).sum(3)  # (b, k, g, q, q)
            gCc += torch.matmul(dCB, c.Bs)
            gBc += torch.matmul(dCB.transpose(-1, -2), c.Cs)
            # cs = cumsum(dt A); xdt = x dt
            gxdt += mt_dy.transpose(3, 4)
            ga = gcs.flip(-1).cumsum(-1).flip(-1)
            gA += (ga * c.dts).sum((0, 1, 4))
            gdt_c = ga.mul_(A.view(g, hg, 1)) + (gxdt * c.xs).sum(-1).transpose(-1, -2)  # (b, k, g, hg, q)
            gx_c = gxdt.mul_(c.per_pm(c.dts))
            if Dv is not None:
                gx_c.addcmul_(dy, Dv)
            c.pm(gx).copy_(gx_c)
            gdt[:, c.span].view(b, k, q, g, hg).copy_(gdt_c.permute(0, 1, 4, 2, 3))
            gB[:, c.span].view(b, k, q, g, n).copy_(gBc.transpose(2, 3))
            gC[:, c.span].view(b, k, q, g, n).copy_(gCc.transpose(2, 3))
        gD = None if D is None else gD.reshape(h, p)
        gh0 = None if h0 is None else dstate.reshape(b, h, p, n)
        return gx, gdt, gA.reshape(h), gB, gC, gD, gz, gh0, None, None, None


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, *, backend="auto"):
    """SSD scan with mamba_ssm's signature: y_t = h_t C_t + D x_t, h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,
    out = y * silu(z), by the chunked state-space-duality algorithm (module docstring).

    Args:
        x: (b, l, h, p).  dt: (b, l, h), before ``dt_bias``, softplus and the clamp to ``dt_limit``.
        A: (h,).  B, C: (b, l, g, n), g dividing h.  chunk_size: Q >= 1 (any l, not only multiples).
        D: (h, p) or (h,).  z: (b, l, h, p).  dt_bias: (h,).  initial_states: (b, h, p, n).
        seq_idx: (b, l) integer document index, non-decreasing along each row (the state resets per
            document; ``initial_states`` belongs to document 0).
        dt_softplus: softplus on dt.  dt_limit: (lo, hi) clamp of dt.
        return_final_states: also return the state after the last step.
        backend: ``"auto"`` (``"torch"`` for now), ``"torch"`` or ``"triton"``: the forward as Triton kernels
            (``ssm.ops.ssd_triton``; CUDA tensors), forward only: ``ValueError`` when grad mode is on and an
            input requires grad (run inference under ``torch.no_grad()``).

    Returns:
        out (b, l, h, p) in x's dtype, or (out, final_states (b, h, p, n), float32 or float64).
    """
    _check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
                return_final_states)
    route = resolve_backend("ssd", backend, x.device)
    if route == "triton" and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias, initial_states)):
        if backend == "triton":
            raise ValueError("backend 'triton' of mamba_chunk_scan_combined is forward-only (no backward): "
                             "call it under torch.no_grad() or use backend='torch' for training")
        route = "torch"
    ct = _compute_dtype(x, dt, A, B, C, initial_states)
    if route == "triton":
        from .ssd_triton import ssd_forward_triton

        out, last = ssd_forward_triton(
            x.to(ct), _dt(dt, dt_bias, dt_softplus, dt_limit, ct), A.to(ct), B.to(ct), C.to(ct), chunk_size,
            D, z, initial_states, seq_idx)
        out = out.to(x.dtype)
        return (out, last) if return_final_states else out
    h, p = x.shape[2], x.shape[3]
    if D is not None and D.ndim == 1:
        D = D[:, None].expand(h, p)
    # every dt A <= 0 (dt >= 0 after the clamp, A <= 0, as in Mamba-2): the decay matrix may be factored
    decays = float(dt_limit[0]) >= 0 and bool((A <= 0).all())
    # a sequence shorter than a chunk takes one chunk of its length rounded up to SUB (the result does not
    # depend on the chunking; a chunk of 256 for 128 steps would cost 4x the Q x Q work)
    Q = min(int(chunk_size), -(-x.shape[1] // SUB) * SUB)
    out, state = _SSD.apply(x, _dt(dt, dt_bias, dt_softplus, dt_limit, ct), A.to(ct), B, C, D, z,
                            initial_states, seq_idx, Q, decays)
    return (out, state) if return_final_states else out
