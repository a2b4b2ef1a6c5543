"""Sequence models: an encoder, a stack of SSM blocks, pooling and a decoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_bool, check_choice, check_float_dtype, check_int, check_real
from .blocks import NORMS, Norm, SSMBlock, check_layer_kwargs

POOLS = ("mean", "last", "none")


class SSMModel(nn.Module):
    """Encoder -> n_layers x SSMBlock -> final norm (pre-norm models) -> pooling -> decoder.

    Args:
        d_input: input features, or the vocabulary size when ``embedding=True``.
        d_output: output features (number of classes for classification).
        d_model, n_layers, d_state: width, depth, state size N of every layer.
        layer: "s4", "s4d" or "rtf".
        dropout, norm, prenorm, ff: see ``SSMBlock``.
        pool: "mean" (masked by ``lengths`` when given), "last" (the position lengths-1), or "none"
            (one output per position, as for language modeling; needed for ``step``).
        embedding: inputs are token ids (B, L) embedded by ``nn.Embedding(d_input, d_model)``.
        bidirectional: bidirectional layers (no ``step`` then).
        layer_kwargs: further keyword arguments for every layer (init, disc, channels, ssm_lr, ...).

    Shapes: forward x (B, L, d_input) float, or (B, L) long with ``embedding``; -> (B, d_output) pooled
    or (B, L, d_output) with pool="none". step x (B, d_input) or (B,) long -> (B, d_output).
    """

    def __init__(
        self,
        d_input: int,
        d_output: int,
        *,
        d_model: int = 128,
        n_layers: int = 4,
        layer: str = "s4",
        d_state: int = 64,
        dropout: float = 0.0,
        norm: str = "layer",
        prenorm: bool = True,
        pool: str = "mean",
        embedding: bool = False,
        bidirectional: bool = False,
        ff: int = 0,
        layer_kwargs: dict | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.d_input = check_int("d_input", d_input, minimum=1)
        self.d_output = check_int("d_output", d_output, minimum=1)
        d_model = check_int("d_model", d_model, minimum=1)
        n_layers = check_int("n_layers", n_layers, minimum=0)
        check_choice("norm", norm, NORMS)
        self.pool = check_choice("pool", pool, POOLS)
        self.embedding = check_bool("embedding", embedding)
        check_bool("bidirectional", bidirectional)
        check_bool("prenorm", prenorm)
        check_real("dropout", dropout, minimum=0.0, below=1.0)
        check_float_dtype("dtype", dtype)
        factory = {"device": device, "dtype": dtype}
        if self.embedding:
            self.encoder = nn.Embedding(self.d_input, d_model, device=device, dtype=dtype)
        else:
            self.encoder = nn.Linear(self.d_input, d_model, **factory)
        kwargs = check_layer_kwargs(layer_kwargs)
        if bidirectional:
            kwargs["bidirectional"] = True
        self.blocks = nn.ModuleList(
            SSMBlock(d_model, layer=layer, d_state=d_state, norm=norm, prenorm=prenorm, dropout=dropout,
                     ff=ff, layer_kwargs=kwargs, **factory)
            for _ in range(n_layers)
        )
        self.prenorm = bool(prenorm)
        self.final_norm = Norm(norm if prenorm else "none", d_model, **factory)
        self.decoder = nn.Linear(d_model, self.d_output, **factory)

    def _encode(self, x: Tensor, *, step: bool) -> Tensor:
        if self.embedding:
            ndim = 1 if step else 2
            if not isinstance(x, torch.Tensor) or x.ndim != ndim or x.is_floating_point() or x.is_complex():
                want = "(B,)" if step else "(B, L)"
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"x must be integer token ids of shape {want}; got {got}")
            if x.dtype == torch.bool:
                raise ValueError("x must be integer token ids; got a bool tensor")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.d_input):
                raise ValueError(f"x must hold token ids in [0, {self.d_input}); got range "
                                 f"[{int(x.min())}, {int(x.max())}]")
            x = x.long()  # uint8, int16, int32 ids too
        else:
            ndim = 2 if step else 3
            if not isinstance(x, torch.Tensor) or x.ndim != ndim or x.shape[-1] != self.d_input:
                want = "(B, d_input)" if step else "(B, L, d_input)"
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"x must have shape {want} with d_input={self.d_input}; got {got}")
            want_dtype = self.encoder.weight.dtype
            if x.dtype != want_dtype and not torch.is_autocast_enabled():
                if not x.is_floating_point():
                    raise ValueError(f"x must be a floating-point tensor; got {x.dtype}")
                raise ValueError(f"x has dtype {x.dtype} but the model's parameters are {want_dtype}: "
                                 f"convert one of them (x.to({want_dtype}) or model.to({x.dtype}))")
        return self.encoder(x)

    def default_state(self, batch_size: int, *, device=None) -> list[Tensor]:
        """One state per block."""
        return [block.default_state(batch_size, device=device) for block in self.blocks]

    def _check_states(self, state) -> None:
        if not isinstance(state, (list, tuple)) or len(state) != len(self.blocks):
            raise ValueError(f"state must be a list of {len(self.blocks)} block states (see default_state); "
                             f"got {type(state).__name__}")

    def forward(self, x: Tensor, lengths: Tensor | None = None, *, state: list | None = None,
                return_state: bool = False, seq_idx: Tensor | None = None):
        """Whole sequences; returns outputs, or (outputs, next_state) with ``return_state``. ``seq_idx``
        (B, L) numbers packed documents (non-decreasing per row): every block reads each on its own."""
        h = self._encode(x, step=False)  # (B, L, d_model)
        if state is not None:
            self._check_states(state)
        states = [] if return_state else None
        for i, block in enumerate(self.blocks):
            out = block(h, None if state is None else state[i], return_state=return_state, lengths=lengths,
                        seq_idx=seq_idx)
            if return_state:
                h, s = out
                states.append(s)
            else:
                h = out
        h = self.final_norm(h)
        h = self._pool(h, lengths)
        y = self.decoder(h)
        return (y, states) if return_state else y

    def _pool(self, h: Tensor, lengths: Tensor | None) -> Tensor:
        if self.pool == "none":
            return h
        Bsz, L, _ = h.shape
        if lengths is None:
            if L == 0:
                raise ValueError(f"x has length 0: pool={self.pool!r} has no position to read")
            return h.mean(dim=1) if self.pool == "mean" else h[:, -1]
        if (not isinstance(lengths, torch.Tensor) or lengths.dtype == torch.bool
                or lengths.is_floating_point()):
            raise ValueError(f"lengths must be an integer (not bool) tensor of shape ({Bsz},); "
                             f"got {lengths!r}")
        if Bsz and bool((lengths < 1).any()):
            bad = int((lengths < 1).nonzero()[0, 0])
            raise ValueError(f"lengths[{bad}] = {int(lengths[bad])}: pool={self.pool!r} needs at least one "
                             "valid position per sequence")
        lengths = lengths.to(h.device)
        if self.pool == "last":
            idx = (lengths - 1).clamp(min=0)
            return h[torch.arange(Bsz, device=h.device), idx]
        mask = (torch.arange(L, device=h.device)[None, :] < lengths[:, None]).to(h.dtype)  # (B, L)
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

    def step(self, x: Tensor, state: list) -> tuple[Tensor, list]:
        """One token: x (B, d_input) or (B,) ids -> (y (B, d_output), next_state). Needs pool="none"."""
        if self.pool != "none":
            raise ValueError(f"step needs pool='none' (per-token outputs); this model has pool={self.pool!r}")
        self._check_states(state)
        h = self._encode(x, step=True)
        new_states = []
        for block, s in zip(self.blocks, state):
            h, s = block.step(h, s)
            new_states.append(s)
        return self.decoder(self.final_norm(h)), new_states
