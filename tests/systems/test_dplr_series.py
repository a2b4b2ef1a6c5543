"""The S4 kernel as truncated power series (dplr_kernel method="series", the CPU default): the same kernel
as the Cauchy method and as the dense float64 powers, its gradients (gradcheck, and a gradient penalty
through a layer against the Cauchy route), and the choice of method."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TOL, rel_err, tol
from torch.autograd import gradcheck

import ssm
from ssm.discretize import discretize
from ssm.kernels import dplr_kernel
from ssm.layers.s4 import S4_INITS
from ssm.reference import conj_expand, dense_kernel, dplr_to_dense

C128 = torch.complex128
F64_STRUCTURED = 100 * tol(C128)["rtol"]  # structured against dense powers (tests/test_kernels.py)


def _random_pairs(H=2, N=3, R=1, channels=None, seed=0):
    """A random stable system in conjugate-pair storage, Q apart from P."""
    g = torch.Generator().manual_seed(seed)

    def c(*shape):
        return torch.complex(torch.randn(*shape, generator=g, dtype=torch.float64),
                             torch.randn(*shape, generator=g, dtype=torch.float64))

    Lambda = torch.complex(-0.1 - torch.rand(H, N, generator=g, dtype=torch.float64),
                           3 * torch.randn(H, N, generator=g, dtype=torch.float64))
    C = c(*(() if channels is None else (channels,)), H, N)
    dt = 0.05 + 0.5 * torch.rand(H, generator=g, dtype=torch.float64)
    return {"Lambda": Lambda, "P": 0.3 * c(R, H, N), "Q": 0.3 * c(R, H, N), "B": c(H, N), "C": C, "dt": dt}


def _kernel(s, L, **kw):
    return dplr_kernel(s["Lambda"], s["P"], s["B"], s["C"], s["dt"], L, s["Q"], "bilinear", conj_pairs=True,
                       **kw)


def _dense(s, L):
    Lambda, P, B, C = conj_expand(s["Lambda"], s["P"], s["B"], s["C"])
    A = dplr_to_dense(Lambda, P, conj_expand(s["Q"])[0])
    Ab, Bb = discretize(A, B, s["dt"], "bilinear")
    return dense_kernel(Ab, Bb, C, L).real


@pytest.mark.parametrize("L", [1, 2, 3, 8, 33, 200])
@pytest.mark.parametrize("R, channels", [(1, None), (1, 3), (0, None)])
def test_series_equals_dense_powers_and_cauchy(L, R, channels):
    s = _random_pairs(R=R, channels=channels)
    K = _kernel(s, L, method="series")
    assert K.shape == ((channels,) if channels else ()) + (2, L) and K.dtype == torch.float64
    assert rel_err(K, _dense(s, L)) <= F64_STRUCTURED
    assert rel_err(K, _kernel(s, L, method="cauchy")) <= F64_STRUCTURED


@pytest.mark.parametrize("init", [i for i in S4_INITS if i != "legt"])
def test_series_equals_cauchy_for_every_init(init):
    # float64 layers at the default step range and at dt = 1 (the legt init has rank 2: Cauchy only)
    for dt in (1e-3, 1e-1, 1.0):
        layer = ssm.S4(4, 32, init=init).double()
        with torch.no_grad():
            layer.log_dt.fill_(math.log(dt))
        s = layer.discrete_system()
        for L in (1, 7, 256):
            args = (s.Lambda, s.P, s.B, s.C, s.dt, L)
            K = dplr_kernel(*args, disc="bilinear", conj_pairs=True, method="series")
            assert rel_err(K, dplr_kernel(*args, disc="bilinear", conj_pairs=True, method="cauchy")) <= 1e-10


@pytest.mark.parametrize("L", [1, 6, 9])
def test_series_gradcheck(L):
    s = {k: v.clone().requires_grad_() for k, v in _random_pairs(H=2, N=2, channels=2).items()}
    names = ["Lambda", "P", "B", "C", "dt", "Q"]

    def fn(Lambda, P, B, C, dt, Q):
        return dplr_kernel(Lambda, P, B, C, dt, L, Q, "bilinear", conj_pairs=True, method="series")

    assert gradcheck(fn, tuple(s[k] for k in names))


def test_auto_takes_the_series_on_cpu_and_cauchy_for_an_explicit_backend():
    s = _random_pairs(channels=2)
    for k in ("Lambda", "P", "Q", "B", "C"):
        s[k] = s[k].to(torch.complex64)
    s["dt"] = s["dt"].float()
    auto = _kernel(s, 50)
    assert torch.equal(auto, _kernel(s, 50, method="series"))
    assert torch.equal(_kernel(s, 50, backend="chunked"), _kernel(s, 50, method="cauchy", backend="chunked"))
    assert rel_err(auto, _kernel(s, 50, method="cauchy")) <= TOL[torch.float32][0]


def test_gradient_penalty_through_s4_matches_the_cauchy_route():
    # create_graph through the series route (the custom Functions' backward rebuilt from plain ops) gives
    # the second derivatives of the Cauchy route (backend="naive": plain autograd)
    torch.manual_seed(0)
    layer = ssm.S4(3, 8).double()
    x = torch.randn(2, 20, 3, dtype=torch.float64)

    def penalty(m):
        params = [p for p in m.parameters() if p.requires_grad]
        gs = torch.autograd.grad(m(x).square().sum(), params, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in gs), params)

    cauchy = copy.deepcopy(layer)
    cauchy.backend = "naive"
    for a, b in zip(penalty(layer), penalty(cauchy)):
        assert rel_err(a, b) <= 1e-9


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"method": "fourier"}, "method must be one of"),
        ({"method": "series", "c_tilde": True}, "method='series' needs"),
        ({"method": "series", "disc": "zoh"}, "method='series' needs"),
        ({"method": "series", "conj_pairs": False}, "method='series' needs"),
    ],
)
def test_method_errors(kw, match):
    s = _random_pairs()
    kw = {"disc": "bilinear", "conj_pairs": True, **kw}
    with pytest.raises(ValueError, match=match):
        dplr_kernel(s["Lambda"], s["P"], s["B"], s["C"], s["dt"], 10, s["Q"], **kw)


def test_series_refuses_rank_two():
    s = _random_pairs(R=2)
    with pytest.raises(ValueError, match="R=2"):
        _kernel(s, 10, method="series")
    assert rel_err(_kernel(s, 10), _dense(s, 10)) <= F64_STRUCTURED  # auto: the Cauchy method


def test_chunks_of_features_give_the_same_kernel_and_gradients(monkeypatch):
    import ssm.systems.dplr as dplr

    s = {k: v.clone().requires_grad_() for k, v in _random_pairs(H=5, channels=2).items()}
    w = torch.randn(2, 5, 30, dtype=torch.float64)
    one = _kernel(s, 30, method="series")
    g_one = torch.autograd.grad((one * w).sum(), list(s.values()))
    monkeypatch.setattr(dplr, "SERIES_CHUNK_BYTES", 1)  # one feature per chunk
    chunked = _kernel(s, 30, method="series")
    g_chunked = torch.autograd.grad((chunked * w).sum(), list(s.values()))
    assert rel_err(chunked, one) <= 1e-14
    for a, b in zip(g_one, g_chunked):
        assert rel_err(a, b) <= 1e-13


def test_series_on_each_device_matches_the_cauchy_method(device):
    # float32 on the device (CUDA when present): "auto" keeps the Cauchy method there, "series" is asked for
    s = _random_pairs(H=3, channels=2)
    s = {k: (v.to(torch.complex64) if v.is_complex() else v.float()).to(device) for k, v in s.items()}
    K = _kernel(s, 300, method="series")
    assert K.device.type == device.type and K.dtype == torch.float32
    assert rel_err(K, _kernel(s, 300, method="cauchy")) <= TOL[torch.float32][0]


@pytest.mark.parametrize("seed", range(6))
def test_float32_series_on_random_stable_systems(seed):
    # Re Lambda from -1e-4 to -1, |Im Lambda| up to 1e3, |P| from 0.1 to 10, dt from 1e-4 to 10: the float32
    # series kernel within the float32 tolerance of the float64 one (a sweep of 40 such systems up to
    # L = 8192 measured 4.2e-5 at worst, the float32 Cauchy method 8.5e-5)
    g = torch.Generator().manual_seed(seed)
    H, N, L = 3, 16, 1000

    def c(*shape):
        return torch.complex(torch.randn(*shape, generator=g, dtype=torch.float64),
                             torch.randn(*shape, generator=g, dtype=torch.float64))

    re = -(10 ** (-4 + 4 * torch.rand(H, N, generator=g, dtype=torch.float64)))
    im = (torch.rand(H, N, generator=g, dtype=torch.float64) - 0.5) * 10 ** (3 * seed / 5)
    s = {"Lambda": torch.complex(re, im), "P": 10 ** (seed / 2.5 - 1) * c(1, H, N), "B": c(H, N),
         "C": c(H, N), "dt": 10 ** (-4 + 5 * torch.rand(H, generator=g, dtype=torch.float64))}
    s["Q"] = s["P"]
    ref = _kernel(s, L, method="cauchy")
    s32 = {k: v.to(torch.complex64) if v.is_complex() else v.float() for k, v in s.items()}
    assert rel_err(_kernel(s, L, method="series"), ref) <= 1e-10
    assert rel_err(_kernel(s32, L, method="series"), ref) <= TOL[torch.float32][0]
