"""Property tests of the loaders: corrupted files raise the documented error types, naming the file.

Each test writes one valid file of a format, then feeds its loader random corruptions of it (bytes replaced,
inserted, deleted, the file cut; for PNG also well-formed chunks with random contents and correct CRCs).
A loader must either load (and then serve every item) or raise :class:`ssm.data.errors.DataError` whose
message names the file (and the line, for text formats); only the Pathfinder metadata may also raise
``FileNotFoundError``, for an image a corrupted row names. ``SSM_FUZZ_EXAMPLES`` sets the number of
examples per test (default 60, a few seconds in all).
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssm.data.errors import DataError
from ssm.data.listops import ListOpsDataset, write_listops
from ssm.data.lra import AANDataset, CIFARGrayDataset, PathfinderDataset
from ssm.data.mnist import IMAGE_MAGIC, LABEL_MAGIC, read_idx
from ssm.data.pathfinder import read_metadata, read_png, write_pathfinder, write_png

FUZZ = settings(
    max_examples=int(os.environ.get("SSM_FUZZ_EXAMPLES", "60")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

MUTATION = st.tuples(
    st.sampled_from(["replace", "insert", "delete", "truncate"]), st.integers(0, 1 << 20), st.integers(0, 255)
)
MUTATIONS = st.lists(MUTATION, min_size=1, max_size=6)


def mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, pos, byte in mutations:
        i = pos % (len(out) + 1)
        if kind == "replace" and i < len(out):
            out[i] = byte
        elif kind == "insert":
            out.insert(i, byte)
        elif kind == "delete" and i < len(out):
            del out[i]
        elif kind == "truncate":
            del out[i:]
    return bytes(out)


def loads_or_names(load, path, *, line: bool = False, also=()):
    """``load()``, or None when it raises DataError (or one of ``also``) naming ``path``."""
    try:
        return load()
    except DataError as err:
        assert str(path) in str(err), str(err)
        if line:
            assert re.search(r", line \d+: ", str(err)), str(err)
    except also as err:
        assert str(path) in str(err), str(err)
    return None


def every_item(ds) -> None:
    for i in range(len(ds)):
        ds[i]


# ----------------------------------------------------------------------------------------------------------
# Text formats


@pytest.fixture(scope="module")
def listops_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("listops")
    write_listops(folder, train=4, val=0, test=0, seed=0, min_length=4, max_length=24, workers=1)
    return (folder / "basic_train.tsv").read_bytes()


@FUZZ
@given(mutations=MUTATIONS)
def test_listops_loader_on_corrupt_files(tmp_path, listops_file, mutations):
    path = tmp_path / "basic_train.tsv"
    path.write_bytes(mutate(listops_file, mutations))
    ds = loads_or_names(lambda: ListOpsDataset(path), path, line=True)
    if ds is not None:
        every_item(ds)


@FUZZ
@given(data=st.binary(max_size=200))
def test_listops_loader_on_random_bytes(tmp_path, data):
    path = tmp_path / "basic_train.tsv"
    path.write_bytes(b"Source\tTarget\r\n" + data)
    loads_or_names(lambda: ListOpsDataset(path), path, line=True)


AAN_ROWS = b"1\tP1\tP2\tfirst text\tsecond \xe2\x80\x94 text\n0.0\tP3\tP4\tthird\tfourth\n"


@FUZZ
@given(mutations=MUTATIONS)
def test_aan_loader_on_corrupt_files(tmp_path, mutations):
    path = tmp_path / "new_aan_pairs.train.tsv"
    path.write_bytes(mutate(AAN_ROWS, mutations))
    ds = loads_or_names(lambda: AANDataset(tmp_path, "train"), path, line=False)
    if ds is not None:
        every_item(ds)


@pytest.fixture(scope="module")
def pathfinder_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("pathfinder")
    root = write_pathfinder(out, resolution=32, n=10, seed=0, difficulty="baseline", per_batch=10, workers=1)
    return out, root, (root / "metadata" / "0.npy").read_bytes()


@FUZZ
@given(mutations=MUTATIONS)
def test_pathfinder_metadata_on_corrupt_files(pathfinder_root, mutations):
    out, root, good = pathfinder_root
    meta = root / "metadata" / "0.npy"
    meta.write_bytes(mutate(good, mutations))
    try:
        options = dict(difficulty="baseline", split_fractions=(0.2, 0.2))
        for split in ("train", "val", "test"):
            ds = loads_or_names(
                lambda s=split: PathfinderDataset(out, 32, s, **options),
                root / "metadata",
                also=(FileNotFoundError,),
            )
            if ds is not None:
                every_item(ds)
    finally:
        meta.write_bytes(good)


@FUZZ
@given(mutations=MUTATIONS)
def test_numpy_metadata_on_corrupt_files(tmp_path, mutations):
    path = tmp_path / "0.npy"
    np.save(path, np.array([["imgs/0", "sample_0.png", "0", "1"], ["imgs/0", "sample_1.png", "1", "0"]]))
    path.write_bytes(mutate(path.read_bytes(), mutations))
    loads_or_names(lambda: read_metadata(path), path)


# ----------------------------------------------------------------------------------------------------------
# Binary formats


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture(scope="module")
def png_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("png")
    rng = np.random.default_rng(0)
    files = []
    for k, shape in enumerate([(6, 5), (4, 3, 3)]):
        write_png(folder / f"{k}.png", rng.integers(0, 256, shape, dtype=np.uint8), filter_type=k + 3)
        files.append((folder / f"{k}.png").read_bytes())
    palette = png_chunk(b"PLTE", bytes(range(12)))
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 2, 8, 3, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress(b"\x00\x00\x01\x02\x00\x03\x02\x01"))
    files.append(b"\x89PNG\r\n\x1a\n" + ihdr + palette + idat + png_chunk(b"IEND", b""))
    return files


@pytest.mark.parametrize("backend", ["pure", "pillow"])
@FUZZ
@given(mutations=MUTATIONS, which=st.integers(0, 2))
def test_png_decoder_on_corrupt_files(tmp_path, png_files, backend, mutations, which):
    if backend == "pillow":
        pytest.importorskip("PIL.Image")
    path = tmp_path / "x.png"
    path.write_bytes(mutate(png_files[which], mutations))
    for gray in (False, True):
        loads_or_names(lambda g=gray: read_png(path, gray=g, backend=backend), path)


@pytest.mark.parametrize("backend", ["pure", "pillow"])
@FUZZ
@given(
    header=st.tuples(
        st.integers(0, 9), st.integers(0, 9), st.sampled_from([1, 8, 16]),
        st.sampled_from([0, 2, 3, 4, 5, 6]), st.integers(0, 1), st.integers(0, 1), st.integers(0, 1),
    ),
    ihdr_extra=st.binary(max_size=2),
    palette=st.none() | st.binary(max_size=20),
    payload=st.binary(max_size=120),
)  # fmt: skip
def test_png_decoder_on_wellformed_chunks(tmp_path, backend, header, ihdr_extra, palette, payload):
    """Chunks with correct CRCs and random contents: reach the checks after the CRC."""
    if backend == "pillow":
        pytest.importorskip("PIL.Image")
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", *header) + ihdr_extra)
    if palette is not None:
        data += png_chunk(b"PLTE", palette)
    data += png_chunk(b"IDAT", zlib.compress(payload)) + png_chunk(b"IEND", b"")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for gray in (False, True):
        loads_or_names(lambda g=gray: read_png(path, gray=g, backend=backend), path)


@FUZZ
@given(mutations=MUTATIONS, gz=st.booleans(), labels=st.booleans())
def test_idx_reader_on_corrupt_files(tmp_path, mutations, gz, labels):
    magic = LABEL_MAGIC if labels else IMAGE_MAGIC
    shape = (5,) if labels else (3, 4, 2)
    raw = (
        struct.pack(">I", magic)
        + b"".join(struct.pack(">I", d) for d in shape)
        + bytes(range(int(np.prod(shape))))
    )
    path = tmp_path / "x-idx-ubyte"
    path.write_bytes(mutate(gzip.compress(raw, mtime=0) if gz else raw, mutations))
    loads_or_names(lambda: read_idx(path, magic), path)


@pytest.fixture(scope="module")
def cifar_batch():
    rng = np.random.default_rng(0)
    batch = {b"batch_label": b"testing batch", b"labels": rng.integers(0, 10, 3).tolist(),
             b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8)}  # fmt: skip
    return pickle.dumps(batch, protocol=2)


@FUZZ
@given(mutations=MUTATIONS)
def test_cifar_reader_on_corrupt_files(tmp_path, cifar_batch, mutations):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    path = folder / "test_batch"
    path.write_bytes(mutate(cifar_batch, mutations))
    ds = loads_or_names(lambda: CIFARGrayDataset(tmp_path, "test"), folder)  # the file, or its folder
    if ds is not None:
        every_item(ds)


def test_numpy_metadata_with_a_code_point_beyond_unicode(tmp_path):
    # the case hypothesis found: one byte of a UCS-4 string replaced, giving U+110030; Python's path
    # operations on such a str raised SystemError instead of a DataError naming the file
    path = tmp_path / "0.npy"
    array = np.array([["imgs/0", "sample_0.png", "0", "1"]])
    codes = array.view(np.uint32).copy()
    codes[0, 5] = 0x110030  # the 6th character of "imgs/0"
    np.save(path, codes.view(array.dtype))
    with pytest.raises(DataError, match="beyond U\\+10FFFF") as err:
        read_metadata(path)
    assert str(path) in str(err.value)
