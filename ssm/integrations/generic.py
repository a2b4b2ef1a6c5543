"""An ``ssm`` layer in the place of a self-attention module, for codebases that call attention as
``attn(x, mask=..., **kwargs)`` (x-transformers and most hand-written Transformers).

The host's extra arguments (rotary embeddings, relative-position biases, caches of keys) mean nothing to a
state-space layer and are ignored; a key-padding mask is honoured: padded inputs are zeroed before a causal
layer (its state stays exactly zero through left padding, and right padding never reaches a valid output),
and a bidirectional layer gets ``lengths`` from right padding and zeroed inputs for left padding.
Cross-attention (a ``context``) has no sequence-layer equivalent and is refused.

Mask conventions, (B, L) key-padding masks only:

* under ``mask_arg`` (default ``"mask"``, x-transformers): bool True = keep; integer 1 = keep, 0 = pad (HF's
  ``attention_mask``); float: additive, 0 = keep, ``-inf`` or a large negative (<= -1e4) = pad;
* under ``key_padding_mask`` (``nn.MultiheadAttention``): bool True = pad; float additive as above;
* both given: a position is kept when both keep it;
* a float mask holding anything else (0./1., which reads either way), an integer mask beyond 0/1, and an
  attention pattern under ``attn_mask`` or ``attention_mask`` (when not ``mask_arg``) are refused.

Inside x-transformers (``TransformerWrapper``), which calls attention with ``return_intermediates=True`` and
``cache=`` the previous call's ``Intermediates``, the mixer answers with an ``Intermediates`` whose
``cached_kv`` carries the layer's recurrent state, so cached generation continues the state token by token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_choice
from ..layers import SSMLayer
from ..layers.base import map_state, state_leaves

RETURNS = ("tensor", "tuple")
#: Keywords whose bool masks mean True = pad (PyTorch's ``nn.MultiheadAttention`` convention).
PAD_TRUE = ("key_padding_mask", "src_key_padding_mask")
#: Keywords that carry an attention pattern (L, L) or a mask of unknown convention: refused unless None.
REFUSED = ("attn_mask", "attention_mask")
#: An additive float mask pads where it is at most this.
ADDITIVE_PAD = -1e4


class SSMMixer(nn.Module):
    """Wrap ``layer`` so that it answers a self-attention call.

    Args:
        layer: any ``ssm`` layer with the (B, L, H) layout.
        mask_arg: the keyword under which the host passes its key-padding mask, (B, L): bool True = keep,
            integer 1 = keep, float additive (0 = keep, -inf = pad); ``key_padding_mask`` (True = pad) is
            read too. See the module docstring for the conventions.
        returns: ``"tensor"`` (the output alone) or ``"tuple"`` (``(output, None)``, for hosts that unpack
            ``out, intermediates = attn(...)``, as x-transformers' layers do).
    """

    def __init__(self, layer: SSMLayer, *, mask_arg: str = "mask", returns: str = "tensor") -> None:
        super().__init__()
        if not isinstance(layer, SSMLayer) or layer.transposed:
            raise ValueError(f"layer must be an ssm layer with transposed=False; got {layer!r}")
        if not isinstance(mask_arg, str):
            raise ValueError(f"mask_arg must be a keyword name; got {mask_arg!r}")
        self.layer = layer
        self.mask_arg = mask_arg
        self.returns = check_choice("returns", returns, RETURNS)

    def forward(self, x: Tensor, *args, **kwargs):
        if kwargs.get("context") is not None or (args and isinstance(args[0], Tensor)):
            raise ValueError("SSMMixer replaces self-attention only: got a context (cross-attention), "
                             "which a sequence layer cannot attend to")
        cache = kwargs.get("cache")
        L = x.shape[1]
        keep = None
        for key in dict.fromkeys((self.mask_arg, *PAD_TRUE, *REFUSED)):
            mask = kwargs.get(key)
            if mask is None:
                continue
            if key in REFUSED and key != self.mask_arg:
                raise ValueError(f"{key}: SSMMixer reads a (B, L) key-padding mask under {self.mask_arg!r} "
                                 "or key_padding_mask; an attention pattern cannot be honoured by a sequence "
                                 f"layer (pass mask_arg={key!r} if it is a key-padding mask)")
            # with a cache, x-transformers passes the mask of the whole sequence and x holds its new positions
            if cache is not None and isinstance(mask, Tensor) and mask.ndim == 2 and mask.shape[1] > L:
                mask = mask[:, -L:]
            k = key_padding_keep(mask, tuple(x.shape[:2]), name=key, true_is_pad=key in PAD_TRUE)
            keep = k if keep is None else keep & k
        seq_idx = kwargs.get("seq_idx")
        if seq_idx is not None and keep is not None:
            raise ValueError("seq_idx: packed documents and a padding mask cannot be combined; pack without "
                             "padding")
        if not kwargs.get("return_intermediates", False) and cache is None:
            if seq_idx is not None:  # packed documents (mamba_ssm's convention), each read on its own
                y = self.layer(x, seq_idx=seq_idx)
            else:
                y = padded_forward(self.layer, x, keep, strict=True, name=self.mask_arg)
            return (y, None) if self.returns == "tuple" else y
        return self._x_transformers(x, keep, cache)

    def _x_transformers(self, x: Tensor, mask: Tensor | None, cache):
        """x-transformers' call: ``(y, Intermediates)``, the layer's state in ``cached_kv`` (eval mode, causal
        layer), continued from ``cache.cached_kv`` when the host passes the previous call's intermediates."""
        from x_transformers.attend import Intermediates

        state = None
        if cache is not None:
            if self.layer.bidirectional:
                raise ValueError("cached generation needs a causal layer; got bidirectional=True (pass "
                                 "cache_kv=False to generate, or use a causal layer)")
            if not cache.cached_kv:
                raise ValueError("the cache holds no SSM state for this layer: it was not filled by "
                                 "SSMMixer in eval mode")
            state = self._unpack(cache.cached_kv, x.device)
        if self.layer.bidirectional or (self.training and cache is None):
            # no state to hand on: training, or a layer that reads the future
            return padded_forward(self.layer, x, mask, strict=True, name=self.mask_arg), Intermediates()
        if x.shape[1] == 1 and state is not None:
            u = x if mask is None else x * mask[..., None].to(x.dtype)
            y, state = self.layer.step(u[:, 0], state)
            y = y[:, None]
        elif mask is None:
            y, state = self.layer(x, state, return_state=True)
        else:
            y, state = self.layer.masked_forward(x, mask, state, return_state=True)
        return y, Intermediates(cached_kv=self._pack(state))

    @staticmethod
    def _pack(state) -> list[Tensor]:
        """The state's tensors as (B, 1, -1): x-transformers' batch operations on ``cached_kv`` (beam repeat,
        beam selection: dim 0) apply as they should, and its key-window crop ``t[..., -n:, :]`` is a no-op."""
        return [t.reshape(t.shape[0], 1, -1) for t in state_leaves(state)]

    def _unpack(self, packed, device):
        """Inverse of ``_pack``: the structure of ``default_state`` refilled; the batch from dim 0."""
        packed = list(packed)
        template = self.layer.default_state(packed[0].shape[0], device=device)
        if len(packed) != len(state_leaves(template)):
            raise ValueError(f"cache.cached_kv holds {len(packed)} tensors; this layer's state has "
                             f"{len(state_leaves(template))}: was the cache filled by another module?")
        it = iter(packed)
        return map_state(lambda t: next(it).reshape(t.shape), template)


def key_padding_keep(mask, shape: tuple, *, name: str, true_is_pad: bool = False) -> Tensor:
    """The (B, L) bool keep-mask (True = a real token) that ``mask`` means under the module's conventions."""
    if not isinstance(mask, Tensor) or tuple(mask.shape) != shape:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a (B, L) key-padding mask like x's first two dims {shape}; "
                         f"got {got}")
    if mask.dtype == torch.bool:
        return ~mask if true_is_pad else mask
    if mask.is_floating_point():
        pad = mask <= ADDITIVE_PAD
        if not bool(((mask == 0) | pad).all()):
            bad = mask[(mask != 0) & ~pad].flatten()[0].item()
            raise ValueError(f"{name}: a float mask is read as additive, 0 = keep and -inf (or <= "
                             f"{ADDITIVE_PAD:g}) = pad; got the value {bad}: pass a bool keep/pad mask")
        return ~pad
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name}: an integer mask must hold 0 or 1 (1 = keep); "
                         f"got {mask.unique().tolist()[:4]}")
    keep = mask.bool()
    return ~keep if true_is_pad else keep


