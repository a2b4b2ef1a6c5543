"""torch.compile of a layer runs and matches eager, forward and backward.

The value-dependent argument checks (e.g. dt > 0) are skipped while compiling (``ssm._checks``), so they do
not break the graph; any remaining graph breaks fall back to eager for that part, which is still correct.
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
