"""ssm.integrations.hf: ssm layers in the place of Hugging Face attention (tiny random configs, offline)."""

from __future__ import annotations

import inspect

import pytest
import torch

import ssm

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("ssm.integrations.hf")

V = 40  # vocabulary
PAD = 0


def gpt2(**kw):
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  pad_token_id=PAD, bos_token_id=None, eos_token_id=None, **kw)
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=PAD, bos_token_id=None, eos_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


def swapped(host: str, layer: str, seed: int = 0):
    torch.manual_seed(seed)
    model = gpt2() if host == "gpt2" else llama()
    return hf.swap_attention(model, layer, d_state=8).eval()


def generate(model, ids, mask=None, **kw):
    return model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                          max_new_tokens=6, do_sample=False, pad_token_id=PAD, **kw)


def cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


CASES = [("gpt2", "s4d"), ("gpt2", "s4"), ("llama", "s4d"), ("gpt2", "rtf")]


def test_swap_replaces_every_attention_module():
    model = swapped("gpt2", "s4d")
    adapters = [m for m in model.modules() if isinstance(m, hf.SSMAttention)]
    assert [a.layer_idx for a in adapters] == [0, 1]
    assert all(isinstance(a.layer, ssm.S4D) and a.causal and not a.layer.bidirectional for a in adapters)
    assert not hf.find_attention(model)
    model = swapped("llama", "s4")
    assert all(isinstance(b.self_attn, hf.SSMAttention) for b in model.model.layers)
    assert model.config.ssm_swap == {"layer": "s4", "layer_kwargs": {"d_state": 8},
                                     "base_model_type": "llama"}
    assert model.config.model_type == hf.SWAP_MODEL_TYPE


@pytest.mark.parametrize("host,layer", CASES)
def test_cached_generate_equals_uncached(host, layer):
    model = swapped(host, layer)
    ids = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(1))
    cached = generate(model, ids)
    assert torch.equal(cached, generate(model, ids, use_cache=False))
    assert cached.shape == (2, 13)


@pytest.mark.parametrize("host,layer", [("gpt2", "s4d"), ("llama", "s4")])
def test_batched_left_padded_generation_equals_one_by_one(host, layer):
    model = swapped(host, layer)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, V, (n,), generator=g) for n in (7, 3, 5)]
    Lmax = max(len(p) for p in prompts)
    ids = torch.full((3, Lmax), PAD)
    mask = torch.zeros(3, Lmax, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, Lmax - len(p):] = p
        mask[i, Lmax - len(p):] = 1
    batched = generate(model, ids, mask)[:, Lmax:]
    for i, p in enumerate(prompts):
        alone = generate(model, p[None])[0, len(p):]
        assert torch.equal(batched[i], alone), i


@pytest.mark.parametrize("layer", ["s4d", "s4", "rtf"])
def test_left_padding_keeps_the_state_at_zero(layer):
    torch.manual_seed(0)
    lay = ssm.layers.LAYERS[layer](8, d_state=4, dtype=torch.float64).eval()
    x = torch.randn(1, 10, 8, dtype=torch.float64)
    padded = torch.cat([torch.zeros(1, 5, 8, dtype=torch.float64), x], dim=1)
    y, s = lay(x, return_state=True)
    y_p, s_p = lay(padded, return_state=True)
    torch.testing.assert_close(y_p[:, 5:], y)
    torch.testing.assert_close(s_p, s)


@pytest.mark.parametrize("host,layer", [("gpt2", "s4d"), ("llama", "s4")])
def test_step_logits_equal_full_forward(host, layer):
    model = swapped(host, layer)
    ids = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        cache = transformers.DynamicCache(config=model.config)
        out = model(ids[:, :5], use_cache=True, **{cache_kwarg(model): cache})
        logits = [out.logits]
        for t in range(5, 12):
            logits.append(model(ids[:, t:t + 1], use_cache=True, **{cache_kwarg(model): cache}).logits)
            assert cache.get_seq_length() == t + 1
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-4, atol=1e-4)


def test_beam_search_cached_equals_uncached():
    model = swapped("gpt2", "s4d")
    ids = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(4))
    cached = generate(model, ids, num_beams=3)
    assert torch.equal(cached, generate(model, ids, num_beams=3, use_cache=False))


