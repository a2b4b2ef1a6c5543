"""ListOps (Nangia & Bowman 2018) as Long Range Arena generates and ships it.

Generator (the LRA algorithm, ``lra_benchmarks/data/listops.py``): a random expression tree is grown from
depth 1; a node below ``max_depth`` is an operator with probability 0.25, otherwise (and always at
``max_depth``) a digit 0-9. An operator draws 2..``max_args`` arguments (uniformly), then one of

    [MIN  minimum        [MAX  maximum        [MED  median, rounded down        [SM  sum modulo 10

The tree's length counts one token per digit and two per operator (its name and its closing ``]``); trees
are drawn until ``min_length < length < max_length`` (strict, as LRA) and duplicates are dropped. The label
is the value of the whole expression.

On-disk format (``basic_train.tsv``, ``basic_val.tsv``, ``basic_test.tsv`` in ``lra_release/listops-1000``):
tab-separated, a header row ``Source<TAB>Target``, then one expression per row written as LRA's
``to_string`` writes the tree of nested pairs: each operator with k arguments opens k + 1 parentheses,
and every argument and the final ``]`` is followed by a ``)``; all tokens are separated by one space::

    ( ( ( [MAX 2 ) 9 ) ] )<TAB>9

Rows end with ``\\r\\n`` (Python's csv writer, which LRA uses). The reader accepts any line ending.

Tokenization (as S4's loader): parentheses carry no information and are dropped; the remaining tokens are
mapped through the fixed vocabulary :data:`VOCAB` (id 0 is padding, 1 end-of-sequence).

Parallel generation: trees are drawn in batches, batch ``b`` from ``numpy.random.default_rng([seed, b])``,
and the rows are the first distinct trees of batches 0, 1, 2, ... in order, so ``workers``
(``--gen-workers``) changes where batches are drawn, never the files.

Command line::

    python -m ssm.data.listops --out DIR [--train 96000 --val 2000 --test 2000 --seed 0 --gen-workers N]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import check_choice, check_int
from . import _parallel
from ._parallel import resolve_workers
from .errors import DataError
from .text import collate_pad, require_file

__all__ = [
    "EOS_ID",
    "OPERATORS",
    "PAD_ID",
    "VOCAB",
    "ListOpsDataset",
    "collate_pad",
    "evaluate_listops",
    "generate_listops",
    "main",
    "tokenize_listops",
    "vocab_size",
    "write_listops",
]

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_P = 0.25  # probability that a node at depth < max_depth is an operator (LRA's VALUE_P)

VOCAB = ("<pad>", "<eos>", *(str(d) for d in range(10)), *OPERATORS, END, "(", ")")
PAD_ID = 0
EOS_ID = 1
vocab_size = len(VOCAB)
_TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}

_MAX_IDLE_BATCHES = 200
_BATCH_TREES = 5_000  # trees grown at once; batch b draws from default_rng([seed, b])
SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 96_000, "val": 2_000, "test": 2_000}


def _apply(op: int, values: list[int]) -> int:
    if op == 0:
        return min(values)
    if op == 1:
        return max(values)
    if op == 2:
        s = sorted(values)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
    return sum(values) % 10


_DIGIT0 = _TOKEN_ID["0"]
_OP0 = _TOKEN_ID[OPERATORS[0]]
_END_ID = _TOKEN_ID[END]
_OPEN_ID = _TOKEN_ID["("]
_CLOSE_ID = _TOKEN_ID[")"]
_TOKEN_STR = np.array(VOCAB, dtype=object)


def _group_arange(counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(c) for c in counts])`` without a Python loop."""
    total = int(counts.sum())
    firsts = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(firsts, counts)


