"""Train an S4, S4D or RTF classifier on sequential Fashion-MNIST: each image is read pixel by pixel.

A 28 x 28 image is a sequence of 784 steps with one feature; the model sees the whole sequence and
classifies it (10 classes). The data are the original IDX files, by default from the Debian package
``dataset-fashion-mnist`` (``sudo apt-get install dataset-fashion-mnist``, installed under
/usr/share/datasets/fashion-mnist); ``--data DIR`` reads them from elsewhere (MNIST and KMNIST work too).

    python examples/fashion_mnist.py --model s4d --config quick
    python examples/fashion_mnist.py --model s4 --config full --out runs/fmnist-s4-full
    python examples/fashion_mnist.py --model rtf --config quick --epochs 2 --lr 5e-3 --permuted
    torchrun --nproc_per_node=2 examples/fashion_mnist.py --config full --precision bf16   # 2 GPUs, DDP

Run from a checkout without installing (the script falls back to the repository's ``ssm``), or after
``pip install -e .[examples]`` (adds tqdm and matplotlib for the progress bar and curves.png).

Outputs in ``--out`` (default runs/fashion_mnist/<model>-<config>): metrics.jsonl, last.pt, best.pt,
curves.png, summary.json. Running the same command again resumes from last.pt (``--no-resume`` restarts).
``torchrun``, ``--accumulate``, ``--precision``, ``--compile`` and ``--checkpoint-every`` work as in lra.py
(see training_harness.py); under torchrun rank 0 alone prints and writes.

Configs:
    quick: a CPU run (2 cores, about 15 minutes) meant to reach >= 80% test accuracy on the full
        10,000-image test set: a small, shallow S4D model, one pass over 48,000 training images (the
        sequences stay 784 pixels long: no downsampling), 2,000 validation images.
    full: GPU settings in the spirit of the S4 paper's sequential-image (sMNIST/sCIFAR) runs: wider and
        deeper, dropout, 100 epochs.
    s5: quick with S5 layers (``--model s5`` on quick is the same run).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import torch
import training_harness as harness  # before ssm: from a checkout it makes the repository's ssm importable
from torch.utils.data import Subset
from training_harness import Config

from ssm._checks import check_int
from ssm.data.mnist import DEFAULT_ROOT, SequentialMNIST

PRESETS: dict[str, Config] = {
    "quick": Config(
        model="s4d",
        d_model=64,
        n_layers=2,
        d_state=64,
        dropout=0.0,
        norm="layer",
        prenorm=True,
        pool="mean",
        lr=1e-2,
        lr_ssm=1e-3,
        weight_decay=0.01,
        epochs=1,
        batch_size=64,
        warmup=100,
        scheduler="cosine",
        grad_clip=0.0,
    ),
    "full": Config(
        model="s4",
        d_model=256,
        n_layers=6,
        d_state=64,
        dropout=0.1,
        norm="layer",
        prenorm=True,
        pool="mean",
        lr=1e-2,
        lr_ssm=1e-3,
        weight_decay=0.05,
        epochs=100,
        batch_size=64,
        warmup=1000,
        scheduler="cosine",
        grad_clip=0.0,
        num_workers=2,
    ),
}
# s5: the quick budget with an S5 model (P = 64 latent states shared by the 64 features, one block); the
# S5 paper has no Fashion-MNIST setting, its LRA ones are examples/lra.py --config s5.
PRESETS["s5"] = replace(PRESETS["quick"], model="s5")
# Data options per preset (not Config fields); --train-subset / --val-size override them.
PRESET_DATA: dict[str, dict[str, Any]] = {
    "s5": {"train_subset": 48000, "val_size": 2000},
    "quick": {"train_subset": 48000, "val_size": 2000},
    "full": {"train_subset": None, "val_size": 5000},
}


def build_parser() -> argparse.ArgumentParser:
    parser = harness.ExampleParser(
        description="Sequential Fashion-MNIST (784 steps, 1 feature) with an S4, S4D or RTF classifier.",
    )
    parser.add_argument("--config", choices=sorted(PRESETS), default="quick", help="preset")
    parser.add_argument("--data", default=DEFAULT_ROOT, help="directory of the four MNIST-format IDX files")
    parser.add_argument("--permuted", action="store_true", help="permuted variant: one fixed pixel order")
    parser.add_argument("--permutation-seed", type=int, default=0, help="seed of the pixel order")
    parser.add_argument(
        "--val-size",
        type=int,
        default=None,
        help="training images held out for validation (default: the preset's, 2000 for quick and s5, 5000 "
        "for full)",
    )
    parser.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="train on this many of the remaining images, a seeded choice (0: all; default: the preset's, "
        "48000 for quick and s5, all for full)",
    )
    parser.add_argument(
        "--test-subset",
        type=int,
        default=None,
        help="evaluate on this many test images, for smoke tests (default: none, all 10000)",
    )
    harness.add_run_args(parser, default_out="runs/fashion_mnist/<model>-<config>")
    title = "training configuration: overrides of the --config preset (defaults shown: quick)"
    harness.add_config_args(parser, PRESETS["quick"], title=title)
    return parser


def _subset(dataset, n: int | None, seed: int, name: str):
    if n is None:
        return dataset
    check_int(name, n, minimum=1)
    if n >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(dataset, keep.tolist())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default ``sys.argv[1:]``), train, and return the summary dict of ``harness.train``."""
    args = build_parser().parse_args(argv)
    cfg = harness.config_from_args(args, PRESETS[args.config])
    with harness.distributed(cfg.device) as d:  # under torchrun: join the process group (else nothing)
        return _run(args, cfg, d)


