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

from .._checks import check_int, check_tensor, traced, traced_size, twin_backward
from .backends import resolve_backend
from .cauchy import check_operands, group_operands, promote_operands

__all__ = ["vandermonde", "vandermonde_pairs", "vandermonde_pairs_ref", "vandermonde_ref"]


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


def _block_sums(v: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, length: int) -> torch.Tensor:
    """out[w, e, s i + j] = sum_n (v[w, e, n] X[w, n, i]) Y[w, n, j]: v (W, E, N), X (W, N, q), Y (W, N, s)
    -> (W, E, L), one batched matrix product (E q, N) x (N, s) per w."""
    W, E, N = v.shape
    q, s = X.shape[-1], Y.shape[-1]
    vx = v.unsqueeze(2) * X.transpose(1, 2).unsqueeze(1)  # (W, E, q, N)
    return torch.bmm(vx.reshape(W, E * q, N), Y).reshape(W, E, q * s)[..., :length]


def _block_adjoint(G: torch.Tensor, Xc: torch.Tensor, Yc_t: torch.Tensor) -> torch.Tensor:
    """sum_i Xc[w, 0, i, n] sum_j G[w, e, i, j] Yc_t[w, j, n]: G (W, E, q, s), Xc (W, 1, q, N), Yc_t (W, s, N)
    -> (W, E, N), the adjoint of ``_block_sums`` in v (with conjugated powers)."""
    W, E, q, s = G.shape
    T = torch.bmm(G.reshape(W, E * q, s), Yc_t).reshape(W, E, q, -1)
    return (T * Xc).sum(2)


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
        s, q = _blocks(length)
        return _block_sums(v, _powers(a, s, q), _powers(a, 1, s), length)  # X (W, N, q), Y (W, N, s)

    @staticmethod
    def setup_context(ctx, inputs, output):
        v, a, length = inputs
        ctx.save_for_backward(v, a)
        ctx.length = length

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        v, a = ctx.saved_tensors
        need_v, need_a = ctx.needs_input_grad[:2]
        W, E = v.shape[:2]
        s, q = _blocks(ctx.length)
        ac = a.conj()
        Xc = _powers(ac, s, q).transpose(1, 2).unsqueeze(1)  # (W, 1, q, N): conj(X)
        Yc_t = _powers(ac, 1, s).transpose(1, 2).contiguous()  # (W, s, N): conj(Y)^T
        G = torch.nn.functional.pad(g, (0, q * s - ctx.length)).reshape(W, E, q, s)
        gv = _block_adjoint(G, Xc, Yc_t) if need_v else None
        ga = None
        if need_a:
            ell = torch.arange(q * s, device=a.device, dtype=a.real.dtype).reshape(q, s)
            ga = (v.conj() * _block_adjoint(G * ell, Xc, Yc_t)).sum(1)
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


# ---- power sums of conjugate pairs: wide nodes, narrow products, real series out ----

#: Rows of the grouped products of ``vandermonde_pairs`` per step: their (rows, E, L) complex temporaries stay
#: near this many bytes (blocks of 32 MiB and more cost page faults on every use, see ``ssm.ops.cauchy``).
PAIRS_GROUP_BYTES = 8 * 2**20


def _chain_powers(x: torch.Tensor, count: int) -> torch.Tensor:
    """x^0, ..., x^(count-1): x (W, N) -> (W, N, count) by doubling products (each power a product of at most
    2 log2(count) factors, no logarithm: exact at x = 0); plain ops."""
    P = torch.ones_like(x).unsqueeze(-1)
    while P.shape[-1] < count:
        top = P[..., -1:] * x.unsqueeze(-1)  # x^m for the m powers in P
        P = torch.cat([P, P[..., : count - P.shape[-1]] * top], dim=-1)
    return P


def _pair_powers(x: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, Y) = (x^(s i), x^j), i < q, j < s (``_blocks``), formed in x's precision, rounded once to dtype."""
    s, q = _blocks(length)
    Y = _chain_powers(x, s)  # (W, N, s)
    X = _chain_powers(Y[..., -1] * x, q)  # (W, N, q)
    return X.to(dtype), Y.to(dtype)


def _pairs_plain(x: torch.Tensor, length: int, dtype: torch.dtype, v: torch.Tensor) -> torch.Tensor:
    """2 Re sum_n v[w, e, n] x[w, n]^l -> (W, E, L) in ``dtype``, plain ops (the traced route and the
    double-backward twin)."""
    X, Y = _pair_powers(x, length, v.dtype)
    return (2 * _block_sums(v, X, Y, length).real).to(dtype)


