"""The rewindable generation cache of swapped models (``ssm.integrations.hf.SSMCacheLayer``): assisted
decoding and prompt lookup give plain greedy's tokens, ``crop`` equals never having seen the cropped tokens,
and copies of a prompt's cache continue independently (tiny random GPT-2s in float64, offline)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import SMALL, tol

from ssm.layers import LAYERS
from ssm.layers.base import state_leaves

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("ssm.integrations.hf")

V = 40  # vocabulary
PAD = 0


def gpt2(n_layer: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=n_layer, n_head=2,
                                  pad_token_id=PAD, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(cfg).eval().double()


def swapped(layer: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return hf.swap_attention(gpt2(seed=seed), layer, d_state=8, **SMALL.get(layer, {}), **kw).double()


def generate(model, ids, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                          pad_token_id=PAD, **kw)


def cache_kw(model, cache) -> dict:
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def ids_of(n: int, seed: int, batch: int = 1):
    return torch.randint(1, V, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_assisted_and_prompt_lookup_equal_greedy(layer):
    model = swapped(layer)
    ids = ids_of(7, 1)
    want = generate(model, ids)
    draft = gpt2(n_layer=1, seed=3)  # a stock GPT-2 with the same vocabulary
    draft.generation_config.num_assistant_tokens = 4
    draft.generation_config.assistant_confidence_threshold = 0.0  # always draft 4
    assert torch.equal(generate(model, ids, assistant_model=draft), want)
    # the prompt repeats, so lookup drafts tokens that are partly accepted, partly cropped
    looped = torch.cat([ids, ids[:, :5]], dim=1)
    assert torch.equal(generate(model, looped, prompt_lookup_num_tokens=3), generate(model, looped))


@pytest.mark.parametrize("layer", ["s4d", "mamba"])
def test_a_swapped_draft_is_cropped_too(layer):
    model = swapped(layer)
    ids = ids_of(6, 2)
    want = generate(model, ids)
    for draft in (swapped("s4d", seed=5), copy.deepcopy(model)):  # mostly rejected; always accepted
        draft.generation_config.num_assistant_tokens = 3
        draft.generation_config.assistant_confidence_threshold = 0.0
        assert torch.equal(generate(model, ids, assistant_model=draft), want)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_crop_equals_the_prefix(layer):
    model = swapped(layer, cache_window=3)
    for adapter in model.modules():
        if isinstance(adapter, hf.SSMAttention):
            adapter.step_below = 0  # the tokens before the kept ones by the convolution, however few
    ids = ids_of(12, 3, batch=2)
    with torch.no_grad():
        full = model(ids).logits
        cache = transformers.DynamicCache(config=model.config)

        def feed(a, b):
            return model(ids[:, a:b], **cache_kw(model, cache)).logits

        feed(0, 8)  # a prefill: 4 tokens by the convolution, 4 by step
        cache.crop(-3)
        assert cache.get_seq_length() == 5
        torch.testing.assert_close(feed(5, 7), full[:, 5:7], **tol(torch.float64))
        feed(7, 10)
        cache.crop(-2)
        assert cache.get_seq_length() == 8
        cache.crop(7)  # the older convention: the length to keep
        assert cache.get_seq_length() == 7
        # 1 token by the convolution from the cached state, 4 by step
        torch.testing.assert_close(feed(7, 12), full[:, 7:], **tol(torch.float64))
        cache.crop(0)
        assert cache.get_seq_length() == 12
        with pytest.raises(ValueError, match=r"keeps the states after the last 3 positions.*window=3"):
            cache.crop(-4)
        assert cache.get_seq_length() == 12  # a refused crop changes nothing


def test_crop_with_left_padding():
    model = swapped("mamba")
    ids = ids_of(9, 4, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = transformers.DynamicCache(config=model.config)
        model(ids[:, :7], attention_mask=mask[:, :7], **cache_kw(model, cache))
        cache.crop(-2)
        rest = model(ids[:, 5:], attention_mask=mask, **cache_kw(model, cache)).logits
    torch.testing.assert_close(rest[1], full[1, 5:], **tol(torch.float64))
    torch.testing.assert_close(rest[0], full[0, 5:], **tol(torch.float64))


def test_window_from_transformers_and_refusals(tmp_path):
    model = swapped("s4d", cache_window=0)
    assert model.config.ssm_swap["cache_window"] == 0
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path)
    assert {m.cache_window for m in loaded.modules() if isinstance(m, hf.SSMAttention)} == {0}
    ids = ids_of(5, 5)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kw(model, cache))
        with pytest.raises(ValueError, match="window=0"):
            cache.crop(-1)
        cache.activate_past_recording(recurrent_states_to_keep=2)  # what assisted decoding calls
        model(ids[:, :3], **cache_kw(model, cache))
        cache.crop(-2)
    assert cache.get_seq_length() == 6 and cache.is_croppable and not cache.is_compileable
    with pytest.raises(ValueError, match="cache_window must be a non-negative int"):
        hf.swap_attention(gpt2(), "s4d", cache_window=-1)
    stock = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        gpt2()(ids, **cache_kw(model, stock))  # keys written by attention, not by an SSM layer
        with pytest.raises(ValueError, match="no SSM layer wrote"):
            model(ids[:, :1], **cache_kw(model, stock))


@pytest.mark.parametrize("layer", ["s4", "mamba2"])
def test_prefix_cache_copies_are_independent(layer):
    model = swapped(layer)
    prompt = ids_of(6, 6, batch=2)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt, **cache_kw(model, cache))
    before = copy.deepcopy(cache)
    for seed in (7, 8):
        ids = torch.cat([prompt, ids_of(2, seed, batch=2)], dim=1)
        mine = copy.deepcopy(cache)
        got = generate(model, ids, **cache_kw(model, mine))
        assert torch.equal(got, generate(model, ids))
        assert mine.get_seq_length() > cache.get_seq_length() == 6
    for a, b in zip(cache.layers, before.layers):  # continuing the copies left the prompt's cache alone
        assert a.seen == b.seen and len(a.history) == len(b.history)
        for s, t in zip(state_leaves(a.state), state_leaves(b.state)):
            assert torch.equal(s, t)


def test_beam_search_and_repeats_carry_the_window():
    model = swapped("s5")
    ids = ids_of(5, 9, batch=2)
    assert torch.equal(generate(model, ids, num_beams=3), generate(model, ids, num_beams=3, use_cache=False))
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kw(model, cache))
        cache.batch_repeat_interleave(2)
        cache.batch_select_indices(torch.tensor([0, 3]))
        cache.crop(-1)
        step = model(ids[[0, 1], 4:], **cache_kw(model, cache)).logits
        full = model(ids).logits
    torch.testing.assert_close(step[:, 0], full[:, 4], **tol(torch.float64))
