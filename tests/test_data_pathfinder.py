"""ssm.data.pathfinder: the Pathfinder generator, the lra_release layout, and the PNG codec.

The label is checked on the pixels alone: starting from the origin marker, grow the set of lit pixels
(value > 0) reachable through steps of Chebyshev length <= ``link`` (one dilation by a (2 link + 1)^2
square intersected with the lit pixels, repeated to a fixed point). Label 1 must reach the terminal
marker, label 0 must not.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from scipy import ndimage

from ssm.data.errors import DataError
from ssm.data.pathfinder import (
    DIFFICULTY_DIRS,
    PRESETS,
    generate_pathfinder,
    main,
    pathfinder_config,
    read_metadata,
    read_png,
    to_grayscale,
    write_pathfinder,
    write_png,
)


def reachable(image: np.ndarray, start: tuple[int, int], link: int) -> np.ndarray:
    """Lit pixels connected to ``start`` by steps of Chebyshev length <= ``link`` through lit pixels."""
    lit = image > 0
    reach = np.zeros_like(lit)
    reach[start] = True
    square = np.ones((2 * link + 1, 2 * link + 1), dtype=bool)
    while True:
        grown = ndimage.binary_dilation(reach, structure=square) & lit
        if (grown == reach).all():
            return reach
        reach = grown


CASES = [(32, "baseline", 40), (32, "hard", 40), (64, "intermediate", 12), (128, "hard", 6), (256, "hard", 3)]


@pytest.mark.parametrize("resolution, difficulty, n", CASES)
def test_label_is_connectivity_of_the_markers(resolution, difficulty, n):
    images, labels, markers = generate_pathfinder(
        n, resolution=resolution, seed=11, difficulty=difficulty, return_markers=True
    )
    assert images.shape == (n, resolution, resolution) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64 and set(labels.tolist()) <= {0, 1}
    link = PRESETS[resolution]["link"]
    pad = PRESETS[resolution]["padding"]
    for image, label, (origin, terminal) in zip(images, labels, markers):
        assert image[tuple(origin)] == 255 and image[tuple(terminal)] == 255  # marker centres
        assert not (image[:pad] | image[-pad:]).any() and not (image[:, :pad] | image[:, -pad:]).any()
        reach = reachable(image, tuple(origin), link)
        assert bool(reach[tuple(terminal)]) == bool(label)
        assert reach.sum() < (image > 0).sum()  # other paths exist and stay apart from the origin's path


def test_both_labels_and_balance():
    _, labels = generate_pathfinder(160, resolution=32, seed=2, difficulty="baseline")
    assert 0.35 < labels.mean() < 0.65


def test_paths_are_dashed_and_lengths_follow_difficulty():
    sizes = {}
    for difficulty in ("baseline", "hard"):
        images, labels, markers = generate_pathfinder(
            30, resolution=64, seed=5, difficulty=difficulty, return_markers=True, num_distractors=0
        )
        lit, pieces = [], []
        for image, (origin, _) in zip(images, markers):
            path = reachable(image, tuple(origin), PRESETS[64]["link"])
            lit.append(path.sum())
            pieces.append(ndimage.label(path, structure=np.ones((3, 3)))[1])  # 8-connected dashes
        sizes[difficulty] = np.mean(lit)
        # gaps between the paddles: the origin's path falls apart into several 8-connected pieces
        assert np.mean(pieces) > 3
    # 14 paddles per path against 6: the origin's path covers clearly more pixels
    assert sizes["hard"] > 1.6 * sizes["baseline"]


def test_distractors_are_added():
    base = generate_pathfinder(10, resolution=32, seed=3, difficulty="baseline", num_distractors=0)[0]
    full = generate_pathfinder(10, resolution=32, seed=3, difficulty="baseline")[0]
    assert (full > 0).sum() > 1.5 * (base > 0).sum()  # 10 distractors of 2 paddles next to 2 x 6


def test_deterministic_for_a_seed():
    a, la = generate_pathfinder(6, resolution=32, seed=9)
    b, lb = generate_pathfinder(6, resolution=32, seed=9)
    c, _ = generate_pathfinder(6, resolution=32, seed=10)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)


def test_write_layout_metadata_and_round_trip(tmp_path):
    root = write_pathfinder(tmp_path, resolution=32, n=7, seed=4, difficulty="intermediate", per_batch=3)
    assert root == tmp_path / "pathfinder32" / "curv_contour_length_9"
    images, labels = generate_pathfinder(7, resolution=32, seed=4, difficulty="intermediate")
    assert sorted(p.name for p in (root / "metadata").iterdir()) == ["0.npy", "1.npy", "2.npy"]
    j = 0
    for batch, count in enumerate((3, 3, 1)):
        text = (root / "metadata" / f"{batch}.npy").read_text()
        lines = text.split("\n")
        assert lines[-1] == "" and len(lines) == count + 1  # one row per image, newline-terminated
        for i, line in enumerate(lines[:-1]):
            fields = line.split(" ")
            assert len(fields) == 11
            assert fields[:4] == [f"imgs/{batch}", f"sample_{i}.png", str(i), str(labels[j])]
            assert fields[5] == "9" and fields[6] == "3"  # contour length, distractor length
            path = root / fields[0] / fields[1]
            assert np.array_equal(read_png(path, backend="pure"), images[j])
            j += 1
        assert [r[2] for r in read_metadata(root / "metadata" / f"{batch}.npy")] == list(
            labels[j - count : j]
        )
    assert j == 7


def test_cli(tmp_path):
    assert main(["--out", str(tmp_path), "--resolution", "64", "--n", "3", "--seed", "1"]) == 0
    root = tmp_path / "pathfinder64" / DIFFICULTY_DIRS["hard"]
    rows = read_metadata(root / "metadata" / "0.npy")
    assert [r[:2] for r in rows] == [("imgs/0", f"sample_{i}.png") for i in range(3)]
    images, labels = generate_pathfinder(3, resolution=64, seed=1)
    assert [r[2] for r in rows] == labels.tolist()
    assert read_png(root / "imgs" / "0" / "sample_2.png").shape == (64, 64)


def test_metadata_reader_accepts_numpy_files_and_rejects_bad_rows(tmp_path):
    rows = [
        ["imgs/3", "sample_0.png", "0", "1", "1.8", "14"],
        ["imgs/3", "sample_1.png", "1", "0", "1.8", "14"],
    ]
    np.save(tmp_path / "3.npy", np.array(rows))
    assert read_metadata(tmp_path / "3.npy") == [("imgs/3", "sample_0.png", 1), ("imgs/3", "sample_1.png", 0)]
    bad = tmp_path / "4.npy"
    bad.write_text("imgs/4 sample_0.png 0 1\nimgs/4 sample_1.png 1\n")
    with pytest.raises(ValueError, match=r"4.npy, line 2: 3 fields; expected at least 4"):
        read_metadata(bad)
    bad.write_text("imgs/4 sample_0.png 0 2 1.0\n")
    with pytest.raises(ValueError, match=r"4.npy, line 1: label .* expected 0 or 1"):
        read_metadata(bad)
    with pytest.raises(FileNotFoundError, match="5.npy"):
        read_metadata(tmp_path / "5.npy")


# ----------------------------------------------------------------------------------------------------------
# PNG


@pytest.mark.parametrize("filter_type", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(7, 5), (6, 9, 3)])
def test_png_round_trip_every_filter(tmp_path, filter_type, shape):
    image = np.random.default_rng(filter_type).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "x.png"
    write_png(path, image, filter_type=filter_type)
    assert np.array_equal(read_png(path, backend="pure"), image)
    assert np.array_equal(read_png(path, backend="pillow"), image)  # a standard decoder agrees


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P"])
def test_pure_decoder_reads_pillow_files(tmp_path, mode):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    # smooth content so that Pillow's encoder picks a mix of filter types
    base = (np.add.outer(np.arange(23), np.arange(31)) * 5 + rng.integers(0, 4, (23, 31))).astype(np.uint8)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2, "P": 1}[mode]
    array = np.stack([np.roll(base, 7 * c, axis=1) for c in range(channels)], axis=-1)
    array = array[..., 0] if channels == 1 else array
    img = Image.fromarray(array)
    assert img.mode == ("L" if mode == "P" else mode)
    if mode == "P":
        img = img.convert("RGB").quantize(17)
    path = tmp_path / f"{mode}.png"
    img.save(path)
    with Image.open(path) as ref:
        want_gray = np.asarray(ref.convert("L"))
        want = np.asarray(ref.convert("RGB")) if mode == "P" else np.asarray(ref)
    assert np.array_equal(read_png(path, backend="pure"), want)
    assert np.array_equal(read_png(path, gray=True, backend="pure"), want_gray)
    assert np.array_equal(read_png(path, gray=True, backend="pillow"), want_gray)


def test_grayscale_matches_pillow():
    Image = pytest.importorskip("PIL.Image")
    rgb = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert np.array_equal(to_grayscale(rgb), np.asarray(Image.fromarray(rgb).convert("L")))


def png_bytes(header: tuple, payload: bytes) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", *header))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(payload)) + chunk(b"IEND", b"")


def test_malformed_png_files_are_refused(tmp_path):
    good = tmp_path / "good.png"
    write_png(good, np.zeros((4, 4), dtype=np.uint8))
    raw = good.read_bytes()
    cases = {
        "empty.png": (b"", "empty file"),
        "text.png": (b"hello, not a png", "no PNG signature"),
        "crc.png": (raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:], "bad CRC"),
        "short.png": (raw[:40], "truncated"),
        "deep.png": (png_bytes((2, 2, 16, 0, 0, 0, 0), b"\x00" * 10), "bit depth 16"),
        "laced.png": (png_bytes((2, 2, 8, 0, 0, 0, 1), b"\x00" * 6), "interlace 1"),
        "size.png": (png_bytes((2, 2, 8, 0, 0, 0, 0), b"\x00" * 5), "bytes of image data"),
        "filter.png": (png_bytes((2, 2, 8, 0, 0, 0, 0), b"\x07\x00\x00\x00\x00\x00"), "filter type 7"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=rf"{name}.*{message}"):
            read_png(path, backend="pure")
    with pytest.raises(ValueError, match="text.png"):
        read_png(tmp_path / "text.png", backend="pillow")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_png(tmp_path / "missing.png")


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="resolution"):
        generate_pathfinder(1, resolution=48, seed=0)
    with pytest.raises(ValueError, match="difficulty"):
        generate_pathfinder(1, resolution=32, seed=0, difficulty="easy")
    with pytest.raises(ValueError, match="unknown setting 'width'"):
        pathfinder_config(32, width=3)
    with pytest.raises(ValueError, match="thickness"):
        pathfinder_config(32, thickness=0.3)
    with pytest.raises(ValueError, match="gap"):
        pathfinder_config(32, gap=0)
    with pytest.raises(ValueError, match="link"):
        pathfinder_config(32, link=0)
    with pytest.raises(ValueError, match="n must be"):
        generate_pathfinder(-1, resolution=32, seed=0)
    with pytest.raises(ValueError, match="per_batch"):
        write_pathfinder(tmp_path, resolution=32, n=1, seed=0, per_batch=0)
    with pytest.raises(ValueError, match="image must be uint8"):
        write_png(tmp_path / "x.png", np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="filter_type"):
        write_png(tmp_path / "x.png", np.zeros((3, 3), dtype=np.uint8), filter_type=5)
    with pytest.raises(ValueError, match="backend"):
        read_png(tmp_path / "x.png", backend="cv2")


# ----------------------------------------------------------------------------------------------------------
# Issue #13: the PNG decoders' failures are DataErrors naming the file


def png_of(*chunks: tuple[bytes, bytes]) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(k, d) for k, d in chunks) + chunk(b"IEND", b"")


IHDR_PALETTE = struct.pack(">IIBBBBB", 2, 1, 8, 3, 0, 0, 0)
PNG_CASES = {  # once a struct.error, an IndexError and a reshape ValueError, none naming the file
    "ihdr.png": (png_of((b"IHDR", b"\x00" * 7), (b"IDAT", zlib.compress(b"\x00"))), "IHDR chunk of 7 bytes"),
    "plte.png": (
        png_of((b"IHDR", IHDR_PALETTE), (b"PLTE", b"\x01" * 7), (b"IDAT", zlib.compress(b"\x00\x00\x00"))),
        "PLTE chunk of 7 bytes",
    ),
    "index.png": (
        png_of((b"IHDR", IHDR_PALETTE), (b"PLTE", b"\x01" * 6), (b"IDAT", zlib.compress(b"\x00\x00\x05"))),
        "palette index 5 with a PLTE chunk of 2 entries",
    ),
    "width.png": (
        png_of(
            (b"IHDR", struct.pack(">IIBBBBB", 0, 3, 8, 0, 0, 0, 0)), (b"IDAT", zlib.compress(b"\x00" * 3))
        ),
        "size 0x3",
    ),
}


@pytest.mark.parametrize("name", sorted(PNG_CASES))
def test_png_structure_errors_name_the_file(tmp_path, name):
    data, reason = PNG_CASES[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError, match=reason) as info:
        read_png(path, backend="pure")
    assert str(info.value).startswith(f"{path}: ") and info.value.path == str(path)
    pytest.importorskip("PIL.Image")
    try:  # Pillow may read what the pure decoder refuses; what it refuses names the file
        read_png(path, backend="pillow")
    except DataError as err:
        assert str(err).startswith(f"{path}: ")


def test_pillow_errors_are_wrapped_with_the_file(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    path = tmp_path / "a.gif"
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(path, format="GIF")
    with pytest.raises(DataError, match=r"a\.gif: a GIF image; expected a PNG"):
        read_png(path, backend="pillow")
    good = tmp_path / "good.png"
    write_png(good, np.zeros((8, 8), dtype=np.uint8))
    path = tmp_path / "cut.png"
    path.write_bytes(good.read_bytes()[:40])
    with pytest.raises(DataError, match=r"cut\.png: cannot be read as a PNG"):
        read_png(path, backend="pillow")


def test_metadata_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "0.npy"
    path.write_bytes(b"imgs/0 sample_0.png 0 1\n\nimgs/0 sample_1.png 1 \xff\n")
    with pytest.raises(DataError, match=r"0\.npy, line 3: byte 0xff is not UTF-8"):
        read_metadata(path)
    path.write_bytes(b"imgs/0 sample_0.png 0 1\n\nimgs/0 sample_1.png 1 \xc2\xb2\n")  # blank lines count
    with pytest.raises(DataError, match=r"0\.npy, line 3: label \(column 4\) '\u00b2'"):
        read_metadata(path)
    path.write_bytes(b"/etc sample_0.png 0 1\n")
    with pytest.raises(DataError, match=r"0\.npy, line 1: image path '/etc/sample_0.png'"):
        read_metadata(path)
    path.write_bytes(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(DataError, match=r"0\.npy: unreadable \.npy array"):
        read_metadata(path)


# ----------------------------------------------------------------------------------------------------------
# Issue #14: parallel generation


def test_workers_write_identical_files(tmp_path, monkeypatch):
    """Images seeded by (seed, index): 1 worker and 3 workers write the same files, byte for byte."""
    import ssm.data._parallel as _parallel

    monkeypatch.setattr(_parallel, "MIN_PARALLEL_SECONDS", 0.0)  # start the workers however short the job
    args = ["--resolution", "32", "--n", "14", "--seed", "5", "--difficulty", "baseline", "--per-batch", "4"]
    assert main(["--out", str(tmp_path / "one"), *args, "--gen-workers", "1"]) == 0
    assert main(["--out", str(tmp_path / "three"), *args, "--gen-workers", "3"]) == 0
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    three = sorted(p.relative_to(tmp_path / "three") for p in (tmp_path / "three").rglob("*") if p.is_file())
    assert one == three and len(one) == 14 + 4
    for rel in one:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "three" / rel).read_bytes()
    a = generate_pathfinder(7, resolution=32, seed=5, difficulty="baseline", return_markers=True, workers=1)
    b = generate_pathfinder(7, resolution=32, seed=5, difficulty="baseline", return_markers=True, workers=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.array_equal(generate_pathfinder(3, resolution=32, seed=5, difficulty="baseline")[0], a[0][:3])
    with pytest.raises(ValueError, match="workers must be >= 1"):
        generate_pathfinder(1, resolution=32, seed=0, workers=0)
