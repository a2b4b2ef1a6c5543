"""examples/lra.py: smoke runs of each kind of task on tiny data, the generated-data cache, the pair model."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import lra
import pytest
import torch
from conftest import tol
from test_data_lra import PAIRS, release, write_aan, write_cifar, write_imdb

TINY = [
    "--d-model",
    "8",
    "--n-layers",
    "1",
    "--d-state",
    "4",
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--eval-batch-size",
    "8",
    "--warmup",
    "0",
    "--no-progress",
    "--device",
    "cpu",
]
TINY_LISTOPS = [
    "--gen-train",
    "24",
    "--gen-val",
    "8",
    "--gen-test",
    "16",
    "--gen-min-length",
    "10",
    "--gen-max-length",
    "60",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: one intra-op thread is faster, above all on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_run(summary: dict, out: Path, task: str, n_epochs: int = 1) -> None:
    assert summary["finished"] and summary["epochs_completed"] == n_epochs and summary["task"] == task
    assert 0.0 <= summary["test_acc"] <= 1.0 and 0.0 < summary["majority_test_acc"] <= 1.0
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["majority_test_acc"] == summary["majority_test_acc"] and on_disk["task"] == task
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, n_epochs + 1))
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    # curves per step: drawn from two steps on (one step is no curve), when matplotlib is there
    drawn = summary["steps"] >= 2 and importlib.util.find_spec("matplotlib") is not None
    assert (out / "curves.png").is_file() == drawn


def test_listops_generates_once_and_trains(tmp_path, monkeypatch):
    cache, out = tmp_path / "cache", tmp_path / "run"
    argv = ["--task", "listops", "--cache-dir", str(cache), "--out", str(out), *TINY_LISTOPS, *TINY]
    summary = lra.main(argv)
    _check_run(summary, out, "listops")
    data = Path(summary["data_dir"])
    assert data.parent == cache and (data / "COMPLETE.json").is_file()
    assert json.loads((data / "COMPLETE.json").read_text())["train"] == 24
    assert summary["n_train"] == 24 and summary["n_val"] == 8 and summary["n_test"] == 16
    # The majority class is that of the generated test file's Target column.
    rows = (data / "basic_test.tsv").read_text().splitlines()[1:]
    label, count = Counter(int(r.split("\t")[1]) for r in rows).most_common(1)[0]
    assert summary["majority_test_acc"] == count / 16

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached data should have been reused")

    monkeypatch.setattr(lra, "write_listops", no_generation)
    again = lra.main(argv + ["--no-resume"])
    assert again["data_dir"] == summary["data_dir"] and again["test_acc"] == summary["test_acc"]


def test_interrupted_generation_is_redone(tmp_path, monkeypatch):
    extra = {"listops": dict(train=6, val=2, test=4, min_length=10, max_length=40)}
    folder = tmp_path / f"listops-train6-val2-test4-len10-40-seed3{lra.GENERATOR_VERSION}"
    folder.mkdir()
    (folder / "basic_train.tsv").write_text("Source\tTarget\n( [MAX")  # a partial file, no marker
    got = lra.generated_data("listops", tmp_path, extra, seed=3, difficulty="hard")
    assert got == folder and (folder / "COMPLETE.json").is_file()
    assert len((folder / "basic_train.tsv").read_text().splitlines()) == 7
    assert not list(tmp_path.glob("*.partial-*"))

    def interrupted(folder, **kwargs):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "basic_train.tsv").write_text("Source\tTarget\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(lra, "write_listops", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lra.generated_data("listops", tmp_path, extra, seed=4, difficulty="hard")
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # nothing half-written is left
    monkeypatch.undo()
    with pytest.raises(ValueError, match="gen_train"):
        lra.generated_data(
            "listops", tmp_path, {"listops": {**extra["listops"], "train": 0}}, seed=3, difficulty="hard"
        )
    with pytest.raises(ValueError, match="gen_n"):
        lra.generated_data("pathfinder32", tmp_path, {"pathfinder_n": 5}, seed=0, difficulty="hard")


def test_pathfinder32_generated(tmp_path):
    out = tmp_path / "run"
    summary = lra.main(
        [
            "--task",
            "pathfinder32",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
            "--gen-n",
            "30",
            *TINY,
        ]
    )
    _check_run(summary, out, "pathfinder32")
    assert (summary["n_train"], summary["n_val"], summary["n_test"]) == (24, 3, 3)
    assert (Path(summary["data_dir"]) / "pathfinder32" / "curv_contour_length_14" / "metadata").is_dir()


def test_retrieval_text_image_from_official_layouts(tmp_path):
    write_aan(release(tmp_path) / "tsv_data", rows=PAIRS * 3)
    out = tmp_path / "aan"
    summary = lra.main(
        [
            "--task",
            "retrieval",
            "--data",
            str(tmp_path),
            "--out",
            str(out),
            "--truncate",
            "24",
            "--config",
            "s4",
            *TINY,
        ]
    )
    _check_run(summary, out, "retrieval")
    assert summary["majority_test_acc"] == pytest.approx(6 / 9) and summary["config"]["norm"] == "batch"
    write_imdb(tmp_path)
    out = tmp_path / "imdb"
    summary = lra.main(
        ["--task", "text", "--data", str(tmp_path), "--out", str(out), "--truncate", "32", *TINY]
    )
    _check_run(summary, out, "text")
    write_cifar(tmp_path / "cifar-10-batches-py", n=4)
    out = tmp_path / "cifar"
    summary = lra.main(
        ["--task", "image", "--data", str(tmp_path), "--out", str(out), "--model", "rtf", *TINY]
    )
    _check_run(summary, out, "image")
    assert (summary["n_train"], summary["n_val"], summary["n_test"]) == (18, 2, 4)


def test_pair_classifier_encodes_each_document_alone():
    """Stacking the pair, padding and batching change nothing: logits = head([e1, e2, e1*e2, e1-e2])."""
    torch.manual_seed(0)
    cfg = lra.Config(model="s4d", d_model=8, n_layers=2, d_state=4, norm="layer", pool="mean")
    model = lra.build_pair_model(cfg, 20, 2, bidirectional=True).double().eval()
    docs = [torch.randint(2, 20, (n,)) for n in (5, 9, 7, 3)]
    items = [(docs[0], docs[1], 1), (docs[2], docs[3], 0)]
    x, y, lengths = lra.collate_stacked_pair(items)
    assert x.shape == (2, 2, 9) and lengths.tolist() == [[5, 9], [7, 3]] and y.tolist() == [1, 0]
    logits = model(x, lengths=lengths)
    enc = model.encoder
    for b, (d1, d2, _) in enumerate(items):
        e1, e2 = enc(d1[None]), enc(d2[None])  # each document alone, unpadded
        want = model.head(torch.cat([e1, e2, e1 * e2, e1 - e2], dim=-1))[0]
        torch.testing.assert_close(logits[b], want, **tol(torch.float64))
    with pytest.raises(ValueError, match="x must stack"):
        model(x[:, 0])
    with pytest.raises(ValueError, match="lengths must have shape"):
        model(x, lengths=lengths[:, 0])


def test_first_position_pooling():
    """pool='first' reads position 0 of a bidirectional model, which depends on every valid token."""
    torch.manual_seed(0)
    cfg = lra.Config(model="s4d", d_model=8, n_layers=1, d_state=4, pool="first")
    model = lra.build_classifier(cfg, 12, 3, embedding=True, bidirectional=True).double().eval()
    x = torch.randint(2, 12, (2, 10))
    lengths = torch.tensor([10, 6])
    out = model(x, lengths=lengths)
    full = model.model(x, lengths=lengths)  # (B, L, 3)
    assert out.shape == (2, 3) and torch.equal(out, full[:, 0])
    changed = x.clone()
    changed[:, 5] = torch.where(x[:, 5] == 2, 3, 2)  # a valid token of both rows, far from position 0
    out2 = model(changed, lengths=lengths)
    assert not torch.allclose(out2[0], out[0]) and not torch.allclose(out2[1], out[1])
    changed_pad = x.clone()
    changed_pad[1, 6:] = 3  # padding of row 1: no effect
    torch.testing.assert_close(model(changed_pad, lengths=lengths)[1], out[1], **tol(torch.float64))
    with pytest.raises(ValueError, match="pool='first' needs bidirectional"):
        lra.build_classifier(cfg, 12, 3, embedding=True, bidirectional=False)


def test_presets_follow_s4_configs():
    listops = lra.S4_PRESETS["listops"]
    assert (listops.n_layers, listops.d_model, listops.norm, listops.prenorm) == (8, 128, "batch", False)
    assert (listops.lr, listops.weight_decay, listops.batch_size, listops.epochs) == (0.01, 0.05, 50, 40)
    assert lra.S4_PRESETS["pathx"].lr_ssm == 5e-4 and lra.EXTRAS["s4"]["pathx"]["dt_min"] == 1e-4
    assert lra.S4_PRESETS["image"].norm == "layer" and lra.S4_PRESETS["image"].dropout == 0.1
    assert all(lra.EXTRAS["s4"][t]["bidirectional"] and lra.EXTRAS["s4"][t]["glu"] for t in lra.TASKS)
    assert set(lra.S4_PRESETS) == set(lra.QUICK_PRESETS) == set(lra.TASKS)
    # The quick ListOps data keep LRA's lengths and test-split size.
    gen = lra.EXTRAS["quick"]["listops"]["listops"]
    assert (gen["min_length"], gen["max_length"], gen["test"]) == (500, 2000, 2000)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"text task needs the official data.*aclImdb_v1.tar.gz"):
        lra.main(["--task", "text", "--cache-dir", str(tmp_path), *TINY])
    with pytest.raises(FileNotFoundError, match=r"lra_release.gz.*new_aan_pairs"):
        lra.main(["--task", "retrieval", "--cache-dir", str(tmp_path), *TINY])
    write_imdb(tmp_path)
    common = ["--task", "text", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *TINY]
    with pytest.raises(ValueError, match="train_subset"):
        lra.main([*common, "--train-subset", "0"])
    with pytest.raises(ValueError, match="truncate"):
        lra.main([*common, "--truncate", "1"])
    with pytest.raises(ValueError, match="pool='first' needs bidirectional"):
        lra.main([*common, "--pool", "first", "--no-bidirectional"])
    with pytest.raises(ValueError, match="dataset must not be empty"):
        lra.majority_class(torch.utils.data.TensorDataset(torch.zeros(0), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(SystemExit):
        lra.main(["--task", "mnist"])


def test_gen_workers_reach_the_generator_and_out_file_is_refused(tmp_path, monkeypatch):
    seen = {}
    write = lra.write_listops

    def spy(folder, **kwargs):
        seen.update(kwargs)
        return write(folder, **kwargs)

    monkeypatch.setattr(lra, "write_listops", spy)
    argv = ["--task", "listops", "--cache-dir", str(tmp_path / "cache"), *TINY_LISTOPS, *TINY]
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="existing file"):
        lra.main([*argv, "--out", str(tmp_path / "file"), "--gen-workers", "2"])
    assert not seen  # refused before generating
    summary = lra.main([*argv, "--out", str(tmp_path / "run"), "--gen-workers", "2", "--precision", "bf16",
                        "--max-steps-per-epoch", "2"])
    assert seen["workers"] == 2 and summary["precision"] == "bf16" and summary["steps"] == 2
