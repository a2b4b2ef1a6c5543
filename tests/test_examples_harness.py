"""examples/training_harness.py: the shared training harness, on tiny plain-torch models and synthetic data
(CPU)."""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import training_harness as harness
from torch import nn
from torch.utils.data import Dataset
from training_harness import Config


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: one intra-op thread is faster, above all on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Blobs(Dataset):
    """Sequences (L, D): Gaussian noise around a class mean, plus per-item noise from the numpy RNG."""

    def __init__(self, n: int, seed: int, L: int = 12, D: int = 3, classes: int = 3, jitter: float = 0.1):
        g = torch.Generator().manual_seed(seed)
        self.means = torch.randn(classes, D, generator=torch.Generator().manual_seed(1234))
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.x = self.means[self.y][:, None, :] + 1.5 * torch.randn(n, L, D, generator=g)
        self.jitter = jitter

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        noise = torch.from_numpy(np.random.standard_normal(self.x.shape[1:]).astype(np.float32))
        return self.x[i] + self.jitter * noise, int(self.y[i])


class MeanPoolNet(nn.Module):
    """Per-position MLP with dropout, masked mean over positions, linear head; records lengths it sees."""

    def __init__(self, d_in: int = 3, classes: int = 3, width: int = 16, dropout: float = 0.2):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(d_in, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width)
        )
        self.head = nn.Linear(width, classes)
        self.seen_lengths = []

    def forward(self, x, lengths=None):
        h = self.mlp(x)  # (B, L, W)
        if lengths is None:
            return self.head(h.mean(1))
        self.seen_lengths.append(lengths.clone())
        mask = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).to(h.dtype)
        return self.head((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))


def tiny_cfg(**kw) -> Config:
    base = dict(epochs=3, batch_size=16, lr=3e-2, weight_decay=0.01, warmup=2, seed=7)
    base.update(device="cpu", progress=False)
    base.update(kw)
    return Config(**base)


def data(n_train=96, n_val=48, n_test=64):
    return Blobs(n_train, 1), Blobs(n_val, 2), Blobs(n_test, 3, jitter=0.0)


def test_train_learns_and_writes_every_artifact(tmp_path, capsys):
    torch.manual_seed(0)
    model = MeanPoolNet()
    tr, va, te = data()
    summary = harness.train(model, tr, va, te, tiny_cfg(epochs=4), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert [r["step"] for r in records] == [6, 12, 18, 24]
    keys = {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "lrs", "epoch_time_s"}
    assert keys <= set(records[0])
    assert records[-1]["train_loss"] < 0.7 * records[0]["train_loss"]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    assert summary["finished"] and summary["epochs_completed"] == 4 and summary["steps"] == 24
    assert summary["test_acc"] > 0.6  # three classes: chance is 1/3
    assert summary["best_val_acc"] == max(r["val_acc"] for r in records)
    assert records[summary["best_epoch"] - 1]["val_acc"] == summary["best_val_acc"]
    assert summary["n_params"] == sum(p.numel() for p in model.parameters())
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["step"] == 24
    assert ckpt["data_order"] == {"seed": 7, "next_epoch": 4, "next_step": 0}
    assert {"model", "optimizer", "scheduler", "rng", "config", "best_val_acc"} <= set(ckpt)
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}
    # the final lr of the cosine schedule is 0 and the test used best.pt's weights
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, best["model"][k])
    test = harness.evaluate(model, te, tiny_cfg())
    assert test["acc"] == summary["test_acc"] and test["n"] == 64
    assert "test (best epoch" in capsys.readouterr().out


_TIMING = ("epoch_time_s", "tokens_per_s", "peak_mem_bytes")


def _strip(lines):
    """metrics.jsonl records without the fields that measure time or memory."""
    return [{k: v for k, v in json.loads(r).items() if k not in _TIMING} for r in lines]


