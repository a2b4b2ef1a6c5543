"""The optional Triton forward of selective_scan_fn: against the torch path under the Triton interpreter (a
subprocess with TRITON_INTERPRET=1, so CPU CI runs it), and the backend resolution."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssm.ops import selective_scan_triton
from ssm.ops.backends import resolve_backend
from ssm.ops.selective_scan import selective_scan_fn

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import torch
from ssm.ops.selective_scan import selective_scan_fn
torch.manual_seed(0)
b, d, n, L, g = 2, 40, 3, 7, 4
for dtype, tol, forms in ((torch.float32, 1e-5, (((d, n), (b, g, n, L)),)),
                          (torch.float64, 1e-12, (((b, g, n, L), (b, n, L)),))):
    for Bs, Cs in forms:
        shapes = [(b, d, L), (b, d, L), (d, n), Bs, Cs, (d,), (b, d, L), (d,), (b, d, n)]
        ops = [torch.randn(*s, dtype=dtype) for s in shapes]
        ops[1], ops[2] = ops[1].abs(), -ops[2].abs()
        results = []
        for backend in ("triton", "torch"):
            args = [t.clone().requires_grad_() for t in ops]
            out, last = selective_scan_fn(*args[:8], True, True, initial_state=args[8], chunk_size=4,
                                          backend=backend)
            (out.sin().sum() + last.cos().sum()).backward()
            results.append([out, last] + [a.grad for a in args])
        for x, y in zip(*results):
            err = float((x - y).abs().max() / y.abs().max())
            assert err < tol, (dtype, Bs, Cs, err)
print("ok")
"""


@pytest.mark.skipif(not selective_scan_triton.available(), reason="triton is not installed")
def test_triton_forward_equals_torch_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("selective_scan", "auto", cpu) == "torch"
    assert resolve_backend("selective_scan", "torch", cuda) == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("selective_scan", "cuda", cpu)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("selective_scan", "triton", cpu)
    monkeypatch.setattr("ssm.ops.selective_scan.AUTO_TRITON", True)
    expected = "triton" if selective_scan_triton.available() else "torch"
    assert resolve_backend("selective_scan", "auto", cuda) == expected
    monkeypatch.setattr(selective_scan_triton, "available", lambda: False)
    assert resolve_backend("selective_scan", "auto", cuda) == "torch"
    with pytest.raises(ImportError, match="pip install triton"):
        resolve_backend("selective_scan", "triton", cuda)


def test_bad_backend_is_named():
    u = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="backend"):
        selective_scan_fn(u, u, torch.randn(2, 2), torch.randn(2, 2), torch.randn(2, 2), backend="numpy")
