"""ssm.data.lra: each LRA loader on small files written here in the official formats and layouts."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ssm.data.errors import DataError
from ssm.data.listops import VOCAB, generate_listops, write_listops
from ssm.data.lra import (
    LRA_TASKS,
    AANDataset,
    CIFARGrayDataset,
    IMDBDataset,
    PathfinderDataset,
    find_task_dir,
    load_lra,
)
from ssm.data.pathfinder import generate_pathfinder, read_metadata, write_pathfinder, write_png
from ssm.data.text import BYTE_EOS, BYTE_VOCAB_SIZE, collate_pad, collate_pair


def release(tmp_path):
    """The folder the lra_release tarball unpacks its data into."""
    path = tmp_path / "lra_release" / "lra_release"
    path.mkdir(parents=True, exist_ok=True)
    return path


def byte_ids(data: bytes) -> list[int]:
    return [b + 2 for b in data]


def test_task_table():
    assert set(LRA_TASKS) == {
        "listops", "text", "retrieval", "image", "pathfinder32", "pathfinder64", "pathfinder128", "pathx",
        "pathfinder256",
    }  # fmt: skip
    for info in LRA_TASKS.values():
        assert info["input"] in ("tokens", "real")
        if info["input"] == "tokens":
            assert info["vocab_size"] > 0 and info["d_input"] is None and callable(info["collate"])
        else:
            assert info["d_input"] == 1 and info["vocab_size"] is None
    assert LRA_TASKS["listops"]["vocab_size"] == len(VOCAB) and LRA_TASKS["listops"]["num_classes"] == 10
    assert LRA_TASKS["text"]["vocab_size"] == LRA_TASKS["retrieval"]["vocab_size"] == BYTE_VOCAB_SIZE == 258
    assert LRA_TASKS["retrieval"]["pair"] and LRA_TASKS["retrieval"]["collate"] is collate_pair
    assert LRA_TASKS["image"]["seq_len"] == 1024 and LRA_TASKS["pathx"]["seq_len"] == 128 * 128
    for r in (32, 64, 128, 256):
        assert LRA_TASKS[f"pathfinder{r}"]["seq_len"] == r * r


# ----------------------------------------------------------------------------------------------------------
# ListOps


def test_listops_in_the_release_layout(tmp_path):
    write_listops(
        release(tmp_path) / "listops-1000", train=6, val=3, test=2, seed=1, min_length=10, max_length=60
    )
    rows = generate_listops(11, seed=1, min_length=10, max_length=60)
    ds = load_lra("listops", tmp_path, "val")
    assert len(ds) == 3
    x, y = ds[1]
    assert y == rows[7][1]
    assert x.tolist()[-1] == 1 and x.tolist()[:-1] == [
        VOCAB.index(t) for t in rows[7][0].split() if t not in "()"
    ]
    xb, yb, lengths = next(iter(DataLoader(ds, batch_size=3, collate_fn=LRA_TASKS["listops"]["collate"])))
    assert xb.shape == (3, int(lengths.max())) and yb.tolist() == [r[1] for r in rows[6:9]]


# ----------------------------------------------------------------------------------------------------------
# Text (IMDB)

REVIEWS = {
    ("train", "pos"): {"10_9.txt": b"Great film!", "2_8.txt": "Caf\u00e9 scene, 10/10".encode()},
    ("train", "neg"): {"3_1.txt": b"Dull.<br /><br />Awful", "1_2.txt": b"x" * 50},
    ("test", "pos"): {"0_10.txt": b"Loved it"},
    ("test", "neg"): {"5_3.txt": b"Meh"},
}


def write_imdb(root):
    for (split, label), files in REVIEWS.items():
        folder = root / "aclImdb" / split / label
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_bytes(text)
    (root / "aclImdb" / "train" / "unsup").mkdir()
    (root / "aclImdb" / "train" / "unsup" / "0_0.txt").write_bytes(b"unlabeled: ignored")


def test_imdb_bytes_labels_and_order(tmp_path):
    write_imdb(tmp_path)
    ds = load_lra("text", tmp_path, "train")
    # negatives then positives, each by review id
    texts = [REVIEWS[("train", "neg")]["1_2.txt"], REVIEWS[("train", "neg")]["3_1.txt"]]
    texts += [REVIEWS[("train", "pos")]["2_8.txt"], REVIEWS[("train", "pos")]["10_9.txt"]]
    assert len(ds) == 4 and ds.labels.tolist() == [0, 0, 1, 1]
    for i, text in enumerate(texts):
        x, y = ds[i]
        assert x.dtype == torch.long and x.tolist() == byte_ids(text) + [BYTE_EOS]
    assert b"\xc3\xa9" in texts[2] and 0xC3 + 2 in ds[2][0].tolist()  # raw UTF-8 bytes, not characters
    short = IMDBDataset(tmp_path / "aclImdb", "train", max_length=10)
    assert short[0][0].tolist() == byte_ids(b"x" * 9) + [BYTE_EOS]
    plain = IMDBDataset(tmp_path, "train", max_length=10, append_eos=False)
    assert plain[0][0].tolist() == byte_ids(b"x" * 10)
    val, test = load_lra("text", tmp_path, "val"), load_lra("text", tmp_path, "test")
    assert [val[i][0].tolist() for i in range(2)] == [
        test[i][0].tolist() for i in range(2)
    ]  # LRA: val = test
    assert test.labels.tolist() == [0, 1]
    x, y, lengths = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_pad)))
    assert lengths.tolist() == [len(t) + 1 for t in texts] == [51, 23, 19, 12]
    assert x.shape == (4, 51) and y.tolist() == [0, 0, 1, 1]


def test_imdb_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no text data under .*aclImdb"):
        load_lra("text", tmp_path)
    write_imdb(tmp_path)
    for f in (tmp_path / "aclImdb" / "test" / "pos").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"test/pos: no \.txt files"):
        IMDBDataset(tmp_path, "test")
    (tmp_path / "aclImdb" / "test" / "pos").rmdir()
    with pytest.raises(FileNotFoundError, match=r"test/pos: directory not found"):
        IMDBDataset(tmp_path, "test")


# ----------------------------------------------------------------------------------------------------------
# Retrieval (AAN)

PAIRS = [
    ("1.0", "P10-1001", "W09-0203", b"first paper text", b"cited \xe2\x80\x94 text"),
    ("0", "D12-3344", "J93-1001", b"another one", b"unrelated"),
    ("0.0", "A00-0001", "A00-0002", b"a" * 30, b"b" * 5),
]


def write_aan(folder, rows=PAIRS, names=("train", "eval", "test"), header=False):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        lines = [b"label\tid1\tid2\ttext1\ttext2"] if header else []
        lines += [b"\t".join([r[0].encode(), r[1].encode(), r[2].encode(), r[3], r[4]]) for r in rows]
        (folder / f"new_aan_pairs.{name}.tsv").write_bytes(b"\n".join(lines) + b"\n")


def test_aan_pairs(tmp_path):
    write_aan(release(tmp_path) / "tsv_data")
    ds = load_lra("retrieval", tmp_path, "val")
    assert len(ds) == 3 and ds.labels.tolist() == [1, 0, 0]
    for i, row in enumerate(PAIRS):
        x1, x2, y = ds[i]
        assert x1.tolist() == byte_ids(row[3]) + [BYTE_EOS] and x2.tolist() == byte_ids(row[4]) + [BYTE_EOS]
    short = AANDataset(tmp_path, "train", max_length=8, append_eos=False)
    assert short[2][0].tolist() == byte_ids(b"a" * 8) and short[2][1].tolist() == byte_ids(b"b" * 5)
    x1, x2, y, len1, len2 = next(
        iter(DataLoader(ds, batch_size=3, collate_fn=LRA_TASKS["retrieval"]["collate"]))
    )
    assert x1.shape == x2.shape == (3, 31) and y.tolist() == [1, 0, 0]
    assert len1.tolist() == [17, 12, 31] and len2.tolist() == [len(PAIRS[0][4]) + 1, 10, 6]
    assert (x2[2, 6:] == 0).all()
    write_aan(tmp_path / "with_header", header=True)
    assert AANDataset(tmp_path / "with_header", "test").labels.tolist() == [1, 0, 0]


def test_aan_malformed(tmp_path):
    folder = tmp_path / "tsv_data"
    write_aan(folder, rows=PAIRS[:1] + [("1", "x", "y", b"only four fields", b"")])
    path = folder / "new_aan_pairs.train.tsv"
    path.write_bytes(path.read_bytes().replace(b"\tonly four fields\t\n", b"\tonly four fields\n"))
    with pytest.raises(
        ValueError, match=r"new_aan_pairs.train.tsv, line 2: 4 tab-separated fields; expected 5"
    ):
        AANDataset(tmp_path, "train")
    write_aan(folder, rows=[PAIRS[0], ("2", "x", "y", b"t1", b"t2")], names=("test",))
    with pytest.raises(ValueError, match=r"new_aan_pairs.test.tsv, line 2: label b'2'; expected 0 or 1"):
        AANDataset(tmp_path, "test")
    os.remove(folder / "new_aan_pairs.eval.tsv")
    with pytest.raises(FileNotFoundError, match=r"new_aan_pairs.eval.tsv: file not found"):
        AANDataset(tmp_path, "val")


# ----------------------------------------------------------------------------------------------------------
# Image (CIFAR-10)


def write_cifar(folder, n=6, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(n)]}  # fmt: skip
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        batches[name] = (data, np.array(labels))
    return batches


def test_cifar_gray_sequences(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    train_x = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_y = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    train, val = load_lra("image", tmp_path, "train"), load_lra("image", tmp_path, "val")
    assert len(train) == 27 and len(val) == 3  # LRA: train[:90%], train[90%:]
    for ds, offset in ((train, 0), (val, 27)):
        for i in (0, len(ds) - 1):
            x, y = ds[i]
            rgb = train_x[offset + i].reshape(3, 32, 32).transpose(1, 2, 0)
            gray = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64).reshape(-1)
            assert x.shape == (1024, 1) and x.dtype == torch.float32 and y == train_y[offset + i]
            torch.testing.assert_close(x[:, 0].double(), torch.from_numpy((gray - 122.6) / 61.0))
    test = CIFARGrayDataset(tmp_path, "test", normalize=False)
    x, y = test[2]
    rgb = batches["test_batch"][0][2].reshape(3, 1024).T.astype(np.int64)
    luma = (rgb[:, 0] * 299 + rgb[:, 1] * 587 + rgb[:, 2] * 114) / 1000  # ITU-R 601-2
    assert np.abs(x[:, 0].numpy() * 255 - luma).max() <= 0.5 + 1e-4
    tokens = CIFARGrayDataset(tmp_path, "test", as_tokens=True)
    assert tokens[2][0].dtype == torch.long and torch.equal(tokens[2][0].float() / 255.0, x[:, 0])
    assert len(CIFARGrayDataset(tmp_path, "train", val_fraction=0.0)) == 30


def test_cifar_malformed(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3000), dtype=np.uint8), b"labels": [0] * 4}, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_3: b'data' is uint8 \(4, 3000\); expected"):
        CIFARGrayDataset(tmp_path)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": [0, 1, 12, 3]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_3, record 2: label 12; expected 0..9"):
        CIFARGrayDataset(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.remove, (str(folder / "test_batch"),))

    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_3: cannot be unpickled .*posix.remove is not allowed"):
        CIFARGrayDataset(tmp_path)
    assert (folder / "test_batch").is_file()  # nothing ran
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3: cannot be unpickled"):
        CIFARGrayDataset(tmp_path)
    write_cifar(folder)
    os.remove(folder / "data_batch_5")
    with pytest.raises(FileNotFoundError, match="data_batch_5: file not found"):
        CIFARGrayDataset(tmp_path, "val")
    with pytest.raises(ValueError, match="val_fraction"):
        CIFARGrayDataset(tmp_path, "test", val_fraction=1.0)


# ----------------------------------------------------------------------------------------------------------
# Pathfinder and Path-X


def test_pathfinder_splits_pixels_and_labels(tmp_path):
    root = write_pathfinder(release(tmp_path), resolution=32, n=30, seed=3, per_batch=8)
    images, labels = generate_pathfinder(30, resolution=32, seed=3)
    splits = {s: load_lra("pathfinder32", tmp_path, s) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [24, 3, 3]
    # S4's split: samples in metadata order, torch.randperm with seed 42, cut train / val / test
    order = torch.randperm(30, generator=torch.Generator().manual_seed(42)).tolist()
    expected = {"train": order[:24], "val": order[24:27], "test": order[27:]}
    for name, ds in splits.items():
        for k, j in enumerate(expected[name]):
            batch, index = divmod(j, 8)
            assert ds.samples[k][0] == root / "imgs" / str(batch) / f"sample_{index}.png"
            assert ds.labels[k] == labels[j]
        x, y = ds[0]
        j = expected[name][0]
        assert x.shape == (1024, 1) and x.dtype == torch.float32 and y == labels[j]
        torch.testing.assert_close(x[:, 0], torch.from_numpy(images[j].reshape(-1)).float() * 2 / 255 - 1)
    raw = PathfinderDataset(tmp_path, 32, "test", as_tokens=True)
    assert torch.equal(raw[1][0], torch.from_numpy(images[expected["test"][1]].reshape(-1)).long())
    unit = PathfinderDataset(tmp_path, 32, "val", normalize=False, seed=0, split_fractions=(0.5, 0.0))
    assert len(unit) == 15 and float(unit[0][0].max()) == 1.0
    rows = sum((read_metadata(root / "metadata" / f"{b}.npy") for b in range(4)), [])
    assert [r[2] for r in rows] == labels.tolist()


def test_pathfinder_empty_missing_and_wrong_images(tmp_path):
    root = write_pathfinder(tmp_path, resolution=32, n=10, seed=0, difficulty="baseline", per_batch=5)
    (root / "imgs" / "1" / "sample_2.png").write_bytes(b"")  # the release has one such file
    splits = [
        PathfinderDataset(tmp_path, 32, s, difficulty="baseline", split_fractions=(0.2, 0.2))
        for s in ("train", "val", "test")
    ]
    assert [len(ds) for ds in splits] == [7, 1, 1]
    with pytest.raises(ValueError, match="sample_2.png: empty file"):
        every = PathfinderDataset(
            tmp_path, 32, difficulty="baseline", skip_empty=False, split_fractions=(0, 0)
        )
        for i in range(len(every)):
            every[i]
    write_png(root / "imgs" / "0" / "sample_1.png", np.zeros((16, 16), dtype=np.uint8))
    ds = PathfinderDataset(
        tmp_path / "pathfinder32", 32, "train", difficulty="baseline", split_fractions=(0, 0)
    )
    k = [p for p, _ in ds.samples].index(root / "imgs" / "0" / "sample_1.png")
    with pytest.raises(ValueError, match=r"sample_1.png: image of shape \(16, 16\); expected \(32, 32\)"):
        ds[k]
    os.remove(root / "imgs" / "0" / "sample_4.png")
    with pytest.raises(FileNotFoundError, match=r"sample_4.png: image not found; named by .*0.npy, line 5"):
        PathfinderDataset(tmp_path, 32, difficulty="baseline")
    with pytest.raises(FileNotFoundError, match="no pathfinder32 data under"):
        PathfinderDataset(tmp_path, 32, difficulty="hard")
    (root / "metadata" / "0.npy").write_text("imgs/0 sample_0.png 0\n")
    with pytest.raises(ValueError, match=r"0.npy, line 1: 3 fields"):
        PathfinderDataset(tmp_path, 32, difficulty="baseline")


def test_pathx_reads_pathfinder128(tmp_path):
    write_pathfinder(release(tmp_path), resolution=128, n=4, seed=1)
    images, labels = generate_pathfinder(4, resolution=128, seed=1)
    ds = load_lra("pathx", tmp_path, "train", split_fractions=(0.25, 0.25))
    assert len(ds) == 2 and ds.resolution == 128
    x, y = ds[0]
    assert x.shape == (128 * 128, 1)
    j = int(ds.samples[0][0].stem.split("_")[1])
    assert y == labels[j]
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images[j].reshape(-1)).float() * 2 / 255 - 1)
    assert find_task_dir("pathfinder128", tmp_path) == release(tmp_path) / "pathfinder128"


def test_entry_point_validation(tmp_path):
    with pytest.raises(ValueError, match="task"):
        load_lra("cifar100", tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_lra("listops", tmp_path, "dev")
    with pytest.raises(
        FileNotFoundError, match=r"no listops data under .*expected basic_\{train,val,test\}.tsv"
    ):
        load_lra("listops", tmp_path)
    with pytest.raises(FileNotFoundError, match="no retrieval data"):
        load_lra("retrieval", tmp_path)
    with pytest.raises(FileNotFoundError, match="no image data"):
        load_lra("image", tmp_path)
    with pytest.raises(ValueError, match="resolution"):
        PathfinderDataset(tmp_path, 48)
    with pytest.raises(ValueError, match="difficulty"):
        PathfinderDataset(tmp_path, 32, difficulty="easy")
    with pytest.raises(ValueError, match="split_fractions"):
        PathfinderDataset(tmp_path, 32, split_fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="max_length"):
        IMDBDataset(tmp_path, max_length=1)
    with pytest.raises(ValueError, match="max_length"):
        AANDataset(tmp_path, max_length=0)


# ----------------------------------------------------------------------------------------------------------
# Issue #13: empty splits and malformed files raise DataError naming the file or folder


def test_pathfinder_empty_val_split_is_refused(tmp_path):
    root = write_pathfinder(tmp_path, resolution=32, n=5, seed=0, difficulty="baseline", workers=1)
    assert len(PathfinderDataset(tmp_path, 32, "train", difficulty="baseline")) == 5
    with pytest.raises(
        DataError, match=r"5 images .* train / val / test = 5 / 0 / 0 leave the val split empty"
    ):
        PathfinderDataset(tmp_path, 32, "val", difficulty="baseline")
    with pytest.raises(DataError) as info:
        PathfinderDataset(tmp_path, 32, "test", difficulty="baseline")
    assert str(info.value).startswith(f"{root / 'metadata'}: ")


def test_cifar_empty_val_split_is_refused(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", n=1)  # 5 training images: round(0.1 * 5) = 0 for val
    assert len(CIFARGrayDataset(tmp_path, "train")) == 5
    with pytest.raises(DataError, match=r"cifar-10-batches-py: 5 images .* leave the val split empty"):
        CIFARGrayDataset(tmp_path, "val")


def test_aan_empty_file_is_refused(tmp_path):
    folder = tmp_path / "tsv_data"
    write_aan(folder, rows=[])
    with pytest.raises(DataError, match=r"new_aan_pairs.train.tsv: no rows"):
        AANDataset(tmp_path, "train")


def test_cifar_codec_and_label_errors_name_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw.replace(b"latin1", b"latinq"))  # an unknown codec: LookupError
    with pytest.raises(DataError, match=r"test_batch: cannot be unpickled \(LookupError"):
        CIFARGrayDataset(tmp_path, "test")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [1, 2.5]}, f, protocol=2)
    with pytest.raises(DataError, match=r"test_batch, record 1: label 2.5; expected 0..9"):
        CIFARGrayDataset(tmp_path, "test")


def test_data_error_is_a_value_error_that_survives_pickling():
    err = DataError.at("a/b.tsv", "Target 'x'; expected an integer 0..9", line=3)
    assert isinstance(err, ValueError) and str(err) == "a/b.tsv, line 3: Target 'x'; expected an integer 0..9"
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is DataError and str(copy) == str(err) and (copy.path, copy.line) == ("a/b.tsv", 3)
    assert str(DataError(str(err))) == str(err)  # built from its message alone, as DataLoader re-raises
    import ssm.data

    assert ssm.data.DataError is DataError
