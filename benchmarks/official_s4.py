"""This library against the official state-spaces/s4 code: a small model's training step and the per-token
step, interleaved in one process.

    python benchmarks/official_s4.py --official DIR                # both parts
    python benchmarks/official_s4.py --official DIR --part step    # one part: train or step
    python benchmarks/official_s4.py --official DIR --quick        # tiny sizes, seconds

DIR is a scratch folder holding a snapshot of the official standalone ``s4.py`` (state-spaces/s4,
``models/s4/s4.py``) and whatever it imports that is not installed: it needs einops, scipy and
``pytorch_lightning.utilities.rank_zero_only``, for which a shim package (``pytorch_lightning/__init__.py``
empty, ``utilities.py`` defining ``rank_zero_only(f): return f``) beside it is enough. Nothing of the
official code is part of this repository: the script puts DIR first on ``sys.path`` while it imports
``DIR/s4.py`` and takes it off again afterwards.

Parts (``--part train|step|all``):

* train: one training step (zero_grad, forward, cross-entropy, backward, AdamW step) of a small model on a
  fixed random batch, H = 64, L = 196, batch 50, 4 pre-norm residual blocks, N = 64, GLU output, mean
  pooling, 10 classes, one thread by default. Official: ``S4Block(mode="dplr")`` (S4) and
  ``S4Block(mode="diag")`` (S4D) in the same model frame as ``ssm.SSMModel`` (linear encoder, LayerNorm
  before each block, final LayerNorm, mean, linear decoder). ssm: ``SSMModel`` with S4, S4 with
  ``c_tilde_length=L`` (the official's own parametrization: C~ trained at a fixed length) and S4D. The
  five run in --repeats interleaved rounds after one warm-up round; reported: the median step and the
  ratios ssm S4 / official S4, ssm S4 c_tilde / official S4, ssm S4D / official S4D, target <= 0.8x.
* step: time per token of the recurrent step in eval mode under ``torch.no_grad`` (--tokens steps per
  timed call from a warmed state), H = 256, N = 64, B = 1 and 16, GLU output, one thread by default:
  official S4 with ``setup_step(mode="dense")`` against ``ssm.S4``, official S4D (``setup_step()``)
  against ``ssm.S4D``; interleaved rounds; reported: the median time per token and ssm / official,
  target <= 1.0x.

--quick shrinks every size (and --repeats to 2) so that both parts run in seconds; its verdicts mean
nothing, it only checks that everything runs.

Options: --batch --H --L --N --layers (train sizes; --N is the state size of both parts), --step-H,
--step-batch, --tokens (step sizes), and the shared --quick --out --threads --device --repeats.
Writes benchmarks/results/official_s4.json and official_s4.png.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

TRAIN_VARIANTS = ("official S4", "official S4D", "ssm S4", "ssm S4 c_tilde", "ssm S4D")
# (ssm variant, official variant, target of ssm / official)
TRAIN_PAIRS = (("ssm S4", "official S4", 0.8), ("ssm S4 c_tilde", "official S4", 0.8),
               ("ssm S4D", "official S4D", 0.8))
STEP_PAIRS = (("ssm S4", "official S4 dense", 1.0), ("ssm S4D", "official S4D diag", 1.0))


# ---- the official code ------------------------------------------------------------------------------------
def load_official(folder: Path):
    """``folder/s4.py`` as a module (not registered in ``sys.modules``).

    ``folder`` is first on ``sys.path`` while s4.py is imported (it imports what lies beside it, such as a
    ``pytorch_lightning`` shim); afterwards ``sys.path`` is restored and the modules imported from
    ``folder`` leave ``sys.modules``, so nothing of the snapshot stands in for an installed package later.
    """
    folder = folder.resolve()
    path = folder / "s4.py"
    saved_path, before = list(sys.path), set(sys.modules)
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location("s4", path)
        module = importlib.util.module_from_spec(spec)
        with warnings.catch_warnings():  # the snapshot's own invalid escapes in docstrings, not ours
            warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
            spec.loader.exec_module(module)
    except Exception as err:  # a missing dependency of the snapshot: say which, in one line
        needs = "einops, scipy and pytorch_lightning.utilities.rank_zero_only: see the docstring"
        raise SystemExit(f"official_s4.py: cannot import {path}: {type(err).__name__}: {err} "
                         f"(it needs {needs})") from None
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None)
            if file and Path(file).resolve().is_relative_to(folder):
                del sys.modules[name]
    return module


class OfficialModel(nn.Module):
    """The frame of ``ssm.SSMModel`` (encoder, pre-norm residual blocks, final norm, mean pooling, decoder)
    around official ``S4Block``s."""

    def __init__(self, official, mode: str, d_input: int, d_output: int, H: int, L: int, N: int,
                 layers: int) -> None:
        super().__init__()
        self.enc = nn.Linear(d_input, H)
        self.blocks = nn.ModuleList(official.S4Block(H, d_state=N, l_max=L, mode=mode, transposed=False,
                                                     final_act="glu") for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(H) for _ in range(layers))
        self.norm, self.dec = nn.LayerNorm(H), nn.Linear(H, d_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)
        for block, norm in zip(self.blocks, self.norms):
            h = h + block(norm(h))[0]
        return self.dec(self.norm(h).mean(1))


def comparison(ours: str, theirs: str, target: float, ours_s: float, theirs_s: float, **extra) -> dict:
    """One ratio ssm / official against its target (PASS when at or below it)."""
    r = common.ratio(ours_s, theirs_s)
    return {"ssm": ours, "official": theirs, **extra, "ssm_s": ours_s, "official_s": theirs_s, "ratio": r,
            "target": target, "pass": r is not None and r <= target}


def comparison_table(comparisons: list[dict], extra: tuple[str, ...] = ()) -> str:
    """The comparisons as a table: official and ssm medians, their ratio, the target, PASS or MISS."""
    headers = ["comparison", *extra, "official", "ssm", "ssm/official", "target", "verdict"]
    return common.format_table(headers, [
        [f"{q['ssm']} / {q['official']}", *(q[k] for k in extra), common.fmt_time(q["official_s"]),
         common.fmt_time(q["ssm_s"]), common.fmt_ratio(q["ratio"]), f"<= {q['target']:.1f}x",
         "PASS" if q["pass"] else "MISS"] for q in comparisons], left=1)


# ---- part 1: training step --------------------------------------------------------------------------------
def build_train_step(official, variant: str, B: int, H: int, L: int, N: int, layers: int, d_input: int = 4,
                     device: str = "cpu", seed: int = 0):
    """A zero-argument callable running one training step of ``variant`` (one of TRAIN_VARIANTS)."""
    import ssm

    torch.manual_seed(seed)
    if variant.startswith("official"):
        model = OfficialModel(official, "diag" if variant == "official S4D" else "dplr", d_input, 10, H, L, N,
                              layers)
    else:
        kw = {"glu": True, **({"c_tilde_length": L} if variant == "ssm S4 c_tilde" else {})}
        model = ssm.SSMModel(d_input, 10, d_model=H, n_layers=layers, layer="s4d" if variant == "ssm S4D"
                             else "s4", d_state=N, pool="mean", layer_kwargs=kw)
    return common.classifier_train_step(model.to(device), B, L, d_input, device=device)


def run_train(official, args) -> dict:
    print(f"\ntrain: B={args.batch} H={args.H} L={args.L} N={args.N} layers={args.layers} GLU", flush=True)
    fns = {v: build_train_step(official, v, args.batch, args.H, args.L, args.N, args.layers,
                               device=args.device) for v in TRAIN_VARIANTS}
    res = common.timeit_many(fns, device=args.device, warmup=1, repeats=args.repeats)
    rows = [{"variant": v, **res[v]} for v in TRAIN_VARIANTS]
    ratios = [comparison(ours, theirs, target, res[ours]["median_s"], res[theirs]["median_s"])
              for ours, theirs, target in TRAIN_PAIRS]
    table = comparison_table(ratios)
    print(f"\ntraining step (median of {args.repeats} interleaved rounds)\n{table}")
    return {"rows": rows, "ratios": ratios, "table": table}


# ---- part 2: step latency ---------------------------------------------------------------------------------
def build_stepper(official, variant: str, B: int, H: int, N: int, tokens: int, device: str = "cpu",
                  seed: int = 0):
    """A zero-argument callable taking ``tokens`` steps of ``variant`` (eval, no grad) from a warmed state."""
    import ssm

    torch.manual_seed(seed)
    if variant.startswith("official"):
        dplr = variant == "official S4 dense"
        layer = official.S4Block(H, d_state=N, mode="dplr" if dplr else "diag", transposed=False,
                                 final_act="glu").to(device).eval()
        layer.setup_step(**({"mode": "dense"} if dplr else {}))
    else:
        layer = getattr(ssm, variant.split()[1])(H, N, glu=True).to(device).eval()
    xs = torch.randn(tokens, B, H, device=device)
    return common.warmed_stepper(layer, xs, layer.default_state(B, device=device))[0]


def run_step(official, args) -> dict:
    print(f"\nstep: H={args.step_H} N={args.N} B={args.step_batch} tokens={args.tokens} GLU", flush=True)
    variants = [v for pair in STEP_PAIRS for v in pair[1::-1]]  # official first, then ssm, per pair
    rows, ratios = [], []
    for B in args.step_batch:
        fns = {v: build_stepper(official, v, B, args.step_H, args.N, args.tokens, device=args.device)
               for v in variants}
        res = common.timeit_many(fns, device=args.device, warmup=1, repeats=args.repeats)
        per_token = {}
        for v in variants:
            rec = {k: [s / args.tokens for s in res[v][k]] for k in ("samples_s", "warmup_s")}
            rec["median_s"], rec["min_s"] = res[v]["median_s"] / args.tokens, res[v]["min_s"] / args.tokens
            per_token[v] = rec
            rows.append({"variant": v, "B": B, **rec})
        ratios += [comparison(ours, theirs, target, per_token[ours]["median_s"],
                              per_token[theirs]["median_s"], B=B) for ours, theirs, target in STEP_PAIRS]
    table = comparison_table(ratios, ("B",))
    print(f"\ntime per token (median of {args.repeats} interleaved rounds)\n{table}")
    return {"rows": rows, "ratios": ratios, "table": table}


# ---- main -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="this library against the official state-spaces/s4 code: "
                                                 "training step of a small model, time per token of step")
    common.add_common_args(parser, threads=1)
    parser.add_argument("--official", type=Path, required=True,
                        help="scratch folder holding the official s4.py (state-spaces/s4 models/s4/s4.py)")
    parser.add_argument("--part", choices=("train", "step", "all"), default="all")
    parser.add_argument("--batch", type=int, default=50, help="train: batch size")
    parser.add_argument("--H", type=int, default=64, help="train: model width")
    parser.add_argument("--L", type=int, default=196, help="train: sequence length")
    parser.add_argument("--N", type=int, default=64, help="state size (both parts)")
    parser.add_argument("--layers", type=int, default=4, help="train: blocks")
    parser.add_argument("--step-H", type=int, default=256, help="step: model width")
    parser.add_argument("--step-batch", type=int, nargs="+", default=[1, 16], help="step: batch sizes")
    parser.add_argument("--tokens", type=int, default=32, help="step: steps per timed call")
    args = parser.parse_args(argv)
    if not (args.official / "s4.py").is_file():
        parser.error(f"--official {args.official}: no s4.py there (a snapshot of state-spaces/s4's "
                     "models/s4/s4.py, kept in a scratch folder)")
    if args.quick:
        args.batch, args.H, args.L, args.N, args.layers = 2, 8, 16, 8, 1
        args.step_H, args.step_batch, args.tokens, args.repeats = 16, [1, 2], 4, 2
    common.setup(args)
    official = load_official(args.official)
    source = (args.official / "s4.py").resolve()
    info = common.machine_info(args.device)
    load = os.getloadavg()
    print(f"official s4: {source}  torch {info['torch']}, {info['threads']} threads, load {load[0]:.1f}")
    train = run_train(official, args) if args.part in ("train", "all") else None
    step = run_step(official, args) if args.part in ("step", "all") else None
    tables = {name: part["table"] for name, part in (("train", train), ("step", step)) if part}
    payload = {"benchmark": "official_s4", "machine": info, "loadavg": list(load) + list(os.getloadavg()),
               "official": {"path": str(source), "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                            "modes": {"S4": "dplr, step: setup_step(mode='dense')",
                                      "S4D": "diag, step: setup_step()"}},
               "config": {"part": args.part, "repeats": args.repeats, "quick": args.quick,
                          "threads": args.threads, "device": args.device,
                          "train": {k: getattr(args, k) for k in ("batch", "H", "L", "N", "layers")},
                          "step": {"H": args.step_H, "N": args.N, "batch": args.step_batch,
                                   "tokens": args.tokens}},
               "train": train, "step": step, "tables": tables}
    path = common.write_json(args.out / "official_s4.json", payload)

    parts = [(name, part) for name, part in (("train", train), ("step", step)) if part]

    def draw(axes):
        axes = axes if isinstance(axes, list) else [axes]
        for ax, (name, part) in zip(axes, parts):
            if name == "train":
                ax.bar(list(TRAIN_VARIANTS), [r["median_s"] for r in part["rows"]],
                       color=["tab:gray" if v.startswith("official") else "tab:blue" for v in TRAIN_VARIANTS])
                ax.set_ylabel("seconds per training step (median)")
                ax.tick_params(axis="x", labelsize=7, labelrotation=20)
                ax.set_title("training step")
            else:
                labels = [f"{r['variant']}\nB={r['B']}" for r in part["rows"]]
                ax.bar(range(len(labels)), [r["median_s"] for r in part["rows"]],
                       color=["tab:gray" if r["variant"].startswith("official") else "tab:blue"
                              for r in part["rows"]])
                ax.set_xticks(range(len(labels)), labels, fontsize=6)
                ax.set_ylabel("seconds per token (median)")
                ax.set_title("step")

    common.save_plot(args.out / "official_s4.png", draw, ncols=len(parts), size=(7, 4))
    print(f"wrote {path} and {args.out / 'official_s4.png'}")
    return payload


if __name__ == "__main__":
    main()