def _run(args: argparse.Namespace, cfg: Config, d: harness.DistInfo) -> dict[str, Any]:
    with harness.config_errors():  # a bad option or value: one line, exit status 2
        out = args.out
        if out == "runs/fashion_mnist/<model>-<config>":
            out = f"runs/fashion_mnist/{cfg.model}-{args.config}{'-permuted' if args.permuted else ''}"
        harness.check_out_dir(out)
        preset = PRESET_DATA[args.config]
        train_subset = preset["train_subset"] if args.train_subset is None else (args.train_subset or None)
        val_size = preset["val_size"] if args.val_size is None else args.val_size

        data_kwargs = {
            "permuted": args.permuted, "permutation_seed": args.permutation_seed, "val_size": val_size
        }
        train_ds = SequentialMNIST(args.data, "train", **data_kwargs)
        train_ds = _subset(train_ds, train_subset, cfg.seed, "train_subset")
        val_ds = SequentialMNIST(args.data, "val", **data_kwargs) if val_size > 0 else None
        test_ds = SequentialMNIST(args.data, "test", **data_kwargs)
        test_ds = _subset(test_ds, args.test_subset, cfg.seed, "test_subset")

        harness.seed_everything(cfg.seed)
        model = harness.build_model(cfg, SequentialMNIST.d_input, SequentialMNIST.num_classes)
    if d.main:
        print(
            f"sequential Fashion-MNIST{' (permuted)' if args.permuted else ''}: train {len(train_ds)}, "
            f"val {len(val_ds) if val_ds is not None else 0}, test {len(test_ds)}; model {cfg.model} "
            f"d_model {cfg.d_model} x {cfg.n_layers} layers, N {cfg.d_state}: "
            f"{harness.count_parameters(model):,} parameters; device {harness.resolve_device(cfg.device)}; "
            f"out {out}",
            flush=True,
        )
    return harness.train(
        model, train_ds, val_ds, test_ds, cfg, out, resume=args.resume, stop_after_steps=args.stop_after_steps
    )


if __name__ == "__main__":
    # a configuration error (exit status 2), no data, --out naming a file, a damaged checkpoint, divergence
    # (status 1): one line from rank 0, no traceback
    harness.run_cli(main)
