"""Cauchy and Vandermonde primitives: every backend against its reference twin, gradients, memory, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tol
from torch.autograd import gradcheck

from ssm.ops import cauchy as cauchy_mod
from ssm.ops.backends import resolve_backend
from ssm.ops.cauchy import cauchy, cauchy_ref
from ssm.ops.vandermonde import vandermonde, vandermonde_ref

CPU_BACKENDS = ["naive", "chunked", "auto"]
C128 = torch.complex128
# Two backends in one precision agree far better than either agrees with the float64 truth (tol(complex64)).
SAME_PRECISION_RTOL = 1e-6


def _crandn(*shape, dtype=C128, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _poles(*shape, dtype=C128, device="cpu"):
    """Stable poles (negative real part) as in the S4 kernel: w = dt * Lambda."""
    re = -torch.rand(*shape, dtype=torch.float64) - 0.05
    im = 3 * torch.randn(*shape, dtype=torch.float64)
    return torch.complex(re, im).to(dtype=dtype, device=device)


def _nodes(*shape, dtype=C128, device="cpu"):
    """Vandermonde nodes inside the unit disk (|x| in [0.5, 1))."""
    mod = 0.5 + 0.49 * torch.rand(*shape, dtype=torch.float64)
    ang = 6.3 * torch.rand(*shape, dtype=torch.float64)
    return torch.polar(mod, ang).to(dtype=dtype, device=device)


# Broadcasting layouts: (v shape, w shape). The S4 kernel uses v (Ch+R, 1+R, H, N) against w (H, N).
SHAPES = [
    ((7,), (7,)),
    ((5, 7), (5, 7)),
    ((3, 2, 5, 7), (5, 7)),
    ((5, 7), (2, 5, 7)),
    ((4, 1, 7), (1, 3, 7)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("vshape,wshape", SHAPES)
def test_cauchy_matches_reference(backend, vshape, wshape):
    v, w = _crandn(*vshape), _poles(*wshape)
    z = 1j * 2 * torch.randn(11, dtype=torch.float64)
    ref = cauchy_ref(v, z, w)
    out = cauchy(v, z, w, backend=backend)
    assert out.shape == torch.broadcast_shapes(vshape[:-1], wshape[:-1]) + (11,)
    torch.testing.assert_close(out, ref, **tol(C128))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("vshape,wshape", SHAPES)
def test_vandermonde_matches_reference(backend, vshape, wshape):
    v, x = _crandn(*vshape), _nodes(*wshape)
    ref = vandermonde_ref(v, x, 13)
    torch.testing.assert_close(vandermonde(v, x, 13, backend=backend), ref, **tol(C128))
    torch.testing.assert_close(vandermonde(v, torch.log(x), 13, log=True, backend=backend), ref, **tol(C128))


def test_cauchy_ref_is_the_plain_sum():
    v, w = _crandn(2, 3), _poles(2, 3)
    z = _crandn(4)
    out = cauchy_ref(v, z, w)
    for i in range(2):
        for l in range(4):
            want = sum(v[i, n] / (z[l] - w[i, n]) for n in range(3))
            assert abs(complex(out[i, l]) - complex(want)) < 1e-12


def test_vandermonde_ref_is_the_plain_sum():
    v, x = _crandn(2, 3), _nodes(2, 3)
    out = vandermonde_ref(v, x, 5)
    for i in range(2):
        for l in range(5):
            want = sum(complex(v[i, n]) * complex(x[i, n]) ** l for n in range(3))
            assert abs(complex(out[i, l]) - want) < 1e-12


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunked_cauchy_any_chunk(chunk, monkeypatch):
    """The chunked Cauchy backend has the values and gradients of the reference whatever the chunk length."""
    W, E, N, L = 2, 3, 5, 11
    monkeypatch.setattr(cauchy_mod, "CHUNK_BYTES", chunk * W * N * 16)  # chunk points of complex128 (W, N)
    v = _crandn(W, E, N).requires_grad_()
    w = _poles(W, 1, N).requires_grad_()
    z = (1j * torch.randn(L, dtype=torch.float64)).to(C128).requires_grad_()
    assert max(_chunk_widths(monkeypatch, lambda: cauchy(v, z, w, backend="chunked"))) == min(chunk, L)
    out = cauchy(v, z, w, backend="chunked")
    ref = cauchy_ref(v, z, w)
    g = _crandn(*out.shape)
    grads = torch.autograd.grad(out, (v, z, w), g)
    ref_grads = torch.autograd.grad(ref, (v, z, w), g)
    torch.testing.assert_close(out, ref, **tol(C128))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol(C128))


@pytest.mark.parametrize("L", [1, 2, 11, 16, 17])
def test_blocked_vandermonde_any_length(L):
    """The blocked Vandermonde backend (l = s i + j) matches the plain powers, values and gradients,
    for lengths that are and are not perfect squares."""
    v = _crandn(2, 3, 5).requires_grad_()
    a = torch.log(_nodes(2, 1, 5)).requires_grad_()
    out = vandermonde(v, a, L, log=True, backend="chunked")
    g = _crandn(*out.shape)
    grads = torch.autograd.grad(out, (v, a), g)
    ref = (v.unsqueeze(-1) * torch.exp(a.unsqueeze(-1) * torch.arange(L, dtype=torch.float64))).sum(-2)
    ref_grads = torch.autograd.grad(ref, (v, a), g)
    torch.testing.assert_close(out, ref, **tol(C128))
    for a_, b_ in zip(grads, ref_grads):
        torch.testing.assert_close(a_, b_, **tol(C128))


@pytest.mark.parametrize("backend", ["naive", "chunked"])
def test_cauchy_gradcheck(backend):
    v = _crandn(2, 2, 3).requires_grad_()
    w = _poles(2, 3).requires_grad_()
    z = (1j * torch.randn(5, dtype=torch.float64)).to(C128).requires_grad_()
    assert gradcheck(lambda v, z, w: cauchy(v, z, w, backend=backend), (v, z, w))
    # the backward is differentiable too (create_graph: gradient penalties, Hessian-vector products)
    assert torch.autograd.gradgradcheck(lambda v, z, w: cauchy(v, z, w, backend=backend), (v, z, w))


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("backend", ["naive", "chunked"])
def test_vandermonde_gradcheck(backend, log):
    v = _crandn(2, 2, 3).requires_grad_()
    x = _nodes(2, 3)
    x = (torch.log(x) if log else x).requires_grad_()
    assert gradcheck(lambda v, x: vandermonde(v, x, 6, log=log, backend=backend), (v, x))
    assert torch.autograd.gradgradcheck(lambda v, x: vandermonde(v, x, 6, log=log, backend=backend), (v, x))


def _backends(device: torch.device) -> list[str]:
    """Backends to compare on ``device``: Triton joins on CUDA when installed."""
    from ssm.ops import cauchy_triton

    extra = ["triton"] if device.type == "cuda" and cauchy_triton.available() else []
    return ["naive", "chunked"] + extra


def test_backends_agree_float32(device):
    """float32 (complex64): naive and chunked agree, and both are within float32 tolerance of float64."""
    v, w = _crandn(3, 8, 16, device=device), _poles(8, 16, device=device)
    z = (2j * torch.tan(torch.linspace(0, 1.5, 300, dtype=torch.float64))).to(C128).to(device)
    ref = cauchy_ref(v, z, w)
    c64 = torch.complex64
    outs = {b: cauchy(v.to(c64), z.to(c64), w.to(c64), backend=b) for b in _backends(device)}
    assert outs["naive"].dtype == c64
    for b in outs:
        assert rel_err(outs[b], outs["naive"]) < SAME_PRECISION_RTOL
        assert rel_err(outs[b], ref) < tol(c64)["rtol"]

    x = _nodes(8, 16, device=device)
    ref = vandermonde_ref(v, x, 300)
    outs = {b: vandermonde(v.to(c64), x.to(c64), 300, backend=b) for b in _backends(device)}
    for b in outs:
        assert rel_err(outs[b], outs["naive"]) < SAME_PRECISION_RTOL
        assert rel_err(outs[b], ref) < tol(c64)["rtol"]


def test_real_inputs_are_promoted():
    v = torch.randn(2, 4, dtype=torch.float64)
    w = -torch.rand(2, 4, dtype=torch.float64) - 0.1
    z = torch.randn(6, dtype=torch.float64)
    out = cauchy(v, z, w)
    assert out.dtype == C128
    torch.testing.assert_close(out, cauchy_ref(v.to(C128), z.to(C128), w.to(C128)), **tol(C128))
    assert vandermonde(v.float(), torch.rand(2, 4), 3).dtype == torch.complex64


def _saved_bytes(fn):
    """Bytes of all tensors that autograd saves for the backward pass while running ``fn``."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(total), out


