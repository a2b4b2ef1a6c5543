"""Hugging Face ``transformers``: replace the attention of a model by an ``ssm`` layer, in place.

    model = transformers.GPT2LMHeadModel(config)
    ssm.integrations.hf.swap_attention(model, "s4d", d_state=64)
    model.generate(input_ids, attention_mask=mask)     # cached generation steps the SSM recurrence

``block.attn = ssm.S4D(H)`` alone fails: a host model calls its attention module with its own signature
(GPT-2 ``attn(hidden_states, cache=..., attention_mask=...)``, Llama ``self_attn(hidden_states=...,
position_embeddings=...)``) and unpacks ``(attn_output, attn_weights)``. ``SSMAttention`` accepts any such
call and returns that pair. Around the layer it

* keeps the recurrent state on the key/value ``Cache`` object whenever the host passes one, in training mode
  too (``model.train().generate(...)`` equals eval-mode generation up to dropout): its entry at the layer's
  index becomes an ``SSMCacheLayer``; the prefill runs ``layer(x, state, return_state=True)``, each new token
  ``layer.step``, and ``cache.get_seq_length()`` counts the tokens (GPT-2 derives its position ids from it,
  ``generate`` slices the new tokens by it). The entry also keeps the states after the last ``cache_window``
  positions, so ``cache.crop`` rewinds it (assisted decoding, prompt lookup); beam search reorders it, and
  ``copy.deepcopy(cache)`` gives an independent copy (prefix caching);
* honours padding: the 2-D ``attention_mask`` given to each stack (captured by a hook on the encoder, the
  decoder or the base model, whichever owns the token embedding; the attention modules only see HF's 4-D
  mask) zeroes the inputs at padded positions. The layers are linear time-invariant with zero initial
  state, so left padding (batched generation) leaves the state at exactly zero until the first real token
  and each row equals its unpadded run; an encoder (bidirectional layer) with right padding passes
  ``lengths``. A custom 4-D attention mask (an attention pattern) has no SSM meaning and is refused;
* honours packing: ``position_ids`` that restart within a row (``DataCollatorWithFlattening``, captured by
  the same hook) or a ``seq_idx`` keyword give the layer ``seq_idx``, so each document starts from the zero
  state and reads no other (packed training on a swapped model);
* replaces only what computes attention: a host whose attention module also holds the output projection,
  norm and residual (ALBERT) keeps them (``SSMAttention.post``); a module holding other norms is refused.

``transformers`` is imported on first use (``pip install "ssm-layers[hf]"``).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..layers import LAYERS
from ..layers.base import SSMLayer, map_state, state_leaves
from .generic import padded_forward

__all__ = ["CACHE_WINDOW", "SWAP_MODEL_TYPE", "SSMAttention", "SSMCacheLayer", "find_attention",
           "from_pretrained", "register_auto_classes", "swap_attention", "trainer_optimizers"]

#: Attribute names under which host blocks keep their self-attention module.
ATTENTION_NAMES = ("attn", "self_attn", "self_attention", "attention", "self", "mixer")
#: Keyword names under which hosts pass their key/value cache to the attention module.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
INSTALL = 'pip install "ssm-layers[hf]"  (or: pip install transformers)'
#: The ``model_type`` a swapped model's config.json records (the host's own goes into ``ssm_swap``), so that
#: transformers' Auto classes never build the stock model with random attention from it: they load it
#: through ``from_pretrained`` once ``register_auto_classes`` ran (importing this module runs it), and refuse
#: the unknown model type otherwise.
SWAP_MODEL_TYPE = "ssm_swap"
#: How many tokens a generation cache can be rewound by default (``swap_attention(..., cache_window=...)``):
#: transformers' assisted decoding drafts 20 tokens by default (``num_assistant_tokens``) and crops at most
#: that many.
CACHE_WINDOW = 20


def _transformers():
    try:
        import transformers
    except ImportError as e:  # only the missing package is caught
        raise ImportError(f"ssm.integrations.hf needs transformers: {INSTALL}") from e
    return transformers


def _cache_class():
    return _transformers().cache_utils.Cache


class _MaskContext:
    """The 2-D padding mask (B, L_past + L) of one stack's current call, shared by its adapters."""

    def __init__(self) -> None:
        self.mask: Tensor | None = None
        self.position_ids: Tensor | None = None


