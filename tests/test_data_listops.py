"""ssm.data.listops: the LRA ListOps generator, its tsv files, and the Dataset that reads them.

Labels are checked by an evaluator written here from the task's definition: a recursive-descent parser of
LRA's nested-pair text format (``( left right )``), then the operators applied to the arguments collected
left to right. It shares no code with the generator (which computes values level by level with numpy).
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import ssm.data._parallel as _parallel
import ssm.data.listops as listops_module
from ssm.data.errors import DataError
from ssm.data.listops import (
    EOS_ID,
    PAD_ID,
    VOCAB,
    ListOpsDataset,
    collate_pad,
    evaluate_listops,
    generate_listops,
    main,
    tokenize_listops,
    vocab_size,
    write_listops,
)

OPS = {
    "[MIN": min,
    "[MAX": max,
    "[MED": lambda args: math.floor(statistics.median(args)),
    "[SM": lambda args: sum(args) % 10,
}


def parse_pairs(tokens: list[str], pos: int = 0):
    """Parse one term of the pair grammar ``term := '(' term term ')' | atom``; return (tree, next pos)."""
    tok = tokens[pos]
    if tok == "(":
        left, pos = parse_pairs(tokens, pos + 1)
        right, pos = parse_pairs(tokens, pos)
        assert tokens[pos] == ")", f"expected ')' at token {pos}, got {tokens[pos]!r}"
        return (left, right), pos + 1
    assert tok != ")", f"unexpected ')' at token {pos}"
    return tok, pos + 1


def to_text(tree) -> str:
    """Serialize a pair tree the way LRA's ``to_string`` does: ``'( ' + left + ' ' + right + ' )'``."""
    if isinstance(tree, tuple):
        return "( " + to_text(tree[0]) + " " + to_text(tree[1]) + " )"
    return tree


def flatten(tree) -> list[str]:
    """Atoms of a pair tree, left to right."""
    return flatten(tree[0]) + flatten(tree[1]) if isinstance(tree, tuple) else [tree]


def value_of(atoms: list[str], pos: int = 0) -> tuple[int, int, int]:
    """Evaluate the prefix expression at ``atoms[pos]``; return (value, next pos, operator depth)."""
    tok = atoms[pos]
    if tok.isdigit():
        return int(tok), pos + 1, 0
    assert tok in OPS, f"unexpected atom {tok!r}"
    args, depth, pos = [], 0, pos + 1
    while atoms[pos] != "]":
        v, pos, d = value_of(atoms, pos)
        args.append(v)
        depth = max(depth, d)
    return OPS[tok](args), pos + 1, depth + 1


def check_expression(
    source: str, target: int, *, min_length: int, max_length: int, max_depth: int, max_args: int
):
    tokens = source.split(" ")
    tree, end = parse_pairs(tokens)
    assert end == len(tokens), "trailing tokens after the expression"
    assert to_text(tree) == source, "not LRA's exact text layout"
    atoms = flatten(tree)
    assert min_length < len(atoms) < max_length
    value, end, depth = value_of(atoms)
    assert end == len(atoms)
    assert value == target
    assert depth <= max_depth - 1  # the root has depth 1 and nodes at max_depth are digits
    # every operator's argument count (pairs are nested k + 1 deep around an operator with k arguments)
    stack = []
    for atom in atoms:
        if atom in OPS:
            stack.append(0)
        elif atom == "]":
            k = stack.pop()
            assert 2 <= k <= max_args
            if stack:
                stack[-1] += 1
        elif stack:
            stack[-1] += 1


def test_independent_evaluator_on_known_expressions():
    cases = {
        "( ( ( [MAX 2 ) 9 ) ] )": 9,
        "( ( ( ( [MED 1 ) 2 ) 4 ) ] )": 2,
        "( ( ( ( ( [MED 1 ) 2 ) 4 ) 8 ) ] )": 3,  # median 3.0
        "( ( ( [MED 1 ) 2 ) ] )": 1,  # median 1.5 rounded down
        "( ( ( ( [SM 9 ) 8 ) 7 ) ] )": 4,
        "( ( ( ( [MIN 5 ) ( ( ( [MAX 1 ) 3 ) ] ) ) 4 ) ] )": 3,
    }
    for source, target in cases.items():
        tree, _ = parse_pairs(source.split(" "))
        assert value_of(flatten(tree))[0] == target
        assert evaluate_listops(source) == target


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(min_length=20, max_length=120, max_depth=10, max_args=10),
        dict(min_length=5, max_length=60, max_depth=3, max_args=3),
        dict(min_length=40, max_length=300, max_depth=6, max_args=5),
    ],
)
def test_generated_labels_lengths_and_format(kwargs):
    rows = generate_listops(400, seed=1, **kwargs)
    assert len(rows) == 400
    assert len({src for src, _ in rows}) == 400  # distinct, as LRA's set of trees
    for source, target in rows:
        assert isinstance(target, int) and 0 <= target <= 9
        check_expression(source, target, **kwargs)


