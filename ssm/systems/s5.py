"""The S5 family: one MIMO diagonal system shared by all H features, run by a parallel scan.

Smith, Warrington, Linderman, "Simplified State Space Layers for Sequence Modeling" (ICLR 2023). With Q
stored complex states (Q = P/2 under conjugate symmetry, else P), A = diag(Lambda) (Q,), B (Q, H),
C (Ch, H, Q) and one timescale dt per state (Q,), the discrete system is

    x_k = Ab x_{k-1} + Bb u_k,        y_k = f Re(C x_k)        (u_k, y_k in R^H; x_k in C^Q),

with f = 2 when ``conj_sym`` (the stored half stands for the full P states with its conjugates appended)
and f = 1 otherwise; the D skip is the layer's. Discretization is elementwise (``ssm.discretize``):

    zoh        Ab = exp(dt Lambda),                          Bb = dt phi1(dt Lambda) B = (Ab - 1) / Lambda B
    bilinear   Ab = (1 + dt Lambda / 2) / (1 - dt Lambda / 2),  Bb = dt / (1 - dt Lambda / 2) B

The fast path is ``scan``: the recurrence x_k = a x_{k-1} + b_k (a = Ab elementwise, b_k = Bb u_k) by
Blelloch's work-efficient parallel scan over a chunk of T steps (2 log2 T strided passes, depth O(log T),
work O(Q T)), the state carried from chunk to chunk, in a custom autograd.Function whose backward
recomputes each chunk's states and runs the adjoint recurrence lambda_k = g_k + conj(a) lambda_{k+1} by the
same scan backwards in time; so memory is O(B Q T + B H L), never (B, L, Q) beyond one chunk, and autograd
keeps only the chunk-boundary states. The projections B u and C x are real matrix products on [Re, Im]
pairs. (Why Blelloch, and the chunk length: docs/s5.md, measured.)

The other verbs (``kernel``, ``step``, ``free_response``, ``final_state``) exist for tests and conversions.
A MIMO system's kernel is an (H, H, L) transfer matrix per channel: ``kernel`` is not the fast path.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_shape, check_tensor, single_backward
from ..discretize import discretize_diag

#: The family's tier (``ssm.systems``): linear time-invariant, so it adds kernel and free_response.
TIER = "lti"

S5_DISCS = ("zoh", "bilinear")
#: Complex elements of one chunk's states (B * T * Q) that ``default_chunk`` aims at (32 MiB in complex64).
CHUNK_ELEMENTS = 1 << 22


class S5System(NamedTuple):
    """A discrete S5 system (what ``ssm.S5.discrete_system`` returns).

    Fields:
        Lambda: (Q,) complex continuous eigenvalues; B: (Q, H) complex; C: (Ch, H, Q) complex, Ch = 1, or
            2 for a bidirectional layer (forward-in-time channel first); dt: (Q,) positive real.
        disc: ``"zoh"`` or ``"bilinear"``; conj_sym: the Q states are one half of conjugate pairs (output
            2 Re(C x)).
        Ab: (Q,) discrete eigenvalues; Bb: (Q, H) discrete input matrix.
    """

    Lambda: Tensor
    B: Tensor
    C: Tensor
    dt: Tensor
    disc: str
    conj_sym: bool
    Ab: Tensor
    Bb: Tensor

    @property
    def factor(self) -> float:
        """f in y = f Re(C x): 2 under conjugate symmetry, else 1."""
        return 2.0 if self.conj_sym else 1.0


def discretize(
    Lambda: Tensor, B: Tensor, C: Tensor, dt: Tensor, disc: str = "zoh", *, conj_sym: bool = True
) -> S5System:
    """Elementwise zoh / bilinear discretization (``ssm.discretize.discretize_diag``) with a step per state.

    Args:
        Lambda: (Q,) complex. B: (Q, H). C: (Ch, H, Q) or (H, Q). dt: (Q,) positive real.
        disc: ``"zoh"`` or ``"bilinear"``. conj_sym: the states stand for conjugate pairs (output 2 Re).
    """
    check_choice("disc", disc, S5_DISCS)
    if not isinstance(conj_sym, bool):
        raise ValueError(f"conj_sym must be a bool; got {conj_sym!r}")
    check_tensor("Lambda", Lambda, ndim=1)
    Q = Lambda.shape[0]
    check_tensor("B", B, ndim=2)
    check_shape("B", B, (Q, None), "(Q, H) with Q like Lambda")
    H = B.shape[1]
    check_tensor("C", C, ndim=(2, 3))
    if C.ndim == 2:
        C = C.unsqueeze(0)
    check_shape("C", C, (None, H, Q), "(Ch, H, Q) with H like B and Q like Lambda")
    check_tensor("dt", dt, ndim=1)
    check_shape("dt", dt, (Q,), "(Q,): one step per state")
    scale = torch.ones_like(Lambda if Lambda.is_complex() else Lambda.to(torch.complex64))[:, None]
    Ab, Bscale = discretize_diag(Lambda[:, None], scale, dt, disc)  # (Q, 1) each
    Bb = Bscale * B.to(Bscale.dtype)
    return S5System(Lambda, B, C, dt, disc, conj_sym, Ab[:, 0], Bb)


# ---- the parallel scan (the fast path) --------------------------------------------------------------------


def powers(a: Tensor, n: int) -> Tensor:
    """a^(k+1) for k < n by doubling: a (Q,) -> (n, Q); the rounding error grows like log2(n), not n."""
    pw = a.unsqueeze(0)
    while pw.shape[0] < n:
        pw = torch.cat([pw, pw * pw[-1]], dim=0)
    return pw[:n]


def default_chunk(batch: int, states: int, L: int) -> int:
    """Chunk length T of ``scan``: the largest power of two with B T Q <= ``CHUNK_ELEMENTS`` (at least 64),
    capped at L."""
    t = max(64, 1 << max(0, int(math.log2(max(1, CHUNK_ELEMENTS // max(1, batch * states))))))
    return max(1, min(L, t))


def _scan_(v: Tensor, pw: Tensor, reverse: bool = False) -> Tensor:
    """In place, along dim 1: v[t] <- sum_{s <= t} a^(t - s) v[s] (``reverse``: s >= t, a^(s - t)), by
    Blelloch's work-efficient scan.

    v (B, n, Q) complex, pw (>= n - 1, Q) with pw[d - 1] = a^d. The pairs (a^d, b) compose as
    (a^d, b_1) then (a^d, b_2) -> (a^(2d), a^d b_1 + b_2), and a is the same at every step, so only the b
    half is stored. Up-sweep: at d = 1, 2, 4, ..., position 2d i + 2d - 1 accumulates the block of 2d ending
    there; down-sweep: at d = ..., 2, 1, position 2d i + 3d - 1 adds the (now complete) prefix at
    2d i + 2d - 1. 2 log2(n) strided passes, work O(Q n); any n (the slices stop at n). ``reverse`` runs
    the same passes on the mirrored positions n - 1 - t (no copy).
    """
    n, d = v.shape[1], 1
    while d < n:
        if reverse:  # targets n - 2d - 2d i >= 0, sources d later
            r = (n - 2 * d) % (2 * d)
            v[:, r : n - 2 * d + 1 : 2 * d] += pw[d - 1] * v[:, r + d : n - d + 1 : 2 * d]
        else:
            v[:, 2 * d - 1 :: 2 * d] += pw[d - 1] * v[:, d - 1 : n - d : 2 * d]
        d *= 2
    d //= 2
    while d >= 1:
        if 3 * d - 1 < n:
            if reverse:  # targets n - 3d - 2d i >= 0, sources d later
                r = (n - 3 * d) % (2 * d)
                v[:, r : n - 3 * d + 1 : 2 * d] += pw[d - 1] * v[:, r + d : n - 2 * d + 1 : 2 * d]
            else:
                v[:, 3 * d - 1 :: 2 * d] += pw[d - 1] * v[:, 2 * d - 1 : n - d : 2 * d]
        d //= 2
    return v


def _chunk_states(u: Tensor, Wb: Tensor, pw: Tensor, x_in: Tensor) -> Tensor:
    """States (B, n, Q) of one chunk u (B, n, H) from the state x_in (B, Q) before it."""
    Bsz, n, _ = u.shape
    Q = pw.shape[1]
    v = torch.view_as_complex((u @ Wb).view(Bsz, n, Q, 2))  # Bb u_k, (B, n, Q)
    _scan_(v, pw)
    v += pw[:n] * x_in[:, None]
    return v


class _Scan(torch.autograd.Function):
    """y = Re-projected states of x_k = a x_{k-1} + complex(u_k Wb); see ``scan``. Custom backward.

    ``forward`` / ``setup_context`` apart (the chunk carries are a third, non-differentiable output), so that
    ``torch.func`` transforms (vmap, grad, jacrev) run it; the vmap rule is generated."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u: Tensor, Wb: Tensor, Wc: Tensor, a: Tensor, x0: Tensor, chunk: int):
        Bsz, L, H = u.shape
        Q = a.shape[0]
        pw = powers(a, max(chunk, 1))
        y = None
        x = x0
        carries = []
        for s in range(0, L, chunk):
            e = min(s + chunk, L)
            carries.append(x)
            v = _chunk_states(u[:, s:e], Wb, pw, x)
            x = v[:, -1].clone()
            yc = torch.view_as_real(v).reshape(Bsz, e - s, 2 * Q) @ Wc
            if y is None:  # allocated from a result, so batched under vmap when any input is
                y = yc.new_empty(Bsz, L, H)
            y[:, s:e] = yc
            del v, yc
        return y, x, torch.stack(carries)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, Wb, Wc, a, _, chunk = inputs
        ctx.chunk = chunk
        ctx.mark_non_differentiable(output[2])
        ctx.save_for_backward(u, Wb, Wc, a, output[2])

    @staticmethod
    @single_backward("the S5 scan", "use ssm.systems.s5.scan_ref (plain autograd) for higher derivatives")
    def backward(ctx, gy: Tensor, gx_last: Tensor, _g_carries):
        u, Wb, Wc, a, carries = ctx.saved_tensors
        chunk = ctx.chunk
        Bsz, L, H = u.shape
        Q = a.shape[0]
        pw = powers(a, chunk)
        pwc = pw.conj()
        need_u, need_Wb, need_Wc, need_a, need_x0, _ = ctx.needs_input_grad
        gu = torch.empty_like(u) if need_u else None
        gWb = torch.zeros_like(Wb) if need_Wb else None
        gWc = torch.zeros_like(Wc) if need_Wc else None
        ga = torch.zeros_like(a) if need_a else None
        gy = torch.zeros_like(u) if gy is None else gy
        # the adjoint entering each chunk at its last position: dL/dx_{L-1} for the last chunk, else
        # conj(a) lambda at the first position of the next chunk
        R = torch.zeros_like(carries[0]) if gx_last is None else gx_last.to(carries.dtype)
        starts = list(range(0, L, chunk))
        for j in reversed(range(len(starts))):
            s = starts[j]
            e = min(s + chunk, L)
            n = e - s
            x_in = carries[j]
            uc = u[:, s:e]
            gyc = gy[:, s:e]
            x = _chunk_states(uc, Wb, pw, x_in)  # recomputed, (B, n, Q)
            if need_Wc:
                gWc += torch.view_as_real(x).reshape(Bsz * n, 2 * Q).T @ gyc.reshape(Bsz * n, H)
            lam = torch.view_as_complex((gyc @ Wc.T).contiguous().view(Bsz, n, Q, 2))  # dL/dx_k, (B, n, Q)
            lam[:, -1] += R
            _scan_(lam, pwc, reverse=True)  # lambda_k = g_k + conj(a) lambda_{k+1}
            if need_a:
                x_prev = torch.cat([x_in[:, None], x[:, :-1]], dim=1)
                ga += (lam * x_prev.conj()).sum(dim=(0, 1))
            lam_r = torch.view_as_real(lam).reshape(Bsz, n, 2 * Q)
            if need_u:
                gu[:, s:e] = lam_r @ Wb.T
            if need_Wb:
                gWb += uc.reshape(Bsz * n, H).T @ lam_r.reshape(Bsz * n, 2 * Q)
            R = a.conj() * lam[:, 0]
        gx0 = R if need_x0 else None
        return gu, gWb, gWc, ga, gx0, None


