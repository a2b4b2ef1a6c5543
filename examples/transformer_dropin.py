"""Replace self-attention by an ``ssm`` layer in a standard PyTorch Transformer.

An ``ssm`` layer maps (B, L, H) to (B, L, H) like self-attention, so the swap is one line in each block:

    class DecoderBlock(nn.Module):                       # GPT-style, pre-LN
        def __init__(self, d_model, n_heads, max_len):
            self.ln_1 = nn.LayerNorm(d_model)
    -       self.mixer = SelfAttention(d_model, n_heads, causal=True, max_len=max_len)
    +       self.mixer = ssm.S4D(d_model, d_state=64)                       # or ssm.S4, ssm.RTF
            self.ln_2 = nn.LayerNorm(d_model)
            self.mlp = MLP(d_model)

        def forward(self, x):                            # unchanged
            x = x + self.mixer(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class EncoderBlock(nn.Module):                       # BERT-style, pre-LN, padding by lengths
    -       self.mixer = SelfAttention(d_model, n_heads, causal=False, max_len=max_len)
    +       self.mixer = ssm.S4D(d_model, d_state=64, bidirectional=True)

Below, ``make_mixer`` holds that swap behind a ``mixer`` argument: "attention" | "s4" | "s4d" | "rtf". The
attention module exposes the API of the ``ssm`` layers, ``forward(x, state=None, *, return_state=False,
lengths=None)``, ``step(x_t, state)`` and ``default_state(B)``, its state being a KV cache, so the blocks and
the model never ask which mixer they hold. Three differences remain, all outside the blocks: the SSM model
needs no positional embedding (the convolution is position-aware), its recurrent state has a fixed size
where the KV cache grows with the context, and the SSM parameters take their own learning rate
(``ssm.optim.make_optimizer`` reads the hints the layers attach to them).

What the script does (``python examples/transformer_dropin.py``, a few minutes on a CPU):

1. Trains a GPT-style decoder with the chosen mixer (default S4D) on a generated task that needs memory of
   D steps: periodic sequences s_t = s_(t-D) whose first D tokens are random, next-token prediction scored
   on the determined positions t >= D. Prints loss and accuracy every ``--log-every`` steps.
2. Prompts the trained model with D fresh random tokens and generates autoregressively: the prompt goes
   through ``forward(..., return_state=True)`` (prefill), every new token through ``step`` with the
   constant-size state. Prints the copy accuracy of the generated tokens and checks that the logits of
   prefill + steps equal those of one full forward over the generated sequence (assert close).
3. Checks the encoder block: bidirectional mixers see the future, and padding (``lengths``) does not leak
   into the valid positions.
4. Times one decoding step of the SSM model (state of fixed size) against the attention model with a KV
   cache at a few context lengths (``--contexts``), both with width ``--bench-d-model`` and random weights
   (the cost of a step does not depend on the values): constant per-token cost against a growing one.

Measured with the defaults (D = 64, sequences of 256, 300 steps, one thread) on a shared, busy 2-core CPU:
held-out accuracy after training / copy accuracy of the generated tokens / training time: S4D 99.7% /
99.3% / 111 s (2 min 49 s for the whole script), S4 98.4% / 95.7% / 182 s, RTF 100% / 100% / 85 s, and the
attention model (with learned positions) 100% / 100% / 115 s: the task needs memory, and all four have
it. Per-token latency at d_model = 256, 2 layers, median (min) over 100 steps: S4D 1.8 (1.2) ms at every
context with a 0.12 MiB state; attention with a KV cache 2.0 (0.6) ms at 256 tokens, 6.9 (2.3) ms at
4,096 and 23.5 (18.2) ms at 32,768, its cache growing from 1.4 to 128 MiB.

``main(argv)`` returns the figures as a dict (used by tests/test_examples_dropin.py with tiny sizes).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import training_harness as harness  # before ssm: from a checkout it makes the repository's ssm importable
from torch import Tensor, nn

import ssm

MIXERS = ("attention", "s4", "s4d", "rtf")


# ---- self-attention with a KV cache, exposing the API of the ssm layers ------------------------------------
class KVCache:
    """Keys and values of the tokens seen so far: preallocated (B, heads, max_len, head_dim) buffers."""

    def __init__(self, batch_size: int, n_heads: int, max_len: int, head_dim: int, *, device=None,
                 dtype=None) -> None:
        shape = (batch_size, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> None:
        """Store k, v (B, heads, T, head_dim) after the cached tokens."""
        T = k.shape[2]
        if self.length + T > self.k.shape[2]:
            raise ValueError(f"the KV cache holds max_len={self.k.shape[2]} tokens; cannot append {T} to "
                             f"{self.length}")
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T

    def nbytes(self) -> int:
        """Bytes of the cache in use (the filled part of both buffers)."""
        per_token = self.k[:, :, :1].numel() * self.k.element_size()
        return 2 * per_token * self.length


class SelfAttention(nn.Module):
    """Multi-head self-attention (F.scaled_dot_product_attention) with the call signature of ``ssm`` layers.

    forward(x (B, L, H), state=None, *, return_state=False, lengths=None) -> (B, L, H) [, KVCache]
    step(x_t (B, H), state: KVCache) -> ((B, H), KVCache);   default_state(B) -> empty KVCache.
    ``lengths`` masks padded keys (encoder); ``state`` continues from a cache (decoder prefill).
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool, max_len: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model must be divisible by n_heads={n_heads}; got {d_model}")
        self.n_heads, self.head_dim, self.causal, self.max_len = n_heads, d_model // n_heads, causal, max_len
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, H) -> q, k, v (B, heads, T, head_dim)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def _merge(self, y: Tensor) -> Tensor:
        B, _, T, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))

    def default_state(self, batch_size: int, *, device=None) -> KVCache:
        w = self.qkv.weight
        return KVCache(batch_size, self.n_heads, self.max_len, self.head_dim,
                       device=device if device is not None else w.device, dtype=w.dtype)

    def forward(self, x: Tensor, state: KVCache | None = None, *, return_state: bool = False,
                lengths: Tensor | None = None):
        q, k, v = self._heads(x)
        T = x.shape[1]
        mask = None
        if lengths is not None:  # (B, 1, 1, T): padded keys are never attended to
            mask = (torch.arange(T, device=x.device)[None, :] < lengths[:, None])[:, None, None, :]
            if self.causal:
                mask = mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if state is None and not return_state:
            causal = self.causal and mask is None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            return self._merge(y)
        if not self.causal or lengths is not None:
            raise ValueError("state passing needs a causal attention without lengths")
        cache = self.default_state(x.shape[0]) if state is None else state
        start = cache.length
        cache.append(k, v)
        keys = torch.arange(cache.length, device=x.device)
        mask = keys[None, :] <= (start + torch.arange(T, device=x.device))[:, None]  # (T, start+T)
        y = F.scaled_dot_product_attention(q, cache.k[:, :, : cache.length], cache.v[:, :, : cache.length],
                                           attn_mask=mask)
        y = self._merge(y)
        return (y, cache) if return_state else y

    def step(self, x_t: Tensor, state: KVCache) -> tuple[Tensor, KVCache]:
        q, k, v = self._heads(x_t[:, None])
        state.append(k, v)
        y = F.scaled_dot_product_attention(q, state.k[:, :, : state.length], state.v[:, :, : state.length])
        return self._merge(y)[:, 0], state