def test_chunked_does_not_keep_the_intermediate(monkeypatch):
    """The chunked backward recomputes: autograd keeps only the operands, not the (W, N, L) matrix."""
    H, N, L = 4, 32, 2048
    v = _crandn(2, H, N).requires_grad_()
    w = _poles(H, N).requires_grad_()
    z = (1j * torch.randn(L, dtype=torch.float64)).to(C128)
    big = H * N * L * 16
    inputs = (v.numel() + w.numel() + z.numel()) * 16
    saved_naive, _ = _saved_bytes(lambda: cauchy(v, z, w, backend="naive"))
    saved_chunked, out = _saved_bytes(lambda: cauchy(v, z, w, backend="chunked"))
    assert saved_naive >= big
    assert saved_chunked <= 2 * inputs < big
    out.abs().sum().backward()  # the recomputing backward runs

    a = torch.log(_nodes(H, N)).requires_grad_()
    saved_naive, _ = _saved_bytes(lambda: vandermonde(v, a, L, log=True, backend="naive"))
    saved_chunked, _ = _saved_bytes(lambda: vandermonde(v, a, L, log=True, backend="chunked"))
    assert saved_naive >= big
    assert saved_chunked <= 2 * inputs < big


def _chunk_widths(monkeypatch, fn) -> list[int]:
    """Widths (last dimension) of the 1 / (z - w) blocks that the chunked Cauchy forward multiplies by."""
    widths = []
    bmm = torch.bmm

    def recording_bmm(a, b):
        widths.append(b.shape[-1])
        return bmm(a, b)

    monkeypatch.setattr(torch, "bmm", recording_bmm)
    with torch.no_grad():
        fn()
    monkeypatch.setattr(torch, "bmm", bmm)
    return widths


