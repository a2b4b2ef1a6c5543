"""Hugging Face's Mamba and Mamba-2 (their CPU torch paths, random weights from small configs) against
``ssm.interop.from_hf_mamba``: the same outputs per mixer, and the same greedy generation."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import ssm
from ssm.interop import from_hf_mamba

transformers = pytest.importorskip("transformers")


def _mamba_lm(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(vocab_size=50, hidden_size=16, state_size=8, num_hidden_layers=2, expand=2,
                                   conv_kernel=4, time_step_rank=2)
    return transformers.MambaForCausalLM(cfg).eval()


def _mamba2_lm(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Mamba2Config(vocab_size=50, hidden_size=16, state_size=8, num_hidden_layers=2,
                                    expand=2,
                                    head_dim=8, num_heads=4, n_groups=2, chunk_size=8, conv_kernel=4)
    return transformers.Mamba2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("build, cls", [(_mamba_lm, ssm.Mamba), (_mamba2_lm, ssm.Mamba2)])
def test_every_mixer_converts_with_the_same_outputs(build, cls):
    model = build()
    layers = from_hf_mamba(model)
    assert len(layers) == 2 and all(isinstance(layer, cls) for layer in layers)
    x = torch.randn(2, 21, 16)  # not a multiple of Mamba-2's chunk
    for block, layer in zip(model.backbone.layers, layers):
        with torch.no_grad():
            assert rel_err(layer(x), block.mixer(x)) < 1e-5
    one = from_hf_mamba(model.backbone.layers[1].mixer)
    assert isinstance(one, cls)


class _ConvertedLM(torch.nn.Module):
    """The backbone of a transformers Mamba LM with every mixer replaced by its ssm layer."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        self.layers = torch.nn.ModuleList(from_hf_mamba(hf))

    def run(self, ids, states=None):
        bb = self.hf.backbone
        h = bb.embeddings(ids)
        new = []
        for i, (block, layer) in enumerate(zip(bb.layers, self.layers)):
            if ids.shape[1] == 1 and states is not None:
                y, s = layer.step(block.norm(h[:, 0]), states[i])
                y = y[:, None]
            else:
                y, s = layer(block.norm(h), None if states is None else states[i], return_state=True)
            h = h + y
            new.append(s)
        return self.hf.lm_head(bb.norm_f(h)), new

    @torch.no_grad()
    def greedy(self, ids, n):
        logits, states = self.run(ids)
        out = ids
        for _ in range(n):
            token = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, token], 1)
            logits, states = self.run(token, states)
        return out


@pytest.mark.parametrize("build", [_mamba_lm, _mamba2_lm])
def test_cached_generation_equals_transformers(build):
    hf = build()
    ids = torch.randint(0, 50, (2, 9))
    want = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    got = _ConvertedLM(hf).greedy(ids, 12)
    assert torch.equal(got, want)


def test_refuses_what_holds_no_mixer():
    with pytest.raises(ValueError, match="holds none"):
        from_hf_mamba(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="module must be"):
        from_hf_mamba("mamba")
