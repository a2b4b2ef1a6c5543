"""S4: the diagonal-plus-low-rank (DPLR) state-space layer (Gu et al., "Efficiently Modeling Long Sequences
with Structured State Spaces", ICLR 2022).

A_h = diag(Lambda_h) - sum_r P_r P_r^*, initialized from the NPLR form of a HiPPO matrix (``ssm.hippo.nplr``)
in conjugate-pair half storage: N/2 modes stand for the N-state system with the conjugates appended
(``dplr_kernel(..., conj_pairs=True)``). The recurrent step uses the structure:

* bilinear (default, as the official S4):
  x_k = (I - dt/2 A)^{-1} [(I + dt/2 A) x_{k-1} + dt B u_k], the inverse applied by the Woodbury identity
  (I - dt/2 A)^{-1} = D0^{-1} - D0^{-1} U (I_R + V^* D0^{-1} U)^{-1} V^* D0^{-1}, D0 = I - dt/2 Lambda,
  U = dt/2 P, V = P: O(N R) per step, no N x N matrix;
* zoh: Ab = exp(dt A) of a DPLR matrix is dense, so the step uses the dense (N, N) real matrix per feature
  (in real coordinates [Re x, Im x], so no conjugate half is computed and dropped).

State passing (free response, final state) uses the same real-coordinate dense system. The math is
``ssm.systems.dplr``; this module owns the parameters.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from .._checks import check_choice, check_int
from ..hippo import RANKS, nplr
from ..ops.cauchy import BACKENDS
from ..systems import dplr
from .base import as_complex, check_dt_range, init_log_dt
from .lti import LTILayer
from .s4d import check_pair_d_state, diagonal_init, lambda_from_params, pair_state, real_part_param

S4_INITS = ("legs", "legt", "lagt", "fout", "diag-lin", "diag-inv", "diag-legs", "diag-real")
DPLR_DISCS = ("bilinear", "zoh")


class S4(LTILayer):
    """DPLR SSM layer (S4).

    Args:
        d_model: H.
        d_state: N; N/2 complex modes are stored (conjugate pairs). Must be even.
        init: "legs" (HiPPO-LegS, default), "legt", "lagt", "fout" (NPLR of the HiPPO matrix), or a diagonal
            init "diag-lin", "diag-inv", "diag-legs", "diag-real" (with the low-rank term starting at zero).
        disc: "bilinear" (default; O(N) step) or "zoh" (dense step).
        rank: R, rank of the low-rank term; None means the measure's own rank (2 for legt, else 1). A larger
            rank pads P with zeros (trainable); a smaller one is refused.
        dt_min, dt_max: range of the log-uniform initialization of dt.
        backend: the Cauchy backend of the bilinear kernel (``ssm.ops.cauchy.BACKENDS``): "auto" (on the CPU
            the power-series kernel, no Cauchy products, for rank <= 1: ``dplr_kernel``'s method "series";
            Triton on CUDA when it is installed and works, else the torch path sized by memory), "naive",
            "chunked" or "triton" (the Cauchy method with that backend).
        c_tilde_length: None (default: ``C`` is the true C; the Cauchy method forms C~ = C (I - Ab^L), an
            O(H N^3 log L) float64 power, the series method needs none), or a length L0 (bilinear only):
            ``C`` holds C~ for L0 and is trained as such, as the official S4 does. Kernels of length
            L <= L0 are then the first L taps of the length-L0 kernel with no power (exact); a longer kernel,
            ``step`` and state passing recover C = C~ (I - Ab^L0)^{-1} by a float64 solve (once per
            parameter values in inference).
            A trade-off, not a free win: a checkpoint of one parametrization does not load into the other
            (docs/speed.md).
        Other keyword arguments: see ``LTILayer``.

    Shapes: forward x (B, L, H) -> (B, L, H); step x (B, H), state (B, H, N/2) complex.
    """

    family = dplr

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        init: str = "legs",
        disc: str = "bilinear",
        rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        backend: str = "auto",
        c_tilde_length: int | None = None,
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
        self.d_state = check_pair_d_state(d_state)
        self.init = check_choice("init", init, S4_INITS)
        self.disc = check_choice("disc", disc, DPLR_DISCS)
        self.backend = check_choice("backend", backend, BACKENDS)
        if rank is None:
            rank = RANKS.get(init, 1)
        self.rank = check_int("rank", rank, minimum=1)
        self.dt_min, self.dt_max = check_dt_range(dt_min, dt_max)
        if c_tilde_length is not None:
            c_tilde_length = check_int("c_tilde_length", c_tilde_length, minimum=1)
            if self.disc != "bilinear":
                raise ValueError(f"c_tilde_length needs disc='bilinear' (C~ belongs to the Cauchy kernel); "
                                 f"got disc={self.disc!r}")
        self.c_tilde_length = c_tilde_length
        self.build_ssm(device, dtype)

    def ssm_init(self, real_dtype: torch.dtype) -> dict:
        """The initial SSM parameters (name -> (value, complex, optimizer hint)), computed on the CPU."""
        H, N, N2, R = self.d_model, self.d_state, self.d_state // 2, self.rank
        cdtype = torch.complex128 if real_dtype == torch.float64 else torch.complex64
        if self.init.startswith("diag-"):
            Lambda, B = diagonal_init(self.init, N)
            P = torch.zeros(R, N2, dtype=torch.complex128)
        else:
            Lambda, P, B, _ = nplr(self.init, N, R, half=True)
        C_out = self.channels * (2 if self.bidirectional else 1)
        return {
            "log_neg_real": (real_part_param(Lambda.to(cdtype).expand(H, N2)), False, True),
            "Lambda_imag": (Lambda.imag.to(real_dtype).expand(H, N2).clone(), False, True),
            "P": (P.to(cdtype)[:, None, :].expand(R, H, N2).clone(), True, True),
            "B": (B.to(cdtype).expand(H, N2).clone(), True, True),
            "log_dt": (init_log_dt(H, self.dt_min, self.dt_max, dtype=real_dtype), False, True),
            "C": (torch.randn(C_out, H, N2, dtype=cdtype), True, False),
        }

    # ---- parameters -> system ----------------------------------------------------------------------------
    def discrete_system(self, rate: float = 1.0) -> dplr.DPLRSystem:
        """The discrete DPLR system ``ssm.systems.dplr.DPLRSystem`` at step dt * rate (differentiable):
        Lambda (H, N/2), P (R, H, N/2), B (H, N/2), C (C', H, N/2), dt (H,) in half storage, the Woodbury
        step constants and the real-coordinate dense form (Ab (H, N, N), Bb (H, N), C (C', H, N))."""
        rate = self._check_rate(rate)
        p = self.ssm_param
        Lambda = lambda_from_params(p("log_neg_real"), p("Lambda_imag"))  # (H, N/2)
        dt = torch.exp(p("log_dt")) * rate
        P, B, C = as_complex(p("P")), as_complex(p("B")), as_complex(p("C"))
        return dplr.discretize(Lambda, P, B, C, dt, self.disc, L_tilde=self.c_tilde_length or 0)

    def config(self) -> dict:
        out = super().config()
        if self.c_tilde_length is not None:
            out["c_tilde_length"] = self.c_tilde_length
        return out

    def _config_mismatch(self, state) -> str | None:
        """As the base, and a state_dict without ``c_tilde_length`` (its C is the true C) does not fit a layer
        whose C is C~."""
        problem = super()._config_mismatch(state)
        if problem is None and self.c_tilde_length is not None:
            raw = bytes(state.tolist()).decode() if isinstance(state, torch.Tensor) else None
            if "c_tilde_length" not in (json.loads(raw) if raw is not None else dict(state)):
                return (f"S4: the state_dict was saved from a layer whose C is the true C, but this layer "
                        f"has c_tilde_length={self.c_tilde_length} (its C holds C~)")
        return problem

    def kernel_options(self) -> dict:
        return {"backend": self.backend}

    def default_state(self, batch_size: int, *, device=None) -> Tensor:
        return pair_state(self, batch_size, device)
