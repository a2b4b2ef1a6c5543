"""The selective family (Mamba, Mamba-2): pure functions of input-dependent systems, no parameters.

Shapes: Bt batch, L length, D channels (d_inner), N state size, G groups of B and C, H heads, P head size
(D = H P). Mamba (Gu & Dao 2023, §3.5 and appendix): per channel d and state n,

    dA_t = exp(delta_t A),   dB_t = delta_t B_t                 (ZOH on A, Euler on B)
    h_t = dA_t h_{t-1} + dB_t x_t,   y_t = C_t h_t + D x_t,   out_t = y_t * silu(z_t)

with A (D, N) and delta_t = softplus(delta_t + delta_bias) when ``delta_softplus``. Mamba-2 (Dao & Gu
2024) shares a scalar A_h per head and a (P, N) state per head; its dt is clamped to ``dt_limit``.

The verbs: ``discretize``, ``step`` (one token), ``scan`` (the parallel path: ``ssm.ops.selective_scan``),
``final_state``; the head variants ``step_heads`` and ``scan_heads`` (``ssm.ops.ssd``). A scan family has
no kernel or transfer function (``TIER = "scan"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_tensor
from ..ops.scan import step_scan
from ..ops.selective_scan import selective_scan_fn
from ..ops.ssd import mamba_chunk_scan_combined

__all__ = ["TIER", "discretize", "step", "scan", "final_state", "step_heads", "scan_heads", "scan_loop",
           "scan_heads_loop"]

TIER = "scan"


def discretize(delta: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """dA = exp(delta A), dB = delta B (ZOH on A, Euler on B: Mamba §3.5).

    Args:
        delta: (...) time steps, e.g. (Bt, D) for one token or (Bt, L, D) for a sequence.
        A: broadcastable against delta[..., None], e.g. (D, N).
        B: broadcastable against delta[..., None], e.g. (Bt, 1, N) or (D, N).

    Returns:
        dA, dB, each of the broadcast shape of delta[..., None] with A (resp. B).
    """
    d = delta.unsqueeze(-1)
    return torch.exp(d * A), d * B


def _prep_delta(delta: Tensor, bias: Tensor | None, softplus: bool) -> Tensor:
    if bias is not None:
        delta = delta + bias
    return F.softplus(delta) if softplus else delta


def _per_channel(M: Tensor, dim: int, name: str) -> Tensor:
    """B_t or C_t (Bt, N) or (Bt, G, N) -> (Bt, D, N) by channel groups."""
    check_tensor(name, M, (2, 3))
    if M.ndim == 2:
        return M.unsqueeze(1)
    if dim % M.shape[1]:
        raise ValueError(f"{name} (Bt, G, N) needs G dividing D = {dim}; got G = {M.shape[1]}")
    return M.repeat_interleave(dim // M.shape[1], dim=1)


def step(state: Tensor, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
         z: Tensor | None = None, *, delta_bias: Tensor | None = None, delta_softplus: bool = False
         ) -> tuple[Tensor, Tensor]:
    """One token: h = exp(delta A) h + delta B x, y = C h + D x (times silu(z)).

    Args:
        state: (Bt, D, N).  x, delta, z: (Bt, D).  A: (D, N).  B, C: (Bt, N) or (Bt, G, N).  D: (D,).
        delta_bias: (D,).  delta_softplus: softplus on delta + delta_bias.

    Returns:
        y (Bt, D) in x's dtype, new state (Bt, D, N) in the state's dtype (float32 at least).
    """
    check_tensor("state", state, 3)
    check_tensor("x", x, 2)
    ct = torch.promote_types(state.dtype, torch.float32)
    dim = x.shape[1]
    delta = _prep_delta(check_tensor("delta", delta, 2).to(ct), None if delta_bias is None
                        else delta_bias.to(ct), delta_softplus)
    dA, dB = discretize(delta, A.to(ct), _per_channel(B, dim, "B").to(ct))
    new = dA * state.to(ct) + dB * x.to(ct).unsqueeze(-1)
    y = (new * _per_channel(C, dim, "C").to(ct)).sum(-1)
    if D is not None:
        y = y + D.to(ct) * x.to(ct)
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(x.dtype), new


def scan(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
         z: Tensor | None = None, *, delta_bias: Tensor | None = None, delta_softplus: bool = False,
         initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The whole sequence by ``selective_scan_fn``: x, delta, z (Bt, D, L); A (D, N); B, C (D, N),
    (Bt, N, L) or (Bt, G, N, L); D, delta_bias (D,); initial_state (Bt, D, N).

    Returns:
        y (Bt, D, L) in x's dtype, final state (Bt, D, N) (float32 at least).
    """
    return selective_scan_fn(x, delta, A, B, C, D, z, delta_bias, delta_softplus, True,
                             initial_state=initial_state)


