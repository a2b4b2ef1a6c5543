"""What do packed documents cost? ``layer(x, seq_idx=seq)`` against ``layer(x)``, forward + backward, in
training mode (the issue's target: <= 1.5x at B=1, L=8192, H=256 with 16 documents).

    python benchmarks/packing.py                    # B=1, L=8192, H=256, N=64, 16 documents, every layer
    python benchmarks/packing.py --quick            # tiny sizes, seconds
    python benchmarks/packing.py --layers S4D Mamba2 --docs 64 --device cuda

The documents have random lengths (a fixed seed) summing to L. The two calls of one layer are timed
interleaved (plain, packed, plain, ...); medians of --repeats rounds after --warmup rounds; the loss is
``y.square().mean()``. LTI layers convolve (S5: scan) each document on its own, batched by similar
lengths, with the kernel of the longest document; Mamba splits its scan at the starts; Mamba2 passes
seq_idx to the SSD op.
Writes benchmarks/results/packing.json and packing.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

CONFIGS = ("S4-bilinear", "S4-zoh", "S4D", "RTF", "S5", "Mamba", "Mamba2")
TARGET = 1.5  # fwd+bwd packed / plain


def make_layer(config: str, H: int, N: int, device: str = "cpu", quick: bool = False) -> torch.nn.Module:
    import ssm

    if config == "S4-bilinear":
        return ssm.S4(H, N, device=device)
    if config == "S4-zoh":
        return ssm.S4(H, N, disc="zoh", device=device)
    if config == "S4D":
        return ssm.S4D(H, N, device=device)
    if config == "RTF":
        return ssm.RTF(H, N, device=device)
    if config == "S5":
        return ssm.S5(H, N, device=device)
    if config == "Mamba":
        return ssm.Mamba(H, 16, device=device)
    if config == "Mamba2":
        return ssm.Mamba2(H, N, headdim=4 if quick else 64, chunk_size=16 if quick else 256, device=device)
    raise ValueError(f"config must be one of {CONFIGS}; got {config!r}")


def document_index(L: int, docs: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """(1, L) seq_idx of ``docs`` documents of random lengths (at least 1) summing to L."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(L - 1, generator=g)[: docs - 1].add(1).sort().values
    starts = torch.zeros(L, dtype=torch.long)
    starts[cuts] = 1
    return starts.cumsum(0)[None].to(device)


def call_fn(layer, x, seq):
    params = list(layer.parameters())

    def run():
        for p in params:
            p.grad = None
        loss = layer(x, seq_idx=seq).square().mean()
        loss.backward()
        return loss.detach()

    return run


def measure(config: str, args) -> dict:
    row: dict = {"config": config}
    try:
        torch.manual_seed(0)
        layer = make_layer(config, args.H, args.N, args.device, args.quick).train()
        x = torch.randn(args.batch, args.L, args.H, device=args.device)
        seq = document_index(args.L, args.docs, device=args.device).expand(args.batch, -1)
        with torch.no_grad():  # the packed output equals the documents run separately (spot check: doc 0)
            n0 = int((seq[0] == 0).sum())
            row["doc0_rel_err"] = float((layer(x, seq_idx=seq)[:, :n0] - layer(x[:, :n0])).norm()
                                        / layer(x[:, :n0]).norm())
        t = common.timeit_many({"plain": call_fn(layer, x, None), "packed": call_fn(layer, x, seq)},
                               device=args.device, warmup=args.warmup, repeats=args.repeats)
        for k in ("plain", "packed"):
            row[k] = {"median_s": t[k]["median_s"], "min_s": t[k]["min_s"], "samples_s": t[k]["samples_s"]}
        row["ratio"] = common.ratio(t["packed"]["median_s"], t["plain"]["median_s"])
        row["verdict"] = "PASS" if row["ratio"] is not None and row["ratio"] <= TARGET else "FAIL"
        print(f"  {config:12s} plain {common.fmt_time(t['plain']['median_s'])}  packed "
              f"{common.fmt_time(t['packed']['median_s'])}  ratio {common.fmt_ratio(row['ratio'])}",
              flush=True)
    except Exception as err:  # one layer failing must not stop the others; the error is reported
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        print(f"  {config:12s} failed: {row['error']}", flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="cost of packed documents: layer(x, seq_idx) vs layer(x)")
    common.add_common_args(parser)
    parser.add_argument("--batch", "--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=256)
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--L", type=int, default=8192)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--layers", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.H, args.N, args.L, args.docs, args.repeats, args.warmup = 1, 8, 8, 64, 4, 1, 1
    common.setup(args)
    info = common.machine_info(args.device)
    print(f"packing: B={args.batch} L={args.L} H={args.H} N={args.N} docs={args.docs}, train, fwd+bwd, "
          f"float32, torch {info['torch']}, {info['threads']} threads, {info['device']}")
    rows = [measure(c, args) for c in args.layers]
    headers = ["layer", "plain fwd+bwd", "packed fwd+bwd", "ratio", f"<= {TARGET}x", "doc0 rel err"]
    table = common.format_table(headers, [
        [r["config"], common.fmt_time(r["plain"]["median_s"]), common.fmt_time(r["packed"]["median_s"]),
         common.fmt_ratio(r["ratio"]), r["verdict"], f"{r['doc0_rel_err']:.1e}"] if "error" not in r
        else [r["config"], "-", "-", "-", "error", r["error"][:60]] for r in rows])
    print("\n" + table)
    payload = {"benchmark": "packing", "machine": info,
               "config": {"B": args.batch, "L": args.L, "H": args.H, "N": args.N, "docs": args.docs,
                          "layers": args.layers, "repeats": args.repeats, "quick": args.quick,
                          "mode": "train", "dtype": "float32", "target_ratio": TARGET},
               "rows": rows, "tables": {"time": table}}
    path = common.write_json(args.out / "packing.json", payload)

    def draw(ax):
        ok = [r for r in rows if "error" not in r]
        ax.bar(range(len(ok)), [r["ratio"] for r in ok], color="C0")
        ax.axhline(TARGET, color="k", linestyle="--", linewidth=1, label=f"target {TARGET}x")
        ax.axhline(1.0, color="gray", linewidth=0.5)
        ax.set_xticks(range(len(ok)))
        ax.set_xticklabels([r["config"] for r in ok], fontsize=7)
        ax.set_ylabel("packed / plain, fwd+bwd median")
        ax.set_title(f"packing cost, B={args.batch} L={args.L} H={args.H} docs={args.docs}")
        ax.legend(fontsize=7)

    common.save_plot(args.out / "packing.png", draw)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
