"""The shared base of every SSM layer: shapes, the two forward paths, D skip, output projection.

A layer maps u (B, L, H) to y (B, L, H) in two equivalent ways:

* convolutional (``forward``): y = activation(K * u + D u) -> dropout -> output linear, with the kernel
  K (C, H, L) from a pure function in ``ssm.kernels``;
* recurrent (``step``): one token at a time, x_k = Ab x_{k-1} + Bb u_k, y_k = C x_k + D u_k, then the same
  pointwise post-processing.

``forward(x, state)`` continues from a recurrent state, so a stream processed in chunks equals one pass.
Subclasses implement the SSM-specific hooks: ``_kernel``, ``_zero_input_response``, ``_chunk_state``,
``_step`` and ``default_state``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_positive
from ..ops.fftconv import fftconv

ACTIVATIONS = ("gelu", "silu", "relu", "tanh", "identity")
_ACT = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh, "identity": lambda t: t}


def complex_param(z: Tensor) -> nn.Parameter:
    """Store a complex tensor as a real parameter (..., 2) (complex parameters as real views)."""
    return nn.Parameter(torch.view_as_real(z.resolve_conj().contiguous()).clone())


def as_complex(p: Tensor) -> Tensor:
    """Inverse of ``complex_param``: (..., 2) real -> (...) complex (a view, differentiable)."""
    return torch.view_as_complex(p if p.is_contiguous() else p.contiguous())


def init_log_dt(H: int, dt_min: float, dt_max: float, *, device=None, dtype=None) -> Tensor:
    """log dt_h drawn uniformly in [log dt_min, log dt_max] (S4's initialization of the step size)."""
    check_positive("dt_min", dt_min)
    check_positive("dt_max", dt_max)
    if dt_min > dt_max:
        raise ValueError(f"dt_min must be <= dt_max; got dt_min={dt_min}, dt_max={dt_max}")
    r = torch.rand(H, device=device, dtype=dtype)
    return r * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)


