"""torch.compile of a layer runs and matches eager, forward and backward.

The value-dependent argument checks (e.g. dt > 0) are skipped while compiling (``ssm._checks``), so they do
not break the graph: every layer compiles to one graph (``fullgraph=True``), forward and step, in train and
eval mode, and a dynamic sequence length compiles once for all lengths (docs/deployment.md).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tol

import ssm


# The default backend (inductor, C++ code generation) for one layer; the others through the same Dynamo
# capture and AOTAutograd with the "aot_eager" backend, which skips the slow code generation in the tests.
@pytest.mark.parametrize("name,backend", [("s4d", "inductor"), ("s4", "aot_eager"), ("rtf", "aot_eager")])
def test_compiled_layer_matches_eager(name, backend):
    torch.manual_seed(0)
    layer = ssm.layers.LAYERS[name](8, 16)
    x = torch.randn(2, 48, 8, requires_grad=True)
    y_ref = layer(x)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    compiled = torch.compile(layer, backend=backend)
    y = compiled(x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(y, y_ref, **tol(torch.float32))
    torch.testing.assert_close(g, g_ref, **tol(torch.float32))


# Every layer family and discretization with a kernel of its own; small, so that the file stays fast.
CASES = {
    "s4-bilinear": lambda: ssm.S4(8, 16),
    "s4-zoh": lambda: ssm.S4(8, 16, disc="zoh"),
    "s4d": lambda: ssm.S4D(8, 16),
    "rtf": lambda: ssm.RTF(8, 16),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_forward_and_step(name, training):
    torch._dynamo.reset()
    layer = CASES[name]().train(training)
    x = torch.randn(2, 48, 8, requires_grad=training)
    with torch.set_grad_enabled(training):
        y_ref = layer(x)
        y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(y, y_ref, **tol(torch.float32))
    if training:
        g_ref, g = (torch.autograd.grad(out.square().sum(), x)[0] for out in (y_ref, y))
        torch.testing.assert_close(g, g_ref, **tol(torch.float32))

    def step(x_t, state):
        return layer.step(x_t, state)

    state = layer.default_state(2) + 0.1
    with torch.set_grad_enabled(training):
        ref = step(x[:, 0].detach(), state)
        out = torch.compile(step, backend="aot_eager", fullgraph=True)(x[:, 0].detach(), state)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **tol(torch.float32))


@pytest.mark.parametrize("name", list(CASES))
def test_dynamic_length_compiles_once(name):
    """One graph for every sequence length: further lengths run without a recompile."""
    torch._dynamo.reset()
    layer = CASES[name]().eval()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        x = torch.randn(2, 48, 8)
        torch.testing.assert_close(compiled(x), layer(x), **tol(torch.float32))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for L in (37, 100):  # odd and even: nothing depends on the parity of L either
                x = torch.randn(2, L, 8)
                torch.testing.assert_close(compiled(x), layer(x), **tol(torch.float32))
