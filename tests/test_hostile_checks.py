"""Checks that were missing or misleading: a state's device and batch, inference-mode states, to_rtf of an
RTF layer, hf.from_pretrained of a missing directory."""

from __future__ import annotations

import pytest
import torch

import ssm

NAMES = ["s4", "s4d", "rtf", "s5"]


@pytest.mark.parametrize("name", NAMES)
def test_a_state_on_another_device_is_refused_by_name(name):
    layer = ssm.layers.LAYERS[name](4, 8)
    x = torch.randn(2, 6, 4)
    meta = layer.default_state(2, device="meta")
    with pytest.raises(ValueError, match="state must be on x's device cpu; got one on meta"):
        layer(x, meta)
    with pytest.raises(ValueError, match="state must be on x's device"):
        layer.step(x[:, 0], meta)  # S4 zoh used to return uninitialized data here


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_batch_with_a_state_does_not_blame_batch_size(name):
    layer = ssm.layers.LAYERS[name](4, 8)
    state = layer.default_state(1)[:0]
    y, s = layer(torch.randn(0, 6, 4), state, return_state=True)
    assert y.shape == (0, 6, 4) and s.shape == state.shape
    with pytest.raises(ValueError, match=r"state must have shape \(0,"):
        layer(torch.randn(0, 6, 4), layer.default_state(1))


@pytest.mark.parametrize("name", NAMES)
def test_a_state_made_in_inference_mode_feeds_a_training_forward(name):
    layer = ssm.layers.LAYERS[name](4, 8)
    x = torch.randn(2, 6, 4)
    with torch.inference_mode():
        _, state = layer(x, return_state=True)
    layer(x, state).sum().backward()
    layer.step(x[:, 0], state)[0].sum().backward()
    assert layer.D.grad is not None


def test_rtf_to_rtf_checks_like_the_other_layers():
    layer = ssm.RTF(4, 8)
    with pytest.raises(ValueError, match="rate must be 1.0"):
        layer.to_rtf(rate=2.0)
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
        layer.to_rtf(dtype=torch.float16)
    with pytest.raises(ValueError, match="check_length must be >= 1"):
        layer.to_rtf(check_length=0)


def test_hf_from_pretrained_of_a_missing_directory(tmp_path):
    hf = pytest.importorskip("ssm.integrations.hf")
    with pytest.raises(ValueError, match="does not exist"):
        hf.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no config.json"):
        hf.from_pretrained(tmp_path)
