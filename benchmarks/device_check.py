"""One script for a person with a CUDA machine: does ssm work and how fast is it there? (< 8 minutes)

    python benchmarks/device_check.py           # on a CUDA machine: writes results/device_check.json
    python benchmarks/device_check.py --smoke   # anywhere: the CPU-able parts at toy sizes (tests use it)

Four parts, each timed and recorded in one JSON (``--out``/device_check.json) and printed as a table:

1. the CUDA test cases: ``pytest -k cuda`` (the ``device`` fixture's CUDA parameter and every test named
   for CUDA), in a subprocess with a time limit; the pass/fail/skip counts;
2. the Cauchy backends side by side (``ssm.ops.cauchy.cauchy(..., backend=...)``: chunked torch, naive,
   Triton) at the S4 LRA sizes (H and L of each task's S4 config, N = 64 as 32 conjugate pairs,
   bidirectional, the four Woodbury terms), forward + backward: median time and peak memory;
   and the S4 kernel by ``dplr_kernel``'s method (power series, Cauchy) at the same sizes, forward + backward;
3. a layer forward + backward table: S4, S4D, RTF at B = 16, H = 256, L = 1024 and 4096, float32 and bf16;
4. 200 training steps of ``examples/lra.py --task listops --config s4 --precision bf16`` (generated data,
   10,000 training expressions), in a subprocess: tokens per second and peak memory from its metrics.jsonl.

Without CUDA (and without ``--smoke``) it prints that there is nothing to check and exits with status 0:
not an error, so that scripts and the smoke test can run it anywhere. ``--smoke`` (or
``SSM_DEVICE_CHECK_SMOKE=1``) runs parts 2 to 4 on the CPU at toy sizes and skips part 1 (the suite runs
the CPU tests anyway); the numbers mean nothing then, only that the script still works.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_common as common
import torch

ROOT = common.ROOT
# (task, H, L) of the S4 LRA configs (examples/lra.py S4_PRESETS; L: the task's sequence length)
LRA_SIZES = [("listops", 128, 2048), ("text", 256, 4096), ("retrieval", 256, 4000), ("image", 512, 1024),
             ("pathfinder", 256, 1024), ("pathx", 256, 16384)]
SMOKE_SIZES = [("toy", 4, 64)]
BACKENDS = ("chunked", "naive", "triton")


def _error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def cuda_tests(timeout: float) -> dict[str, Any]:
    """``pytest -q -k cuda`` in a subprocess; its counts, return code and the tail of its output."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", str(ROOT / "tests")]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s", "seconds": timeout}
    tail = done.stdout.strip().splitlines()[-1:] or [""]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail[0])}
    return {"status": "ok" if done.returncode == 0 else f"exit {done.returncode}", "counts": counts,
            "summary": tail[0], "seconds": time.perf_counter() - t0, "tail": done.stdout[-2000:]}


