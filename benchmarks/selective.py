"""Mamba and Mamba-2 layers against transformers' CPU paths and mambapy, with the same weights.

    python benchmarks/selective.py            # d_model 256, B 8, L 1024 and 4096; memory at L 16384
    python benchmarks/selective.py --quick    # tiny sizes, seconds

Sides (one layer each, float32, training mode, the same weights loaded into every side):

* ``ssm.Mamba`` / ``ssm.Mamba2``: this library (chunked selective scan; chunked SSD);
* ``hf``: transformers' ``MambaMixer`` / ``Mamba2Mixer`` without the CUDA kernels, i.e. their pure-torch paths
  (Mamba: a materialized (B, D, L, N) discretization and a Python loop over L; Mamba-2: its chunked torch
  SSD);
* ``mambapy`` (Mamba only, when ``pip install mambapy`` is there): a parallel (Blelloch) scan in torch.

Measured, medians of interleaved runs (A B C A B C ...): forward (no_grad) and forward + backward of the
output's sum (transformers' fwd+bwd only up to ``--hf-bwd-max-L``: its autograd through a Python loop over L
grows quadratically, about a minute at L = 256 and 13 minutes at 1024); peak memory at ``--mem-L`` and
``--mem-batch`` in a separate worker (``bench_common.MemoryProbe``): the forward of every side (transformers
materializes (B, D, L, N) tensors) and our forward + backward; the time per generated token of
``layer.step`` at B = 1 and 16 against transformers' cached decoding (a one-layer ``MambaModel`` /
``Mamba2Model`` with ``cache``, so it also pays a norm and a residual). The targets of issue #19: Mamba
fwd+bwd <= 0.5x transformers' and <= mambapy's; Mamba-2 fwd+bwd <= 0.7x transformers'; peak memory <= 0.25x.

Writes benchmarks/results/selective.json and selective.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

TARGETS = {"mamba": {"hf": 0.5, "mambapy": 1.0, "memory": 0.25}, "mamba2": {"hf": 0.7, "memory": 0.25}}


def _mambapy_available() -> bool:
    try:
        import mambapy.mamba  # noqa: F401
    except ImportError:
        return False
    return True


def build_sides(model: str, H: int, N: int, *, headdim: int = 64, seed: int = 0) -> dict:
    """{side: module (B, L, H) -> (B, L, H)} with the weights of one ``ssm`` layer copied into each side."""
    import transformers

    import ssm

    torch.manual_seed(seed)
    if model == "mamba":
        ours = ssm.Mamba(H, N)
        cfg = transformers.MambaConfig(hidden_size=H, state_size=N, expand=2, conv_kernel=4,
                                       time_step_rank=ours.dt_rank, num_hidden_layers=1, vocab_size=8)
        hf = transformers.models.mamba.modeling_mamba.MambaMixer(cfg, layer_idx=0)
    else:
        ours = ssm.Mamba2(H, N, headdim=headdim, chunk_size=256)
        cfg = transformers.Mamba2Config(hidden_size=H, state_size=N, expand=2, conv_kernel=4,
                                        head_dim=headdim, num_heads=2 * H // headdim, n_groups=1,
                                        chunk_size=256,
                                        num_hidden_layers=1, vocab_size=8)
        hf = transformers.models.mamba2.modeling_mamba2.Mamba2Mixer(cfg, layer_idx=0)
    state = {k: v for k, v in ours.state_dict().items() if k != "_extra_state"}
    hf.load_state_dict(state)
    sides = {"ssm": ours, "hf": hf}
    if model == "mamba" and _mambapy_available():
        from mambapy.mamba import MambaBlock, MambaConfig

        block = MambaBlock(MambaConfig(d_model=H, n_layers=1, d_state=N, dt_rank=ours.dt_rank, pscan=True))
        block.load_state_dict(state)
        sides["mambapy"] = block
    return sides


def build_case(model: str, side: str, B: int, H: int, N: int, L: int, backward: bool = True,
               device: str = "cpu", seed: int = 0):
    """A zero-argument callable: forward (and backward) of one side on a (B, L, H) input."""
    module = build_sides(model, H, N, seed=seed)[side].to(device).train()
    x = torch.randn(B, L, H, device=device)
    if backward:
        return common.backward_fn(lambda: module(x), list(module.parameters()))

    def fwd():
        with torch.no_grad():
            return module(x)

    return fwd


def build_steps(model: str, B: int, H: int, N: int, seed: int = 0) -> dict:
    """{side: one generated token}: our ``step`` with the state carried; transformers' cached decoding."""
    import transformers

    import ssm

    torch.manual_seed(seed)
    layer = (ssm.Mamba(H, N) if model == "mamba" else ssm.Mamba2(H, N, headdim=64)).eval()
    if model == "mamba":
        cfg = transformers.MambaConfig(hidden_size=H, state_size=N, expand=2, num_hidden_layers=1,
                                       vocab_size=8)
        net = transformers.MambaModel(cfg).eval()
    else:
        cfg = transformers.Mamba2Config(hidden_size=H, state_size=N, expand=2, head_dim=64,
                                        num_heads=2 * H // 64, n_groups=1, num_hidden_layers=1, vocab_size=8)
        net = transformers.Mamba2Model(cfg).eval()
    x = torch.randn(B, H)
    ours = [layer.default_state(B)]
    with torch.no_grad():
        theirs = [net(inputs_embeds=torch.randn(B, 4, H), use_cache=True).cache]

    def ssm_step():
        with torch.no_grad():
            y, ours[0] = layer.step(x, ours[0])
        return y

    def hf_step():
        with torch.no_grad():
            out = net(inputs_embeds=x[:, None], cache=theirs[0], use_cache=True)
        theirs[0] = out.cache
        return out.last_hidden_state

    return {"ssm": ssm_step, "hf": hf_step}


def agreement(model: str, H: int, N: int) -> dict:
    """Relative difference of every side's output from ours on one input (the same weights)."""
    sides = build_sides(model, H, N)
    x = torch.randn(2, 300, H)
    with torch.no_grad():
        ref = sides["ssm"](x)
        return {k: float((m(x) - ref).norm() / ref.norm()) for k, m in sides.items() if k != "ssm"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Mamba and Mamba-2 against transformers and mambapy")
    common.add_common_args(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--H", type=int, default=256)
    parser.add_argument("--N", type=int, default=16,
                        help="d_state of Mamba (Mamba-2 uses 4N: 64 by default)")
    parser.add_argument("--L", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--hf-bwd-max-L", type=int, default=256,
                        help="transformers' fwd+bwd only up to this L (its autograd through the Python loop "
                             "grows quadratically: about a minute at 256, about 13 minutes at 1024)")
    parser.add_argument("--mem-L", type=int, default=16384)
    parser.add_argument("--mem-batch", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["mamba", "mamba2"], choices=["mamba", "mamba2"])
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.H, args.N, args.L, args.hf_bwd_max_L = 2, 64, 4, [64], 64
        args.mem_L, args.mem_batch, args.repeats = 256, 1, 1
    common.setup(args)
    info = common.machine_info(args.device)
    B, H = args.batch, args.H
    print(f"selective: B={B} H={H} D={2 * H}  torch {info['torch']}, {info['threads']} threads, "
          f"{info['cpu']}, load {info.get('load_avg_1m', float('nan')):.1f}", flush=True)
    rows, memory, steps, agree = [], {}, {}, {}
    for model in args.models:
        N = args.N if model == "mamba" else 4 * args.N
        agree[model] = agreement(model, H, N)
        sides = list(build_sides(model, H, N))
        for L in args.L:
            for mode in ("fwd", "fwd+bwd"):
                skip = mode == "fwd+bwd" and L > args.hf_bwd_max_L
                fns = {s: build_case(model, s, B, H, N, L, backward=mode == "fwd+bwd", device=args.device)
                       for s in sides if not (skip and s == "hf")}
                t = common.timeit_many(fns, device=args.device, repeats=args.repeats)
                for s in fns:
                    rows.append({"model": model, "side": s, "L": L, "mode": mode,
                                 "median_s": t[s]["median_s"],
                                 "ratio_vs_hf": common.ratio(t["ssm"]["median_s"], t[s]["median_s"])})
                print(f"  {model} L={L} {mode}: " + ", ".join(f"{s} {common.fmt_time(t[s]['median_s'])}"
                                                              for s in fns), flush=True)
        if not args.no_memory:
            # transformers' fwd+bwd at mem_L would take hours: its forward is measured, ours both ways
            with common.MemoryProbe(__file__, "build_case", device=args.device) as probe:
                for s in sides:
                    for mode in ("fwd", "fwd+bwd"):
                        if s != "ssm" and mode == ("fwd+bwd" if s == "hf" else "fwd"):
                            continue
                        memory[(model, s, mode)] = probe.measure(dict(
                            model=model, side=s, B=args.mem_batch, H=H, N=N, L=args.mem_L,
                            backward=mode == "fwd+bwd", device=args.device))
        for b in (1, 16):
            fns = build_steps(model, b, H, N)
            t = common.timeit_many(fns, warmup=3, repeats=max(args.repeats, 5) * 4)
            steps[(model, b)] = {s: t[s]["median_s"] for s in fns}

    def med(model, side, L, mode):
        return next((r["median_s"] for r in rows if (r["model"], r["side"], r["L"], r["mode"]) ==
                     (model, side, L, mode)), None)

    table_rows, verdicts = [], []
    for model in args.models:
        for L in args.L:
            for mode in ("fwd", "fwd+bwd"):
                ours = med(model, "ssm", L, mode)
                cells = [model, L, mode, common.fmt_time(ours)]
                for s in ("hf", "mambapy"):
                    other = med(model, s, L, mode)
                    cells += [common.fmt_time(other), common.fmt_ratio(common.ratio(ours, other))]
                table_rows.append(cells)
                if mode == "fwd+bwd":
                    for s, target in TARGETS[model].items():
                        other = med(model, s, L, mode) if s != "memory" else None
                        if s != "memory" and other is not None:
                            r = common.ratio(ours, other)
                            verdicts.append({"model": model, "L": L, "what": f"fwd+bwd / {s}", "ratio": r,
                                             "target": target, "pass": bool(r is not None and r <= target)})
    for model in args.models:
        ours = memory.get((model, "ssm", "fwd"), {}).get("peak_bytes")
        theirs = memory.get((model, "hf", "fwd"), {}).get("peak_bytes")
        if ours and theirs:
            r = ours / theirs
            verdicts.append({"model": model, "L": args.mem_L,
                             "what": f"peak memory fwd / hf (B={args.mem_batch})", "ratio": r,
                             "target": TARGETS[model]["memory"],
                             "pass": r <= TARGETS[model]["memory"]})
    table = common.format_table(["model", "L", "mode", "ssm", "hf", "ssm/hf", "mambapy", "ssm/mambapy"],
                                table_rows)
    mem_table = common.format_table(
        ["model", "side", "mode", f"peak B={args.mem_batch} L={args.mem_L}"],
        [[m, s, mode, common.fmt_bytes(v.get("peak_bytes")) if v.get("peak_bytes") else v.get("error", "-")]
         for (m, s, mode), v in memory.items()])
    step_table = common.format_table(
        ["model", "B", "ssm step", "hf cached decode", "ssm/hf"],
        [[m, b, common.fmt_time(v["ssm"]), common.fmt_time(v["hf"]), common.fmt_ratio(common.ratio(v["ssm"],
                                                                                                   v["hf"]))]
         for (m, b), v in steps.items()])
    verdict_table = common.format_table(
        ["model", "L", "what", "measured", "target", "verdict"],
        [[v["model"], v["L"], v["what"], common.fmt_ratio(v["ratio"]), f"<= {v['target']}x",
          "PASS" if v["pass"] else "MISS"] for v in verdicts])
    print(f"\ntime (medians)\n{table}\n\npeak memory\n{mem_table}\n\nper generated token\n{step_table}\n\n"
          f"targets\n{verdict_table}\n\noutputs vs ssm (same weights): {agree}")
    payload = {"benchmark": "selective", "machine": info,
               "config": {"B": B, "H": H, "N": args.N, "L": args.L, "mem_L": args.mem_L,
                          "mem_batch": args.mem_batch, "repeats": args.repeats, "quick": args.quick},
               "rows": rows,
               "memory": [{"model": m, "side": s, "mode": mode, **v} for (m, s, mode), v in memory.items()],
               "steps": [{"model": m, "B": b, **v} for (m, b), v in steps.items()], "verdicts": verdicts,
               "agreement": agree,
               "tables": {"time": table, "memory": mem_table, "steps": step_table, "targets": verdict_table}}
    path = common.write_json(args.out / "selective.json", payload)

    def draw(axes):
        for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
            for model in args.models:
                for s in ("ssm", "hf", "mambapy"):
                    pts = [(r["L"], r["median_s"]) for r in rows if (r["model"], r["side"], r["mode"]) ==
                           (model, s, mode)]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=f"{model} {s}")
            common.style_axes(ax, xlabel="L", ylabel="seconds (median)", title=mode)

    common.save_plot(args.out / "selective.png", draw, ncols=2)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
