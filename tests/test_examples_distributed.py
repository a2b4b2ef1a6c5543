"""examples/lra.py under torchrun: 2 processes (gloo, CPU) against 1, gradient accumulation, mid-epoch resume.

The runs use the S4 preset (batch norm, hence the synchronized batch norm of the harness) on tiny generated
Pathfinder images, whose fixed length keeps padding out of the batch statistics, in float64 so that the
comparisons test the algorithm rather than float32 reduction order.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import lra
import pytest
import torch
from conftest import tol

ROOT = Path(__file__).resolve().parents[1]
# 10x the float64 table: the all-reduces sum in another order, and a few Adam steps amplify it
DDP_TOL = {key: 10 * value for key, value in tol(torch.float64).items()}
TINY = [
    "--task", "pathfinder32", "--config", "s4", "--gen-n", "30", "--gen-workers", "1",
    "--d-model", "8", "--n-layers", "1", "--d-state", "4", "--epochs", "2", "--batch-size", "4",
    "--eval-batch-size", "8", "--warmup", "0", "--no-prenorm", "--no-progress", "--device", "cpu",
    "--dtype", "float64",
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The generated images, once for the module (rank 0 would generate them otherwise)."""
    folder = tmp_path_factory.mktemp("cache")
    lra.generated_data("pathfinder32", folder, {"pathfinder_n": 30}, seed=0, difficulty="hard", workers=1)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=nproc examples/lra.py *args`` on a free port (with
    ``check``, asserting that it succeeds)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(ROOT / "examples" / "lra.py"),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert done.returncode == 0 or not check, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _model(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "last.pt", weights_only=True)["model"]


def _records(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def two_process_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    done = torchrun(2, *TINY, "--cache-dir", str(cache), "--out", str(out))
    return out, done.stdout


def test_two_processes_match_one(cache, two_process_run, tmp_path):
    two, stdout = two_process_run
    one = lra.main([*TINY, "--cache-dir", str(cache), "--out", str(tmp_path / "one")])
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and one["world_size"] == 1 and summary["finished"]
    assert stdout.count("epoch 2/2:") == 1  # rank 0 alone prints
    a, b = _model(tmp_path / "one"), _model(two)
    for name, p in a.items():
        torch.testing.assert_close(b[name], p, **DDP_TOL, msg=name)
    assert "blocks.0.norm.norm.running_mean" in a  # the preset's batch norm: synchronized with 2 processes
    # metrics over the whole split, not rank 0's half
    for r1, r2 in zip(_records(tmp_path / "one"), _records(two)):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "tokens"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-9), key
    assert summary["test_loss"] == pytest.approx(one["test_loss"], rel=1e-9)
    # steps.jsonl: the loss of each global batch, summed over the ranks
    steps1, steps2 = _records(tmp_path / "one", "steps.jsonl"), _records(two, "steps.jsonl")
    assert [r["step"] for r in steps2] == [r["step"] for r in steps1] == list(range(1, len(steps1) + 1))
    for r1, r2 in zip(steps1, steps2):
        assert (r2["loss"], r2["acc"]) == (pytest.approx(r1["loss"], rel=1e-9), r1["acc"])


def test_accumulate_matches_one_large_batch(cache, tmp_path):
    # layer norm: batch statistics over a micro-batch would differ from those over the whole batch
    common = [*TINY, "--cache-dir", str(cache), "--norm", "layer", "--epochs", "1"]
    lra.main([*common, "--out", str(tmp_path / "big")])
    summary = lra.main([*common, "--accumulate", "2", "--out", str(tmp_path / "acc")])
    assert summary["accumulate"] == 2 and summary["config"]["accumulate"] == 2
    a, b = _model(tmp_path / "big"), _model(tmp_path / "acc")
    for name, p in a.items():
        torch.testing.assert_close(b[name], p, **DDP_TOL, msg=name)
    with pytest.raises(ValueError, match="divisible by world_size \\* accumulate"):
        lra.main([*common, "--accumulate", "3", "--out", str(tmp_path / "bad")])


def test_two_process_resume_mid_epoch_is_exact(cache, two_process_run, tmp_path):
    two, _ = two_process_run
    out = tmp_path / "cut"
    args = [*TINY, "--cache-dir", str(cache), "--out", str(out), "--checkpoint-every", "4"]
    torchrun(2, *args, "--stop-after-steps", "9")  # checkpoints at steps 4 and 8; step 9 is lost
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_step"], ckpt["world_size"]) == (1, 8, 2, 2)
    assert len(ckpt["ranks"]) == 2
    done = torchrun(2, *args)
    assert "after epoch 1 and 2 step(s) of epoch 2 (step 8)" in done.stdout
    a, b = _model(two), _model(out)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    strip = ("epoch_time_s", "tokens_per_s", "peak_mem_bytes")
    assert [{k: v for k, v in r.items() if k not in strip} for r in _records(two)] == [
        {k: v for k, v in r.items() if k not in strip} for r in _records(out)
    ]
    assert (two / "steps.jsonl").read_text() == (out / "steps.jsonl").read_text()


def test_config_error_is_one_line_from_rank_0(cache, tmp_path):
    """A batch of 3 on 2 ranks: both ranks refuse it after joining the group, rank 0 alone says so, in one
    line; no rank prints a traceback (torchrun adds its own report of the failed child)."""
    done = torchrun(
        2, *TINY, "--cache-dir", str(cache), "--out", str(tmp_path), "--batch-size", "3", check=False
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: batch_size 3 (the global batch) must be divisible")
    assert "lra.py\", line" not in done.stderr and "ConfigError" not in done.stderr  # no rank's traceback
    assert re.search(r"exitcode\s*:\s*2\b", done.stderr)  # rank 0's status, as argparse's
