"""The examples' command lines: every flag has a help text that shows its default; configuration errors are
one line (exit status 2) from rank 0 only; lra.py's --pool does what its help says."""

from __future__ import annotations

import argparse
import importlib

import fashion_mnist
import lra
import pytest
import streaming_inference
import torch
import training_harness as harness
import transformer_dropin

TINY_LISTOPS = [
    "--task", "listops", "--gen-train", "24", "--gen-val", "8", "--gen-test", "16", "--gen-min-length", "10",
    "--gen-max-length", "60", "--d-model", "8", "--n-layers", "1", "--d-state", "4", "--epochs", "1",
    "--no-progress", "--device", "cpu",
]


def _harness_parser() -> argparse.ArgumentParser:
    parser = harness.ExampleParser()
    harness.add_run_args(parser, "runs/x")
    return harness.add_config_args(parser)


def _hf_swap_parser() -> argparse.ArgumentParser:
    pytest.importorskip("transformers")
    return importlib.import_module("hf_swap").build_parser()


PARSERS = {
    "training_harness": _harness_parser,
    "lra": lra.build_parser,
    "fashion_mnist": fashion_mnist.build_parser,
    "hf_swap": _hf_swap_parser,
    "transformer_dropin": transformer_dropin.build_parser,
    "streaming_inference": streaming_inference.build_parser,
}


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_flag_has_help_and_shows_its_default(script):
    parser = PARSERS[script]()
    formatter = parser._get_formatter()
    flags = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert flags
    for action in flags:
        name = action.option_strings[0]
        assert action.help and action.help is not argparse.SUPPRESS, f"{script} {name}: no help"
        text = formatter._expand_help(action)  # the help as --help prints it
        if action.required:
            continue
        assert "default" in text.lower(), f"{script} {name}: the default is not shown: {text!r}"
        assert "default: None" not in text, f"{script} {name}: say what None means: {text!r}"
        if action.default not in (None, argparse.SUPPRESS):
            assert str(action.default) in text, f"{script} {name}: {action.default!r} not in {text!r}"
    parser.format_help()  # every help string formats


def test_lra_pool_help_describes_every_choice_and_each_builds():
    parser = lra.build_parser()
    pool = next(a for a in parser._actions if a.dest == "pool")
    assert set(pool.choices) == {"mean", "last", "first"}
    text = parser._get_formatter()._expand_help(pool)
    assert all(choice in text for choice in pool.choices) and "bidirectional" in text
    x, lengths = torch.randint(1, 10, (2, 7)), torch.tensor([7, 4])
    for choice in pool.choices:
        cfg = harness.Config(d_model=8, n_layers=1, d_state=4, pool=choice, device="cpu")
        model = lra.build_classifier(cfg, 10, 3, embedding=True, bidirectional=True)
        assert model(x, lengths=lengths).shape == (2, 3), choice
    with pytest.raises(ValueError, match="bidirectional"):
        lra.build_classifier(harness.Config(pool="first"), 10, 3, embedding=True, bidirectional=False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--task", "listops", "--pool", "none"])


def _exit(capsys, fn, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        fn(*args)
    captured = capsys.readouterr()
    return info.value.code, captured.err


def test_config_errors_are_one_line_from_rank_0(tmp_path, capsys, monkeypatch):
    def main(argv):
        raise harness.ConfigError("batch_size 3 must be divisible\nby 2")

    monkeypatch.setenv("RANK", "0")
    assert _exit(capsys, harness.run_cli, main) == (2, "error: batch_size 3 must be divisible by 2\n")
    code, err = _exit(capsys, lra.build_parser().parse_args, ["--task", "nope"])
    assert code == 2 and err.startswith("error: argument --task: invalid choice") and err.count("\n") == 1
    monkeypatch.setenv("RANK", "1")  # the other ranks of a torchrun job exit with the same status, silently
    assert _exit(capsys, harness.run_cli, main) == (2, "")
    assert _exit(capsys, lra.build_parser().parse_args, ["--task", "nope"]) == (2, "")


def test_scripts_report_bad_combinations_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tiny = [*TINY_LISTOPS, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]
    try:
        argv = [*tiny, "--batch-size", "3", "--accumulate", "2"]
        code, err = _exit(capsys, harness.run_cli, lra.main, argv)
        assert code == 2 and err.count("\n") == 1
        assert err.startswith("error: batch_size 3 (the global batch) must be divisible by world_size *")
        bad = [
            (lra.main, [*tiny, "--no-bidirectional"]),  # the preset's pool "first" needs bidirectional layers
            (lra.main, [*tiny, "--lr", "0"]),
            (lra.main, [*tiny, "--device", "tpu"]),
            (fashion_mnist.main, ["--dropout", "1.5"]),
            (transformer_dropin.main, ["--seq-len", "4", "--delay", "8"]),
            (streaming_inference.main, ["--chunk", "0"]),
        ]
        for main, args in bad:
            code, err = _exit(capsys, harness.run_cli, main, args)
            assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err)
    finally:
        torch.set_num_threads(threads)
    # an error of the run, not of the configuration: status 1, one line
    code, err = _exit(capsys, harness.run_cli, fashion_mnist.main, ["--data", str(tmp_path / "nowhere")])
    assert code == 1 and err.startswith("error: ") and "apt-get install" in err and err.count("\n") == 1