def test_chunk_length_respects_the_budget(monkeypatch):
    """One (W, N, chunk) temporary needs at most CHUNK_BYTES (or one z point, if that is already more)."""
    W, N, itemsize = 4, 16, 8  # complex64
    v, w = _crandn(W, N, dtype=torch.complex64), _poles(W, N, dtype=torch.complex64)
    monkeypatch.setattr(cauchy_mod, "CHUNK_BYTES", 4096)
    z = _crandn(1000, dtype=torch.complex64)
    widths = _chunk_widths(monkeypatch, lambda: cauchy(v, z, w, backend="chunked"))
    assert max(widths) == 8 and W * N * max(widths) * itemsize <= 4096 and sum(widths) == 1000
    assert _chunk_widths(monkeypatch, lambda: cauchy(v, z[:5], w, backend="chunked")) == [5]
    monkeypatch.setattr(cauchy_mod, "CHUNK_BYTES", W * N * itemsize - 1)  # less than one point
    assert _chunk_widths(monkeypatch, lambda: cauchy(v, z[:5], w, backend="chunked")) == [1] * 5


def test_public_chunked_path_with_many_chunks(monkeypatch):
    monkeypatch.setattr(cauchy_mod, "CHUNK_BYTES", 3 * 4 * 2 * 16)  # 3 points of W * N * 16 bytes per chunk
    v, w = _crandn(2, 4, 2).requires_grad_(), _poles(4, 2).requires_grad_()
    z = (1j * torch.randn(10, dtype=torch.float64)).to(C128)
    torch.testing.assert_close(cauchy(v, z, w, backend="chunked"), cauchy_ref(v, z, w), **tol(C128))
    x = _nodes(4, 2)
    want = vandermonde_ref(v, x, 10)
    torch.testing.assert_close(vandermonde(v, x, 10, backend="chunked"), want, **tol(C128))
    assert gradcheck(lambda v, w: cauchy(v, z, w, backend="chunked"), (v, w))


@pytest.mark.parametrize("op", ["cauchy", "vandermonde"])
def test_resolve_backend(monkeypatch, op):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert resolve_backend(op, "auto", cpu, nbytes=1024) == "naive"
    assert resolve_backend(op, "auto", cpu, nbytes=cauchy_mod.AUTO_NAIVE_MAX_BYTES + 1) == "chunked"
    assert resolve_backend(op, "naive", cpu, nbytes=10**12) == "naive"
    assert resolve_backend(op, "chunked", cpu, nbytes=1) == "chunked"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend(op, "keops", cpu, nbytes=1)
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA"):
        resolve_backend(op, "triton", cpu, nbytes=1)
    from ssm.ops import cauchy_triton

    monkeypatch.setattr(cauchy_triton, "available", lambda: False)
    with pytest.raises(ImportError, match="pip install triton"):
        resolve_backend(op, "triton", torch.device("cuda"), nbytes=1)


def test_triton_on_cpu_tensors_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    v, w = _crandn(2, 3), _poles(2, 3)
    with pytest.raises(ValueError, match="backend"):
        cauchy(v, _crandn(4), w, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        vandermonde(v, _nodes(2, 3), 4, backend="triton")


def test_bad_inputs():
    v, w, z = _crandn(2, 3), _poles(2, 3), _crandn(4)
    with pytest.raises(ValueError, match="v and w"):
        cauchy(v, z, _poles(2, 4))
    with pytest.raises(ValueError, match="w's batch shape"):
        cauchy(v, z, _poles(3, 3))
    with pytest.raises(ValueError, match="z"):
        cauchy(v, z.reshape(2, 2), w)
    with pytest.raises(ValueError, match="v"):
        cauchy(v.numpy(), z, w)
    with pytest.raises(ValueError, match="backend"):
        cauchy(v, z, w, backend="fast")
    with pytest.raises(ValueError, match="L"):
        vandermonde(v, _nodes(2, 3), 0)
    with pytest.raises(ValueError, match="v and x"):
        vandermonde(v, _nodes(2, 4), 3)
    with pytest.raises(ValueError, match="backend"):
        vandermonde(v, _nodes(2, 3), 3, backend="fast")
