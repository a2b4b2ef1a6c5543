"""Double backward (create_graph=True: gradient penalties, Hessian-vector products) through the custom
autograd.Functions: the ones whose backward is differentiable give the plain-autograd twin's higher
derivatives (tests/test_cauchy.py and tests/test_fftconv.py gradgradcheck them); the others raise a
RuntimeError naming the op and its twin, where torch's once_differentiable alone gave wrong second
derivatives or an obscure in-place error."""

from __future__ import annotations

import pytest
import torch

import ssm
from ssm.ops.causal_conv import causal_conv1d_fn, causal_conv1d_ref
from ssm.ops.selective_scan import selective_scan_fn, selective_scan_ref
from ssm.ops.ssd import mamba_chunk_scan_combined, mamba_chunk_scan_ref

F64 = torch.float64


def _inputs_selective():
    torch.manual_seed(0)
    B, D, N, L = 2, 3, 4, 10
    u, delta = torch.randn(B, D, L, dtype=F64), torch.rand(B, D, L, dtype=F64)
    A = -torch.rand(D, N, dtype=F64)
    Bm, Cm = torch.randn(B, N, L, dtype=F64), torch.randn(B, N, L, dtype=F64)
    return [t.requires_grad_() for t in (u, delta, A, Bm, Cm)]


def _inputs_ssd():
    torch.manual_seed(1)
    b, L, h, p, n = 2, 12, 2, 3, 4
    x, dt = torch.randn(b, L, h, p, dtype=F64), torch.rand(b, L, h, dtype=F64)
    A = -torch.rand(h, dtype=F64)
    Bm, Cm = torch.randn(b, L, 1, n, dtype=F64), torch.randn(b, L, 1, n, dtype=F64)
    return [t.requires_grad_() for t in (x, dt, A, Bm, Cm)]


def _inputs_conv():
    torch.manual_seed(2)
    return [torch.randn(2, 3, 9, dtype=F64).requires_grad_(), torch.randn(3, 4, dtype=F64).requires_grad_()]


CASES = {
    "causal_conv1d_fn": (lambda a: causal_conv1d_fn(*a, activation="silu"),
                         lambda a: causal_conv1d_ref(*a, activation="silu"), _inputs_conv),
    "selective_scan_fn": (lambda a: selective_scan_fn(*a), lambda a: selective_scan_ref(*a),
                          _inputs_selective),
    "mamba_chunk_scan_combined": (lambda a: mamba_chunk_scan_combined(*a, chunk_size=4),
                                  lambda a: mamba_chunk_scan_ref(*a, chunk_size=4), _inputs_ssd),
}


@pytest.mark.parametrize("op", list(CASES))
def test_single_backward_ops_refuse_create_graph(op):
    fast, ref, make = CASES[op]
    args = make()
    # first order: unchanged, equal to the twin
    for a, b in zip(torch.autograd.grad(fast(args).square().sum(), args),
                    torch.autograd.grad(ref(args).square().sum(), args)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    with pytest.raises(RuntimeError, match=f"{op}: its custom backward is not differentiable"):
        torch.autograd.grad(fast(args).square().sum(), args, create_graph=True)
    # the twin it names takes higher derivatives
    gs = torch.autograd.grad(ref(args).square().sum(), args, create_graph=True)
    torch.autograd.grad(sum(g.square().sum() for g in gs), args)


def test_s5_scan_refuses_create_graph():
    layer = ssm.S5(4, 8).double()
    x = torch.randn(2, 20, 4, dtype=F64)
    with pytest.raises(RuntimeError, match="the S5 scan: its custom backward is not differentiable"):
        torch.autograd.grad(layer(x).square().sum(), list(layer.parameters()), create_graph=True)
    layer(x).square().sum().backward()  # first order unchanged
