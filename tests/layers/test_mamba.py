"""ssm.Mamba and ssm.Mamba2: the papers' initializations, mamba_ssm's parameter layout, the arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tol

import ssm


def test_mamba_initialization_and_layout():
    layer = ssm.Mamba(32, 16, d_conv=4, expand=2, dt_min=1e-3, dt_max=1e-1)
    D = 64
    assert layer.dt_rank == math.ceil(32 / 16)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items() if k != "_extra_state"}
    assert shapes == {  # mamba_ssm's Mamba, name for name
        "in_proj.weight": (2 * D, 32), "conv1d.weight": (D, 1, 4), "conv1d.bias": (D,),
        "x_proj.weight": (2 + 32, D), "dt_proj.weight": (D, 2), "dt_proj.bias": (D,),
        "A_log": (D, 16), "D": (D,), "out_proj.weight": (32, D)}
    torch.testing.assert_close(layer.A_log, torch.log(torch.arange(1, 17.0)).expand(D, 16))
    assert torch.equal(layer.D, torch.ones(D))
    dt = F.softplus(layer.dt_proj.bias.detach())
    assert float(dt.min()) >= 1e-3 * (1 - 1e-5) and float(dt.max()) <= 1e-1 * (1 + 1e-5)
    std = 2 ** -0.5
    assert float(layer.dt_proj.weight.detach().abs().max()) <= std


def test_mamba2_initialization_and_layout():
    layer = ssm.Mamba2(32, 16, headdim=16, ngroups=2, A_init_range=(1, 16))
    D, G, N, heads = 64, 2, 16, 4
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items() if k != "_extra_state"}
    conv = D + 2 * G * N
    assert shapes == {  # mamba_ssm's Mamba2, name for name
        "in_proj.weight": (D + conv + heads, 32), "conv1d.weight": (conv, 1, 4), "conv1d.bias": (conv,),
        "dt_bias": (heads,), "A_log": (heads,), "D": (heads,), "norm.weight": (D,),
        "out_proj.weight": (32, D)}
    A = torch.exp(layer.A_log.detach())
    assert float(A.min()) >= 1 and float(A.max()) <= 16
    dt = F.softplus(layer.dt_bias.detach())
    assert float(dt.min()) >= 1e-3 * (1 - 1e-5) and float(dt.max()) <= 1e-1 * (1 + 1e-5)


@pytest.mark.parametrize("kwargs, word", [
    ({"d_state": 0}, "d_state"), ({"d_conv": 0}, "d_conv"), ({"expand": 0}, "expand"),
    ({"dt_rank": "big"}, "dt_rank"), ({"dt_rank": 0}, "dt_rank"), ({"dt_min": 1.0, "dt_max": 0.1}, "dt_min"),
    ({"dt_init": "normal"}, "dt_init"), ({"dt_scale": -1.0}, "dt_scale")])
def test_mamba_bad_arguments_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ssm.Mamba(8, **kwargs)


@pytest.mark.parametrize("kwargs, word", [
    ({"headdim": 5}, "headdim"), ({"headdim": 4, "ngroups": 3}, "ngroups"), ({"headdim": 4, "chunk_size": 0},
                                                                              "chunk_size"),
    ({"headdim": 4, "A_init_range": (4.0, 1.0)}, "A_init_range"), ({"headdim": 4, "dt_limit": (1.0, 0.5)},
                                                                    "dt_limit")])
def test_mamba2_bad_arguments_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ssm.Mamba2(8, **kwargs)


@pytest.mark.parametrize("cls, kw", [(ssm.Mamba, {}), (ssm.Mamba2, {"headdim": 4, "chunk_size": 4})])
def test_rate_scales_every_step(cls, kw):
    """rate r multiplies every step delta: as r -> 0 the SSM state neither decays nor takes input, so it
    passes a chunk unchanged; step and forward agree at any rate."""
    layer = cls(4, 8, **kw).double()
    x = torch.randn(2, 9, 4, dtype=torch.float64)
    _, state = layer(torch.randn(2, 5, 4, dtype=torch.float64), return_state=True)
    _, frozen = layer(x, state, return_state=True, rate=1e-12)
    torch.testing.assert_close(frozen[1], state[1], rtol=1e-9, atol=1e-9)
    y, s = layer(x, state, return_state=True, rate=2.5)
    ys = []
    for t in range(9):
        yt, state = layer.step(x[:, t], state, rate=2.5)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, **tol(torch.float64))
    assert not torch.allclose(y, layer(x, rate=1.0))


def test_bidirectional_mamba_has_a_second_direction():
    layer = ssm.Mamba(4, 8, bidirectional=True)
    names = {n for n, _ in layer.named_parameters()}
    assert {"conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.bias", "A_log_b", "D_b"} <= names
    x = torch.randn(1, 10, 4)
    y = layer(x)
    x2 = x.clone()
    x2[:, -1] += 1.0  # the future changes the past's output
    assert not torch.allclose(layer(x2)[:, 0], y[:, 0])


def test_mamba_ssm_state_dict_layout_loads():
    """A state dict with mamba_ssm's names (no _extra_state) loads into the layer as it is."""
    src = ssm.Mamba(8, 4)
    sd = {k: v.clone() for k, v in src.state_dict().items() if k != "_extra_state"}
    dst = ssm.Mamba(8, 4)
    dst.load_state_dict(sd)
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(dst(x), src(x))
