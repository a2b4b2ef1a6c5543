"""Kernel generation cost against state size: RTF vs S4 (DPLR) vs S4D (diagonal).

    python benchmarks/rtf_speed.py          # H = 256, L = 8192, N = 16 64 256 1024 (~15 min on 2 cores)
    python benchmarks/rtf_speed.py --quick  # tiny sizes, seconds (a smoke test)

Rows, each generating the kernel K (H, L) from its parameters under ``torch.no_grad``, float32 / complex64:

    RTF          ssm.kernels.rtf_kernel: exact first L taps, 3 FFTs of length ~4L, flat in N
    RTF-aliased  the paper's Algorithm 1, one L-point division (the L-periodized kernel), for reference
    S4D          ssm.kernels.diag_kernel(disc="zoh"): one Vandermonde product, O(H N L)
    S4           ssm.kernels.dplr_kernel(disc="bilinear"): Cauchy + Woodbury at the roots of unity, O(H N L),
                 plus C~ = C (I - A^L) by dense repeated squaring, O(H N^3 log L)

N is the real state size: RTF has N denominator coefficients; S4 and S4D store N/2 complex states with
``conj_pairs=True``, as the layers store them.

Time (``benchmarks/bench_common.py``): median of --repeats calls after a warm-up call. The cheap cases (RTF,
RTF-aliased) are timed interleaved over all N (N=16, 64, ..., N=16, 64, ...), so that a change of the
load of a shared machine hits every N alike; the others one after another, with fewer calls when slow.
One thread by default (--threads): on a small shared machine thread wake-ups dominate small cases.
Peak memory: ``common.MemoryProbe`` (a separate process whose allocator returns every freed tensor; the
rise of the resident set during one call after a warm-up). A case predicted from the previous N and the
method's complexity to need more than --max-seconds per call is printed as "skipped (reason)".

Writes benchmarks/results/rtf.json and rtf.png (matplotlib imported only there).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

from ssm import kernels  # noqa: E402
from ssm.transfer import stable_denominator  # noqa: E402

METHODS = ("RTF", "RTF-aliased", "S4D", "S4")
CHEAP = ("RTF", "RTF-aliased")
# time ~ N^GROWTH[method] predicts the next case from the previous one (a lower estimate for S4, whose
# O(N^3 log L) dense term takes over from the O(N L) Cauchy sums at large N)
GROWTH = {"RTF": 0.0, "RTF-aliased": 0.0, "S4D": 1.0, "S4": 2.0}
SIZES = {"full": (256, 8192, (16, 64, 256, 1024)), "quick": (8, 256, (4, 16))}


def _rtf_aliased(b: torch.Tensor, a: torch.Tensor, L: int) -> torch.Tensor:
    den = torch.cat([torch.ones_like(a[:, :1]), a], dim=-1)
    return torch.fft.irfft(torch.fft.rfft(b, n=L) / torch.fft.rfft(den, n=L), n=L)


def build(method: str, N: int, H: int, L: int, device: str = "cpu", seed: int = 0):
    """A zero-argument callable generating the (H, L) kernel of ``method`` at state size N (no autograd)."""
    g = torch.Generator().manual_seed(seed)
    if method in CHEAP:
        b = (torch.randn(H, N + 1, generator=g) / math.sqrt(N + 1)).to(device)
        a = stable_denominator(0.3 * torch.randn(H, N, generator=g)).to(device)
        kernel = kernels.rtf_kernel if method == "RTF" else _rtf_aliased
        args = (b, a, L)
    else:
        n = N // 2
        Lambda = torch.complex(
            -0.5 * torch.ones(H, n), math.pi * torch.arange(n, dtype=torch.float32).expand(H, n)
        )
        B = torch.randn(H, n, dtype=torch.complex64, generator=g)
        C = torch.randn(H, n, dtype=torch.complex64, generator=g)
        dt = torch.exp(math.log(1e-3) + (math.log(1e-1) - math.log(1e-3)) * torch.rand(H, generator=g))
        if method == "S4":
            P = 0.5 * torch.randn(1, H, n, dtype=torch.complex64, generator=g)
            Lambda, P, B, C, dt = (t.to(device) for t in (Lambda, P, B, C, dt))

            def kernel(*_):
                return kernels.dplr_kernel(Lambda, P, B, C, dt, L, disc="bilinear", conj_pairs=True)
        else:
            Lambda, B, C, dt = (t.to(device) for t in (Lambda, B, C, dt))

            def kernel(*_):
                return kernels.diag_kernel(Lambda, B, C, dt, L, "zoh", conj_pairs=True)

        args = ()

    def run():
        with torch.no_grad():
            return kernel(*args)

    return run


def measure(args) -> list[dict]:
    H, L, Ns = args.H, args.L, sorted(args.N)
    rows = {(m, N): {"method": m, "N": N} for m in args.methods for N in Ns}
    cheap = [m for m in args.methods if m in CHEAP]
    if cheap:
        print(f"timing {', '.join(cheap)} interleaved over N ...", flush=True)
        fns = {(m, N): build(m, N, H, L, args.device) for m in cheap for N in Ns}
        times = common.timeit_many(fns, device=args.device, repeats=args.repeats)
        for key, t in times.items():
            rows[key]["time"] = t
    for m in [m for m in args.methods if m not in CHEAP]:
        prev = None
        for N in Ns:
            row = rows[(m, N)]
            if prev is not None and "skipped" in prev:
                row["skipped"] = f"N={prev['N']} was skipped"
            elif prev is not None:
                predicted = prev["time"]["warmup_s"][-1] * (N / prev["N"]) ** GROWTH[m]
                if predicted > args.max_seconds:
                    limit = f"{args.max_seconds:.0f} s (time ~ N^{GROWTH[m]:g})"
                    row["skipped"] = f"predicted {predicted:.0f} s per call > {limit}"
            if "skipped" not in row:
                print(f"timing {m} N={N} ...", flush=True)
                row["time"] = common.timeit(
                    build(m, N, H, L, args.device), device=args.device, repeats=args.repeats, max_seconds=60.0
                )
            prev = row
    if not args.no_memory:
        todo = [r for r in rows.values() if "skipped" not in r]
        print(f"peak memory of {len(todo)} cases (separate process) ...", flush=True)
        with common.MemoryProbe(
            __file__, "build", device=args.device, threads=torch.get_num_threads()
        ) as probe:
            for r in todo:
                r["memory"] = probe.measure(
                    {"method": r["method"], "N": r["N"], "H": H, "L": L, "device": args.device}
                )
    return [rows[(m, N)] for m in args.methods for N in Ns]


def _value(row: dict, what: str) -> float | None:
    if what == "time":
        return row["time"]["median_s"] if "time" in row else None
    return row.get("memory", {}).get("peak_bytes")


def table(rows: list[dict], Ns: list[int]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    get = {(r["method"], r["N"]): r for r in rows}
    out = []
    for what, fmt in (("time", common.fmt_time), ("memory", common.fmt_bytes)):
        headers = [f"{'time (median)' if what == 'time' else 'peak memory'}"] + [f"N={N}" for N in Ns]
        headers += [f"N={N} / N={Ns[0]}" for N in Ns[1:]]
        body = []
        for m in methods:
            vals = [_value(get[(m, N)], what) for N in Ns]
            cells = [
                fmt(v) if v is not None else "skipped" if "skipped" in get[(m, N)] else "-"
                for v, N in zip(vals, Ns)
            ]
            body.append([m] + cells + [common.fmt_ratio(common.ratio(v, vals[0])) for v in vals[1:]])
        out += [common.format_table(headers, body), ""]
    for r in rows:
        if "skipped" in r:
            out.append(f"{r['method']} N={r['N']}: skipped ({r['skipped']})")
        elif "error" in r.get("memory", {}):
            out.append(f"{r['method']} N={r['N']}: memory not measured ({r['memory']['error']})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="RTF vs S4 vs S4D kernel generation against N")
    common.add_common_args(parser, threads=1)
    parser.add_argument("--H", type=int, default=None, help="features (default 256, quick 8)")
    parser.add_argument("--L", type=int, default=None, help="kernel length (default 8192, quick 256)")
    parser.add_argument("--N", type=int, nargs="+", default=None, help="state sizes (default 16 64 256 1024)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--max-seconds", type=float, default=180.0, help="skip cases predicted slower per call"
    )
    args = parser.parse_args(argv)
    H, L, Ns = SIZES["quick" if args.quick else "full"]
    args.H, args.L, args.N = args.H or H, args.L or L, args.N or list(Ns)
    if args.quick:
        args.repeats = 2
    common.setup(args)
    info = common.machine_info(args.device)
    print(
        f"rtf: H={args.H} L={args.L} N={args.N}, torch {info['torch']}, {info['threads']} threads, "
        f"{info['cpu']}, load {info.get('load_avg_1m')}",
        flush=True,
    )
    rows = measure(args)
    text = table(rows, sorted(args.N))
    print()
    print(text)
    payload = {
        "benchmark": "rtf",
        "machine": info,
        "config": {
            "H": args.H,
            "L": args.L,
            "N": sorted(args.N),
            "repeats": args.repeats,
            "quick": args.quick,
            "dtype": "float32 / complex64",
            "note": "N = real state size; S4 and S4D store N/2 complex states (conj_pairs=True)",
        },
        "rows": rows,
        "table": text,
    }
    path = common.write_json(args.out / "rtf.json", payload)

    def draw(axes):
        for m in dict.fromkeys(r["method"] for r in rows):
            for ax, what, scale in ((axes[0], "time", 1e3), (axes[1], "memory", 1 / common.MiB)):
                pts = [
                    (r["N"], _value(r, what))
                    for r in rows
                    if r["method"] == m and _value(r, what) is not None
                ]
                if pts:
                    ax.plot([p[0] for p in pts], [max(p[1] * scale, 1e-3) for p in pts], "o-", label=m)
        for ax, ylabel in zip(axes, ("kernel time (ms, median)", "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("state size N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        axes[0].set_title(f"kernel generation, H={args.H}, L={args.L}, {info['threads']} thread(s)")

    png = common.save_plot(args.out / "rtf.png", draw, ncols=2, size=(5.5, 4))
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return payload


if __name__ == "__main__":
    main()