def cauchy_rows(sizes, device: str, repeats: int) -> list[dict[str, Any]]:
    """Forward + backward of each Cauchy backend at each size: median time and peak memory (CUDA)."""
    from ssm.ops.cauchy import cauchy

    rows = []
    for task, H, L in sizes:
        W, N = 4 * 2 * H, 32  # Woodbury terms x (bidirectional) channels x H; N = 64 as 32 conjugate pairs
        g = torch.Generator().manual_seed(0)
        v = torch.randn(W, N, dtype=torch.complex64, generator=g).to(device).requires_grad_()
        w = torch.complex(-0.5 * torch.ones(W, N), torch.randn(W, N, generator=g) * 10).to(device)
        w.requires_grad_()
        z = torch.exp(2j * torch.pi * torch.arange(L // 2 + 1) / L).to(torch.complex64).to(device)
        for backend in BACKENDS:
            row: dict[str, Any] = {"task": task, "H": H, "L": L, "W": W, "N": N, "backend": backend}

            def run(backend=backend, v=v, z=z, w=w):
                out = cauchy(v, z, w, backend=backend)
                out.real.sum().backward()
                v.grad = w.grad = None

            try:
                row.update(common.timeit(run, device=device, repeats=repeats, max_seconds=20))
                if device == "cuda":
                    row["peak_bytes"] = common.cuda_peak_bytes(run, device)
            except Exception as err:  # a missing backend (no Triton), out of memory: recorded, not fatal
                row["error"] = _error(err)
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
    return rows


def kernel_rows(sizes, device: str, repeats: int) -> list[dict[str, Any]]:
    """The S4 kernel (``dplr_kernel``) by method, forward + backward at each size: the power series against
    the Cauchy method (``backend="auto"``), the figures for choosing what ``method="auto"`` takes on this
    device (measured on the CPU only so far, where it takes the series)."""
    import ssm
    from ssm.kernels import dplr_kernel

    rows = []
    for task, H, L in sizes:
        layer = ssm.S4(H, d_state=64).to(device)
        for method in ("series", "cauchy"):
            row: dict[str, Any] = {"task": task, "H": H, "L": L, "method": method}

            def run(layer=layer, method=method, L=L):
                s = layer.discrete_system()
                K = dplr_kernel(s.Lambda, s.P, s.B, s.C, s.dt, L, disc="bilinear", conj_pairs=True,
                                method=method)
                K.square().sum().backward()
                layer.zero_grad(set_to_none=True)

            try:
                row.update(common.timeit(run, device=device, repeats=repeats, max_seconds=20))
                if device == "cuda":
                    row["peak_bytes"] = common.cuda_peak_bytes(run, device)
            except Exception as err:  # out of memory: recorded, not fatal
                row["error"] = _error(err)
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
    return rows


def layer_rows(device: str, sizes, repeats: int) -> list[dict[str, Any]]:
    """S4, S4D, RTF forward + backward at (B, H, L) in float32 and under bf16 autocast."""
    import ssm

    rows = []
    for B, H, L in sizes:
        x = torch.randn(B, L, H, device=device)
        for name in ("S4", "S4D", "RTF"):
            layer = getattr(ssm, name)(H, d_state=64).to(device)
            for precision in ("32", "bf16"):
                row: dict[str, Any] = {"layer": name, "B": B, "H": H, "L": L, "precision": precision}

                def run(layer=layer, precision=precision, x=x):
                    bf16 = precision == "bf16"
                    with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
                        y = layer(x)
                    y.float().square().mean().backward()
                    layer.zero_grad(set_to_none=True)

                try:
                    row.update(common.timeit(run, device=device, repeats=repeats, max_seconds=20))
                    if device == "cuda":
                        row["peak_bytes"] = common.cuda_peak_bytes(run, device)
                except Exception as err:
                    row["error"] = _error(err)
                rows.append(row)
    return rows


def training(smoke: bool, timeout: float) -> dict[str, Any]:
    """``examples/lra.py`` for 200 bf16 steps of the S4 ListOps config (toy sizes on the CPU with smoke)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        args = ["--task", "listops", "--config", "s4", "--precision", "bf16", "--epochs", "1",
                "--no-progress", "--cache-dir", str(Path(tmp) / "cache"), "--out", str(out),
                "--max-eval-steps", "2"]
        if smoke:
            args += ["--device", "cpu", "--gen-train", "16", "--gen-val", "8", "--gen-test", "8",
                     "--gen-min-length", "10", "--gen-max-length", "60", "--d-model", "8",
                     "--n-layers", "1", "--d-state", "4", "--batch-size", "4", "--max-steps-per-epoch", "3",
                     "--gen-workers", "1"]
        else:
            args += ["--gen-train", "10000", "--gen-val", "500", "--gen-test", "500",
                     "--max-steps-per-epoch", "200"]
        cmd = [sys.executable, str(ROOT / "examples" / "lra.py"), *args]
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": f"timed out after {timeout:.0f} s", "command": " ".join(cmd[1:])}
        result: dict[str, Any] = {
            "status": "ok" if done.returncode == 0 else f"exit {done.returncode}",
            "command": " ".join(["python", *cmd[1:]]),
            "seconds": time.perf_counter() - t0,
        }
        if done.returncode != 0:
            result["tail"] = (done.stdout + done.stderr)[-2000:]
            return result
        record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        summary = json.loads((out / "summary.json").read_text())
        keys = ("step", "train_loss", "tokens", "tokens_per_s", "peak_mem_bytes", "peak_mem_kind",
                "epoch_time_s")
        result.update({k: record[k] for k in keys})
        result.update(device=summary["device"], precision=summary["precision"])
        return result


def _fmt_row(r: dict[str, Any], keys: list[str]) -> list[Any]:
    cells = [r.get(k) for k in keys]
    if "error" in r:
        return [*cells, r["error"][:60], ""]
    peak = common.fmt_bytes(r["peak_bytes"]) if "peak_bytes" in r else "-"
    return [*cells, common.fmt_time(r["median_s"]), peak]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes, no pytest")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="folder for device_check.json")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median reported)")
    parser.add_argument("--skip-tests", action="store_true", help="skip part 1 (pytest -k cuda)")
    args = parser.parse_args(argv)
    args.smoke = args.smoke or os.environ.get("SSM_DEVICE_CHECK_SMOKE") == "1"
    if not torch.cuda.is_available() and not args.smoke:
        print("device_check: CUDA is not available on this machine, so there is nothing to check here "
              "(exit status 0). Run it on a CUDA machine, or pass --smoke for the CPU smoke run.")
        return 0
    device = "cpu" if args.smoke else "cuda"
    repeats = 1 if args.smoke else args.repeats
    t0 = time.perf_counter()
    report: dict[str, Any] = {"machine": common.machine_info(device), "smoke": args.smoke}
    print(f"device_check on {device} ({'smoke: toy sizes' if args.smoke else 'full'})", flush=True)
    if args.smoke or args.skip_tests:
        report["cuda_tests"] = {"status": "skipped"}
    else:
        report["cuda_tests"] = cuda_tests(timeout=240)
    tests = report["cuda_tests"]
    print(f"1. pytest -k cuda: {tests.get('summary', tests['status'])}", flush=True)

    report["cauchy"] = cauchy_rows(SMOKE_SIZES if args.smoke else LRA_SIZES, device, repeats)
    print("\n2. Cauchy backends, forward + backward\n" + common.format_table(
        ["task", "H", "L", "backend", "median", "peak"],
        [_fmt_row(r, ["task", "H", "L", "backend"]) for r in report["cauchy"]], left=4), flush=True)

    report["s4_kernel"] = kernel_rows(SMOKE_SIZES if args.smoke else LRA_SIZES, device, repeats)
    print("\n2b. The S4 kernel by method, forward + backward\n" + common.format_table(
        ["task", "H", "L", "method", "median", "peak"],
        [_fmt_row(r, ["task", "H", "L", "method"]) for r in report["s4_kernel"]], left=4), flush=True)

    sizes = [(2, 8, 64)] if args.smoke else [(16, 256, 1024), (16, 256, 4096)]
    report["layers"] = layer_rows(device, sizes, repeats)
    print("\n3. Layers, forward + backward\n" + common.format_table(
        ["layer", "B", "H", "L", "precision", "median", "peak"],
        [_fmt_row(r, ["layer", "B", "H", "L", "precision"]) for r in report["layers"]], left=5), flush=True)

    report["training"] = tr = training(args.smoke, timeout=120 if args.smoke else 240)
    if tr["status"] == "ok":
        peak = common.fmt_bytes(tr["peak_mem_bytes"])
        text = (f"{tr['step']} steps, {tr['tokens_per_s']:.4g} tokens/s, peak {peak} "
                f"({tr['peak_mem_kind']}), loss {tr['train_loss']:.4f}")
    else:
        text = tr["status"]
    print(f"\n4. lra.py --task listops --config s4 --precision bf16: {text}", flush=True)
    report["seconds"] = time.perf_counter() - t0
    path = common.write_json(args.out / "device_check.json", report)
    print(f"\nwrote {path} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
