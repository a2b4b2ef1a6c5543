"""SSMMixer: an ssm layer answering an x-transformers-style self-attention call attn(x, mask=...)."""

from __future__ import annotations

import pytest
import torch
from conftest import tol
from torch import nn

import ssm
from ssm.integrations import SSMMixer


class Block(nn.Module):
    """A pre-norm Transformer block as hand-written codebases have it: ``out, _ = attn(x, mask=mask)``."""

    def __init__(self, attn: nn.Module, d: int) -> None:
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(d), attn
        self.ff = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, mask=None, rotary_pos_emb=None):
        out, _ = self.attn(self.norm(x), mask=mask, rotary_pos_emb=rotary_pos_emb)
        x = x + out
        return x + self.ff(x)


@pytest.mark.parametrize("name", ["s4", "s4d", "rtf", "s5"])
def test_left_padding_does_not_leak_into_a_causal_layer(name):
    torch.manual_seed(0)
    d = 8
    block = Block(SSMMixer(ssm.layers.LAYERS[name](d, 8), returns="tuple"), d)
    x = torch.randn(2, 12, d)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :5] = False  # left padding
    y = block(x, mask=mask, rotary_pos_emb=object())  # host-specific extras are ignored
    alone = block(x[1:, 5:])  # the same sequence without its padding
    torch.testing.assert_close(y[1, 5:], alone[0], **tol(torch.float32))
    noise = x.clone()
    noise[1, :5] = 1e3  # garbage in the pad positions changes nothing at valid ones
    torch.testing.assert_close(block(noise, mask=mask)[1, 5:], y[1, 5:], **tol(torch.float32))


def test_bidirectional_layer_reads_lengths_from_right_padding():
    torch.manual_seed(0)
    mixer = SSMMixer(ssm.S4D(4, 8, bidirectional=True))
    x = torch.randn(2, 10, 4)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    y = mixer(x, mask=mask)
    torch.testing.assert_close(y[0, :6], mixer(x[:1, :6])[0], **tol(torch.float32))


def test_bidirectional_layer_takes_left_padding_exactly():
    mixer = SSMMixer(ssm.S4D(4, 8, bidirectional=True))
    x = torch.randn(2, 10, 4)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :4] = False
    noisy = x.clone()
    noisy[0, :4] = 1e3  # garbage in the pad positions changes nothing at valid ones
    y = mixer(noisy, mask=mask)
    torch.testing.assert_close(y[0, 4:], mixer(x[:1, 4:])[0], **tol(torch.float32))
    torch.testing.assert_close(y[1], mixer(x[1:])[0], **tol(torch.float32))


def test_bidirectional_layer_refuses_padding_inside():
    mixer = SSMMixer(ssm.S4D(4, 8, bidirectional=True))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 3:5] = False
    with pytest.raises(ValueError, match="right or left padding"):
        mixer(torch.randn(2, 10, 4), mask=mask)


def test_refuses_cross_attention_and_bad_masks():
    mixer = SSMMixer(ssm.S4D(4, 8))
    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="cross-attention"):
        mixer(x, context=torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="mask"):
        mixer(x, mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="returns"):
        SSMMixer(ssm.S4D(4, 8), returns="dict")
    with pytest.raises(ValueError, match="transposed"):
        SSMMixer(ssm.S4D(4, 8, transposed=True))


# ---- x-transformers, the real package ---------------------------------------------------------------------

def _x_transformers_net(name: str):
    """A 2-layer x-transformers decoder whose self-attention modules are SSMMixers (float64)."""
    xt = pytest.importorskip("x_transformers")
    torch.manual_seed(0)
    net = xt.TransformerWrapper(num_tokens=16, max_seq_len=64, use_abs_pos_emb=False,
                                attn_layers=xt.Decoder(dim=8, depth=2, heads=2, rotary_pos_emb=True))
    for layer_type, layer in zip(net.attn_layers.layer_types, net.attn_layers.layers):
        if layer_type == "a":
            layer[1] = SSMMixer(ssm.layers.LAYERS[name](8, 4))
    return xt, net.double()


def test_x_transformers_wrapper_trains_and_generates_with_the_state_as_its_cache():
    xt, net = _x_transformers_net("s4d")
    x = torch.randint(0, 16, (2, 10))
    wrapper = xt.AutoregressiveWrapper(net)
    loss = wrapper(x)  # TransformerWrapper calls attention with return_intermediates=True
    loss.backward()
    assert torch.isfinite(loss) and net.attn_layers.layers[0][1].layer.log_dt.grad.abs().sum() > 0
    net.eval()
    full = net(x)
    # prefill 9 tokens, then one cached token: the state in cached_kv continues the recurrence
    _, inter = net(x[:, :-1], return_intermediates=True)
    assert inter.attn_intermediates[0].cached_kv  # the SSM state, where x-transformers keeps its cache
    step, _ = net(x, cache=inter, return_intermediates=True)
    torch.testing.assert_close(step[:, -1], full[:, -1], **tol(torch.float64))
    greedy = {"filter_logits_fn": "top_k", "filter_kwargs": {"k": 1}}
    cached = wrapper.generate(x[:, :4], 8, cache_kv=True, **greedy)
    assert torch.equal(cached, wrapper.generate(x[:, :4], 8, cache_kv=False, **greedy))
    beams = wrapper.beam_search(x[:, :4], 5, beams=3)  # the beams repeat and select the states by batch
    assert torch.equal(beams, wrapper.beam_search(x[:, :4], 5, beams=3, cache_kv=False))


def test_x_transformers_cache_needs_a_causal_layer():
    xt = pytest.importorskip("x_transformers")
    mixer = SSMMixer(ssm.S4D(4, 4, bidirectional=True)).eval()
    x = torch.randn(1, 3, 4)
    _, inter = mixer(x, return_intermediates=True)
    assert isinstance(inter, xt.attend.Intermediates) and inter.cached_kv is None
    with pytest.raises(ValueError, match="causal layer"):
        mixer(x[:, :1], cache=xt.attend.Intermediates(cached_kv=[torch.zeros(1, 1, 8)]),
              return_intermediates=True)