def groups(model):
    return sorted((len(g["params"]), g["lr"], g["weight_decay"])
                  for g in ssm.optim.param_groups(model, lr=1e-2))


@pytest.mark.parametrize("host,layer", [("gpt2", "s4"), ("llama", "s4d")])
def test_save_pretrained_round_trip(host, layer, tmp_path):
    model = swapped(host, layer)
    ids = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(5))
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert groups(loaded) == groups(model)
    # The hints live on the layers, so a loader that assigns new Parameter objects keeps them too.
    fresh = hf.swap_attention(type(model)(model.config), layer, d_state=8)
    fresh.load_state_dict(model.state_dict(), assign=True)  # (unties lm_head from wte: compare SSM groups)
    ssm_groups = lambda m: [g for g in groups(m) if g[1] == 1e-3]  # noqa: E731
    assert ssm_groups(fresh) == ssm_groups(model) != []


def test_from_pretrained_refuses_an_unswapped_checkpoint(tmp_path):
    gpt2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="ssm_swap"):
        hf.from_pretrained(tmp_path)


def test_training_lowers_the_loss():
    model = swapped("gpt2", "s4d").train()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, V, (4, 1, 8), generator=g).repeat(1, 1, 4).flatten(1)  # (4, 32): periodic
    opt = ssm.optim.make_optimizer(model, lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_encoder_gets_a_bidirectional_layer_and_ignores_right_padding():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, pad_token_id=PAD)
    model = hf.swap_attention(transformers.BertModel(cfg), "s4d", d_state=8).eval()
    blocks = model.encoder.layer
    assert all(isinstance(b.attention.self, hf.SSMAttention) for b in blocks)
    assert all(b.attention.self.layer.bidirectional for b in blocks)
    assert hasattr(blocks[0].attention, "output")  # BERT's output projection and norm stay
    ids = torch.randint(1, V, (2, 10), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    other = ids.clone()
    other[1, 6:] = 3  # different content at the padded positions
    with torch.no_grad():
        a = model(ids, attention_mask=mask).last_hidden_state
        b = model(other, attention_mask=mask).last_hidden_state
        short = model(ids[1:, :6]).last_hidden_state
    torch.testing.assert_close(a[1, :6], b[1, :6])
    torch.testing.assert_close(a[1, :6], short[0], rtol=1e-4, atol=1e-4)
    late = ids[:1].clone()
    late[0, -1] = (late[0, -1] % (V - 1)) + 1  # another token at the end changes the first output
    with torch.no_grad():
        assert not torch.allclose(a[0, 0], model(late).last_hidden_state[0, 0])


def test_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="layer must be one of"):
        hf.swap_attention(gpt2(), "hyena")
    with pytest.raises(ValueError, match="causal layer"):
        hf.swap_attention(gpt2(), "s4d", bidirectional=True)
    with pytest.raises(ValueError, match="JSON"):
        hf.swap_attention(gpt2(), "s4d", d_state=torch.tensor(8))
    with pytest.raises(ValueError, match="no self-attention"):
        hf.swap_attention(hf.swap_attention(gpt2(), "s4d"), "s4d")


def test_cropped_cache_rewinds_within_its_window():
    model = swapped("llama", "s4d")  # the (B, L, H) adapter under Llama's cache calls; GPT-2 in integrations/
    ids = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(8))
    cache = transformers.DynamicCache(config=model.config)
    kw = {cache_kwarg(model): cache, "use_cache": True}
    with torch.no_grad():
        full = model(ids).logits
        model(ids, **kw)
        cache.crop(-2)
        torch.testing.assert_close(model(ids[:, 4:5], **kw).logits[:, 0], full[:, 4], rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="window=20"):
            cache.crop(-6)


def test_example_smoke(capsys):
    import hf_swap

    rows = hf_swap.main(["--steps", "3", "--d-model", "16", "--layers", "1", "--seq-len", "32",
                         "--batch", "4", "--eval-batches", "1"])
    assert {r["model"] for r in rows} == {"attention", "s4d", "s4"}
    assert all(r["val_loss"] > 0 for r in rows)
    assert "val loss" in capsys.readouterr().out