class SSMLayer(nn.Module):
    """Base class of S4, S4D and RTF.

    Args:
        d_model: H, the number of features (independent SSMs, one per feature).
        channels: C, output channels per feature, mixed by the output projection (C*H -> H).
        bidirectional: add an anti-causal kernel (a second set of C channels applied backwards in time).
        transposed: inputs/outputs are (B, H, L) instead of the default (B, L, H).
        activation: applied to the SSM output before the projection, one of ``ACTIVATIONS``.
        glu: the output projection maps to 2H and a GLU gates it back to H (S4's ``postact='glu'``).
        dropout: dropout after the activation.
        ssm_lr, ssm_weight_decay: optimizer hints attached to the SSM parameters (read by ``ssm.optim``);
            ``ssm_lr=None`` lets them follow the global learning rate.
    """

    def __init__(
        self,
        d_model: int,
        *,
        channels: int = 1,
        bidirectional: bool = False,
        transposed: bool = False,
        activation: str = "gelu",
        glu: bool = False,
        dropout: float = 0.0,
        ssm_lr: float | None = 1e-3,
        ssm_weight_decay: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.d_model = H = check_int("d_model", d_model, minimum=1)
        self.channels = check_int("channels", channels, minimum=1)
        self.bidirectional = bool(bidirectional)
        self.transposed = bool(transposed)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        if ssm_lr is not None:
            check_positive("ssm_lr", ssm_lr)
        if ssm_weight_decay < 0:
            raise ValueError(f"ssm_weight_decay must be >= 0; got {ssm_weight_decay}")
        self._hint = {"weight_decay": float(ssm_weight_decay)}
        if ssm_lr is not None:
            self._hint["lr"] = float(ssm_lr)
        factory = {"device": device, "dtype": dtype}
        self.D = nn.Parameter(torch.randn(self.channels, H, **factory))
        self.drop = nn.Dropout(dropout)
        self.glu = bool(glu)
        self.out_proj = nn.Linear(self.channels * H, (2 if glu else 1) * H, **factory)
        self._memo_store: dict[str, tuple] = {}

    # ---- hooks for subclasses ------------------------------------------------------------------------------
    def _kernel(self, L: int, rate: float) -> Tensor:
        """Convolution kernel (C', H, L), C' = 2C when bidirectional (forward channels first)."""
        raise NotImplementedError

    def _zero_input_response(self, state, L: int, rate: float) -> Tensor:
        """Outputs (B, C, H, L) caused by the initial state alone: y_k = C Ab^{k+1} x_{-1}."""
        raise NotImplementedError

    def _chunk_state(self, u: Tensor, state, rate: float):
        """State after the chunk u (B, H, L), starting from ``state`` (None means zero)."""
        raise NotImplementedError

    def _step(self, u: Tensor, state, rate: float) -> tuple[Tensor, object]:
        """One step without the D skip: u (B, H) -> (C x_k (B, C, H), next state)."""
        raise NotImplementedError

    def default_state(self, batch_size: int, *, device=None) -> Tensor:
        """The zero state for a batch: the starting point of ``step`` and ``forward(x, state=...)``."""
        raise NotImplementedError

    def ssm_parameters(self) -> list[nn.Parameter]:
        """Parameters whose change invalidates the kernel cache."""
        return [p for n, p in self.named_parameters() if not n.startswith(("out_proj", "D"))]

    # ---- helpers ------------------------------------------------------------------------------------------
    def register_ssm(self, name: str, value: Tensor, *, complex_: bool = False) -> nn.Parameter:
        """Register an SSM parameter with this layer's optimizer hints (lr, weight_decay)."""
        param = complex_param(value) if complex_ else nn.Parameter(value)
        param._optim = dict(self._hint)  # read by ssm.optim.param_groups
        self.register_parameter(name, param)
        return param

    def _check_rate(self, rate: float) -> float:
        check_positive("rate", rate)
        return float(rate)

    def memo(self, name: str, key: tuple, fn):
        """``fn()``, cached under ``name`` in eval mode without autograd while the SSM parameters (tracked by
        their version counters) and ``key`` are unchanged; recomputed whenever a graph may be needed."""
        if self.training or torch.is_grad_enabled():
            self._memo_store.pop(name, None)
            return fn()
        full_key = (key, tuple((id(p), p._version, p.device, p.dtype) for p in self.ssm_parameters()))
        hit = self._memo_store.get(name)
        if hit is not None and hit[0] == full_key:
            return hit[1]
        value = fn()
        self._memo_store[name] = (full_key, value)
        return value

    def kernel(self, L: int, rate: float = 1.0) -> Tensor:
        """The convolution kernel (C', H, L) in float32 or wider, even under autocast.

        In eval mode without autograd the kernel is cached (``memo``) and reused while the SSM parameters,
        L and rate are unchanged, so repeated inference pays only for the convolution.
        """
        L = check_int("L", L, minimum=1)
        rate = self._check_rate(rate)
        params = self.ssm_parameters()
        dev = params[0].device.type if params else "cpu"

        def compute() -> Tensor:
            with torch.autocast(device_type=dev, enabled=False):
                return self._kernel(L, rate)

        return self.memo("kernel", (L, rate), compute)

    def _to_BHL(self, x: Tensor) -> Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            want = "(B, H, L)" if self.transposed else "(B, L, H)"
            raise ValueError(f"x must be a 3-D tensor {want}; got {shape}")
        H = x.shape[1] if self.transposed else x.shape[2]
        if H != self.d_model:
            raise ValueError(f"x must have d_model={self.d_model} features; got {H} (shape {tuple(x.shape)})")
        return x if self.transposed else x.transpose(1, 2)

    def _post(self, y: Tensor) -> Tensor:
        """(B, C, H, L) or (B, C, H) SSM outputs -> activation, dropout, output projection -> (B, L, H)/(B, H)."""
        if y.ndim == 4:
            y = rearrange(y, "b c h l -> b l (c h)")
        else:
            y = rearrange(y, "b c h -> b (c h)")
        y = self.drop(_ACT[self.activation](y))
        y = y.to(self.out_proj.weight.dtype) if not torch.is_autocast_enabled() else y
        y = self.out_proj(y)
        if self.glu:
            y = F.glu(y, dim=-1)
        return y

    def _check_lengths(self, lengths: Tensor, Bsz: int, L: int) -> Tensor:
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (Bsz,) or lengths.is_floating_point():
            raise ValueError(f"lengths must be an integer tensor of shape ({Bsz},); got {lengths!r}")
        if bool((lengths < 0).any()) or bool((lengths > L).any()):
            raise ValueError(f"lengths must lie in [0, L={L}]; got {lengths.tolist()}")
        return lengths

    def _check_state_tensor(self, state: Tensor, Bsz: int) -> None:
        want = self.default_state(Bsz, device="meta")
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != tuple(want.shape):
            got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(f"state must have shape {tuple(want.shape)} (see default_state); got {got}")
        if state.is_complex() != want.is_complex():
            raise ValueError(f"state must be {'complex' if want.is_complex() else 'real'}; got {state.dtype}")

    # ---- the two paths ------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        state: Tensor | None = None,
        *,
        return_state: bool = False,
        lengths: Tensor | None = None,
        rate: float = 1.0,
    ):
        """Convolutional path.

        Args:
            x: (B, L, H), or (B, H, L) when ``transposed``.
            state: recurrent state to continue from (shape of ``default_state(B)``), or None for zero.
            return_state: also return the state after the last position.
            lengths: (B,) valid lengths; positions >= lengths[b] are padding and do not change any output at
                a valid position (their inputs are zeroed, which matters for bidirectional layers).
            rate: sampling-rate factor; dt is multiplied by ``rate``.
        Returns:
            y with the layout of x, or (y, next_state) when ``return_state``.
        """
        u = self._to_BHL(x)  # (B, H, L)
        Bsz, H, L = u.shape
        if (state is not None or return_state) and self.bidirectional:
            raise ValueError("state passing is undefined for a bidirectional layer (it reads the future); "
                             "pass state=None and return_state=False")
        if lengths is not None:
            self._check_lengths(lengths, Bsz, L)
            if return_state:
                raise ValueError("return_state with lengths is not supported: pass equal-length chunks, or use "
                                 "step for ragged streams")
            mask = torch.arange(L, device=u.device)[None, :] < lengths.to(u.device)[:, None]  # (B, L)
            u = u * mask[:, None, :].to(u.dtype)
        if state is not None:
            self._check_state_tensor(state, Bsz)
        if u.dtype in (torch.float16, torch.bfloat16):
            u = u.float()
        K = self.kernel(L, rate)  # (C', H, L)
        K_rev = None
        if self.bidirectional:
            K, K_rev = K[: self.channels], K[self.channels :]
        D = self.D.to(K.dtype)
        y = fftconv(u.to(K.dtype), K, D, K_rev=K_rev, layout="BHL")  # (B, C, H, L)
        if state is not None:
            y = y + self._zero_input_response(state, L, rate).to(y.dtype)
        next_state = self._chunk_state(u.to(K.dtype), state, rate) if return_state else None
        y = self._post(y)  # (B, L, H)
        if self.transposed:
            y = y.transpose(1, 2)
        y = y.to(x.dtype) if not torch.is_autocast_enabled() else y
        return (y, next_state) if return_state else y

    def step(self, x: Tensor, state: Tensor, *, rate: float = 1.0) -> tuple[Tensor, Tensor]:
        """Recurrent path: one token x (B, H) and the state -> (y (B, H), next_state)."""
        if self.bidirectional:
            raise ValueError("step is undefined for a bidirectional layer: its output depends on future inputs")
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, d_model={self.d_model}) in step; got {got}")
        self._check_state_tensor(state, x.shape[0])
        rate = self._check_rate(rate)
        u = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        with torch.autocast(device_type=u.device.type, enabled=False):
            y, next_state = self._step(u, state, rate)  # (B, C, H)
        y = y.real.to(u.dtype) + self.D.to(u.dtype) * u[:, None, :]
        y = self._post(y).to(x.dtype)
        return y, next_state
