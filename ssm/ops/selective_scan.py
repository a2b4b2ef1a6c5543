"""The selective scan of Mamba (Gu & Dao 2023, Alg. 2), with mamba_ssm's signature and semantics.

For every batch b, channel d and state n, with input-dependent delta, B and C:

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t             (ZOH on A, Euler on B: Mamba paper §3.5)
    y_t = C_t h_t + D u_t,        out_t = y_t * silu(z_t)

where delta_t = softplus(delta_t + delta_bias) when ``delta_softplus``. Shapes (mamba_ssm's): u, delta, z
(B, D, L); A (D, N) real; B and C shared (D, N), per token (B, N, L) or grouped (B, G, N, L), channel d
reading group d // (D / G); D and delta_bias (D,). The state h is (B, D, N), ``initial_state`` (an
extension: mamba_ssm starts from zero) and the returned last state included.

``selective_scan_fn`` walks along L in chunks of T steps inside a custom autograd.Function. Per chunk it
forms exp(delta A) and delta B u as (T, B, D, N) blocks, runs the recurrence step by step on (B, D, N)
slices (a product and a sum each: no log-space cumsum, so no overflow for any delta |A|; decays underflow
to zero) and contracts the states with C. Only the (B, D, N) state at each chunk start is kept; the
backward recomputes a chunk's states from it and runs the adjoint recurrence

    G_t = C_t gy_t + exp(delta_{t+1} A) G_{t+1}                 (G_t = dLoss / dh_t)

backwards in time, so memory is O(B D L + B D N T + B D N L / T), never (B, D, N, L). The computation runs
in float32 (float64 inputs stay float64) and the output has u's dtype. ``selective_scan_ref`` is the plain
sequential twin with the same signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_bool, check_int, check_tensor, single_backward
from .backends import OPS, resolve_backend

__all__ = ["selective_scan_fn", "selective_scan_ref", "BACKENDS", "CHUNK"]

BACKENDS = OPS["selective_scan"].backends  # ("auto", "torch", "triton"), resolved by ssm.ops.backends
#: Whether ``"auto"`` picks the Triton forward for CUDA tensors (off until it has run on a GPU).
AUTO_TRITON = False

#: Time steps per chunk of ``selective_scan_fn`` (measured on CPU: benchmarks/selective.py).
CHUNK = 16


def _check_bc(name: str, value, batch: int, dim: int, dstate: int, length: int) -> Tensor:
    """B or C: shared (D, N), per token (B, N, L) or grouped (B, G, N, L) with G dividing D."""
    check_tensor(name, value, (2, 3, 4))
    if value.is_complex():
        raise ValueError(f"{name} must be real; got dtype {value.dtype}")
    if value.ndim == 2:
        want = (dim, dstate)
    elif value.ndim == 3:
        want = (batch, dstate, length)
    else:
        groups = value.shape[1]
        if groups < 1 or dim % groups:
            raise ValueError(f"{name} (B, G, N, L) needs G dividing D = {dim}; got G = {groups}")
        want = (batch, groups, dstate, length)
    if tuple(value.shape) != want:
        form = {2: "(D, N)", 3: "(B, N, L)", 4: "(B, G, N, L)"}[value.ndim]
        raise ValueError(f"{name} must have shape {form} = {want}; got {tuple(value.shape)}")
    return value


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any operand is float64, else float32 (half and bfloat16 compute in float32)."""
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


def _check_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state):
    check_tensor("u", u, 3)
    batch, dim, length = u.shape
    check_tensor("delta", delta, 3)
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape (B, D, L) = {tuple(u.shape)}; got {tuple(delta.shape)}")
    check_tensor("A", A, 2)
    if A.is_complex():
        raise ValueError("A must be real (D, N); complex A is not supported")
    if A.shape[0] != dim:
        raise ValueError(f"A must have shape (D, N) with D = {dim}; got {tuple(A.shape)}")
    dstate = A.shape[1]
    _check_bc("B", B, batch, dim, dstate, length)
    _check_bc("C", C, batch, dim, dstate, length)
    for name, value in (("D", D), ("delta_bias", delta_bias)):
        if value is not None and (check_tensor(name, value, 1).shape != (dim,)):
            raise ValueError(f"{name} must have shape (D,) = ({dim},); got {tuple(value.shape)}")
    if z is not None and check_tensor("z", z, 3).shape != u.shape:
        raise ValueError(f"z must have u's shape (B, D, L) = {tuple(u.shape)}; got {tuple(z.shape)}")
    if initial_state is not None and check_tensor("initial_state", initial_state, 3).shape != (
        batch, dim, dstate
    ):
        raise ValueError(f"initial_state must have shape (B, D, N) = {(batch, dim, dstate)}; "
                         f"got {tuple(initial_state.shape)}")
    check_bool("delta_softplus", delta_softplus)
    check_bool("return_last_state", return_last_state)
    if length < 1:
        raise ValueError(f"u must have length L >= 1; got shape {tuple(u.shape)}")