def test_default_settings_give_lra_lengths():
    rows = generate_listops(40, seed=3)
    for source, target in rows:
        check_expression(source, target, min_length=500, max_length=2000, max_depth=10, max_args=10)
    lengths = [len(tokenize_listops(src)) for src, _ in rows]
    assert 500 < min(lengths) and max(lengths) < 2000
    assert all(op in " ".join(src for src, _ in rows) for op in OPS)


def test_operator_statistics_follow_lra():
    """Argument counts uniform on 2..max_args, operators and digits uniform (loose bounds)."""
    rows = generate_listops(300, seed=4, min_length=20, max_length=400)
    atoms = [a for src, _ in rows for a in flatten(parse_pairs(src.split(" "))[0])]
    ops = [a for a in atoms if a in OPS]
    digits = [a for a in atoms if a.isdigit()]
    for op in OPS:
        assert 0.2 < ops.count(op) / len(ops) < 0.3
    for d in "0123456789":
        assert 0.07 < digits.count(d) / len(digits) < 0.13
    # an operator with k arguments is followed by k + 1 ')' in total; count k from the text layout
    ks = []
    for src, _ in rows:
        toks = src.split(" ")
        for i, tok in enumerate(toks):
            if tok in OPS:
                j = i - 1
                while j >= 0 and toks[j] == "(":
                    j -= 1
                ks.append(i - j - 2)  # k + 1 opening parentheses precede the operator
    counts = np.bincount(ks, minlength=11)
    assert counts[:2].sum() == 0
    share = counts[2:] / counts.sum()
    assert np.all(np.abs(share - 1 / 9) < 0.04)


def test_deterministic_for_a_seed():
    a = generate_listops(30, seed=7, min_length=10, max_length=100)
    b = generate_listops(30, seed=7, min_length=10, max_length=100)
    c = generate_listops(30, seed=8, min_length=10, max_length=100)
    assert a == b
    assert a != c
    # a longer run starts with the same rows
    assert generate_listops(60, seed=7, min_length=10, max_length=100)[:30] == a


def test_exhausted_generator_stops(monkeypatch):
    """Only 4 * 10 * 10 distinct two-digit expressions exist: asking for more fails instead of looping."""
    import ssm.data.listops as listops

    monkeypatch.setattr(listops, "_MAX_IDLE_BATCHES", 3)
    assert len(generate_listops(400, seed=0, min_length=1, max_length=5, max_depth=2, max_args=2)) == 400
    with pytest.raises(RuntimeError, match="fewer than n=401 distinct"):
        generate_listops(401, seed=0, min_length=1, max_length=5, max_depth=2, max_args=2)


def test_write_and_cli(tmp_path):
    out = tmp_path / "listops"
    assert main(["--out", str(out), "--train", "12", "--val", "5", "--test", "4", "--seed", "2",
                 "--min-length", "10", "--max-length", "80"]) == 0  # fmt: skip
    sources = set()
    for split, n in (("train", 12), ("val", 5), ("test", 4)):
        raw = (out / f"basic_{split}.tsv").read_bytes()
        lines = raw.split(b"\r\n")
        assert lines[0] == b"Source\tTarget"
        assert lines[-1] == b"" and len(lines) == n + 2  # rows end with \r\n, as Python's csv writer
        for line in lines[1:-1]:
            source, target = line.decode().split("\t")
            check_expression(source, int(target), min_length=10, max_length=80, max_depth=10, max_args=10)
            sources.add(source)
    assert len(sources) == 21  # the three splits are disjoint
    # the files hold the rows of generate_listops with the same seed, cut train / val / test
    rows = generate_listops(21, seed=2, min_length=10, max_length=80)
    ds = ListOpsDataset(out, "val", append_eos=False)
    assert ds.labels.tolist() == [t for _, t in rows[12:17]]
    paths = write_listops(tmp_path / "other", train=1, val=1, test=1, seed=0, min_length=10, max_length=50)
    assert sorted(paths) == ["test", "train", "val"] and all(p.is_file() for p in paths.values())


