"""What an S4 layer's training step costs beside S4D's: layer fwd+bwd and the kernel alone, interleaved in
one process.

    python benchmarks/s4_cost.py            # B=8, H=256, N=64, L = 1024 and 4096 (the issue's sizes)
    python benchmarks/s4_cost.py --quick    # tiny sizes, seconds

Per L, five calls run in --repeats interleaved rounds (after one warm-up round), each a forward and a
backward of a sum: the layers ``ssm.S4`` (bilinear, true C) and ``ssm.S4D`` on a (B, L, H) input, and their
kernels alone: the S4 kernel (the layer's route: on the CPU the power-series kernel, no C~), the Cauchy
method without the C~ = C (I - Ab^L) power (``c_tilde=True``: what the official S4 computes, as it trains
C~), and the S4D kernel. Reported: medians, S4 / S4D for the layers
(target <= 1.5x) and the kernels' share. Writes benchmarks/results/s4_cost.json and s4_cost.png.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

CALLS = ("S4 layer", "S4D layer", "S4 kernel", "S4 kernel, no C~ power", "S4D kernel")
TARGET = 1.5  # S4 layer fwd+bwd / S4D layer fwd+bwd


def build_calls(B: int, H: int, N: int, L: int, device: str = "cpu", seed: int = 0) -> dict:
    """Zero-argument callables, one per entry of CALLS, each a forward and a backward."""
    import ssm
    from ssm.systems import dplr

    torch.manual_seed(seed)
    s4, s4d = ssm.S4(H, d_state=N, device=device), ssm.S4D(H, d_state=N, device=device)
    x = torch.randn(B, L, H, device=device)

    def layer(m):
        return lambda: m(x).sum().backward()

    def s4_kernel_no_power():
        s = s4.discrete_system()
        K = dplr.dplr_kernel(s.Lambda, s.P, s.B, s.C_in, s.dt, L, disc="bilinear", conj_pairs=True,
                             c_tilde=True)
        K.sum().backward()

    return {"S4 layer": layer(s4), "S4D layer": layer(s4d),
            "S4 kernel": lambda: s4.kernel(L).sum().backward(), "S4 kernel, no C~ power": s4_kernel_no_power,
            "S4D kernel": lambda: s4d.kernel(L).sum().backward()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="S4 beside S4D: layer and kernel fwd+bwd")
    common.add_common_args(parser, threads=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--H", type=int, default=256)
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--L", type=int, nargs="+", default=[1024, 4096])
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.H, args.N, args.L, args.repeats = 2, 8, 8, [64], 2
    common.setup(args)
    info = common.machine_info(args.device)
    load = os.getloadavg()
    print(f"S4 beside S4D: B={args.batch} H={args.H} N={args.N}  torch {info['torch']}, "
          f"{info['threads']} threads, load {load[0]:.1f}")
    rows = []
    for L in args.L:
        calls = build_calls(args.batch, args.H, args.N, L, args.device)
        res = common.timeit_many(calls, device=args.device, warmup=1, repeats=args.repeats)
        s4d = res["S4D layer"]["median_s"]
        for c in CALLS:
            rows.append({"L": L, "call": c, **res[c],
                         "ratio_to_S4D_layer": common.ratio(res[c]["median_s"], s4d)})
    table = common.format_table(["L", "call", "fwd+bwd", "/ S4D layer"], [
        [r["L"], r["call"], common.fmt_time(r["median_s"]), common.fmt_ratio(r["ratio_to_S4D_layer"])]
        for r in rows])
    verdicts = []
    for L in args.L:
        r = next(r for r in rows if r["L"] == L and r["call"] == "S4 layer")["ratio_to_S4D_layer"]
        verdicts.append({"L": L, "S4_over_S4D": r, "target": TARGET, "pass": r is not None and r <= TARGET})
    lines = "\n".join(f"L={v['L']}: S4 / S4D {common.fmt_ratio(v['S4_over_S4D'])} (target <= {TARGET}x) "
                      f"{'PASS' if v['pass'] else 'MISS'}" for v in verdicts)
    print(f"\nfwd+bwd (median of {args.repeats} interleaved rounds)\n{table}\n{lines}")
    payload = {"benchmark": "s4_cost", "machine": info, "loadavg": list(load) + list(os.getloadavg()),
               "config": {k: getattr(args, k) for k in ("batch", "H", "N", "L", "repeats", "quick")},
               "rows": rows, "verdicts": verdicts, "table": table}
    path = common.write_json(args.out / "s4_cost.json", payload)

    def draw(ax):
        for c in CALLS:
            ax.plot(args.L, [r["median_s"] for r in rows if r["call"] == c], marker="o", label=c)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("L")
        ax.set_ylabel("seconds, fwd+bwd (median)")
        ax.legend()

    common.save_plot(args.out / "s4_cost.png", draw)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
