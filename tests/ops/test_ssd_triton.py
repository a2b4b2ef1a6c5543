"""The optional Triton forward of mamba_chunk_scan_combined: against the torch path (and in float64 the
sequential twin) under the Triton interpreter (a subprocess with TRITON_INTERPRET=1, so CPU CI runs it); the
backend resolution, the refusal of gradients and the tile sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssm.ops import ssd, ssd_triton
from ssm.ops.backends import resolve_backend
from ssm.ops.ssd import mamba_chunk_scan_combined

ROOT = Path(__file__).resolve().parents[2]

# Prints one JSON line {case: relative error of the Triton forward against the torch path}. BLOCK_T = 16
# makes a chunk of 40 three tiles (the off-diagonal tiles and the entering state's weight past the first
# tile); documents start inside a chunk, at a chunk start (t = 16 with Q = 8 or 16) and at a tile start
# (t = 16 with Q = 40), and row 1 starts in document 3 (it never sees initial_states); x and z are strided
# views, as in Mamba2.
SCRIPT = """
import json
import torch
from ssm.ops import ssd_triton
from ssm.ops.ssd import mamba_chunk_scan_combined, mamba_chunk_scan_ref
assert ssd_triton.interpreting() and ssd_triton.accepts(torch.device("cpu"))
ssd_triton.BLOCK_T = 16
torch.manual_seed(0)
results = {}
cases = [  # b, l, h, p, g, n, Q, dtype, options
    (2, 23, 4, 3, 2, 5, 8, torch.float64, "D z bias h0 seq"),
    (2, 70, 2, 5, 1, 4, 40, torch.float64, "D z bias h0 seq"),
    (2, 37, 4, 8, 2, 8, 16, torch.float32, "D z bias h0 seq limit"),
    (1, 45, 2, 4, 2, 3, 40, torch.float32, "D1 strided h0"),
]
for b, l, h, p, g, n, Q, dtype, options in cases:
    big = torch.randn(b, l, h, 2 * p + 1, dtype=dtype)
    x, z = (big[..., :p], big[..., p:2 * p]) if "strided" in options else (
        torch.randn(b, l, h, p, dtype=dtype), torch.randn(b, l, h, p, dtype=dtype))
    args = (x, torch.randn(b, l, h, dtype=dtype), -torch.rand(h, dtype=dtype) - 0.1,
            torch.randn(b, l, g, n, dtype=dtype), torch.randn(b, l, g, n, dtype=dtype), Q)
    seq = torch.zeros(b, l, dtype=torch.long)
    seq[0, 5:], seq[0, 16:], seq[1:], seq[1:, 30:] = 1, 2, 3, 4
    kw = {"D": torch.randn(h, dtype=dtype) if "D1" in options else torch.randn(h, p, dtype=dtype),
          "z": z if "z" in options or "strided" in options else None,
          "dt_bias": torch.randn(h, dtype=dtype) * 0.3 if "bias" in options else None,
          "initial_states": torch.randn(b, h, p, n, dtype=dtype) if "h0" in options else None,
          "seq_idx": seq if "seq" in options else None, "dt_softplus": "bias" in options,
          "dt_limit": (0.05, 1.5) if "limit" in options else (0.0, float("inf")), "return_final_states": True}
    out, last = mamba_chunk_scan_combined(*args, **kw, backend="triton")
    ref, ref_last = mamba_chunk_scan_combined(*args, **kw, backend="torch")
    name = f"{str(dtype)[6:]} b{b} l{l} h{h} p{p} g{g} n{n} Q{Q} {options}"
    assert out.dtype == dtype and last.dtype == dtype, name
    results[name + ": out"] = float((out - ref).abs().max() / ref.abs().max())
    results[name + ": final state"] = float((last - ref_last).abs().max() / ref_last.abs().max())
    if dtype == torch.float64:  # and against the sequential twin
        ref = mamba_chunk_scan_ref(*args, **kw)[0]
        results[name + ": out, sequential"] = float((out - ref).abs().max() / ref.abs().max())
