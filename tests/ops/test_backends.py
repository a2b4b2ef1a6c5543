"""ssm.ops.backends: the one resolver of every op's backend ("auto" resolved once, explicit backends checked,
the errors of a missing Triton)."""

from __future__ import annotations

import pytest
import torch

from ssm.ops import backends
from ssm.ops.backends import OPS, resolve_backend


@pytest.mark.parametrize("op", list(OPS))
def test_every_op_resolves_on_the_cpu(monkeypatch, op):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    spec = OPS[op]
    assert spec.backends[0] == "auto"
    assert resolve_backend(op, "auto", cpu, nbytes=1024) in spec.backends[1:]
    for name in spec.backends[1:]:
        if name != "triton":
            assert resolve_backend(op, name, cpu, nbytes=1024) == name
    if "triton" in spec.backends:
        with pytest.raises(ValueError, match=r"backend 'triton' needs CUDA tensors \(or CPU tensors under "
                                             r"TRITON_INTERPRET=1"):
            resolve_backend(op, "triton", cpu)


@pytest.mark.parametrize("op", [op for op, spec in OPS.items() if "triton" in spec.backends])
def test_triton_without_the_package_names_the_install_command(monkeypatch, op):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors are accepted: the package is what is missing
    kernels = backends._kernels(op)
    monkeypatch.setattr(kernels, "available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install triton"):
        resolve_backend(op, "triton", torch.device("cpu"))


def test_unknown_op_and_backend_are_named():
    with pytest.raises(ValueError, match="op must be one of"):
        resolve_backend("fft", "auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch', 'triton'; got 'cuda'"):
        resolve_backend("selective_scan", "cuda", torch.device("cpu"))


def test_triton_accepts_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backends.triton_accepts(torch.device("cuda")) and not backends.triton_accepts(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.triton_accepts(torch.device("cpu"))