def _find_mask(forward, args: tuple, kwargs: dict, name: str = "attention_mask"):
    mask = kwargs.get(name)
    if mask is None and args:
        try:
            names = list(inspect.signature(forward).parameters)
        except (TypeError, ValueError):
            names = []
        if name in names and names.index(name) < len(args):
            mask = args[names.index(name)]
    return mask


def packed_seq_idx(position_ids: Tensor | None) -> Tensor | None:
    """The document index (B, L) of packed rows whose ``position_ids`` restart (as
    ``DataCollatorWithFlattening`` makes them): a document starts wherever a position is not its
    predecessor plus one; None when no row restarts."""
    if not isinstance(position_ids, Tensor) or position_ids.ndim != 2 or position_ids.shape[1] < 2:
        return None
    starts = position_ids[:, 1:] != position_ids[:, :-1] + 1  # (B, L - 1)
    if not bool(starts.any()):
        return None
    return torch.nn.functional.pad(starts.long().cumsum(1), (1, 0))


def _install_mask_hooks(stack: nn.Module, ctx: _MaskContext) -> None:
    def capture(module, args, kwargs):
        mask = _find_mask(module.forward, args, kwargs)
        if isinstance(mask, Tensor) and mask.ndim != 2:
            raise ValueError(
                f"attention_mask must be a 2-D (B, L) padding mask for a model with ssm layers; got shape "
                f"{tuple(mask.shape)}: a custom attention pattern has no meaning for a state-space layer"
            )
        ctx.mask = mask if isinstance(mask, Tensor) else None
        pos = _find_mask(module.forward, args, kwargs, "position_ids")
        ctx.position_ids = pos if isinstance(pos, Tensor) else None

    def clear(module, args, kwargs, output):
        ctx.mask = None
        ctx.position_ids = None

    stack.register_forward_pre_hook(capture, with_kwargs=True)
    stack.register_forward_hook(clear, with_kwargs=True, always_call=True)


def _takes_attention_mask(module: nn.Module) -> bool:
    try:
        return "attention_mask" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _mask_stack(model: nn.Module, qualname: str) -> nn.Module:
    """The module whose 2-D ``attention_mask`` applies to the attention at ``qualname``: its nearest ancestor
    that takes an ``attention_mask`` and owns a token embedding (GPT-2's ``transformer``, BART's encoder and
    decoder, BERT's ``bert``, not BERT's ``encoder``, which gets the 4-D mask); the base model if none."""
    parts = qualname.split(".")
    for n in range(len(parts) - 1, -1, -1):
        m = model.get_submodule(".".join(parts[:n])) if n else model
        if _takes_attention_mask(m) and any(isinstance(c, nn.Embedding) for c in m.children()):
            return m
    return getattr(model, "base_model", model)


