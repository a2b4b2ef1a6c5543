"""Long Range Arena (Tay et al. 2021): torch Datasets for the six tasks, read from the official files.

``load_lra(task, root, split)`` is the single entry point; ``LRA_TASKS[task]`` describes each task for a
training script (classes, input kind, vocabulary or input width, sequence length, collate function).
``root`` may be the folder of the task's files itself or any folder above it in the usual layouts (the
``lra_release`` tarball, which unpacks to ``lra_release/lra_release/...``, or S4's data folders).

=============  ==============================================================================================
task           files (``split``: ``train`` / ``val`` / ``test``)
=============  ==============================================================================================
listops        ``listops-1000/basic_{train,val,test}.tsv``: header ``Source<TAB>Target``, then one expression
               and its value 0..9 per row (see :mod:`ssm.data.listops`). Tokens, vocabulary of 19, <= 2000.
text           ``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt`` (IMDB reviews, Maas et al. 2011); label 1
               for ``pos``. Bytes, truncated to 4096 ids. ``val`` is the test set, as in LRA.
retrieval      ``tsv_data/new_aan_pairs.{train,eval,test}.tsv`` (``val`` reads ``eval``): no header, five
               tab-separated fields per row, ``label id1 id2 text1 text2`` with label 0/1 (``1.0`` accepted).
               Each document as bytes, truncated to 4000 ids; an item is the pair.
image          ``cifar-10-batches-py/data_batch_{1..5}`` and ``test_batch``: pickled dicts with ``b'data'``
               uint8 (10000, 3072) (1024 red, 1024 green, 1024 blue values per image, raster order) and
               ``b'labels'`` (10000 ints 0..9). Grayscale, 1024 steps of one real value. ``val`` is the last
               10% of the training images (LRA: ``train[90%:]``), ``train`` the first 90%.
pathfinder32   ``pathfinder{R}/curv_contour_length_14/metadata/<b>.npy`` (text: ``imgs/<b> sample_<i>.png <i>
pathfinder64   <label> ...`` per line) and ``.../imgs/<b>/sample_<i>.png`` (R x R grayscale). R*R steps of one
pathfinder128  real value. No official split: a seeded permutation (seed 42) cut 80/10/10, as S4 does. Empty
pathx          image files (the release has one) are skipped, as LRA does. ``pathx`` is LRA's name for
pathfinder256  ``pathfinder128``; ``difficulty=`` picks ``baseline``/``intermediate``/``hard`` (default hard).
=============  ==============================================================================================

Token tasks return ``(ids int64 (L,), label)`` (Retrieval ``(ids1, ids2, label)``), padded per batch by
``LRA_TASKS[task]["collate"]``; by default an end-of-sequence id is appended (S4's setup), counted in the
maximum length. Real-valued tasks return ``(x float32 (L, 1), label)``, normalized as S4 does:
``(gray - 122.6) / 61`` for CIFAR, ``2 * pixel / 255 - 1`` for Pathfinder.

Missing files raise ``FileNotFoundError`` and malformed ones :class:`ssm.data.errors.DataError` (a
``ValueError``); both name the file, the line or record, and what was expected. A split that the data and
the split arithmetic leave empty (say ``val`` of 5 Pathfinder images cut 80/10/10) raises ``DataError``
too, naming the folder.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import check_choice, check_int
from . import listops as _listops
from .errors import DataError
from .listops import ListOpsDataset
from .pathfinder import DIFFICULTY_DIRS, metadata_rows, read_png, to_grayscale
from .text import BYTE_VOCAB_SIZE, collate_pad, collate_pair, encode_bytes, require_dir, require_file

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "LRA_TASKS",
    "AANDataset",
    "CIFARGrayDataset",
    "IMDBDataset",
    "ListOpsDataset",
    "PathfinderDataset",
    "find_task_dir",
    "load_lra",
]

SPLITS = ("train", "val", "test")
CIFAR_MEAN = 122.6  # S4's grayscale CIFAR statistics, in pixel units
CIFAR_STD = 61.0

LRA_TASKS: dict[str, dict] = {
    "listops": dict(num_classes=10, input="tokens", vocab_size=_listops.vocab_size, d_input=None,
                    seq_len=2048, pair=False, collate=collate_pad),
    "text": dict(num_classes=2, input="tokens", vocab_size=BYTE_VOCAB_SIZE, d_input=None,
                 seq_len=4096, pair=False, collate=collate_pad),
    "retrieval": dict(num_classes=2, input="tokens", vocab_size=BYTE_VOCAB_SIZE, d_input=None,
                      seq_len=4000, pair=True, collate=collate_pair),
    "image": dict(num_classes=10, input="real", vocab_size=None, d_input=1, seq_len=1024,
                  pair=False, collate=None),
    "pathfinder32": dict(num_classes=2, input="real", vocab_size=None, d_input=1, seq_len=32 * 32,
                         pair=False, collate=None, resolution=32),
    "pathfinder64": dict(num_classes=2, input="real", vocab_size=None, d_input=1, seq_len=64 * 64,
                         pair=False, collate=None, resolution=64),
    "pathfinder128": dict(num_classes=2, input="real", vocab_size=None, d_input=1, seq_len=128 * 128,
                          pair=False, collate=None, resolution=128),
    "pathx": dict(num_classes=2, input="real", vocab_size=None, d_input=1, seq_len=128 * 128,
                  pair=False, collate=None, resolution=128),
    "pathfinder256": dict(num_classes=2, input="real", vocab_size=None, d_input=1, seq_len=256 * 256,
                          pair=False, collate=None, resolution=256),
}  # fmt: skip
"""Per task: ``num_classes``; ``input`` ``"tokens"`` (ids below ``vocab_size``, 0 is padding) or ``"real"``
(``d_input`` features per step); ``seq_len`` the maximum length; ``pair`` (Retrieval yields two documents);
``collate`` the ``DataLoader`` collate function (``None``: the default stacking); ``resolution`` for
Pathfinder."""


def _release_dirs(root: Path, name: str) -> list[Path]:
    return [root / name, root / "lra_release" / name, root / "lra_release" / "lra_release" / name]


def find_task_dir(task: str, root: str | os.PathLike, *, difficulty: str = "hard") -> Path:
    """The folder holding ``task``'s files under ``root`` (see the module docstring for the layouts)."""
    check_choice("task", task, tuple(LRA_TASKS))
    root = Path(root)
    if task == "listops":
        candidates = [root, *_release_dirs(root, "listops-1000"), root / "listops"]
        test = lambda d: (d / "basic_train.tsv").is_file() or (d / "basic_test.tsv").is_file()  # noqa: E731
        what = "basic_{train,val,test}.tsv (LRA's listops-1000 folder)"
    elif task == "retrieval":
        candidates = [root, *_release_dirs(root, "tsv_data"), root / "aan"]
        test = lambda d: any(d.glob("new_aan_pairs.*.tsv"))  # noqa: E731
        what = "new_aan_pairs.{train,eval,test}.tsv (LRA's tsv_data folder)"
    elif task == "text":
        candidates = [root, root / "aclImdb", root / "imdb" / "aclImdb"]
        test = lambda d: (d / "train").is_dir() and (d / "test").is_dir()  # noqa: E731
        what = "aclImdb/ with train/{pos,neg} and test/{pos,neg}"
    elif task == "image":
        candidates = [root, root / "cifar-10-batches-py", root / "cifar" / "cifar-10-batches-py"]
        test = lambda d: (d / "test_batch").is_file() or (d / "data_batch_1").is_file()  # noqa: E731
        what = "cifar-10-batches-py/ with data_batch_1..5 and test_batch"
    else:
        check_choice("difficulty", difficulty, tuple(DIFFICULTY_DIRS))
        name = f"pathfinder{LRA_TASKS[task]['resolution']}"
        candidates = [*_release_dirs(root, name), root / "pathfinder" / name, root]
        sub = DIFFICULTY_DIRS[difficulty]
        test = lambda d: (d / sub / "metadata").is_dir()  # noqa: E731
        what = f"{name}/{sub}/metadata/*.npy and {name}/{sub}/imgs/"
    for d in candidates:
        if d.is_dir() and test(d):
            return d
    tried = ", ".join(str(d) for d in dict.fromkeys(candidates))
    raise FileNotFoundError(f"no {task} data under {root}: expected {what}; looked in {tried}")


