"""Every layer under torch.compile with the default backend (inductor, C++ on the CPU), dynamic lengths.

    python benchmarks/inductor_sweep.py            # every layer, dynamic=True, lengths 48 37 130
    python benchmarks/inductor_sweep.py --quick    # S4D only, two lengths

For each layer (eval mode, no autograd) the compiled forward is compared with eager at every length; the
table gives the compile-and-run time and the largest relative difference, or the error. S5 was the open
case (inductor's fake tensors refused its strided in-place complex scan in PyTorch 2.13); under compile its
scan now runs as the FFT route ``ssm.systems.s5.scan_conv``. The suite keeps the op-level regression test,
the S4D case and S5 with dynamic=True (tests/test_compile_inductor.py); this sweep takes about ten minutes of
compiling on a 2-core CPU. Writes benchmarks/results/inductor_sweep.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

CASES = {
    "s4-bilinear": lambda ssm: ssm.S4(4, 4),
    "s4-zoh": lambda ssm: ssm.S4(4, 4, disc="zoh"),
    "s4d": lambda ssm: ssm.S4D(4, 4),
    "s4d-zoh": lambda ssm: ssm.S4D(4, 4, disc="zoh"),
    "rtf": lambda ssm: ssm.RTF(4, 4),
    "s5": lambda ssm: ssm.S5(4, 4),
    "mamba": lambda ssm: ssm.Mamba(4, d_state=4),
    "mamba2": lambda ssm: ssm.Mamba2(8, d_state=4, headdim=4),
}


def run_case(name: str, lengths: list[int], dynamic) -> dict:
    import ssm

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = CASES[name](ssm).eval()
    compiled = torch.compile(layer, dynamic=dynamic)
    t0 = time.perf_counter()
    worst = 0.0
    try:
        with torch.no_grad():
            for L in lengths:
                x = torch.randn(2, L, layer.d_model)
                ref = layer(x)
                worst = max(worst, float((compiled(x) - ref).norm() / ref.norm()))
    except Exception as err:  # noqa: BLE001 - the sweep reports every failure and goes on
        first = str(err).splitlines()[0][:200] if str(err) else ""
        return {"layer": name, "ok": False, "error": f"{type(err).__name__}: {first}",
                "seconds": time.perf_counter() - t0}
    return {"layer": name, "ok": worst < 1e-4, "rel_err": worst, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="every layer under torch.compile (inductor), dynamic L")
    common.add_common_args(parser)
    parser.add_argument("--layers", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[48, 37, 130])
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.lengths = ["s4d"], [48, 37]
    common.setup(args)
    info = common.machine_info(args.device)
    rows = [run_case(name, args.lengths, True) for name in args.layers]
    table = common.format_table(["layer", "ok", "rel err", "seconds", "error"],
                                [[r["layer"], r["ok"], f"{r.get('rel_err', float('nan')):.1e}",
                                  f"{r['seconds']:.1f}", r.get("error", "")] for r in rows])
    print(f"inductor, dynamic=True, lengths {args.lengths}\n{table}")
    payload = {"benchmark": "inductor_sweep", "machine": info, "config": {"lengths": args.lengths},
               "rows": rows, "table": table}
    path = common.write_json(args.out / "inductor_sweep.json", payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