def _params(path):
    return torch.load(path, weights_only=True)


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    cfg = tiny_cfg(epochs=4)
    tr, va, te = data()
    torch.manual_seed(0)
    full = harness.train(MeanPoolNet(), tr, va, te, cfg, tmp_path / "full")

    torch.manual_seed(0)
    part = harness.train(MeanPoolNet(), tr, va, te, cfg, tmp_path / "cut", stop_after_epoch=2)
    assert not part["finished"] and part["epochs_completed"] == 2 and part["test_acc"] is None
    # a new process would start from other RNG states and another initialization
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    resumed = harness.train(MeanPoolNet(width=16), tr, va, te, cfg, tmp_path / "cut")

    a, b = _params(tmp_path / "full" / "last.pt"), _params(tmp_path / "cut" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    for key in ("test_acc", "test_loss", "best_val_acc", "best_epoch", "steps"):
        assert resumed[key] == full[key], key
    full_records = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    cut_records = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert _strip(full_records) == _strip(cut_records)


def test_rerun_of_a_finished_run_only_evaluates_and_fresh_start_resets(tmp_path, capsys):
    tr, va, te = data()
    cfg = tiny_cfg(epochs=2)
    first = harness.train(MeanPoolNet(), tr, va, te, cfg, tmp_path)
    again = harness.train(MeanPoolNet(), tr, va, te, cfg, tmp_path)
    assert again["test_acc"] == first["test_acc"] and again["steps"] == 4 * 3
    assert "resumed from" in capsys.readouterr().out
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    fresh = harness.train(
        MeanPoolNet(), tr, va, te, tiny_cfg(epochs=3), tmp_path, resume=False, stop_after_epoch=1
    )
    assert fresh["epochs_completed"] == 1 and not fresh["finished"]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_changed_config_on_resume_is_reported(tmp_path, capsys):
    tr, va, te = data()
    harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(epochs=2), tmp_path, stop_after_epoch=1)
    capsys.readouterr()
    harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(epochs=2, lr=1e-2), tmp_path)
    assert "resuming with changed ['lr']" in capsys.readouterr().out


def collate_with_lengths(items):
    """Pad-free batches (all sequences are 12 long) that still report per-item lengths 6..12."""
    x = torch.stack([it[0] for it in items])
    y = torch.tensor([it[1] for it in items])
    lengths = torch.tensor([6 + (int(it[0][0, 0].abs() * 1000) % 7) for it in items])
    return x, y, lengths


def test_lengths_reach_the_model(tmp_path):
    tr, va, te = data(n_train=32, n_val=16, n_test=16)
    model = MeanPoolNet()
    cfg = tiny_cfg(epochs=1, eval_batch_size=8)
    summary = harness.train(model, tr, va, te, cfg, tmp_path, collate_fn=collate_with_lengths)
    assert summary["finished"]
    sizes = [len(t) for t in model.seen_lengths]
    assert sizes == [16, 16] + [8, 8] + [8, 8]  # two training batches, val, test
    assert all(((t >= 6) & (t <= 12)).all() for t in model.seen_lengths)
    assert len({tuple(t.tolist()) for t in model.seen_lengths}) > 1


def test_max_steps_per_epoch_and_max_eval_steps(tmp_path):
    tr, va, te = data()
    cfg = tiny_cfg(epochs=2, max_steps_per_epoch=2, max_eval_steps=1)
    summary = harness.train(MeanPoolNet(), tr, va, te, cfg, tmp_path)
    assert summary["steps"] == 4
    assert harness.evaluate(MeanPoolNet(), te, cfg)["n"] == 16