class _VandermondePairs(torch.autograd.Function):
    """v (W, E, N) narrow complex, x (W, N) wide -> 2 Re (v x^l) (E, W, L) real, by groups of rows ``W``.

    With l = s i + j, X = x^(s i), Y = x^j (wide, rounded once to v's dtype) and G = 2 g (g the gradient):

        grad v[w, e, n] = sum_l G[e, w, l] conj(x^l),
        grad x[w, n]    = sum_e conj(v[w, e, n]) sum_l (l + 1) G[e, w, l + 1] conj(x^l),

    both contractions of the shape of the forward (the second on the shifted, weighted gradient).
    """

    @staticmethod
    def forward(ctx, x, length, dtype, v):
        W, E = v.shape[:2]
        X, Y = _pair_powers(x, length, v.dtype)
        s, q = Y.shape[-1], X.shape[-1]
        out = v.new_empty((E, W, length), dtype=dtype)
        g = max(1, min(W, PAIRS_GROUP_BYTES // (E * q * s * v.element_size())))
        for w in range(0, W, g):
            out[:, w:w + g] = 2 * _block_sums(v[w:w + g], X[w:w + g], Y[w:w + g], length).real.transpose(0, 1)
        ctx.save_for_backward(x, v, X, Y)
        ctx.length = length
        return out

    @staticmethod
    def backward(ctx, grad):
        x, v = ctx.saved_tensors[:2]
        length = ctx.length
        if torch.is_grad_enabled():  # create_graph: the plain twin's gradients, with their graph
            def twin(x, v):
                return _pairs_plain(x, length, grad.dtype, v).transpose(0, 1)

            gx, gv = twin_backward(twin, (x, v), (ctx.needs_input_grad[0], ctx.needs_input_grad[3]), (grad,))
            return gx, None, None, gv
        X, Y = ctx.saved_tensors[2:]
        W, E = v.shape[:2]
        s, q = Y.shape[-1], X.shape[-1]
        Xc = X.conj().transpose(1, 2).unsqueeze(1)  # (W, 1, q, N)
        Yc_t = Y.conj().transpose(1, 2).contiguous()  # (W, s, N)
        ell = torch.arange(1, length, device=grad.device, dtype=grad.dtype)
        gv = v.new_empty(v.shape)
        gx = x.new_zeros(x.shape) if ctx.needs_input_grad[0] else None
        rows = 2 * E if gx is not None else E
        g = max(1, min(W, PAIRS_GROUP_BYTES // (rows * q * s * v.element_size())))
        for w in range(0, W, g):
            G = 2 * grad[:, w:w + g].transpose(0, 1)  # (g, E, L)
            if gx is not None:  # the shifted, weighted gradient (l + 1) G[l + 1]
                G = torch.cat([G, torch.nn.functional.pad(G[..., 1:] * ell, (0, 1))], dim=1)
            G = torch.nn.functional.pad(G, (0, q * s - length)).to(v.dtype).unflatten(-1, (q, s))
            c = _block_adjoint(G, Xc[w:w + g], Yc_t[w:w + g])  # (g, rows, N)
            gv[w:w + g] = c[:, :E]
            if gx is not None:
                gx[w:w + g] = (v[w:w + g].conj() * c[:, E:]).sum(1).to(x.dtype)
        return gx, None, None, gv if ctx.needs_input_grad[3] else None


def vandermonde_pairs(
    v: torch.Tensor, x: torch.Tensor, L: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Power sums of N conjugate pairs, out[e, w, l] = 2 Re sum_n v[e, w, n] x[w, n]^l, l < L.

    The powers are formed in x's precision (pass complex128 nodes for float32 accuracy at long L) by products,
    not logarithms (x = 0 is allowed), and rounded once to v's dtype, where the sums run.

    Args:
        v: (E, W, N) complex64 or complex128 coefficients.
        x: (W, N) complex nodes, at least as wide as v.
        L: number of powers, >= 1.
        dtype: real dtype of the result (default: v's real dtype).

    Returns:
        (E, W, L) real. Differentiable in v and x (exact higher derivatives).
    """
    check_tensor("v", v, ndim=3)
    check_tensor("x", x, ndim=2)
    if not (v.is_complex() and x.is_complex()):
        raise ValueError(f"v and x must be complex; got {v.dtype} and {x.dtype}")
    if v.dtype == torch.complex128 and x.dtype == torch.complex64:
        raise ValueError("x must be at least as wide as v (the powers are rounded to v's dtype); got v "
                         "complex128 and x complex64")
    if v.device != x.device:
        raise ValueError(f"v and x must be on one device; got {v.device} and {x.device}")
    if tuple(v.shape[1:]) != tuple(x.shape):
        raise ValueError(f"v must have shape (E, W, N) with (W, N) = x's shape {tuple(x.shape)}; got "
                         f"{tuple(v.shape)}")
    length = L if traced_size(L) else check_int("L", L, minimum=1)
    dtype = v.real.dtype if dtype is None else dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    vw = v.transpose(0, 1)  # (W, E, N)
    if traced() or traced_size(length):
        return _pairs_plain(x, length, dtype, vw).transpose(0, 1)
    return _VandermondePairs.apply(x, length, dtype, vw.contiguous())


def vandermonde_pairs_ref(v: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    """Reference twin of ``vandermonde_pairs``: explicit powers in complex128, (E, W, L) float64."""
    return 2 * vandermonde_ref(v.to(torch.complex128), x.to(torch.complex128), L).real
