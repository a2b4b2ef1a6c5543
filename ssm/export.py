"""Export to ONNX (and other runtimes without complex numbers): the real route and a step module.

ONNX has no complex type, and ``torch.onnx.export(..., dynamo=True)`` keeps a Python loop over the length
unrolled (one graph per length). While ``torch.onnx.export`` runs, or inside ``real_arithmetic``, every
layer takes its *real route* (``ssm._checks.real_route``): the family's step in real arithmetic (complex
states and eigenvalues as real and imaginary planes), repeated over the length by one loop operator
(``ssm.ops.scan.step_scan``: an ONNX ``Scan``, so the length stays dynamic). Mamba and Mamba-2 need nothing
more; the LTI layers (S4, S4D, RTF, S5) read step constants that ``real_arithmetic(model)`` computes from
the parameters before the trace (their discretization is complex arithmetic, which must not enter the
graph). Equal to the usual paths to float rounding (tests/test_export.py); docs/deployment.md has the
commands.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from . import _checks
from .layers.base import SSMLayer, state_leaves
from .layers.lti import LTILayer

__all__ = ["StepModule", "real_arithmetic"]


@contextmanager
def real_arithmetic(model: nn.Module | None = None, *, rate: float = 1.0):
    """Take the real route inside the block (eager calls too), with the step constants of every LTI layer
    in ``model`` computed now, at ``rate``, from the current parameters (no autograd), and read from there
    by a trace (``torch.onnx.export``, ``torch.export``). Export an LTI layer inside it:

        with ssm.export.real_arithmetic(model):
            torch.onnx.export(model, (x,), f, dynamo=True, dynamic_shapes=...)
    """
    layers = [m for m in model.modules() if isinstance(m, LTILayer)] if model is not None else []
    rate = _checks.check_real("rate", rate, positive=True)
    with torch.no_grad():
        for layer in layers:
            layer._real_frozen = (rate, layer._real_constants(rate))
    _checks._REAL_ROUTE[0] += 1
    try:
        yield
    finally:
        _checks._REAL_ROUTE[0] -= 1
        for layer in layers:
            layer.__dict__.pop("_real_frozen", None)


class StepModule(nn.Module):
    """``layer.step`` as a module of real tensors: ``forward(x, *state)`` -> ``(y, *next_state)``, x (B, H),
    the state as real tensors (``initial_state``, ``to_real``, ``from_real``). On the real route (while
    exporting, or inside ``real_arithmetic``) an LTI layer's complex state travels as real planes; a
    selective layer's (window, SSM state) tuple is real already.

    Args:
        layer: an ``SSMLayer`` (not bidirectional: its step is undefined).
        rate: the sampling-rate factor of the steps.
    """

    def __init__(self, layer: SSMLayer, *, rate: float = 1.0) -> None:
        super().__init__()
        if not isinstance(layer, SSMLayer):
            raise ValueError(f"layer must be an ssm SSMLayer; got {type(layer).__name__}")
        if layer.bidirectional:
            raise ValueError("layer must not be bidirectional: its step is undefined")
        self.layer = layer
        self.rate = _checks.check_real("rate", rate, positive=True)

    def to_real(self, state: Any) -> tuple[Tensor, ...]:
        """The layer's state -> the real tensors ``forward`` takes (its leaves; complex as real planes)."""
        if isinstance(self.layer, LTILayer):
            return (self.layer.to_real_state(state, self.rate),)
        return tuple(state_leaves(state))

    def from_real(self, leaves: tuple[Tensor, ...]) -> Any:
        """Inverse of ``to_real``."""
        if isinstance(self.layer, LTILayer):
            return self.layer.from_real_state(leaves[0], self.rate)
        return tuple(leaves)

    def initial_state(self, batch_size: int, *, device=None) -> tuple[Tensor, ...]:
        """``to_real(layer.default_state(batch_size))``: the zero state as real tensors."""
        return self.to_real(self.layer.default_state(batch_size, device=device))

    def forward(self, x: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        if isinstance(self.layer, LTILayer):
            if len(state) != 1:
                raise ValueError(f"state must be one real tensor (StepModule.to_real); got {len(state)}")
            if _checks.real_route():
                y, xr = self.layer.real_step(x, state[0], rate=self.rate)
                return y, xr
            y, nxt = self.layer.step(x, self.from_real(state), rate=self.rate)
            return (y, *self.to_real(nxt))
        y, nxt = self.layer.step(x, tuple(state), rate=self.rate)
        return (y, *state_leaves(nxt))
