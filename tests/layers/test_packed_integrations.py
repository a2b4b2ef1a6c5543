"""Packed documents through the integrations: SSMMixer's ``seq_idx`` and the Hugging Face adapter reading
``position_ids`` that restart at 0 (what ``DataCollatorWithFlattening`` produces)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_layer, tol

from ssm.integrations import SSMMixer


def test_mixer_passes_seq_idx():
    mixer = SSMMixer(make_layer("s4d", dtype=torch.float64))
    x = torch.randn(1, 8, 4, dtype=torch.float64)
    seq = torch.tensor([[0] * 3 + [1] * 5])
    torch.testing.assert_close(mixer(x, seq_idx=seq), torch.cat([mixer(x[:, :3]), mixer(x[:, 3:])], 1),
                               **tol(torch.float64))
    with pytest.raises(ValueError, match="seq_idx"):
        mixer(x, seq_idx=seq, mask=torch.ones(1, 8, dtype=torch.bool).index_fill(1, torch.tensor([0]), False))


@pytest.mark.parametrize(("host", "layer"), [("gpt2", "s4d"), ("llama", "mamba")])
def test_hf_flattened_batch_equals_separate_documents(host, layer):
    transformers = pytest.importorskip("transformers")
    hf = pytest.importorskip("ssm.integrations.hf")
    torch.manual_seed(0)
    if host == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64))
    model = hf.swap_attention(model, layer, d_state=8).eval()
    docs = [torch.randint(1, 40, (n,)).tolist() for n in (5, 3, 6)]
    batch = transformers.DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d} for d in docs])
    ref = torch.cat([model(torch.tensor([d])).logits for d in docs], 1)
    with torch.no_grad():
        for use_cache in (False, True):
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=use_cache)
            torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-5)
    assert hf.packed_seq_idx(batch["position_ids"]).tolist() == [[0] * 5 + [1] * 3 + [2] * 6]
    assert hf.packed_seq_idx(torch.arange(4)[None]) is None
