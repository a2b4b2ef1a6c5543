"""Numerics at the edges: the S4D bilinear kernel at small dt, the RTF stability margins across dtypes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_err

import ssm
from ssm.systems.rtf import stable_denominator


def float32_error(disc: str, dt: float) -> float:
    torch.manual_seed(0)
    layer = ssm.S4D(8, 64, disc=disc, dt_min=dt, dt_max=1.0001 * dt).eval()
    with torch.no_grad():
        return rel_err(layer.kernel(4096), copy.deepcopy(layer).double().kernel(4096))


@pytest.mark.parametrize("dt", [1e-6, 1e-4])
def test_s4d_bilinear_keeps_float32_precision_at_small_dt(dt):
    # zoh at the same dt is the reference error of float32; log(1 + x/2) - log(1 - x/2) was 50-500x worse
    assert float32_error("bilinear", dt) < 4 * max(float32_error("zoh", dt), 3e-7)


def test_montel_margin_does_not_depend_on_the_dtype():
    # (the reflection map's margin, 4 eps on |k|, is float32 rounding itself; Montel's is 4 (N + 1) eps)
    torch.manual_seed(0)
    a_raw = torch.randn(4, 64)
    a32 = stable_denominator(a_raw, "montel").double()
    a64 = stable_denominator(a_raw.double(), "montel")
    assert rel_err(a32, a64) < 1e-6  # float32 rounding only (the float32 margin was 4 (N + 1) eps = 3e-5)
    layer = ssm.RTF(4, 64)
    with torch.no_grad():
        layer.ssm_param("a").normal_()
    assert rel_err(layer.denominator(), copy.deepcopy(layer).double().denominator()) < 1e-6
