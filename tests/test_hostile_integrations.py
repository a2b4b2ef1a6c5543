"""Integrations under hostile use: training-mode caches, all-or-nothing swaps, hosts whose attention module
holds more than attention (ALBERT), encoder-decoder and 4-D masks, SSMMixer's mask conventions."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import tol

import ssm
from ssm.integrations import SSMMixer

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("ssm.integrations.hf")

V = 40


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(cfg)


def bart():
    cfg = transformers.BartConfig(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=0)
    return transformers.BartForConditionalGeneration(cfg)


def without_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def test_training_mode_uses_the_generation_cache():
    model = without_dropout(hf.swap_attention(gpt2(), "s4d", d_state=8)).train()
    ids = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = transformers.DynamicCache(config=model.config)
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        first = model(ids[:, :4], use_cache=True, **{key: cache}).logits
        rest = model(ids[:, 4:], use_cache=True, **{key: cache}).logits
    torch.testing.assert_close(torch.cat([first, rest], 1), full, **tol(torch.float32))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), model.eval().generate(ids, **kw))


def test_a_refused_swap_changes_nothing():
    model = bart()
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match="decoder.*causal layer.*nothing was replaced"):
        hf.swap_attention(model, "s4d", bidirectional=True)  # the encoder would accept it, the decoder not
    assert [n for n, _ in model.named_modules()] == names
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert getattr(model.config, "ssm_swap", None) is None


def test_albert_keeps_its_output_dense_norm_and_residual():
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(vocab_size=V, embedding_size=16, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32)
    model = transformers.AlbertModel(cfg).eval()
    attn = model.encoder.albert_layer_groups[0].albert_layers[0].attention
    dense, norm = attn.dense, attn.LayerNorm
    hf.swap_attention(model, "s4d", d_state=8)
    adapter = model.encoder.albert_layer_groups[0].albert_layers[0].attention
    assert adapter.post.dense is dense and adapter.post.LayerNorm is norm
    x = torch.randn(2, 5, 32)
    y = adapter.layer(x)
    torch.testing.assert_close(adapter(x)[0], norm(x + dense(y)))


def test_encoder_and_decoder_read_their_own_padding_masks():
    torch.manual_seed(0)
    model = hf.swap_attention(bart(), "s4d", d_state=8).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, V, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():  # the encoder called alone, as generate() does, still honours its mask
        padded = model.get_encoder()(ids, attention_mask=mask).last_hidden_state[1, :5]
        alone = model.get_encoder()(ids[1:, :5]).last_hidden_state[0]
    torch.testing.assert_close(padded, alone, **tol(torch.float32))
    dec = torch.randint(3, V, (2, 6), generator=g)
    dmask = torch.ones_like(dec)
    dmask[1, :3] = 0  # left-padded decoder rows: the pad tokens must not reach the state
    other = dec.clone()
    other[1, :3] = 7
    with torch.no_grad():
        a = model(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
        b = model(ids, attention_mask=mask, decoder_input_ids=other, decoder_attention_mask=dmask).logits
    torch.testing.assert_close(a[1, 3:], b[1, 3:], **tol(torch.float32))


def test_a_4d_attention_mask_is_refused():
    model = hf.swap_attention(gpt2(), "s4d", d_state=8).eval()
    ids = torch.randint(1, V, (2, 5))
    with pytest.raises(ValueError, match="attention_mask must be a 2-D"):
        model(ids, attention_mask=torch.ones(2, 1, 5, 5))


# ---- SSMMixer mask conventions ---------------------------------------------------------------------------

def left_padded():
    torch.manual_seed(0)
    mixer = SSMMixer(ssm.S4D(4, 8))
    x = torch.randn(2, 10, 4)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, :4] = False
    return mixer, x, keep, mixer(x, mask=keep)


def test_mixer_reads_an_additive_float_mask():
    mixer, x, keep, ref = left_padded()
    additive = torch.zeros(2, 10).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(mixer(x, mask=additive), ref)
    torch.testing.assert_close(mixer(x, mask=torch.zeros(2, 10).masked_fill(~keep, -1e9)), ref)
    torch.testing.assert_close(mixer(x, mask=keep.long()), ref)  # 1 = keep, as HF's attention_mask
    with pytest.raises(ValueError, match="additive"):
        mixer(x, mask=keep.float())  # 0./1.: a multiplicative or an additive mask? refused
    with pytest.raises(ValueError, match="0 or 1"):
        mixer(x, mask=keep.long() * 2)


def test_mixer_reads_key_padding_mask_with_true_meaning_pad():
    mixer, x, keep, ref = left_padded()
    torch.testing.assert_close(mixer(x, key_padding_mask=~keep), ref)
    torch.testing.assert_close(mixer(x, mask=keep, key_padding_mask=~keep), ref)
    with pytest.raises(ValueError, match="attn_mask"):
        mixer(x, attn_mask=torch.ones(10, 10, dtype=torch.bool))
    mixer(x, attn_mask=None)  # an absent mask under any keyword is fine