# ----------------------------------------------------------------------------------------------------------
# Text: IMDB, byte level

_REVIEW = re.compile(r"^(\d+)_(\d+)\.txt$")


def _review_key(path: Path) -> tuple:
    m = _REVIEW.match(path.name)
    return (0, int(m.group(1)), int(m.group(2))) if m else (1, path.name)


class IMDBDataset(Dataset):
    """IMDB reviews (LRA Text) as bytes: item ``i`` is ``(ids int64 (L,), label)`` with label 1 = positive.

    Args:
        root: the ``aclImdb`` folder or a folder above it.
        split: ``"train"``, ``"val"`` (the test set, as LRA does) or ``"test"``.
        max_length: ids kept per review, the end-of-sequence id included (LRA: 4096).
        append_eos: append :data:`ssm.data.text.BYTE_EOS` (S4's setup).

    Reviews are read lazily, in a fixed order (negatives, then positives, each by review id).
    """

    num_classes = 2
    vocab_size = BYTE_VOCAB_SIZE

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        max_length: int = 4096,
        append_eos: bool = True,
    ) -> None:
        check_choice("split", split, SPLITS)
        self.max_length = check_int("max_length", max_length, minimum=1 + int(append_eos))
        self.append_eos = bool(append_eos)
        base = find_task_dir("text", root) / ("train" if split == "train" else "test")
        files: list[tuple[Path, int]] = []
        for label, name in ((0, "neg"), (1, "pos")):
            folder = base / name
            require_dir(folder, f"IMDB reviews {folder.name}/<id>_<rating>.txt (the aclImdb layout)")
            found = sorted(folder.glob("*.txt"), key=_review_key)
            if not found:
                raise FileNotFoundError(f"{folder}: no .txt files; expected IMDB reviews <id>_<rating>.txt")
            files.extend((p, label) for p in found)
        self.files = [p for p, _ in files]
        self.labels = torch.tensor([y for _, y in files], dtype=torch.long)
        self.split = split

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        ids = encode_bytes(
            self.files[index].read_bytes(), max_length=self.max_length, append_eos=self.append_eos
        )
        return torch.from_numpy(ids), int(self.labels[index])

    def __repr__(self) -> str:
        return f"IMDBDataset(split={self.split!r}, n={len(self)})"