def is_right_padding(keep: Tensor) -> bool:
    """Every row of the (B, L) bool mask is ones, then zeros."""
    v = keep.to(torch.int8)
    return bool((v[:, 1:] <= v[:, :-1]).all())


def padded_forward(layer: SSMLayer, x: Tensor, keep: Tensor | None, *, strict: bool = False,
                   name: str = "mask") -> Tensor:
    """``layer(x)`` with a key-padding mask ``keep`` (B, L), True = a real token, honoured.

    A bidirectional layer with right padding gets ``lengths``; otherwise padded inputs are zeroed, which for
    these linear time-invariant layers keeps a causal state at exactly zero through left padding (and, in a
    bidirectional layer, left padding never reaches a valid output). With ``strict``, a bidirectional layer
    refuses any padding but right or left (``name`` is the mask's argument name).
    """
    if keep is None:
        return layer(x)
    if layer.bidirectional:
        if is_right_padding(keep):
            return layer(x, lengths=keep.sum(1))
        # Left padding: zeroed, it reaches no valid output in either direction (the forward direction's state
        # stays zero through it, the backward direction never sees the past).
        if strict and not is_right_padding(keep.flip(1)):
            raise ValueError(f"{name}: a bidirectional layer needs right or left padding (each row's valid "
                             "positions in one block at the end or the start)")
    return layer.masked_forward(x, keep)