def test_optional_val_and_test_sets(tmp_path):
    tr, _, _ = data()
    summary = harness.train(MeanPoolNet(), tr, None, None, tiny_cfg(epochs=2), tmp_path)
    assert summary["finished"] and summary["test_acc"] is None and summary["best_epoch"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["val_acc"] is None and (tmp_path / "best.pt").exists()


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = harness.epoch_order(50, 3, 1)
    assert sorted(a.tolist()) == list(range(50))
    torch.manual_seed(123)
    assert torch.equal(a, harness.epoch_order(50, 3, 1))
    assert not torch.equal(a, harness.epoch_order(50, 3, 2))
    assert not torch.equal(a, harness.epoch_order(50, 4, 1))


def test_lr_factor_warmup_then_cosine():
    f = [harness.lr_factor(s, warmup=4, total=20) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and all(x > y for x, y in zip(f[4:], f[5:]))
    assert f[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert harness.lr_factor(20, warmup=4, total=20) == pytest.approx(0.0)
    assert harness.lr_factor(9, warmup=4, total=20, scheduler="constant") == 1.0


def test_optimizer_uses_ssm_param_groups():
    model = MeanPoolNet()
    model.head.weight._optim = {"lr": 1e-3, "weight_decay": 0.0}
    opt = harness.make_optimizer(model, tiny_cfg(lr=1e-2, weight_decay=0.1))
    groups = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in opt.param_groups}
    assert groups == {(1e-2, 0.1): 5, (1e-3, 0.0): 1}


def test_missing_tqdm_and_matplotlib_fall_back(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    tr, va, te = data()
    harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(epochs=2, progress=True), tmp_path)
    out = capsys.readouterr().out
    assert "epoch 1/2: 6/6 loss" in out and "val: 3/3 loss" in out
    assert out.count("matplotlib is not installed") == 1
    assert not (tmp_path / "curves.png").exists()


def test_cli_overrides():
    base = tiny_cfg(max_steps_per_epoch=5)
    parser = harness.add_config_args(argparse.ArgumentParser(), base)
    harness.add_run_args(parser, "runs/x")
    args = parser.parse_args(
        [
            "--d-model",
            "32",
            "--lr",
            "0.5",
            "--no-prenorm",
            "--model",
            "rtf",
            "--max-steps-per-epoch",
            "none",
            "--no-resume",
        ]
    )
    cfg = harness.config_from_args(args, base)
    got = (cfg.d_model, cfg.lr, cfg.prenorm, cfg.model, cfg.max_steps_per_epoch)
    assert got == (32, 0.5, False, "rtf", None)
    assert cfg.batch_size == base.batch_size and cfg.seed == base.seed
    assert args.out == "runs/x" and args.resume is False
    assert harness.config_from_args(parser.parse_args([]), base) == base
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "lstm"])


@pytest.mark.parametrize(
    "field, value",
    [
        ("model", "lstm"),
        ("norm", 1),
        ("pool", None),
        ("scheduler", "step"),
        ("d_model", 0),
        ("n_layers", 1.5),
        ("d_state", 0),
        ("epochs", 0),
        ("batch_size", -1),
        ("warmup", -1),
        ("seed", -2),
        ("num_workers", -1),
        ("ff", -1),
        ("max_steps_per_epoch", 0),
        ("max_eval_steps", 0),
        ("eval_batch_size", 0),
        ("lr", 0.0),
        ("lr_ssm", -1e-3),
        ("weight_decay", -0.1),
        ("grad_clip", -1.0),
        ("dropout", 1.0),
        ("dropout", "x"),
        ("prenorm", "yes"),
        ("progress", 1),
        ("device", 0),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value})


def test_train_and_device_validation(tmp_path):
    tr, va, te = data()
    with pytest.raises(ValueError, match="cfg"):
        harness.train(MeanPoolNet(), tr, va, te, {"epochs": 1}, tmp_path)
    with pytest.raises(ValueError, match="train_ds"):
        harness.train(MeanPoolNet(), Blobs(0, 1), va, te, tiny_cfg(), tmp_path)
    with pytest.raises(ValueError, match="stop_after_epoch"):
        harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(), tmp_path, stop_after_epoch=0)
    with pytest.raises(ValueError, match="device"):
        harness.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            harness.resolve_device("cuda")
    assert harness.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bad_batches_are_refused(tmp_path):
    tr, va, te = data()

    def collate_one(items):
        return (torch.stack([it[0] for it in items]),)

    with pytest.raises(ValueError, match=r"batch must be \(x, y\) or \(x, y, lengths\)"):
        harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(), tmp_path, collate_fn=collate_one)