# ---- the swap ----------------------------------------------------------------------------------------------
def make_mixer(mixer: str, d_model: int, *, causal: bool, n_heads: int = 4, d_state: int = 64,
               max_len: int = 4096) -> nn.Module:
    """The token mixer of a block: self-attention, or an ``ssm`` layer in its place."""
    if mixer == "attention":
        return SelfAttention(d_model, n_heads, causal=causal, max_len=max_len)
    if mixer == "s4":
        return ssm.S4(d_model, d_state, init="legs", bidirectional=not causal)
    if mixer == "s4d":
        return ssm.S4D(d_model, d_state, init="diag-lin", bidirectional=not causal)
    if mixer == "rtf":
        return ssm.RTF(d_model, d_state, bidirectional=not causal)
    raise ValueError(f"mixer must be one of {', '.join(repr(m) for m in MIXERS)}; got {mixer!r}")


class MLP(nn.Sequential):
    def __init__(self, d_model: int, expand: int = 4) -> None:
        hidden = expand * d_model
        super().__init__(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))


class DecoderBlock(nn.Module):
    """GPT-style pre-LN block: x + mixer(LN(x)), then x + MLP(LN(x)); the mixer is causal."""

    def __init__(self, d_model: int, mixer: str, **mixer_kwargs) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.mixer = make_mixer(mixer, d_model, causal=True, **mixer_kwargs)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: Tensor, state=None, *, return_state: bool = False):
        out = self.mixer(self.ln_1(x), state, return_state=return_state)
        z, state = out if return_state else (out, None)
        x = x + z
        x = x + self.mlp(self.ln_2(x))
        return (x, state) if return_state else x

    def step(self, x_t: Tensor, state) -> tuple[Tensor, object]:
        z, state = self.mixer.step(self.ln_1(x_t), state)
        x_t = x_t + z
        return x_t + self.mlp(self.ln_2(x_t)), state


