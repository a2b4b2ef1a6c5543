"""Shared helpers of the benchmark scripts: timing, peak memory, tables, JSON and PNG output, machine info.

Timing (``timeit``): ``time.perf_counter`` around each call, CUDA synchronized before and after, one or more
warm-up calls first (FFT plans, lazy initialization, caches), then the median of the timed calls. A case
whose warm-up is slow gets fewer repeats so that it stays within ``max_seconds``.

Peak memory:

* CUDA (``cuda_peak_bytes``): ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  what was allocated before the call: the tensors the call itself holds at its peak (outputs, autograd
  buffers, temporaries), not the caching allocator's reserve.
* CPU (``MemoryProbe``): the cases run one after another in a separate worker process (timings stay in the
  main process, with the default allocator), started with glibc told to serve each
  allocation above 64 KiB by its own mmap and to trim the heap at once (``MALLOC_MMAP_THRESHOLD_``,
  ``MALLOC_TRIM_THRESHOLD_``), so freed tensors leave the resident set and a new tensor always adds to it.
  The worker builds the case (parameters, inputs), calls it once as a warm-up, then resets the kernel's
  high-water mark (``/proc/self/clear_refs``), reads the resident size, calls the case again and reads the
  high-water mark (``VmHWM``). The difference is the memory the call adds at its peak, the way a user sees
  it: its outputs, everything autograd keeps, the temporaries and the backward's gradients; parameters
  and inputs are in the baseline. It counts touched pages, so it is exact to a page per allocation and
  includes torch's small bookkeeping (a few MB at most). Where ``clear_refs`` cannot be written, the
  worker falls back to ``ru_maxrss`` after the call minus the resident size before it (an upper bound of
  the same quantity: it also sees the build's peak) and says so.

Scripts call ``add_common_args`` for the shared options (--quick, --out, --threads, --device, --repeats),
write results with ``write_json`` and plots with ``save_plot`` (matplotlib is imported only there).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if importlib.util.find_spec("ssm") is None and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

import torch  # noqa: E402

RESULTS = HERE / "results"
GiB = 2**30
MiB = 2**20

# Environment of the memory workers: every allocation above 64 KiB is its own mmap, freed memory is
# returned at once (see the module docstring).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_TOP_PAD_": "0"}


# ---- machine ----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform's answer elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers depend on: torch and Python versions, threads, CPU model and count, GPU, load."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


# ---- timing -----------------------------------------------------------------------------------------------
def sync(device: str | torch.device = "cpu") -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timeit(
    fn: Callable[[], Any],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    max_seconds: float = 60.0,
) -> dict[str, Any]:
    """Median wall time of ``fn()`` after ``warmup`` calls.

    The number of timed calls is ``repeats``, reduced (to at least one) when the last warm-up call says
    they would take more than ``max_seconds``.

    Returns:
        {"median_s", "min_s", "samples_s", "warmup_s"}.
    """
    warm = []
    for _ in range(max(1, warmup)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        warm.append(time.perf_counter() - t0)
    n = max(1, min(repeats, int(max_seconds / max(warm[-1], 1e-9))))
    samples = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "samples_s": samples,
        "warmup_s": warm,
    }


def timeit_many(
    fns: dict[str, Callable[[], Any]],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = 5,
) -> dict[str, dict[str, Any]]:
    """``timeit`` for several callables, interleaved (A B A B ...) so that a change of the machine's load
    during the measurement hits all of them alike; for ratios measured in one process."""
    warm: dict[str, list[float]] = {k: [] for k in fns}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for store, n in ((warm, max(1, warmup)), (samples, max(1, repeats))):
        for _ in range(n):
            for name, fn in fns.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                store[name].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(samples[k]), "min_s": min(samples[k]), "samples_s": samples[k],
                "warmup_s": warm[k]} for k in fns}


def classifier_train_step(model: torch.nn.Module, B: int, L: int, d_input: int, classes: int = 10,
                          device: str = "cpu") -> Callable[[], None]:
    """A zero-argument callable running one training step of ``model`` (B, L, d_input) -> (B, classes):
    zero_grad, cross-entropy on a fixed random batch, backward, an AdamW step (lr 1e-3)."""
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x, t = torch.randn(B, L, d_input, device=device), torch.randint(0, classes, (B,), device=device)

    def run():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), t).backward()
        opt.step()
    return run


def warmed_stepper(net: Any, xs: torch.Tensor, state: Any) -> tuple[Callable[[], Any], dict]:
    """A zero-argument callable stepping ``net`` (``y, state = net.step(x, state)``) through the tokens
    xs (T, B, H) under ``torch.no_grad``, carrying the state from call to call, after up to 4 warm-up steps
    from ``state``; returns it with the box whose ``"state"`` is the carried state."""
    box = {"state": state}
    with torch.no_grad():
        for i in range(min(xs.shape[0], 4)):
            _, box["state"] = net.step(xs[i], box["state"])

    def run():
        with torch.no_grad():
            state = box["state"]
            for x in xs:
                y, state = net.step(x, state)
            box["state"] = state
        return y
    return run, box


def backward_fn(module_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], None]:
    """A closure running forward and backward of ``module_fn().sum()``, clearing gradients first."""

    def run() -> None:
        for p in params:
            p.grad = None
        module_fn().sum().backward()

    return run


def profile_table(fn: Callable[[], Any], *, device: str | torch.device = "cpu", row_limit: int = 15,
                  calls: int = 1) -> tuple[str, list[dict]]:
    """torch.profiler table of ``fn`` (``calls`` calls after one warm-up), sorted by self CPU time.

    Returns:
        (the printed table, the top rows as dicts: name, calls, self and total CPU time in seconds).
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=row_limit, max_name_column_width=40)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:row_limit]
    rows = [{"name": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6 / calls,
             "cpu_total_s": e.cpu_time_total / 1e6 / calls} for e in top]
    return table, rows


