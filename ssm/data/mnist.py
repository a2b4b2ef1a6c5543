"""Sequential MNIST-format images: Fashion-MNIST (default), MNIST, KMNIST read pixel by pixel.

The files are the original IDX files, gzipped or not, named ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally
with ``.gz``). On Debian and Ubuntu, ``apt-get install dataset-fashion-mnist`` puts the Fashion-MNIST files
under ``/usr/share/datasets/fashion-mnist``, the default ``root``.

IDX format (all integers big-endian): a 4-byte magic ``0x00 0x00 <type> <ndim>`` with type ``0x08``
(unsigned byte), then ``ndim`` uint32 sizes, then the data in row-major order. Images are
``0x00000803`` (N, rows, cols); labels are ``0x00000801`` (N,).

Each image of R x C pixels becomes a sequence of R * C steps with one feature (784 for 28 x 28), in
row-major (raster) order, or in a fixed random order for the permuted variant (psMNIST).
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import check_choice, check_int
from .errors import DataError

__all__ = ["DEFAULT_ROOT", "IMAGE_MAGIC", "LABEL_MAGIC", "SequentialMNIST", "load_mnist", "read_idx"]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_MAGIC = 0x00000803
LABEL_MAGIC = 0x00000801
NUM_CLASSES = 10

_GZIP_MAGIC = b"\x1f\x8b"
_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_HOW_TO_GET = (
    "On Debian/Ubuntu, `sudo apt-get install dataset-fashion-mnist` installs Fashion-MNIST into "
    f"{DEFAULT_ROOT}; otherwise pass root= (--data in the examples), a directory holding "
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
    "(each may end in .gz)"
)


def _find(root: Path, stem: str) -> Path:
    """The file for ``stem`` in ``root``: ``stem``, ``stem.gz``, or the ``*-images.idx3-ubyte`` spelling."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        path = root / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"MNIST-format file {stem}(.gz) not found in {root}. {_HOW_TO_GET}")