def _check_window(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int (tokens a crop may remove); got {value!r}")
    return value


def _map_states(fn, states: list) -> list:
    """``fn`` on every tensor of a list of states (None, the zero state before the first token, stays)."""
    return [None if s is None else map_state(fn, s) for s in states]


try:  # the base of a transformers cache layer; without transformers the adapter refuses before using it
    from transformers.cache_utils import CacheLayerMixin as _CacheLayerBase
except ImportError:
    _CacheLayerBase = object


class SSMCacheLayer(_CacheLayerBase):
    """One SSM layer's entry in a transformers ``Cache`` (``cache.layers[layer_idx]``): the recurrent state
    after ``seen`` tokens, and the states after each of the last ``window`` positions, so that ``crop`` can
    rewind up to ``window`` tokens (memory: ``window`` states). The cache's own loops reach it: ``crop``,
    ``reorder_cache`` (beam search), ``batch_repeat_interleave``, ``batch_select_indices``, ``reset``,
    ``activate_past_recording(recurrent_states_to_keep=k)`` (raises the window to k), ``get_seq_length``.
    It holds no keys: it is not compileable. The state's structure is the layer's (a tensor, or a tuple such
    as Mamba's convolution window and SSM state); nothing here looks inside it.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, window: int = CACHE_WINDOW) -> None:
        super().__init__()
        self.window = _check_window("window", window)
        self.seen = 0
        self.state = None  # None: the zero state (nothing seen yet)
        self.history: list = []  # history[-r]: the state r tokens back, r = 1 .. len(history) <= window
        self.device = None

    def __repr__(self) -> str:
        return f"SSMCacheLayer(seen={self.seen}, window={self.window}, kept={len(self.history)})"

    # ---- what the adapter calls ---------------------------------------------------------------------------
    def advance(self, L: int, state, passed: list) -> None:
        """After L new tokens: ``state`` the state now, ``passed`` the states before it that this call
        computed, oldest first (the state r tokens back is ``passed[-r]``; the first may be the state before
        the call)."""
        self.history = (self.history + list(passed))[-self.window:] if self.window else []
        self.state, self.seen = state, self.seen + L
        if self.device is None:
            self.device = state_leaves(state)[0].device
        self.is_initialized = True

    # ---- transformers' cache-layer interface --------------------------------------------------------------
    def lazy_initialization(self, key_states=None, value_states=None) -> None:
        """Nothing to allocate: the state comes from the layer."""

    def update(self, key_states, value_states, *args, **kwargs):
        raise ValueError("an SSM layer's cache entry holds a recurrent state, not keys and values: this "
                         "cache layer belongs to an ssm layer (ssm.integrations.hf.SSMAttention)")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Rewind: a negative count removes that many tokens (transformers 5's ``crop(-n)``), 0 nothing; a
        positive value is the length to keep (the older ``crop(max_length)``). Raises a ValueError when that
        reaches before the kept window."""
        n = int(tokens_to_remove)
        r = -n if n <= 0 else max(self.seen - n, 0)
        if r == 0:
            return
        if r > len(self.history):
            kept = len(self.history)
            raise ValueError(
                f"crop({n}): cannot rewind {r} of {self.seen} tokens: this SSM cache keeps the states after "
                f"the last {kept} positions only (it can rewind to {self.seen - kept}..{self.seen} tokens; "
                f"window={self.window}); pass a larger cache_window to swap_attention, or call "
                "cache.activate_past_recording(recurrent_states_to_keep=k) before the tokens to rewind")
        self.state = self.history[-r]
        self.history = self.history[:-r]
        self.seen -= r

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None) -> None:
        """transformers' request to be able to rewind ``recurrent_states_to_keep`` tokens: the window grows to
        it (never shrinks)."""
        if recurrent_states_to_keep is not None:
            keep = _check_window("recurrent_states_to_keep", recurrent_states_to_keep)
            self.window = max(self.window, keep)

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = map_state(fn, self.state)
        self.history = _map_states(fn, self.history)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device) if isinstance(indices, Tensor) else indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.seen, self.state, self.history = 0, None, []

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.device is not None:
            self._map(lambda t: t.to(self.device, non_blocking=True))


