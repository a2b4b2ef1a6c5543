"""Cauchy matrix-vector product, the core of the S4 (DPLR) kernel.

    out[..., l] = sum_n v[..., n] / (z[l] - w[..., n])

``v`` and ``w`` (..., N) broadcast against each other, ``z`` (L,) is shared. In the S4 kernel ``z`` holds the
(bilinear-transformed) roots of unity, ``w = dt * Lambda`` and ``v`` the products of the B/P and C/Q vectors
(S4 paper, Sec. 3.3 and Alg. 1).

Backends (chosen by ``ssm.ops.backends.resolve_backend``, the same for ``ssm.ops.vandermonde``):

- ``"naive"``: materializes the (W, N, L) matrix 1 / (z - w) and multiplies (batched matmul); plain autograd,
  which keeps that matrix for the backward pass. Fastest for small problems.
- ``"chunked"``: pure torch, a custom ``autograd.Function`` that walks over chunks of ``z`` in the forward
  and recomputes each chunk in the backward, so peak memory is the output plus a few (W, N, chunk)
  temporaries of ``CHUNK_BYTES`` each, never the (W, N, L) intermediate.
- ``"triton"``: optional, CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``), needs ``pip install
  triton``; fused kernel that never materializes the intermediate (``ssm.ops.cauchy_triton``).
- ``"auto"``: ``"triton"`` on CUDA when the package is installed and its kernel agrees with the reference
  on a probe (checked once per device); otherwise ``"naive"`` when the (W, N, L) temporary needs at most
  ``AUTO_NAIVE_MAX_BYTES``, else ``"chunked"``. The layers pass their ``backend`` argument through.

Here W is the number of distinct ``w`` rows (``w``'s batch size); batch dimensions of ``v`` along which ``w``
is broadcast (output channels, the Woodbury B/P x C/Q products) share one 1 / (z - w) matrix. The operand
helpers ``check_operands``, ``promote_operands`` and ``group_operands`` serve ``ssm.ops.vandermonde`` too.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .._checks import check_tensor
from .backends import OPS, resolve_backend

__all__ = ["cauchy", "cauchy_ref", "BACKENDS", "AUTO_NAIVE_MAX_BYTES", "CHUNK_BYTES"]

BACKENDS = OPS["cauchy"].backends  # ("auto", "naive", "chunked", "triton"), resolved by ssm.ops.backends

# "auto" uses the materialized product while its (W, N, L) temporary stays below this many bytes.
AUTO_NAIVE_MAX_BYTES = 16 * 2**20
# The chunked backend sizes its chunks so that one (W, N, chunk) temporary needs about this many bytes
# (at least one z point per chunk): peak memory is the output plus a few such temporaries. Much smaller
# chunks cost time: many small batched matmuls and elementwise calls, each with its own overhead; much
# larger ones too: glibc serves blocks of 32 MiB and more by fresh mmap, whose pages fault in on every
# use (the S4 kernel's Cauchy products, fwd+bwd at H = 256, N = 64, L = 4096 on a 2-core CPU: 685 ms at
# 32 MiB, 228 ms at 4 MiB, 441 ms at 512 KiB).
CHUNK_BYTES = 4 * 2**20

def group_operands(v: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Callable]:
    """Arrange broadcasting v (..., N), w (..., N) as v (W, E, N), w (W, N).

    W collects the batch dimensions along which ``w`` varies, E the ones along which it is broadcast, so
    that one (W, N, L) matrix serves all E rows of ``v``. Returns the two tensors and a function that puts an
    output (W, E, L) back to the broadcast batch shape (..., L).
    """
    n = v.shape[-1]
    batch = tuple(torch.broadcast_shapes(v.shape[:-1], w.shape[:-1]))
    nb = len(batch)
    w = w.reshape((1,) * (nb + 1 - w.ndim) + tuple(w.shape))
    wdims = [d for d in range(nb) if w.shape[d] != 1]
    edims = [d for d in range(nb) if w.shape[d] == 1]
    perm = wdims + edims + [nb]
    wsize = math.prod([batch[d] for d in wdims])  # lists, not generators: torch.compile traces them
    esize = math.prod([batch[d] for d in edims])
    v = v.expand(*batch, n).permute(perm).reshape(wsize, esize, n)
    w = w.permute(perm).reshape(wsize, n)
    inverse = [perm.index(d) for d in range(nb + 1)]
    grouped_shape = [batch[d] for d in wdims] + [batch[d] for d in edims]

    def restore(out: torch.Tensor) -> torch.Tensor:
        return out.reshape(grouped_shape + [out.shape[-1]]).permute(inverse)

    return v, w, restore


def check_operands(v: torch.Tensor, w: torch.Tensor, wname: str) -> None:
    """Check v (..., N) and w (..., N): tensors with at least one dimension, equal N, broadcasting batch."""
    check_tensor("v", v)
    check_tensor(wname, w)
    shapes = f"got v {tuple(v.shape)}, {wname} {tuple(w.shape)}"
    if v.ndim < 1 or w.ndim < 1:
        raise ValueError(f"v and {wname} must have at least one dimension (N); {shapes}")
    if v.shape[-1] != w.shape[-1]:
        raise ValueError(f"v and {wname} must have the same last dimension N; {shapes}")
    try:
        torch.broadcast_shapes(v.shape[:-1], w.shape[:-1])
    except RuntimeError:
        raise ValueError(f"{wname}'s batch shape must broadcast against v's; {shapes}") from None


def promote_operands(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Cast all tensors to their common complex dtype."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_complex:
        dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return [t.to(dtype) for t in tensors]


def _chunk_len(wsize: int, n: int, length: int, itemsize: int) -> int:
    """Number of points per chunk so that a (W, N, chunk) temporary needs at most ``CHUNK_BYTES``."""
    return max(1, min(length, CHUNK_BYTES // max(1, wsize * n * itemsize)))


def _cauchy_naive(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """v (W, E, N), z (L,), w (W, N) -> (W, E, L), materializing 1 / (z - w) (W, N, L)."""
    r = (z - w.unsqueeze(-1)).reciprocal()  # (W, N, L)
    return torch.bmm(v, r)


class _CauchyChunked(torch.autograd.Function):
    """Chunked Cauchy product with a recomputing backward (peak memory O(W E L + W N chunk)).

    With r[w, n, l] = 1 / (z[l] - w[w, n]) and incoming gradient g (W, E, L) (torch's convention for
    complex autograd: grad_x = sum g * conj(d out / d x) for holomorphic maps):

        grad_v[w, e, n] = sum_l g[w, e, l] conj(r[w, n, l])
        grad_w[w, n]    = sum_e conj(v[w, e, n]) sum_l g[w, e, l] conj(r[w, n, l])^2
        grad_z[l]       = -sum_{w, e, n} g[w, e, l] conj(v[w, e, n]) conj(r[w, n, l])^2
    """

    generate_vmap_rule = True  # forward and setup_context apart: torch.func transforms run it

    @staticmethod
    def forward(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, chunk: int) -> torch.Tensor:
        length = z.shape[0]
        out = v.new_empty(v.shape[0], v.shape[1], length)
        wc = w.unsqueeze(-1)
        for s in range(0, length, chunk):
            r = (z[s : s + chunk] - wc).reciprocal()  # (W, N, c)
            out[:, :, s : s + chunk] = torch.bmm(v, r)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        v, z, w, chunk = inputs
        ctx.save_for_backward(v, z, w)
        ctx.chunk = chunk

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        v, z, w = ctx.saved_tensors
        need_v, need_z, need_w = ctx.needs_input_grad[:3]
        length = z.shape[0]
        gv = torch.zeros_like(v) if need_v else None
        tw = torch.zeros_like(v) if need_w else None
        gz = torch.empty_like(z) if need_z else None
        cv_t = v.conj().transpose(1, 2).contiguous()  # (W, N, E)
        zc = z.conj().unsqueeze(-1)  # (L, 1)
        wc = w.conj().unsqueeze(1)  # (W, 1, N)
        for s in range(0, length, ctx.chunk):
            gc = g[:, :, s : s + ctx.chunk]  # (W, E, c)
            rc_t = (zc[s : s + ctx.chunk] - wc).reciprocal()  # (W, c, N): conj(r) transposed, contiguous
            if need_v:
                gv += torch.bmm(gc, rc_t)
            if need_w or need_z:
                sq_t = rc_t * rc_t
                if need_w:
                    tw += torch.bmm(gc, sq_t)
                if need_z:
                    u_t = torch.bmm(sq_t, cv_t)  # (W, c, E)
                    gz[s : s + ctx.chunk] = -(gc * u_t.transpose(1, 2)).sum((0, 1))
        gw = (v.conj() * tw).sum(1) if need_w else None
        return gv, gz, gw, None


def cauchy(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Cauchy matrix-vector product out[..., l] = sum_n v[..., n] / (z[l] - w[..., n]).

    Args:
        v: (..., N) complex (real is promoted).
        z: (L,) evaluation points.
        w: (..., N) poles; its batch shape broadcasts against ``v``'s.
        backend: ``"auto"``, ``"naive"``, ``"chunked"`` or ``"triton"`` (see the module docstring).

    Returns:
        (..., L) complex, the broadcast batch shape of ``v`` and ``w``. Differentiable in ``v``, ``z``, ``w``.
    """
    check_tensor("z", z, ndim=1)
    check_operands(v, w, "w")
    v, z, w = promote_operands(v, z, w)
    vg, wg, restore = group_operands(v, w)
    wsize, esize, n = vg.shape
    length = z.shape[0]
    itemsize = z.element_size()
    name = resolve_backend("cauchy", backend, z.device, nbytes=wsize * n * length * itemsize)
    if name == "naive":
        out = _cauchy_naive(vg, z, wg)
    elif name == "chunked":
        out = _CauchyChunked.apply(vg, z, wg, _chunk_len(wsize, n, length, itemsize))
    else:
        from .cauchy_triton import cauchy_triton

        out = cauchy_triton(vg, z, wg)
    return restore(out)


def cauchy_ref(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reference twin of ``cauchy``: the plain broadcast sum, materializing (..., N, L)."""
    v, z, w = promote_operands(v, z, w)
    return (v.unsqueeze(-1) / (z - w.unsqueeze(-1))).sum(-2)
