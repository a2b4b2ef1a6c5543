"""Layer forward and forward+backward: S4, S4D, RTF and causal attention at the same width, against L and N.

    python benchmarks/layer_speed.py            # B=1, H=128, N=64, L = 256 1k 4k 16k; N = 16 64 256 at L=4k
    python benchmarks/layer_speed.py --quick    # tiny sizes, seconds

Every layer maps (B, L, H) -> (B, L, H) in float32, training mode:

    S4         ssm.S4(H, N): DPLR kernel (on the CPU power series, else Cauchy + Woodbury) + FFT convolution
               + GELU + output projection
    S4D        ssm.S4D(H, N): diagonal kernel (Vandermonde) + the same
    RTF        ssm.RTF(H, N): transfer-function kernel (FFTs of the coefficients) + the same
    attention  q/k/v projections (one Linear H -> 3H), torch.nn.functional.scaled_dot_product_attention
               with is_causal=True over H/64 heads, output projection (Linear H -> H)

"fwd" is a forward under torch.no_grad in training mode (the SSM kernels are computed in every call, as in
training; eval-mode inference with a cached kernel is goal 2 of benchmarks/speed_goals.py); "fwd+bwd" is a
forward and a backward of the output's sum. Times are medians after a warm-up; peak memory is measured
in a separate worker process (benchmarks/bench_common.py). A case predicted from the previous length to take
more than --max-seconds, or to need more than --mem-limit-gib, is printed as skipped with the reason.
The N sweep (fixed L) shows how each SSM grows with the state size. Writes benchmarks/results/layers.json
and layers.png.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

MODELS = ("S4", "S4D", "RTF", "attention")
MODES = ("fwd", "fwd+bwd")
# a priori growth exponents of time in L (used to skip cases predicted to be too slow)
TIME_GROWTH = {"S4": 1.0, "S4D": 1.0, "RTF": 1.0, "attention": 2.0}


class Attention(nn.Module):
    """Causal multi-head self-attention: x (B, L, H) -> (B, L, H); ``step`` decodes with a KV cache.

    Args:
        d_model: H.
        n_heads: number of heads; H must be divisible by it.
    """

    def __init__(self, d_model: int, n_heads: int = 1) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model must be divisible by n_heads; got {d_model} and {n_heads}")
        self.d_model, self.n_heads = d_model, n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        Bsz, L, H = x.shape
        q, k, v = self.qkv(x).view(Bsz, L, 3, self.n_heads, H // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, L, d)
        return self.out(y.transpose(1, 2).reshape(Bsz, L, H))

    def new_cache(self, batch_size: int, max_len: int) -> tuple[Tensor, Tensor]:
        """Empty key and value caches, each (B, heads, max_len, d)."""
        d = self.d_model // self.n_heads
        w = self.out.weight
        shape = (batch_size, self.n_heads, max_len, d)
        return (torch.zeros(shape, device=w.device, dtype=w.dtype),
                torch.zeros(shape, device=w.device, dtype=w.dtype))

    def step(self, x: Tensor, cache: tuple[Tensor, Tensor], t: int) -> Tensor:
        """One token x (B, H) at position t: writes its key and value into the cache, attends to 0..t."""
        Bsz, H = x.shape
        q, k, v = self.qkv(x).view(Bsz, 3, self.n_heads, H // self.n_heads).unbind(1)  # (B, heads, d)
        keys, values = cache
        keys[:, :, t] = k
        values[:, :, t] = v
        y = F.scaled_dot_product_attention(q[:, :, None], keys[:, :, : t + 1], values[:, :, : t + 1])
        return self.out(y.reshape(Bsz, H))


def heads_for(H: int) -> int:
    """Heads of width 64 where H allows, else 1."""
    return H // 64 if H % 64 == 0 else 1


def make_layer(model: str, H: int, N: int, device: str = "cpu") -> nn.Module:
    import ssm

    if model == "S4":
        return ssm.S4(H, N, device=device)
    if model == "S4D":
        return ssm.S4D(H, N, device=device)
    if model == "RTF":
        return ssm.RTF(H, N, device=device)
    if model == "attention":
        return Attention(H, heads_for(H)).to(device)
    raise ValueError(f"model must be one of {MODELS}; got {model!r}")


def build_case(model: str, mode: str, B: int, H: int, N: int, L: int, device: str = "cpu", seed: int = 0):
    """A zero-argument callable running ``mode`` ("fwd" or "fwd+bwd") of ``model`` on a (B, L, H) input."""
    torch.manual_seed(seed)
    layer = make_layer(model, H, N, device).train()
    x = torch.randn(B, L, H, device=device)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return layer(x)
        return run
    return common.backward_fn(lambda: layer(x), list(layer.parameters()))


def attention_matrix_bytes(B: int, H: int, L: int, mode: str) -> float:
    """Bytes of the (B, heads, L, L) float32 score matrix (x3 with backward) an unfused attention needs."""
    return B * heads_for(H) * L * L * 4 * (3 if mode == "fwd+bwd" else 1)


def run_sweep(
    cases: list[dict], key: str, args, probe: common.MemoryProbe | None, growth: dict
) -> list[dict]:
    """Time (and measure) each case in order; skip cases predicted to exceed the limits.

    ``key`` is the swept size ("L" or "N"); predictions extrapolate from the last measured case of the same
    model and mode with the exponents in ``growth`` (time) and the measured memory slope.
    """
    rows, last = [], {}
    mem_limit = args.mem_limit_gib * common.GiB
    for case in cases:
        row = dict(case)
        tag = (case["model"], case["mode"])
        prev = last.get(tag, [])
        reason = None
        if prev:
            p = prev[-1]
            scale = case[key] / p[key]
            t_pred = p["median_s"] * scale ** growth.get(case["model"], 1.0)
            if t_pred > args.max_seconds:
                reason = f"predicted {t_pred:.0f} s per call > --max-seconds {args.max_seconds:g}"
            if reason is None and p.get("peak_bytes"):
                slope = 2.0 if case["model"] == "attention" else 1.0
                if len(prev) > 1 and prev[-2].get("peak_bytes"):
                    q = prev[-2]
                    grew = max(p["peak_bytes"], 1) / max(q["peak_bytes"], 1)
                    slope = math.log(grew) / math.log(p[key] / q[key])
                    slope = min(max(slope, 1.0), 3.0)
                m_pred = p["peak_bytes"] * scale**slope
                if m_pred > mem_limit:
                    reason = f"needs ~{m_pred / common.GiB:.1f} GiB"
        if reason is None and case["model"] == "attention" and probe is None:
            need = attention_matrix_bytes(case["B"], case["H"], case["L"], case["mode"])
            if need > mem_limit:
                reason = f"needs {need / common.GiB:.1f} GiB"
        if reason is not None:
            row["skipped"] = reason
            print(f"  {case['model']:9s} {case['mode']:8s} {key}={case[key]:<6d} skipped ({reason})",
                  flush=True)
            rows.append(row)
            continue
        fn = build_case(**case)
        row.update(common.timeit(fn, device=args.device, repeats=args.repeats, max_seconds=args.max_seconds))
        del fn
        if probe is not None:
            row.update(probe.measure(case))
        print(f"  {case['model']:9s} {case['mode']:8s} {key}={case[key]:<6d} "
              f"{common.fmt_time(row['median_s']):>10s}"
              f"  peak {common.fmt_bytes(row.get('peak_bytes'))}", flush=True)
        last.setdefault(tag, []).append(row)
        rows.append(row)
    return rows


def grid(rows: list[dict], key: str, values: list, models: tuple, mode: str, field: str, fmt,
         ref: str | None = None) -> str:
    """Table of ``field`` with one row per swept value and one column per model (+ ratios to ``ref``)."""
    def get(model, v):
        for r in rows:
            if r["model"] == model and r["mode"] == mode and r[key] == v:
                return r
        return {}

    headers = [key] + list(models)
    others = [m for m in models if ref and m != ref]
    headers += [f"{m}/{ref}" for m in others]
    out = []
    for v in values:
        cells = []
        for m in models:
            r = get(m, v)
            if r.get(field) is not None:
                cells.append(fmt(r[field]))
            else:
                cells.append("skipped" if "skipped" in r else "-")
        for m in others:
            cells.append(common.fmt_ratio(common.ratio(get(m, v).get(field), get(ref, v).get(field))))
        out.append([v] + cells)
    return common.format_table(headers, out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="layer forward and forward+backward against L and N")
    common.add_common_args(parser)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--H", type=int, default=128)
    parser.add_argument("--N", type=int, default=64, help="state size in the L sweep")
    parser.add_argument("--L", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--N-sweep", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--L-for-N", type=int, default=4096, help="L of the N sweep")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per call; slower cases are skipped")
    parser.add_argument("--mem-limit-gib", type=float, default=6.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.H, args.N, args.L, args.N_sweep, args.L_for_N = 1, 16, 8, [64, 128], [4, 8], 64
        args.repeats = 1
    common.setup(args)
    info = common.machine_info(args.device)
    models = tuple(args.models)
    ssm_models = tuple(m for m in models if m != "attention")
    print(f"layers: B={args.batch} H={args.H} N={args.N} heads={heads_for(args.H)}  torch {info['torch']}, "
          f"{info['threads']} threads, {info['cpu']}")
    base = dict(B=args.batch, H=args.H, device=args.device)
    l_cases = [dict(base, model=m, mode=mode, N=args.N, L=L)
               for m in models for mode in MODES for L in args.L]
    n_cases = [dict(base, model=m, mode="fwd+bwd", N=N, L=args.L_for_N)
               for m in ssm_models for N in args.N_sweep]
    probe = None if args.no_memory else common.MemoryProbe(__file__, "build_case", device=args.device)
    try:
        print("L sweep:")
        l_rows = run_sweep(l_cases, "L", args, probe, TIME_GROWTH)
        print("N sweep:")
        # S4's O(H N^3 log L) dense power only dominates for N in the hundreds: predict with N^1.5
        n_rows = run_sweep(n_cases, "N", args, probe, {"S4": 1.5, "S4D": 1.0, "RTF": 0.0})
    finally:
        if probe is not None:
            probe.close()

    ref = "attention" if "attention" in models else None
    tables = {}
    for mode in MODES:
        tables[f"time {mode} (median)"] = grid(l_rows, "L", args.L, models, mode, "median_s",
                                               common.fmt_time, ref)
        if not args.no_memory:
            tables[f"peak memory {mode}"] = grid(l_rows, "L", args.L, models, mode, "peak_bytes",
                                                 common.fmt_bytes, ref)
    tables[f"time fwd+bwd against N (L={args.L_for_N})"] = grid(
        n_rows, "N", args.N_sweep, ssm_models, "fwd+bwd", "median_s", common.fmt_time)
    if not args.no_memory:
        tables[f"peak memory fwd+bwd against N (L={args.L_for_N})"] = grid(
            n_rows, "N", args.N_sweep, ssm_models, "fwd+bwd", "peak_bytes", common.fmt_bytes)
    for title, text in tables.items():
        print(f"\n{title}, B={args.batch} H={args.H}" + (f" N={args.N}" if "against N" not in title else ""))
        print(text)

    payload = {"benchmark": "layers", "machine": info,
               "config": {"B": args.batch, "H": args.H, "N": args.N, "L": args.L, "N_sweep": args.N_sweep,
                          "L_for_N": args.L_for_N, "heads": heads_for(args.H), "repeats": args.repeats,
                          "quick": args.quick},
               "rows": l_rows, "n_rows": n_rows, "tables": tables}
    path = common.write_json(args.out / "layers.json", payload)

    def draw(axes):
        styles = {"fwd": "--", "fwd+bwd": "-"}
        for i, model in enumerate(models):
            color = f"C{i}"
            for mode in MODES:
                pts = [(r["L"], r.get("median_s")) for r in l_rows
                       if r["model"] == model and r["mode"] == mode and r.get("median_s")]
                if pts:
                    axes[0].plot(*zip(*pts), styles[mode], color=color, marker="o", label=f"{model} {mode}")
                pts = [(r["L"], r.get("peak_bytes")) for r in l_rows
                       if r["model"] == model and r["mode"] == mode and r.get("peak_bytes")]
                if pts:
                    axes[1].plot(*zip(*pts), styles[mode], color=color, marker="o", label=f"{model} {mode}")
            pts = [(r["N"], r.get("median_s")) for r in n_rows if r["model"] == model and r.get("median_s")]
            if pts:
                axes[2].plot(*zip(*pts), "-", color=color, marker="o", label=f"{model} fwd+bwd")
        titles = (f"time, B={args.batch} H={args.H} N={args.N}", "peak memory",
                  f"time against N, L={args.L_for_N}")
        ylabels = ("seconds (median)", "bytes", "seconds (median)")
        for ax, xl, yl, t in zip(axes, ("L", "L", "N"), ylabels, titles):
            common.style_axes(ax, xlabel=xl, ylabel=yl, title=t)

    common.save_plot(args.out / "layers.png", draw, ncols=3, size=(5, 4))
    print(f"\nwrote {path} and {args.out / 'layers.png'}")
    return payload


if __name__ == "__main__":
    main()
