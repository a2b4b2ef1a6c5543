"""torch.compile with the default backend (inductor, C++ code generation on the CPU) over several lengths.

tests/test_compile.py checks the graph capture with the cheap "aot_eager" backend; this file runs inductor
itself, whose generated code can differ from eager where aot_eager cannot: inductor's C++ loop for
``arange(L) // 64`` with a symbolic L (a dynamic length) wrote only the first 64 floor(L / 64) entries and
left the rest uninitialized, so ``torch.compile(ssm.S4D(...))`` failed at its second length with an
IndexError (issue 22, docs/deployment.md). The op-level test is fast; the layer cases are the one of the
report (S4D, automatic dynamic shapes), S5 with ``dynamic=True`` (its scan takes ``ssm.systems.s5.scan_conv``
under compile: inductor refused the in-place strided complex scan) and the other LTI layers with
``dynamic=True``; the selective layers' compiles take 40 s to two minutes each, so Mamba and Mamba-2 are in
``benchmarks/inductor_sweep.py``, which sweeps all eight (about three minutes of compiling, quiet CPU).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tol

import ssm
from ssm.ops.vandermonde import vandermonde, vandermonde_ref

LENGTHS = (48, 37, 130)  # a first length, then odd, and above 2 x 64 (the symbolic block)


def test_vandermonde_symbolic_length_under_inductor():
    torch._dynamo.reset()
    torch.manual_seed(0)
    v = torch.randn(3, 4, dtype=torch.complex64)
    a = torch.complex(-0.5 * torch.rand(3, 4), torch.randn(3, 4))

    def run(v, a, u):
        return vandermonde(v, a, u.shape[-1], log=True)

    compiled = torch.compile(run, dynamic=True, fullgraph=True)
    for L in LENGTHS:
        ref = vandermonde_ref(v.to(torch.complex128), a.to(torch.complex128), L, log=True).to(v.dtype)
        torch.testing.assert_close(compiled(v, a, torch.empty(L)), ref, **tol(torch.float32))


@pytest.mark.slow
def test_s4d_under_inductor_at_several_lengths():
    """The case of the report: the default (a static first compile, then a dynamic recompile at the second
    length) equals eager at every length (eval mode, no autograd; test_compile.py checks gradients)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = ssm.S4D(4, 4).eval()
    compiled = torch.compile(layer)
    with torch.no_grad():
        for L in LENGTHS:
            x = torch.randn(2, L, layer.d_model)
            torch.testing.assert_close(compiled(x), layer(x), **tol(torch.float32))


@pytest.mark.slow
def test_s5_under_inductor_with_a_dynamic_length():
    """S5 compiled with dynamic=True (the recipe of docs/deployment.md) equals eager at two lengths: it failed
    in inductor's fake tensors on the scan's strided in-place complex updates; under compile the scan is the
    out-of-place FFT route ``scan_conv``, one graph for every L. A state in and out too."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = ssm.S5(4, 4).eval()
    compiled = torch.compile(layer, dynamic=True)
    with torch.no_grad():
        for L in (37, 130):
            x = torch.randn(2, L, layer.d_model)
            x0 = torch.randn(2, 2, dtype=torch.complex64)
            y, state = compiled(x, x0, return_state=True)
            y_ref, state_ref = layer(x, x0, return_state=True)
            torch.testing.assert_close(y, y_ref, **tol(torch.float32))
            torch.testing.assert_close(state, state_ref, **tol(torch.float32))


# The other LTI layers with dynamic=True (the selective layers' compiles take 40 s to two minutes on a 2-core
# CPU: they stay in benchmarks/inductor_sweep.py).
OTHERS = {
    "s4-bilinear": lambda: ssm.S4(4, 4),
    "s4-zoh": lambda: ssm.S4(4, 4, disc="zoh"),
    "s4d-zoh": lambda: ssm.S4D(4, 4, disc="zoh"),
    "rtf": lambda: ssm.RTF(4, 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OTHERS))
def test_layer_under_inductor_with_a_dynamic_length(name):
    """Every other LTI layer compiled with dynamic=True equals eager at lengths 48, 37 and 130 (one graph)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = OTHERS[name]().eval()
    compiled = torch.compile(layer, dynamic=True)
    with torch.no_grad():
        for L in LENGTHS:
            x = torch.randn(2, L, layer.d_model)
            torch.testing.assert_close(compiled(x), layer(x), **tol(torch.float32))
