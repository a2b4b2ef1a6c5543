"""The Triton kernels (the CUDA path of the Cauchy and Vandermonde products) run on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1``), against the torch path: forward and backward, power 1 and 2 of the
Cauchy kernel (the backward uses the squared one), odd N and L that are not multiples of the blocks, float32.

The variable must be set before triton is imported, so the checks run in a subprocess; skipped when triton is
not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# Run with TRITON_INTERPRET=1: prints one JSON line {case: relative error}.
SCRIPT = textwrap.dedent("""
    import json, warnings
    import torch
    from ssm import S4, S4D
    from ssm.ops import cauchy_triton
    from ssm.ops.cauchy import cauchy
    from ssm.ops.vandermonde import vandermonde

    warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 in masked-out lanes of the interpreted blocks
    assert cauchy_triton.interpreting() and cauchy_triton.accepts(torch.device("cpu"))
    torch.manual_seed(0)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    def compare(name, fn, inputs):
        out = {}
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        ref_leaves = [t.detach().clone().requires_grad_() for t in inputs]
        y, y_ref = fn(leaves, "triton"), fn(ref_leaves, "naive")
        g = torch.randn_like(y_ref)
        grads = torch.autograd.grad(y, leaves, g)
        grads_ref = torch.autograd.grad(y_ref, ref_leaves, g)
        out[name + ":forward"] = rel(y, y_ref)
        for i, (a, b) in enumerate(zip(grads, grads_ref)):
            out[f"{name}:grad{i}"] = rel(a, b)
        return out

    results = {}
    for N, L in ((37, 131), (5, 7), (64, 256)):  # the blocks are 32 (N) and 128 (L)
        v = torch.randn(2, 3, N, dtype=torch.complex64)
        w = torch.complex(-torch.rand(2, 1, N) - 0.1, 3 * torch.randn(2, 1, N))
        z = torch.complex(torch.zeros(L), torch.linspace(-4, 4, L))
        results |= compare(f"cauchy N={N} L={L}", lambda t, b: cauchy(t[0], t[1], t[2], backend=b), (v, z, w))
        log_x = torch.complex(-0.05 * torch.rand(2, 1, N), torch.randn(2, 1, N))
        results |= compare(f"vandermonde N={N} L={L}",
                           lambda t, b: vandermonde(t[0], t[1], L, log=True, backend=b), (v, log_x))
    for cls in (S4, S4D):  # the layers' kernels, backend="triton" against the torch path
        layer = cls(3, 10, backend="triton")
        ref = cls(3, 10, backend="naive")
        ref.load_state_dict(layer.state_dict())
        x = torch.randn(2, 45, 3)
        y, y_ref = layer(x), ref(x)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        results[f"{cls.__name__} layer:forward"] = rel(y, y_ref)
        for name, p in layer.named_parameters():
            ref_grad = dict(ref.named_parameters())[name].grad
            results[f"{cls.__name__} layer:grad {name}"] = rel(p.grad, ref_grad)
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def interpreted() -> dict[str, float]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_case_ran(interpreted):
    kinds = {key.split(" ")[0] for key in interpreted}
    assert kinds == {"cauchy", "vandermonde", "S4", "S4D"}
    assert sum(key.startswith("cauchy") for key in interpreted) == 3 * 4  # forward + three gradients
    assert sum(key.startswith("vandermonde") for key in interpreted) == 3 * 3


@pytest.mark.parametrize("kind", ["cauchy", "vandermonde", "S4 ", "S4D"])
def test_triton_kernels_agree_with_the_torch_path(interpreted, kind):
    errors = {k: v for k, v in interpreted.items() if k.startswith(kind)}
    assert errors and all(err < 1e-4 for err in errors.values()), errors
