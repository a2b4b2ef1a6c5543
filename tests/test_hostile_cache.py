"""The eval cache under races (a hot reload during a call) and under torch.func transforms (ensembles)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tol
from torch.func import functional_call, grad, stack_module_state, vmap

import ssm


def reloaded(layer):
    """A state dict of the same layer with other SSM values."""
    other = copy.deepcopy(layer)
    with torch.no_grad():
        for p in other.ssm_parameters():
            p.mul_(0.9)
    return other.state_dict()


def uncached_kernel(layer, L=16):
    return layer.family.kernel(layer.discrete_system(), L, **layer.kernel_options())


@pytest.mark.parametrize("name", ["s4d", "rtf"])
def test_a_call_that_raced_a_reload_stores_nothing_stale(name):
    torch.manual_seed(0)
    layer = ssm.layers.LAYERS[name](4, 8).eval()
    new = reloaded(layer)
    with torch.no_grad():
        def slow_old_kernel():  # computed from the old values; a reload and a fresh request land meanwhile
            K = uncached_kernel(layer)
            layer.load_state_dict(new)
            layer.kernel(16)
            return K

        layer.memo("kernel", (16, 1.0), slow_old_kernel, inputs=(layer._system(1.0),))
        torch.testing.assert_close(layer.kernel(16), uncached_kernel(layer), rtol=0, atol=0)


def test_a_kernel_is_not_stored_from_a_system_of_older_parameters():
    torch.manual_seed(0)
    layer = ssm.S4D(4, 8).eval()
    with torch.no_grad():
        old_system = layer._system(1.0)  # a forward read the system, then a reload happened
        layer.load_state_dict(reloaded(layer))
        layer._kernel_of(old_system, 16, 1.0)
        torch.testing.assert_close(layer.kernel(16), uncached_kernel(layer), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["s4", "s4d", "rtf", "s5"])
def test_vmap_over_stacked_parameters_in_eval_mode(name):
    torch.manual_seed(0)
    models = [ssm.layers.LAYERS[name](4, 8).eval() for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(2, 10, 4)
    with torch.no_grad():
        y = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
        for m, y_m in zip(models, y):
            torch.testing.assert_close(y_m, m(x), **tol(torch.float32))


def test_func_grad_through_the_s5_scan_equals_backward():
    torch.manual_seed(0)
    layer = ssm.S5(4, 8, dtype=torch.float64)
    x = torch.randn(2, 12, 4, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    g = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
    layer(x).square().sum().backward()
    for k, p in layer.named_parameters():
        torch.testing.assert_close(g[k], p.grad, **tol(torch.float64))
