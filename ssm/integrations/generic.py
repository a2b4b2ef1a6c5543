"""An ``ssm`` layer in the place of a self-attention module, for codebases that call attention as
``attn(x, mask=..., **kwargs)`` (x-transformers and most hand-written Transformers).

The host's extra arguments (rotary embeddings, relative-position biases, caches of keys) mean nothing to a
state-space layer and are ignored; a key-padding mask is honoured: padded inputs are zeroed before a causal
layer (its state stays exactly zero through left padding, and right padding never reaches a valid output),
and a bidirectional layer gets ``lengths`` from right padding and zeroed inputs for left padding.
Cross-attention (a ``context``) has no sequence-layer equivalent and is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_choice
from ..layers import SSMLayer

RETURNS = ("tensor", "tuple")


class SSMMixer(nn.Module):
    """Wrap ``layer`` so that it answers a self-attention call.

    Args:
        layer: any ``ssm`` layer with the (B, L, H) layout.
        mask_arg: the keyword under which the host passes its key-padding mask, (B, L) bool, True = keep.
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
        mask = kwargs.get(self.mask_arg)
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.shape != x.shape[:2]:
                got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"{self.mask_arg} must be a (B, L) key-padding mask like x's first two dims "
                                 f"{tuple(x.shape[:2])}; got {got}")
            mask = mask.bool()
        y = padded_forward(self.layer, x, mask, strict=True, name=self.mask_arg)
        return (y, None) if self.returns == "tuple" else y


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

