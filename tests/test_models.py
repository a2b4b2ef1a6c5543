"""Blocks, models and optimizer groups."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tol

import ssm
from ssm.optim import make_optimizer, param_groups

H = 8
# step == forward in float32: the recurrence and the FFT convolution against each other
RTOL = tol(torch.float32)["rtol"]


@pytest.mark.parametrize("layer", ["s4", "s4d", "rtf"])
@pytest.mark.parametrize("prenorm,norm,ff", [(True, "layer", 0), (False, "layer", 2), (True, "batch", 2)])
def test_block_step_equals_forward(layer, prenorm, norm, ff):
    block = ssm.SSMBlock(H, layer=layer, d_state=16, norm=norm, prenorm=prenorm, ff=ff).eval()
    x = torch.randn(2, 65, H)
    with torch.no_grad():
        y, s = block(x, return_state=True)
        state = block.default_state(2)
        ys = []
        for t in range(x.shape[1]):
            yt, state = block.step(x[:, t], state)
            ys.append(yt)
        y1, s1 = block(x[:, :20], return_state=True)
        y2 = block(x[:, 20:], s1)
    assert rel_err(torch.stack(ys, 1), y) <= RTOL
    assert rel_err(state, s) <= RTOL
    assert rel_err(torch.cat([y1, y2], 1), y) <= RTOL


@pytest.mark.parametrize("layer", ["s4", "s4d", "rtf"])
def test_model_generation_by_step(layer):
    model = ssm.SSMModel(
        11, 11, d_model=H, n_layers=2, layer=layer, d_state=16, pool="none", embedding=True
    ).eval()
    tokens = torch.randint(0, 11, (3, 40))
    with torch.no_grad():
        logits = model(tokens)
        state = model.default_state(3)
        out = []
        for t in range(tokens.shape[1]):
            o, state = model.step(tokens[:, t], state)
            out.append(o)
        _, s_full = model(tokens, return_state=True)
    assert logits.shape == (3, 40, 11)
    assert rel_err(torch.stack(out, 1), logits) <= RTOL
    for a, b in zip(state, s_full):
        assert rel_err(a, b) <= RTOL


def test_model_pooling_with_lengths():
    model = ssm.SSMModel(3, 5, d_model=H, n_layers=2, layer="s4d", d_state=16, pool="mean").eval()
    x = torch.randn(2, 30, 3)
    lengths = torch.tensor([30, 12])
    x2 = x.clone()
    x2[1, 12:] = 100.0
    with torch.no_grad():
        y, y2 = model(x, lengths), model(x2, lengths)
        alone = model(x[1:2, :12])
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(y[1], alone[0], **tol(torch.float32))
    last = ssm.SSMModel(3, 5, d_model=H, n_layers=1, layer="s4", d_state=16, pool="last").eval()
    with torch.no_grad():
        torch.testing.assert_close(last(x, lengths)[1], last(x[1:2, :12])[0], **tol(torch.float32))


def test_model_bad_inputs():
    model = ssm.SSMModel(3, 5, d_model=H, n_layers=1, layer="s4d", d_state=16)
    with pytest.raises(ValueError, match="d_input"):
        model(torch.randn(2, 10, 4))
    with pytest.raises(ValueError, match="pool"):
        model.step(torch.randn(2, 3), model.default_state(2))
    emb = ssm.SSMModel(7, 5, d_model=H, n_layers=1, layer="s4d", d_state=16, embedding=True, pool="none")
    with pytest.raises(ValueError, match="token ids"):
        emb(torch.randn(2, 10))
    with pytest.raises(ValueError, match="token ids"):
        emb(torch.full((2, 10), 7))
    with pytest.raises(ValueError, match="state"):
        emb.step(torch.zeros(2, dtype=torch.long), [])
    with pytest.raises(ValueError, match="pool"):
        ssm.SSMModel(3, 5, pool="max")
    with pytest.raises(ValueError, match="layer"):
        ssm.SSMBlock(H, layer="hyena")


def test_param_groups_follow_hints():
    model = ssm.SSMModel(3, 5, d_model=H, n_layers=2, layer="s4", d_state=16,
                         layer_kwargs={"ssm_lr": 1e-3, "ssm_weight_decay": 0.0})
    groups = param_groups(model, lr=1e-2, weight_decay=0.05)
    by_lr = {g["lr"]: g for g in groups}
    assert set(by_lr) == {1e-2, 1e-3}
    assert by_lr[1e-3]["weight_decay"] == 0.0 and by_lr[1e-2]["weight_decay"] == 0.05
    ssm_params = {id(p) for p in by_lr[1e-3]["params"]}
    for block in model.blocks:
        for name in ("log_neg_real", "Lambda_imag", "P", "B", "log_dt"):
            assert id(getattr(block.layer, name)) in ssm_params
        assert id(block.layer.C) not in ssm_params and id(block.layer.D) not in ssm_params
    n_total = sum(1 for _ in model.parameters())
    assert sum(len(g["params"]) for g in groups) == n_total
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.05)
    assert len(opt.param_groups) == 2
    with pytest.raises(ValueError, match="lr"):
        param_groups(model, lr=0)


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = ssm.SSMModel(1, 2, d_model=16, n_layers=2, layer="s4d", d_state=16)
    x = torch.randn(64, 50, 1)
    y = (x[:, :10, 0].sum(1) > 0).long()  # depends on the beginning: needs memory across 40 steps
    opt = make_optimizer(model, lr=1e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
