"""S4D: the diagonal state-space layer (Gu et al., "On the Parameterization and Initialization of Diagonal
State Space Models", 2022).

A_h = diag(Lambda_h) with N/2 complex modes, each standing for a conjugate pair, so the kernel is
K = 2 Re(sum_n C_n Lambda_bar_n^k B_bar_n). Lambda is stored as log(-Re Lambda) and Im Lambda so the real
part stays negative. The math is ``ssm.systems.diag``; this module owns the parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_choice, check_int
from ..hippo import diag_init, nplr
from ..ops.cauchy import BACKENDS
from ..systems import diag
from .base import as_complex, check_dt_range, init_log_dt
from .lti import LTILayer

S4D_INITS = ("diag-lin", "diag-inv", "diag-legs", "diag-real", "lin", "inv", "legs", "real")
DIAG_DISCS = ("zoh", "bilinear")


def diagonal_init(init: str, N: int) -> tuple[Tensor, Tensor]:
    """(Lambda (N//2,), B (N//2,)) complex128 for an S4D init name (with or without the 'diag-' prefix)."""
    check_choice("init", init, S4D_INITS)
    name = init.removeprefix("diag-")
    if name == "legs":
        Lambda, _, B, _ = nplr("legs", N, 1, half=True)
        return Lambda, B
    return diag_init(name, N, half=True)


def real_part_param(Lambda: Tensor) -> Tensor:
    """log(-Re Lambda) with Re Lambda clamped to <= -1e-4 (as S4 does: a zero real part cannot be logged)."""
    return torch.log(-Lambda.real.clamp(max=-1e-4))


def lambda_from_params(log_neg_real: Tensor, Lambda_imag: Tensor) -> Tensor:
    """Lambda = -exp(log_neg_real) + i Lambda_imag: the inverse of ``real_part_param`` (real part < 0)."""
    return torch.complex(-torch.exp(log_neg_real), Lambda_imag)


def check_pair_d_state(d_state: int) -> int:
    """d_state N of a conjugate-pair layer (S4, S4D): an even integer >= 2, N/2 modes stored."""
    N = check_int("d_state", d_state, minimum=2)
    if N % 2:
        raise ValueError(f"d_state must be even (N/2 conjugate pairs are stored); got {N}")
    return N


def pair_state(layer: LTILayer, batch_size: int, device=None) -> Tensor:
    """The zero state (B, H, N/2) of a conjugate-pair layer, complex64 (complex128 for a float64 layer)."""
    check_int("batch_size", batch_size, minimum=1)
    dtype = torch.complex128 if layer.log_dt.dtype == torch.float64 else torch.complex64
    return torch.zeros(batch_size, layer.d_model, layer.d_state // 2, dtype=dtype,
                       device=device if device is not None else layer.log_dt.device)


class S4D(LTILayer):
    """Diagonal SSM layer.

    Args:
        d_model: H.
        d_state: N; the layer keeps N/2 complex modes (conjugate pairs). Must be even.
        init: "diag-lin" (S4D-Lin), "diag-inv" (S4D-Inv), "diag-legs" (S4D-LegS), "diag-real" (S4D-Real).
        disc: "zoh" or "bilinear".
        backend: the Vandermonde backend (``ssm.ops.cauchy.BACKENDS``): "auto" (Triton on CUDA when it is
            installed and works, else the torch path sized by memory), "naive", "chunked" or "triton".
        dt_min, dt_max: range of the log-uniform initialization of dt.
        Other keyword arguments: see ``LTILayer``.

    Shapes: forward x (B, L, H) -> (B, L, H); step x (B, H), state (B, H, N/2) complex.
    """

    family = diag

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        init: str = "diag-lin",
        disc: str = "zoh",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        backend: str = "auto",
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
        self.init = check_choice("init", init, S4D_INITS)
        self.disc = check_choice("disc", disc, DIAG_DISCS)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.dt_min, self.dt_max = check_dt_range(dt_min, dt_max)
        self.build_ssm(device, dtype)

    def ssm_init(self, real_dtype: torch.dtype) -> dict:
        """The initial SSM parameters (name -> (value, complex, optimizer hint)), computed on the CPU."""
        H, N2 = self.d_model, self.d_state // 2
        cdtype = torch.complex128 if real_dtype == torch.float64 else torch.complex64
        Lambda, B = diagonal_init(self.init, self.d_state)
        Lambda = Lambda.to(cdtype).expand(H, N2)
        C_out = self.channels * (2 if self.bidirectional else 1)
        return {
            "log_neg_real": (real_part_param(Lambda), False, True),
            "Lambda_imag": (Lambda.imag.clone(), False, True),
            "B": (B.to(cdtype).expand(H, N2).clone(), True, True),
            "log_dt": (init_log_dt(H, self.dt_min, self.dt_max, dtype=real_dtype), False, True),
            # complex normal, E|C|^2 = 1; C follows the global optimizer settings
            "C": (torch.randn(C_out, H, N2, dtype=cdtype), True, False),
        }

    # ---- parameters -> system ----------------------------------------------------------------------------
    def discrete_system(self, rate: float = 1.0) -> diag.DiagSystem:
        """The discrete diagonal system ``ssm.systems.diag.DiagSystem`` at step dt * rate (differentiable):
        Lambda (H, N/2), B (H, N/2), C (C', H, N/2), dt (H,), Ab, Bb, log_Ab (H, N/2), in half storage."""
        rate = self._check_rate(rate)
        p = self.ssm_param
        Lambda = lambda_from_params(p("log_neg_real"), p("Lambda_imag"))  # (H, N/2)
        dt = torch.exp(p("log_dt")) * rate
        return diag.discretize(Lambda, as_complex(p("B")), as_complex(p("C")), dt, self.disc)

    def kernel_options(self) -> dict:
        return {"backend": self.backend}

    def default_state(self, batch_size: int, *, device=None) -> Tensor:
        return pair_state(self, batch_size, device)