def final_state(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, *, delta_bias: Tensor | None = None,
                delta_softplus: bool = False, initial_state: Tensor | None = None) -> Tensor:
    """The state after the last position, h_L = sum_t (prod_{s>t} dA_s) dB_t x_t + (prod_s dA_s) h_0,
    without forming y: x, delta (Bt, D, L); A (D, N); B (D, N), (Bt, N, L) or (Bt, G, N, L).

    The decay from t to the end is exp(A sum_{s>t} delta_s) (a reversed cumsum of delta, one exponential
    per (t, n) and no division), contracted with dB_t x_t over t; (Bt, D, N) out, float32 at least.
    """
    check_tensor("x", x, 3)
    check_tensor("delta", delta, 3)
    check_tensor("A", A, 2)
    ct = torch.promote_types(torch.promote_types(x.dtype, torch.float32), A.dtype)
    bias = None if delta_bias is None else delta_bias.to(ct)[:, None]
    delta = _prep_delta(delta.to(ct), bias, delta_softplus)  # (Bt, D, L)
    Bt, dim, L = x.shape
    # after[t] = delta_{t+1} + ... + delta_{L-1}, summed from the end (exact, no cancellation)
    after = F.pad(delta.flip(-1).cumsum(-1), (1, 0))[..., :-1].flip(-1)
    Ac = A.to(ct)
    if B.ndim == 2:
        Bx = None
    else:
        check_tensor("B", B, (3, 4))
        Bg = B.unsqueeze(1) if B.ndim == 3 else B
        if dim % Bg.shape[1]:
            raise ValueError(f"B (Bt, G, N, L) needs G dividing D = {dim}; got G = {Bg.shape[1]}")
        Bx = Bg.to(ct).repeat_interleave(dim // Bg.shape[1], dim=1)  # (Bt, D, N, L)
    dxu = delta * x.to(ct)  # (Bt, D, L)
    # decay (Bt, D, N, L) one chunk of t at a time: memory O(Bt D N chunk)
    out = torch.zeros(Bt, dim, A.shape[1], dtype=ct, device=x.device)
    chunk = 256
    for t0 in range(0, L, chunk):
        sl = slice(t0, min(t0 + chunk, L))
        w = torch.exp(after[:, :, None, sl] * Ac[:, :, None]) * dxu[:, :, None, sl]
        out = out + ((w * Bx[..., sl]).sum(-1) if Bx is not None else w.sum(-1) * B.to(ct))
    if initial_state is not None:
        out = out + torch.exp(delta.sum(-1, keepdim=True) * Ac) * initial_state.to(ct)
    return out


def step_heads(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
               z: Tensor | None = None, *, dt_bias: Tensor | None = None, dt_softplus: bool = False,
               dt_limit: tuple[float, float] = (0.0, float("inf"))) -> tuple[Tensor, Tensor]:
    """One token of Mamba-2: h = exp(dt A) h + dt x B^T, y = h C + D x (times silu(z)).

    Args:
        state: (Bt, H, P, N).  x, z: (Bt, H, P).  dt: (Bt, H).  A: (H,).  B, C: (Bt, G, N), G dividing H.
        D: (H, P) or (H,).  dt_bias: (H,).  dt is softplus'ed if ``dt_softplus``, then clamped to dt_limit.

    Returns:
        y (Bt, H, P) in x's dtype, new state (Bt, H, P, N) (float32 at least).
    """
    check_tensor("state", state, 4)
    check_tensor("x", x, 3)
    check_tensor("dt", dt, 2)
    heads = x.shape[1]
    for name, M in (("B", B), ("C", C)):
        if check_tensor(name, M, 3).shape[1] < 1 or heads % M.shape[1]:
            raise ValueError(f"{name} (Bt, G, N) needs G dividing H = {heads}; got shape {tuple(M.shape)}")
    ct = torch.promote_types(state.dtype, torch.float32)
    dt = _prep_delta(dt.to(ct), None if dt_bias is None else dt_bias.to(ct), dt_softplus)
    dt = dt.clamp(min=float(dt_limit[0]), max=float(dt_limit[1]))
    Bh = B.to(ct).repeat_interleave(heads // B.shape[1], dim=1)  # (Bt, H, N)
    Ch = C.to(ct).repeat_interleave(heads // C.shape[1], dim=1)
    xc = x.to(ct)
    decay = torch.exp(dt * A.to(ct))[..., None, None]  # (Bt, H, 1, 1)
    new = decay * state.to(ct) + (dt[..., None] * xc)[..., None] * Bh[:, :, None]
    y = (new * Ch[:, :, None]).sum(-1)
    if D is not None:
        Dc = D.to(ct)
        y = y + xc * (Dc[:, None] if Dc.ndim == 1 else Dc)
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(x.dtype), new


def scan_heads(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
               D: Tensor | None = None, z: Tensor | None = None, *, dt_bias: Tensor | None = None,
               dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, float("inf")),
               initial_states: Tensor | None = None, seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The whole sequence of Mamba-2 by ``mamba_chunk_scan_combined``: x, z (Bt, L, H, P); dt (Bt, L, H);
    A (H,); B, C (Bt, L, G, N); D (H, P) or (H,); initial_states (Bt, H, P, N); seq_idx (Bt, L).

    Returns:
        y (Bt, L, H, P) in x's dtype, final states (Bt, H, P, N) (float32 at least).
    """
    return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                                     dt_softplus, dt_limit, return_final_states=True)


# ---- the real route (ONNX export; docs/deployment.md): the recurrence as one loop operator ----------------


def _time_major(M: Tensor) -> Tensor:
    """(Bt, ..., L) -> (L, Bt, ...)."""
    return M.movedim(-1, 0)


def scan_loop(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
              z: Tensor | None = None, *, delta_bias: Tensor | None = None, delta_softplus: bool = False,
              initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``scan`` as ``step`` repeated by one loop operator (``ssm.ops.scan.step_scan``): the same arguments
    and results, B and C per token (Bt, N, L) or (Bt, G, N, L). A traced length stays dynamic (ONNX
    ``Scan``); the export route of Mamba, not its fast path."""
    check_tensor("x", x, 3)
    if B.ndim == 2 or C.ndim == 2:
        raise ValueError("scan_loop takes B and C per token, (Bt, N, L) or (Bt, G, N, L)")
    ct = torch.promote_types(torch.promote_types(x.dtype, torch.float32), A.dtype)
    h0 = (x.new_zeros(x.shape[0], x.shape[1], A.shape[1], dtype=ct) if initial_state is None
          else initial_state.to(ct))
    Bm, Cm = _time_major(B), _time_major(C)  # (L, Bt, N) or (L, Bt, G, N), as ``step`` reads them

    def body(h, inputs):
        x_t, d_t, B_t, C_t, z_t = inputs
        y, h = step(h, x_t, d_t, A, B_t, C_t, D, z_t if z is not None else None, delta_bias=delta_bias,
                    delta_softplus=delta_softplus)
        return h.contiguous(), y

    zs = _time_major(z) if z is not None else _time_major(x)  # (an unused stand-in without z)
    h, ys = step_scan(body, h0, (_time_major(x), _time_major(delta), Bm, Cm, zs))
    return ys.movedim(0, -1), h


def scan_heads_loop(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                    D: Tensor | None = None, z: Tensor | None = None, *, dt_bias: Tensor | None = None,
                    dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, float("inf")),
                    initial_states: Tensor | None = None, seq_idx: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    """``scan_heads`` as ``step_heads`` repeated by one loop operator (``ssm.ops.scan.step_scan``): the
    same arguments and results (``chunk_size`` unused; no ``seq_idx``). The export route of Mamba-2."""
    if seq_idx is not None:
        raise ValueError("scan_heads_loop does not take seq_idx (packed documents are not on the export "
                         "route)")
    check_tensor("x", x, 4)
    Bt, _, H, P = x.shape
    ct = torch.promote_types(torch.promote_types(x.dtype, torch.float32), A.dtype)
    h0 = (x.new_zeros(Bt, H, P, B.shape[-1], dtype=ct) if initial_states is None
          else initial_states.to(ct))

    def body(h, inputs):
        x_t, dt_t, B_t, C_t, z_t = inputs
        y, h = step_heads(h, x_t, dt_t, A, B_t, C_t, D, z_t if z is not None else None, dt_bias=dt_bias,
                          dt_softplus=dt_softplus, dt_limit=dt_limit)
        return h.contiguous(), y

    tm = [t.transpose(0, 1) for t in (x, dt, B, C, z if z is not None else x)]  # (L, Bt, ...)
    h, ys = step_scan(body, h0, tuple(tm))
    return ys.transpose(0, 1), h

