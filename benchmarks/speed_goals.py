"""The speed and memory goals of the performance issue, each printed as measured / target / PASS or MISS.

    python benchmarks/speed_goals.py            # the goal sizes (a few minutes on 2 cores)
    python benchmarks/speed_goals.py --quick    # tiny sizes, seconds (the verdicts then mean nothing)

All ratios are measured in one process with torch.set_num_threads(2) (--threads), float32, the two sides of
each ratio timed interleaved (A B A B ...) so a change of the machine's load hits both alike:

1. S4 layer forward+backward against the plain S4 (benchmarks/plain_s4.py, parameters copied from the
   layer) at B=4, L=4096, H=128, N=64. Target <= 0.5x.
2. S4 inference forward (eval mode, torch.no_grad, the kernel cached after the warm-up) against the bare
   FFT convolution of the same (B, H, L) input with the given kernel, ``ssm.ops.fftconv.fftconv(u, K, D)``,
   at the same sizes. The layer's time includes its GELU and output projection. Target <= 3x.
3. RTF kernel generation, ``ssm.kernels.rtf_kernel``, at N=1024 against N=16 (H=256, L=8192). Target
   <= 1.5x.
4. Peak memory of S4 kernel generation, ``ssm.kernels.dplr_kernel(..., disc="bilinear", conj_pairs=True)``
   with the default backend (N/2 = 32 stored modes for N = 64, as the layer stores them), H=256, for L up
   to 65536, under torch.no_grad (measured in a separate process, see benchmarks/bench_common.py).
   Target: bytes per H*L flat in L (largest L within 1.5x of L=4096) and below 256 B, the size of one
   materialized (H, N, L/2) complex64 Cauchy matrix (256 B per H*L at N=64), i.e. O(H*L) memory, no
   (H, N, L) tensor.
   Also shown, not judged: the same with autograd (forward+backward, L <= 16384) and an N sweep at L=4096.

The profile of goal 1's ssm.S4 forward+backward (torch.profiler, top ops by self CPU time) is printed
after the goals. Writes benchmarks/results/goals.json and goals.png.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402
from plain_s4 import PlainS4  # noqa: E402

BYTES_CAUCHY_PER_HL = 256.0  # (H, N=64, L/2) complex64 per H*L
GRAD_MAX_L = 16384  # the informational forward+backward rows of goal 4 stop here (L=65536 takes minutes)


def s4_pair(B: int, L: int, H: int, N: int, device: str = "cpu", seed: int = 0):
    """(ssm.S4 layer, PlainS4 with the same parameters, input x (B, L, H))."""
    import ssm

    torch.manual_seed(seed)
    layer = ssm.S4(H, N, device=device)
    return layer, PlainS4.from_layer(layer), torch.randn(B, L, H, device=device)


def goal1(args) -> dict:
    B, L, H, N = args.sizes["g1"]
    layer, plain, x = s4_pair(B, L, H, N, args.device)
    with torch.no_grad():
        err = float((layer(x) - plain(x)).norm() / layer(x).norm())
    fns = {"ssm.S4": common.backward_fn(lambda: layer(x), list(layer.parameters())),
           "PlainS4": common.backward_fn(lambda: plain(x), list(plain.parameters()))}
    t = common.timeit_many(fns, device=args.device, repeats=args.repeats)
    measured = t["ssm.S4"]["median_s"] / t["PlainS4"]["median_s"]
    return {"goal": 1, "name": "S4 fwd+bwd / plain S4", "measured": measured, "target": 0.5,
            "pass": measured <= 0.5, "sizes": dict(B=B, L=L, H=H, N=N), "times": t, "output_rel_err": err,
            "detail": f"ssm.S4 {common.fmt_time(t['ssm.S4']['median_s'])}, "
                      f"PlainS4 {common.fmt_time(t['PlainS4']['median_s'])}"}


def goal2(args) -> dict:
    from ssm.ops.fftconv import fftconv

    B, L, H, N = args.sizes["g1"]
    import ssm

    torch.manual_seed(1)
    layer = ssm.S4(H, N, device=args.device).eval()
    x = torch.randn(B, L, H, device=args.device)
    u = x.transpose(1, 2).contiguous()  # (B, H, L)
    with torch.no_grad():
        K = layer.kernel(L)[0].clone()  # (H, L)
        D = layer.D[0].detach().clone()  # (H,)
        post_in = torch.randn(B, L, H, device=args.device)

    def layer_fwd():
        with torch.no_grad():
            return layer(x)

    def conv():
        with torch.no_grad():
            return fftconv(u, K, D)

    def post():  # what the layer adds after the convolution: GELU and the output projection
        with torch.no_grad():
            return layer.out_proj(torch.nn.functional.gelu(post_in))

    t = common.timeit_many({"layer": layer_fwd, "fftconv": conv, "gelu+out_proj": post}, device=args.device,
                           repeats=args.repeats)
    measured = t["layer"]["median_s"] / t["fftconv"]["median_s"]
    return {"goal": 2, "name": "S4 inference fwd / bare fftconv", "measured": measured, "target": 3.0,
            "pass": measured <= 3.0, "sizes": dict(B=B, L=L, H=H, N=N), "times": t,
            "detail": f"layer {common.fmt_time(t['layer']['median_s'])}, fftconv "
                      f"{common.fmt_time(t['fftconv']['median_s'])} (GELU + out_proj alone "
                      f"{common.fmt_time(t['gelu+out_proj']['median_s'])})"}


def goal3(args) -> dict:
    from ssm.kernels import rtf_kernel

    H, L, Ns = args.sizes["g3"]
    fns = {}
    for N in Ns:
        g = torch.Generator().manual_seed(N)
        b = (torch.randn(H, N + 1, generator=g) / math.sqrt(N + 1)).to(args.device)
        a = (0.5 * torch.randn(H, N, generator=g) / N).to(args.device)  # |sum a| < 1: poles in the unit disc

        def fn(b=b, a=a):
            with torch.no_grad():
                return rtf_kernel(b, a, L)
        fns[f"N={N}"] = fn
    t = common.timeit_many(fns, device=args.device, repeats=args.repeats)
    lo, hi = f"N={Ns[0]}", f"N={Ns[1]}"
    measured = t[hi]["median_s"] / t[lo]["median_s"]
    return {"goal": 3, "name": f"RTF kernel N={Ns[1]} / N={Ns[0]}", "measured": measured, "target": 1.5,
            "pass": measured <= 1.5, "sizes": dict(H=H, L=L, N=list(Ns)), "times": t,
            "detail": f"{hi} {common.fmt_time(t[hi]['median_s'])}, {lo} {common.fmt_time(t[lo]['median_s'])}"}


def build_dplr_case(H: int, N: int, L: int, grad: bool = False, device: str = "cpu", seed: int = 0):
    """A zero-argument callable generating the S4 kernel (H, L) with ``dplr_kernel`` (default backend).

    Parameters as the S4 layer holds them: HiPPO-LegS NPLR, N/2 stored modes, conj_pairs=True.
    With ``grad``, forward and backward of the kernel's sum.
    """
    from ssm.hippo import nplr
    from ssm.kernels import dplr_kernel

    torch.manual_seed(seed)
    Lambda, P, B, _ = nplr("legs", N, 1, half=True, dtype=torch.complex64)
    leaves = [Lambda.expand(H, -1).clone(), P[:, None].expand(1, H, -1).clone(), B.expand(H, -1).clone(),
              torch.randn(H, N // 2, dtype=torch.complex64),
              torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))]
    leaves = [t.to(device).requires_grad_(grad) for t in leaves]

    def run():
        with torch.set_grad_enabled(grad):
            K = dplr_kernel(*leaves[:4], leaves[4], L, disc="bilinear", conj_pairs=True)
            if grad:
                for t in leaves:
                    t.grad = None
                K.sum().backward()
        return K
    return run


def goal4(args) -> dict:
    H, N, Ls, Ns_info, L_info = args.sizes["g4"]
    rows = []
    with common.MemoryProbe(__file__, "build_dplr_case", device=args.device) as probe:
        for grad in (False, True):
            for L in (L for L in Ls if not grad or L <= GRAD_MAX_L):
                case = dict(H=H, N=N, L=L, grad=grad, device=args.device)
                m = probe.measure(case)
                row = {**case, **m}
                if "peak_bytes" in m:
                    row["bytes_per_HL"] = m["peak_bytes"] / (H * L)
                rows.append(row)
                print(f"  dplr_kernel {'fwd+bwd' if grad else 'fwd    '} L={L:<6d}"
                      f" {common.fmt_time(m.get('worker_seconds')):>10s} (one call)"
                      f"  peak {common.fmt_bytes(m.get('peak_bytes'))}"
                      f"  {row.get('bytes_per_HL', float('nan')):.1f} B per H*L", flush=True)
        for Nn in Ns_info:
            case = dict(H=H, N=Nn, L=L_info, grad=False, device=args.device)
            m = probe.measure(case)
            row = {**case, "sweep": "N", **m}
            if "peak_bytes" in m:
                row["bytes_per_HL"] = m["peak_bytes"] / (H * L_info)
            rows.append(row)
            print(f"  dplr_kernel fwd     N={Nn:<4d} L={L_info}  peak {common.fmt_bytes(m.get('peak_bytes'))}"
                  f"  {row.get('bytes_per_HL', float('nan')):.1f} B per H*L", flush=True)
    fwd = {r["L"]: r.get("bytes_per_HL") for r in rows if not r["grad"] and "sweep" not in r}
    base_L = 4096 if 4096 in fwd else Ls[0]
    last = fwd.get(Ls[-1])
    growth = common.ratio(last, fwd.get(base_L))
    ok = growth is not None and growth <= 1.5 and last is not None and last < BYTES_CAUCHY_PER_HL
    return {"goal": 4, "name": f"S4 kernel peak memory, bytes per H*L at L={Ls[-1]}",
            "measured": last, "target": f"flat (<= 1.5x of L={base_L}) and < {BYTES_CAUCHY_PER_HL:.0f} B",
            "pass": bool(ok), "growth_vs_base": growth, "sizes": dict(H=H, N=N, L=list(Ls)), "rows": rows,
            "detail": "bytes/(H*L) by L: "
                      + ", ".join(f"{L}: {v:.1f}" for L, v in fwd.items() if v is not None)}


SIZES = {
    "full": {"g1": (4, 4096, 128, 64), "g3": (256, 8192, (16, 1024)),
             "g4": (256, 64, (1024, 4096, 16384, 65536), (16, 64, 128), 4096)},
    "quick": {"g1": (1, 256, 16, 8), "g3": (16, 256, (16, 64)),
              "g4": (16, 8, (256, 1024), (8, 16), 512)},
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="the performance goals: measured / target / PASS or MISS")
    common.add_common_args(parser, threads=2)
    parser.add_argument("--no-profile", action="store_true", help="skip the profile of goal 1")
    parser.add_argument("--goals", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 2
    args.sizes = SIZES["quick" if args.quick else "full"]
    common.setup(args)
    info = common.machine_info(args.device)
    print(f"goals: torch {info['torch']}, {info['threads']} threads, {info['cpu']}, "
          f"load {info.get('load_avg_1m')}")
    runners = {1: goal1, 2: goal2, 3: goal3, 4: goal4}
    results = []
    for g in args.goals:
        if g == 4 and args.no_memory:
            continue
        print(f"goal {g} ...", flush=True)
        results.append(runners[g](args))

    def fmt_measured(r):
        if r["goal"] == 4:
            if r["measured"] is None:
                return "-"
            return f"{r['measured']:.1f} B/(H*L) ({common.fmt_ratio(r['growth_vs_base'])})"
        return common.fmt_ratio(r["measured"])

    def fmt_target(r):
        return r["target"] if isinstance(r["target"], str) else f"<= {r['target']:g}x"

    table = common.format_table(
        ["goal", "what", "measured", "target", "verdict"],
        [[r["goal"], r["name"], fmt_measured(r), fmt_target(r), "PASS" if r["pass"] else "MISS"]
         for r in results],
        left=2)
    print()
    print(table)
    for r in results:
        print(f"  goal {r['goal']}: {r['detail']}")

    profile = None
    if not args.no_profile and 1 in args.goals:
        B, L, H, N = args.sizes["g1"]
        layer, _, x = s4_pair(B, L, H, N, args.device)
        text, top = common.profile_table(common.backward_fn(lambda: layer(x), list(layer.parameters())),
                                         device=args.device, row_limit=20)
        print(f"\nprofile of goal 1, ssm.S4 forward+backward (B={B} L={L} H={H} N={N}), "
              "top ops by self CPU time:")
        print(text)
        profile = {"table": text, "top": top}

    payload = {"benchmark": "goals", "machine": info, "config": {"repeats": args.repeats, "quick": args.quick,
               "sizes": args.sizes}, "goals": results, "table": table, "profile": profile}
    path = common.write_json(args.out / "goals.json", payload)

    def draw(axes):
        timed = [r for r in results if r["goal"] in (1, 2, 3)]
        axes[0].bar([f"goal {r['goal']}" for r in timed], [r["measured"] for r in timed],
                    color=["tab:green" if r["pass"] else "tab:red" for r in timed])
        for i, r in enumerate(timed):
            axes[0].plot([i - 0.4, i + 0.4], [r["target"]] * 2, "k--")
        axes[0].set_ylabel("measured ratio (dashed: target)")
        axes[0].set_title("goals 1-3 (lower is better)")
        g4 = [r for r in results if r["goal"] == 4]
        if g4:
            for grad, label in ((False, "no grad"), (True, "fwd+bwd")):
                pts = [(r["L"], r["bytes_per_HL"]) for r in g4[0]["rows"]
                       if r["grad"] == grad and "sweep" not in r and r.get("bytes_per_HL")]
                if pts:
                    axes[1].plot(*zip(*pts), "o-", label=label)
            axes[1].axhline(BYTES_CAUCHY_PER_HL, color="k", ls="--", label="materialized Cauchy")
            common.style_axes(axes[1], xlabel="L", ylabel="peak bytes / (H*L)",
                              title="goal 4: S4 kernel memory")

    common.save_plot(args.out / "goals.png", draw, ncols=2)
    print(f"\nwrote {path} and {args.out / 'goals.png'}")
    return payload


if __name__ == "__main__":
    main()