def test_dataset_tokens_and_collate(tmp_path):
    write_listops(tmp_path, train=9, val=2, test=2, seed=5, min_length=10, max_length=60)
    rows = generate_listops(13, seed=5, min_length=10, max_length=60)
    ds = ListOpsDataset(tmp_path, "train")
    assert len(ds) == 9 and ds.vocab_size == vocab_size == len(VOCAB) == 19
    for i, (source, target) in enumerate(rows[:9]):
        x, y = ds[i]
        want = [VOCAB.index(t) for t in source.split() if t not in ("(", ")")] + [EOS_ID]
        assert x.dtype == torch.long and x.tolist() == want and y == target
    assert ds[-1][0].tolist() == ds[8][0].tolist()
    with_parens = ListOpsDataset(tmp_path / "basic_train.tsv", keep_parens=True, append_eos=False)
    assert with_parens[0][0].tolist() == [VOCAB.index(t) for t in rows[0][0].split()]
    short = ListOpsDataset(tmp_path, "train", max_length=7)
    assert all(len(short[i][0]) == 7 for i in range(len(short)))

    x, y, lengths = collate_pad([ds[i] for i in range(4)])
    assert x.shape == (4, int(lengths.max())) and x.dtype == torch.long
    assert y.tolist() == [t for _, t in rows[:4]]
    for i in range(4):
        assert x[i, : lengths[i]].tolist() == ds[i][0].tolist()
        assert (x[i, lengths[i] :] == PAD_ID).all()
    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_pad))
    assert [b[0].shape[0] for b in batches] == [4, 4, 1]


def test_tokenizer_accepts_any_whitespace_and_rejects_unknown_tokens():
    want = [VOCAB.index(t) for t in ("[SM", "1", "2", "]")]
    assert tokenize_listops("( ( ( [SM 1 ) 2 ) ] )").tolist() == want
    assert tokenize_listops("  ((  [SM\t1 ) 2 ) ] )".replace("((", "( (")).tolist() == want
    for bad in ("[SM 12 ]", "[SUM 1 ]", "[SM 1 ] x", "[ 1 ]", "SM 1", "[MAXX 1 ]", "[SM é ]", "\x0e 1"):
        with pytest.raises(ValueError, match="unknown token"):
            tokenize_listops(bad)


def write_tsv(path, rows, header="Source\tTarget"):
    path.write_text("\n".join([header, *rows]) + "\n")


