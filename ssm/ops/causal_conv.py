"""Depthwise causal convolution with an optional SiLU, the short convolution of Mamba and Mamba-2, with the
argument names of the ``causal_conv1d`` package (``causal_conv1d_fn``):

    pre[b, d, t] = bias[d] + sum_i weight[d, i] u[b, d, t - (k - 1) + i],   out = silu(pre) (or pre)

where u is the stream [initial_states, x] (zeros before x without ``initial_states``). Shapes: x (B, D, L) of
any strides (a transposed (B, L, D) view is read as it is), weight (D, k), bias (D,), initial_states
(B, D, k - 1). ``causal_conv1d_fn`` is k shifted multiply-adds on x itself (no padded copy of the input) in a
custom autograd.Function that saves only its inputs and recomputes ``pre`` in the backward; the output is
channel-last, (B, L, D) in memory. ``causal_conv1d_ref`` is the plain twin (``F.conv1d`` on the
concatenated stream).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_choice, check_tensor, single_backward

__all__ = ["causal_conv1d_fn", "causal_conv1d_ref"]


def _check(x, weight, bias, initial_states, activation) -> None:
    check_tensor("x", x, 3)
    if check_tensor("weight", weight, 2).shape[0] != x.shape[1]:
        raise ValueError(f"weight must have shape (D, k) with D = {x.shape[1]}; got {tuple(weight.shape)}")
    if bias is not None and check_tensor("bias", bias, 1).shape != (x.shape[1],):
        raise ValueError(f"bias must have shape (D,) = ({x.shape[1]},); got {tuple(bias.shape)}")
    want = (x.shape[0], x.shape[1], weight.shape[1] - 1)
    if initial_states is not None and check_tensor("initial_states", initial_states, 3).shape != want:
        raise ValueError(f"initial_states must have shape (B, D, k - 1) = {want}; "
                         f"got {tuple(initial_states.shape)}")
    if activation is not None:
        check_choice("activation", activation, ("silu",))


def _pre(x: Tensor, w: Tensor, bias: Tensor | None, h0: Tensor | None) -> Tensor:
    """bias + sum_i w[:, i] u[t - (k - 1) + i] into a new channel-last (B, D, L) tensor."""
    B, D, L = x.shape
    k = w.shape[1]
    out = torch.mul(x, w[:, k - 1, None], out=x.new_empty((B, L, D)).transpose(1, 2))
    for i in range(k - 1):
        s = k - 1 - i  # tap i reads the stream s steps back
        if s < L:
            out[..., s:].addcmul_(x[..., :L - s], w[:, i, None])
        if h0 is not None:  # outputs t < s read the initial states at t + i
            m = min(s, L)
            out[..., :m].addcmul_(h0[..., i:i + m], w[:, i, None])
    return out if bias is None else out.add_(bias[:, None])


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, h0, silu):
        ctx.save_for_backward(x, w, bias, h0)
        ctx.silu = silu
        out = _pre(x, w, bias, h0)
        return F.silu(out, inplace=True) if silu else out

    @staticmethod
    @single_backward("causal_conv1d_fn", "use causal_conv1d_ref (plain autograd) for higher derivatives")
    def backward(ctx, gy):
        x, w, bias, h0 = ctx.saved_tensors
        L, k = x.shape[-1], w.shape[1]
        if ctx.silu:  # d silu(p) / dp = sig(p) (1 + p (1 - sig(p)))
            p = _pre(x, w, bias, h0)
            sig = torch.sigmoid(p)
            g = p.mul_(sig.neg().add_(1)).add_(1).mul_(sig).mul_(gy)
        else:
            g = gy
        gx = torch.mul(g, w[:, k - 1, None], out=x.new_empty((x.shape[0], L, x.shape[1])).transpose(1, 2))
        gw = w.new_empty(w.shape)
        gw[:, k - 1] = (g * x).sum((0, 2))
        gh0 = None if h0 is None else torch.zeros_like(h0)
        for i in range(k - 1):
            s = k - 1 - i
            if s < L:
                gx[..., :L - s].addcmul_(g[..., s:], w[:, i, None])
                gw[:, i] = (g[..., s:] * x[..., :L - s]).sum((0, 2))
            else:
                gw[:, i] = 0
            if h0 is not None:
                m = min(s, L)
                gh0[..., i:i + m].addcmul_(g[..., :m], w[:, i, None])
                gw[:, i] += (g[..., :m] * h0[..., i:i + m]).sum((0, 2))
        gbias = None if bias is None else g.sum((0, 2))
        return gx, gw, gbias, gh0, None


def causal_conv1d_fn(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                     initial_states: Tensor | None = None, activation: str | None = None) -> Tensor:
    """Depthwise causal convolution (module docstring): x (B, D, L), weight (D, k), bias (D,), initial_states
    (B, D, k - 1), activation None or "silu" -> (B, D, L) in x's dtype, channel-last in memory."""
    _check(x, weight, bias, initial_states, activation)
    dtype = x.dtype
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    h0 = None if initial_states is None else initial_states.to(dtype)
    return _CausalConv.apply(x, w, b, h0, activation == "silu")


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                      initial_states: Tensor | None = None, activation: str | None = None) -> Tensor:
    """Reference twin of ``causal_conv1d_fn``: ``F.conv1d`` over [initial_states, x]."""
    _check(x, weight, bias, initial_states, activation)
    B, D, L = x.shape
    k = weight.shape[1]
    h0 = x.new_zeros((B, D, k - 1)) if initial_states is None else initial_states.to(x.dtype)
    out = F.conv1d(torch.cat([h0, x], dim=-1), weight.to(x.dtype)[:, None, :],
                   None if bias is None else bias.to(x.dtype), groups=D)
    return F.silu(out) if activation == "silu" else out
