"""What does state passing cost? ``layer(x)`` against ``layer(x, state)`` and ``layer(x, state,
return_state=True)``, in training mode.

    python benchmarks/state_passing.py                 # B=32, H=64, N=64, L=1024, every layer config
    python benchmarks/state_passing.py --quick         # tiny sizes, seconds (--smoke is the same)
    python benchmarks/state_passing.py --layers S4D RTF --repeats 3

Layer configs (float32, training mode: ``layer.train()``, autograd on, so no kernel cache):

    S4-bilinear  ssm.S4(H, N)
    S4-zoh       ssm.S4(H, N, disc="zoh")
    S4D          ssm.S4D(H, N)
    RTF          ssm.RTF(H, N)

For each config three calls on the same (B, L, H) input x and the same random nonzero state (shape and
dtype of ``layer.default_state(B)``):

    plain         layer(x)
    state         layer(x, state)
    return_state  layer(x, state, return_state=True)

each in two modes: "fwd" (the forward alone, with autograd recording, as in training) and "fwd+bwd" (forward
and backward of ``y.square().mean()``, plus ``next_state.abs().square().mean()`` for return_state). The
three calls of one config and mode are timed interleaved (plain, state, return_state, plain, ...) so a
change of the machine's load hits them alike; medians of --repeats rounds (default 15) after --warmup
(default 2) warm-up rounds. The ratios are each call's median over the plain call's. The verdict is PASS
when the forward ratio state / plain is <= 1.5x.

Peak memory is measured in a separate worker process (``common.MemoryProbe``: the resident set's
high-water mark above the baseline of parameters and inputs) and reported as bytes per B*H*L: state
passing should stay O(B H L) (a few tens of bytes per B*H*L) and not become O(B H N L) (N * 8 = 512 bytes
per B*H*L for one complex64 (B, H, N/2, L) tensor at N=64, N * 4 = 256 for a float32 (B, H, N, L)).
Writes benchmarks/results/state_passing.json and state_passing.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

CONFIGS = ("S4-bilinear", "S4-zoh", "S4D", "RTF")
VARIANTS = ("plain", "state", "return_state")
MODES = ("fwd", "fwd+bwd")
TARGET = 1.5  # forward ratio state / plain


def make_layer(config: str, H: int, N: int, device: str = "cpu") -> torch.nn.Module:
    import ssm

    if config == "S4-bilinear":
        return ssm.S4(H, N, device=device)
    if config == "S4-zoh":
        return ssm.S4(H, N, disc="zoh", device=device)
    if config == "S4D":
        return ssm.S4D(H, N, device=device)
    if config == "RTF":
        return ssm.RTF(H, N, device=device)
    raise ValueError(f"config must be one of {CONFIGS}; got {config!r}")


def setup_layer(config: str, B: int, H: int, N: int, L: int, device: str = "cpu", seed: int = 0):
    """(layer in training mode, input x (B, L, H), random nonzero state like ``layer.default_state(B)``)."""
    torch.manual_seed(seed)
    layer = make_layer(config, H, N, device).train()
    x = torch.randn(B, L, H, device=device)
    zero = layer.default_state(B)
    state = torch.randn(zero.shape, dtype=zero.dtype, device=zero.device)  # complex randn for complex states
    return layer, x, state


def call_fn(layer: torch.nn.Module, x: torch.Tensor, state: torch.Tensor, variant: str,
            mode: str) -> Callable[[], object]:
    """A zero-argument callable running ``variant`` of the layer call in ``mode`` ("fwd" or "fwd+bwd")."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    params = list(layer.parameters())

    def forward():
        if variant == "plain":
            return layer(x), None
        if variant == "state":
            return layer(x, state), None
        return layer(x, state, return_state=True)

    if mode == "fwd":
        return forward

    def fwd_bwd():
        for p in params:
            p.grad = None
        y, next_state = forward()
        loss = y.square().mean()
        if next_state is not None:
            loss = loss + next_state.abs().square().mean()
        loss.backward()
        return loss.detach()

    return fwd_bwd


