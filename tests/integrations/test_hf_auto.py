"""A swapped model saved with ``save_pretrained`` meets the tools users already run: transformers' Auto
classes load it with its SSM weights (or refuse it), ``from_pretrained`` takes dtype / device_map / config
overrides, and a ``Trainer`` keeps the SSM parameter groups."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from ssm.integrations import hf  # noqa: E402  (after the skip: it needs transformers)

V = 40


def saved(tmp_path, layer="s4d"):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  pad_token_id=0,
                                  bos_token_id=None, eos_token_id=None)
    model = hf.swap_attention(transformers.GPT2LMHeadModel(cfg), layer, d_state=8).eval()
    model.save_pretrained(tmp_path)
    return model


def test_auto_classes_load_the_swapped_model(tmp_path):
    model = saved(tmp_path)
    ids = torch.randint(1, V, (2, 9))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, transformers.GPT2LMHeadModel)
    assert isinstance(loaded.transformer.h[0].attn, hf.SSMAttention)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    base = transformers.AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, transformers.GPT2Model)
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, model.transformer(ids).last_hidden_state)


def test_without_ssm_the_auto_classes_refuse_instead_of_random_attention(tmp_path):
    saved(tmp_path)
    code = ("import transformers\n"
            f"transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and hf.SWAP_MODEL_TYPE in done.stderr


def test_from_pretrained_takes_dtype_device_map_and_config_overrides(tmp_path):
    model = saved(tmp_path)
    ids = torch.randint(1, V, (2, 9))
    wide = hf.from_pretrained(tmp_path, dtype=torch.float64, device_map="cpu", output_hidden_states=True)
    assert next(wide.parameters()).dtype == torch.float64 and wide.config.output_hidden_states
    with torch.no_grad():
        torch.testing.assert_close(wide(ids).logits.float(), model(ids).logits, rtol=1e-5, atol=1e-5)
    assert next(hf.from_pretrained(tmp_path, torch_dtype="bfloat16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="device_map"):
        hf.from_pretrained(tmp_path, device_map={"transformer": "cpu"})
    with pytest.raises(ValueError, match="dtype"):
        hf.from_pretrained(tmp_path, dtype="float7")
    with pytest.raises(ValueError, match="neither config attributes"):
        hf.from_pretrained(tmp_path, not_a_real_option=1)


def test_trainer_keeps_the_ssm_parameter_groups(tmp_path):
    pytest.importorskip("accelerate")
    model = saved(tmp_path / "model").train()
    data = [{"input_ids": torch.randint(1, V, (12,)), "labels": torch.randint(1, V, (12,))} for _ in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2,
                                          per_device_train_batch_size=2, learning_rate=1e-2, weight_decay=0.1,
                                          report_to=[], use_cpu=True, save_strategy="no",
                                          logging_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=hf.trainer_optimizers(model, lr=args.learning_rate,
                                                                    weight_decay=args.weight_decay))
    trainer.train()
    ssm_params = {id(p) for n, p in model.named_parameters() if n.endswith(("log_dt", "Lambda_imag", ".B"))}
    groups = [g for g in trainer.optimizer.param_groups if any(id(p) in ssm_params for p in g["params"])]
    assert groups and all(g["weight_decay"] == 0.0 for g in groups)
    assert all(id(p) in ssm_params or g["weight_decay"] == 0.0 for g in groups for p in g["params"])
    other = [g for g in trainer.optimizer.param_groups if g["weight_decay"] == 0.1]
    assert other and not any(id(p) in ssm_params for g in other for p in g["params"])