def read_idx(path: str | os.PathLike, magic: int) -> torch.Tensor:
    """Read one unsigned-byte IDX file (gzipped or not) into a uint8 tensor.

    Args:
        path: the file; gzip is detected from its first bytes, not its name.
        magic: the expected magic number, :data:`IMAGE_MAGIC` (``0x00000803``, shape (N, rows, cols)) or
            :data:`LABEL_MAGIC` (``0x00000801``, shape (N,)).

    Returns:
        uint8 tensor of the shape in the header.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: (a ``ValueError``) bad magic number, not gzip-decodable, truncated or with trailing
            bytes; the message names the file and the expected format.
    """
    path = Path(path)
    ndim = magic & 0xFF
    what = "images" if magic == IMAGE_MAGIC else "labels" if magic == LABEL_MAGIC else "data"
    expected = (
        f"an IDX {what} file: magic 0x{magic:08X} (unsigned bytes, {ndim} dims), then {ndim} big-endian "
        "uint32 sizes, then the bytes"
    )
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError.at(path, f"corrupt gzip stream ({err}); expected a gzipped {expected}") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError.at(path, f"{len(raw)} bytes, shorter than the {header}-byte header of {expected}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError.at(path, f"magic number 0x{found:08X}, expected {expected}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = math.prod(dims)  # a Python int: no overflow
    if len(raw) - header != count:
        state = "truncated" if len(raw) - header < count else "has trailing bytes"
        raise DataError.at(
            path,
            f"{state}: header says shape {dims} = {count} bytes, found {len(raw) - header}; "
            f"expected {expected}",
        )
    data = np.frombuffer(raw, dtype=np.uint8, count=count, offset=header)
    return torch.from_numpy(data.copy()).reshape(dims)


@functools.lru_cache(maxsize=4)
def _load_cached(images: str, labels: str, stamp: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    x = read_idx(images, IMAGE_MAGIC)
    y = read_idx(labels, LABEL_MAGIC)
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{images} holds {x.shape[0]} images but {labels} holds {y.shape[0]} labels; "
            "expected one label per image",
            path=labels,
        )
    if y.numel() and int(y.max()) >= NUM_CLASSES:
        record = int(torch.nonzero(y >= NUM_CLASSES)[0, 0])
        raise DataError.at(
            labels, f"label {int(y[record])}; expected class labels 0..{NUM_CLASSES - 1}", record=record
        )
    if x.shape[1] * x.shape[2] == 0:
        raise DataError.at(images, f"image size {tuple(x.shape[1:])}; expected non-empty images")
    return x, y.long()


def load_mnist(
    root: str | os.PathLike = DEFAULT_ROOT, train: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one MNIST-format split: images uint8 (N, rows, cols) and labels int64 (N,).

    ``train=True`` reads ``train-*``, ``train=False`` reads ``t10k-*``. Results are cached per file
    (keyed by path, size and modification time), so building several splits reads each file once.
    The returned tensors are shared by the cache: do not modify them in place.
    """
    root = Path(root)
    part = "train" if train else "test"
    images = _find(root, _FILES[(part, "images")])
    labels = _find(root, _FILES[(part, "labels")])
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in (images, labels))
    return _load_cached(str(images.resolve()), str(labels.resolve()), stamp)


class SequentialMNIST(Dataset):
    """MNIST-format images as pixel sequences: item ``i`` is ``(x (R*C, 1) float32, label int)``.

    Args:
        root: directory holding the four IDX files (see the module docstring).
        split: ``"train"`` (the training file minus the validation images), ``"val"`` (``val_size`` images
            carved from the training file) or ``"test"`` (the ``t10k`` file).
        permuted: apply one fixed random permutation to the pixel order (permuted sequential MNIST).
        permutation_seed: seed of that permutation; the same seed gives the same order for every split.
        val_size: number of training images held out as the validation split (0 keeps them all in
            ``"train"``); less than the number of training images (ignored for ``"test"``). The held-out set
            is a seeded random choice, the same for ``"train"`` and ``"val"`` with the same ``val_seed``, so
            the two are disjoint.
        val_seed: seed of the validation choice.
        normalize: standardize pixels with the mean and standard deviation of the whole training file
            (the same constants for every split); otherwise scale them to [0, 1].

    Attributes:
        images: uint8 (N, R*C), pixels already in sequence order.
        labels: int64 (N,).
        permutation: int64 (R*C,) or ``None``; ``images[:, t]`` is pixel ``permutation[t]`` in raster order.
        mean, std: the affine map applied to ``pixel / 255`` (0 and 1 when ``normalize=False``).
        seq_len, d_input, num_classes: R*C, 1, 10.
    """

    num_classes = NUM_CLASSES
    d_input = 1

    def __init__(
        self,
        root: str | os.PathLike = DEFAULT_ROOT,
        split: str = "train",
        *,
        permuted: bool = False,
        permutation_seed: int = 0,
        val_size: int = 5000,
        val_seed: int = 0,
        normalize: bool = True,
    ) -> None:
        check_choice("split", split, ("train", "val", "test"))
        check_int("permutation_seed", permutation_seed, minimum=0)
        val_size = check_int("val_size", val_size, minimum=0)
        check_int("val_seed", val_seed, minimum=0)
        if split == "val" and val_size == 0:
            raise ValueError("val_size must be >= 1 for split='val'; got 0")
        train_x, train_y = load_mnist(root, train=True)
        if split != "test" and val_size >= train_x.shape[0]:
            raise ValueError(f"val_size must be < the {train_x.shape[0]} training images; got {val_size}")
        if split == "test":
            x, y = load_mnist(root, train=False)
            if x.shape[1:] != train_x.shape[1:]:
                raise ValueError(
                    f"test images are {tuple(x.shape[1:])} but training images are "
                    f"{tuple(train_x.shape[1:])}; expected one image size"
                )
        else:
            order = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(val_seed))
            held = order[:val_size] if split == "val" else order[val_size:]
            held = held.sort().values
            x, y = train_x[held], train_y[held]
        self.seq_len = x.shape[1] * x.shape[2]
        images = x.reshape(x.shape[0], self.seq_len)
        self.permutation = None
        if permuted:
            gen = torch.Generator().manual_seed(permutation_seed)
            self.permutation = torch.randperm(self.seq_len, generator=gen)
            images = images[:, self.permutation]
        self.images = images.contiguous()
        self.labels = y.clone()
        self.split = split
        if normalize:
            self.mean, self.std = _pixel_stats(train_x)
        else:
            self.mean, self.std = 0.0, 1.0

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].float().div_(255.0).sub_(self.mean).div_(self.std)
        return x.unsqueeze(-1), int(self.labels[index])

    def __repr__(self) -> str:
        perm = ", permuted" if self.permutation is not None else ""
        return f"SequentialMNIST(split={self.split!r}, n={len(self)}, seq_len={self.seq_len}{perm})"


def _pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of ``images / 255`` over all pixels, computed in float64."""
    counts = torch.bincount(images.reshape(-1), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum()
    mean = (counts * values).sum() / n
    var = (counts * (values - mean) ** 2).sum() / n
    return float(mean), float(var.sqrt().clamp_min(1e-12))
