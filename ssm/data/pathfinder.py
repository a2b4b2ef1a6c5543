"""Pathfinder (Linsley et al. 2018): a generator of the images, the LRA on-disk layout, and PNG files.

The task: a grayscale image shows two circles (markers) and several dashed curvy paths; the label is 1 when
both circles lie at the two ends of one path, 0 when they lie on two different paths. Paths are chains
of short straight segments ("paddles") separated by small gaps; the direction turns by a bounded random
angle from one paddle to the next; distractor paths are shorter chains of the same paddles.

Generator (this module's own, after Linsley et al.'s ``snakes2.py`` and LRA's settings per resolution).
One image: draw the label; two target paths of ``contour_length`` paddles start ``seed_distance`` pixels
apart; the origin marker sits on the start of one of them, the terminal marker on the end of the same
path (label 1) or of the other one (label 0); then ``distractor_budget // distractor_length`` distractor
paths of ``distractor_length = contour_length // 3`` paddles are added where they fit. A paddle from
``a`` to ``b`` with thickness ``t`` is drawn with intensity ``clip(t/2 + 1/2 - d, 0, 1)`` at distance
``d`` of a pixel centre from the segment; a marker of radius ``r`` likewise with ``clip(r + 1/2 - d, 0,
1)``; the image is the maximum of all of them, quantized to uint8. The direction turns by ``delta`` with
density proportional to ``cos(min(|delta| * continuity, pi/2))**2`` (so ``|delta| < pi / (2 continuity)``).

Guarantee (what makes the label exact, and what the tests check on the pixels): call a pixel lit when its
value is > 0 and link two lit pixels when their Chebyshev distance is <= ``link``. Consecutive pieces of
one path (markers included) are linked; any two lit pixels of different paths are more than ``link``
apart; so the two markers are connected through linked lit pixels iff the label is 1.

On-disk layout (as in ``lra_release``; Path-X is ``pathfinder128``, Path-256 ``pathfinder256``)::

    DIR/pathfinder{R}/{curv_baseline | curv_contour_length_9 | curv_contour_length_14}/
        imgs/{b}/sample_{i}.png      8-bit grayscale PNG, R x R
        metadata/{b}.npy             plain text despite the name: one line per image,
                                     "imgs/{b} sample_{i}.png {i} {label} {continuity} {contour_length}
                                      {distractor_length} {paddle_length} {thickness} {gap} 1"

The three difficulties have contour lengths 6, 9 and 14 (``baseline``, ``intermediate``, ``hard``).
Readers use columns 0 and 1 (the image path below the difficulty folder) and 3 (the label).

PNG files are written with ``zlib`` only and read with Pillow when it is installed (the ``images`` extra),
otherwise with the small decoder here (8-bit, non-interlaced; grayscale, RGB, palette, with or without
alpha), which keeps Pillow out of the runtime dependencies. Either way a file that cannot be decoded raises
:class:`~ssm.data.errors.DataError` naming it.

Parallel generation: image ``i`` draws from ``numpy.random.default_rng([seed, i])``, so ``workers``
(``--gen-workers``) changes where images are drawn, never which: the files are the same byte for byte.

Command line::

    python -m ssm.data.pathfinder --out DIR --resolution 32 --n 2000 --seed 0 [--difficulty hard]
        [--gen-workers N]
"""

from __future__ import annotations

import argparse
import bisect
import functools
import io
import math
import os
import struct
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path

import numpy as np

from .._checks import check_choice, check_int
from . import _parallel
from ._parallel import resolve_workers
from .errors import DataError

__all__ = [
    "DIFFICULTIES",
    "DIFFICULTY_DIRS",
    "PRESETS",
    "RESOLUTIONS",
    "generate_pathfinder",
    "main",
    "pathfinder_config",
    "read_metadata",
    "read_png",
    "to_grayscale",
    "write_pathfinder",
    "write_png",
]

RESOLUTIONS = (32, 64, 128, 256)
DIFFICULTIES = {"baseline": 6, "intermediate": 9, "hard": 14}
DIFFICULTY_DIRS = {
    "baseline": "curv_baseline",
    "intermediate": "curv_contour_length_9",
    "hard": "curv_contour_length_14",
}

# Geometry per resolution, in pixels (LRA's settings for marker radius, seed distance, continuity and the
# distractor budget; paddle sizes chosen so that the dashes stay visible at each resolution).
PRESETS = {
    32: dict(paddle_length=2.0, thickness=0.5, gap=2.2, link=2, marker_radius=1.5, seed_distance=7,
             padding=1, continuity=1.0, distractor_budget=20),
    64: dict(paddle_length=4.0, thickness=1.0, gap=2.8, link=2, marker_radius=2.5, seed_distance=12,
             padding=1, continuity=1.8, distractor_budget=22),
    128: dict(paddle_length=6.0, thickness=1.5, gap=4.0, link=3, marker_radius=3.0, seed_distance=20,
              padding=1, continuity=1.8, distractor_budget=35),
    256: dict(paddle_length=11.0, thickness=2.0, gap=6.0, link=5, marker_radius=5.0, seed_distance=27,
              padding=2, continuity=1.8, distractor_budget=30),
}  # fmt: skip