def test_malformed_files_name_file_and_line(tmp_path):
    good = "( ( ( [MAX 2 ) 9 ) ] )\t9"
    cases = {
        "header": (["Source,Target"], "line 1: header"),
        "fields": ([good, "( ( [MAX 2 ) ] )\t2\textra"], "line 3: 3 tab-separated fields"),
        "target": ([good, good, "( ( ( [MAX 2 ) 9 ) ] )\t12"], "line 4: Target '12'"),
        "token": (["( ( ( [MAX 2 ) 9 ) } )\t9"], "line 2: Source has an unknown token '}'"),
    }
    for name, (rows, message) in cases.items():
        path = tmp_path / f"{name}.tsv"
        if name == "header":
            write_tsv(path, [good], header=rows[0])
        else:
            write_tsv(path, rows)
        with pytest.raises(ValueError, match=rf"{path.name}, {message}"):
            ListOpsDataset(path)
    with pytest.raises(FileNotFoundError, match="basic_test.tsv"):
        ListOpsDataset(tmp_path, "test")
    with pytest.raises(ValueError, match="unknown token"):
        evaluate_listops("( ( [MAX 1 ) x ] )")
    for bad in ("( ( [MAX 1 ) 2 )", "1 2", "] 1"):
        with pytest.raises(ValueError, match="source"):
            evaluate_listops(bad)


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        generate_listops(-1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        generate_listops(1, seed=-3)
    with pytest.raises(ValueError, match="max_length"):
        generate_listops(1, seed=0, min_length=10, max_length=11)
    with pytest.raises(ValueError, match="max_args"):
        generate_listops(1, seed=0, max_args=1)
    with pytest.raises(ValueError, match="max_depth"):
        generate_listops(1, seed=0, max_depth=1)
    with pytest.raises(ValueError, match="min_length must be < 12"):  # 2 + 10 digits is the longest tree
        generate_listops(1, seed=0, min_length=12, max_length=100, max_depth=2, max_args=10)
    assert len(generate_listops(3, seed=0, min_length=11, max_length=100, max_depth=2, max_args=10)) == 3
    with pytest.raises(ValueError, match="train"):
        write_listops(tmp_path, train=-1)
    write_tsv(tmp_path / "basic_train.tsv", ["( ( ( [MAX 2 ) 9 ) ] )\t9"])
    with pytest.raises(ValueError, match="split"):
        ListOpsDataset(tmp_path, "dev")
    with pytest.raises(ValueError, match="max_length"):
        ListOpsDataset(tmp_path, max_length=1)


# ----------------------------------------------------------------------------------------------------------
# Issue #13: every loader error is a DataError naming the file and the line


def refused(path, line: int, match: str):
    """The DataError of ``ListOpsDataset(path)``, checked to name the file and ``line``."""
    with pytest.raises(DataError, match=match) as info:
        ListOpsDataset(path)
    assert str(info.value).startswith(f"{path}, line {line}: ")
    assert info.value.path == str(path) and info.value.line == line
    return info.value


GOOD = b"( ( ( [MAX 2 ) 9 ) ] )\t9\r\n"


def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "bytes.tsv"
    path.write_bytes(b"Source\tTarget\r\n" + GOOD + b"( ( ( [MAX 2 ) \xff ) ] )\t9\r\n")
    refused(path, 3, r"byte 0xff at column 16 is not UTF-8")


def test_superscript_target_names_file_and_line(tmp_path):
    path = tmp_path / "target.tsv"
    path.write_bytes(b"Source\tTarget\r\n" + GOOD + GOOD + "( ( ( [MAX 2 ) 9 ) ] )\t\u00b2\r\n".encode())
    refused(path, 4, r"Target '\u00b2'; expected an integer 0..9")


def test_empty_file_without_header_is_refused(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_bytes(b"")
    refused(path, 1, "empty file; expected the header")
    path.write_bytes(b"Source\tTarget\r\n")  # the header alone: a split of size 0, as write_listops(val=0)
    assert len(ListOpsDataset(path)) == 0


@pytest.mark.parametrize(
    "source, reason",
    [
        ("[MAX 2 9", r"1 operator\(s\) without their closing '\]'"),
        ("( ( ( [MAX 2 ) 9 ) ] ) ]", r"a '\]' without its operator"),
        ("( ( ( [MAX 2 ) 9 ) ] ) 4", "tokens after the end of the expression"),
        ("1 2", "tokens after the end of the expression"),
        ("( [MAX ] )", "an operator without arguments"),
        ("( ( ( [MAX 2 ) 9 ) ]", r"unbalanced parentheses \(3 '\(' and 2 '\)'\)"),
        ("", "no tokens"),
    ],
)
def test_malformed_expression_names_file_and_line(tmp_path, source, reason):
    path = tmp_path / "source.tsv"
    path.write_bytes(b"Source\tTarget\r\n" + GOOD + f"{source}\t9\r\n".encode())
    refused(path, 3, f"Source is not one expression: {reason}")


def test_generated_expressions_pass_the_structure_check(tmp_path):
    write_listops(tmp_path, train=50, val=0, test=0, seed=3, min_length=1, max_length=200, workers=1)
    assert len(ListOpsDataset(tmp_path, keep_parens=True)) == len(ListOpsDataset(tmp_path)) == 50
    assert evaluate_listops("7") == 7 and len(tokenize_listops("7")) == 1  # a lone digit is an expression


# ----------------------------------------------------------------------------------------------------------
# Issue #14: parallel generation


def test_workers_write_identical_files(tmp_path, monkeypatch):
    """Batches seeded by (seed, batch index): 1 worker and 3 workers write the same bytes."""
    monkeypatch.setattr(listops_module, "_BATCH_TREES", 40)  # many batches for a small job
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_SECONDS", 0.0)  # start the workers however short the job
    args = ["--train", "30", "--val", "8", "--test", "5", "--seed", "4", "--min-length", "5",
            "--max-length", "40"]  # fmt: skip
    assert main(["--out", str(tmp_path / "one"), *args, "--gen-workers", "1"]) == 0
    assert main(["--out", str(tmp_path / "three"), *args, "--gen-workers", "3"]) == 0
    for split in ("train", "val", "test"):
        one = (tmp_path / "one" / f"basic_{split}.tsv").read_bytes()
        assert one == (tmp_path / "three" / f"basic_{split}.tsv").read_bytes()
        assert one.startswith(b"Source\tTarget\r\n") and one.count(b"\r\n") > 5
    rows = generate_listops(43, seed=4, min_length=5, max_length=40, workers=2)
    assert rows == generate_listops(43, seed=4, min_length=5, max_length=40, workers=1)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        generate_listops(3, seed=0, workers=0)
