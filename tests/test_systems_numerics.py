"""Numerical edge cases of the structured kernels: float32 accuracy and removable singularities."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TOL, rel_err

import ssm
from ssm.kernels import diag_kernel, dplr_kernel
from ssm.layers.s4 import S4_INITS

LENGTHS = (1, 2, 3, 7, 16, 64, 100, 257, 1024, 4096)
DTS = (1e-3, 1e-2, 1e-1, 1.0)  # the default range dt_min .. dt_max, and dt = 1


def _s4_at_dt(init: str, dt: float) -> ssm.S4:
    layer = ssm.S4(4, 64, init=init)
    with torch.no_grad():
        layer.log_dt.fill_(math.log(dt))
    return layer


def _s4_kernel(layer: ssm.S4, L: int, method: str) -> torch.Tensor:
    s = layer.discrete_system()
    return dplr_kernel(s.Lambda, s.P, s.B, s.C, s.dt, L, disc="bilinear", conj_pairs=True, method=method)


@pytest.mark.parametrize("method", ["auto", "cauchy"])
@pytest.mark.parametrize("init", S4_INITS)
def test_s4_float32_kernel_matches_float64(init, method):
    # Bilinear S4 kernel in float32 against the float64 kernel of the same parameters, by the layer's own
    # route ("auto": the power series on the CPU, Cauchy for legt's rank 2) and by the Cauchy method. Before
    # the fix, fout (a zero eigenvalue, clamped to -1e-4: the Cauchy denominators vanish at z = 1 and the
    # Woodbury step cancels 1e4-sized terms) reached 8e-3, legt / lagt / diag-legs 1e-3 at L = 4096.
    rtol = TOL[torch.float32][0]
    for dt in DTS:
        layer = _s4_at_dt(init, dt)
        ref_layer = copy.deepcopy(layer).double()
        with torch.no_grad():
            for L in LENGTHS:
                err = rel_err(_s4_kernel(layer, L, method), ref_layer.kernel(L))
                assert err <= rtol, f"init={init} dt={dt} L={L}: relative error {err:.2e}"


def test_s4_fout_forward_matches_step_at_dt_one():
    layer = _s4_at_dt("fout", 1.0).eval()
    x = torch.randn(2, 64, 4)
    with torch.no_grad():
        y = layer(x)
        state = layer.default_state(2)
        ys = []
        for k in range(x.shape[1]):
            yk, state = layer.step(x[:, k], state)
            ys.append(yk)
    assert rel_err(y, torch.stack(ys, dim=1)) <= TOL[torch.float32][0]


def _diag_real_point(dtype, dt: float, requires_grad: bool = False):
    """S4D "diag-real" mode lambda = -2 at step dt: 1 + dt lambda / 2 = 0 (Ab = 0) at dt = 1."""
    t = dict(dtype=dtype, requires_grad=requires_grad)
    lam, B, C = torch.tensor([[-2.0]], **t), torch.ones(1, 1, **t), torch.ones(1, 1, **t)
    return lam, B, C, torch.tensor([dt], **t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diag_bilinear_kernel_at_vanishing_ab(dtype):
    # K_k = C Bb Ab^k, Ab = (1 + dt l / 2) / (1 - dt l / 2) = 0, Bb = dt B / (1 - dt l / 2) = 1/2.
    K = diag_kernel(*_diag_real_point(dtype, 1.0), 4, disc="bilinear")
    torch.testing.assert_close(K, torch.tensor([[0.5, 0.0, 0.0, 0.0]], dtype=dtype), rtol=0, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diag_bilinear_kernel_continuous_and_differentiable_at_vanishing_ab(dtype):
    at = diag_kernel(*_diag_real_point(dtype, 1.0), 8, disc="bilinear")
    for dt in (1 - 1e-6, 1 + 1e-6):
        near = diag_kernel(*_diag_real_point(dtype, dt), 8, disc="bilinear")
        assert (near - at).abs().max() <= 1e-6
    for dt in (1.0, 1 - 1e-6, 1 + 1e-6):
        args = _diag_real_point(dtype, dt, requires_grad=True)
        for conj_pairs in (False, True):
            diag_kernel(*args, 8, disc="bilinear", conj_pairs=conj_pairs).square().sum().backward()
        for a in args:
            assert torch.isfinite(a.grad).all()
