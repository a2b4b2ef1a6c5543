"""Shared test fixtures: the tolerance table and the device parameter.

CPU is the default; the CUDA case of the ``device`` fixture is skipped cleanly on machines without CUDA.
"""

from __future__ import annotations

import pytest
import torch

# dtype -> (rtol, atol) for comparisons of a fast path against its float64 reference.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.complex128: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-6),
    torch.complex64: (1e-4, 1e-6),
    torch.bfloat16: (2e-2, 2e-2),
}


def tol(dtype: torch.dtype) -> dict:
    """Keyword arguments for ``torch.testing.assert_close`` at ``dtype``."""
    rtol, atol = TOL[dtype]
    return {"rtol": rtol, "atol": atol}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||x - ref|| / ||ref|| in float64."""
    x = x.detach().to(torch.complex128 if (x.is_complex() or ref.is_complex()) else torch.float64).cpu()
    ref = ref.detach().to(x.dtype).cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=_NO_CUDA)]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Keyword arguments that make every registered layer buildable at the tiny widths of the tests (Mamba2's
# default headdim of 64 needs d_inner = expand * d_model to be a multiple of 64).
SMALL = {"mamba2": {"headdim": 4, "chunk_size": 8}}


def make_layer(name: str, d_model: int = 4, d_state: int = 8, **kwargs):
    """``LAYERS[name](d_model, d_state, ...)`` at test sizes."""
    from ssm.layers import LAYERS

    return LAYERS[name](d_model, d_state, **{**SMALL.get(name, {}), **kwargs})
