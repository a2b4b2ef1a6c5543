"""Stream a long signal through an SSM model in chunks, carrying the recurrent state between them.

A stack of S4 / S4D / RTF layers (``ssm.SSMModel`` with ``pool="none"``: one output per time step) filters a
100,000-step noisy multi-sine with a chirp three ways, which give the same output up to float rounding:

* one pass: ``model(x)``, one FFT convolution over the whole signal per layer;
* chunks: ``y, state = model(x_chunk, state=state, return_state=True)`` chunk after chunk; each layer adds
  the response to the carried state (its zero-input response) to the convolution of the chunk, and
  returns the state after the chunk. Memory is bounded by the chunk, whatever the length of the stream;
* steps: ``y_t, state = model.step(x_t, state)`` for a prefix, the recurrence one sample at a time
  (the path for real-time, sample-by-sample input).

    python examples/streaming_inference.py                         # S4D, 100k samples, chunks of 4096
    python examples/streaming_inference.py --layer s4 --chunk 1000
    python examples/streaming_inference.py --layer rtf --double    # float64: differences at rounding level

Prints the max abs difference of chunked and stepped outputs against the one pass and the throughput of
each path in samples/s (the one pass twice: in eval mode the second call reuses the cached kernels; the
chunked pass computes one kernel per chunk length, then pays for the state passing of every chunk).
``main(argv)`` returns the figures as a dict (tests/test_examples_dropin.py).

Measured with the defaults (2 layers, d_model 32, N 64, one thread) on a shared, busy 2-core CPU, in
samples/s: one pass / again with the cached kernels / 25 chunks of 4096 / step; max |chunked - one pass|
relative to the output scale:

    S4D   29,000 / 128,000 / 22,000 / 550    4e-5
    S4    24,000 / 165,000 / 16,000 / 460    2e-5
    RTF   50,000 / 173,000 / 42,000 / 770    1e-6

and with ``--double`` (S4D) the chunked and stepped outputs agree with the one pass to 3e-14 and 1e-14.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import torch
import training_harness as harness  # before ssm: from a checkout it makes the repository's ssm importable

import ssm


def make_signal(length: int, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A noisy multi-sine plus a linear chirp, (1, length, 1): periods from 20 to 5,000 samples."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float64)
    x = sum(a * torch.sin(2 * math.pi * t / p + phase)
            for a, p, phase in ((1.0, 5000.0, 0.3), (0.5, 731.0, 1.1), (0.25, 97.0, 2.0), (0.1, 20.0, 0.5)))
    x = x + 0.3 * torch.sin(2 * math.pi * (t / 2000.0 + t**2 / (100.0 * length)))  # chirp: period 2000 -> 49
    x = x + 0.2 * torch.randn(length, generator=g, dtype=torch.float64)
    return x.to(dtype)[None, :, None]


def build_model(layer: str, *, d_model: int, n_layers: int, d_state: int, dtype: torch.dtype) -> ssm.SSMModel:
    """A causal SSM stack with one output per step, in eval mode (kernels cached per length)."""
    # Mamba2's heads of 64 channels need a multiple of 64 inner channels: smaller widths take smaller heads
    extra = {"headdim": math.gcd(64, 2 * d_model)} if layer == "mamba2" else None
    model = ssm.SSMModel(1, 1, d_model=d_model, n_layers=n_layers, layer=layer, d_state=d_state, pool="none",
                         dtype=dtype, layer_kwargs=extra)
    return model.eval()


@torch.no_grad()
def run_chunks(model: ssm.SSMModel, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Outputs (1, L, 1) of ``x`` fed in chunks of ``chunk`` steps, the state carried from one to the next."""
    state = model.default_state(x.shape[0])
    outs = []
    for start in range(0, x.shape[1], chunk):
        y, state = model(x[:, start : start + chunk], state=state, return_state=True)
        outs.append(y)
    return torch.cat(outs, dim=1)


@torch.no_grad()
def run_steps(model: ssm.SSMModel, x: torch.Tensor) -> torch.Tensor:
    """Outputs (1, L, 1) of ``x`` fed one sample at a time through ``step``."""
    state = model.default_state(x.shape[0])
    outs = []
    for t in range(x.shape[1]):
        y, state = model.step(x[:, t], state)
        outs.append(y)
    return torch.stack(outs, dim=1)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def build_parser() -> argparse.ArgumentParser:
    p = harness.ExampleParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", default="s4d", choices=tuple(ssm.layers.LAYERS), help="SSM layer of the stack")
    p.add_argument("--length", type=int, default=100_000, help="samples in the signal")
    p.add_argument("--chunk", type=int, default=4096, help="samples per chunk")
    p.add_argument("--step-prefix", type=int, default=2000, help="samples fed one at a time through step")
    p.add_argument("--d-model", type=int, default=32, help="width H of the stack")
    p.add_argument("--n-layers", type=int, default=2, help="SSM blocks in the stack")
    p.add_argument("--d-state", type=int, default=64, help="state size N of every layer")
    p.add_argument("--double", action="store_true", help="run in float64")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default); 1 is the fastest for these small "
                        "models on a small or shared CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization and the signal's noise")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("length", "chunk", "d_model", "n_layers", "d_state"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.step_prefix <= args.length:
        p.error("--step-prefix must lie in [0, --length]")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = torch.float64 if args.double else torch.float32
    x = make_signal(args.length, seed=args.seed, dtype=dtype)
    model = build_model(args.layer, d_model=args.d_model, n_layers=args.n_layers, d_state=args.d_state,
                        dtype=dtype)
    print(f"{args.n_layers} x {args.layer} (d_model={args.d_model}, d_state={args.d_state}, {dtype}), "
          f"signal of {args.length:,} samples, {torch.get_num_threads()} threads")

    with torch.no_grad():
        y_full, t_full = timed(model, x)  # includes computing the length-100k kernels
        _, t_cached = timed(model, x)  # eval mode: the kernels are cached
    y_chunk, t_chunk = timed(run_chunks, model, x, args.chunk)
    scale = float(y_full.abs().max())
    chunk_diff = float((y_chunk - y_full).abs().max())
    result = {
        "layer": args.layer,
        "length": args.length,
        "output_scale": scale,
        "chunk_max_abs_diff": chunk_diff,
        "one_pass_samples_per_s": args.length / t_full,
        "one_pass_cached_samples_per_s": args.length / t_cached,
        "chunked_samples_per_s": args.length / t_chunk,
    }
    n_chunks = -(-args.length // args.chunk)
    print(f"  one pass          {args.length / t_full:14,.0f} samples/s   ({t_full:.3f} s)")
    print(f"  again, cached kernel{args.length / t_cached:12,.0f} samples/s   ({t_cached:.3f} s)")
    print(f"  {n_chunks:4d} chunks of {args.chunk:<5d}{args.length / t_chunk:12,.0f} samples/s   "
          f"({t_chunk:.3f} s)   "
          f"max |chunked - one pass| = {chunk_diff:.2e}  (outputs up to {scale:.2f})")
    if args.step_prefix:
        P = args.step_prefix
        y_step, t_step = timed(run_steps, model, x[:, :P])
        step_diff = float((y_step - y_full[:, :P]).abs().max())
        result.update(step_prefix=P, step_max_abs_diff=step_diff, step_samples_per_s=P / t_step)
        print(f"  step, first {P:<6d}{P / t_step:12,.0f} samples/s   ({t_step:.3f} s)   "
              f"max |step - one pass|    = {step_diff:.2e}")
    return result


if __name__ == "__main__":
    harness.run_cli(main)
