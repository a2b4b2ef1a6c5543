"""The prepared steps (``prepare_step`` + ``step_prepared``) against each family's reference ``step``, in
float64: values, next states and gradients; and the layer's cache of the step constants."""

from __future__ import annotations

import pytest
import torch

import ssm
from ssm.systems import diag, dplr, rtf

CASES = {
    "s4-legs": (ssm.S4, dplr, {}),
    "s4-legt-rank2": (ssm.S4, dplr, {"init": "legt"}),
    "s4-zoh": (ssm.S4, dplr, {"disc": "zoh"}),
    "s4d-zoh": (ssm.S4D, diag, {}),
    "s4d-bilinear": (ssm.S4D, diag, {"disc": "bilinear"}),
    "rtf": (ssm.RTF, rtf, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_prepared_step_equals_the_reference_step(name):
    cls, fam, kw = CASES[name]
    torch.manual_seed(0)
    layer = cls(6, 8, channels=2, dtype=torch.float64, **kw)
    sys_ = layer.discrete_system()
    state = layer.default_state(3)
    state = state + torch.randn_like(state)
    u = torch.randn(3, 6, dtype=torch.float64)
    y0, x0 = fam.step(sys_, state, u)
    y1, x1 = fam.step_prepared(fam.prepare_step(sys_), state, u)
    assert x1.dtype == x0.dtype and x1.shape == x0.shape and y1.shape == y0.shape
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x1, x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_prepared_step_has_the_reference_gradients(name):
    cls, fam, kw = CASES[name]
    torch.manual_seed(1)
    layer = cls(4, 6, dtype=torch.float64, **kw)
    state = layer.default_state(2)
    state = state + torch.randn_like(state)
    u = torch.randn(2, 4, dtype=torch.float64)
    params = list(layer.ssm_parameters())

    def grads(fn):
        y, x = fn(layer.discrete_system())
        loss = y.square().sum() + torch.view_as_real(x).square().sum() if x.is_complex() else \
            y.square().sum() + x.square().sum()
        return torch.autograd.grad(loss, params, allow_unused=True)

    ref = grads(lambda s: fam.step(s, state, u))
    fast = grads(lambda s: fam.step_prepared(fam.prepare_step(s), state, u))
    for g0, g1 in zip(ref, fast):
        if g0 is None:
            assert g1 is None or not g1.abs().max()
        else:
            torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-12)


def test_rtf_prepared_step_of_order_zero():
    b, a = torch.randn(2, 3, 1, dtype=torch.float64), torch.zeros(3, 0, dtype=torch.float64)
    sys_ = rtf.system(b, a)
    x, u = torch.zeros(4, 3, 0, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    y0, x0 = rtf.step(sys_, x, u)
    y1, x1 = rtf.step_prepared(rtf.prepare_step(sys_), x, u)
    torch.testing.assert_close(y1, y0)
    assert x1.shape == x0.shape == (4, 3, 0)


@pytest.mark.parametrize("cls", [ssm.S4, ssm.S4D, ssm.RTF])
def test_layer_step_constants_are_cached_and_follow_the_parameters(cls):
    torch.manual_seed(2)
    layer = cls(5, 4).eval()
    x, state = torch.randn(2, 5), layer.default_state(2)
    state = state + torch.randn_like(state)
    with torch.no_grad():
        y0, _ = layer.step(x, state)
        consts = layer._step_constants(1.0)
        assert layer._step_constants(1.0) is consts  # reused while the parameters are unchanged
        p = layer.ssm_parameters()[-1]
        p.data.mul_(0.5)  # in place through .data: the cache compares values
        y1, _ = layer.step(x, state)
        assert layer._step_constants(1.0) is not consts
        fresh = cls(5, 4).eval()
        fresh.load_state_dict(layer.state_dict())
        torch.testing.assert_close(y1, fresh.step(x, state)[0])
        assert not torch.allclose(y0, y1)
