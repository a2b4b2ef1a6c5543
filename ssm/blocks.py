"""The residual block: norm, SSM layer, dropout, residual, optional feed-forward; with state passing."""

from __future__ import annotations

from torch import Tensor, nn

from ._checks import check_bool, check_choice, check_float_dtype, check_int, check_real
from .layers import LAYERS, SSMLayer


def check_layer_kwargs(layer_kwargs) -> dict:
    """``layer_kwargs`` as a dict (None: empty); a block's layer must keep the (B, L, H) layout."""
    if layer_kwargs is None:
        return {}
    if not isinstance(layer_kwargs, dict):
        raise ValueError(f"layer_kwargs must be a dict of layer arguments or None; got {layer_kwargs!r}")
    if layer_kwargs.get("transposed", False) is not False:
        raise ValueError("layer_kwargs must not set transposed: blocks pass (B, L, H) tensors to the layer; "
                         f"got transposed={layer_kwargs['transposed']!r}")
    return dict(layer_kwargs)

NORMS = ("layer", "batch", "none")


class Norm(nn.Module):
    """LayerNorm or BatchNorm over the feature dim of (B, L, H) or (B, H) tensors.

    BatchNorm uses batch statistics in training and running statistics in eval; ``step`` therefore matches
    ``forward`` in eval mode (and padded positions enter the batch statistics in training).
    """

    def __init__(self, kind: str, d_model: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.kind = kind
        factory = {"device": device, "dtype": dtype}
        if kind == "layer":
            self.norm = nn.LayerNorm(d_model, **factory)
        elif kind == "batch":
            self.norm = nn.BatchNorm1d(d_model, **factory)
        else:
            self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "batch" and x.ndim == 3:
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(x)


class SSMBlock(nn.Module):
    """x -> x + Dropout(Layer(Norm(x))) [-> x + Dropout(FF(Norm(x)))] with pre-norm, or the post-norm variant.

    Args:
        d_model: H.
        layer: "s4", "s4d", "rtf", or an ``SSMLayer`` instance (built with ``transposed=False``).
        d_state: N, passed to the layer when it is built from a name.
        norm: "layer", "batch" or "none".
        prenorm: normalize the input of each branch (True) or the output of each residual sum (False).
        dropout: dropout on the residual branches.
        ff: expansion factor of an optional GELU feed-forward branch (0: none).
        layer_kwargs: further keyword arguments for the layer (init, disc, channels, bidirectional, ...).

    Shapes: forward x (B, L, H) -> (B, L, H); step x (B, H) -> (B, H); the state is the layer's.
    """

    def __init__(
        self,
        d_model: int,
        *,
        layer: str | SSMLayer = "s4",
        d_state: int = 64,
        norm: str = "layer",
        prenorm: bool = True,
        dropout: float = 0.0,
        ff: int = 0,
        layer_kwargs: dict | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        H = check_int("d_model", d_model, minimum=1)
        norm = check_choice("norm", norm, NORMS)
        ff = check_int("ff", ff, minimum=0)
        prenorm = check_bool("prenorm", prenorm)
        dropout = check_real("dropout", dropout, minimum=0.0, below=1.0)
        check_float_dtype("dtype", dtype)
        layer_kwargs = check_layer_kwargs(layer_kwargs)
        factory = {"device": device, "dtype": dtype}
        if isinstance(layer, SSMLayer):
            if layer.d_model != H or layer.transposed:
                raise ValueError(f"layer must have d_model={H} and transposed=False; got "
                                 f"d_model={layer.d_model}, transposed={layer.transposed}")
            self.layer = layer
        else:
            name = check_choice("layer", layer, tuple(LAYERS))
            self.layer = LAYERS[name](H, d_state, **layer_kwargs, **factory)
        self.prenorm = bool(prenorm)
        self.norm = Norm(norm, H, **factory)
        self.drop = nn.Dropout(dropout)
        self.ff = None
        if ff:
            self.ff = nn.Sequential(nn.Linear(H, ff * H, **factory), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(ff * H, H, **factory))
            self.ff_norm = Norm(norm, H, **factory)

    def default_state(self, batch_size: int, *, device=None) -> Tensor:
        return self.layer.default_state(batch_size, device=device)

    def _feed_forward(self, x: Tensor) -> Tensor:
        if self.ff is None:
            return x
        z = self.ff(self.ff_norm(x) if self.prenorm else x)
        x = x + self.drop(z)
        return x if self.prenorm else self.ff_norm(x)

    def forward(self, x: Tensor, state: Tensor | None = None, *, return_state: bool = False,
                lengths: Tensor | None = None, rate: float | Tensor = 1.0, seq_idx: Tensor | None = None):
        """x (B, L, H) -> (B, L, H), or (y, next_state) with ``return_state``; see ``SSMLayer.forward``
        (``seq_idx`` (B, L): packed documents, each read on its own)."""
        z = self.norm(x) if self.prenorm else x
        out = self.layer(z, state, return_state=return_state, lengths=lengths, rate=rate, seq_idx=seq_idx)
        z, next_state = out if return_state else (out, None)
        x = x + self.drop(z)
        if not self.prenorm:
            x = self.norm(x)
        x = self._feed_forward(x)
        return (x, next_state) if return_state else x

    def step(self, x: Tensor, state: Tensor, *, rate: float = 1.0) -> tuple[Tensor, Tensor]:
        """One token: x (B, H) -> (y (B, H), next_state)."""
        z = self.norm(x) if self.prenorm else x
        z, state = self.layer.step(z, state, rate=rate)
        x = x + self.drop(z)
        if not self.prenorm:
            x = self.norm(x)
        return self._feed_forward(x), state
