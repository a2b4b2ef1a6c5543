"""RTF: the rational-transfer-function layer (Parnichkun et al., "State-Free Inference of State-Space Models:
The Transfer Function Approach", ICML 2024).

Each feature h filters its input, per output channel c, with

    H_(c,h)(z) = (b_1 z^-1 + ... + b_N z^-N) / (1 + a_1 z^-1 + ... + a_N z^-N)

(the direct term b_0 is the layer's D skip). The layer owns the parameters and builds its discrete
system (``discrete_system``); the math is the family ``ssm.systems.rtf``: the kernel comes from FFTs of the
coefficients, so its cost does not grow with N, and the recurrent path is the companion recurrence in O(N)
per step, the all-pole part once per feature. The model is discrete-time: there is no dt, so ``rate``
other than 1 is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_choice, check_int, traced
from ..systems import rtf as rtf_family
from ..systems.rtf import RTFSystem, is_stable, rtf_init, stable_denominator
from .lti import LTILayer

RTF_CONSTRAINTS = ("montel", "reflection", "stable", "none")


class RTF(LTILayer):
    """Rational transfer function layer.

    Args:
        d_model: H.
        d_state: N, the order of the denominator (and of the strictly proper numerator).
        constraint: how the denominator parameters ``a`` map to the coefficients a_1..a_N:

            * ``"montel"`` (default): ``stable_denominator(a, "montel")``, sum_i |a_i| < 1. Stable by
              construction for any parameter values, any N and either precision, with a well-conditioned
              recurrence, so ``forward`` and ``step`` agree to float32 rounding however training moves
              the parameters. It excludes some stable filters (e.g. a double pole at 0.99).
            * ``"reflection"`` (``"stable"`` is its former name): the complete reflection-coefficient map.
              Every stable denominator is reachable, but for N >~ 8 and large parameters the rounded
              coefficients can be unstable or so ill-conditioned that ``step`` loses all accuracy; the
              layer then raises a ValueError (see below) rather than return a wrong kernel.
            * ``"none"``: the coefficients are free parameters, as in the paper. Poles may leave the unit
              circle during training, where the FFT kernel is wrong and ``step`` diverges: every
              ``discrete_system`` runs a Schur-Cohn test and raises a ValueError naming the features
              whose poles are on or outside the unit circle.

            All three map the initial a = 0 to a = 0 (the paper's initialization). The default was
            ``"none"``; it changed because a few hundred Adam steps at lr 0.05 moved a pole to 1.7.
        Other keyword arguments: see ``LTILayer``. The SSM-parameter hints apply to the denominator; the
            numerators follow the global optimizer settings.

    Initialization (as in the paper): a = 0, i.e. every pole at the origin, so the layer starts as an FIR
    filter of length N + 1.

    Shapes: forward x (B, L, H) -> (B, L, H); step x (B, H), state (B, H, N) float64 (the last N values of
    the all-pole part w, newest first, shared by the channels).

    Streaming: where poles crowd the unit circle the direct-form state cannot be folded into a chunk; the
    layer then refuses ``forward`` with ``state``, ``return_state`` or ``return_states_at``, saying why
    (``streaming_refusal``, docs/rtf.md); ``step``, the float64 recurrence, stays exact.
    """

    family = rtf_family

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        constraint: str = "montel",
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
        self.d_state = check_int("d_state", d_state, minimum=1)
        self.constraint = check_choice("constraint", constraint, RTF_CONSTRAINTS)
        self.build_ssm(device, dtype)
        # Set by ``to_rtf`` when the converted system cannot be streamed (its direct-form state is
        # ill-conditioned): why. ``streaming_refusal`` also probes the current coefficients themselves.
        self.stream_refusal: str | None = None
        self._stream_memo: tuple[list[tuple], str | None] | None = None

    def ssm_init(self, real_dtype: torch.dtype) -> dict:
        """The initial parameters (name -> (value, complex, optimizer hint)), computed on the CPU: a = 0 and a
        random strictly proper numerator (``rtf_init``); the denominator carries the SSM optimizer hints."""
        H, N = self.d_model, self.d_state
        C_out = self.channels * (2 if self.bidirectional else 1)
        b, a = rtf_init(C_out * H, N, dtype=real_dtype)  # b (C'H, N+1), a (C'H, N)
        values = {
            "a": (a[:H].clone(), False, True),
            "b": (b[:, 1:].reshape(C_out, H, N).clone(), False, False),
        }
        if self.bidirectional:
            # The anti-causal kernel starts at lag -1, which the direct term D does not cover: the reverse
            # channels keep their own b_0.
            values["b0_rev"] = (b[self.channels * H :, 0].reshape(self.channels, H).clone(), False, False)
        return values

    # ---- chunked streaming: refused where the direct-form state cannot be folded into a chunk ---------
    def streaming_refusal(self) -> str | None:
        """Why this layer cannot pass a state between chunks within its tolerance, or None.

        The ``to_rtf`` mark (``stream_refusal``), else the family's ``streaming_error`` probe of the current
        coefficients against ``STREAM_RTOL`` of their dtype (2e-5 float32, 1e-6 float64, relative to the
        output scale). Coefficients set by hand (``load_state_dict``, assignment, training) with poles
        crowding the unit circle fail it. Computed once per parameter values (the eval cache's snapshot,
        in every mode); skipped under ``torch.compile`` / ``torch.func`` (no value checks there). ``step``
        is not refused: the recurrence in float64 is the most accurate route (docs/rtf.md).
        """
        if self.stream_refusal is not None:
            return self.stream_refusal
        if self.d_state == 0 or self.bidirectional or traced():
            return None
        memo = self._stream_memo
        if memo is not None and self._params_equal(memo[0]):
            return memo[1]
        snap = [self._snapshot(p) for p in self.ssm_parameters()]
        with torch.no_grad():
            system = self.discrete_system()
            err = rtf_family.streaming_error(system, rtf_family.STREAM_PROBE)
        rtol = rtf_family.STREAM_RTOL.get(self.a.dtype, rtf_family.STREAM_RTOL[torch.float32])
        reason = None
        if not err <= rtol:
            reason = (f"its poles crowd the unit circle, where the direct-form state (float64) puts chunked "
                      f"outputs {err:.3g} off one pass relative to the output scale (tolerance {rtol:g} in "
                      f"{self.a.dtype}, on a white-noise probe of {2 * rtf_family.STREAM_PROBE} steps in "
                      f"chunks); run the sequence in one pass or token by token (step), or keep the poles "
                      "away from the circle (constraint='montel')")
        if self._params_equal(snap):
            self._stream_memo = (snap, reason)
        return reason

    def _check_streamable(self, what: str) -> None:
        reason = self.streaming_refusal()
        if reason is not None:
            raise ValueError(f"{what}: this RTF layer cannot pass a state between chunks: {reason}")

    def _open(self, x: Tensor, state, return_state: bool, lengths, rate, seq_idx, positions, split_rate=None):
        """``LTILayer._open``, with every route that folds a state into a chunk checked
        (``streaming_refusal``): ``state``, ``return_state`` and ``return_states_at`` are refused, and packed
        documents (``seq_idx``, whose boundaries take back the free response of a state) run one by one,
        which is exact."""
        if state is not None or return_state or positions is not None:
            self._check_streamable("state" if state is not None else
                                   "return_state" if return_state else "return_states_at")
        if seq_idx is not None and state is None and not self.bidirectional and self.streaming_refusal():
            done, u, rate, seq, order, index = super()._open(x, None, False, lengths, rate, seq_idx, None)
            if done is None:
                done = self._split_documents(x, seq, rate)
            return done, u, rate, seq, order, index
        return super()._open(x, state, return_state, lengths, rate, seq_idx, positions, split_rate)

    def _check_rate(self, rate: float) -> float:
        if rate != 1.0:
            raise ValueError(f"rate must be 1.0 for RTF, a discrete-time model without dt; got {rate}")
        return 1.0

    def denominator(self) -> Tensor:
        """a_1..a_N (H, N) after the constraint; for "reflection" and "none", checked to be stable."""
        a_raw = self.ssm_param("a")
        if self.constraint == "montel":
            return stable_denominator(a_raw, "montel")
        a = a_raw if self.constraint == "none" else stable_denominator(a_raw, "reflection")
        ok = is_stable(a)
        if torch.compiler.is_compiling():
            # Under torch.compile / torch.export a Python branch on the result would break the graph: an
            # assertion in the graph instead (the eager message names the features).
            torch._assert_async(ok.all(), f"RTF with constraint={self.constraint!r} has poles on or outside "
                                "the unit circle: use constraint='montel' (the default)")
            return a
        if traced():  # a torch.func transform (vmap over stacked parameters): no Python branch on values
            return a
        if not bool(ok.all()):
            bad = (~ok).nonzero().flatten().tolist()
            more = "..." if len(bad) > 10 else ""
            raise ValueError(
                f"RTF with constraint={self.constraint!r} has poles on or outside the unit circle in "
                f"features {bad[:10]}{more}: its kernel and recurrence would be wrong or diverge. Use "
                "constraint='montel' (the default), which is stable for any parameter values"
            )
        return a

    def discrete_system(self, rate: float = 1.0) -> RTFSystem:
        """The layer's discrete system: b (C', H, N+1) and a (H, N), C' = 2C when bidirectional.

        The causal channels have b_0 = 0 (the D parameter is their direct term); the anti-causal channels
        of a bidirectional layer follow them, with their own b_0 = ``b0_rev``. Differentiable; the base
        class caches it for inference.

        Args:
            rate: must be 1.0 (RTF has no dt); anything else raises a ValueError.

        Raises:
            ValueError: rate != 1, or (constraints "reflection" and "none") a pole on or outside the unit
                circle.
        """
        self._check_rate(rate)
        b = self.ssm_param("b")  # (C', H, N)
        b0 = torch.zeros_like(b[..., :1])
        if self.bidirectional:
            b0 = torch.cat([b0[: self.channels], self.ssm_param("b0_rev")[..., None]], dim=0)
        return rtf_family.system(torch.cat([b0, b], dim=-1), self.denominator())

    def default_state(self, batch_size: int, *, device=None) -> Tensor:
        """The zero state (B, H, N) (w_(k-1), ..., w_(k-N)), float64 whatever the parameters' dtype: near
        the unit circle the output depends on differences of large entries of w (``ssm.systems.rtf``)."""
        check_int("batch_size", batch_size, minimum=1)
        return torch.zeros(batch_size, self.d_model, self.d_state, dtype=rtf_family.state_dtype(self.a),
                           device=device if device is not None else self.a.device)
