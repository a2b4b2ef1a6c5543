"""The dense family: any state matrix Ab (H, N, N); the general case the structured families reduce to.

A discrete system x_k = Ab x_{k-1} + Bb u_k, y_k = C x_k (the D skip is the layer's) with one system per
feature h. The verbs, shared by every family module in ``ssm.systems``:

* ``discretize(A, B, C, dt, disc)``: continuous (A, B, C) and step dt -> ``DenseSystem``;
* ``kernel(sys, L)``: K_k = C Ab^k Bb, k < L (two-level Krylov doubling, no eigendecomposition);
* ``step(sys, x, u)``: one recurrent step;
* ``free_response(sys, x0, L)``: y_k = C Ab^{k+1} x0, the output caused by the state x0 = x_{-1} alone;
* ``final_state(sys, u, x0)``: x_{L-1} after the chunk u.

The DPLR family (S4) runs its state passing through this module in real coordinates (see
``ssm.systems.dplr.real_system``): the free response is a basis C Ab^{k+1} computed once per feature in
blocks of T steps and applied to every batch element by one matrix product, O(Ch H N^2 T + B H N^2 L / T
+ B Ch H N L) time and O(Ch H N T + B Ch H L) memory, never (B, H, N, L).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_int, check_tensor, traced_size
from ..discretize import discretize as _discretize_dense
from ..ops.scan import final_state as _scan_final_state
from .common import SYMBOLIC_POWER_BITS, power_rows

#: The family's tier (``ssm.systems``): linear time-invariant, so it adds kernel and free_response.
TIER = "lti"

# Block length b of ``kernel`` for a symbolic L (a dynamic length under torch.compile / torch.export).
SYMBOLIC_BLOCK = 32
_TOO_LONG = f"L must be < 2^{SYMBOLIC_POWER_BITS} under torch.compile / torch.export"


class DenseSystem(NamedTuple):
    """A discrete dense system, one per feature.

    Fields:
        Ab: (H, N, N) state matrix.
        Bb: (H, N) input vector.
        C: (Ch, H, N) output vectors, one per output channel.
    """

    Ab: Tensor
    Bb: Tensor
    C: Tensor


def discretize(A: Tensor, B: Tensor, C: Tensor, dt: Tensor, disc: str = "zoh") -> DenseSystem:
    """Discretize x' = A x + B u with step dt per feature (``ssm.discretize.discretize``).

    Args:
        A: (H, N, N); B: (H, N); C: (Ch, H, N) or (H, N); dt: (H,) positive; disc: a ``DISC_METHODS`` name.
    """
    check_tensor("C", C, ndim=(2, 3))
    Ab, Bb = _discretize_dense(A, B, dt, disc)
    return DenseSystem(Ab, Bb, C if C.ndim == 3 else C.unsqueeze(0))


def _rows(C: Tensor, Ab: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """C Ab^k for k < T by doubling, and the power Ab^m reached (m: the first power of two >= T):
    C (Ch, H, N), Ab (H, N, N) -> ((Ch, H, T, N), (H, N, N))."""
    W = C.unsqueeze(2)  # (Ch, H, 1, N)
    G = Ab  # Ab^(rows of W)
    while W.shape[2] < T:
        W = torch.cat([W, torch.einsum("chtn,hnm->chtm", W, G)], dim=2)
        G = G @ G
    return W[:, :, :T], G


def kernel(sys: DenseSystem, L: int) -> Tensor:
    """K[c, h, k] = C[c, h] Ab[h]^k Bb[h] for k < L, by two-level Krylov doubling.

    With a block length b (a power of two >= sqrt(L)) and q = ceil(L / b) blocks,
    K_{i b + j} = (C Ab^{i b}) (Ab^j Bb): both factors are built by doubling and the taps are one batched
    product. Cost O(H N^3 log L + H N^2 (b + q Ch) + Ch H N L); no eigendecomposition, so non-normal Ab
    (HiPPO) are fine. Returns (Ch, H, L) in the dtype of the system (complex stays complex).

    For a symbolic L (``torch.SymInt``: a dynamic length under torch.compile / torch.export) b is fixed
    (``SYMBOLIC_BLOCK``) and the rows C Ab^(i b) are binary powers with a fixed number of squarings
    (``power_rows``), so one graph serves every L.
    """
    L = check_int("L", L, minimum=1)
    Ab, Bb, C = sys
    H, N, _ = Ab.shape
    Ch = C.shape[0]
    if traced_size(L):
        return _kernel_symbolic(Ab, Bb, C, L)
    b = 1 << max(0, math.ceil(math.log2(math.sqrt(L))))
    q = -(-L // b)
    U = Bb.unsqueeze(-1)  # (H, N, 1): columns Ab^j Bb
    G = Ab
    while U.shape[-1] < b:
        U = torch.cat([U, G @ U], dim=-1)
        G = G @ G  # G = Ab^(number of columns of U)
    W = C.permute(1, 0, 2).unsqueeze(2)  # (H, Ch, 1, N): rows C Ab^(i b)
    while W.shape[2] < q:
        m = W.shape[2]
        W = torch.cat([W, (W.reshape(H, Ch * m, N) @ G).reshape(H, Ch, m, N)], dim=2)
        if 2 * m < q:
            G = G @ G
    W = W[:, :, :q].reshape(H, Ch * q, N)
    K = torch.bmm(W, U).reshape(H, Ch, q * b)[..., :L]  # (H, Ch, L)
    return K.permute(1, 0, 2)


def _kernel_symbolic(Ab: Tensor, Bb: Tensor, C: Tensor, L: torch.SymInt) -> Tensor:
    """``kernel`` for a symbolic L: K_(i b + j) = (C Ab^(i b)) (Ab^j Bb), b = ``SYMBOLIC_BLOCK``."""
    H, N, _ = Ab.shape
    Ch, b = C.shape[0], SYMBOLIC_BLOCK
    q = -(-L // b) + 1  # one spare block: q >= 2, as a size that is 1 when traced would be specialized to 1
    bits = max(1, SYMBOLIC_POWER_BITS - (b.bit_length() - 1))
    torch._check(q < 2**bits, lambda: _TOO_LONG)
    U = Bb.unsqueeze(-1)  # (H, N, 1): columns Ab^j Bb
    G = Ab
    while U.shape[-1] < b:
        U = torch.cat([U, G @ U], dim=-1)
        G = G @ G  # G = Ab^b at the end
    # No reshape merges a symbolic size (its view would guard on divisibilities that cannot be proved).
    W = C.permute(1, 0, 2).unsqueeze(2).expand(H, Ch, q, N).contiguous()  # (H, Ch, q, N), no 0 strides
    W = power_rows(W, G.unsqueeze(1), torch.arange(q, device=Ab.device), bits)  # rows C Ab^(i b)
    K = torch.einsum("hcqn,hnb->hcqb", W, U)  # (H, Ch, q, b)
    ell = torch.arange(L, device=Ab.device)  # the first L taps by an index, not a slice of q b
    return K[..., ell // b, ell % b].permute(1, 0, 2)


def step(sys: DenseSystem, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """x_k = Ab x_{k-1} + Bb u_k, y_k = C x_k: x (B, H, N), u (B, H) -> (y (B, Ch, H), x_k (B, H, N))."""
    Ab, Bb, C = sys
    x = torch.einsum("hmn,bhn->bhm", Ab, x.to(Ab.dtype)) + Bb * u[..., None].to(Bb.dtype)
    return torch.einsum("chn,bhn->bch", C, x), x


def free_block(L: int, batch: int, channels: int) -> int:
    """Block length T of ``free_response``: balances the basis (Ch T rows) against the powers (B L / T)."""
    return max(1, min(L, 1 << round(math.log2(max(1.0, math.sqrt(batch * L / channels))))))


def free_response(sys: DenseSystem, x0: Tensor, L: int) -> Tensor:
    """Zero-input response y_k = C Ab^{k+1} x0 for k < L: x0 (B, H, N) -> (B, Ch, H, L).

    In blocks of T steps (``free_block``): the rows W_t = C Ab^{t+1}, t < T, are built once per feature by
    doubling, the states x_j = Ab^{jT} x0 once per block, and block j of the output is W x_j, one product.
    """
    L = check_int("L", L, minimum=1)
    Ab, _, C = sys
    Bsz = x0.shape[0]
    x = x0.to(Ab.dtype)
    T = free_block(L, Bsz, C.shape[0])
    nb = -(-L // T)
    W, G = _rows(torch.einsum("chn,hnm->chm", C, Ab), Ab, T)  # (Ch, H, T, N)
    states = [x]
    if nb > 1:
        AT = G if T & (T - 1) == 0 else torch.linalg.matrix_power(Ab, T)  # T < L is a power of two
        for _ in range(nb - 1):
            states.append(torch.einsum("hmn,bhn->bhm", AT, states[-1]))
    X = torch.stack(states, dim=2)  # (B, H, nb, N)
    y = torch.einsum("chtn,bhjn->bchjt", W, X)  # (B, Ch, H, nb, T)
    return y.reshape(*y.shape[:3], nb * T)[..., :L]


def final_state(sys: DenseSystem, u: Tensor, x0: Tensor | None = None) -> Tensor:
    """State after the chunk u (B, H, L) from x0 (B, H, N) (None: zeros): x_{L-1} (B, H, N).

    x_{L-1} = Ab^L x0 + sum_j Ab^{L-1-j} Bb u_j, by blocked Krylov products (``ssm.ops.scan``).
    """
    Ab, Bb, _ = sys
    return _scan_final_state(Ab, Bb, u, x0)