def _delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    """delta (+ delta_bias) (then softplus), in the compute dtype."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype: torch.dtype) -> Tensor:
    """out = (y + D u) * silu(z), in u's dtype."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, initial_state=None):
    """Reference twin of ``selective_scan_fn``: the recurrence one step at a time (same arguments)."""
    _check_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    ct = _compute_dtype(u, delta, A, B, C, initial_state)
    batch, dim, length = u.shape
    delta = _delta(delta, delta_bias, delta_softplus, ct)
    A, B, C, uc = A.to(ct), B.to(ct), C.to(ct), u.to(ct)

    def per_channel(M: Tensor, t: int) -> Tensor:  # B_t or C_t as (B, D, N) or (D, N)
        if M.ndim == 2:
            return M
        Mt = M[..., t] if M.ndim == 3 else M[..., t].repeat_interleave(dim // M.shape[1], dim=1)
        return Mt.unsqueeze(1) if M.ndim == 3 else Mt

    h = u.new_zeros((batch, dim, A.shape[1]), dtype=ct) if initial_state is None else initial_state.to(ct)
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * per_channel(B, t) * uc[:, :, t, None]
        ys.append((h * per_channel(C, t)).sum(-1))
    out = _gate(torch.stack(ys, dim=-1), u, D, z, u.dtype)
    return (out, h) if return_last_state else out


class _Operand:
    """B or C in time-major layout: shared (D, N), or (L, B, G, N) read by channel groups."""

    def __init__(self, M: Tensor, dim: int):
        self.shared = M.ndim == 2
        self.M = M
        self.groups = 1 if self.shared else M.shape[2]
        self.per = dim // self.groups

    def chunk(self, t0: int, t1: int) -> Tensor:
        return self.M if self.shared else self.M[t0:t1]

    def outer(self, v: Tensor, Mc: Tensor, out: Tensor) -> Tensor:
        """out[t, b, d, n] = v[t, b, d] M[t, b, g(d), n]: v (T, B, D) -> (T, B, D, N)."""
        T, batch, dim = v.shape
        if self.shared:
            return torch.mul(v.unsqueeze(-1), Mc, out=out)
        o = out.view(T, batch, self.groups, self.per, -1)
        torch.mul(v.view(T, batch, self.groups, self.per, 1), Mc.unsqueeze(3), out=o)
        return out

    def contract(self, H: Tensor, Mc: Tensor, tmp: Tensor) -> Tensor:
        """sum_n H[t, b, d, n] M[t, b, g(d), n]: (T, B, D, N) -> (T, B, D), through the buffer ``tmp``
        (a product and a sum: several times faster on CPU than einsum's batched GEMV with N columns)."""
        T, batch, dim, N = H.shape
        if self.shared:
            return torch.mul(H, Mc, out=tmp).sum(-1)
        prod = tmp.view(T, batch, self.groups, self.per, N)
        torch.mul(H.view(T, batch, self.groups, self.per, N), Mc.unsqueeze(3), out=prod)
        return tmp.sum(-1)

    def grad(self, H: Tensor, v: Tensor, tmp: Tensor) -> Tensor:
        """Gradient of the operand from sum over channels of H[t, b, d, n] v[t, b, d]."""
        T, batch, dim, N = H.shape
        if self.shared:
            return torch.mul(H, v.unsqueeze(-1), out=tmp).sum((0, 1))
        Hg = H.view(T, batch, self.groups, self.per, N)
        vg = v.view(T, batch, self.groups, 1, self.per)
        return torch.matmul(vg, Hg).squeeze(3)  # (T, B, G, N)


def _chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(t0, min(t0 + chunk, length)) for t0 in range(0, length, chunk)]