def _sample_batch(
    rng: np.random.Generator, trees: int, min_length: int, max_length: int, max_depth: int, max_args: int
) -> list[tuple[np.ndarray, int]]:
    """Grow ``trees`` random trees level by level; return the accepted ones as (token ids, value).

    Level arrays hold, per node: its tree, whether it is an operator, its number of arguments ``k``, the
    operator (0..3) or digit drawn for it, and the index of its parent in the previous level. The children
    of one parent are consecutive and in argument order. A tree is abandoned as soon as its length (grown
    nodes plus at least one per pending child) reaches ``max_length``.
    """
    levels = []
    tree = np.arange(trees, dtype=np.int64)
    parent = np.full(trees, -1, dtype=np.int64)
    alive = np.ones(trees, dtype=bool)
    count = np.zeros(trees, dtype=np.int64)
    for depth in range(1, max_depth + 1):
        n = tree.shape[0]
        if depth < max_depth:
            is_op = rng.random(n) <= VALUE_P
        else:
            is_op = np.zeros(n, dtype=bool)
        n_op = int(is_op.sum())
        k = np.zeros(n, dtype=np.int64)
        k[is_op] = 2 + (rng.random(n_op) * (max_args - 1)).astype(np.int64)
        sym = np.empty(n, dtype=np.int64)  # the operator (0..3) of an operator node, the digit of a leaf
        sym[is_op] = (rng.random(n_op) * len(OPERATORS)).astype(np.int64)
        sym[~is_op] = (rng.random(n - n_op) * 10).astype(np.int64)
        levels.append({"tree": tree, "is_op": is_op, "k": k, "sym": sym, "parent": parent})
        op_tree = tree[is_op]
        count += np.bincount(tree, minlength=trees) + np.bincount(op_tree, minlength=trees)
        pending = np.bincount(op_tree, weights=k[is_op], minlength=trees).astype(np.int64)
        alive &= count + pending < max_length
        grow = np.nonzero(is_op & alive[tree])[0]
        if grow.shape[0] == 0:
            break
        parent = np.repeat(grow, k[grow])
        tree = tree[parent]
    accepted = alive & (count > min_length) & (count < max_length)
    if not accepted.any():
        return []

    # Keep the accepted trees only; re-index parents.
    prev_index = None
    for lv in levels:
        keep = accepted[lv["tree"]]
        index = np.cumsum(keep) - 1
        for key in ("tree", "is_op", "k", "sym"):
            lv[key] = lv[key][keep]
        lv["parent"] = prev_index[lv["parent"][keep]] if prev_index is not None else lv["parent"][keep]
        prev_index = index
    levels = [lv for lv in levels if lv["tree"].shape[0]]

    # Bottom-up: token count of each subtree (parentheses included) and its value.
    child = None
    for lv in reversed(levels):
        is_op, k = lv["is_op"], lv["k"]
        n = is_op.shape[0]
        size = np.ones(n, dtype=np.int64)
        value = lv["sym"].copy()
        if child is not None and child["parent"].shape[0]:
            ks = k[is_op]
            firsts = np.cumsum(ks) - ks
            cval = child["value"]
            sorted_val = cval[np.lexsort((cval, child["parent"]))]
            lo = sorted_val[firsts + (ks - 1) // 2]
            hi = sorted_val[firsts + ks // 2]
            results = np.stack(
                [
                    np.minimum.reduceat(cval, firsts),
                    np.maximum.reduceat(cval, firsts),
                    (lo + hi) // 2,
                    np.add.reduceat(cval, firsts) % 10,
                ]
            )
            value[is_op] = results[lv["sym"][is_op], np.arange(ks.shape[0])]
            child_size = np.bincount(child["parent"], weights=child["size"], minlength=n).astype(np.int64)
            size = np.where(is_op, 2 * k + 4 + child_size, 1)
        lv["size"], lv["value"] = size, value
        child = lv

    # Top-down: position of each subtree's first token in one buffer holding all trees back to back.
    roots = levels[0]
    roots["start"] = np.cumsum(roots["size"]) - roots["size"]
    for up, lv in zip(levels[:-1], levels[1:]):
        p = lv["parent"]
        w = lv["size"] + 1
        excl = np.cumsum(w) - w
        ks = up["k"][up["is_op"]]
        first_child = np.repeat(np.cumsum(ks) - ks, ks)
        lv["start"] = up["start"][p] + up["k"][p] + 2 + excl - excl[first_child]

    total = int(roots["size"].sum())
    buf = np.full(total, _CLOSE_ID, dtype=np.uint8)
    for lv in levels:
        is_op, start, k = lv["is_op"], lv["start"], lv["k"]
        leaf = ~is_op
        buf[start[leaf]] = _DIGIT0 + lv["sym"][leaf]
        s_op, k_op = start[is_op], k[is_op]
        buf[s_op + k_op + 1] = _OP0 + lv["sym"][is_op]
        buf[s_op + lv["size"][is_op] - 2] = _END_ID
        buf[np.repeat(s_op, k_op + 1) + _group_arange(k_op + 1)] = _OPEN_ID
    ends = roots["start"] + roots["size"]
    return [(buf[a:b], int(v)) for a, b, v in zip(roots["start"], ends, roots["value"])]


def _batch_rows(
    seed: int, batch: int, trees: int, min_length: int, max_length: int, max_depth: int, max_args: int
) -> list[tuple[bytes, str, int]]:
    """The accepted trees of batch ``batch`` as ``(key, source, value)``; ``key`` identifies the tree.

    The batch draws from its own stream, ``default_rng([seed, batch])``, so its rows depend on
    ``(seed, batch)`` only: batches can run in any process, in any order.
    """
    rng = np.random.default_rng([seed, batch])
    rows = _sample_batch(rng, trees, min_length, max_length, max_depth, max_args)
    return [
        (hashlib.blake2b(ids.tobytes(), digest_size=16).digest(), " ".join(_TOKEN_STR[ids].tolist()), value)
        for ids, value in rows
    ]


def _generate(
    n: int,
    seed: int,
    min_length: int,
    max_length: int,
    max_depth: int,
    max_args: int,
    *,
    workers: int = 1,
) -> Iterator[tuple[str, int]]:
    """Yield ``n`` distinct ``(source, value)`` rows: the first distinct trees of batches 0, 1, 2, ...

    Batch 0 runs here; the later ones, if needed, on ``workers`` processes unless batch 0 shows that they
    would take less than ``MIN_PARALLEL_SECONDS`` here. The rows do not depend on ``workers``.
    """
    if n == 0:
        return
    trees = _BATCH_TREES
    settings = (min_length, max_length, max_depth, max_args)
    seen: set[bytes] = set()
    produced = 0
    idle = 0
    start = time.perf_counter()
    first = _batch_rows(seed, 0, trees, *settings)
    first_seconds = time.perf_counter() - start

    def later_batches() -> Iterator[list[tuple[bytes, str, int]]]:
        # Started when batch 0 was not enough: `produced` is then the number of new rows it gave.
        needed = math.ceil((n - produced) / max(produced, 1))
        pool = workers if needed * first_seconds >= _parallel.MIN_PARALLEL_SECONDS else 1
        tasks = ((seed, batch, trees, *settings) for batch in itertools.count(1))
        with closing(_parallel.ordered_map(_batch_rows, tasks, pool)) as results:
            yield from results

    with closing(later_batches()) as later:
        for rows in itertools.chain([first], later):
            before = produced
            for key, source, value in rows:
                if key in seen:
                    continue
                seen.add(key)
                yield source, value
                produced += 1
                if produced == n:
                    return
            idle = idle + 1 if produced == before else 0
            if idle == _MAX_IDLE_BATCHES:
                raise RuntimeError(
                    f"no new expression in {_MAX_IDLE_BATCHES * trees} trees: lengths in "
                    f"({min_length}, {max_length}) with max_depth={max_depth}, max_args={max_args} are too "
                    f"rare (or fewer than n={n} distinct expressions exist)"
                )


def _check_generator_args(
    seed: int, min_length: int, max_length: int, max_depth: int, max_args: int
) -> tuple[int, int, int, int, int]:
    seed = check_int("seed", seed, minimum=0)
    min_length = check_int("min_length", min_length, minimum=0)
    max_length = check_int("max_length", max_length, minimum=min_length + 2)
    max_depth = check_int("max_depth", max_depth, minimum=2)
    max_args = check_int("max_args", max_args, minimum=2)
    longest = 1  # the longest tree: every node above max_depth an operator with max_args arguments
    for _ in range(max_depth - 1):
        longest = 2 + max_args * longest
        if longest > min_length:
            break
    if longest <= min_length:
        raise ValueError(
            f"min_length must be < {longest}, the longest tree with max_depth={max_depth} and "
            f"max_args={max_args}; got {min_length}"
        )
    return seed, min_length, max_length, max_depth, max_args


def generate_listops(
    n: int,
    *,
    seed: int,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    workers: int | None = None,
) -> list[tuple[str, int]]:
    """Generate ``n`` distinct ListOps expressions with the LRA algorithm; deterministic for a given seed.

    The trees follow LRA's distribution exactly (same branching probability, argument counts, digits,
    operators and length rejection); the random draws are vectorized with numpy, level by level over
    batches of many trees, so the sequence for a seed is this library's own, not LRA's. Batch ``b`` draws
    from ``numpy.random.default_rng([seed, b])`` and the rows are the first distinct trees of batches 0, 1,
    2, ... in order, so the result is the same for any ``workers``.

    Args:
        n: number of expressions.
        seed: the generator seed (non-negative).
        min_length, max_length: keep trees with ``min_length < length < max_length`` where ``length``
            counts digits, operators and ``]`` (not parentheses), as LRA does.
        max_depth: the root has depth 1; nodes at ``max_depth`` are digits.
        max_args: maximum number of arguments of an operator (at least 2).
        workers: processes drawing batches after the first; ``None`` uses the available cores
            (``os.sched_getaffinity``). A job that one batch completes never starts a process.

    Returns:
        list of ``(source, target)``: the expression in LRA's text format and its value 0..9.
    """
    n = check_int("n", n, minimum=0)
    args = _check_generator_args(seed, min_length, max_length, max_depth, max_args)
    return list(_generate(n, *args, workers=resolve_workers(workers)))


def evaluate_listops(source: str) -> int:
    """Value of one expression in LRA's text format (parentheses ignored); ``ValueError`` if malformed."""
    stack: list[list] = []
    result = None
    for tok in source.split():
        if tok in ("(", ")"):
            continue
        if tok in OPERATORS:
            stack.append([OPERATORS.index(tok), []])
        elif tok == END:
            if not stack or len(stack[-1][1]) == 0:
                raise ValueError(f"source has a ']' without an operator or arguments: {source[:80]!r}")
            op, values = stack.pop()
            value = _apply(op, values)
            if stack:
                stack[-1][1].append(value)
            elif result is None:
                result = value
            else:
                raise ValueError(f"source holds more than one expression: {source[:80]!r}")
        elif len(tok) == 1 and tok in "0123456789":
            if stack:
                stack[-1][1].append(int(tok))
            elif result is None:
                result = int(tok)
            else:
                raise ValueError(f"source holds more than one expression: {source[:80]!r}")
        else:
            raise ValueError(
                f"source has an unknown token {tok!r}; expected digits, {', '.join(OPERATORS)}, ]"
            )
    if stack or result is None:
        raise ValueError(f"source is an incomplete expression: {source[:80]!r}")
    return result


def _check_sizes(**sizes: int) -> dict[str, int]:
    return {name: check_int(name, value, minimum=0) for name, value in sizes.items()}


def write_listops(
    out_dir: str | os.PathLike,
    *,
    train: int = DEFAULT_SIZES["train"],
    val: int = DEFAULT_SIZES["val"],
    test: int = DEFAULT_SIZES["test"],
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    task: str = "basic",
    workers: int | None = None,
) -> dict[str, Path]:
    """Generate ``train + val + test`` distinct expressions and write ``{task}_{split}.tsv`` into ``out_dir``.

    The three splits are disjoint (the rows of :func:`generate_listops` with the same arguments, cut train /
    val / test). The files are the same, byte for byte, for any ``workers`` (see :func:`generate_listops`).
    Returns the paths by split name.
    """
    sizes = _check_sizes(train=train, val=val, test=test)
    args = _check_generator_args(seed, min_length, max_length, max_depth, max_args)
    workers = resolve_workers(workers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    with closing(_generate(sum(sizes.values()), *args, workers=workers)) as rows:
        for split in SPLITS:
            path = out / f"{task}_{split}.tsv"
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, delimiter="\t")
                writer.writerow(["Source", "Target"])
                for _ in range(sizes[split]):
                    writer.writerow(next(rows))
            paths[split] = path
    return paths


_BLANK, _BRACKET, _LETTER, _BAD = 252, 253, 254, 255  # byte classes besides token ids
_CLASS = np.full(256, _BAD, dtype=np.uint8)  # byte -> token id of a one-byte token, or a class
for _tok, _id in _TOKEN_ID.items():
    if len(_tok) == 1:
        _CLASS[ord(_tok)] = _id
_CLASS[list(b" \t\n\r\x0b\x0c")] = _BLANK
_CLASS[ord("[")] = _BRACKET
_CLASS[list(b"".join(op[1:].encode() for op in OPERATORS))] = _LETTER
_OP_CODES = [(_TOKEN_ID[op], np.frombuffer(op[1:].encode(), dtype=np.uint8)) for op in OPERATORS]
_FIRST_PAREN = _TOKEN_ID["("]  # "(" and ")" are the last two ids
_SHORT = [(op.encode(), bytes([_TOKEN_ID[op]])) for op in OPERATORS]  # fast path: operator -> its id byte
_CODE_BYTES = [code for _, code in _SHORT]
_SHORT_LUT = np.full(256, _BAD, dtype=np.uint8)
for _tok, _id in _TOKEN_ID.items():
    if len(_tok) == 1:
        _SHORT_LUT[ord(_tok)] = _id
    elif _tok in OPERATORS:
        _SHORT_LUT[_id] = _id


def _unknown(source: str) -> ValueError:
    known = set(VOCAB[2:])
    bad = next((tok for tok in source.split() if tok not in known), source[:20])
    return ValueError(f"unknown token {bad!r}; expected one of {' '.join(VOCAB[2:])}")


def tokenize_listops(source: str, *, keep_parens: bool = False) -> np.ndarray:
    """Map one whitespace-separated expression to vocabulary ids: uint8 array (L,).

    Parentheses are dropped unless ``keep_parens``. Raises ``ValueError`` naming an unknown token.
    """
    try:
        data = source.encode("ascii")
    except UnicodeEncodeError:
        raise _unknown(source) from None
    # Fast path, for tokens separated by single spaces (as LRA writes them): each operator becomes its id
    # byte (ids 12..15 are not printable), so that the tokens sit at the even positions.
    short = data
    for op, code in _SHORT:
        short = short.replace(op, code)
    tokens = short[0::2]
    if not short[1::2].strip(b" ") and b" " not in tokens and not any(c in data for c in _CODE_BYTES):
        ids = _SHORT_LUT[np.frombuffer(tokens if keep_parens else tokens.translate(None, b"()"), np.uint8)]
        if (ids == _BAD).any():
            raise _unknown(source)
        return ids
    raw = np.frombuffer(data + b"    ", dtype=np.uint8)
    cls = _CLASS[raw]
    solid = cls != _BLANK
    starts = np.flatnonzero(solid[1:] & ~solid[:-1]) + 1
    if solid[0]:
        starts = np.concatenate([[0], starts])
    ids = cls[starts]
    if (ids == _LETTER).any() or (cls == _BAD).any():  # a token starting with a letter, or an unknown byte
        raise _unknown(source)
    multi = np.flatnonzero(solid[starts + 1])  # tokens longer than one byte: must be operators
    if multi.size:
        at = starts[multi]
        word = raw[at[:, None] + np.arange(1, 5)]  # the 4 bytes after "[": e.g. b"MIN " or b"SM  "
        ok = ids[multi] == _BRACKET
        code = np.full(multi.size, _BAD, dtype=np.uint8)
        for op_id, letters in _OP_CODES:
            n = letters.shape[0]
            hit = (word[:, :n] == letters).all(axis=1) & (_CLASS[word[:, n]] == _BLANK)
            code[hit] = op_id
        if not (ok & (code != _BAD)).all():
            raise _unknown(source)
        ids[multi] = code
    elif (ids == _BRACKET).any():
        raise _unknown(source)
    return ids[ids < _FIRST_PAREN] if not keep_parens else ids


def _check_utf8(path: Path, lineno: int, line: str) -> None:
    """Raise :class:`DataError` at the first byte of ``line`` that was not UTF-8 (a lone surrogate)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as err:
        byte = ord(line[err.start]) - 0xDC00
        raise DataError.at(
            path, f"byte 0x{byte:02x} at column {err.start + 1} is not UTF-8 text", line=lineno
        ) from None


_DEPTH_STEP = np.zeros(256, dtype=np.int8)  # token id -> change of the operator depth
_DEPTH_STEP[_OP0:_END_ID] = 1
_DEPTH_STEP[_END_ID] = -1


def _structure_error(core: np.ndarray, n_open: int, n_close: int) -> str | None:
    """Why an expression is not exactly one, or ``None`` if it is.

    Args:
        core: its token ids without parentheses.
        n_open, n_close: its numbers of ``(`` and ``)``.

    One expression is a digit, or an operator, at least one argument (an expression) and ``]``. Without
    the parentheses, the operator depth (operators opened minus ``]`` closed) is then >= 1 from the first
    token to the one before the last and 0 at the last, and no operator is directly followed by ``]``. Of
    the parentheses, which carry no information, only the counts are checked (as many ``(`` as ``)``).
    """
    if n_open != n_close:
        return f"unbalanced parentheses ({n_open} '(' and {n_close} ')')"
    if core.size == 0:
        return "no tokens"
    step = _DEPTH_STEP[core]
    depth = np.cumsum(step, dtype=np.int32)
    if depth.min() < 0:
        return "a ']' without its operator"
    if depth[-1] > 0:
        return f"{int(depth[-1])} operator(s) without their closing ']'"
    if np.count_nonzero(depth) != depth.size - 1:
        return "tokens after the end of the expression"
    if ((step[:-1] == 1) & (step[1:] == -1)).any():
        return "an operator without arguments"
    return None


def _split_path(path_or_dir: str | os.PathLike, split: str, task: str) -> Path:
    path = Path(path_or_dir)
    if path.is_dir():
        return path / f"{task}_{split}.tsv"
    return path


class ListOpsDataset(Dataset):
    """ListOps from LRA's tsv files: item ``i`` is ``(ids int64 (L,), label int)``.

    Args:
        path_or_dir: a ``.tsv`` file, or the directory holding ``{task}_{split}.tsv`` (e.g. LRA's
            ``listops-1000``).
        split: ``"train"``, ``"val"`` or ``"test"`` (used when ``path_or_dir`` is a directory).
        task: file name prefix, ``"basic"`` in the LRA release.
        max_length: truncate to this many ids (end-of-sequence token included); ``None`` keeps all.
        append_eos: append the end-of-sequence id (S4's default).
        keep_parens: keep ``(`` and ``)`` as tokens (dropped by default, as S4 and LRA do).

    Attributes:
        vocab_size: ``len(VOCAB)``; ids are in ``[0, vocab_size)``, 0 is padding.
        labels: int64 (N,).

    Raises:
        FileNotFoundError: the file is missing.
        DataError: (a ``ValueError``) bytes that are not UTF-8, a missing or wrong header (an empty file), a
            row without two tab-separated fields, a Source that is not one well-formed expression (an
            unknown token, a ``]`` missing or too many, unbalanced parentheses, an operator without
            arguments), a Target other than 0..9; the message names the file and the line. A file with
            the header and no rows is an empty dataset.
    """

    num_classes = 10
    vocab_size = vocab_size

    def __init__(
        self,
        path_or_dir: str | os.PathLike,
        split: str = "train",
        *,
        task: str = "basic",
        max_length: int | None = None,
        append_eos: bool = True,
        keep_parens: bool = False,
    ) -> None:
        check_choice("split", split, SPLITS)
        if max_length is not None:
            max_length = check_int("max_length", max_length, minimum=1 + int(append_eos))
        path = _split_path(path_or_dir, split, task)
        require_file(path, f"the ListOps {split} split, a tsv file with header 'Source<TAB>Target'")
        self.path = path
        self.split = split
        seqs, labels = [], []
        lineno = 0
        # surrogateescape: an undecodable byte becomes a lone surrogate, reported below with its line
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if not line.isascii():
                    _check_utf8(path, lineno, line)
                fields = line.split("\t")
                if lineno == 1:
                    if fields != ["Source", "Target"]:
                        raise DataError.at(
                            path, f"header {line[:60]!r}; expected 'Source<TAB>Target'", line=1
                        )
                    continue
                if not line:
                    continue
                if len(fields) != 2:
                    raise DataError.at(
                        path, f"{len(fields)} tab-separated fields; expected 2 (Source, Target)", line=lineno
                    )
                source, target = fields
                digit = target.strip()
                if not (digit.isascii() and digit.isdigit() and int(digit) <= 9):
                    raise DataError.at(path, f"Target {target[:20]!r}; expected an integer 0..9", line=lineno)
                try:
                    ids = tokenize_listops(source, keep_parens=keep_parens)
                except ValueError as err:
                    raise DataError.at(path, f"Source has an {err}", line=lineno) from None
                core = ids[ids < _FIRST_PAREN] if keep_parens else ids
                problem = _structure_error(core, source.count("("), source.count(")"))
                if problem is not None:
                    raise DataError.at(path, f"Source is not one expression: {problem}", line=lineno)
                if append_eos:
                    ids = np.append(ids, np.uint8(EOS_ID))
                if max_length is not None:
                    ids = ids[:max_length]
                seqs.append(ids)
                labels.append(int(digit))
        if lineno == 0:
            raise DataError.at(path, "empty file; expected the header 'Source<TAB>Target'", line=1)
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.tokens = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.uint8)
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            index += len(self)
        ids = self.tokens[self.offsets[index] : self.offsets[index + 1]]
        return torch.from_numpy(ids.astype(np.int64)), int(self.labels[index])

    def __repr__(self) -> str:
        return f"ListOpsDataset(split={self.split!r}, n={len(self)}, path={str(self.path)!r})"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: write basic_{train,val,test}.tsv (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m ssm.data.listops", description="Generate ListOps in the Long Range Arena format."
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=DEFAULT_SIZES["train"])
    parser.add_argument("--val", type=int, default=DEFAULT_SIZES["val"])
    parser.add_argument("--test", type=int, default=DEFAULT_SIZES["test"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-length", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=2000)
    parser.add_argument("--max-depth", type=int, default=10)
    parser.add_argument("--max-args", type=int, default=10)
    parser.add_argument("--task", default="basic", help="file name prefix (default: basic)")
    parser.add_argument(
        "--gen-workers", type=int, default=None, metavar="N",
        help="generator processes (default: the available cores); the files do not depend on it",
    )  # fmt: skip
    args = parser.parse_args(argv)
    workers = resolve_workers(args.gen_workers)
    t0 = time.perf_counter()
    paths = write_listops(
        args.out,
        train=args.train,
        val=args.val,
        test=args.test,
        seed=args.seed,
        min_length=args.min_length,
        max_length=args.max_length,
        max_depth=args.max_depth,
        max_args=args.max_args,
        task=args.task,
        workers=workers,
    )
    total = args.train + args.val + args.test
    print(f"wrote {total} expressions in {time.perf_counter() - t0:.1f} s ({workers} workers):")
    for path in paths.values():
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
