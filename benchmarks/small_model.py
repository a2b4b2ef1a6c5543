"""Training step of a small model: S4 (true C), S4 with ``c_tilde_length`` (C~ trained at the length, as
the official S4) and S4D, interleaved in one process.

    python benchmarks/small_model.py            # H=64, L=196, batch 50, 4 blocks, one thread
    python benchmarks/small_model.py --quick    # tiny sizes, seconds

A step is zero_grad, forward, cross-entropy, backward and an AdamW step of ``ssm.SSMModel`` (mean pooling,
10 classes) on a fixed random batch. Reported: the median over --repeats interleaved rounds and the ratio
to plain S4. Writes benchmarks/results/small_model.json and small_model.png.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

VARIANTS = ("S4", "S4 c_tilde", "S4D")


def build_train_step(variant: str, B: int, H: int, L: int, N: int, layers: int, d_input: int = 4,
                     seed: int = 0):
    """A zero-argument callable running one training step of ``variant``."""
    import ssm

    torch.manual_seed(seed)
    kw = {"c_tilde_length": L} if variant == "S4 c_tilde" else {}
    model = ssm.SSMModel(d_input, 10, d_model=H, n_layers=layers, layer="s4d" if variant == "S4D" else "s4",
                         d_state=N, pool="mean", layer_kwargs=kw)
    return common.classifier_train_step(model, B, L, d_input)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="training step of a small model: S4, S4 with C~, S4D")
    common.add_common_args(parser, threads=1)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--H", type=int, default=64)
    parser.add_argument("--L", type=int, default=196)
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.H, args.L, args.N, args.layers, args.repeats = 2, 8, 16, 8, 1, 2
    common.setup(args)
    info = common.machine_info(args.device)
    load = os.getloadavg()
    print(f"small model: B={args.batch} H={args.H} L={args.L} N={args.N} layers={args.layers}  "
          f"torch {info['torch']}, {info['threads']} threads, load {load[0]:.1f}")
    fns = {v: build_train_step(v, args.batch, args.H, args.L, args.N, args.layers) for v in VARIANTS}
    res = common.timeit_many(fns, device=args.device, warmup=1, repeats=args.repeats)
    rows = [{"variant": v, **res[v], "ratio_to_S4": common.ratio(res[v]["median_s"], res["S4"]["median_s"])}
            for v in VARIANTS]
    table = common.format_table(["variant", "step", "/S4"], [
        [r["variant"], common.fmt_time(r["median_s"]), common.fmt_ratio(r["ratio_to_S4"])] for r in rows])
    print(f"\ntraining step (median of {args.repeats} interleaved rounds)\n{table}")
    payload = {"benchmark": "small_model", "machine": info, "loadavg": list(load) + list(os.getloadavg()),
               "config": {k: getattr(args, k) for k in ("batch", "H", "L", "N", "layers", "repeats",
                                                        "quick")},
               "rows": rows, "table": table}
    path = common.write_json(args.out / "small_model.json", payload)

    def draw(ax):
        ax.bar([r["variant"] for r in rows], [r["median_s"] for r in rows])
        ax.set_ylabel("seconds per training step (median)")

    common.save_plot(args.out / "small_model.png", draw)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