class SSMAttention(nn.Module):
    """An ``ssm`` layer in the place of a host model's self-attention module.

    Args:
        layer: any ``ssm.SSMLayer`` mapping (B, L, H) -> (B, L, H) (not ``transposed``).
        layer_idx: the index of this module in the host's key/value cache.
        causal: a decoder's attention (cached generation, state passing); False for an encoder, whose layer
            may be bidirectional.
        post: the host's parts after the attention that its attention module held (ALBERT: output dense,
            dropout, residual and LayerNorm), called as ``post(hidden_states, y)``; None for most hosts.
        cache_window: how many tokens a generation cache can be rewound (``cache.crop``): the cache keeps
            the states after the last ``cache_window`` positions (``SSMCacheLayer``); 0 keeps none.

    ``forward(hidden_states, *args, **kwargs)`` takes the host's call and returns ``(y, None)``.
    """

    #: On a cache, the last ``cache_window`` + 1 tokens of a call run as a loop of ``step`` (the states kept
    #: for ``crop`` come for free) and the tokens before them by the convolution, unless they are at most
    #: this many: a few tokens (a verified draft) cost less by ``step`` than by the convolution.
    step_below: int = 16

    def __init__(self, layer: SSMLayer, *, layer_idx: int, causal: bool = True,
                 post: nn.Module | None = None, cache_window: int = CACHE_WINDOW) -> None:
        super().__init__()
        if not isinstance(layer, SSMLayer):
            raise ValueError(f"layer must be an ssm.SSMLayer; got {type(layer).__name__}")
        if layer.transposed:
            raise ValueError("layer must take (B, L, H) inputs; got a layer with transposed=True")
        if causal and layer.bidirectional:
            raise ValueError("a causal host (a decoder) needs a causal layer; got bidirectional=True")
        self.layer = layer
        self.layer_idx = int(layer_idx)
        self.causal = bool(causal)
        self.post = post
        self.cache_window = _check_window("cache_window", cache_window)
        self._mask_context: _MaskContext | None = None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, causal={self.causal}, cache_window={self.cache_window}"

    # ---- what the host passed -----------------------------------------------------------------------------
    @staticmethod
    def _find_cache(args: tuple, kwargs: dict):
        Cache = _cache_class()
        found = None
        for key in CACHE_KWARGS:
            if isinstance(kwargs.get(key), Cache):
                found = kwargs[key]
                break
        if found is None:
            found = next((a for a in args if isinstance(a, Cache)), None)
        # An encoder-decoder cache: this module is the decoder's self-attention.
        return getattr(found, "self_attention_cache", found)

    def _valid(self, Bsz: int, L: int, kwargs: dict) -> Tensor | None:
        """(B, L) bool, True at real tokens of this call, or None when nothing is padded."""
        mask = self._mask_context.mask if self._mask_context is not None else None
        if mask is None:
            m = kwargs.get("attention_mask")
            mask = m if isinstance(m, Tensor) and m.ndim == 2 else None
        if mask is None or mask.shape[0] != Bsz or mask.shape[1] < L:
            return None
        valid = mask[:, -L:].bool()
        return None if bool(valid.all()) else valid

    # ---- the two paths ------------------------------------------------------------------------------------
    def forward(self, hidden_states: Tensor, *args, **kwargs) -> tuple[Tensor, None]:
        """hidden_states (B, L, H) -> (y (B, L, H), None): the host's (attn_output, attn_weights)."""
        x = hidden_states
        if not isinstance(x, Tensor) or x.ndim != 3:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"hidden_states must be (B, L, H); got {got}")
        Bsz, L, _ = x.shape
        valid = self._valid(Bsz, L, kwargs)
        seq = self._seq_idx(Bsz, L, kwargs, padded=valid is not None)
        # The cache is used in training mode too: generation and incremental forwards mean the same there.
        cache = self._find_cache(args, kwargs) if self.causal else None
        if cache is not None:
            y = self._cached(x, valid, cache, seq)
        elif seq is not None:
            y = self.layer(x, seq_idx=seq)
        else:
            y = padded_forward(self.layer, x, valid)
        return (y if self.post is None else self.post(x, y)), None

    def _seq_idx(self, Bsz: int, L: int, kwargs: dict, padded: bool) -> Tensor | None:
        """Packed documents: ``seq_idx`` if the host passes one, else from ``position_ids`` that restart in
        a batch without padding (with padding, generate's position ids restart at the first real token)."""
        seq = kwargs.get("seq_idx")
        if isinstance(seq, Tensor):
            if padded:
                raise ValueError("seq_idx: packed documents in a padded batch; pack without padding "
                                 "(DataCollatorWithFlattening) or pad without packing")
            return seq
        if padded:
            return None
        pos = self._mask_context.position_ids if self._mask_context is not None else None
        if pos is None:
            pos = kwargs.get("position_ids")
        if not isinstance(pos, Tensor) or pos.ndim != 2 or pos.shape[1] < L:
            return None
        return packed_seq_idx(pos[:, -L:].expand(Bsz, L))

    def _entry(self, cache) -> SSMCacheLayer:
        """This layer's ``SSMCacheLayer`` in ``cache``, put in the place of an empty entry on first use."""
        i = self.layer_idx
        layers = cache.layers
        if i >= len(layers):
            make = getattr(cache, "layer_class_to_replicate", None)
            if make is None:
                raise ValueError(f"the cache has {len(layers)} layers; this adapter is layer {i}")
            while len(layers) <= i:
                layers.append(make())
        entry = layers[i]
        if isinstance(entry, SSMCacheLayer):
            return entry
        held = entry.get_seq_length()
        if held:
            raise ValueError(
                f"the cache holds {int(held)} tokens for layer {i} that no SSM layer wrote: an SSM state "
                "cannot be rebuilt from keys (was the cache filled by another model?)")
        layers[i] = SSMCacheLayer(self.cache_window)
        return layers[i]

    def _cached(self, x: Tensor, valid: Tensor | None, cache, seq: Tensor | None = None) -> Tensor:
        """Continue the recurrent state kept on the cache and advance its entry by L tokens, keeping the
        states after the last ``window`` positions: the tokens before those by the convolution with state
        passing (when there are more than ``step_below`` of them), the last ones by ``step``, whose states
        come for free. A padded or packed chunk goes through the convolution whole, the kept states from
        ``return_states_at``."""
        Bsz, L, _ = x.shape
        entry = self._entry(cache)
        state = entry.state
        if state is not None and state_leaves(state)[0].shape[0] != Bsz:
            raise ValueError(f"the cache holds states for a batch of {state_leaves(state)[0].shape[0]}; "
                             f"got a batch of {Bsz}")
        k = min(entry.window, L)  # states to keep from this call: r = 1 .. k tokens back from its end
        passed = [state] if k == L else []  # the state before the call, L tokens back
        m = min(k, L - 1)  # kept states after positions of this call: L - 1 - m .. L - 2
        if L > 1 and (valid is not None or seq is not None):
            at = torch.arange(L - 1 - m, L - 1, device=x.device) if m else None
            if valid is None:
                out = self.layer(x, state, return_state=True, seq_idx=seq, return_states_at=at)
            else:
                out = self.layer.masked_forward(x, valid, state, return_state=True, return_states_at=at)
            if at is not None:
                passed += [map_state(lambda t, j=j: t[j], out[2]) for j in range(m)]
            entry.advance(L, out[1], passed)
            return out[0]
        n = L if k == 0 else L - 1 - m  # tokens before the kept positions
        n = n if n > self.step_below else 0  # a few: by step too
        ys = []
        if n:
            y, state = self.layer(x[:, :n], state, return_state=True)
            ys.append(y)
        if n < L:
            u = x if valid is None else x * valid[..., None].to(x.dtype)  # (L == 1: a padded step)
            if state is None:
                state = self.layer.default_state(Bsz, device=x.device)
            for t in range(n, L):
                y_t, state = self.layer.step(u[:, t], state)
                ys.append(y_t[:, None])
                if 0 < L - 1 - t <= k:  # the state after position t, L - 1 - t tokens back
                    passed.append(state)
        entry.advance(L, state, passed)
        return torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]