# ---- peak memory ------------------------------------------------------------------------------------------
def cuda_peak_bytes(fn: Callable[[], Any], device: str | torch.device) -> int:
    """Bytes allocated by ``fn()`` on a CUDA device at its peak, above what was allocated before."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    if m is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(m.group(1))


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_bytes(fn: Callable[[], Any]) -> tuple[int, str]:
    """(bytes the call adds to the resident set at its peak, method used); see the module docstring.

    Honest only in a process started with ``MEMORY_ENV`` (``measure_memory`` does that).
    """
    gc.collect()
    reset = _reset_hwm()
    base_kb = _status_kb("VmRSS")
    out = fn()
    if reset:
        peak_kb, method = _status_kb("VmHWM"), "VmHWM after clear_refs"
    else:
        peak_kb, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss (upper bound)"
    del out
    return max(0, peak_kb - base_kb) * 1024, method


def _load_script(path: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _measure_case(build: Callable, case: dict) -> dict:
    fn = None
    try:
        fn = build(**case)
        fn()  # warm-up: FFT plans, lazy initialization
        t0 = time.perf_counter()
        peak, method = cpu_peak_bytes(fn)
        return {"peak_bytes": peak, "method": method, "worker_seconds": time.perf_counter() - t0}
    except (RuntimeError, MemoryError) as err:  # out of memory and the like: report it, keep going
        return {"error": f"{type(err).__name__}: {str(err)[:200]}"}
    finally:
        del fn
        gc.collect()


class MemoryProbe:
    """Peak memory of cases ``script.builder(**case)`` (each returning a zero-argument callable).

    CPU: the cases run one after another in a fresh worker process started with ``MEMORY_ENV`` (the
    allocator returns every freed tensor, so cases do not lend each other memory); a worker that dies (out
    of memory) is replaced for the next case. CUDA: in this process, ``cuda_peak_bytes``. Use as a context
    manager; ``measure(case)`` returns {"peak_bytes", "method", "worker_seconds"} or {"error"}
    (``worker_seconds``: the wall time of the measured call, one sample, allocator set for measuring).
    """

    def __init__(self, script: str | Path, builder: str, *, device: str = "cpu", threads: int | None = None):
        self.script, self.builder = str(Path(script).resolve()), builder
        self.device, self.threads = str(device), threads or torch.get_num_threads()
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, **MEMORY_ENV)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", self.script, self.builder,
               str(self.threads)]
        self.stderr = tempfile.TemporaryFile(mode="w+")
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                text=True, env=env)

    def measure(self, case: dict) -> dict:
        if torch.device(self.device).type == "cuda":
            build = getattr(_load_script(self.script), self.builder)
            fn = build(**case)
            fn()
            peak = cuda_peak_bytes(fn, self.device)
            out = {"peak_bytes": peak, "method": "torch.cuda.max_memory_allocated"}
            del fn
            torch.cuda.empty_cache()
            return out
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            err = (self.stderr.read().strip().splitlines() or [f"exit code {self.proc.returncode}"])[-1]
            self.proc = None
            return {"error": f"worker died: {err[:200]}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.proc = None

    def __enter__(self) -> MemoryProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_memory(script: str | Path, builder: str, cases: list[dict], *, device: str = "cpu",
                   threads: int | None = None) -> list[dict]:
    """``MemoryProbe.measure`` for each case, in one worker."""
    with MemoryProbe(script, builder, device=device, threads=threads) as probe:
        return [probe.measure(case) for case in cases]


# ---- output -----------------------------------------------------------------------------------------------
def fmt_time(seconds: float | None) -> str:
    """Seconds in the most readable unit (us, ms, s)."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def fmt_bytes(n: float | None) -> str:
    """Bytes in KiB, MiB or GiB."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def format_table(headers: list[str], rows: list[list[Any]], *, left: int = 1) -> str:
    """A plain-text table: the first ``left`` columns left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` (with NaN as null) as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(payload), indent=2) + "\n")
    return path


def save_plot(
    path: Path, draw: Callable[[Any], None], *, ncols: int = 1, size: tuple = (6, 4)
) -> Path | None:
    """Draw with ``draw(axes)`` on a 1 x ncols figure and save it as PNG; None if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot written")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(size[0] * ncols, size[1]), squeeze=False)
    draw(list(axes[0]) if ncols > 1 else axes[0][0])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def style_axes(
    ax, *, xlabel: str, ylabel: str, title: str = "", logx: bool = True, logy: bool = True
) -> None:
    """Log-log axes (x in powers of two) with labels, grid, and a legend when something is labelled."""
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def add_common_args(
    parser: argparse.ArgumentParser, *, threads: int | None = None
) -> argparse.ArgumentParser:
    """--quick, --out, --threads, --device, --repeats, --no-memory."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test), seconds in total")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG")
    parser.add_argument("--threads", type=int, default=threads,
                        help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median reported)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    return parser


def setup(args: argparse.Namespace) -> None:
    """Apply --threads and check --device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but CUDA is not available")


def _worker_main(script: str, builder: str, threads: int) -> None:
    torch.set_num_threads(threads)
    build = getattr(_load_script(script), builder)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_measure_case(build, json.loads(line))), flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--memory-worker"]:
    _worker_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
