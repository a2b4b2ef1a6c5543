"""RTF: the rational-transfer-function layer (Parnichkun et al., "State-Free Inference of State-Space Models:
The Transfer Function Approach", ICML 2024).

Each feature h filters its input with H_h(z) = (b_1 z^-1 + ... + b_N z^-N) / (1 + a_1 z^-1 + ... + a_N z^-N)
(the direct term b_0 is the layer's D skip). The kernel comes from FFTs of the coefficients
(``ssm.kernels.rtf_kernel``), so its cost does not grow with N; the recurrent path is the companion
recurrence in O(N) per step (``ssm.transfer.rtf_step``). The model is discrete-time: there is no dt, so
``rate`` other than 1 is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_choice, check_int
from ..systems.rtf import rtf_kernel
from ..systems.rtf import rtf_filter, rtf_init, rtf_step, stable_denominator
from .base import SSMLayer

RTF_CONSTRAINTS = ("none", "stable")


class RTF(SSMLayer):
    """Rational transfer function layer.

    Args:
        d_model: H.
        d_state: N, the order of the denominator (and of the strictly proper numerator).
        constraint: "none" (the denominator coefficients are free parameters, as in the paper) or "stable"
            (they are mapped through ``ssm.transfer.stable_denominator`` so every pole stays inside the unit
            disc).
        Other keyword arguments: see ``SSMLayer``. The SSM-parameter hints apply to the denominator.

    Initialization (as in the paper): a = 0, i.e. every pole at the origin, so the layer starts as an FIR
    filter of length N + 1.

    Shapes: forward x (B, L, H) -> (B, L, H); step x (B, H), state (B, H, N) real (the last N values of the
    all-pole part w, newest first).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        constraint: str = "none",
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
        super().__init__(d_model, channels=channels, bidirectional=bidirectional, transposed=transposed,
                         activation=activation, glu=glu, dropout=dropout, ssm_lr=ssm_lr,
                         ssm_weight_decay=ssm_weight_decay, device=device, dtype=dtype)
        self.d_state = N = check_int("d_state", d_state, minimum=1)
        self.constraint = check_choice("constraint", constraint, RTF_CONSTRAINTS)
        H = self.d_model
        C_out = self.channels * (2 if self.bidirectional else 1)
        real_dtype = dtype or torch.get_default_dtype()
        b, a = rtf_init(C_out * H, N, dtype=real_dtype)  # b (C'H, N+1), a (C'H, N)
        self.register_ssm("a", a[:H].clone().to(device))
        self.b = torch.nn.Parameter(b[:, 1:].reshape(C_out, H, N).clone().to(device))
        if self.bidirectional:
            # The anti-causal kernel starts at lag -1, which the direct term D does not cover: the reverse
            # channels keep their own b_0.
            self.b0_rev = torch.nn.Parameter(b[self.channels * H :, 0].reshape(self.channels, H).clone().to(device))

    def _coefficients(self, channels: int) -> tuple[Tensor, Tensor]:
        """b (channels*H, N+1) and a (channels*H, N), channels flattened into the feature dim; b_0 = 0 for the
        causal channels (D is their direct term), ``b0_rev`` for the anti-causal ones of a bidirectional layer."""

        def compute():
            a = stable_denominator(self.a) if self.constraint == "stable" else self.a
            b = self.b[:channels]
            b0 = torch.zeros_like(b[..., :1])
            if channels > self.channels:
                b0 = torch.cat([b0[: self.channels], self.b0_rev[..., None]], dim=0)
            b = torch.cat([b0, b], dim=-1).reshape(channels * self.d_model, -1)
            return b, a.repeat(channels, 1)

        return self.memo(f"coefficients{channels}", (), compute)

    def _check_rate(self, rate: float) -> float:
        if rate != 1.0:
            raise ValueError(f"rate must be 1.0 for RTF, a discrete-time model without dt; got {rate}")
        return 1.0

    def _kernel(self, L: int, rate: float) -> Tensor:
        C_out = self.b.shape[0]
        b, a = self._coefficients(C_out)
        return rtf_kernel(b, a, L).reshape(C_out, self.d_model, L)

    # ---- recurrent path -----------------------------------------------------------------------------------
    def default_state(self, batch_size: int, *, device=None) -> Tensor:
        check_int("batch_size", batch_size, minimum=1)
        return torch.zeros(batch_size, self.d_model, self.d_state, dtype=self.a.dtype,
                           device=device if device is not None else self.a.device)

    def _per_channel(self, t: Tensor) -> Tensor:
        """(B, H, ...) -> (B, C*H, ...): the all-pole part w is shared by the channels."""
        return t.repeat(1, self.channels, *([1] * (t.ndim - 2)))

    def _step(self, u: Tensor, state: Tensor, rate: float):
        b, a = self._coefficients(self.channels)
        y, next_state = rtf_step(b, a, self._per_channel(u), self._per_channel(state))
        return y.reshape(-1, self.channels, self.d_model), next_state[:, : self.d_model]

    def _zero_input_response(self, state: Tensor, L: int, rate: float) -> Tensor:
        b, a = self._coefficients(self.channels)
        zeros = torch.zeros(state.shape[0], self.channels * self.d_model, L, dtype=state.dtype, device=state.device)
        y, _ = rtf_filter(b, a, zeros, self._per_channel(state))
        return y.reshape(-1, self.channels, self.d_model, L)

    def _chunk_state(self, u: Tensor, state, rate: float) -> Tensor:
        b, a = self._coefficients(1)
        _, next_state = rtf_filter(b, a, u, state)
        return next_state