def find_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules of a host model, as (qualified name, module), in order.

    A module counts when it sits under one of ``ATTENTION_NAMES`` in its parent, its class name contains
    "Attention", no descendant is also an attention module (BERT's ``attention`` holds ``attention.self``;
    the inner one is taken, its output projection and norm stay) and it is not cross-attention.
    """
    def is_attention(m: nn.Module) -> bool:
        return "Attention" in type(m).__name__ and not getattr(m, "is_cross_attention", False)

    found = []
    for name, module in model.named_modules():
        if isinstance(module, SSMAttention) or not is_attention(module):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in ATTENTION_NAMES:
            continue
        if any(is_attention(d) for n, d in module.named_modules() if n):
            continue
        found.append((name, module))
    return found


def _host_is_causal(model: nn.Module, module: nn.Module) -> bool:
    causal = getattr(module, "is_causal", None)
    if isinstance(causal, bool):
        return causal
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    return bool(getattr(config, "is_decoder", False)) or any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs
    )


def swap_attention(model: nn.Module, layer: str = "s4d", *, cache_window: int = CACHE_WINDOW,
                   **layer_kwargs) -> nn.Module:
    """Replace, in place, every self-attention module of a Hugging Face model by an ``SSMAttention`` around
    a new ``ssm`` layer, and return the model.

    Args:
        model: a ``transformers`` model: a causal LM (GPT-2, Llama, ... : causal layers, cached generation) or
            an encoder (BERT, ... : bidirectional layers unless ``bidirectional=False`` is given).
        layer: a name in ``ssm.layers.LAYERS`` ("s4", "s4d", "rtf", "s5", "mamba", "mamba2").
        layer_kwargs: keyword arguments of the layer (``d_state``, ``init``, ``activation``, ...); d_model is
            the model's hidden size, device and dtype those of the replaced module. They must be JSON values:
            they are recorded in ``model.config.ssm_swap`` so that ``from_pretrained`` can rebuild the model.
        cache_window: how many tokens a generation cache can be rewound (``cache.crop``, used by assisted
            decoding and prompt lookup): each layer's cache entry keeps the states after its last
            ``cache_window`` positions (memory: that many states per layer); recorded in ``ssm_swap`` when it
            is not the default.

    Raises:
        ValueError: an unknown layer name, a kwarg that is not a JSON value or that conflicts with the host
            (``bidirectional=True`` in a decoder), or a model without attention modules to replace.
    """
    _transformers()
    cache_window = _check_window("cache_window", cache_window)
    name = str(layer).lower()
    if name not in LAYERS:
        raise ValueError(f"layer must be one of {sorted(LAYERS)}; got {layer!r}")
    for key in ("d_model", "device", "dtype", "transposed"):
        if key in layer_kwargs:
            raise ValueError(f"{key} is taken from the host model; do not pass {key}=")
    try:
        json.dumps(layer_kwargs)
    except TypeError as e:
        raise ValueError(f"layer_kwargs must be JSON values (they go into config.json); {e}") from None
    config = getattr(model, "config", None)
    H = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not isinstance(H, int):
        raise ValueError("model.config must give the hidden size (hidden_size or n_embd)")
    targets = find_attention(model)
    if not targets:
        raise ValueError(f"found no self-attention modules to replace in {type(model).__name__}")
    # Build every adapter before changing anything: a refusal part-way leaves the model as it was.
    plan = []
    for i, (qualname, module) in enumerate(targets):
        causal = _host_is_causal(model, module)
        kwargs = dict(layer_kwargs)
        kwargs.setdefault("bidirectional", not causal)
        post = _post_parts(qualname, module)
        ref = next(module.parameters(), None)
        factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        ssm_layer = LAYERS[name](H, **kwargs, **factory)
        idx = getattr(module, "layer_idx", None)
        try:
            adapter = SSMAttention(ssm_layer, layer_idx=idx if isinstance(idx, int) else i, causal=causal,
                                   post=post, cache_window=cache_window)
        except ValueError as e:
            raise ValueError(f"{qualname}: {e} (nothing was replaced)") from None
        plan.append((qualname, adapter, _mask_stack(model, qualname)))
    for qualname, adapter, stack in plan:
        ctx = getattr(stack, "_ssm_mask_context", None)
        if ctx is None:
            ctx = _MaskContext()
            _install_mask_hooks(stack, ctx)
            stack._ssm_mask_context = ctx
        adapter._mask_context = ctx
        parent_name, _, attr = qualname.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, adapter)
    if config is not None:
        previous = getattr(config, "ssm_swap", None)
        base = previous.get("base_model_type") if isinstance(previous, dict) else None
        config.ssm_swap = {"layer": name, "layer_kwargs": dict(layer_kwargs),
                           "base_model_type": base or getattr(type(config), "model_type", None)}
        if cache_window != CACHE_WINDOW:
            config.ssm_swap["cache_window"] = cache_window
        _mark_swapped(config)
    return model


_SWAPPED_CONFIGS: dict[type, type] = {}


def _mark_swapped(config) -> None:
    """Give ``config`` a subclass of its class whose ``model_type`` is ``SWAP_MODEL_TYPE``: what
    ``save_pretrained`` writes then names no stock architecture (everything else is the host's config)."""
    cls = type(config)
    if getattr(cls, "_ssm_swapped", False):
        return
    sub = _SWAPPED_CONFIGS.get(cls)
    if sub is None:
        sub = type(f"SSMSwapped{cls.__name__}", (cls,), {"model_type": SWAP_MODEL_TYPE, "_ssm_swapped": True,
                                                          "__module__": __name__})
        _SWAPPED_CONFIGS[cls] = sub
    config.__class__ = sub


class _PostNorm(nn.Module):
    """ALBERT's tail of the attention module: ``LayerNorm(x + dropout(dense(y)))``."""

    def __init__(self, dense: nn.Module, dropout: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = dense, dropout, norm

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.LayerNorm(x + self.dropout(self.dense(y)))


def _is_norm(m: nn.Module) -> bool:
    return "Norm" in type(m).__name__


def _post_parts(qualname: str, module: nn.Module) -> nn.Module | None:
    """The parts of a host attention module that act after the attention (a residual norm), kept by the
    adapter; norms of queries and keys (``q_norm``, ``k_norm``) belong to the attention and go with it."""
    norms = [n for n, c in module.named_children() if _is_norm(c) and not n.lower().startswith(("q", "k"))]
    if not norms:
        return None
    dense, norm = getattr(module, "dense", None), getattr(module, "LayerNorm", None)
    if norms == ["LayerNorm"] and isinstance(dense, nn.Linear):
        dropout = getattr(module, "output_dropout", None)
        return _PostNorm(dense, dropout if isinstance(dropout, nn.Module) else nn.Identity(), norm)
    raise ValueError(
        f"{qualname} ({type(module).__name__}) also holds {norms}, which act after the attention: the "
        "adapter would drop them, and keeps them only for ALBERT-style modules (dense, output_dropout, "
        "LayerNorm); nothing was replaced"
    )


def _read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, Tensor] = {}
        for shard in shards:
            out.update(load_file(str(path / shard)))
        return out
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {path}")


def from_pretrained(path, model_class=None, *, dtype=None, device_map=None, torch_dtype=None,
                    **config_kwargs) -> nn.Module:
    """Load a model that ``swap_attention`` changed and ``save_pretrained`` wrote.

    ``model_class.from_pretrained`` would build the original attention modules and drop the SSM weights, so
    this builds the model from its config, swaps in the layers recorded in ``config.ssm_swap`` and loads the
    weights into them. The SSM optimizer hints live on the layers (``SSMLayer.optimizer_hints``), so
    ``ssm.optim.param_groups`` of the loaded model equals that of the saved one. Returns it in eval mode.
    transformers' Auto classes (``AutoModelForCausalLM.from_pretrained(path)``) land here too.

    Args:
        path: the directory given to ``save_pretrained``.
        model_class: a ``transformers`` model class (or Auto class); default: ``config.architectures[0]``.
        dtype: the parameters' dtype (a ``torch.dtype``, its name, or "auto" for the one the config records;
            ``torch_dtype`` is its former name, as in transformers).
        device_map: one device for the whole model ("cpu", "cuda:0", a ``torch.device``, or "auto": CUDA
            when available); a per-module map needs accelerate's dispatch and is refused.
        config_kwargs: attributes of the config to override, as transformers' ``from_pretrained`` takes them
            (``output_hidden_states=True``, ...); any other keyword is refused by name.
    """
    transformers = _transformers()
    register_auto_classes()
    path = Path(path)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise ValueError(f"path must be a local directory written by save_pretrained; {path} {what}")
    if dtype is not None and torch_dtype is not None:
        raise ValueError("pass dtype or torch_dtype (its former name), not both")
    dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype)
    device = _resolve_device(device_map)
    raw = json.loads((path / "config.json").read_text())
    swap = raw.get("ssm_swap")
    if not isinstance(swap, dict) or "layer" not in swap:
        raise ValueError(f"{path}/config.json has no ssm_swap entry: it was not saved after swap_attention")
    base = swap.get("base_model_type") or raw.get("model_type")
    if base not in transformers.CONFIG_MAPPING:
        raise ValueError(f"{path}/config.json: the host model type {base!r} is not one transformers knows")
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    config, unused = transformers.CONFIG_MAPPING[base].from_dict(fields, return_unused_kwargs=True,
                                                                 **config_kwargs)
    if unused:
        raise ValueError(f"from_pretrained got keyword arguments that are neither config attributes nor its "
                         f"own (dtype, device_map): {sorted(unused)}")
    if dtype == "auto":
        recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = _resolve_dtype(recorded) if recorded not in (None, "auto") else None
    if model_class is None or getattr(model_class, "_ssm_auto_mapping", None) is not None:
        mapping = getattr(model_class, "_ssm_auto_mapping", None)
        if mapping is not None:  # reached through an Auto class: its task's class for the host type
            name = mapping.get(base)
            if name is None:
                raise ValueError(f"this Auto class has no model class for the host model type {base!r}")
        else:
            archs = getattr(config, "architectures", None) or []
            name = archs[0] if archs else None
        if not name or not hasattr(transformers, name):
            raise ValueError("config.architectures does not name a transformers class; pass model_class=")
        model_class = getattr(transformers, name)
    build = getattr(model_class, "from_config", None) or model_class._from_config
    model = build(config)
    swap_attention(model, swap["layer"], cache_window=swap.get("cache_window", CACHE_WINDOW),
                   **swap.get("layer_kwargs", {}))
    weights = _with_prefix_of(model, _read_weights(path))
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path} holds weights this model does not have: {result.unexpected_keys[:5]}")
    if result.missing_keys:
        # Tied weights (GPT-2's lm_head is wte) are saved once: a missing name must share its tensor with a
        # loaded one.
        by_tensor: dict[int, set[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            by_tensor.setdefault(id(p), set()).add(n)
        missing = set(result.missing_keys)
        untied = [k for k, names in ((k, by_tensor.get(id(_get(model, k)), {k})) for k in missing)
                  if names <= missing]
        if untied:
            raise ValueError(f"{path} lacks weights for {sorted(untied)[:5]}")
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def _with_prefix_of(model: nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weights saved from a model with a head (``transformer.h.0...``) for its base model, or the reverse:
    the base model's prefix taken off or put on, as transformers' own loading does."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix:
        return weights
    dot = prefix + "."
    ours = any(k.startswith(dot) for k in model.state_dict())
    theirs = any(k.startswith(dot) for k in weights)
    if theirs and not ours:
        return {k[len(dot):]: v for k, v in weights.items() if k.startswith(dot)}
    if ours and not theirs:
        return {dot + k: v for k, v in weights.items()}
    return weights


def _resolve_dtype(dtype):
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, dtype.removeprefix("torch."))
    raise ValueError(f"dtype must be a torch.dtype, its name or 'auto'; got {dtype!r}")


def _resolve_device(device_map):
    if device_map is None:
        return None
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, (str, torch.device, int)):
        try:
            return torch.device(device_map)
        except (RuntimeError, TypeError):
            pass
    raise ValueError(f"device_map must be one device ('cpu', 'cuda:0', a torch.device) or 'auto'; got "
                     f"{device_map!r} (a per-module map needs accelerate's dispatch, which is not supported)")


_AUTO_TASKS = {  # Auto class -> the name of its mapping in transformers.models.auto.modeling_auto
    "AutoModel": "MODEL_MAPPING_NAMES",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForSeq2SeqLM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
}
_REGISTERED: list[bool] = []
_HUB_KWARGS = ("trust_remote_code", "_from_auto", "adapter_kwargs", "_commit_hash", "cache_dir",
               "force_download", "local_files_only", "proxies", "revision", "token", "resume_download",
               "user_agent")


def register_auto_classes() -> None:
    """Teach transformers' Auto classes the swapped checkpoints (model type ``SWAP_MODEL_TYPE``): then
    ``AutoModelForCausalLM.from_pretrained(path)`` (and AutoModel, ...ForMaskedLM,
    ...ForSequenceClassification, ...ForTokenClassification, ...ForSeq2SeqLM) returns what
    ``from_pretrained(path)`` does. Importing this module runs it; idempotent."""
    if _REGISTERED:
        return
    transformers = _transformers()
    from transformers.models.auto import modeling_auto

    base = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
    config_cls = type("SSMSwapConfig", (base,), {"model_type": SWAP_MODEL_TYPE, "__module__": __name__})
    transformers.AutoConfig.register(SWAP_MODEL_TYPE, config_cls, exist_ok=True)
    for auto_name, mapping_name in _AUTO_TASKS.items():
        auto = getattr(transformers, auto_name, None)
        mapping = getattr(modeling_auto, mapping_name, None)
        if auto is None or mapping is None:
            continue

        def load(cls, path, *args, config=None, **kwargs):
            if args:
                raise ValueError(f"from_pretrained of a swapped model takes no positional model arguments; "
                                 f"got {len(args)}")
            # what the Auto class adds for the hub means nothing for a local directory
            for key in _HUB_KWARGS:
                kwargs.pop(key, None)
            subfolder = kwargs.pop("subfolder", "") or ""
            return from_pretrained(Path(path) / subfolder, cls, **kwargs)

        loader = type(f"SSMSwapLoader{auto_name[len('AutoModel'):]}", (), {
            "config_class": config_cls, "_ssm_auto_mapping": mapping, "from_pretrained": classmethod(load),
            "__module__": __name__})
        auto.register(config_cls, loader, exist_ok=True)
    _REGISTERED.append(True)


def trainer_optimizers(model: nn.Module, *, lr: float, weight_decay: float = 0.0,
                       betas: tuple[float, float] = (0.9, 0.999)) -> tuple[torch.optim.Optimizer, None]:
    """``optimizers=`` for a Hugging Face ``Trainer`` that keeps the SSM parameter groups:
    ``Trainer(model, args, ..., optimizers=trainer_optimizers(model, lr=args.learning_rate,
    weight_decay=args.weight_decay))``. The Trainer's own optimizer would put the SSM parameters (Lambda, B,
    dt, A_log) under weight decay at the global learning rate; this is ``ssm.optim.make_optimizer`` (their
    own lr and no weight decay) with ``None`` for the scheduler, which the Trainer then builds as usual."""
    from ..optim import make_optimizer

    return make_optimizer(model, lr=lr, weight_decay=weight_decay, betas=betas), None


try:  # the Auto classes learn the swapped checkpoints as soon as this module is imported
    register_auto_classes()
except ImportError:  # without transformers every function here raises its install message instead
    pass


def _get(model: nn.Module, name: str):
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)
