"""Layers on the family protocol: the inference cache is never stale, the system is public, backends reach
the kernels, and state passing equals the recurrence from that state."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_err, tol
from torch import nn

import ssm
from ssm.systems import diag, dplr

LAYERS = {
    "s4": lambda **kw: ssm.S4(6, 8, **kw),
    "s4-zoh": lambda **kw: ssm.S4(6, 8, disc="zoh", **kw),
    "s4d": lambda **kw: ssm.S4D(6, 8, **kw),
    "rtf": lambda **kw: ssm.RTF(6, 8, **kw),
    "s5": lambda **kw: ssm.S5(6, 8, **kw),
}


def _fresh(layer, x):
    """The output computed from the current parameter values, bypassing any cache."""
    with torch.enable_grad():
        return layer(x).detach()


def _perturb(t: torch.Tensor) -> torch.Tensor:
    return t * 0.9 + 0.01


def _relayout(t: torch.Tensor) -> torch.Tensor:
    """The same storage read in column-major order: the same data_ptr and shape, other values."""
    strides, step = [], 1
    for n in t.shape:
        strides.append(step)
        step *= n
    return t.as_strided(t.shape, strides)


MUTATIONS = {
    "data-inplace": lambda layer: [p.data.copy_(_perturb(p.data)) for p in layer.ssm_parameters()],
    "data-assign": lambda layer: [setattr(p, "data", _perturb(p.data)) for p in layer.ssm_parameters()],
    "new-parameter": lambda layer: [
        setattr(layer, n, nn.Parameter(_perturb(getattr(layer, n).detach()))) for n in layer._ssm_names
    ],
    "vector_to_parameters": lambda layer: nn.utils.vector_to_parameters(
        _perturb(nn.utils.parameters_to_vector(layer.parameters())), layer.parameters()
    ),
    "half-float": lambda layer: layer.half().float(),
    "data-relayout": lambda layer: [setattr(p, "data", _relayout(p.data)) for p in layer.ssm_parameters()
                                    if p.ndim >= 2],
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("name", list(LAYERS))
def test_cache_is_never_stale(name, mutation):
    layer = LAYERS[name]().eval()
    x = torch.randn(2, 30, 6)
    with torch.no_grad():
        layer(x)  # fills the cache
        MUTATIONS[mutation](layer)
        y = layer(x)
    torch.testing.assert_close(y, _fresh(layer, x), **tol(torch.float32))


@pytest.mark.parametrize("name", list(LAYERS))
def test_cache_follows_load_state_dict_optimizer_and_to(name):
    layer = LAYERS[name]().eval()
    other = LAYERS[name]()
    x = torch.randn(2, 30, 6)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), _fresh(layer, x), **tol(torch.float32))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _fresh(layer, x), **tol(torch.float32))
        layer.to(torch.float64)
        x64 = x.double()
        torch.testing.assert_close(layer(x64), _fresh(layer, x64), **tol(torch.float64))


@pytest.mark.parametrize("name", ["s4", "s4d"])
def test_cache_hits_while_parameters_are_unchanged(name):
    layer = LAYERS[name]().eval()
    with torch.no_grad():
        K1 = layer.kernel(16)
        K2 = layer.kernel(16)
        assert K1 is K2  # reused, not recomputed
        layer.D.data.add_(1.0)  # not an SSM parameter: the kernel stays valid
        assert layer.kernel(16) is K1
        layer.log_dt.data.add_(0.1)
        assert layer.kernel(16) is not K1


def test_cache_keys_on_what_register_ssm_marks():
    layer = ssm.S4D(4, 4)
    names = set(layer._ssm_names)
    assert names == {"log_neg_real", "Lambda_imag", "B", "log_dt", "C"}
    hints = layer.optimizer_hints()
    assert "C" not in hints  # C follows the global optimizer settings, as in S4
    assert hints["B"] == {"weight_decay": 0.0, "lr": 1e-3}


@pytest.mark.parametrize("name", ["s4", "s4-zoh", "s4d"])
def test_discrete_system_is_the_family_form(name):
    layer = LAYERS[name](dtype=torch.float64)
    sys = layer.discrete_system()
    fam = dplr if name.startswith("s4") and name != "s4d" else diag
    assert isinstance(sys, fam.DPLRSystem if fam is dplr else fam.DiagSystem)
    assert sys.Lambda.shape == (6, 4) and sys.C.shape == (1, 6, 4) and sys.dt.shape == (6,)
    torch.testing.assert_close(fam.kernel(sys, 40), layer.kernel(40), **tol(torch.float64))
    sys2 = layer.discrete_system(rate=2.0)
    torch.testing.assert_close(sys2.dt, 2 * sys.dt)
    with pytest.raises(ValueError, match="rate"):
        layer.discrete_system(rate=0.0)


@pytest.mark.parametrize("cls", [ssm.S4, ssm.S4D])
def test_backend_reaches_the_kernel(cls):
    x = torch.randn(2, 50, 4, dtype=torch.float64)
    torch.manual_seed(1)
    ref = cls(4, 8, dtype=torch.float64, backend="naive")
    for backend in ("auto", "chunked"):
        torch.manual_seed(1)
        layer = cls(4, 8, dtype=torch.float64, backend=backend)
        assert layer.kernel_options()["backend"] == ("auto" if backend == "auto" else backend)
        torch.testing.assert_close(layer(x), ref(x), **tol(torch.float64))
    with pytest.raises(ValueError, match="backend"):
        cls(4, 8, backend="keops")
    layer = cls(4, 8, backend="triton")
    with pytest.raises((ValueError, ImportError), match="triton"):
        layer(torch.randn(1, 10, 4))  # CPU tensors: refused with the reason, never a silent fallback


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("L", [1, 9, 200])
def test_forward_from_state_equals_step_loop(name, L):
    """forward(x, state) equals the recurrence from that state, and return_state its last state."""
    layer = LAYERS[name](dtype=torch.float64)
    Bsz = 3
    state = layer.default_state(Bsz)
    state = state + torch.randn_like(state)
    x = torch.randn(Bsz, L, 6, dtype=torch.float64)
    y, next_state = layer(x, state, return_state=True)
    s, ys = state, []
    for k in range(L):
        yk, s = layer.step(x[:, k], s)
        ys.append(yk)
    assert rel_err(y, torch.stack(ys, 1)) < tol(torch.float64)["rtol"]
    assert rel_err(next_state, s) < tol(torch.float64)["rtol"]


@pytest.mark.parametrize("name", list(LAYERS))
def test_state_passing_gradients(name):
    """The state-passing path is differentiable in the parameters and the state (train mode)."""
    layer = LAYERS[name](dtype=torch.float64)
    state = layer.default_state(2) + 0.1
    state.requires_grad_(True)
    x = torch.randn(2, 20, 6, dtype=torch.float64)
    y, s = layer(x, state, return_state=True)
    (y.square().sum() + s.abs().square().sum()).backward()
    assert state.grad is not None and torch.isfinite(torch.view_as_real(state.grad) if state.is_complex()
                                                        else state.grad).all()
    assert all(p.grad is not None for p in layer.ssm_parameters() if p.requires_grad)


def test_copy_keeps_system_usable():
    layer = ssm.S4(4, 8).eval()
    with torch.no_grad():
        layer(torch.randn(1, 10, 4))
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        clone.log_dt.data.mul_(0.5)
        torch.testing.assert_close(clone(torch.ones(1, 10, 4)), _fresh(clone, torch.ones(1, 10, 4)))


@pytest.mark.parametrize("cls,kw", [(ssm.S4D, {}), (ssm.S4D, {"disc": "bilinear"}), (ssm.S4, {}),
                                    (ssm.S4, {"disc": "zoh"})])
def test_to_rtf_same_outputs(cls, kw):
    layer = cls(4, 8, dt_min=0.05, dt_max=0.5, channels=2, dtype=torch.float64, **kw).eval()
    rtf = layer.to_rtf()
    assert isinstance(rtf, ssm.RTF) and rtf.d_state == 8 and not rtf.training
    x = torch.randn(2, 100, 4, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(rtf(x), layer(x)) < 1e-8
        state = layer.default_state(2)
        y, s = rtf.step(x[:, 0], rtf.default_state(2))
        assert rel_err(y, layer.step(x[:, 0], state)[0]) < 1e-8


def test_to_rtf_float32_layer():
    layer = ssm.S4D(4, 4, dt_min=0.2, dt_max=1.0).eval()
    rtf = layer.to_rtf()
    assert rtf.a.dtype == torch.float32
    x = torch.randn(2, 100, 4)
    with torch.no_grad():
        assert rel_err(rtf(x), layer(x)) < 1e-4
    # float32 coefficients of an order-8 system are too coarse here; float64 ones are exact
    layer8 = ssm.S4D(4, 8, dt_min=0.05, dt_max=0.5).eval()
    with pytest.raises(ValueError, match="float32 coefficients"):
        layer8.to_rtf()
    rtf8 = layer8.to_rtf(dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(rtf8(x.double()), layer8(x)) < 1e-4


def test_to_rtf_refuses_clustered_poles():
    layer = ssm.S4D(4, 64, dt_min=1e-3, dt_max=1e-2, dtype=torch.float64)
    with pytest.raises(ValueError, match="clustered poles"):
        layer.to_rtf()
    with pytest.raises(ValueError, match="causal"):
        ssm.S4D(4, 8, bidirectional=True).to_rtf()


@pytest.mark.parametrize("name", list(LAYERS))
def test_meta_build_then_reset_parameters_restores_the_initialization(name):
    torch.manual_seed(3)
    ref = LAYERS[name]()
    with torch.device("meta"):
        layer = LAYERS[name]()
    assert all(p.device.type == "meta" for p in layer.parameters())
    layer.to_empty(device="cpu")
    torch.manual_seed(3)
    layer.reset_parameters()
    for (n, p), (_, q) in zip(layer.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    x = torch.randn(2, 12, 6)
    torch.testing.assert_close(layer(x), ref(x))
    assert LAYERS[name](device="meta").D.device.type == "meta"


def test_extra_repr_names_the_configuration():
    text = repr(ssm.S4(8, 16, disc="zoh", channels=2, bidirectional=True))
    for part in ("8", "d_state=16", "init='legs'", "disc='zoh'", "channels=2", "bidirectional=True"):
        assert part in text
    assert "constraint='montel'" in repr(ssm.RTF(4, 8))


@pytest.mark.parametrize("name", ["s4d", "rtf"])
def test_a_copied_cache_never_reads_recorded_addresses(name, monkeypatch):
    """deepcopy / pickle copy the cache with its snapshot: the copy compares values (its arrays are not the
    snapshot's own, so the addresses recorded for the memcmp route would be stale), and stays exact."""
    import pickle

    import ssm.layers.lti as lti

    layer = LAYERS[name]().eval()
    x = torch.randn(2, 30, 6)
    with torch.no_grad():
        layer(x)  # fills the cache (and its snapshot)
        copies = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))]
        for c in copies:  # as if each copy's storage had landed where the recorded one was
            snap = c._memo[0]
            for i, p in enumerate(c.ssm_parameters()):
                snap[i] = (snap[i][0], (p.data_ptr(), p.shape, p.stride(), p.dtype), *snap[i][2:])

        def refuse():
            raise AssertionError("a copied snapshot took the memcmp route")

        monkeypatch.setattr(lti, "_memcmp", refuse)
        for c in copies:  # the copied snapshot matches by values
            torch.testing.assert_close(c(x), _fresh(layer, x), **tol(torch.float32))
        monkeypatch.undo()
        for c in copies:
            c.log_dt.data.add_(0.1) if hasattr(c, "log_dt") else c.a.data.mul_(0.5)
            torch.testing.assert_close(c(x), _fresh(c, x), **tol(torch.float32))
