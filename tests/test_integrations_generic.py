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