def test_divergence_is_reported(tmp_path):
    tr, va, te = data()
    model = MeanPoolNet()
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="lower lr"):
        harness.train(model, tr, va, te, tiny_cfg(), tmp_path)


def test_resuming_into_a_different_model_says_how_to_restart(tmp_path):
    tr, va, te = data()
    harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(epochs=2), tmp_path, stop_after_epoch=1)
    with pytest.raises(harness.CheckpointError, match="different model.*--no-resume"):
        harness.train(MeanPoolNet(width=8), tr, va, te, tiny_cfg(epochs=2), tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Scale: accumulation, precision, compile, mid-epoch checkpoints, throughput


def test_metrics_and_summary_record_throughput_and_scale(tmp_path):
    tr, va, te = data()
    summary = harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(epochs=1), tmp_path)
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["tokens"] == 96 * 12 and record["tokens_per_s"] > 0 and record["peak_mem_bytes"] > 0
    assert record["peak_mem_kind"] in ("cpu_max_rss", "cuda_max_allocated")
    assert (summary["world_size"], summary["accumulate"], summary["precision"]) == (1, 1, "32")
    assert summary["tokens_per_s"] == record["tokens_per_s"]


def test_mid_epoch_checkpoint_resumes_exactly(tmp_path):
    tr, va, te = data()
    cfg = tiny_cfg(epochs=2, checkpoint_every=4)  # 6 steps per epoch: checkpoints at steps 4 and 8
    torch.manual_seed(0)
    harness.train(MeanPoolNet(), tr, va, te, cfg, tmp_path / "full")
    torch.manual_seed(0)
    cut = harness.train(MeanPoolNet(), tr, va, te, cfg, tmp_path / "cut", stop_after_steps=9)
    assert not cut["finished"] and cut["steps"] == 9
    ckpt = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"]) == (8, 1, 2)
    torch.manual_seed(5), np.random.seed(5)
    harness.train(MeanPoolNet(), tr, va, te, cfg, tmp_path / "cut")
    a, b = _params(tmp_path / "full" / "last.pt"), _params(tmp_path / "cut" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert _strip(full) == _strip((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines())
    # steps.jsonl: step 9 (lost with the kill) is written once, by the resumed run, as in the full run
    steps = (tmp_path / "full" / "steps.jsonl").read_text()
    assert [json.loads(line)["step"] for line in steps.splitlines()] == list(range(1, 13))
    assert (tmp_path / "cut" / "steps.jsonl").read_text() == steps


def test_accumulate_matches_the_large_batch(tmp_path):
    tr, va, te = Blobs(96, 1, jitter=0.0), Blobs(48, 2, jitter=0.0), None
    models = []
    for acc in (1, 4):
        torch.manual_seed(0)
        model = MeanPoolNet(dropout=0.0).double()
        cfg = tiny_cfg(epochs=1, accumulate=acc, dtype="float64")
        harness.train(model, tr, va, te, cfg, tmp_path / str(acc))
        models.append(model.state_dict())
    for k in models[0]:
        torch.testing.assert_close(models[1][k], models[0][k], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="divisible"):
        harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(accumulate=3), tmp_path / "bad")


def test_bf16_trains_on_cpu(tmp_path):
    tr, va, te = data()
    summary = harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(epochs=1, precision="bf16"), tmp_path)
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert math.isfinite(record["train_loss"]) and summary["precision"] == "bf16"
    with pytest.raises(ValueError, match="precision"):
        tiny_cfg(precision="bf16", dtype="float64")


