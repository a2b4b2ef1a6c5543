"""torch.compile with the default backend (inductor, C++ code generation on the CPU) over several lengths.

tests/test_compile.py checks the graph capture with the cheap "aot_eager" backend; this file runs inductor
itself, whose generated code can differ from eager where aot_eager cannot: inductor's C++ loop for
``arange(L) // 64`` with a symbolic L (a dynamic length) wrote only the first 64 floor(L / 64) entries and
left the rest uninitialized, so ``torch.compile(ssm.S4D(...))`` failed at its second length with an
IndexError (issue 22, docs/deployment.md). The op-level test is fast; the layer case is the one of the report
(S4D, automatic dynamic shapes). Every layer, dynamic too, is swept by ``benchmarks/inductor_sweep.py`` (about
ten minutes of compiling on a 2-core CPU: too long for the suite).
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
