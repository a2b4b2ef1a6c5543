"""Time per token of the recurrent step: layers (S4, S4D, RTF, Mamba, Mamba-2) and a 4-block SSMModel, at
B = 1 and 16, this tree against a baseline tree (an older checkout of the package), interleaved.

    python benchmarks/step_latency.py                          # this tree only
    python benchmarks/step_latency.py --baseline /tmp/ssm_main # A/B: `git archive main | tar -x -C DIR`
    python benchmarks/step_latency.py --quick                  # tiny sizes, seconds

Each tree runs in its own worker process (``--worker``, with the tree first on ``sys.path``), so both
import their own ``ssm``; the parent sends the cases round-robin (tree A case 1, tree B case 1, ...) for
--repeats rounds, so a change of the machine's load hits both alike. A case is --tokens consecutive steps
in eval mode under ``torch.no_grad`` from a warmed state (one thread by default: a token's work is a few
dozen small ops); reported: the median over the rounds of the mean time per token, and new/baseline.
Writes benchmarks/results/step_latency.json and step_latency.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

MODELS = ("S4", "S4D", "RTF", "Mamba", "Mamba2", "model-S4")
ROOT = Path(__file__).resolve().parents[1]


def build_stepper(model: str, B: int, H: int, N: int, tokens: int, seed: int = 0):
    """A zero-argument callable taking ``tokens`` steps of ``model`` (eval, no grad) from a warmed state."""
    import ssm

    torch.manual_seed(seed)
    if model == "model-S4":
        net = ssm.SSMModel(H, H, d_model=H, n_layers=4, layer="s4", d_state=N, pool="none").eval()
    elif model in ("Mamba", "Mamba2"):
        net = getattr(ssm, model)(H, **({"headdim": 16} if model == "Mamba2" else {})).eval()
    else:
        net = getattr(ssm, model)(H, N).eval()
    xs = torch.randn(tokens, B, H)
    return common.warmed_stepper(net, xs, net.default_state(B))[0]


def _worker(threads: int) -> None:
    torch.set_num_threads(threads)
    built: dict = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        case = json.loads(line)
        key = json.dumps(case, sort_keys=True)
        try:
            if key not in built:
                built[key] = build_stepper(case["model"], case["B"], case["H"], case["N"], case["tokens"])
                built[key]()  # warm-up
            t0 = time.perf_counter()
            built[key]()
            out = {"s": (time.perf_counter() - t0) / case["tokens"]}
        except Exception as e:  # a baseline without this model: report, go on
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)


class Tree:
    """A worker process importing ``ssm`` from ``root``."""

    def __init__(self, name: str, root: Path, threads: int) -> None:
        self.name = name
        env = dict(os.environ, PYTHONPATH=str(root))
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                      "--threads", str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=str(root))

    def time(self, case: dict) -> float | None:
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        return out.get("s")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="time per token of step, this tree against a baseline")
    common.add_common_args(parser, threads=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", type=Path, default=None, help="root of an older tree (holding ssm/)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--H", type=int, default=256)
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32, help="steps per timed call")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.threads or 1)
        return {}
    if args.quick:
        args.batch, args.H, args.N, args.tokens, args.repeats = [1, 2], 16, 8, 4, 2
    common.setup(args)
    info = common.machine_info(args.device)
    load = os.getloadavg()
    print(f"step latency: H={args.H} N={args.N} B={args.batch} tokens={args.tokens} repeats={args.repeats}  "
          f"torch {info['torch']}, {args.threads} threads, load {load[0]:.1f}")
    trees = [Tree("new", ROOT, args.threads or 1)]
    if args.baseline is not None:
        trees.append(Tree("baseline", args.baseline.resolve(), args.threads or 1))
    cases = [{"model": m, "B": b, "H": args.H, "N": args.N, "tokens": args.tokens}
             for m in args.models for b in args.batch]
    samples = {(t.name, i): [] for t in trees for i in range(len(cases))}
    try:
        for _ in range(max(1, args.repeats)):
            for i, case in enumerate(cases):
                for tree in trees:
                    s = tree.time(case)
                    if s is not None:
                        samples[(tree.name, i)].append(s)
    finally:
        for tree in trees:
            tree.close()
    rows = []
    for i, case in enumerate(cases):
        row = dict(case)
        for tree in trees:
            got = samples[(tree.name, i)]
            row[f"{tree.name}_s"] = statistics.median(got) if got else None
            row[f"{tree.name}_samples_s"] = got
        row["ratio"] = common.ratio(row.get("new_s"), row.get("baseline_s"))
        rows.append(row)
    headers = ["model", "B", "new"] + (["baseline", "new/baseline"] if args.baseline else [])
    table = common.format_table(headers, [
        [r["model"], r["B"], common.fmt_time(r["new_s"])]
        + ([common.fmt_time(r["baseline_s"]), common.fmt_ratio(r["ratio"])] if args.baseline else [])
        for r in rows])
    print(f"\ntime per token (median of {args.repeats} interleaved rounds)\n{table}")
    payload = {"benchmark": "step_latency", "machine": info, "loadavg": list(load) + list(os.getloadavg()),
               "config": {"H": args.H, "N": args.N, "batch": args.batch, "tokens": args.tokens,
                          "repeats": args.repeats, "threads": args.threads, "quick": args.quick,
                          "baseline": str(args.baseline) if args.baseline else None},
               "rows": rows, "table": table}
    path = common.write_json(args.out / "step_latency.json", payload)

    def draw(ax):
        labels = [f"{r['model']}\nB={r['B']}" for r in rows]
        pos = range(len(rows))
        for k, tree in enumerate(trees):
            vals = [r[f"{tree.name}_s"] or 0.0 for r in rows]
            ax.bar([p + 0.4 * k for p in pos], vals, width=0.4, label=tree.name)
        ax.set_xticks([p + 0.2 for p in pos], labels, fontsize=6)
        ax.set_ylabel("seconds per token (median)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)

    common.save_plot(args.out / "step_latency.png", draw, size=(10, 4))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