def test_compile_runs_a_few_steps(tmp_path, monkeypatch, capsys):
    compile_ = torch.compile
    # the eager backend traces with dynamo (graph breaks included) without inductor's minutes of codegen
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="eager"))

    class Breaks(MeanPoolNet):
        def forward(self, x, lengths=None):
            if x.sum().item() > 1e30:  # a graph break
                x = x * 0
            return super().forward(x, lengths)

    tr, va, te = data(n_train=32, n_val=16, n_test=16)
    summary = harness.train(Breaks(), tr, va, te, tiny_cfg(epochs=1, compile=True), tmp_path)
    assert summary["finished"] and math.isfinite(summary["test_loss"])
    out = capsys.readouterr().out
    assert out.count("graph break") == 1
    assert all("_orig_mod" not in k for k in _params(tmp_path / "last.pt")["model"])


# ----------------------------------------------------------------------------------------------------------
# Robustness of resumption and of the outputs


def test_changed_lr_on_resume_is_used(tmp_path, capsys):
    tr, va, te = data()
    cfg = tiny_cfg(epochs=2, scheduler="constant")
    harness.train(MeanPoolNet(), tr, va, te, cfg, tmp_path, stop_after_epoch=1)
    capsys.readouterr()
    model = MeanPoolNet()
    model.head.weight._optim = {"lr": 5e-3, "weight_decay": 0.0}  # as ssm_lr hints change with --lr-ssm
    with pytest.raises(harness.CheckpointError, match="parameter groups"):  # another group layout
        harness.train(model, tr, va, te, replace(cfg, lr=1e-2), tmp_path)
    summary = harness.train(MeanPoolNet(), tr, va, te, replace(cfg, lr=1e-2, weight_decay=0.0), tmp_path)
    out = capsys.readouterr().out
    assert "resuming with changed ['lr', 'weight_decay']" in out and "the new lr, weight_decay apply" in out
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == 3e-2 and record["lr"] == 1e-2  # the old rate, then the new one
    groups = _params(tmp_path / "last.pt")["optimizer"]["param_groups"]
    assert all(g["initial_lr"] == 1e-2 and g["weight_decay"] == 0.0 for g in groups)
    assert summary["config"]["lr"] == 1e-2


def test_non_finite_lr_is_refused():
    with pytest.raises(ValueError, match="lr must be a finite"):
        tiny_cfg(lr=float("inf"))
    with pytest.raises(ValueError, match="lr_ssm must be a finite"):
        tiny_cfg(lr_ssm=float("nan"))


def test_divergence_names_the_step_before_the_layers_complain(tmp_path):
    import ssm

    tr, va, te = data()
    torch.manual_seed(0)
    model = ssm.SSMModel(3, 3, d_model=8, n_layers=1, layer="s4d", d_state=4)
    with pytest.raises(FloatingPointError, match=r"^training diverged (at|by) step [12]\b.*lower lr"):
        harness.train(model, tr, va, te, tiny_cfg(lr=1e30, lr_ssm=1e30, warmup=0), tmp_path)
    model = MeanPoolNet()
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"diverged at step 1 \(epoch 1\): the loss is nan"):
        harness.train(model, tr, va, te, tiny_cfg(), tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_damaged_checkpoint_names_the_file(tmp_path, damage):
    tr, va, te = data()
    harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(epochs=2), tmp_path, stop_after_epoch=1)
    last = tmp_path / "last.pt"
    blob = last.read_bytes()
    damaged = {"truncated": blob[: len(blob) // 2], "empty": b"", "random": bytes(range(256)) * 9}
    last.write_bytes(damaged[damage])
    with pytest.raises(harness.CheckpointError, match=r"last\.pt cannot be read.*--no-resume"):
        harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(epochs=2), tmp_path)
    assert harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(epochs=2), tmp_path, resume=False)["finished"]
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(harness.CheckpointError, match=r"best\.pt cannot be read.*--no-resume"):
        harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(epochs=2), tmp_path)


