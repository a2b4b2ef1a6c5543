"""Recurrent generation: time per token with ``step`` (S4, S4D, RTF) against attention with a KV cache.

    python benchmarks/generation.py            # B=1, H=128, N=64, prefix 256 1k 4k 16k
    python benchmarks/generation.py --quick    # tiny sizes, seconds

Each model decodes --tokens tokens one at a time after a prefix of length T, in eval mode under
torch.no_grad, float32:

    S4, S4D, RTF   layer.step(x_t (B, H), state) -> (y_t, state): O(H N) per token, whatever T
    attention      q/k/v projections of the new token, its key and value written into a preallocated
                   (B, heads, T_max, d) cache, scaled_dot_product_attention of the one query over the T + 1
                   cached positions, output projection: O(T H) per token

The prefix is not recomputed: the cache holds T random keys and values and the SSM state is the state
after a few warm-up steps (the cost of a step does not depend on the values). One thread by default
(--threads): a token's work is a few dozen small ops, too small to split, and every op that opens an
OpenMP region waits for the second thread, a whole time slice (~10 ms) when the machine is busy.
Reported: the median over --repeats of the mean time per token over --tokens consecutive tokens, and the
size of what each model carries between tokens (SSM state or KV cache), computed from the tensors'
shapes. Writes benchmarks/results/generation.json and generation.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402
from layer_speed import Attention, heads_for, make_layer  # noqa: E402

MODELS = ("S4", "S4D", "RTF", "attention")


def build_decoder(
    model: str, B: int, H: int, N: int, T: int, tokens: int, device: str = "cpu", seed: int = 0
):
    """(a zero-argument callable decoding ``tokens`` tokens after a prefix of T, bytes carried per step)."""
    torch.manual_seed(seed)
    layer = make_layer(model, H, N, device).eval()
    xs = torch.randn(tokens, B, H, device=device)
    if isinstance(layer, Attention):
        cache = layer.new_cache(B, T + tokens)
        with torch.no_grad():
            cache[0][:, :, :T].normal_()
            cache[1][:, :, :T].normal_()
        carried = 2 * cache[0][:, :, : T + 1].numel() * cache[0].element_size()

        def run():
            with torch.no_grad():
                for i in range(tokens):
                    y = layer.step(xs[i], cache, T + i)
            return y
        return run, carried

    run, box = common.warmed_stepper(layer, xs, layer.default_state(B, device=device))
    carried = box["state"].numel() * box["state"].element_size()
    return run, carried


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="time per generated token: SSM step vs attention KV cache")
    common.add_common_args(parser, threads=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--H", type=int, default=128)
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--prefix", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--tokens", type=int, default=32, help="tokens decoded per timed call")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.H, args.N, args.prefix, args.tokens, args.repeats = 1, 16, 8, [16, 64], 4, 2
    common.setup(args)
    info = common.machine_info(args.device)
    print(f"generation: B={args.batch} H={args.H} N={args.N} heads={heads_for(args.H)} tokens={args.tokens}  "
          f"torch {info['torch']}, {info['threads']} threads, {info['cpu']}")
    rows = []
    for model in args.models:
        for T in args.prefix:
            fn, carried = build_decoder(model, args.batch, args.H, args.N, T, args.tokens, args.device)
            r = common.timeit(fn, device=args.device, repeats=args.repeats)
            row = {"model": model, "prefix": T, "B": args.batch, "H": args.H, "N": args.N,
                   "tokens": args.tokens, "per_token_s": r["median_s"] / args.tokens,
                   "carried_bytes": carried, **r}
            rows.append(row)
            print(f"  {model:9s} prefix={T:<6d} {common.fmt_time(row['per_token_s']):>10s} per token  "
                  f"carries {common.fmt_bytes(carried)}", flush=True)

    def get(model, T, key):
        for r in rows:
            if r["model"] == model and r["prefix"] == T:
                return r.get(key)
        return None

    models = tuple(args.models)
    ssm_models = [m for m in models if m != "attention"]
    ref = "attention" if "attention" in models else None
    tables = {}
    for key, fmt, title in (("per_token_s", common.fmt_time, "time per token (median)"),
                            ("carried_bytes", common.fmt_bytes, "state / KV cache carried between tokens")):
        headers = ["prefix"] + list(models) + ([f"{m}/attention" for m in ssm_models] if ref else [])
        out = []
        for T in args.prefix:
            cells = [fmt(get(m, T, key)) for m in models]
            if ref:
                cells += [common.fmt_ratio(common.ratio(get(m, T, key), get(ref, T, key)))
                          for m in ssm_models]
            out.append([T] + cells)
        tables[title] = common.format_table(headers, out)
    for title, text in tables.items():
        print(f"\n{title}, B={args.batch} H={args.H} N={args.N}")
        print(text)
    payload = {"benchmark": "generation", "machine": info,
               "config": {"B": args.batch, "H": args.H, "N": args.N, "prefix": args.prefix,
                          "tokens": args.tokens, "heads": heads_for(args.H), "repeats": args.repeats,
                          "quick": args.quick},
               "rows": rows, "tables": tables}
    path = common.write_json(args.out / "generation.json", payload)

    def draw(axes):
        for model in models:
            pts = [(T, get(model, T, "per_token_s")) for T in args.prefix]
            axes[0].plot(*zip(*pts), "o-", label=model)
            pts = [(T, get(model, T, "carried_bytes")) for T in args.prefix]
            axes[1].plot(*zip(*pts), "o-", label=model)
        for ax, yl in zip(axes, ("seconds per token (median)", "bytes carried between tokens")):
            common.style_axes(ax, xlabel="prefix length", ylabel=yl)
        axes[0].set_title(f"generation, B={args.batch} H={args.H} N={args.N}")

    common.save_plot(args.out / "generation.png", draw, ncols=2)
    print(f"\nwrote {path} and {args.out / 'generation.png'}")
    return payload


if __name__ == "__main__":
    main()
