"""Swap the attention of a Hugging Face GPT-2 for S4D, S4, Mamba or Mamba-2 and compare character-level
language models.

The corpus is offline text: this repository's LICENSE plus /usr/share/common-licenses/* when present (the
license texts of a Debian / Ubuntu system), bytes as tokens, the last 10% held out. GPT-2s of the same
shape (``--d-model`` 64, ``--layers`` 2, 4 heads, learned positions) train for ``--steps`` steps with
``ssm.optim.make_optimizer`` (AdamW; the SSM parameters get lr 1e-3 and no weight decay):

* ``attention``: the stock ``GPT2LMHeadModel``;
* ``s4d`` / ``s4``: the same model after ``ssm.integrations.hf.swap_attention(model, "s4d", d_state=64)``.
  With N = 64 an S4D layer (N/2 complex Lambda, B, C per feature, dt, D, an H x H output projection) has
  about as many parameters as GPT-2's attention (4 H^2 + 4 H); S4 adds the low-rank term P;
* ``mamba`` / ``mamba2`` (``--models attention,s4d,mamba,mamba2``): the selective layers with expand=1 and
  16 states, which also match attention's parameter count.

Then it checks, for the S4D model, that cached ``generate`` equals uncached generation token for token, and
prints the validation loss table (nats per character, and bits per character).

    python examples/hf_swap.py                       # d_model 64, 2 layers, 150 steps: a few CPU minutes
    python examples/hf_swap.py --steps 400 --d-model 128 --layers 4

``main(argv)`` returns the rows as dicts (tests/test_integrations_hf.py runs it at a tiny size).

Measured on this project's 2-core CPU with ``--models attention,s4d,s4,mamba,mamba2`` and the other defaults
(one seed; 150 steps, batch 16, 128 characters; transformers 5.25; the machine was shared with other jobs,
so the times are inflated and noisy):

    model        params  val loss  bits/char     time
    attention   124,672     2.958      4.268    13.7s
    s4d         124,544     2.750      3.967    12.1s
    s4          132,736     2.749      3.966    33.3s
    mamba       124,032     2.326      3.355   175.6s
    mamba2      121,688     2.304      3.324  2523.0s

(Mamba-2's time: its SSD chunk of 256 was then padded from the 128 characters of a sequence, and the machine
was at its busiest; a sequence shorter than a chunk now takes one chunk of its own length, and with the
recomputing SSD a training step of this Mamba-2 layer costs about what Mamba's does: 34 vs 31 ms at batch 16,
one thread, against 360 ms before.) The S4D and Mamba models' cached ``generate``
equalled uncached generation. 150 steps is early training (every model is still at the stage of character
frequencies and common words); the ranking at this budget says little about longer runs.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import training_harness as harness  # before ssm: from a checkout it makes the repository's ssm importable
import transformers

import ssm
from ssm.integrations import hf

ROOT = Path(__file__).resolve().parents[1]


def corpus() -> bytes:
    """This repository's LICENSE and the system's common licenses, concatenated."""
    files = [ROOT / "LICENSE"]
    shared = Path("/usr/share/common-licenses")
    if shared.is_dir():
        files += sorted(p for p in shared.iterdir() if p.is_file())
    return b"\n\n".join(p.read_bytes() for p in files if p.is_file())


def batches(data: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator):
    """Random windows (batch, seq_len) of a 1-D token tensor, forever."""
    while True:
        starts = torch.randint(0, len(data) - seq_len, (batch,), generator=generator)
        yield torch.stack([data[s:s + seq_len] for s in starts.tolist()])


# Parameter matching: GPT-2's attention has 4 H^2 + 4 H parameters per layer, as has S4D at N = 64; Mamba and
# Mamba-2 match it with one inner channel per feature (expand=1) and 16 states.
SELECTIVE = {"mamba": {"d_state": 16, "expand": 1}, "mamba2": {"d_state": 16, "expand": 1, "headdim": 16}}


def build(kind: str, d_model: int, n_layers: int, seq_len: int, d_state: int) -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=256, n_positions=max(seq_len, 64), n_embd=d_model,
                                     n_layer=n_layers,
                                     n_head=4, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    if kind in SELECTIVE:
        hf.swap_attention(model, kind, **SELECTIVE[kind])
    elif kind != "attention":
        hf.swap_attention(model, kind, d_state=d_state)
    return model


@torch.no_grad()
def evaluate(model, data: torch.Tensor, batch: int, seq_len: int, n_batches: int) -> float:
    model.eval()
    g = torch.Generator().manual_seed(1234)
    it = batches(data, batch, seq_len, g)
    losses = [model(x, labels=x).loss.item() for x, _ in zip(it, range(n_batches))]
    return sum(losses) / len(losses)


def run(kind: str, args, train: torch.Tensor, val: torch.Tensor) -> dict:
    torch.manual_seed(args.seed)
    model = build(kind, args.d_model, args.layers, args.seq_len, args.d_state)
    n_params = sum(p.numel() for p in model.parameters())
    opt = ssm.optim.make_optimizer(model, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                total_steps=args.steps, pct_start=0.1)
    it = batches(train, args.batch, args.seq_len, torch.Generator().manual_seed(args.seed))
    t0 = time.perf_counter()
    model.train()
    for _, x in zip(range(args.steps), it):
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    val_loss = evaluate(model, val, args.batch, args.seq_len, args.eval_batches)
    row = {"model": kind, "params": n_params, "val_loss": val_loss, "bpc": val_loss / math.log(2),
           "seconds": seconds}
    if kind in ("s4d", "mamba"):
        prompt = val[:16][None]
        kw = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": 0}
        cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
        uncached = model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **kw)
        row["cached_equals_uncached"] = bool(torch.equal(cached, uncached))
        row["sample"] = bytes(cached[0].tolist()).decode("latin-1")
    return row


KINDS = ("attention", *ssm.layers.LAYERS)


def build_parser() -> argparse.ArgumentParser:
    p = harness.ExampleParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each model")
    p.add_argument("--d-model", type=int, default=64, help="width of every GPT-2 (n_embd)")
    p.add_argument("--layers", type=int, default=2, help="GPT-2 blocks (n_layer)")
    p.add_argument("--d-state", type=int, default=64,
                   help="state size N of the s4, s4d, rtf and s5 layers (mamba, mamba2: 16, see SELECTIVE)")
    p.add_argument("--seq-len", type=int, default=128, help="characters per training and validation window")
    p.add_argument("--batch", type=int, default=16, help="windows per batch (training and validation)")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="peak lr of the one-cycle schedule (the SSM parameters peak at their own, 1e-3)")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches per model")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization and the training windows")
    p.add_argument("--models", default="attention,s4d,s4",
                   help=f"comma-separated models to train, each one of {', '.join(KINDS)}")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("steps", "d_model", "layers", "d_state", "seq_len", "batch", "eval_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0; got {args.lr}")
    if args.d_model % 4:
        p.error(f"--d-model must be a multiple of the 4 attention heads; got {args.d_model}")
    unknown = [kind for kind in args.models.split(",") if kind not in KINDS]
    if unknown:
        p.error(f"--models: {', '.join(map(repr, unknown))} not among {', '.join(KINDS)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    data = torch.tensor(list(corpus()), dtype=torch.long)
    cut = int(0.9 * len(data))
    train, val = data[:cut], data[cut:]
    print(f"corpus: {len(data):,} characters ({len(train):,} train, {len(val):,} validation)")
    rows = []
    for kind in args.models.split(","):
        rows.append(run(kind, args, train, val))
        print(f"{kind}: val loss {rows[-1]['val_loss']:.3f} after {rows[-1]['seconds']:.0f}s", flush=True)
    print(f"\n{'model':<10} {'params':>8} {'val loss':>9} {'bits/char':>10} {'time':>8}")
    for r in rows:
        print(f"{r['model']:<10} {r['params']:>8,} {r['val_loss']:>9.3f} {r['bpc']:>10.3f} "
              f"{r['seconds']:>7.1f}s")
    for r in rows:
        if "cached_equals_uncached" in r:
            print(f"\n{r['model']}: cached generate equals uncached: {r['cached_equals_uncached']}; "
                  f"sample: {r['sample']!r}")
    return rows


if __name__ == "__main__":
    harness.run_cli(main)
