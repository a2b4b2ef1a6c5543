"""Bad input to layers, blocks, models and the optimizer helpers: a clear ValueError naming the argument, or
the right answer (issue: "a clear error or a right answer, never a silent wrong one")."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import rel_err

import ssm
from ssm.optim import make_optimizer, param_groups

LAYERS = {"s4": ssm.S4, "s4d": ssm.S4D, "rtf": ssm.RTF}


@pytest.fixture(params=sorted(LAYERS))
def layer(request):
    return LAYERS[request.param](4, 8)


# ---- inputs ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_integer_bool_complex_inputs_are_refused(layer, dtype):
    x = torch.ones(2, 10, 4).to(dtype)
    name = str(dtype).split(".")[1]
    with pytest.raises(ValueError, match=r"x must be a real floating-point tensor .*" + name):
        layer(x)
    with pytest.raises(ValueError, match="x must be a real floating-point"):
        layer.step(x[:, 0], layer.default_state(2))


def test_empty_batch_and_empty_sequence(layer):
    y = layer(torch.randn(0, 10, 4))
    assert y.shape == (0, 10, 4)
    y, s = layer(torch.randn(0, 10, 4), return_state=True)
    assert y.shape == (0, 10, 4) and s.shape[0] == 0
    state = layer.default_state(3) + 1
    y, s = layer(torch.randn(3, 0, 4), state, return_state=True)
    assert y.shape == (3, 0, 4) and torch.equal(s, state)  # no step taken: the state is unchanged
    layer(torch.randn(0, 10, 4, requires_grad=True)).sum().backward()  # a graph, as torch layers give


def test_bool_lengths_are_refused(layer):
    with pytest.raises(ValueError, match="lengths must be an integer"):
        layer(torch.randn(2, 10, 4), lengths=torch.tensor([True, False]))


def test_state_one_rule_for_forward_and_step():
    for cls in (ssm.S4, ssm.S4D):
        m = cls(4, 8)
        wide = m.default_state(2).to(torch.complex128) + 0.1
        x = torch.randn(2, 5, 4)
        y_fwd = m(x, wide)
        y_step, s = m.step(x[:, 0], wide)  # accepted by both, computed in the layer's state dtype
        torch.testing.assert_close(y_step, y_fwd[:, 0], rtol=1e-4, atol=1e-5)
        assert s.dtype == torch.complex64
        for bad in (torch.zeros(2, 4, 4, dtype=torch.int64), torch.zeros(2, 4, 4)):
            with pytest.raises(ValueError, match="state must be complex"):
                m.step(x[:, 0], bad)
            with pytest.raises(ValueError, match="state must be complex"):
                m(x, bad)
    rtf = ssm.RTF(4, 8)
    with pytest.raises(ValueError, match="state must be a floating"):
        rtf.step(torch.randn(2, 4), torch.zeros(2, 4, 8, dtype=torch.complex64))


def test_non_finite_input_check_is_opt_in(layer):
    x = torch.randn(2, 10, 4)
    x[1, 5, 2] = float("nan")
    assert not torch.isfinite(layer(x)[1, :5]).all()  # documented: the FFT spreads it backwards too
    layer.check_finite = True
    with pytest.raises(ValueError, match="batch index 1, position 5"):
        layer(x)


# ---- hyperparameters -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.inf, math.nan, -math.inf])
def test_non_finite_hyperparameters_are_refused(bad):
    for kw, name in (({"dt_max": bad}, "dt_max"), ({"dt_min": bad}, "dt_min"), ({"ssm_lr": bad}, "ssm_lr"),
                     ({"ssm_weight_decay": bad}, "ssm_weight_decay")):
        with pytest.raises(ValueError, match=name):
            ssm.S4D(4, 8, **kw)
    with pytest.raises(ValueError, match="rate"):
        ssm.S4D(4, 8)(torch.randn(1, 5, 4), rate=bad)
    model = ssm.SSMModel(2, 3, d_model=4, n_layers=1, layer="s4d", d_state=4)
    with pytest.raises(ValueError, match="lr"):
        make_optimizer(model, lr=bad)
    with pytest.raises(ValueError, match="weight_decay"):
        make_optimizer(model, lr=1e-3, weight_decay=bad)


@pytest.mark.parametrize("name", ["bidirectional", "transposed", "glu"])
def test_bool_flags_must_be_bools(name):
    with pytest.raises(ValueError, match=name):
        ssm.S4(4, 8, **{name: "no"})
    with pytest.raises(ValueError, match="prenorm"):
        ssm.SSMBlock(4, layer="s4d", d_state=4, prenorm="no")
    with pytest.raises(ValueError, match="embedding"):
        ssm.SSMModel(2, 3, d_model=4, n_layers=1, embedding=1)


@pytest.mark.parametrize("cls", [ssm.S4, ssm.S4D, ssm.RTF])
def test_wrongly_typed_hyperparameters_name_the_argument(cls):
    for kw, name in (({"dropout": "0.1"}, "dropout"), ({"dropout": None}, "dropout"),
                     ({"dropout": 1.0}, "dropout"), ({"dtype": torch.int64}, "dtype")):
        with pytest.raises(ValueError, match=name):
            cls(4, 8, **kw)


def test_blocks_and_models_check_their_arguments():
    with pytest.raises(ValueError, match="layer_kwargs"):
        ssm.SSMBlock(4, layer="s4", layer_kwargs="s4")
    with pytest.raises(ValueError, match="transposed"):
        ssm.SSMBlock(4, layer="s4", d_state=4, layer_kwargs={"transposed": True})
    with pytest.raises(ValueError, match="dropout"):
        ssm.SSMBlock(4, layer="s4", d_state=4, dropout=1.0)
    with pytest.raises(ValueError, match="dropout"):
        ssm.SSMModel(2, 3, d_model=4, n_layers=1, dropout=1.0)
    with pytest.raises(ValueError, match="layer_kwargs"):
        ssm.SSMModel(2, 3, d_model=4, n_layers=1, layer_kwargs=["init"])
    with pytest.raises(ValueError, match="dtype"):
        ssm.SSMModel(2, 3, d_model=4, n_layers=1, dtype=torch.int64)


def test_model_pooling_refuses_empty_sequences_and_names_dtype_mismatch():
    model = ssm.SSMModel(2, 3, d_model=4, n_layers=1, layer="s4d", d_state=4)
    x = torch.randn(2, 6, 2)
    with pytest.raises(ValueError, match="lengths"):
        model(x, lengths=torch.tensor([6, 0]))
    with pytest.raises(ValueError, match="length 0"):
        model(torch.randn(2, 0, 2))
    with pytest.raises(ValueError, match="lengths must be an integer"):
        model(x, lengths=torch.tensor([True, True]))
    with pytest.raises(ValueError, match="x has dtype torch.float64 but the model's parameters are "
                                         "torch.float32"):
        model(x.double())
    lm = ssm.SSMModel(10, 3, d_model=4, n_layers=1, layer="s4d", d_state=4, embedding=True, pool="none")
    ids = torch.randint(0, 10, (2, 6))
    torch.testing.assert_close(lm(ids.to(torch.uint8)), lm(ids))  # uint8 token ids are accepted
    with pytest.raises(ValueError, match="bool"):
        lm(ids > 4)


# ---- precision -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,kw", [("s4", {}), ("s4", {"disc": "zoh"}), ("s4d", {}), ("rtf", {})])
def test_half_precision_layers_compute_in_float32(name, kw, dtype):
    low = LAYERS[name](8, 16, **kw).to(dtype)
    ref = copy.deepcopy(low).float()  # the same (rounded) parameters in float32
    x = torch.randn(2, 50, 8).to(dtype)
    y = low(x)
    assert y.dtype == dtype
    bound = 2e-2 if dtype == torch.bfloat16 else 2e-3  # the output projection and rounding of y in `dtype`
    assert rel_err(y, ref(x.float())) < bound
    state = low.default_state(2)
    # states in float32 at least (RTF keeps float64 states: streaming near the unit circle needs them)
    assert state.dtype in ((torch.float64,) if name == "rtf" else (torch.float32, torch.complex64))
    y_t, state = low.step(x[:, 0], state)
    assert y_t.dtype == dtype and rel_err(y_t, ref.step(x[:, 0].float(), ref.default_state(2))[0]) < bound
    built = LAYERS[name](8, 16, dtype=dtype, **kw)
    assert {p.dtype for p in built.parameters()} == {dtype} and built(x).dtype == dtype


# ---- optimizer hints -------------------------------------------------------------------------------------

def _hinted(model) -> set[int]:
    return {id(p) for g in param_groups(model, lr=1.0) if g["lr"] != 1.0 for p in g["params"]}


def _expected(model) -> set[int]:
    return {id(getattr(m, n)) for m in model.modules() if isinstance(m, ssm.SSMLayer)
            for n in m.optimizer_hints()}


def test_optimizer_hints_survive_new_parameter_objects():
    model = ssm.SSMModel(2, 3, d_model=4, n_layers=2, layer="s4", d_state=4)
    assert _hinted(model) == _expected(model) and len(_expected(model)) == 2 * 5
    clone = copy.deepcopy(model)
    assert _hinted(clone) == _expected(clone)
    fresh = ssm.SSMModel(2, 3, d_model=4, n_layers=2, layer="s4", d_state=4)
    fresh.load_state_dict(model.state_dict(), assign=True)
    assert _hinted(fresh) == _expected(fresh)
    meta = copy.deepcopy(model).to("meta").to_empty(device="cpu")
    assert _hinted(meta) == _expected(meta)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert _hinted(loaded) == _expected(loaded)


def test_flattened_parameters_fail_loudly():
    model = ssm.SSMModel(2, 3, d_model=4, n_layers=1, layer="s4d", d_state=4)
    layer = model.blocks[0].layer
    flat = layer.B.detach().clone()
    del layer._parameters["B"]  # what FSDP1 without use_orig_params does: a view, not a Parameter
    layer.B = flat
    with pytest.raises(ValueError, match="use_orig_params"):
        param_groups(model, lr=1e-3)


# ---- serialization ---------------------------------------------------------------------------------------

def test_state_dict_carries_the_configuration():
    zoh, bil = ssm.S4(4, 8, disc="zoh"), ssm.S4(4, 8)
    unexpected = 'Unexpected key\\(s\\) in state_dict: "_extra_state"'
    with pytest.warns(UserWarning, match="disc='zoh' in the state_dict but disc='bilinear' in this layer"):
        with pytest.raises(RuntimeError, match=unexpected):
            bil.load_state_dict(zoh.state_dict())
    assert bil.disc == "bilinear"
    with pytest.raises(ValueError, match="disc='zoh' in the state_dict but disc='bilinear' in this layer"):
        bil.set_extra_state(zoh.get_extra_state())
    with pytest.warns(UserWarning, match="constraint"), pytest.raises(RuntimeError, match=unexpected):
        ssm.RTF(4, 8).load_state_dict(ssm.RTF(4, 8, constraint="none").state_dict())
    with pytest.warns(UserWarning, match="activation"), pytest.raises(RuntimeError, match=unexpected):
        ssm.S4D(4, 8).load_state_dict(ssm.S4D(4, 8, activation="silu").state_dict())
    same = ssm.S4(4, 8, disc="zoh")
    same.load_state_dict(zoh.state_dict())
    x = torch.randn(1, 9, 4)
    torch.testing.assert_close(same(x), zoh(x))
    old = {k: v for k, v in zoh.state_dict().items() if not k.endswith("_extra_state")}
    same.load_state_dict(old)  # checkpoints from before the configuration was carried still load


def test_extra_state_mismatch_is_listed_under_strict_false():
    """Another layer type under strict=False: the configuration mismatch is listed with PyTorch's other
    missing and unexpected keys (not raised first), the shared parameters load, the layer keeps its own."""
    s4, s4d = ssm.SSMModel(2, 3, d_model=4, n_layers=1, layer="s4", d_state=8), ssm.SSMModel(
        2, 3, d_model=4, n_layers=1, layer="s4d", d_state=8)
    with pytest.warns(UserWarning, match="disc='bilinear' in the state_dict but disc='zoh' in this layer"):
        result = s4d.load_state_dict(s4.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == ["blocks.0.layer.P", "blocks.0.layer._extra_state"]
    assert s4d.blocks[0].layer.disc == "zoh"
    assert torch.equal(s4d.blocks[0].layer.log_dt, s4.blocks[0].layer.log_dt)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match='"blocks.0.layer._extra_state"'):
        s4d.load_state_dict(s4.state_dict())


def test_optimizer_hints_survive_fsdp2_fully_shard():
    """FSDP2 replaces every Parameter by a DTensor one: the hints, kept by name on the layers, still apply."""
    import subprocess
    import sys

    code = (
        "import os, socket, torch, torch.distributed as dist\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "import ssm\n"
        "from torch.distributed.fsdp import fully_shard\n"
        "model = ssm.SSMModel(2, 3, d_model=8, n_layers=2, layer='s4', d_state=4)\n"
        "for block in model.blocks:\n"
        "    fully_shard(block)\n"
        "fully_shard(model)\n"
        "groups = ssm.optim.param_groups(model, lr=1.0)\n"
        "hinted = [p for g in groups if g['lr'] != 1.0 for p in g['params']]\n"
        "assert len(hinted) == 10 and all(type(p.data).__name__ == 'DTensor' for p in hinted), groups\n"
        "dist.destroy_process_group()\n"
    )
    pytest.importorskip("torch.distributed.fsdp")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
