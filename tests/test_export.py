"""torch.export of every layer with a dynamic sequence length: one program for all lengths, equal to eager."""

from __future__ import annotations

import pytest
import torch
from conftest import tol

import ssm

CASES = {
    "s4-bilinear": lambda: ssm.S4(8, 16),
    "s4-zoh": lambda: ssm.S4(8, 16, disc="zoh"),
    "s4d": lambda: ssm.S4D(8, 16),
    "rtf": lambda: ssm.RTF(8, 16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_export_dynamic_length_matches_eager(name):
    layer = CASES[name]().eval()
    length = torch.export.Dim("L", min=2, max=1 << 16)
    program = torch.export.export(layer, (torch.randn(2, 48, 8),), dynamic_shapes={"x": {1: length}})
    exported = program.module()
    with torch.no_grad():
        for L in (37, 100, 2):  # odd, even and the shortest: the traced graph serves every length
            x = torch.randn(2, L, 8)
            torch.testing.assert_close(exported(x), layer(x), **tol(torch.float32))



def test_export_s5_dynamic_length_matches_eager():
    """S5's scan specialized the length (its chunk loop and Blelloch passes depend on L): under export it
    takes the FFT route ``ssm.systems.s5.scan_conv``, one program for every length."""
    torch.manual_seed(0)
    layer = ssm.S5(4, 4).eval()
    length = torch.export.Dim("L", min=2, max=1 << 16)
    program = torch.export.export(layer, (torch.randn(2, 48, 4),), dynamic_shapes={"x": {1: length}})
    exported = program.module()
    with torch.no_grad():
        for L in (37, 100):
            x = torch.randn(2, L, 4)
            torch.testing.assert_close(exported(x), layer(x), **tol(torch.float32))
