"""Vandermonde matrix-vector product, the core of the S4D (diagonal) kernel.

    out[..., l] = sum_n v[..., n] x[..., n]^l,        l = 0, ..., L - 1

computed in log space, x^l = exp(l log x), as S4D does; with ``log=True`` the caller passes log x directly
(for ZOH that is dt * Lambda, which avoids an exp followed by a log). ``v`` and ``x`` (..., N) broadcast
against each other; batch dimensions along which ``x`` is broadcast share the powers of x.

Every backend splits l = s i + j with s ~ sqrt(L) and forms x^l = x^(s i) x^j from O(sqrt(L)) exponentials
per node, taken in float64 and rounded once, so float32 results keep float32 accuracy at long L (the
direct float32 exp(l log x) loses ~|Im log x| l 2^-24). Backends, resolved by
``ssm.ops.backends.resolve_backend``:

- ``"naive"`` materializes the (W, N, L) power matrix (plain autograd keeps it for the backward);
- ``"chunked"`` never forms it: out[s i + j] = sum_n (v_n x_n^(s i)) x_n^j is one batched matrix product
  per block row, with O(W E N sqrt(L)) temporaries besides the output and a recomputing backward;
- ``"triton"`` is the optional fused CUDA kernel (``ssm.ops.cauchy_triton``);
- ``"auto"`` picks naive or chunked by the size of the (W, N, L) temporary.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_int, traced_size
from .backends import resolve_backend
from .cauchy import check_operands, group_operands, promote_operands

__all__ = ["vandermonde", "vandermonde_ref"]


def _powers(a: torch.Tensor, step: int, count: int) -> torch.Tensor:
    """exp(a step i) for i = 0, ..., count - 1: a (W, N) -> (W, N, count).

    Formed in float64 and rounded once: in float32 the rounding of the exponent a * l alone would cost a
    phase error |Im a| l 2^-24 (~1e-4 at l ~ 1e4); only O(sqrt(L)) such exponentials are needed per node.
    """
    ell = step * torch.arange(count, device=a.device, dtype=torch.float64)
    return torch.exp(a.to(torch.complex128).unsqueeze(-1) * ell).to(a.dtype)


# Block length of a symbolic L (a dynamic length under torch.compile / torch.export), where sqrt(L) is not
# a concrete number: the traced graph then serves every L.
SYMBOLIC_BLOCK = 64


def _blocks(length: int) -> tuple[int, int]:
    """Block length s = ceil(sqrt(L)) and block count q = ceil(L / s), so that l = s i + j, i < q, j < s;
    for a possibly symbolic L (under torch.compile / torch.export: ``traced_size``), s = ``SYMBOLIC_BLOCK``
    and one spare block, so that q >= 2 (a size that is 1 when traced would be specialized to 1)."""
    if traced_size(length):
        return SYMBOLIC_BLOCK, -(-length // SYMBOLIC_BLOCK) + 1
    s = max(1, math.isqrt(length - 1) + 1)
    return s, -(-length // s)


def _vandermonde_naive(v: torch.Tensor, a: torch.Tensor, length: int) -> torch.Tensor:
    """v (W, E, N), a = log x (W, N) -> (W, E, L), materializing exp(a l) (W, N, L).

    The powers are built as exp(a s i) exp(a j) (``_blocks``): one complex product per entry instead of a
    complex exponential (~10x dearer on CPU).
    """
    s, q = _blocks(length)
    if traced_size(length):
        # l = s i + j gathered for l < L, so no slice of the q s powers back to a symbolic L. i by a
        # truncating division (l >= 0): inductor's C++ code for arange(L) // 64 with a symbolic L writes
        # only the first 64 floor(L / 64) entries and leaves the rest uninitialized (docs/deployment.md).
        ell = torch.arange(length, device=a.device)
        i = torch.div(ell, s, rounding_mode="trunc")
        return torch.bmm(v, _powers(a, s, q)[..., i] * _powers(a, 1, s)[..., ell - s * i])
    E = _powers(a, s, q).unsqueeze(-1) * _powers(a, 1, s).unsqueeze(-2)  # (W, N, q, s)
    return torch.bmm(v, E.reshape(*a.shape, q * s)[..., :length])


class _VandermondeBlocked(torch.autograd.Function):
    """Blocked log-Vandermonde product that never forms the (W, N, L) power matrix.

    With l = s i + j (s ~ sqrt(L), ``_blocks``), X[w, n, i] = exp(a s i) and Y[w, n, j] = exp(a j):

        out[w, e, s i + j] = sum_n (v[w, e, n] X[w, n, i]) Y[w, n, j],

    one batched matrix product (E q, N) x (N, s) per w, with temporaries of size O(W E N sqrt(L)) besides the
    output. The backward recomputes X and Y (incoming gradient g (W, E, L), G its (W, E, q, s) view):

        grad_v[w, e, n] = sum_i conj(X[w, n, i]) sum_j G[w, e, i, j] conj(Y[w, n, j])
        grad_a[w, n]    = sum_e conj(v[w, e, n]) (the same sum with G[w, e, i, j] times l = s i + j)
    """

    generate_vmap_rule = True  # forward and setup_context apart: torch.func transforms run it

    @staticmethod
    def forward(v: torch.Tensor, a: torch.Tensor, length: int) -> torch.Tensor:
        W, E, N = v.shape
        s, q = _blocks(length)
        X = _powers(a, s, q)  # (W, N, q)
        Y = _powers(a, 1, s)  # (W, N, s)
        vx = v.unsqueeze(2) * X.transpose(1, 2).unsqueeze(1)  # (W, E, q, N)
        out = torch.bmm(vx.reshape(W, E * q, N), Y)  # (W, E q, s)
        return out.reshape(W, E, q * s)[..., :length]

    @staticmethod
    def setup_context(ctx, inputs, output):
        v, a, length = inputs
        ctx.save_for_backward(v, a)
        ctx.length = length

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        v, a = ctx.saved_tensors
        need_v, need_a = ctx.needs_input_grad[:2]
        W, E, N = v.shape
        s, q = _blocks(ctx.length)
        ac = a.conj()
        Xc = _powers(ac, s, q).transpose(1, 2).unsqueeze(1)  # (W, 1, q, N): conj(X)
        Yc_t = _powers(ac, 1, s).transpose(1, 2).contiguous()  # (W, s, N): conj(Y)^T
        G = torch.nn.functional.pad(g, (0, q * s - ctx.length)).reshape(W, E, q, s)

        def contract(G: torch.Tensor) -> torch.Tensor:  # (W, E, q, s) -> (W, E, N)
            T = torch.bmm(G.reshape(W, E * q, s), Yc_t).reshape(W, E, q, N)
            return (T * Xc).sum(2)

        gv = contract(G) if need_v else None
        ga = None
        if need_a:
            ell = torch.arange(q * s, device=a.device, dtype=a.real.dtype).reshape(q, s)
            ga = (v.conj() * contract(G * ell)).sum(1)
        return gv, ga, None


def vandermonde(
    v: torch.Tensor, x: torch.Tensor, L: int, *, log: bool = False, backend: str = "auto"
) -> torch.Tensor:
    """Vandermonde product out[..., l] = sum_n v[..., n] x[..., n]^l for l = 0..L-1.

    Args:
        v: (..., N) complex (real is promoted).
        x: (..., N) nodes (nonzero), or their logarithms if ``log=True``; batch shape broadcasts with ``v``'s.
        L: number of powers, >= 1.
        log: ``x`` holds log of the nodes (S4D's log-Vandermonde).
        backend: ``"auto"``, ``"naive"``, ``"chunked"`` or ``"triton"`` (see ``ssm.ops.cauchy``).

    Returns:
        (..., L) complex. Differentiable in ``v`` and ``x``.
    """
    check_operands(v, x, "x")
    length = check_int("L", L, minimum=1)
    v, x = promote_operands(v, x)
    a = x if log else torch.log(x)
    vg, ag, restore = group_operands(v, a)
    wsize, esize, n = vg.shape
    itemsize = a.element_size()
    name = resolve_backend("vandermonde", backend, a.device, nbytes=wsize * n * length * itemsize)
    if name == "naive":
        out = _vandermonde_naive(vg, ag, length)
    elif name == "chunked":
        out = _VandermondeBlocked.apply(vg, ag, length)
    else:
        from .cauchy_triton import vandermonde_triton

        out = vandermonde_triton(vg, ag, length)
    return restore(out)


def vandermonde_ref(v: torch.Tensor, x: torch.Tensor, L: int, *, log: bool = False) -> torch.Tensor:
    """Reference twin of ``vandermonde``: explicit integer powers, materializing (..., N, L)."""
    v, x = promote_operands(v, x)
    if log:
        x = torch.exp(x)
    powers = [torch.ones_like(x)]
    for _ in range(1, L):
        powers.append(powers[-1] * x)
    powers = torch.stack(powers, dim=-1)  # (..., N, L)
    return (v.unsqueeze(-1) * powers).sum(-2)