def build_case(config: str, variant: str, mode: str, B: int, H: int, N: int, L: int, device: str = "cpu",
               seed: int = 0) -> Callable[[], object]:
    """The memory worker's builder (``common.MemoryProbe``): one call, its own layer and inputs."""
    layer, x, state = setup_layer(config, B, H, N, L, device, seed)
    return call_fn(layer, x, state, variant, mode)


def measure_config(config: str, args, probe: common.MemoryProbe | None) -> dict:
    """Interleaved medians of the three calls in both modes (+ peak memory) of one layer config."""
    B, H, N, L = args.batch, args.H, args.N, args.L
    row: dict = {"config": config}
    try:
        layer, x, state = setup_layer(config, B, H, N, L, args.device)
        for mode in MODES:
            fns = {v: call_fn(layer, x, state, v, mode) for v in VARIANTS}
            t = common.timeit_many(fns, device=args.device, warmup=args.warmup, repeats=args.repeats)
            row[mode] = {v: {"median_s": t[v]["median_s"], "min_s": t[v]["min_s"],
                             "samples_s": t[v]["samples_s"], "warmup_s": t[v]["warmup_s"]} for v in VARIANTS}
            print(f"  {config:12s} {mode:8s} " + "  ".join(
                f"{v} {common.fmt_time(t[v]['median_s'])}" for v in VARIANTS), flush=True)
        del layer, x, state, fns
    except Exception as err:  # a layer mid-rewrite must not stop the others; the error is reported
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        print(f"  {config:12s} failed: {row['error']}", flush=True)
        return row
    if probe is not None:
        for mode in MODES:
            for v in VARIANTS:
                m = probe.measure(dict(config=config, variant=v, mode=mode, B=B, H=H, N=N, L=L,
                                       device=args.device))
                if "peak_bytes" in m:
                    m["bytes_per_BHL"] = m["peak_bytes"] / (B * H * L)
                row[mode][v].update(m)
        print(f"  {config:12s} peak   " + "  ".join(
            f"{mode} {v} {common.fmt_bytes(row[mode][v].get('peak_bytes'))}" for mode in MODES
            for v in VARIANTS), flush=True)
    for mode in MODES:
        plain = row[mode]["plain"]
        row[mode]["ratios"] = {
            f"{v}/plain": common.ratio(row[mode][v]["median_s"], plain["median_s"]) for v in VARIANTS[1:]}
        row[mode]["peak_ratios"] = {
            f"{v}/plain": common.ratio(row[mode][v].get("peak_bytes"), plain.get("peak_bytes"))
            for v in VARIANTS[1:]}
    r = row["fwd"]["ratios"]["state/plain"]
    row["verdict"] = "PASS" if r is not None and r <= TARGET else "FAIL"
    return row