# ----------------------------------------------------------------------------------------------------------
# Retrieval: AAN pairs, byte level

_AAN_FILES = {"train": "train", "val": "eval", "test": "test"}


def _parse_label(field: bytes) -> int | None:
    try:
        value = float(field)
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0) else None


class AANDataset(Dataset):
    """ACL Anthology Network citation pairs (LRA Retrieval): item ``i`` is ``(ids1, ids2, label)``.

    Args:
        root: the ``tsv_data`` folder or a folder above it (or the S4 ``aan`` folder).
        split: ``"train"``, ``"val"`` (file ``new_aan_pairs.eval.tsv``) or ``"test"``.
        max_length: ids kept per document, the end-of-sequence id included (LRA: 4000).
        append_eos: append :data:`ssm.data.text.BYTE_EOS` to each document (S4's setup).

    The file is indexed (and every row checked) once; documents are read lazily (bytes, never decoded).

    Raises:
        FileNotFoundError: the folder or the split's file is missing.
        DataError: a row without 5 tab-separated fields or with a label other than 0/1 (a header row
            ``label ...`` is skipped), or no rows; the message names the file and the line.
    """

    num_classes = 2
    vocab_size = BYTE_VOCAB_SIZE

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        max_length: int = 4000,
        append_eos: bool = True,
    ) -> None:
        check_choice("split", split, SPLITS)
        self.max_length = check_int("max_length", max_length, minimum=1 + int(append_eos))
        self.append_eos = bool(append_eos)
        path = find_task_dir("retrieval", root) / f"new_aan_pairs.{_AAN_FILES[split]}.tsv"
        require_file(path, "AAN pairs: rows 'label<TAB>id1<TAB>id2<TAB>text1<TAB>text2'")
        offsets, labels = [], []
        with open(path, "rb") as f:
            offset = 0
            for lineno, line in enumerate(f, start=1):
                start, offset = offset, offset + len(line)
                body = line.rstrip(b"\r\n")
                if not body:
                    continue
                fields = body.split(b"\t")
                if len(fields) != 5:
                    raise DataError.at(
                        path,
                        f"{len(fields)} tab-separated fields; expected 5 (label, id1, id2, text1, text2)",
                        line=lineno,
                    )
                label = _parse_label(fields[0])
                if label is None:
                    if lineno == 1 and fields[0].strip().lower() == b"label":
                        continue  # a header row
                    raise DataError.at(path, f"label {fields[0][:20]!r}; expected 0 or 1", line=lineno)
                offsets.append(start)
                labels.append(label)
        if not labels:
            raise DataError.at(path, "no rows; expected 'label<TAB>id1<TAB>id2<TAB>text1<TAB>text2' per line")
        self.path = path
        self.offsets = np.array(offsets, dtype=np.int64)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.split = split

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[index]))
            fields = f.readline().rstrip(b"\r\n").split(b"\t")
        enc = dict(max_length=self.max_length, append_eos=self.append_eos)
        ids1 = torch.from_numpy(encode_bytes(fields[3], **enc))
        ids2 = torch.from_numpy(encode_bytes(fields[4], **enc))
        return ids1, ids2, int(self.labels[index])

    def __repr__(self) -> str:
        return f"AANDataset(split={self.split!r}, n={len(self)})"


