"""The training harness and the generated-data cache under hostile use: two runs on one --out, a truncated
cache, partial folders of killed generations."""

from __future__ import annotations

import os
import subprocess
import sys

import lra
import pytest
import training_harness as harness
from test_examples_harness import Blobs, MeanPoolNet, tiny_cfg

EXTRA = {"listops": dict(train=12, val=2, test=4, min_length=10, max_length=40)}


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    with harness.out_lock(tmp_path):  # a run in progress
        with pytest.raises(harness.OutDirInUse, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            harness.train(MeanPoolNet(), Blobs(32, 0), Blobs(16, 1), None, tiny_cfg(epochs=1), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()  # the refused run wrote nothing
    harness.train(MeanPoolNet(), Blobs(32, 0), Blobs(16, 1), None, tiny_cfg(epochs=1), tmp_path)  # released


def test_a_cache_truncated_at_a_line_boundary_is_generated_again(tmp_path, capsys):
    folder = lra.generated_data("listops", tmp_path, EXTRA, seed=3, difficulty="hard")
    train = folder / "basic_train.tsv"
    lines = train.read_text().splitlines(keepends=True)
    train.write_text("".join(lines[: len(lines) // 2]))  # whole rows lost, the marker still there
    again = lra.generated_data("listops", tmp_path, EXTRA, seed=3, difficulty="hard")
    assert again == folder and train.read_text().splitlines(keepends=True) == lines
    assert "generating again" in capsys.readouterr().out


def test_partial_folders_of_dead_generations_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    name = f"listops-train12-val2-test4-len10-40-seed3{lra.GENERATOR_VERSION}"
    stale = tmp_path / f"{name}.partial-{pid}"  # SIGKILL mid-generation left it
    stale.mkdir()
    (stale / "basic_train.tsv").write_text("Source\tTarget\n")
    live = tmp_path / f"{name}.partial-{os.getppid()}"  # a generation still running elsewhere
    live.mkdir()
    lra.generated_data("listops", tmp_path, EXTRA, seed=3, difficulty="hard")
    assert not stale.exists() and live.exists()
