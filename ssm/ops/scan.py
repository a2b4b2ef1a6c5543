"""Linear recurrences on whole chunks: Krylov sequences and the state after a chunk.

These serve the layers' state passing (``forward(x, state=...)``): a chunk of inputs moves the state
x_{-1} to x_{L-1} by the recurrence x_k = Ab x_{k-1} + Bb u_k, i.e.

    x_{L-1} = Ab^L x_{-1} + sum_{j<L} Ab^{L-1-j} Bb u_j.

``Ab`` is either dense (..., N, N) or diagonal (..., N); both cases share the code below through
``_matvec``/``_matmul``. The sum is evaluated block by block (block length T): the Krylov matrix
[Bb, Ab Bb, ..., Ab^{T-1} Bb] (..., N, T) is built by doubling, each block's contribution is one
contraction, and the blocks are chained with Ab^T. Memory is O(B H N L / T + H N T), never (B, H, N, L).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int, check_tensor, traced


def _is_diag(Ab: Tensor, Bb: Tensor) -> bool:
    return Ab.ndim == Bb.ndim


def _matvec(Ab: Tensor, x: Tensor, diag: bool) -> Tensor:
    """Ab x for Ab (..., N, N) or diagonal (..., N), x (..., N) (broadcast over leading dims)."""
    if diag:
        return Ab * x
    return (Ab @ x.unsqueeze(-1)).squeeze(-1)


def _matmul(Ab1: Tensor, Ab2: Tensor, diag: bool) -> Tensor:
    return Ab1 * Ab2 if diag else Ab1 @ Ab2


def _matrix_power(Ab: Tensor, k: int, diag: bool) -> Tensor:
    """Ab^k by repeated squaring (k >= 0)."""
    if diag:
        result = torch.ones_like(Ab)
    else:
        result = torch.eye(Ab.shape[-1], dtype=Ab.dtype, device=Ab.device).expand_as(Ab).clone()
    base = Ab
    while k > 0:
        if k & 1:
            result = _matmul(result, base, diag)
        k >>= 1
        if k:
            base = _matmul(base, base, diag)
    return result


def krylov(Ab: Tensor, b: Tensor, L: int) -> Tensor:
    """Krylov sequence [b, Ab b, ..., Ab^{L-1} b] by doubling.

    Args:
        Ab: (..., N, N) dense or (..., N) diagonal.
        b: (..., N).
        L: number of terms, >= 1.
    Returns:
        (..., N, L).
    """
    L = check_int("L", L, minimum=1)
    diag = _is_diag(Ab, b)
    K = b.unsqueeze(-1)  # (..., N, 1)
    power = Ab
    while K.shape[-1] < L:
        # K holds Ab^m b for m < 2^j; the next 2^j terms are Ab^{2^j} K.
        nxt = power.unsqueeze(-1) * K if diag else power @ K
        K = torch.cat([K, nxt], dim=-1)
        if K.shape[-1] < L:
            power = _matmul(power, power, diag)
    return K[..., :L]


def final_state(Ab: Tensor, Bb: Tensor, u: Tensor, x0: Tensor | None = None, *, block: int = 256) -> Tensor:
    """State after a chunk: x_{L-1} = Ab^L x0 + sum_j Ab^{L-1-j} Bb u_j.

    Args:
        Ab: (H, N, N) dense or (H, N) diagonal discrete state matrix.
        Bb: (H, N) discrete input vector.
        u: (B, H, L) real inputs.
        x0: (B, H, N) initial state x_{-1}, or None for zeros.
        block: block length T of the chunked evaluation.
    Returns:
        (B, H, N) in the dtype of ``Bb`` (complex stays complex).
    """
    check_tensor("u", u, ndim=3)
    block = check_int("block", block, minimum=1)
    diag = _is_diag(Ab, Bb)
    Bsz, H, L = u.shape
    dtype = torch.promote_types(Bb.dtype, u.dtype)
    u = u.to(dtype)
    x = torch.zeros(Bsz, H, Bb.shape[-1], dtype=dtype, device=u.device) if x0 is None else x0.to(dtype)
    T = min(L, block)
    Kr = krylov(Ab, Bb, T).to(dtype).flip(-1)  # (H, N, T): Kr[..., t] = Ab^{T-1-t} Bb
    r = L % T
    if r:
        # Leading partial block of length r, so every later block is full.
        head = torch.einsum("hnt,bht->bhn", Kr[..., T - r:], u[..., :r])
        x = _matvec(_matrix_power(Ab, r, diag), x, diag) + head
    nb = (L - r) // T
    if nb:
        ub = u[..., r:].reshape(Bsz, H, nb, T)
        z = torch.einsum("hnt,bhjt->bjhn", Kr, ub)  # (B, nb, H, N): each block's own contribution
        AT = _matrix_power(Ab, T, diag)
        for j in range(nb):
            x = _matvec(AT, x, diag) + z[:, j]
    return x


def states_at(Ab: Tensor, Bb: Tensor, u: Tensor, ends: list[int], x0: Tensor | None = None, *,
              block: int = 256) -> dict[int, Tensor]:
    """The states x_{e-1} after several prefixes u[..., :e] of one chunk, for e in ``ends`` (1 <= e <= L):
    {e: (B, H, N)}, each equal to ``final_state(Ab, Bb, u[..., :e], x0)``.

    One Krylov basis of length T serves every prefix: the blocks' contributions are one contraction, the
    blocks are chained with Ab^T, and a prefix ending inside block j adds Ab^r (state at the block's start)
    and the contraction of its r inputs there. O(B H N L / T) memory, as ``final_state``.
    """
    check_tensor("u", u, ndim=3)
    block = check_int("block", block, minimum=1)
    diag = _is_diag(Ab, Bb)
    Bsz, H, L = u.shape
    if any(not 1 <= e <= L for e in ends):
        raise ValueError(f"ends must lie in [1, L={L}]; got {sorted(ends)}")
    dtype = torch.promote_types(Bb.dtype, u.dtype)
    u = u.to(dtype)
    x = torch.zeros(Bsz, H, Bb.shape[-1], dtype=dtype, device=u.device) if x0 is None else x0.to(dtype)
    T = min(L, block)
    Kr = krylov(Ab, Bb, T).to(dtype).flip(-1)  # (H, N, T): Kr[..., t] = Ab^{T-1-t} Bb
    nb = L // T
    z = torch.einsum("hnt,bhjt->bjhn", Kr, u[..., :nb * T].reshape(Bsz, H, nb, T)) if nb else None
    AT = _matrix_power(Ab, T, diag)
    at_block = [x]  # the state entering each block
    for j in range(nb):
        at_block.append(_matvec(AT, at_block[-1], diag) + z[:, j])
    # Each prefix adds the inputs of its own block before it: the T positions before e, those in the block
    # kept, gathered at once (one index_select, whose backward is one scatter).
    e = torch.tensor(sorted(set(ends)), device=u.device)  # (m,)
    first = (e - 1) // T * T  # the start of the block holding position e - 1
    idx = e[:, None] - T + torch.arange(T, device=u.device)  # (m, T)
    valid = (idx >= first[:, None]).to(u.real.dtype)
    U = u.index_select(-1, idx.clamp(min=0).flatten()).view(Bsz, H, -1, T) * valid  # (B, H, m, T)
    part = torch.einsum("hnt,bhmt->bmhn", Kr, U)  # (B, m, H, N)
    out: dict[int, Tensor] = {}
    for i, (end, start) in enumerate(zip(e.tolist(), first.tolist())):
        out[end] = _matvec(_matrix_power(Ab, end - start, diag), at_block[start // T], diag) + part[:, i]
    return out


def step_scan(fn, init, xs):
    """The recurrence ``(carry, y_k) = fn(carry, x_k)`` over the leading axis of ``xs`` as one loop operator:
    torch's ``scan`` higher-order op, which ``torch.export`` keeps with a dynamic length and
    ``torch.onnx.export`` writes as an ONNX ``Scan``. ``init`` and each x_k are tensors or tuples of
    tensors; returns (the last carry, the y_k stacked along a new leading axis). The layers' real route
    (``ssm._checks.real_route``) runs its recurrences through it; a torch without the op gets a Python loop
    (the same steps), and so do eager calls."""
    scan = None
    if traced():  # eager calls run the same steps in a Python loop (the op would compile its body)
        try:
            from torch._higher_order_ops.scan import scan
        except ImportError:  # a torch without the op: the loop, unrolled by the trace
            scan = None
    if scan is not None:
        return scan(fn, init, xs)
    leaves = xs if isinstance(xs, (tuple, list)) else (xs,)
    carry, ys = init, []
    for k in range(leaves[0].shape[0]):
        x_k = type(xs)(t[k] for t in xs) if isinstance(xs, (tuple, list)) else xs[k]
        carry, y = fn(carry, x_k)
        ys.append(y)
    if isinstance(ys[0], (tuple, list)):
        return carry, type(ys[0])(torch.stack(parts) for parts in zip(*ys))
    return carry, torch.stack(ys)
