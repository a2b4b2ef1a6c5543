"""ssm.data.mnist on tiny IDX files written here (gzipped and plain), so no dataset package is needed."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ssm.data.errors import DataError
from ssm.data.mnist import IMAGE_MAGIC, LABEL_MAGIC, SequentialMNIST, load_mnist, read_idx

ROWS, COLS = 4, 5


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file as the format defines it: big-endian magic, big-endian uint32 sizes, raw bytes."""
    array = np.asarray(array, dtype=np.uint8)
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape) + array.tobytes()


def write(path, data: bytes, gz: bool) -> None:
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def make_set(root, n_train=30, n_test=12, gz=True, seed=0):
    """Write a full four-file set of random ROWS x COLS images; return the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, ROWS, COLS)), rng.integers(0, 10, n_train)),
        "t10k": (rng.integers(0, 256, (n_test, ROWS, COLS)), rng.integers(0, 10, n_test)),
    }
    for part, (x, y) in arrays.items():
        write(root / f"{part}-images-idx3-ubyte", idx_bytes(x, IMAGE_MAGIC), gz)
        write(root / f"{part}-labels-idx1-ubyte", idx_bytes(y, LABEL_MAGIC), gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_items_are_raster_pixel_sequences(tmp_path, gz):
    arrays = make_set(tmp_path, gz=gz)
    x_test, y_test = arrays["t10k"]
    ds = SequentialMNIST(tmp_path, "test", normalize=False)
    assert len(ds) == len(y_test) and ds.seq_len == ROWS * COLS
    for i in (0, 5, len(ds) - 1):
        x, y = ds[i]
        assert x.shape == (ROWS * COLS, 1) and x.dtype == torch.float32 and isinstance(y, int)
        want = torch.tensor(x_test[i].reshape(-1) / 255.0, dtype=torch.float32).unsqueeze(-1)
        torch.testing.assert_close(x, want, rtol=0, atol=0)
        assert y == y_test[i]


def test_normalize_uses_training_file_statistics(tmp_path):
    arrays = make_set(tmp_path, gz=False)
    pixels = arrays["train"][0].astype(np.float64) / 255.0
    mean, std = pixels.mean(), pixels.std()
    ds = SequentialMNIST(tmp_path, "test", normalize=True)
    assert ds.mean == pytest.approx(mean, rel=1e-12) and ds.std == pytest.approx(std, rel=1e-12)
    x, _ = ds[3]
    want = (arrays["t10k"][0][3].reshape(-1, 1) / 255.0 - mean) / std
    torch.testing.assert_close(x, torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=1e-6)
    # the statistics do not depend on the split or on the validation hold-out
    assert SequentialMNIST(tmp_path, "val", val_size=7).mean == ds.mean


def test_validation_split_is_disjoint_deterministic_and_complete(tmp_path):
    arrays = make_set(tmp_path, n_train=30)
    x_train = torch.tensor(arrays["train"][0].reshape(30, -1), dtype=torch.uint8)
    train = SequentialMNIST(tmp_path, "train", val_size=8, val_seed=3)
    val = SequentialMNIST(tmp_path, "val", val_size=8, val_seed=3)
    assert len(train) == 22 and len(val) == 8

    def rows(ds):
        return [int((x_train == img).all(1).nonzero()[0]) for img in ds.images]

    r_train, r_val = rows(train), rows(val)
    assert sorted(r_train + r_val) == list(range(30))
    torch.testing.assert_close(val.labels, torch.tensor(arrays["train"][1][r_val]))
    again = SequentialMNIST(tmp_path, "val", val_size=8, val_seed=3)
    assert torch.equal(again.images, val.images)
    other = SequentialMNIST(tmp_path, "val", val_size=8, val_seed=4)
    assert not torch.equal(other.images, val.images)
    assert len(SequentialMNIST(tmp_path, "train", val_size=0)) == 30


def test_permuted_variant_applies_one_fixed_permutation(tmp_path):
    make_set(tmp_path)
    plain = SequentialMNIST(tmp_path, "test")
    perm = SequentialMNIST(tmp_path, "test", permuted=True, permutation_seed=5)
    p = perm.permutation
    assert sorted(p.tolist()) == list(range(ROWS * COLS)) and not torch.equal(p, torch.arange(ROWS * COLS))
    for i in (0, 7):
        torch.testing.assert_close(perm[i][0], plain[i][0][p], rtol=0, atol=0)
    train = SequentialMNIST(tmp_path, "train", val_size=5, permuted=True, permutation_seed=5)
    assert torch.equal(train.permutation, p)
    other = SequentialMNIST(tmp_path, "test", permuted=True, permutation_seed=6)
    assert not torch.equal(other.permutation, p)
    assert plain.permutation is None


def test_dataloader_batches_and_dotted_file_names(tmp_path):
    rng = np.random.default_rng(1)
    for part, n in (("train", 10), ("t10k", 6)):
        images = idx_bytes(rng.integers(0, 256, (n, 2, 3)), IMAGE_MAGIC)
        (tmp_path / f"{part}-images.idx3-ubyte").write_bytes(images)
        (tmp_path / f"{part}-labels.idx1-ubyte").write_bytes(idx_bytes(rng.integers(0, 10, n), LABEL_MAGIC))
    x, y = next(iter(DataLoader(SequentialMNIST(tmp_path, "test"), batch_size=4)))
    assert x.shape == (4, 6, 1) and y.shape == (4,) and y.dtype == torch.int64


def test_read_idx_shapes_and_gzip_detection(tmp_path):
    x = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "plain-name-but-gzipped"
    path.write_bytes(gzip.compress(idx_bytes(x, IMAGE_MAGIC)))
    out = read_idx(path, IMAGE_MAGIC)
    assert out.dtype == torch.uint8 and torch.equal(out, torch.from_numpy(x))


def test_cache_sees_a_replaced_file(tmp_path):
    make_set(tmp_path, n_test=12, gz=False)
    assert load_mnist(tmp_path, train=False)[0].shape[0] == 12
    make_set(tmp_path, n_test=9, gz=False)
    assert load_mnist(tmp_path, train=False)[0].shape[0] == 9


def test_missing_file_names_it_and_says_how_to_get_the_data(tmp_path):
    make_set(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    SequentialMNIST(tmp_path, "train", val_size=5)  # the training files are still there
    with pytest.raises(
        FileNotFoundError, match=r"t10k-labels-idx1-ubyte.*apt-get install dataset-fashion-mnis"
    ):
        SequentialMNIST(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="root="):
        SequentialMNIST(tmp_path / "nowhere", "test")


@pytest.mark.parametrize("gz", [True, False])
def test_bad_magic_is_refused(tmp_path, gz):
    make_set(tmp_path, gz=gz)
    # a labels file where the images belong
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(np.zeros(12), LABEL_MAGIC), gz)
    want = r"t10k-images-idx3-ubyte.*0x00000801.*expected an IDX images file: magic 0x00000803"
    with pytest.raises(ValueError, match=want):
        SequentialMNIST(tmp_path, "test")


def test_truncated_and_overlong_files_are_refused(tmp_path):
    make_set(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    full = path.read_bytes()
    path.write_bytes(full[:-1])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: truncated.*\(12, 4, 5\)"):
        SequentialMNIST(tmp_path, "test")
    path.write_bytes(full + b"\x00")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte: has trailing bytes"):
        SequentialMNIST(tmp_path, "test")
    path.write_bytes(full[:10])
    with pytest.raises(ValueError, match="shorter than the 16-byte header"):
        SequentialMNIST(tmp_path, "test")


def test_corrupt_gzip_is_refused(tmp_path):
    make_set(tmp_path, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz: corrupt gzip"):
        SequentialMNIST(tmp_path, "test")


def test_count_mismatch_and_bad_labels_are_refused(tmp_path):
    make_set(tmp_path, n_test=12, gz=False)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(11), LABEL_MAGIC), False)
    with pytest.raises(ValueError, match="12 images but .*t10k-labels-idx1-ubyte holds 11 labels"):
        SequentialMNIST(tmp_path, "test")
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.full(12, 10), LABEL_MAGIC), False)
    with pytest.raises(
        DataError, match=r"t10k-labels-idx1-ubyte, record 0: label 10; expected class labels 0\.\.9"
    ):
        SequentialMNIST(tmp_path, "test")


def test_test_image_size_must_match_training(tmp_path):
    make_set(tmp_path, gz=False)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(np.zeros((12, 5, 5)), IMAGE_MAGIC), False)
    with pytest.raises(ValueError, match="expected one image size"):
        SequentialMNIST(tmp_path, "test")


def test_argument_validation(tmp_path):
    make_set(tmp_path, n_train=30)
    with pytest.raises(ValueError, match="split"):
        SequentialMNIST(tmp_path, "valid")
    with pytest.raises(ValueError, match="val_size"):
        SequentialMNIST(tmp_path, val_size=-1)
    with pytest.raises(ValueError, match="val_size"):
        SequentialMNIST(tmp_path, val_size=30)
    with pytest.raises(ValueError, match="val_size"):
        SequentialMNIST(tmp_path, "val", val_size=0)
    with pytest.raises(ValueError, match="val_size"):
        SequentialMNIST(tmp_path, val_size=2.5)
    with pytest.raises(ValueError, match="val_size"):
        SequentialMNIST(tmp_path)  # the default 5000 exceeds the 30 training images
    with pytest.raises(ValueError, match="val_seed"):
        SequentialMNIST(tmp_path, val_size=5, val_seed=-1)
    with pytest.raises(ValueError, match="permutation_seed"):
        SequentialMNIST(tmp_path, "test", permuted=True, permutation_seed="a")