def tables(rows: list[dict], memory: bool = True) -> dict[str, str]:
    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.2f}"

    headers = ["config", "fwd ms", "fwd(state) ms", "ratio", "fwd+bwd ms", "fwd+bwd(state) ms", "ratio",
               "return_state ratio fwd / fwd+bwd", "peak mem ratio fwd / fwd+bwd", f"fwd <= {TARGET}x"]
    out, mem = [], []
    for r in rows:
        if "error" in r:
            out.append([r["config"]] + ["-"] * 8 + [f"error: {r['error'][:60]}"])
            continue
        f, fb = r["fwd"], r["fwd+bwd"]
        out.append([
            r["config"], ms(f["plain"]["median_s"]), ms(f["state"]["median_s"]),
            common.fmt_ratio(f["ratios"]["state/plain"]),
            ms(fb["plain"]["median_s"]), ms(fb["state"]["median_s"]),
            common.fmt_ratio(fb["ratios"]["state/plain"]),
            f"{common.fmt_ratio(f['ratios']['return_state/plain'])} / "
            f"{common.fmt_ratio(fb['ratios']['return_state/plain'])}",
            f"{common.fmt_ratio(f['peak_ratios']['state/plain'])} / "
            f"{common.fmt_ratio(fb['peak_ratios']['state/plain'])}",
            r["verdict"]])
        cells = [r["config"]]
        for mode in MODES:
            for v in VARIANTS:
                c = r[mode][v]
                per = c.get("bytes_per_BHL")
                cells.append(f"{per:.1f}" if per is not None else c.get("error", "-")[:20])
        mem.append(cells)
    result = {"time": common.format_table(headers, out)}
    if memory:
        mem_headers = ["config"] + [f"{m} {v}" for m in MODES for v in VARIANTS]
        result["peak memory, bytes per B*H*L"] = common.format_table(mem_headers, mem)
    return result


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="cost of state passing: layer(x) against layer(x, state)")
    common.add_common_args(parser)
    parser.add_argument("--smoke", dest="quick", action="store_true", help="same as --quick")
    parser.add_argument("--batch", "--B", type=int, default=32)
    parser.add_argument("--H", type=int, default=64)
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--L", type=int, default=1024)
    parser.add_argument("--layers", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before the timed ones")
    parser.set_defaults(repeats=15)  # cheap calls on a shared machine: more samples for steadier medians
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.H, args.N, args.L, args.repeats, args.warmup = 2, 8, 8, 64, 1, 1
    common.setup(args)
    info = common.machine_info(args.device)
    info["loadavg_start"] = loadavg()
    print(f"state passing: B={args.batch} H={args.H} N={args.N} L={args.L}, train mode, float32, "
          f"torch {info['torch']}, {info['threads']} threads, {info['cpu']}, load {info['loadavg_start']}")
    probe = None if args.no_memory else common.MemoryProbe(__file__, "build_case", device=args.device)
    try:
        rows = [measure_config(c, args, probe) for c in args.layers]
    finally:
        if probe is not None:
            probe.close()
    info["loadavg_end"] = loadavg()
    text = tables(rows, memory=not args.no_memory)
    for title, t in text.items():
        print(f"\n{title}, B={args.batch} H={args.H} N={args.N} L={args.L}")
        print(t)
    print(f"load average: start {info['loadavg_start']}, end {info['loadavg_end']}")

    payload = {"benchmark": "state_passing", "machine": info,
               "config": {"B": args.batch, "H": args.H, "N": args.N, "L": args.L, "layers": args.layers,
                          "repeats": args.repeats, "quick": args.quick, "mode": "train", "dtype": "float32",
                          "target_fwd_ratio": TARGET},
               "rows": rows, "tables": text}
    path = common.write_json(args.out / "state_passing.json", payload)

    def draw(ax):
        ok = [r for r in rows if "error" not in r]
        bars = [("fwd", "ratios", "state/plain", "fwd state"),
                ("fwd", "ratios", "return_state/plain", "fwd return_state"),
                ("fwd+bwd", "ratios", "state/plain", "fwd+bwd state"),
                ("fwd+bwd", "ratios", "return_state/plain", "fwd+bwd return_state"),
                ("fwd", "peak_ratios", "state/plain", "peak mem fwd state"),
                ("fwd+bwd", "peak_ratios", "state/plain", "peak mem fwd+bwd state")]
        width = 0.8 / len(bars)
        for i, (mode, kind, key, label) in enumerate(bars):
            xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(ok))]
            ys = [r[mode][kind][key] or 0.0 for r in ok]
            ax.bar(xs, ys, width, label=label, color=f"C{i}")
        ax.axhline(TARGET, color="k", linestyle="--", linewidth=1, label=f"target {TARGET}x (fwd state)")
        ax.axhline(1.0, color="gray", linewidth=0.5)
        ax.set_xticks(range(len(ok)))
        ax.set_xticklabels([r["config"] for r in ok])
        ax.set_ylabel("median / median of layer(x)")
        ax.set_title(f"state passing cost, B={args.batch} H={args.H} N={args.N} L={args.L} (train)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)

    png = common.save_plot(args.out / "state_passing.png", draw, size=(8, 4.5))
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return payload


if __name__ == "__main__":
    main()