_MAX_IMAGE_TRIES = 200
_MAX_PATH_TRIES = 8
_MAX_TURN_TRIES = 16
_MAX_DISTRACTOR_TRIES = 12


def pathfinder_config(resolution: int, difficulty: str = "hard", **overrides: float) -> dict:
    """The generator settings for ``resolution`` and ``difficulty``, with keyword ``overrides`` applied.

    Keys: ``resolution``, ``contour_length``, ``distractor_length``, ``num_distractors`` and those of
    :data:`PRESETS` (``paddle_length``, ``thickness``, ``gap``, ``link``, ``marker_radius``,
    ``seed_distance``, ``padding``, ``continuity``, ``distractor_budget``).
    """
    resolution = check_int("resolution", resolution)
    if resolution not in PRESETS:
        raise ValueError(f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}; got {resolution}")
    check_choice("difficulty", difficulty, tuple(DIFFICULTIES))
    cfg = dict(PRESETS[resolution])
    contour = DIFFICULTIES[difficulty]
    cfg.update(resolution=resolution, contour_length=contour, distractor_length=max(contour // 3, 1))
    for key, value in overrides.items():
        if key not in cfg and key != "num_distractors":
            raise ValueError(f"unknown setting {key!r}; expected one of {', '.join(sorted(cfg))}")
        cfg[key] = value
    for key in ("contour_length", "distractor_length", "link", "padding", "distractor_budget"):
        cfg[key] = check_int(key, cfg[key], minimum=1)
    for key in ("paddle_length", "thickness", "gap", "marker_radius", "seed_distance", "continuity"):
        if not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool) or not cfg[key] > 0:
            raise ValueError(f"{key} must be a positive number; got {cfg[key]!r}")
    if cfg["thickness"] <= 0.42:
        raise ValueError(
            f"thickness must be > 0.42 so that a paddle's lit pixels are connected; got {cfg['thickness']}"
        )
    cfg.setdefault("num_distractors", cfg["distractor_budget"] // cfg["distractor_length"])
    cfg["num_distractors"] = check_int("num_distractors", cfg["num_distractors"], minimum=0)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Drawing


class _Item:
    """One drawn piece (paddle or marker): a window of the image and its quantized values there."""

    __slots__ = ("y0", "x0", "q", "lit", "_grown")

    def __init__(self, y0: int, x0: int, q: np.ndarray) -> None:
        self.y0, self.x0, self.q = y0, x0, q
        self.lit = q > 0
        self._grown = None

    def grown(self, radius: int) -> np.ndarray:
        """The lit pixels dilated by a (2 radius + 1)^2 square: bool (h + 2 radius, w + 2 radius)."""
        if self._grown is None or self._grown.shape[0] != self.lit.shape[0] + 2 * radius:
            h, w = self.lit.shape
            rows = np.zeros((h, w + 2 * radius), dtype=bool)
            for dx in range(2 * radius + 1):
                rows[:, dx : dx + w] |= self.lit
            grown = np.zeros((h + 2 * radius, w + 2 * radius), dtype=bool)
            for dy in range(2 * radius + 1):
                grown[dy : dy + h] |= rows
            self._grown = grown
        return self._grown

    def view(self, canvas: np.ndarray) -> np.ndarray:
        return canvas[self.y0 : self.y0 + self.q.shape[0], self.x0 : self.x0 + self.q.shape[1]]


def _quantize(value: np.ndarray) -> np.ndarray:
    return np.floor(np.clip(value, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _window(lo: np.ndarray, hi: np.ndarray, size: int) -> tuple[int, int, int, int] | None:
    y0, x0 = max(int(np.floor(lo[0])), 0), max(int(np.floor(lo[1])), 0)
    y1, x1 = min(int(np.ceil(hi[0])) + 1, size), min(int(np.ceil(hi[1])) + 1, size)
    if y1 <= y0 or x1 <= x0:
        return None
    return y0, x0, y1, x1


def _segment(a: np.ndarray, b: np.ndarray, thickness: float, size: int) -> _Item | None:
    """Anti-aliased paddle from ``a`` to ``b`` ((row, col) floats, pixel centres at integers)."""
    half = thickness / 2 + 0.5
    win = _window(np.minimum(a, b) - half, np.maximum(a, b) + half, size)
    if win is None:
        return None
    y0, x0, y1, x1 = win
    py = np.arange(y0, y1, dtype=np.float64)[:, None] - a[0]
    px = np.arange(x0, x1, dtype=np.float64)[None, :] - a[1]
    d = b - a
    s = np.clip((py * d[0] + px * d[1]) / float(d @ d), 0.0, 1.0)
    dist = np.hypot(py - s * d[0], px - s * d[1])
    return _Item(y0, x0, _quantize(half - dist))


def _disk(c: np.ndarray, radius: float, size: int) -> _Item | None:
    half = radius + 0.5
    win = _window(c - half, c + half, size)
    if win is None:
        return None
    y0, x0, y1, x1 = win
    py = np.arange(y0, y1, dtype=np.float64)[:, None] - c[0]
    px = np.arange(x0, x1, dtype=np.float64)[None, :] - c[1]
    return _Item(y0, x0, _quantize(half - np.hypot(py, px)))


def _stamp(mask: np.ndarray, item: _Item, radius: int, add: int = 1) -> None:
    """Add ``add`` to ``mask`` on the lit pixels of ``item`` dilated by ``radius`` (clipped to the image).

    ``mask`` is bool (then ``add`` must be 1: logical or) or an integer count (``add`` may be -1 to undo).
    """
    grown = item.grown(radius)
    y0, x0 = item.y0 - radius, item.x0 - radius
    cy0, cx0 = max(y0, 0), max(x0, 0)
    cy1, cx1 = min(y0 + grown.shape[0], mask.shape[0]), min(x0 + grown.shape[1], mask.shape[1])
    part = grown[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    if mask.dtype == bool:
        mask[cy0:cy1, cx0:cx1] |= part
    else:
        mask[cy0:cy1, cx0:cx1] += add * part


def _hits(mask: np.ndarray, item: _Item) -> bool:
    return bool(item.view(mask)[item.lit].any())


def _linked(a: _Item, b: _Item, link: int) -> bool:
    """Whether some lit pixel of ``a`` is within Chebyshev distance ``link`` of some lit pixel of ``b``."""
    ay, ax = np.nonzero(a.lit)
    by, bx = np.nonzero(b.lit)
    if ay.size == 0 or by.size == 0:
        return False
    dy = np.abs((ay + a.y0)[:, None] - (by + b.y0)[None, :])
    dx = np.abs((ax + a.x0)[:, None] - (bx + b.x0)[None, :])
    return bool((np.maximum(dy, dx) <= link).any())


class _Scene:
    """Paths drawn so far: ``blocked`` holds every finished path's lit pixels dilated by ``link``."""

    def __init__(self, cfg: dict, rng: np.random.Generator, turn_cdf: list, turn_grid: list):
        size = cfg["resolution"]
        self.cfg, self.rng, self.size = cfg, rng, size
        self.turn_cdf, self.turn_grid = turn_cdf, turn_grid
        self.blocked = np.zeros((size, size), dtype=bool)
        pad = cfg["padding"]
        self.blocked[:pad] = self.blocked[-pad:] = True
        self.blocked[:, :pad] = self.blocked[:, -pad:] = True
        self.image = np.zeros((size, size), dtype=np.uint8)
        steps = int(np.ceil(cfg["paddle_length"] / 0.5)) + 1
        self.along = np.linspace(0.0, cfg["paddle_length"], steps).tolist()  # sample points of a centre line

    def _candidates(self, angle: float, a: np.ndarray, first: bool, own: np.ndarray):
        """Up to ``_MAX_TURN_TRIES`` next paddles ``(theta, a_i, b_i)`` whose centre line is clear.

        The pixel nearest to any point of the centre line is lit (its distance is <= sqrt(2)/2 < t/2 + 1/2),
        so a candidate whose centre line meets ``blocked`` or ``own`` would fail the full test anyway.
        """
        rand, size, blocked = self.rng.random, self.size, self.blocked
        gap = 0.0 if first else self.cfg["gap"]
        length = self.cfg["paddle_length"]
        ay, ax = float(a[0]), float(a[1])
        for _ in range(_MAX_TURN_TRIES):
            if first:
                theta = rand() * 2 * math.pi
            else:
                theta = angle + self.turn_grid[bisect.bisect_left(self.turn_cdf, rand())]
            uy, ux = math.sin(theta), math.cos(theta)
            y0, x0 = ay + gap * uy, ax + gap * ux
            for t in self.along:
                iy, ix = round(y0 + t * uy), round(x0 + t * ux)
                if not (0 <= iy < size and 0 <= ix < size) or blocked[iy, ix] or own[iy, ix]:
                    break
            else:
                yield theta, np.array([y0, x0]), np.array([y0 + length * uy, x0 + length * ux])

    def grow(
        self, start: np.ndarray, paddles: int, start_marker: bool, end_marker: bool
    ) -> list[_Item] | None:
        """Try to draw one path from ``start``; return its pieces (not yet committed) or ``None``.

        Every piece must avoid ``blocked`` (other paths) and this path's own pieces older than the previous
        two (dilated by ``link``), and be linked to the previous piece. A dead end removes the last paddle
        and tries again, a bounded number of times.
        """
        cfg, link, size = self.cfg, self.cfg["link"], self.size
        own = np.zeros(self.blocked.shape, dtype=np.int16)  # this path's pieces but the last two, dilated
        items: list[_Item] = []
        heads: list[tuple[float, np.ndarray]] = [(0.0, np.asarray(start, dtype=np.float64))]

        def fits(item: _Item | None) -> bool:
            return (
                item is not None
                and bool(item.lit.any())
                and not _hits(self.blocked, item)
                and not _hits(own, item)
                and (not items or _linked(items[-1], item, link))
            )

        def push(item: _Item) -> None:
            items.append(item)
            if len(items) >= 3:
                _stamp(own, items[-3], link)

        if start_marker:
            disk = _disk(heads[0][1], cfg["marker_radius"], size)
            if not fits(disk):
                return None
            push(disk)
        fixed = len(items)
        backtracks = 0
        while True:
            i = len(heads) - 1  # index of the next paddle
            if i == paddles:
                if not end_marker:
                    return items
                disk = _disk(heads[-1][1], cfg["marker_radius"], size)
                if disk is not None and not _hits(self.blocked, disk) and _linked(items[-1], disk, link):
                    items.append(disk)
                    return items
                placed = False
            else:
                angle, a = heads[-1]
                placed = False
                for theta, a_i, b_i in self._candidates(angle, a, i == 0, own):
                    item = _segment(a_i, b_i, cfg["thickness"], size)
                    if fits(item):
                        push(item)
                        heads.append((theta, b_i))
                        placed = True
                        break
            if placed:
                continue
            if len(items) == fixed or backtracks == paddles:
                return None
            backtracks += 1
            items.pop()
            heads.pop()
            if len(items) >= 2:
                _stamp(own, items[-2], link, add=-1)

    def commit(self, items: list[_Item]) -> None:
        for item in items:
            _stamp(self.blocked, item, self.cfg["link"])
            view = item.view(self.image)
            np.maximum(view, item.q, out=view)

    def free_point(self, margin: float) -> np.ndarray:
        lo, hi = self.cfg["padding"] + margin, self.size - 1 - self.cfg["padding"] - margin
        return np.array([lo + self.rng.random() * (hi - lo), lo + self.rng.random() * (hi - lo)])


def _turn_table(continuity: float) -> tuple[list, list]:
    grid = np.linspace(-np.pi, np.pi, 1441)
    weight = np.cos(np.minimum(np.abs(grid) * continuity, np.pi / 2)) ** 2
    cdf = np.cumsum(weight)
    return (cdf / cdf[-1]).tolist(), grid.tolist()


def _peak(item: _Item) -> np.ndarray:
    """(row, col) of the brightest pixel of ``item`` (a marker's centre pixel)."""
    iy, ix = np.unravel_index(int(np.argmax(item.q)), item.q.shape)
    return np.array([iy + item.y0, ix + item.x0], dtype=np.int64)


def _one_image(cfg: dict, rng: np.random.Generator, turn: tuple[list, list]):
    """One image: (uint8 (R, R), label, markers int (2, 2) as (row, col) of origin and terminal)."""
    label = int(rng.integers(0, 2))
    margin = cfg["marker_radius"] + 1
    for _ in range(_MAX_IMAGE_TRIES):
        scene = _Scene(cfg, rng, *turn)
        origin_path = int(rng.integers(0, 2))
        terminal_path = origin_path if label == 1 else 1 - origin_path
        paths: dict[int, list[_Item]] = {}
        first_start = None
        for p in (0, 1) if rng.random() < 0.5 else (1, 0):
            for _ in range(_MAX_PATH_TRIES):
                if first_start is None:
                    start = np.round(scene.free_point(margin))
                else:
                    phi = rng.random() * 2 * np.pi
                    start = np.round(
                        first_start + cfg["seed_distance"] * np.array([np.sin(phi), np.cos(phi)])
                    )
                items = scene.grow(start, cfg["contour_length"], p == origin_path, p == terminal_path)
                if items is not None:
                    scene.commit(items)
                    paths[p] = items
                    first_start = start
                    break
            else:
                break
        if len(paths) < 2:
            continue
        for _ in range(cfg["num_distractors"]):
            for _ in range(_MAX_DISTRACTOR_TRIES):
                start = np.round(scene.free_point(1.0))
                if scene.blocked[int(start[0]), int(start[1])]:
                    continue
                items = scene.grow(start, cfg["distractor_length"], False, False)
                if items is not None:
                    scene.commit(items)
                    break
        markers = np.stack([_peak(paths[origin_path][0]), _peak(paths[terminal_path][-1])])
        return scene.image, label, markers
    raise RuntimeError(
        f"could not place the two target paths in {_MAX_IMAGE_TRIES} tries; the settings are too crowded "
        f"for a {cfg['resolution']}x{cfg['resolution']} image (contour_length={cfg['contour_length']})"
    )


def _image_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of image ``index``: its pixels depend on ``(seed, index)`` only."""
    return np.random.default_rng([seed, index])


def _image_shard(start: int, stop: int, seed: int, cfg: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images ``start .. stop - 1``: uint8 (m, R, R), labels int64 (m,), markers int64 (m, 2, 2)."""
    turn = _turn_table(cfg["continuity"])
    r, m = cfg["resolution"], stop - start
    images = np.zeros((m, r, r), dtype=np.uint8)
    labels = np.zeros(m, dtype=np.int64)
    markers = np.zeros((m, 2, 2), dtype=np.int64)
    for k in range(m):
        images[k], labels[k], markers[k] = _one_image(cfg, _image_rng(seed, start + k), turn)
    return images, labels, markers


def _write_shard(start: int, stop: int, root: str, seed: int, cfg: dict, per_batch: int) -> list[int]:
    """Write images ``start .. stop - 1`` as ``root/imgs/{j // per_batch}/sample_{j % per_batch}.png``
    (the folders exist); return their labels."""
    turn = _turn_table(cfg["continuity"])
    labels = []
    for j in range(start, stop):
        image, label, _ = _one_image(cfg, _image_rng(seed, j), turn)
        batch, index = divmod(j, per_batch)
        write_png(Path(root) / "imgs" / str(batch) / f"sample_{index}.png", image)
        labels.append(label)
    return labels


def _shards(fn, n: int, workers: int, *args) -> Iterator:
    """``fn(start, stop, *args)`` over consecutive shards of ``range(n)``, in order.

    Image 0 runs here and is timed; the rest runs here too when it would take less than
    ``MIN_PARALLEL_SECONDS`` (or ``workers == 1``), else in about ``4 * workers`` shards on ``workers``
    processes. The shards change nothing in the output: each image has its own random stream.
    """
    if n == 0:
        return
    start = time.perf_counter()
    first = fn(0, 1, *args)
    seconds = time.perf_counter() - start
    yield first
    if n == 1:
        return
    if workers == 1 or (n - 1) * seconds < _parallel.MIN_PARALLEL_SECONDS:
        yield fn(1, n, *args)
        return
    size = math.ceil((n - 1) / (4 * workers))
    tasks = ((a, min(a + size, n), *args) for a in range(1, n, size))
    with closing(_parallel.ordered_map(fn, tasks, workers)) as results:
        yield from results


def generate_pathfinder(
    n: int,
    *,
    resolution: int,
    seed: int,
    difficulty: str = "hard",
    return_markers: bool = False,
    workers: int | None = None,
    **overrides: float,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate ``n`` Pathfinder images; deterministic for a given seed.

    Image ``i`` draws from ``numpy.random.default_rng([seed, i])``, so the images do not depend on
    ``workers`` and the first ``m`` images of a longer run are those of a run of ``m``.

    Args:
        n: number of images.
        resolution: image side R, one of 32, 64, 128 (Path-X), 256.
        seed: the generator seed (non-negative).
        difficulty: ``"baseline"``, ``"intermediate"`` or ``"hard"`` (paths of 6, 9 or 14 paddles).
        return_markers: also return the marker centres.
        workers: generator processes; ``None`` uses the available cores (``os.sched_getaffinity``). A job
            that would take less than a few seconds here never starts a process.
        **overrides: any key of :func:`pathfinder_config` (e.g. ``num_distractors=0``).

    Returns:
        ``images`` uint8 (n, R, R), ``labels`` int64 (n,) (1: the markers are connected), and with
        ``return_markers`` ``markers`` int64 (n, 2, 2): (row, col) of the origin and terminal marker centres.
    """
    n = check_int("n", n, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    workers = resolve_workers(workers)
    cfg = pathfinder_config(resolution, difficulty, **overrides)
    parts = list(_shards(_image_shard, n, workers, seed, cfg))
    if parts:
        images, labels, markers = (np.concatenate(p) for p in zip(*parts))
    else:
        images = np.zeros((0, resolution, resolution), dtype=np.uint8)
        labels, markers = np.zeros(0, dtype=np.int64), np.zeros((0, 2, 2), dtype=np.int64)
    return (images, labels, markers) if return_markers else (images, labels)


def _metadata_line(batch: int, index: int, label: int, cfg: dict) -> str:
    fields = [
        f"imgs/{batch}",
        f"sample_{index}.png",
        index,
        label,
        float(cfg["continuity"]),
        cfg["contour_length"],
        cfg["distractor_length"],
        cfg["paddle_length"],
        float(cfg["thickness"]),
        cfg["gap"],
        1,
    ]
    return " ".join(str(f) for f in fields) + "\n"


def write_pathfinder(
    out_dir: str | os.PathLike,
    *,
    resolution: int,
    n: int,
    seed: int,
    difficulty: str = "hard",
    per_batch: int = 1000,
    workers: int | None = None,
    **overrides: float,
) -> Path:
    """Generate ``n`` images and write them in the ``lra_release`` layout (see the module docstring).

    Image ``j`` goes to batch ``j // per_batch`` as ``sample_{j % per_batch}.png``; the images are those of
    :func:`generate_pathfinder` with the same arguments, written by the workers, and the files are the same,
    byte for byte, for any ``workers``. A batch's metadata file is written once all its images are. Returns
    the difficulty folder, ``out_dir/pathfinder{R}/curv_...``.
    """
    n = check_int("n", n, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    per_batch = check_int("per_batch", per_batch, minimum=1)
    workers = resolve_workers(workers)
    cfg = pathfinder_config(resolution, difficulty, **overrides)
    root = Path(out_dir) / f"pathfinder{resolution}" / DIFFICULTY_DIRS[difficulty]
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for batch in range(math.ceil(n / per_batch)):
        (root / "imgs" / str(batch)).mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    j = 0
    for labels in _shards(_write_shard, n, workers, str(root), seed, cfg, per_batch):
        for label in labels:
            batch, index = divmod(j, per_batch)
            lines.append(_metadata_line(batch, index, label, cfg))
            if index == per_batch - 1 or j == n - 1:
                (root / "metadata" / f"{batch}.npy").write_text("".join(lines))
                lines = []
            j += 1
    return root


def read_metadata(path: str | os.PathLike) -> list[tuple[str, str, int]]:
    """Rows ``(image folder, file name, label)`` of one Pathfinder metadata file.

    The LRA files are text (one space-separated row per image, the label in column 3); a genuine NumPy
    ``.npy`` array of strings, as ``np.save`` in the original generator writes it, is read too.

    Raises:
        FileNotFoundError: the file is missing.
        DataError: (a ``ValueError``) not UTF-8 text nor a readable ``.npy`` array, a row with fewer than 4
            fields, a label other than 0/1, or an image path that is absolute, holds ``..`` or a NUL; the
            message names the file and the line (the row of an array, counted from 1).
    """
    return [row[1:] for row in metadata_rows(Path(path))]


def metadata_rows(path: Path) -> list[tuple[int, str, str, int]]:
    """``(line, folder, name, label)`` per row of a metadata file (see :func:`read_metadata`)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; expected a Pathfinder metadata file")
    raw = path.read_bytes()
    expected = "expected Pathfinder metadata lines 'imgs/<b> sample_<i>.png <i> <label> ...'"
    if raw.startswith(b"\x93NUMPY"):
        try:
            array = np.load(io.BytesIO(raw), allow_pickle=False)
            # NumPy's UCS-4 strings hold any 32-bit value; one beyond U+10FFFF makes a str that Python's
            # own string operations then fail on with a SystemError, far from this file
            if array.dtype.kind == "U" and array.size:
                top = int(np.ascontiguousarray(array).view(np.uint32).max())
                if top > 0x10FFFF:
                    raise ValueError(f"a character 0x{top:x} beyond U+10FFFF")
            rows = [[str(v) for v in row] for row in np.atleast_2d(array)]
        except Exception as err:  # whatever a corrupt array raises, the file is at fault
            reason = f"unreadable .npy array ({type(err).__name__}: {err}); {expected}"
            raise DataError.at(path, reason) from None
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise DataError.at(
                path, f"byte 0x{raw[err.start]:02x} is not UTF-8 text; {expected}", line=line
            ) from None
        rows = [line.split() for line in text.split("\n")]
    out = []
    for lineno, fields in enumerate(rows, start=1):
        if not fields:
            continue
        if len(fields) < 4:
            raise DataError.at(
                path,
                f"{len(fields)} fields; expected at least 4 ('imgs/<b> sample_<i>.png <i> <label> ...')",
                line=lineno,
            )
        if fields[3] not in ("0", "1"):
            raise DataError.at(path, f"label (column 4) {fields[3][:20]!r}; expected 0 or 1", line=lineno)
        folder, name = fields[0], fields[1]
        parts = Path(folder, name).parts
        if "\x00" in folder + name or Path(folder).is_absolute() or ".." in parts:
            reason = f"image path {folder + '/' + name!r}; expected a relative one, as 'imgs/0 sample_0.png'"
            raise DataError.at(path, reason, line=lineno)
        out.append((lineno, folder, name, int(fields[3])))
    return out


# ----------------------------------------------------------------------------------------------------------
# PNG

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def write_png(path: str | os.PathLike, image: np.ndarray, *, filter_type: int = 0) -> None:
    """Write a uint8 image, (H, W) grayscale or (H, W, 3) RGB, as an 8-bit non-interlaced PNG.

    ``filter_type`` (0 none, 1 sub, 2 up, 3 average, 4 Paeth) is applied to every row; any of them decodes
    to the same pixels.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"image must be uint8 (H, W) or (H, W, 3); got {image.dtype} {image.shape}")
    check_int("filter_type", filter_type, minimum=0)
    if filter_type > 4:
        raise ValueError(f"filter_type must be 0..4; got {filter_type}")
    h, w = image.shape[:2]
    bpp = 1 if image.ndim == 2 else 3
    rows = image.reshape(h, w * bpp).astype(np.int64)
    left = np.zeros_like(rows)
    left[:, bpp:] = rows[:, :-bpp]
    up = np.zeros_like(rows)
    up[1:] = rows[:-1]
    upleft = np.zeros_like(rows)
    upleft[1:, bpp:] = rows[:-1, :-bpp]
    predictor = [0, left, up, (left + up) // 2, _paeth(left, up, upleft)][filter_type]
    filtered = ((rows - predictor) & 0xFF).astype(np.uint8)
    raw = np.concatenate([np.full((h, 1), filter_type, dtype=np.uint8), filtered], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if bpp == 1 else 2, 0, 0, 0)
    data = _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
    Path(path).write_bytes(data + _chunk(b"IEND", b""))


def _unfilter(raw: bytes, h: int, stride: int, bpp: int, path: Path) -> np.ndarray:
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        row = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        kind, data = row[0], np.frombuffer(row, dtype=np.uint8, offset=1)
        if kind == 0:
            cur = data
        elif kind == 1:
            cur = np.cumsum(data.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:
            cur = data + prev
        elif kind in (3, 4):
            cur_l = data.tolist()
            up_l = prev.tolist()
            for i in range(stride):
                a = cur_l[i - bpp] if i >= bpp else 0
                b = up_l[i]
                if kind == 3:
                    pred = (a + b) >> 1
                else:
                    c = up_l[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur_l[i] = (cur_l[i] + pred) & 0xFF
            cur = np.array(cur_l, dtype=np.uint8)
        else:
            raise DataError.at(path, f"row {y} has filter type {kind}; expected 0..4")
        out[y] = cur
        prev = out[y]
    return out


def _read_png_pure(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    expected = "expected an 8-bit non-interlaced PNG"

    def fail(reason: str) -> DataError:
        return DataError.at(path, f"{reason}; {expected}")

    if not raw.startswith(_PNG_SIGNATURE):
        raise fail("empty file" if not raw else "no PNG signature")
    pos, header, palette, alpha, idat, ended = 8, None, None, None, [], False
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos : pos + 8])
        data = raw[pos + 8 : pos + 8 + length]
        crc = raw[pos + 8 + length : pos + 12 + length]
        if len(data) != length or len(crc) != 4:
            raise fail(f"truncated {kind!r} chunk")
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + data) & 0xFFFFFFFF:
            raise fail(f"bad CRC in the {kind!r} chunk")
        if kind == b"IHDR":
            if length != 13:
                raise fail(f"IHDR chunk of {length} bytes (13 in a PNG)")
            header = struct.unpack(">IIBBBBB", data)
        elif kind == b"PLTE":
            if length % 3 or not 0 < length <= 768:
                raise fail(f"PLTE chunk of {length} bytes (3 per entry, 1..256 entries)")
            palette = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3)
        elif kind == b"tRNS":
            alpha = np.frombuffer(data, dtype=np.uint8)
        elif kind == b"IDAT":
            idat.append(data)
        elif kind == b"IEND":
            ended = True
            break
        pos += 12 + length
    if not ended:
        raise fail("truncated (no IEND chunk)")
    if header is None or not idat:
        raise fail("missing IHDR or IDAT chunk")
    w, h, depth, color, _, _, interlace = header
    if depth != 8 or color not in _CHANNELS or interlace != 0:
        raise fail(f"bit depth {depth}, color type {color}, interlace {interlace} (color type 0, 2, 3, 4, 6)")
    if w == 0 or h == 0:
        raise fail(f"size {w}x{h}")
    channels = _CHANNELS[color]
    stride = w * channels
    size = h * (stride + 1)
    try:  # decompress at most one byte more than the image needs
        pixels = zlib.decompressobj().decompress(b"".join(idat), min(size + 1, sys.maxsize))
    except zlib.error as err:
        raise fail(f"corrupt image data ({err})") from None
    if len(pixels) != size:
        more = "+" if len(pixels) > size else ""
        raise fail(f"{len(pixels)}{more} bytes of image data, {size} for {w}x{h}")
    out = _unfilter(pixels, h, stride, channels, path)
    if color == 3:
        if palette is None:
            raise fail("palette image without a PLTE chunk")
        if int(out.max()) >= len(palette):
            raise fail(f"palette index {int(out.max())} with a PLTE chunk of {len(palette)} entries")
        rgba = np.concatenate([palette, np.full((len(palette), 1), 255, dtype=np.uint8)], axis=1)
        if alpha is not None:
            rgba[: len(alpha), 3] = alpha[: len(rgba)]
        table = rgba if alpha is not None else rgba[:, :3]
        return table[out.reshape(h, w)]
    return out.reshape(h, w) if channels == 1 else out.reshape(h, w, channels)


@functools.lru_cache(maxsize=1)
def _pillow():
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W) luminance of an (H, W), (H, W, 2), (H, W, 3) or (H, W, 4) uint8 image.

    ITU-R 601-2 luma in Pillow's integer form, ``L = (19595 R + 38470 G + 7471 B + 2**15) >> 16``, which is
    what ``Image.convert("L")`` (and so torchvision's ``Grayscale`` on PIL images) computes; alpha is dropped.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] in (1, 2):
        return image[..., 0]
    rgb = image[..., :3].astype(np.uint32)
    return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)


def read_png(path: str | os.PathLike, *, gray: bool = False, backend: str = "auto") -> np.ndarray:
    """Read an 8-bit PNG into a uint8 array: (H, W) for grayscale, (H, W, C) otherwise.

    Args:
        path: the file.
        gray: convert to (H, W) luminance with :func:`to_grayscale` (Pillow's ``convert("L")``).
        backend: ``"pillow"``, ``"pure"`` (the decoder here) or ``"auto"`` (Pillow when installed).

    Raises:
        FileNotFoundError: the file is missing.
        DataError: (a ``ValueError``) not a PNG, corrupt, or (pure decoder) not 8-bit non-interlaced; the
            message names the file. With Pillow, whatever its decoder raises on the file is reported so.
    """
    check_choice("backend", backend, ("auto", "pillow", "pure"))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; expected a PNG image")
    if path.stat().st_size == 0:
        raise DataError.at(path, "empty file; expected a PNG image")
    image_mod = _pillow() if backend != "pure" else None
    if backend == "pillow" and image_mod is None:
        raise ValueError("backend='pillow' needs Pillow: pip install pillow (or ssm-layers[images])")
    if image_mod is None:
        array = _read_png_pure(path)
    else:
        array = _read_png_pillow(image_mod, path, gray)
    return to_grayscale(array) if gray else array


def _read_png_pillow(image_mod, path: Path, gray: bool) -> np.ndarray:
    try:
        with image_mod.open(path) as img:
            img.load()
            kind = img.format
            if kind == "PNG":
                if gray:
                    img = img.convert("L")
                elif img.mode not in ("L", "LA", "RGB", "RGBA"):
                    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                array = np.array(img)
    # Pillow reports a corrupt file with OSError, SyntaxError, ValueError, EOFError, struct.error,
    # zlib.error, DecompressionBombError, ...: whatever it raises here, the file is at fault.
    except Exception as err:
        raise DataError.at(path, f"cannot be read as a PNG ({type(err).__name__}: {err})") from None
    if kind != "PNG":
        raise DataError.at(path, f"a {kind} image; expected a PNG")
    return array


# ----------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: write Pathfinder images in the lra_release layout."""
    parser = argparse.ArgumentParser(
        prog="python -m ssm.data.pathfinder", description="Generate Pathfinder images in the LRA layout."
    )
    parser.add_argument("--out", required=True, help="output directory (pathfinder{R}/ is created inside)")
    parser.add_argument("--resolution", type=int, default=32, choices=RESOLUTIONS)
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", default="hard", choices=tuple(DIFFICULTIES))
    parser.add_argument("--per-batch", type=int, default=1000, help="images per imgs/<b> folder")
    parser.add_argument(
        "--gen-workers", type=int, default=None, metavar="N",
        help="generator processes (default: the available cores); the files do not depend on it",
    )  # fmt: skip
    args = parser.parse_args(argv)
    workers = resolve_workers(args.gen_workers)
    t0 = time.perf_counter()
    root = write_pathfinder(
        args.out,
        resolution=args.resolution,
        n=args.n,
        seed=args.seed,
        difficulty=args.difficulty,
        per_batch=args.per_batch,
        workers=workers,
    )
    print(f"wrote {args.n} images to {root} in {time.perf_counter() - t0:.1f} s ({workers} workers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