# huge dt |A| (decays underflow to zero), l shorter than a chunk of two tiles: finite, equal to the torch
# path, and the final state is the last input alone, dt x B^T
x, B, C = torch.randn(1, 20, 2, 3), torch.randn(1, 20, 1, 4), torch.randn(1, 20, 1, 4)
args = (x, torch.full((1, 20, 2), 100.0), torch.full((2,), -100.0), B, C, 32)
out, last = mamba_chunk_scan_combined(*args, return_final_states=True, backend="triton")
assert torch.isfinite(out).all()
ref = mamba_chunk_scan_combined(*args, backend="torch")
results["float32 huge dt A: out"] = float((out - ref).abs().max() / ref.abs().max())
expect = 100.0 * x[0, -1, :, :, None] * B[0, -1, 0]
results["float32 huge dt A: final state"] = float((last[0] - expect).abs().max() / expect.abs().max())
print(json.dumps(results))
"""

TOL = {"float64": 1e-12, "float32": 2e-6}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, float]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not ssd_triton.available(), reason="triton is not installed")
def test_triton_forward_equals_torch_under_the_interpreter(interpreted):
    assert len(interpreted) == 4 * 2 + 2 + 2
    bad = {k: v for k, v in interpreted.items() if not v < TOL[k.split(" ")[0]]}
    assert not bad, bad


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("ssd", "auto", cpu) == "torch"
    assert resolve_backend("ssd", "auto", cuda) == "torch"  # until a GPU run has checked the kernels
    assert resolve_backend("ssd", "torch", cuda) == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("ssd", "cuda", cpu)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("ssd", "triton", cpu)
    monkeypatch.setattr(ssd, "AUTO_TRITON", True)
    assert resolve_backend("ssd", "auto", cuda) == ("triton" if ssd_triton.available() else "torch")
    assert resolve_backend("ssd", "auto", cpu) == "torch"
    monkeypatch.setattr(ssd_triton, "available", lambda: False)
    assert resolve_backend("ssd", "auto", cuda) == "torch"
    with pytest.raises(ImportError, match="pip install triton"):
        resolve_backend("ssd", "triton", cuda)


def test_triton_refuses_gradients_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(ssd, "resolve_backend", lambda op, backend, device: "triton")  # as on a GPU
    b, l, h, p, g, n = 1, 9, 2, 3, 1, 4
    x = torch.randn(b, l, h, p, requires_grad=True)
    args = (x, torch.rand(b, l, h), -torch.rand(h), torch.randn(b, l, g, n), torch.randn(b, l, g, n), 4)
    with pytest.raises(ValueError, match="forward-only"):
        mamba_chunk_scan_combined(*args, backend="triton")
    out = mamba_chunk_scan_combined(*args, backend="auto")  # needs a backward: the torch path
    out.sum().backward()
    monkeypatch.undo()
    torch.testing.assert_close(out, mamba_chunk_scan_combined(*args, backend="torch"), rtol=0, atol=0)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bad_backend_is_named():
    x = torch.randn(1, 4, 2, 3)
    args = (x, torch.rand(1, 4, 2), -torch.rand(2), torch.randn(1, 4, 1, 2), torch.randn(1, 4, 1, 2), 4)
    with pytest.raises(ValueError, match="backend"):
        mamba_chunk_scan_combined(*args, backend="cuda")



def test_tiles_shrink_for_large_states():
    assert ssd_triton._tile(256, 128, 4) == 64  # float32, Mamba2's d_state
    assert ssd_triton._tile(256, 256, 4) == ssd_triton._tile(256, 128, 8) == 32
    assert ssd_triton._tile(256, 1024, 8) == 16
    assert ssd_triton._tile(5, 16, 4) == 16  # no longer than the chunk needs, at least 16


@pytest.mark.skipif(not ssd_triton.available(), reason="triton is not installed")
def test_tiles_shrink_while_shared_memory_is_short():
    from triton.runtime.errors import OutOfResources

    tried = []

    def launch(bt):  # a GPU whose shared memory fits tiles of 16 only
        tried.append(bt)
        if bt > 16:
            raise OutOfResources(bt * 4096, 16 * 4096, "shared memory")

    ssd_triton._shrinking(launch, 64)
    assert tried == [64, 32, 16]
    with pytest.raises(OutOfResources):
        ssd_triton._shrinking(lambda bt: launch(bt * 2), 16)
