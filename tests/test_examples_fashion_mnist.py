"""Smoke test: examples/fashion_mnist.py trains end to end on tiny IDX files and resumes."""

from __future__ import annotations

import json

import fashion_mnist
import pytest
from test_data_mnist import make_set


@pytest.mark.parametrize("model", ["s4", "s4d", "rtf"])
def test_fashion_mnist_example_runs(tmp_path, model):
    (tmp_path / "data").mkdir()
    make_set(tmp_path / "data", n_train=40, n_test=16)
    out = tmp_path / "run"
    argv = ["--model", model, "--data", str(tmp_path / "data"), "--val-size", "8", "--epochs", "2",
            "--batch-size", "8", "--d-model", "8", "--n-layers", "1", "--d-state", "8", "--out", str(out),
            "--no-progress"]
    summary = fashion_mnist.main(argv)
    assert summary["finished"] and summary["epochs_completed"] == 2
    assert 0.0 <= summary["test_acc"] <= 1.0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert (out / "last.pt").exists() and (out / "summary.json").exists()
    again = fashion_mnist.main(argv)  # a finished run resumes and only evaluates
    assert again["test_acc"] == pytest.approx(summary["test_acc"])


def test_fashion_mnist_example_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.main(
            ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--no-progress"]
        )
