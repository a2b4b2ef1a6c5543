"""Assisted generation on a swapped GPT-2: tokens per second against plain greedy, and what the cache holds.

    python benchmarks/assisted.py            # GPT-2 + S4D, H=256, 8 blocks, vocab 1024, 64 new tokens
    python benchmarks/assisted.py --quick    # tiny sizes, seconds

The main model is a random GPT-2 whose attention ``ssm.integrations.hf.swap_attention`` replaced (--layer,
d_state --N), in eval mode, float32. The ways to generate --tokens tokens greedily after a --prompt-token
prompt, interleaved in one process (``timeit_many``), all giving the same tokens (checked):

    greedy         model.generate(ids, do_sample=False)
    assisted       model.generate(ids, assistant_model=draft, do_sample=False), the draft drafting
                   --draft-tokens tokens a round (its confidence threshold off, so it always drafts that
                   many); the main model verifies them in one forward and the cache is cropped back to
                   the last accepted token. The SSM layers run the last ``cache_window`` + 1 tokens of
                   a call (all of a verified draft) as a loop of ``step``, keeping their states for
                   ``crop`` at no cost
    greedy, cache_window=0
                   plain greedy keeping no states for ``crop`` (what keeping them costs)
    lookup         model.generate(ids, prompt_lookup_num_tokens=--draft-tokens), the prompt a repeated
                   segment (so that n-gram lookup finds candidates), against greedy on that prompt

The draft is the main model's first block with its embeddings and head (one block of --blocks). Random
weights agree with nothing, so the main model is made to agree with its draft by construction: the output
projections of its later blocks are scaled by --damp (0 = the draft is exact, 1 = unrelated). The
acceptance (new tokens per forward of the main model) is reported with each row: the speed-up follows it,
and a trained pair sets its own. Also reported: the bytes the generation cache holds after the run
(the SSM states and the states kept for ``crop``, ``cache_window``; load-independent). Writes
benchmarks/results/assisted.json and assisted.png.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

WAYS = ("greedy", "greedy, cache_window=0", "assisted", "greedy (lookup prompt)", "lookup")


def build_models(layer: str, H: int, N: int, blocks: int, vocab: int, damp: float, window: int,
                 seed: int = 0):
    """(main, draft): a swapped GPT-2 of ``blocks`` blocks and its one-block draft (same embeddings, first
    block and head); the later blocks' output projections scaled by ``damp``."""
    import transformers

    from ssm.integrations.hf import swap_attention

    def gpt2(n_layer: int):
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=H, n_layer=n_layer, n_head=4,
                                      pad_token_id=0, bos_token_id=None, eos_token_id=None)
        model = transformers.GPT2LMHeadModel(cfg)
        return swap_attention(model, layer, d_state=N, cache_window=window).eval()

    torch.manual_seed(seed)
    main, draft = gpt2(blocks), gpt2(1)
    with torch.no_grad():
        for block in main.transformer.h[1:]:
            for proj in (block.attn.layer.out_proj, block.mlp.c_proj):
                proj.weight.mul_(damp)
                proj.bias.mul_(damp)
    draft.load_state_dict({k: v for k, v in main.state_dict().items()
                           if not k.startswith("transformer.h.") or k.startswith("transformer.h.0.")})
    return main, draft