class EncoderBlock(nn.Module):
    """BERT-style pre-LN block with a bidirectional mixer; ``lengths`` (B,) marks the valid positions."""

    def __init__(self, d_model: int, mixer: str, **mixer_kwargs) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.mixer = make_mixer(mixer, d_model, causal=False, **mixer_kwargs)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        x = x + self.mixer(self.ln_1(x), lengths=lengths)
        return x + self.mlp(self.ln_2(x))


class Decoder(nn.Module):
    """Token embedding (+ learned positions for attention) -> blocks -> LN -> vocabulary logits."""

    def __init__(self, vocab: int, d_model: int, n_layers: int, mixer: str, *, n_heads: int = 4,
                 d_state: int = 64, max_len: int = 4096) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        # Attention is permutation-invariant without positions; the SSM's convolution is position-aware.
        self.pos = nn.Embedding(max_len, d_model) if mixer == "attention" else None
        self.blocks = nn.ModuleList(
            DecoderBlock(d_model, mixer, n_heads=n_heads, d_state=d_state, max_len=max_len)
            for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def _embed(self, idx: Tensor, start: int) -> Tensor:
        x = self.tok(idx)
        if self.pos is not None:
            x = x + self.pos(torch.arange(start, start + idx.shape[-1], device=idx.device))
        return x

    def forward(self, idx: Tensor) -> Tensor:
        """idx (B, L) -> logits (B, L, vocab)."""
        x = self._embed(idx, 0)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def default_state(self, batch_size: int) -> list:
        return [block.mixer.default_state(batch_size) for block in self.blocks]

    def prefill(self, idx: Tensor) -> tuple[Tensor, list]:
        """Run a prompt idx (B, T) through the convolutional path; return its logits and the state after."""
        x = self._embed(idx, 0)
        new_state = []
        for block, s in zip(self.blocks, self.default_state(idx.shape[0])):
            x, s = block(x, s, return_state=True)
            new_state.append(s)
        return self.head(self.ln_f(x)), new_state

    def step(self, token: Tensor, state: list, t: int) -> tuple[Tensor, list]:
        """One token (B,) at position t -> logits (B, vocab) and the next state."""
        x = self._embed(token[:, None], t)[:, 0]
        new_state = []
        for block, s in zip(self.blocks, state):
            x, s = block.step(x, s)
            new_state.append(s)
        return self.head(self.ln_f(x)), new_state


def state_nbytes(state: list) -> int:
    """Bytes held by a decoder state: SSM state tensors, or the filled part of KV caches."""
    return sum(s.nbytes() if isinstance(s, KVCache) else s.numel() * s.element_size() for s in state)


# ---- the task: periodic sequences with period D ------------------------------------------------------------
def periodic_batch(batch: int, length: int, delay: int, vocab: int, generator: torch.Generator) -> Tensor:
    """Sequences (batch, length) with s_t = s_(t - delay): ``delay`` random tokens, then repeats."""
    head = torch.randint(vocab, (batch, delay), generator=generator)
    return head.repeat(1, -(-length // delay))[:, :length]


def loss_and_accuracy(model: Decoder, seq: Tensor, delay: int) -> tuple[Tensor, float]:
    """Next-token loss and accuracy on the positions determined by the past (targets s_t with t >= delay)."""
    logits = model(seq[:, :-1])[:, delay - 1 :]
    target = seq[:, delay:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    return loss, float((logits.argmax(-1) == target).float().mean())


def train(model: Decoder, args, generator: torch.Generator, log=print) -> dict:
    opt = ssm.optim.make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    base = [g["lr"] for g in opt.param_groups]
    warmup = max(1, args.steps // 20)
    history = []
    t0 = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        scale = min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group, lr in zip(opt.param_groups, base):
            group["lr"] = lr * max(scale, 0.02)
        seq = periodic_batch(args.batch_size, args.seq_len + 1, args.delay, args.vocab, generator)
        loss, acc = loss_and_accuracy(model, seq, args.delay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps:
            history.append((step, loss.item(), acc))
            elapsed = time.perf_counter() - t0
            log(f"  step {step:5d}  loss {loss.item():.4f}  acc {acc:6.1%}  ({elapsed:6.1f} s)")
    model.eval()
    with torch.no_grad():
        seq = periodic_batch(256, args.seq_len + 1, args.delay, args.vocab, generator)
        loss, acc = loss_and_accuracy(model, seq, args.delay)
    return {"train_seconds": time.perf_counter() - t0, "history": history, "eval_loss": float(loss),
            "eval_accuracy": acc}


# ---- generation --------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: Decoder, prompt: Tensor, n_new: int) -> tuple[Tensor, Tensor, int]:
    """Greedy continuation: prefill the prompt, then one ``step`` per token.

    Returns the sequence (B, T + n_new), the logits that produced every position after the first
    (B, T + n_new - 1, vocab) and the peak size of the decoding state in bytes.
    """
    T = prompt.shape[1]
    logits, state = model.prefill(prompt)
    all_logits = [logits]
    tokens = [prompt]
    token = logits[:, -1].argmax(-1)
    peak = state_nbytes(state)
    for t in range(T, T + n_new):
        tokens.append(token[:, None])
        if t == T + n_new - 1:
            break
        logits_t, state = model.step(token, state, t)
        all_logits.append(logits_t[:, None])
        peak = max(peak, state_nbytes(state))
        token = logits_t.argmax(-1)
    return torch.cat(tokens, 1), torch.cat(all_logits, 1), peak


# ---- encoder checks ----------------------------------------------------------------------------------------
@torch.no_grad()
def check_encoder(mixer: str, d_model: int, d_state: int, length: int) -> dict:
    """A bidirectional block sees the future (token 3 moves position 0), and padding beyond ``lengths`` does
    not reach valid positions."""
    block = EncoderBlock(d_model, mixer, n_heads=4, d_state=d_state, max_len=length).eval()
    x = torch.randn(2, length, d_model)
    lengths = torch.tensor([length, length // 2])
    y = block(x, lengths)
    x2 = x.clone()
    x2[1, length // 2 :] = torch.randn(length - length // 2, d_model)  # change only padding
    x2[0, 3] = torch.randn(d_model)  # change a later token of the full sequence
    y2 = block(x2, lengths)
    leak = float((y2[1, : length // 2] - y[1, : length // 2]).abs().max())
    sees_future = float((y2[0, 0] - y[0, 0]).abs().max())
    return {"padding_leak": leak, "first_position_change": sees_future}


# ---- latency -----------------------------------------------------------------------------------------------
@torch.no_grad()
def step_latency(model: Decoder, context: int, n_steps: int, vocab: int) -> tuple[float, float, int]:
    """Median and minimum seconds of one ``step`` after ``context`` tokens, and the state size in bytes.

    The minimum is the better estimate of the cost on a busy machine, the median of what a user sees.

    The SSM state is reached by a real prefill of ``context`` tokens (one FFT convolution); the KV cache is
    filled with random keys and values instead, because an attention prefill costs O(context^2) and the cost
    of one decoding step depends on the cache length only.
    """
    if model.pos is not None:  # attention
        state = model.default_state(1)
        for cache in state:
            cache.k.normal_()
            cache.v.normal_()
            cache.length = context
    else:
        _, state = model.prefill(torch.randint(vocab, (1, context)))
    token = torch.zeros(1, dtype=torch.long)
    times = []
    for i in range(n_steps + 3):
        t0 = time.perf_counter()
        _, state = model.step(token, state, context + i)
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), state_nbytes(state)


# ---- command line ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = harness.ExampleParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixer", default="s4d", choices=MIXERS, help="token mixer of the trained decoder")
    p.add_argument("--compare", default="attention", choices=MIXERS,
                   help="mixer of the second model in the latency comparison")
    p.add_argument("--d-model", type=int, default=64, help="width of the trained model")
    p.add_argument("--n-layers", type=int, default=2, help="decoder blocks (trained and latency models)")
    p.add_argument("--n-heads", type=int, default=4, help="attention heads (attention mixer only)")
    p.add_argument("--d-state", type=int, default=64, help="state size N of the SSM layers")
    p.add_argument("--vocab", type=int, default=16, help="vocabulary size of the periodic sequences")
    p.add_argument("--delay", type=int, default=64, help="period D of the sequences: the memory needed")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="training sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (SSM parameters: their own, 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay of the non-SSM parameters (the SSM parameters: none)")
    p.add_argument("--log-every", type=int, default=50, help="print loss and accuracy every this many steps")
    p.add_argument("--gen-len", type=int, default=192, help="tokens generated after a prompt of D tokens")
    p.add_argument("--bench-d-model", type=int, default=256, help="width of the models in the latency test")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 4096, 32768],
                   help="context lengths of the latency test")
    p.add_argument("--bench-steps", type=int, default=100, help="timed steps per context length")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default); 1 is the fastest for these small "
                        "models on a small or shared CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization and the data")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("d_model", "n_layers", "n_heads", "d_state", "vocab", "delay", "seq_len", "steps",
                 "batch_size", "log_every", "gen_len", "bench_d_model", "bench_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seq_len <= args.delay:
        p.error("--seq-len must be larger than --delay (nothing to predict otherwise)")
    if min(args.contexts) < 1:
        p.error("--contexts must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.perf_counter()
    result: dict = {"mixer": args.mixer}

    # 1. training
    max_len = args.delay + args.gen_len + args.seq_len
    model = Decoder(args.vocab, args.d_model, args.n_layers, args.mixer, n_heads=args.n_heads,
                    d_state=args.d_state, max_len=max_len)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[1] train a {args.n_layers}-layer {args.mixer} decoder (d_model={args.d_model}, "
          f"{n_params:,} parameters) "
          f"on periodic sequences: period D={args.delay}, length {args.seq_len}, vocabulary {args.vocab}")
    print(f"    chance accuracy {1 / args.vocab:.1%}; a model without memory of D steps cannot beat it")
    result.update(train(model, args, gen))
    print(f"    held-out accuracy {result['eval_accuracy']:.1%} (loss {result['eval_loss']:.4f}) "
          f"after {args.steps} steps, {result['train_seconds']:.1f} s")

    # 2. generation with step, checked against the full forward
    prompt = torch.randint(args.vocab, (8, args.delay), generator=gen)
    seq, logits, peak = generate(model, prompt, args.gen_len)
    expected = prompt.repeat(1, -(-(args.delay + args.gen_len) // args.delay))[:, : args.delay + args.gen_len]
    gen_acc = float((seq[:, args.delay :] == expected[:, args.delay :]).float().mean())
    with torch.no_grad():
        full = model(seq[:, :-1])
    max_diff = float((full - logits).abs().max())
    torch.testing.assert_close(logits, full, rtol=1e-3, atol=1e-3)
    result.update(generation_accuracy=gen_acc, step_vs_forward_max_abs_diff=max_diff, state_bytes=peak)
    print(f"[2] greedy generation of {args.gen_len} tokens after a {args.delay}-token prompt (8 prompts): "
          f"copy accuracy {gen_acc:.1%}")
    print(f"    prefill + step logits == one forward over the generated sequence: max |diff| {max_diff:.2e}")
    print(f"    decoding state: {peak:,} bytes, the same after any number of tokens")

    # 3. encoder block
    enc = check_encoder(args.mixer, args.d_model, args.d_state, length=32)
    assert enc["padding_leak"] < 1e-5 and enc["first_position_change"] > 1e-6, enc
    result["encoder"] = enc
    print(f"[3] encoder block ({args.mixer}, bidirectional): changing token 3 moves position 0 by "
          f"{enc['first_position_change']:.3f}; changing padding moves valid positions by "
          f"{enc['padding_leak']:.1e}")

    # 4. per-token latency
    print(f"[4] per-token decoding latency, batch 1, d_model={args.bench_d_model}, {args.n_layers} layers, "
          f"random weights, {torch.get_num_threads()} threads")
    names = list(dict.fromkeys((args.mixer, args.compare)))
    print(f"    {'context':>8} | " + " | ".join(f"{name + ' ms/token, median (min)':>34} {'state':>10}"
                                              for name in names))
    latency = []
    bench_len = max(args.contexts) + args.bench_steps + 8
    bench = [Decoder(args.vocab, args.bench_d_model, args.n_layers, m, n_heads=args.n_heads,
                     d_state=args.d_state, max_len=bench_len).eval() for m in names]
    for context in args.contexts:
        row = {"context": context}
        for name, m in zip(names, bench):
            median, fastest, nbytes = step_latency(m, context, args.bench_steps, args.vocab)
            row[name] = {"ms": 1e3 * median, "min_ms": 1e3 * fastest, "state_bytes": nbytes}
        latency.append(row)
        cells = (f"{row[n]['ms']:24.3f} ({row[n]['min_ms']:7.3f}) {row[n]['state_bytes'] / 2**20:6.2f} MiB"
                 for n in names)
        print(f"    {context:>8} | " + " | ".join(cells))
    result["latency"] = latency
    result["total_seconds"] = time.perf_counter() - t_start
    print(f"done in {result['total_seconds']:.1f} s")
    return result


if __name__ == "__main__":
    harness.run_cli(main)