def test_partial_last_metrics_line_is_tolerated(tmp_path, capsys):
    tr, va, te = data()
    harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(epochs=2), tmp_path, stop_after_epoch=1)
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"epoch": 2, "step": 12, "train_lo')  # killed during the append
    summary = harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(epochs=2), tmp_path)
    assert summary["finished"] and "partial last line" in capsys.readouterr().out
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_checkpoints_are_synced_before_the_rename(tmp_path, monkeypatch):
    import os

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"replace {b}"), replace(a, b))[1])
    harness._save({"x": torch.ones(2)}, tmp_path / "a.pt")
    assert events[:2] == ["fsync", f"replace {tmp_path / 'a.pt'}"]
    assert torch.load(tmp_path / "a.pt", weights_only=True)["x"].sum() == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_out_naming_a_file_is_a_clear_error(tmp_path):
    tr, va, te = data()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is an existing file, not a directory"):
        harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(), tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="existing file"):
        harness.check_out_dir(tmp_path / "file" / "below")


def test_no_progress_still_prints_a_line_every_30_seconds(tmp_path, monkeypatch, capsys):
    """--no-progress: a line with the step, loss and tokens/s once 30 s (of an injected clock) have passed."""
    now = [0.0]
    monkeypatch.setattr(harness, "_clock", lambda: now[0])
    model = MeanPoolNet()

    def ten_seconds_per_batch(module, args):
        now[0] += 10.0

    model.register_forward_pre_hook(ten_seconds_per_batch)
    tr, va, te = data()  # 6 training steps, 3 val and 4 test batches
    harness.train(model, tr, va, te, tiny_cfg(epochs=1, progress=False), tmp_path / "slow")
    lines = capsys.readouterr().out.splitlines()
    train = [line for line in lines if line.startswith("epoch 1/1: ") and "/6 " in line]
    assert [line.split()[2] for line in train] == ["3/6", "6/6"]  # after 30 s and 60 s of training
    assert all("loss" in line and "tok/s" in line for line in train)
    assert any(line.startswith("val: 3/3 loss") for line in lines)
    assert any(line.startswith("test: 3/4 loss") for line in lines)
    # while the clock stands, no line
    bar = harness._Progress(5, "quiet", bar=False)
    for _ in range(5):
        bar.update({"loss": torch.ones(())}, 1)
    assert "quiet" not in capsys.readouterr().out


def test_one_epoch_run_draws_per_step_curves(tmp_path):
    tr, va, te = data()
    harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(epochs=1), tmp_path)
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, 7)) and {r["epoch"] for r in steps} == {1}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the epoch's mean loss is the mean of its steps' losses (every global batch has 16 items)
    assert records[0]["train_loss"] == pytest.approx(sum(r["loss"] for r in steps) / 6, rel=1e-9)
    curves = harness.curve_points(records, steps)
    assert curves["loss"]["train"] == (list(range(1, 7)), [r["loss"] for r in steps])
    assert curves["lr"]["train"][1] == [r["lr"] for r in steps]
    assert curves["acc"]["val"] == ([6], [records[0]["val_acc"]])  # one evaluation: one point
    assert len(harness.curve_points(records)["loss"]["train"][0]) == 1  # per epoch it would be a dot
    pytest.importorskip("matplotlib")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_point_is_not_drawn_as_a_curve(tmp_path, capsys):
    tr, va, te = data()
    harness.train(MeanPoolNet(), tr, va, te, tiny_cfg(epochs=1, max_steps_per_epoch=1), tmp_path)
    assert "curves.png not drawn: a curve needs two points and the run has 1 optimizer step" in (
        capsys.readouterr().out
    )
    assert not (tmp_path / "curves.png").exists()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    with pytest.raises(ValueError, match="two training points"):
        harness.plot_curves(records, tmp_path / "curves.png")