def projections(sys: S5System, channel: int = 0) -> tuple[Tensor, Tensor]:
    """The real matrices of the scan: Wb (H, 2Q) with u Wb = [Re, Im](Bb u) interleaved per state, and
    Wc (2Q, H) with [Re x, Im x] Wc = f Re(C[channel] x)."""
    Q, H = sys.Bb.shape
    Wb = torch.view_as_real(sys.Bb.transpose(0, 1)).reshape(H, 2 * Q)
    Cc = sys.C[channel]  # (H, Q)
    Wc = sys.factor * torch.stack([Cc.real, -Cc.imag], dim=-1).reshape(H, 2 * Q).transpose(0, 1)
    return Wb, Wc


def scan(
    sys: S5System,
    u: Tensor,
    x0: Tensor | None = None,
    *,
    channel: int = 0,
    reverse: bool = False,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The fast path: outputs and last state of the recurrence, by a chunked parallel (Blelloch) scan.

    Args:
        sys: the discrete system.
        u: (B, L, H) real inputs.
        x0: (B, Q) complex state x_{-1}, or None for zeros.
        channel: which output matrix C[channel] reads the states.
        reverse: run backward in time (x_k = Ab x_{k+1} + Bb u_k from x_L = x0; the returned state is
            then x_0), the anti-causal half of a bidirectional layer.
        chunk: chunk length T (None: ``default_chunk``); memory O(B Q T + B H L).

    Returns:
        y (B, L, H) real, y_k = f Re(C[channel] x_k) (no D skip), and x_{L-1} (B, Q) complex.
        Differentiable in u, x0 and the system (a custom autograd.Function with a recomputing backward).
    """
    check_tensor("u", u, ndim=3)
    Bsz, L, H = u.shape
    Q = sys.Ab.shape[0]
    if H != sys.Bb.shape[1]:
        raise ValueError(f"u must have H = {sys.Bb.shape[1]} features (B, L, H); got shape {tuple(u.shape)}")
    channel = check_int("channel", channel, minimum=0)
    if channel >= sys.C.shape[0]:
        raise ValueError(f"channel must be < {sys.C.shape[0]} (the channels of C); got {channel}")
    T = default_chunk(Bsz, Q, L) if chunk is None else min(check_int("chunk", chunk, minimum=1), max(L, 1))
    cdtype = sys.Bb.dtype
    rdtype = sys.Bb.real.dtype
    u = u.to(rdtype)
    if x0 is None:
        x0 = torch.zeros(Bsz, Q, dtype=cdtype, device=u.device)
    else:
        check_shape("x0", check_tensor("x0", x0), (Bsz, Q), "(B, Q)")
        x0 = x0.to(cdtype)
    if L == 0:
        return u.new_zeros(Bsz, 0, H), x0
    if torch.compiler.is_compiling():  # torch.compile / torch.export: one graph for every L (scan_conv)
        return scan_conv(sys, u, x0, channel=channel, reverse=reverse)
    Wb, Wc = projections(sys, channel)
    if reverse:
        u = u.flip(1)
    y, x, _ = _Scan.apply(u.contiguous(), Wb.contiguous(), Wc.contiguous(), sys.Ab, x0, T)
    return (y.flip(1) if reverse else y), x


def scan_conv(
    sys: S5System, u: Tensor, x0: Tensor | None = None, *, channel: int = 0, reverse: bool = False
) -> tuple[Tensor, Tensor]:
    """The route of ``scan`` under ``torch.compile`` / ``torch.export``: the same recurrence as a causal
    convolution over time, by FFTs of length 2L,

        x_k = sum_(s <= k) Ab^(k-s) Bb u_s + Ab^(k+1) x0,    Ab^k = exp(k log Ab) (k log Ab in float64),

    out of place and with no Python loop over the length, so one graph serves every (symbolic) L: the
    Blelloch passes of ``scan`` are strided in-place complex updates whose count depends on L, which
    specializes the length (export) and which inductor's fake tensors refuse. Differentiable by autograd
    (no custom Function). Memory O(B L Q) (no chunking); the arguments and results are those of ``scan``.
    """
    Bsz, L, H = u.shape
    Q = sys.Ab.shape[0]
    cdtype = sys.Bb.dtype
    u = u.to(sys.Bb.real.dtype)
    x0 = torch.zeros(Bsz, Q, dtype=cdtype, device=u.device) if x0 is None else x0.to(cdtype)
    Wb, Wc = projections(sys, channel)
    if reverse:
        u = u.flip(1)
    v = torch.view_as_complex((u @ Wb).reshape(Bsz, L, Q, 2).contiguous())  # Bb u_k, (B, L, Q)
    k = torch.arange(L + 1, device=u.device, dtype=torch.float64)
    pw = torch.exp(k[:, None] * torch.log(sys.Ab.to(torch.complex128))[None]).to(cdtype)  # (L+1, Q): Ab^k
    n = 2 * L
    x = torch.fft.ifft(torch.fft.fft(v, n=n, dim=1) * torch.fft.fft(pw[:L], n=n, dim=0), n=n, dim=1)[:, :L]
    x = x + pw[1:] * x0[:, None]  # (B, L, Q)
    y = torch.view_as_real(x).reshape(Bsz, L, 2 * Q) @ Wc  # (B, L, H)
    return (y.flip(1) if reverse else y), x[:, -1]


def scan_ref(
    sys: S5System, u: Tensor, x0: Tensor | None = None, *, channel: int = 0
) -> tuple[Tensor, Tensor]:
    """The reference twin of ``scan``: the explicit recurrence, one step at a time (slow, obviously right)."""
    Bsz, L, H = u.shape
    x = torch.zeros(Bsz, sys.Ab.shape[0], dtype=sys.Bb.dtype, device=u.device) if x0 is None else x0
    x = x.to(sys.Bb.dtype)
    ys = []
    for k in range(L):
        x = sys.Ab * x + u[:, k].to(sys.Bb.dtype) @ sys.Bb.T
        ys.append(sys.factor * (x @ sys.C[channel].T).real)
    return torch.stack(ys, 1) if ys else u.new_zeros(Bsz, 0, H), x


# ---- the family verbs (tests and conversions; not the fast path) -------------------------------------------


def kernel(sys: S5System, L: int) -> Tensor:
    """The transfer matrix K (Ch, H, H, L), K[c, i, j, k] = f Re(sum_q C[c, i, q] Ab_q^k Bb[q, j]): output i's
    response to an impulse at input j. O(Ch H^2 Q L): for tests and conversions, not the fast path."""
    L = check_int("L", L, minimum=1)
    pw = torch.ones_like(sys.Ab)[None]  # (L, Q): Ab^k
    if L > 1:
        pw = torch.cat([pw, powers(sys.Ab, L - 1)])
    return sys.factor * torch.einsum("ciq,lq,qj->cijl", sys.C, pw, sys.Bb).real


def step(sys: S5System, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """x_k = Ab x_{k-1} + Bb u_k, y_k = f Re(C x_k): x (B, Q), u (B, H) -> (y (B, Ch, H), x_k (B, Q)).
    O(Q H) per token."""
    x = sys.Ab * x.to(sys.Bb.dtype) + u.to(sys.Bb.dtype) @ sys.Bb.T
    return sys.factor * torch.einsum("chq,bq->bch", sys.C, x).real, x


def free_response(sys: S5System, x0: Tensor, L: int) -> Tensor:
    """Zero-input response y_k = f Re(C Ab^{k+1} x0): x0 (B, Q) -> (B, Ch, H, L)."""
    L = check_int("L", L, minimum=1)
    pw = powers(sys.Ab, L)  # (L, Q)
    return sys.factor * torch.einsum("chq,lq,bq->bchl", sys.C, pw, x0.to(sys.Bb.dtype)).real


def final_state(sys: S5System, u: Tensor, x0: Tensor | None = None) -> Tensor:
    """State (B, Q) after the chunk u (B, H, L) from x0 (None: zeros):
    x_{L-1} = Ab^L x0 + sum_j Ab^{L-1-j} Bb u_j."""
    check_tensor("u", u, ndim=3)
    Bsz, H, L = u.shape
    Q = sys.Ab.shape[0]
    x = torch.zeros(Bsz, Q, dtype=sys.Bb.dtype, device=u.device) if x0 is None else x0.to(sys.Bb.dtype)
    if L == 0:
        return x
    pw = powers(sys.Ab, L)  # a^(1..L)
    w = torch.cat([pw[: L - 1].flip(0), torch.ones_like(pw[:1])])  # (L, Q): a^(L-1-j)
    return pw[-1] * x + torch.einsum("bhl,lq,qh->bq", u.to(sys.Bb.dtype), w, sys.Bb)


# ---- the real route (ONNX export: no complex type; docs/deployment.md) -------------------------------------


class S5RealStep(NamedTuple):
    """The step in real tensors only: a (Q, 2) = [Re Ab, Im Ab], Wb (H, 2Q) and Wc (Ch, 2Q, H) the real
    projections of ``projections`` for every channel (the state as planes [Re x_1, Im x_1, ...])."""

    a: Tensor
    Wb: Tensor
    Wc: Tensor


def prepare_real_step(sys: S5System) -> S5RealStep:
    """The constants of ``real_step`` (computed once, outside any graph)."""
    Wcs = [projections(sys, c)[1] for c in range(sys.C.shape[0])]
    return S5RealStep(torch.view_as_real(sys.Ab.resolve_conj()).clone(), projections(sys)[0].clone(),
                      torch.stack(Wcs))


def real_step(c: S5RealStep, xr: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """``step`` in real arithmetic: xr (B, 2Q) the planes of x, u (B, H) -> (y (B, Ch, H), next xr):
    x_k = Ab x_{k-1} + Bb u_k on planes, y_k = f Re(C x_k) = xr_k Wc."""
    Bsz = xr.shape[0]
    x = xr.to(c.Wb.dtype).view(Bsz, -1, 2)
    ar, ai = c.a[:, 0], c.a[:, 1]
    ax = torch.stack([ar * x[..., 0] - ai * x[..., 1], ar * x[..., 1] + ai * x[..., 0]], dim=-1)
    xr = ax.reshape(Bsz, -1) + u.to(c.Wb.dtype) @ c.Wb
    return torch.einsum("bq,cqh->bch", xr, c.Wc), xr


def to_real_state(c: S5RealStep, x: Tensor) -> Tensor:
    """x (B, Q) complex -> its planes (B, 2Q)."""
    return torch.view_as_real(x.to(torch.complex128 if c.Wb.dtype == torch.float64 else torch.complex64)
                              ).flatten(-2)


def from_real_state(c: S5RealStep, xr: Tensor) -> Tensor:
    """Inverse of ``to_real_state``."""
    return torch.view_as_complex(xr.unflatten(-1, (-1, 2)).contiguous())