# ----------------------------------------------------------------------------------------------------------
# Image: CIFAR-10, grayscale


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only (the CIFAR-10 batches hold nothing else)."""

    _ALLOWED = {
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    expected = "a pickled dict with b'data' uint8 (N, 3072) and b'labels' (N ints 0..9)"
    require_file(path, f"a CIFAR-10 batch: {expected}")
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    # A corrupt pickle can fail in any of its opcodes (UnpicklingError, EOFError, ValueError, TypeError,
    # LookupError from a codec name, MemoryError from a length, ...): whatever it raises, the file is at
    # fault.
    except Exception as err:
        reason = f"cannot be unpickled ({type(err).__name__}: {err}); expected {expected}"
        raise DataError.at(path, reason) from None
    if not isinstance(batch, dict):
        raise DataError.at(path, f"a pickled {type(batch).__name__}; expected {expected}")
    batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError.at(path, f"keys {sorted(map(str, batch))[:8]}; expected {expected}")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise DataError.at(path, f"b'data' is {what}; expected {expected}")
    if not isinstance(labels, (list, tuple, np.ndarray)) or len(labels) != data.shape[0]:
        what = f"{len(labels)} labels" if isinstance(labels, (list, tuple, np.ndarray)) else "not a list"
        raise DataError.at(path, f"b'labels' is {what}; expected {data.shape[0]} integers 0..9")
    for record, label in enumerate(labels):
        if not isinstance(label, (int, np.integer)) or isinstance(label, bool) or not 0 <= label <= 9:
            raise DataError.at(path, f"label {label!r:.20}; expected 0..9", record=record)
    return data, np.asarray(labels, dtype=np.int64).reshape(-1)


class CIFARGrayDataset(Dataset):
    """CIFAR-10 in grayscale as a pixel sequence (LRA Image): item ``i`` is ``(x (1024, 1) float32, label)``.

    Args:
        root: the ``cifar-10-batches-py`` folder or a folder above it.
        split: ``"train"`` (first ``1 - val_fraction`` of the 50,000 training images, in file order),
            ``"val"`` (the rest) or ``"test"`` (``test_batch``).
        val_fraction: share of the training images held out (LRA: 0.1).
        normalize: ``(gray - 122.6) / 61`` (S4's statistics) instead of ``gray / 255``.
        as_tokens: return the gray levels as int64 ids (1024,) (LRA's setup, vocabulary 256) instead.

    Gray is Pillow's ``convert("L")`` (see :func:`ssm.data.pathfinder.to_grayscale`), what S4's
    ``torchvision.transforms.Grayscale`` computes; pixels in raster order.

    Raises:
        FileNotFoundError: the folder or a batch file is missing.
        DataError: a batch that is not a pickled dict of ``b'data'`` uint8 (N, 3072) and N labels 0..9 (the
            message names the file, and the record of a bad label), or an empty split (naming the folder).
    """

    num_classes = 10
    d_input = 1

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        val_fraction: float = 0.1,
        normalize: bool = True,
        as_tokens: bool = False,
    ) -> None:
        check_choice("split", split, SPLITS)
        if (
            not isinstance(val_fraction, (int, float))
            or isinstance(val_fraction, bool)
            or not 0 <= val_fraction < 1
        ):
            raise ValueError(f"val_fraction must be a number in [0, 1); got {val_fraction!r}")
        if split == "val" and val_fraction == 0:
            raise ValueError("val_fraction must be > 0 for split='val'; got 0")
        folder = find_task_dir("image", root)
        names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
        parts = [_read_cifar_batch(folder / name) for name in names]
        data = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        total = data.shape[0]
        if split != "test":
            n_val = int(round(val_fraction * total))
            cut = total - n_val
            keep = slice(0, cut) if split == "train" else slice(cut, None)
            data, labels = data[keep], labels[keep]
        if data.shape[0] == 0:
            cut_by = "" if split == "test" else f" with val_fraction={val_fraction}"
            raise DataError.at(
                folder, f"{total} images in {', '.join(names)}{cut_by} leave the {split} split empty"
            )
        rgb = data.reshape(-1, 3, 1024).transpose(0, 2, 1)  # (N, 1024, 3)
        self.gray = torch.from_numpy(np.ascontiguousarray(to_grayscale(rgb)))  # uint8 (N, 1024)
        self.labels = torch.from_numpy(labels)
        self.normalize, self.as_tokens, self.split = normalize, as_tokens, split

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = self.gray[index]
        if self.as_tokens:
            return g.long(), int(self.labels[index])
        x = (g.float() - CIFAR_MEAN) / CIFAR_STD if self.normalize else g.float() / 255.0
        return x.unsqueeze(-1), int(self.labels[index])

    def __repr__(self) -> str:
        return f"CIFARGrayDataset(split={self.split!r}, n={len(self)})"


# ----------------------------------------------------------------------------------------------------------
# Pathfinder and Path-X


def _split_lengths(n: int, fractions: tuple[float, float]) -> tuple[int, int, int]:
    val, test = int(fractions[0] * n), int(fractions[1] * n)
    return n - val - test, val, test


class PathfinderDataset(Dataset):
    """Pathfinder / Path-X images from the ``lra_release`` layout: item ``i`` is ``(x (R*R, 1), label)``.

    Args:
        root: the ``pathfinder{R}`` folder or a folder above it.
        resolution: R, one of 32, 64, 128 (Path-X), 256.
        split: ``"train"``, ``"val"`` or ``"test"``.
        difficulty: ``"baseline"`` (``curv_baseline``), ``"intermediate"`` (``curv_contour_length_9``) or
            ``"hard"`` (``curv_contour_length_14``, the LRA task and S4's choice).
        split_fractions: shares of ``val`` and ``test``; the rest is ``train``.
        seed: seed of the permutation cutting the splits. Samples are ordered by metadata file number and
            line, then permuted with ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))``
            and cut train/val/test, which is S4's ``random_split`` with seed 42.
        normalize: ``2 * pixel / 255 - 1`` (S4) instead of ``pixel / 255``.
        as_tokens: return the pixels as int64 ids (R*R,) (vocabulary 256) instead.
        skip_empty: leave out empty image files (LRA's pipeline does; the release has one).

    Raises:
        FileNotFoundError: missing folders, metadata files, or an image a metadata row names (the message
            gives the metadata file and line).
        DataError: (a ``ValueError``) a malformed metadata row (file and line); an empty split (naming the
            metadata folder); an image that is not an R x R PNG (naming it, when it is read).
    """

    num_classes = 2
    d_input = 1

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int = 32,
        split: str = "train",
        *,
        difficulty: str = "hard",
        split_fractions: tuple[float, float] = (0.1, 0.1),
        seed: int = 42,
        normalize: bool = True,
        as_tokens: bool = False,
        skip_empty: bool = True,
    ) -> None:
        check_choice("split", split, SPLITS)
        check_choice("difficulty", difficulty, tuple(DIFFICULTY_DIRS))
        resolution = check_int("resolution", resolution)
        tasks = {32: "pathfinder32", 64: "pathfinder64", 128: "pathfinder128", 256: "pathfinder256"}
        if resolution not in tasks:
            raise ValueError(f"resolution must be one of 32, 64, 128, 256; got {resolution}")
        if (
            len(split_fractions) != 2
            or any(not isinstance(f, (int, float)) or isinstance(f, bool) or f < 0 for f in split_fractions)
            or sum(split_fractions) >= 1
        ):
            raise ValueError(
                f"split_fractions must be two numbers >= 0 summing to < 1; got {split_fractions!r}"
            )
        seed = check_int("seed", seed, minimum=0)
        base = find_task_dir(tasks[resolution], root, difficulty=difficulty) / DIFFICULTY_DIRS[difficulty]
        meta_dir = base / "metadata"
        meta_files = sorted(
            (p for p in meta_dir.glob("*.npy") if p.stem.isdigit()), key=lambda p: int(p.stem)
        )
        if not meta_files:
            raise FileNotFoundError(f"{meta_dir}: no <n>.npy metadata files; expected Pathfinder metadata")
        samples: list[tuple[Path, int]] = []
        for meta in meta_files:
            for lineno, folder, name, label in metadata_rows(meta):
                path = base / folder / name
                try:
                    info = path.stat()
                except (FileNotFoundError, NotADirectoryError):
                    info = None
                except OSError as err:
                    raise DataError.at(meta, f"image {path} cannot be read ({err})", line=lineno) from None
                if info is None or not stat.S_ISREG(info.st_mode):
                    raise FileNotFoundError(f"{path}: image not found; named by {meta}, line {lineno}")
                if info.st_size == 0 and skip_empty:
                    continue
                samples.append((path, label))
        n_train, n_val, n_test = _split_lengths(len(samples), tuple(split_fractions))
        size = {"train": n_train, "val": n_val, "test": n_test}[split]
        if size == 0:
            raise DataError.at(
                meta_dir,
                f"{len(samples)} images cut with split_fractions={tuple(split_fractions)} into train / val / "
                f"test = {n_train} / {n_val} / {n_test} leave the {split} split empty",
            )
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
        pick = {
            "train": order[:n_train],
            "val": order[n_train : n_train + n_val],
            "test": order[n_train + n_val :],
        }
        self.samples = [samples[i] for i in pick[split]]
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        self.resolution, self.split, self.difficulty = resolution, split, difficulty
        self.normalize, self.as_tokens = normalize, as_tokens

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 (R, R)."""
        path, _ = self.samples[index]
        image = read_png(path, gray=True)
        r = self.resolution
        if image.shape != (r, r):
            raise DataError.at(path, f"image of shape {image.shape}; expected ({r}, {r}) for pathfinder{r}")
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = torch.from_numpy(self.image(index).reshape(-1))
        label = int(self.labels[index])
        if self.as_tokens:
            return pixels.long(), label
        x = pixels.float() * (2.0 / 255.0) - 1.0 if self.normalize else pixels.float() / 255.0
        return x.unsqueeze(-1), label

    def __repr__(self) -> str:
        return (
            f"PathfinderDataset(resolution={self.resolution}, difficulty={self.difficulty!r}, "
            f"split={self.split!r}, n={len(self)})"
        )


# ----------------------------------------------------------------------------------------------------------
# Entry point


def load_lra(task: str, root: str | os.PathLike, split: str = "train", **options) -> Dataset:
    """The Dataset of one LRA task and split; ``options`` go to the task's Dataset class.

    Args:
        task: one of ``LRA_TASKS``: ``listops``, ``text``, ``retrieval``, ``image``, ``pathfinder32``,
            ``pathfinder64``, ``pathfinder128``, ``pathx`` (= ``pathfinder128``), ``pathfinder256``.
        root: the task's folder or a folder above it (see the module docstring).
        split: ``"train"``, ``"val"`` or ``"test"``.
        **options: e.g. ``max_length``/``append_eos`` (token tasks), ``normalize``/``as_tokens`` (images),
            ``difficulty``/``seed``/``split_fractions`` (Pathfinder), ``val_fraction`` (image).
    """
    check_choice("task", task, tuple(LRA_TASKS))
    check_choice("split", split, SPLITS)
    if task == "listops":
        return ListOpsDataset(find_task_dir("listops", root), split, **options)
    if task == "text":
        return IMDBDataset(root, split, **options)
    if task == "retrieval":
        return AANDataset(root, split, **options)
    if task == "image":
        return CIFARGrayDataset(root, split, **options)
    return PathfinderDataset(root, LRA_TASKS[task]["resolution"], split, **options)