def cache_bytes(cache) -> int:
    """Bytes of the tensors a generation cache holds (the SSM states and the kept ones)."""
    from ssm.integrations.hf import SSMCacheLayer
    from ssm.layers.base import state_leaves

    total = 0
    for entry in cache.layers:
        if isinstance(entry, SSMCacheLayer):
            for s in [entry.state, *entry.history]:
                if s is not None:
                    total += sum(t.numel() * t.element_size() for t in state_leaves(s))
    return total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="assisted generation on a swapped GPT-2 against greedy")
    common.add_common_args(parser, threads=1)
    parser.add_argument("--layer", default="s4d")
    parser.add_argument("--H", type=int, default=256)
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens")
    parser.add_argument("--draft-tokens", type=int, default=6, help="tokens drafted a round")
    parser.add_argument("--damp", type=float, default=0.02)
    parser.add_argument("--window", type=int, default=20, help="cache_window of the swapped models")
    args = parser.parse_args(argv)
    if args.quick:
        args.H, args.N, args.blocks, args.vocab = 16, 4, 2, 64
        args.prompt, args.tokens, args.repeats = 8, 8, 1
    common.setup(args)
    info = common.machine_info(args.device)
    load = os.getloadavg()
    print(f"assisted generation: GPT-2 + {args.layer}, H={args.H} N={args.N} blocks={args.blocks} "
          f"vocab={args.vocab}, prompt {args.prompt}, {args.tokens} new tokens, {args.draft_tokens} drafted, "
          f"damp {args.damp}; torch {info['torch']}, {info['threads']} threads, load {load[0]:.1f}")
    main_model, draft = build_models(args.layer, args.H, args.N, args.blocks, args.vocab, args.damp,
                                     args.window)
    main_model.to(args.device)
    draft.to(args.device)
    draft.generation_config.num_assistant_tokens = args.draft_tokens
    draft.generation_config.assistant_confidence_threshold = 0.0
    from ssm.integrations.hf import SSMAttention

    adapters = [m for m in main_model.modules() if isinstance(m, SSMAttention)]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (1, args.prompt), generator=g).to(args.device)
    seg = torch.randint(1, args.vocab, (1, max(args.prompt // 4, 2)), generator=g)
    looped = seg.repeat(1, args.prompt // seg.shape[1] + 1)[:, :args.prompt].to(args.device)
    opts = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "do_sample": False,
            "pad_token_id": 0, "return_dict_in_generate": True}
    calls = {"n": 0}
    main_model.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    def keeping_none():
        for a in adapters:
            a.cache_window = 0
        try:
            return main_model.generate(ids, attention_mask=torch.ones_like(ids), **opts)
        finally:
            for a in adapters:
                a.cache_window = args.window

    runs = {
        "greedy": lambda: main_model.generate(ids, attention_mask=torch.ones_like(ids), **opts),
        "greedy, cache_window=0": keeping_none,
        "assisted": lambda: main_model.generate(ids, attention_mask=torch.ones_like(ids),
                                                assistant_model=draft, **opts),
        "greedy (lookup prompt)": lambda: main_model.generate(looped, attention_mask=torch.ones_like(looped),
                                                              **opts),
        "lookup": lambda: main_model.generate(looped, attention_mask=torch.ones_like(looped),
                                              prompt_lookup_num_tokens=args.draft_tokens, **opts),
    }
    outs, forwards, held = {}, {}, {}
    with torch.no_grad():
        for way, fn in runs.items():  # once, to check the tokens and count the main model's forwards
            calls["n"] = 0
            out = fn()
            outs[way], forwards[way], held[way] = out.sequences, calls["n"], cache_bytes(out.cache)
        same = {"assisted": torch.equal(outs["assisted"], outs["greedy"]),
                "greedy, cache_window=0": torch.equal(outs["greedy, cache_window=0"], outs["greedy"]),
                "lookup": torch.equal(outs["lookup"], outs["greedy (lookup prompt)"])}
        res = common.timeit_many(runs, device=args.device, warmup=1, repeats=args.repeats)
    rows = []
    for way in WAYS:
        base = "greedy (lookup prompt)" if way == "lookup" else "greedy"
        tps = args.tokens / res[way]["median_s"]
        rows.append({"way": way, **res[way], "tokens_per_s": tps,
                     "speedup": common.ratio(res[base]["median_s"], res[way]["median_s"]),
                     "main_forwards": forwards[way], "tokens_per_forward": args.tokens / forwards[way],
                     "cache_bytes": held[way], "same_tokens_as_greedy": same.get(way, True)})
    headers = ["way", "tokens/s", "x greedy", "tokens/forward", "cache", "same tokens"]
    table = common.format_table(headers, [
        [r["way"], f"{r['tokens_per_s']:.1f}", common.fmt_ratio(r["speedup"]),
         f"{r['tokens_per_forward']:.2f}", common.fmt_bytes(r["cache_bytes"]),
         str(r["same_tokens_as_greedy"])]
        for r in rows])
    print(f"\n{args.tokens} new tokens (median of {args.repeats} interleaved rounds)\n{table}")
    payload = {"benchmark": "assisted", "machine": info, "loadavg": list(load) + list(os.getloadavg()),
               "config": {k: getattr(args, k) for k in ("layer", "H", "N", "blocks", "vocab", "prompt",
                                                        "tokens", "draft_tokens", "damp", "window", "repeats",
                                                        "quick")},
               "rows": rows, "table": table}
    path = common.write_json(args.out / "assisted.json", payload)

    def draw(ax):
        ax.bar([r["way"] for r in rows], [r["tokens_per_s"] for r in rows])
        ax.set_ylabel("new tokens per second (median)")
        ax.tick_params(axis="x", labelsize=7)

    common.save_plot(args.out / "assisted.png", draw)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