def _chunk_forward(ws: dict, u: Tensor, delta: Tensor, A: Tensor, Bo: _Operand, t0: int, t1: int,
                   h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """exp(delta A), delta B u and the states of steps t0..t1-1 from the state h before t0.

    Returns dA, dBu (T, B, D, N) and H (T + 1, B, D, N) with H[0] = h, H[k + 1] = h_{t0 + k}; written into
    the workspace ``ws`` (reused from chunk to chunk: fresh large allocations cost page faults).
    """
    T = t1 - t0
    dc = delta[t0:t1]
    dA = torch.mul(dc.unsqueeze(-1), A, out=ws["dA"][:T])
    torch.exp(dA, out=dA)
    dBu = Bo.outer(dc * u[t0:t1], Bo.chunk(t0, t1), ws["dBu"][:T])
    H = ws["H"][: T + 1]
    H[0].copy_(h)
    for k in range(T):
        torch.addcmul(dBu[k], dA[k], H[k], out=H[k + 1])
    return dA, dBu, H


def _workspace(chunk: int, shape: tuple[int, ...], like: Tensor) -> dict:
    return {
        "dA": like.new_empty((chunk, *shape)),
        "dBu": like.new_empty((chunk, *shape)),
        "H": like.new_empty((chunk + 1, *shape)),
        "tmp": like.new_empty((chunk, *shape)),
    }


class _SelectiveScan(torch.autograd.Function):
    """The chunked scan on time-major operands: u, delta (L, B, D); A (D, N); B, C (D, N) or (L, B, G, N);
    h0 (B, D, N) -> y = C h (L, B, D) and the last state (B, D, N). See the module docstring."""

    @staticmethod
    def forward(ctx, u, delta, A, Bm, Cm, h0, chunk, backend):
        ctx.chunk = chunk
        if backend == "triton":
            from .selective_scan_triton import selective_scan_forward_triton

            y, starts, h = selective_scan_forward_triton(u, delta, A, Bm, Cm, h0, chunk)
            ctx.save_for_backward(u, delta, A, Bm, Cm, starts)
            return y, h
        length, batch, dim = u.shape
        N = A.shape[1]
        Bo, Co = _Operand(Bm, dim), _Operand(Cm, dim)
        spans = _chunks(length, chunk)
        ws = _workspace(min(chunk, length), (batch, dim, N), u)
        y = u.new_empty((length, batch, dim))
        starts = u.new_empty((len(spans), batch, dim, N))
        h = h0
        for i, (t0, t1) in enumerate(spans):
            starts[i].copy_(h)
            _, _, H = _chunk_forward(ws, u, delta, A, Bo, t0, t1, h)
            y[t0:t1] = Co.contract(H[1:], Co.chunk(t0, t1), ws["tmp"][: t1 - t0])
            h = H[-1].clone()
        ctx.save_for_backward(u, delta, A, Bm, Cm, starts)
        return y, h

    @staticmethod
    @single_backward("selective_scan_fn", "use selective_scan_ref (plain autograd) for higher derivatives")
    def backward(ctx, gy, gh):
        u, delta, A, Bm, Cm, starts = ctx.saved_tensors
        length, batch, dim = u.shape
        N = A.shape[1]
        Bo, Co = _Operand(Bm, dim), _Operand(Cm, dim)
        spans = _chunks(length, ctx.chunk)
        ws = _workspace(min(ctx.chunk, length), (batch, dim, N), u)
        Gbuf = u.new_empty((min(ctx.chunk, length), batch, dim, N))
        gu, gdelta = torch.empty_like(u), torch.empty_like(delta)
        gA = torch.zeros_like(A)
        gB = torch.zeros_like(Bm) if Bo.shared else torch.empty_like(Bm)
        gC = torch.zeros_like(Cm) if Co.shared else torch.empty_like(Cm)
        gy = torch.zeros_like(u) if gy is None else gy.contiguous()  # time-major, as the chunks read it
        carry = torch.zeros_like(starts[0]) if gh is None else gh
        for i in reversed(range(len(spans))):
            t0, t1 = spans[i]
            T = t1 - t0
            dA, dBu, H = _chunk_forward(ws, u, delta, A, Bo, t0, t1, starts[i])
            Cc, Bc, gyc, dc = Co.chunk(t0, t1), Bo.chunk(t0, t1), gy[t0:t1], delta[t0:t1]
            # dC from y_t = C_t h_t
            tmp = ws["tmp"][:T]
            gCc = Co.grad(H[1:], gyc, tmp)
            if Co.shared:
                gC += gCc
            else:
                gC[t0:t1] = gCc
            # G_t = C_t gy_t + exp(delta_{t+1} A) G_{t+1}, the last one plus the carried adjoint
            G = Co.outer(gyc, Cc, Gbuf[:T])
            G[T - 1].add_(carry)
            for k in range(T - 2, -1, -1):
                G[k].addcmul_(dA[k + 1], G[k + 1])
            carry = dA[0] * G[0]
            # X = dLoss / d(delta_t A) = G_t exp(delta_t A) h_{t-1}; dA then holds X
            X = dA.mul_(H[:T]).mul_(G)
            gA += torch.mul(X, dc.unsqueeze(-1), out=tmp).sum((0, 1))
            gXA = torch.mul(X, A, out=tmp).sum(-1)
            gdu = Bo.contract(G, Bc, tmp)  # dLoss / d(delta_t u_t)
            gBc = Bo.grad(G, dc * u[t0:t1], tmp)
            if Bo.shared:
                gB += gBc
            else:
                gB[t0:t1] = gBc
            gdelta[t0:t1] = gXA + gdu * u[t0:t1]
            gu[t0:t1] = gdu * dc
        return gu, gdelta, gA, gB, gC, carry, None, None


def _time_major_bc(M: Tensor, dtype: torch.dtype) -> Tensor:
    """(D, N) stays; (B, N, L) -> (L, B, 1, N); (B, G, N, L) -> (L, B, G, N)."""
    M = M.to(dtype)
    if M.ndim == 2:
        return M
    if M.ndim == 3:
        M = M.unsqueeze(1)
    return M.permute(3, 0, 1, 2).contiguous()


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, initial_state=None, chunk_size=None, backend="auto"):
    """Selective scan with mamba_ssm's signature: out = (C h + D u) * silu(z), h_t = exp(delta_t A) h_{t-1}
    + delta_t B_t u_t (module docstring).

    Args:
        u: (B, D, L) input.  delta: (B, D, L) time steps (before ``delta_bias`` and softplus).
        A: (D, N) real.  B, C: (D, N) shared, (B, N, L) per token or (B, G, N, L) grouped (G divides D).
        D: (D,) skip.  z: (B, D, L) gate.  delta_bias: (D,).  delta_softplus: apply softplus to delta.
        return_last_state: also return the state after the last step.
        initial_state: (B, D, N) state before the first step (default zero; not in mamba_ssm).
        chunk_size: time steps per chunk (default ``CHUNK``); memory O(B D N chunk_size) besides the
            chunk-start states.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (``ssm.ops.backends``): the forward pass as a
            fused Triton kernel (``ssm.ops.selective_scan_triton``); the backward is the torch one.

    Returns:
        out (B, D, L) in u's dtype, or (out, last_state (B, D, N) in float32, float64 for float64 inputs).
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    chunk = CHUNK if chunk_size is None else check_int("chunk_size", chunk_size, minimum=1)
    backend = resolve_backend("selective_scan", backend, u.device)
    ct = _compute_dtype(u, delta, A, B, C, initial_state)
    batch, dim, length = u.shape
    dlt = _delta(delta, delta_bias, delta_softplus, ct).permute(2, 0, 1).contiguous()  # (L, B, D)
    uc = u.to(ct).permute(2, 0, 1).contiguous()
    h0 = u.new_zeros((batch, dim, A.shape[1]), dtype=ct) if initial_state is None else initial_state.to(ct)
    y, last = _SelectiveScan.apply(uc, dlt, A.to(ct), _time_major_bc(B, ct), _time_major_bc(C, ct), h0,
                                   chunk, backend)
    out = _gate(y.permute(1, 2, 0), u, D, z, u.dtype)
    return (out, last) if return_last_state else out
