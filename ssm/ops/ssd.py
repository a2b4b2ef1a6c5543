"""State-space duality (SSD), the scan of Mamba-2 (Dao & Gu 2024), with mamba_ssm's signature.

Per head h (scalar A_h) and group g(h) = h // (H / G) of the B and C projections, with state (P, N):

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T                  (x_t (P,), B_t, C_t (N,))
    y_t = h_t C_t + D x_t,        out_t = y_t * silu(z_t)

where dt_t = clamp(softplus(dt_t + dt_bias), *dt_limit) (softplus when ``dt_softplus``; the clamp always,
as mamba_ssm). Shapes (mamba_ssm's): x, z (b, l, h, p); dt (b, l, h); A (h,); B, C (b, l, g, n);
D (h, p) or (h,); states (b, h, p, n). ``seq_idx`` (b, l) numbers packed documents (non-decreasing along a
row): the state is zero at the start of every document, and ``initial_states`` belongs to document 0 (the
state resets where seq_idx[t] != seq_idx[t - 1], with seq_idx[-1] = 0, as mamba_ssm's kernels do).

``mamba_chunk_scan_combined`` splits l into chunks of Q = ``chunk_size`` (the last one padded by steps of
zero dt: decay 1, no input) and, with a_t = dt_t A and the segment sums S[i, j] = a_{j+1} + ... + a_i
(-inf for j > i or across documents; summed per segment, never as a difference of cumsums):

    y_diag[i] = sum_{j <= i} (C_i . B_j) exp(S[i, j]) dt_j x_j           (intra-chunk: matmuls, Q x Q)
    s_c       = sum_j exp(S[Q-1, j]) dt_j x_j B_j^T                        (state a chunk adds)
    h_c       = exp(a_0 + ... + a_{Q-1}) h_{c-1} + s_c                     (inter-chunk recurrence)
    y_off[i]  = exp(a_0 + ... + a_i) h_{c-1} C_i                          (the state entering the chunk)

Plain autograd; memory O(b h l Q + b h p n l / Q), never a (b, l, h, p, n) tensor. ``mamba_chunk_scan_ref``
is the sequential twin with the same signature. ``backend="triton"`` runs the same algorithm as Triton
kernels (``ssm.ops.ssd_triton``), forward only: for inference, with no input that requires grad.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_bool, check_choice, check_int, check_tensor

__all__ = ["mamba_chunk_scan_combined", "mamba_chunk_scan_ref", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")
#: Whether ``"auto"`` picks the Triton forward for CUDA tensors (off until it has run on a GPU).
AUTO_TRITON = False
_TRITON_INSTALL = "pip install triton  (or: pip install 'ssm-layers[triton]')"


def _resolve_backend(backend: str, device: torch.device) -> str:
    """``"torch"`` or ``"triton"`` for ``backend`` (one of ``BACKENDS``) and tensors on ``device``; the same
    rules and errors as ``ssm.ops.selective_scan.resolve_scan_backend`` (to be replaced by the package's one
    resolver). ``"auto"`` is ``"torch"`` until the kernels have run on a GPU (``AUTO_TRITON``)."""
    from . import ssd_triton

    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        use = AUTO_TRITON and device.type == "cuda" and ssd_triton.available()
        return "triton" if use else "torch"
    if backend == "triton":
        if not ssd_triton.accepts(device):
            raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1); got tensors on "
                             f"{device.type!r}")
        if not ssd_triton.available():
            raise ImportError(f"backend 'triton' needs the triton package: {_TRITON_INSTALL}")
    return backend


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


def _decay_t(a: Tensor, invalid: Tensor | None = None) -> Tensor:
    """E[..., j, i] = exp(S[i, j]) = exp(a[..., j+1] + ... + a[..., i]) for j <= i, else 0; a (..., Q).

    The transpose of exp(S): each segment is summed (a masked cumsum along the contiguous last axis), not
    taken as cumsum[i] - cumsum[j], which cancels catastrophically when the cumsums are large; ``invalid``
    (..., Q, Q) in the same (j, i) layout zeroes more pairs (other documents)."""
    Q = a.shape[-1]
    later = torch.ones(Q, Q, dtype=torch.bool, device=a.device).triu(1)  # k > j
    T = torch.where(later, a.unsqueeze(-2), a.new_zeros(())).cumsum(-1)  # sum over j < k <= i
    before = ~torch.ones_like(later).triu()  # i < j
    return T.masked_fill_(before if invalid is None else before | invalid, -math.inf).exp_()


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
    route = _resolve_backend(backend, x.device)
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
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hg = h // g
    Q = int(chunk_size)
    nc = -(-l // Q)
    pad = nc * Q - l
    dtc = F.pad(_dt(dt, dt_bias, dt_softplus, dt_limit, ct), (0, 0, 0, pad))  # zero dt: decay 1, no input
    X = F.pad(x.to(ct), (0, 0, 0, 0, 0, pad)).view(b, nc, Q, g, hg, p)
    Bc = F.pad(B.to(ct), (0, 0, 0, 0, 0, pad)).view(b, nc, Q, g, n)
    Cc = F.pad(C.to(ct), (0, 0, 0, 0, 0, pad)).view(b, nc, Q, g, n)
    dtc = dtc.view(b, nc, Q, g, hg).permute(0, 1, 3, 4, 2)  # (b, c, g, hg, Q)
    a = dtc * A.to(ct).view(g, hg, 1)
    invalid = same_prev = None
    if seq_idx is not None:
        seq = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1).view(b, nc, Q)
        invalid = (seq[:, :, :, None] != seq[:, :, None, :])[:, :, None, None]  # (b, c, 1, 1, Q, Q)
        # the document of the state entering each chunk: that of the previous chunk's end (0 before the first)
        prev = F.pad(seq[:, :-1, -1], (1, 0))  # (b, c)
        same_prev = seq == prev[:, :, None]  # (b, c, Q): positions that see the entering state
    E = _decay_t(a, invalid)  # (b, c, g, hg, Q, Q): E[j, i] = exp(S[i, j])
    Xt = X.permute(0, 1, 3, 4, 2, 5).contiguous()  # (b, c, g, hg, Q, p)
    # intra-chunk: y_diag = ((C B^T) * exp(S) * dt_j) x, built transposed: W^T[j, i] = B_j . C_i E[j, i] dt_j
    BC = torch.matmul(Bc.transpose(2, 3), Cc.permute(0, 1, 3, 4, 2)).unsqueeze(3)  # (b, c, g, 1, Q, Q)
    Wt = BC * E * dtc.unsqueeze(-1)
    Y = torch.matmul(Wt.transpose(-1, -2), Xt)  # (b, c, g, hg, Q, p)
    # the state each chunk adds: s_c = sum_j exp(S[Q-1, j]) dt_j x_j B_j^T
    w_end = E[..., :, -1] * dtc  # (b, c, g, hg, Q)
    s = torch.matmul((Xt * w_end.unsqueeze(-1)).transpose(-1, -2), Bc.transpose(2, 3).unsqueeze(3))
    # inter-chunk recurrence over c: h_c = exp(sum of the chunk's a) h_{c-1} + s_c
    decay = torch.exp(a.sum(-1))  # (b, c, g, hg)
    if seq_idx is not None:
        decay = decay * same_prev[:, :, -1, None, None].to(ct)
    state = x.new_zeros((b, g, hg, p, n), dtype=ct) if initial_states is None else (
        initial_states.to(ct).view(b, g, hg, p, n))
    entering = []
    for c in range(nc):
        entering.append(state)
        state = decay[:, c, :, :, None, None] * state + s[:, c]
    H = torch.stack(entering, dim=1)  # (b, c, g, hg, p, n)
    # the entering state's output: y_off[i] = exp(a_0 + ... + a_i) h_{c-1} C_i
    w_in = torch.exp(a.cumsum(-1))  # (b, c, g, hg, Q)
    if seq_idx is not None:
        w_in = w_in * same_prev[:, :, None, None].to(ct)
    Y = Y + torch.matmul(Cc.transpose(2, 3).unsqueeze(3), H.transpose(-1, -2)) * w_in.unsqueeze(-1)
    y = Y.permute(0, 1, 4, 2, 3, 5).reshape(b, nc * Q, h, p)[:, :l]
    out = _gate(y, x, D, z)
    return (out, state.reshape(b, h, p, n)) if return_final_states else out
