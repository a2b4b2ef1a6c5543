"""How fast, and in how much memory, are the S4 and S4D kernels generated on this CPU, per backend?

Cases: H = 256 features, N = 64 states stored as 32 conjugate pairs (``conj_pairs=True``, as the layers call
the kernels), rank 1, complex64 parameters (float32 kernels), L in 1024 / 4096 / 16384:

- ``s4``      ``dplr_kernel(disc="bilinear")``: Cauchy products + Woodbury at the roots of unity with
              ``naive`` / ``chunked``; with ``auto`` on the CPU the power-series method (no Cauchy products),
- ``s4d``     ``diag_kernel(disc="zoh")``: one Vandermonde product,
- ``s4-zoh``  ``dplr_kernel(disc="zoh")``: dense matrix exponential + blocked Krylov (no backend),

each with the backends ``naive``, ``chunked`` and ``auto`` of ``ssm.ops`` (the printout names what ``auto``
resolved to), for the forward pass alone (``torch.no_grad``, as at inference) and for forward + backward
(gradient of sum(K^2) w.r.t. all parameters, as in training).

Time: wall clock (``time.perf_counter``), median of ``--repeats`` runs after one warm-up run, torch's default
number of threads.

Peak memory: every (case, backend, L) runs in a fresh subprocess. tracemalloc does not see torch's
allocations and there are no allocator statistics on CPU, so the script asks the kernel of the OS: just
before the first run it reads the current resident set size (``/proc/self/statm``, after imports and input
creation), and after the forward runs and again after the forward+backward runs it reads the peak resident
set size (``ru_maxrss``, a high-water mark over the life of the process). Peak minus the starting RSS is the
extra memory the step needed at its worst moment. When a step never rose above an earlier high-water mark
(import time, or the forward pass before the backward), the number is only an upper bound and is printed
with "<=". The naive backend is skipped where its estimated need (a few (H, N, L) complex temporaries)
exceeds ``--naive-max-gib``.

Usage (from the repository root; a few minutes on 2 cores):

    python benchmarks/kernel_speed.py                 # table, benchmarks/results/kernels.json and .png
    python benchmarks/kernel_speed.py --L 1024 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H, N_HALF, RANK = 256, 32, 1
KERNELS = ("s4", "s4d", "s4-zoh")
BACKENDS = ("naive", "chunked", "auto")
GIB = 2**30


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def _naive_temp_bytes(kernel: str, L: int) -> int:
    """Bytes of one (W, N, L) complex64 temporary that the naive backend materializes."""
    if kernel == "s4":
        return H * 2 * N_HALF * (L // 2 + 1) * 8  # Cauchy over both halves at the L//2 + 1 frequencies
    return H * N_HALF * L * 8  # Vandermonde over the half at L powers


def _resolved(kernel: str, backend: str, L: int) -> str:
    import torch

    from ssm.ops.backends import resolve_backend
    from ssm.systems.dplr import resolve_method

    if kernel == "s4-zoh":
        return "dense"
    if kernel == "s4" and resolve_method("auto", disc="bilinear", conj_pairs=True, rank=1, c_tilde=False, L=L,
                                         backend=backend, device=torch.device("cpu")) == "series":
        return "series"
    op = "cauchy" if kernel == "s4" else "vandermonde"
    return resolve_backend(op, backend, torch.device("cpu"), nbytes=_naive_temp_bytes(kernel, L))


def run_case(kernel: str, backend: str, L: int, repeats: int) -> dict:
    """Time and measure one case in this process (called in a fresh subprocess)."""
    import torch

    from ssm.kernels import diag_kernel, dplr_kernel

    torch.manual_seed(0)
    n = torch.arange(N_HALF, dtype=torch.float32)
    params = {
        "Lambda": torch.complex(-0.5 * torch.ones(H, N_HALF), torch.pi * n.expand(H, N_HALF)),
        "P": 0.3 * torch.randn(RANK, H, N_HALF, dtype=torch.complex64),
        "B": torch.randn(H, N_HALF, dtype=torch.complex64),
        "C": torch.randn(H, N_HALF, dtype=torch.complex64),
        "dt": torch.exp(torch.empty(H).uniform_(-7.0, -2.0)),
    }
    params = {k: v.requires_grad_() for k, v in params.items()}

    def forward():
        p = params
        if kernel == "s4":
            return dplr_kernel(p["Lambda"], p["P"], p["B"], p["C"], p["dt"], L, disc="bilinear",
                               conj_pairs=True, backend=backend)
        if kernel == "s4-zoh":
            return dplr_kernel(p["Lambda"], p["P"], p["B"], p["C"], p["dt"], L, disc="zoh",
                               conj_pairs=True, backend=backend)
        return diag_kernel(p["Lambda"], p["B"], p["C"], p["dt"], L, disc="zoh", conj_pairs=True,
                           backend=backend)

    def forward_backward():
        K = forward()
        K.square().sum().backward()
        for v in params.values():
            v.grad = None

    result = {}
    base = _rss_bytes()
    def forward_only():
        with torch.no_grad():
            forward()

    for mode, fn in (("fwd", forward_only), ("fwd+bwd", forward_backward)):
        before = _peak_rss_bytes()
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            fn()
            if i:  # the first run is the warm-up
                times.append(time.perf_counter() - t0)
        peak = _peak_rss_bytes()
        result[mode] = {
            "time_s": statistics.median(times),
            "times_s": times,
            "peak_bytes": peak - base,
            "upper_bound": peak <= before,
        }
    return result


def _spawn(kernel: str, backend: str, L: int, repeats: int) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    cmd = [sys.executable, __file__, "--case", kernel, backend, str(L), "--repeats", str(repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_mem(entry: dict) -> str:
    return ("<=" if entry["upper_bound"] else "") + f"{entry['peak_bytes'] / 2**20:.0f}"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"fwd": "-", "fwd+bwd": "--"}
    colors = {}
    for row in rows:
        if row.get("skipped"):
            continue
        key = f"{row['kernel']} {row['backend']}"
        colors.setdefault(key, f"C{len(colors)}")
    for key, color in colors.items():
        kernel, backend = key.split(" ")
        sel = [r for r in rows if r["kernel"] == kernel and r["backend"] == backend and not r.get("skipped")]
        sel.sort(key=lambda r: r["L"])
        for mode, ls in styles.items():
            Ls = [r["L"] for r in sel]
            axes[0].plot(Ls, [r[mode]["time_s"] for r in sel], ls, color=color, marker="o",
                         label=f"{key} {mode}")
            mib = [max(r[mode]["peak_bytes"], 1) / 2**20 for r in sel]
            axes[1].plot(Ls, mib, ls, color=color, marker="o")
    for ax, label in zip(axes, ["time (s, median)", "peak extra RSS (MiB)"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Kernel generation on CPU: H={H}, N={2 * N_HALF} (conjugate pairs), float32; "
                 "solid: forward, dashed: forward + backward")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--L", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (default 3)")
    parser.add_argument("--naive-max-gib", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--case", nargs=3, metavar=("KERNEL", "BACKEND", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        kernel, backend, L = args.case
        print(json.dumps(run_case(kernel, backend, int(L), args.repeats)))
        return

    import torch

    rows = []
    load_before = os.getloadavg()
    header = (f"{'kernel':<7} {'backend':<18} {'L':>6} | {'fwd s':>8} {'fwd MiB':>9} | "
              f"{'f+b s':>8} {'f+b MiB':>9}")
    print(header)
    print("-" * len(header))
    for kernel in args.kernels:
        backends = ("-",) if kernel == "s4-zoh" else BACKENDS
        for backend in backends:
            for L in args.L:
                resolved = _resolved(kernel, "auto" if backend == "-" else backend, L)
                label = backend if backend in ("naive", "chunked") else f"{backend} ({resolved})"
                row = {"kernel": kernel, "backend": backend, "resolved": resolved, "L": L}
                need = 5 * _naive_temp_bytes(kernel, L)
                if resolved == "naive" and need > args.naive_max_gib * GIB:
                    row.update(skipped=True, needs_bytes=need)
                    print(f"{kernel:<7} {label:<18} {L:>6} | skipped (needs {need / GIB:.1f} GiB)")
                    rows.append(row)
                    continue
                row.update(_spawn(kernel, "auto" if backend == "-" else backend, L, args.repeats))
                rows.append(row)
                f, fb = row["fwd"], row["fwd+bwd"]
                print(f"{kernel:<7} {label:<18} {L:>6} | {f['time_s']:8.3f} {_fmt_mem(f):>9} | "
                      f"{fb['time_s']:8.3f} {_fmt_mem(fb):>9}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "H": H, "N": 2 * N_HALF, "N_stored": N_HALF, "rank": RANK, "dtype": "complex64 -> float32",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "memory_method": "ru_maxrss high-water mark minus /proc/self/statm RSS before the first run, "
                         "one subprocess per (kernel, backend, L)",
    }
    with open(args.out / "kernels.json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    try:
        _plot(rows, args.out / "kernels.png")
        print(f"wrote {args.out / 'kernels.json'} and {args.out / 'kernels.png'}")
    except ImportError:
        print(f"wrote {args.out / 'kernels.json'} (matplotlib not installed: no PNG)")


if __name__ == "__main__":
    main()
