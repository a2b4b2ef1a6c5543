"""S4: the diagonal-plus-low-rank (DPLR) state-space layer (Gu et al., "Efficiently Modeling Long Sequences
with Structured State Spaces", ICLR 2022).

A_h = diag(Lambda_h) - sum_r P_r P_r^*, initialized from the NPLR form of a HiPPO matrix (``ssm.hippo.nplr``)
in conjugate-pair half storage: N/2 modes stand for the N-state system with the conjugates appended
(``dplr_kernel(..., conj_pairs=True)``). The recurrent step uses the structure:

* bilinear (default, as the official S4):
  x_k = (I - dt/2 A)^{-1} [(I + dt/2 A) x_{k-1} + dt B u_k], the inverse applied by the Woodbury identity
  (I - dt/2 A)^{-1} = D0^{-1} - D0^{-1} U (I_R + V^* D0^{-1} U)^{-1} V^* D0^{-1}, D0 = I - dt/2 Lambda,
  U = dt/2 P, V = P: O(N R) per step, no N x N matrix;
* zoh: Ab = exp(dt A) of a DPLR matrix is dense, so the step uses the dense (N, N) matrix per feature.

State passing through a chunk uses the dense discrete matrices of the expanded system (``ssm.ops.scan``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_choice, check_int
from ..discretize import discretize
from ..hippo import _RANKS, nplr
from ..systems.dplr import dplr_kernel
from ..ops.scan import final_state
from ..reference import conj_expand, dplr_to_dense
from .base import SSMLayer, as_complex, init_log_dt
from .s4d import check_pair_d_state, diagonal_init, lambda_from_params, pair_state, real_part_param

S4_INITS = ("legs", "legt", "lagt", "fout", "diag-lin", "diag-inv", "diag-legs", "diag-real")
DPLR_DISCS = ("bilinear", "zoh")


class S4(SSMLayer):
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
        Other keyword arguments: see ``SSMLayer``.

    Shapes: forward x (B, L, H) -> (B, L, H); step x (B, H), state (B, H, N/2) complex.
    """

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
        self.d_state = N = check_pair_d_state(d_state)
        self.init = check_choice("init", init, S4_INITS)
        self.disc = check_choice("disc", disc, DPLR_DISCS)
        if rank is None:
            rank = _RANKS.get(init, 1)
        self.rank = R = check_int("rank", rank, minimum=1)
        H, N2 = self.d_model, N // 2
        real_dtype = dtype or torch.get_default_dtype()
        cdtype = torch.complex128 if real_dtype == torch.float64 else torch.complex64
        if init.startswith("diag-"):
            Lambda, B = diagonal_init(init, N)
            P = torch.zeros(R, N2, dtype=torch.complex128)
        else:
            Lambda, P, B, _ = nplr(init, N, R, half=True)
        self.register_ssm("log_neg_real", real_part_param(Lambda.to(cdtype).expand(H, N2)).to(device))
        self.register_ssm("Lambda_imag", Lambda.imag.to(real_dtype).expand(H, N2).clone().to(device))
        self.register_ssm("P", P.to(cdtype)[:, None, :].expand(R, H, N2).clone().to(device), complex_=True)
        self.register_ssm("B", B.to(cdtype).expand(H, N2).clone().to(device), complex_=True)
        self.register_ssm("log_dt", init_log_dt(H, dt_min, dt_max, device=device, dtype=real_dtype))
        C_out = self.channels * (2 if self.bidirectional else 1)
        C = torch.randn(C_out, H, N2, dtype=cdtype, device=device)
        self.C = torch.nn.Parameter(torch.view_as_real(C).clone())

    # ---- parameters -> system --------------------------------------------------------------------------------
    def _system(self, rate: float):
        Lambda = lambda_from_params(self.log_neg_real, self.Lambda_imag)  # (H, N/2)
        P = as_complex(self.P)  # (R, H, N/2)
        return Lambda, P, as_complex(self.B), as_complex(self.C), torch.exp(self.log_dt) * rate

    def _kernel(self, L: int, rate: float) -> Tensor:
        Lambda, P, B, C, dt = self._system(rate)
        return dplr_kernel(Lambda, P, B, C, dt, L, disc=self.disc, conj_pairs=True)  # (C', H, L)

    def _dense(self, rate: float):
        """Dense discrete matrices of the expanded N-state system: Ab (H, N, N), Bb (H, N), C (C, H, N)."""

        def compute():
            Lambda, P, B, C, dt = self._system(rate)
            Lf, Pf, Bf, Cf = conj_expand(Lambda, P, B, C[: self.channels])
            Ab, Bb = discretize(dplr_to_dense(Lf, Pf), Bf, dt, self.disc)  # in complex128 (reference precision)
            return Ab.to(B.dtype), Bb.to(B.dtype), Cf.to(B.dtype), dt

        return self.memo("dense", (rate,), compute)

    # ---- recurrent path -----------------------------------------------------------------------------------
    def default_state(self, batch_size: int, *, device=None) -> Tensor:
        return pair_state(self, batch_size, device)

    @staticmethod
    def _pair_inner(a: Tensor, x: Tensor) -> Tensor:
        """a_full^* x_full for conjugate-symmetric vectors in half storage: 2 Re(sum_n conj(a_n) x_n)."""
        return 2 * torch.einsum("...n,...n->...", a.conj(), x).real

    def _bilinear_consts(self, rate: float):
        """Per-feature constants of the bilinear step: D0 = 1 - dt/2 Lambda, P / D0 and (I_R + V^* D0^-1 U)^-1."""

        def compute():
            Lambda, P, B, C, dt = self._system(rate)
            dt = dt[:, None]  # (H, 1)
            D0 = 1 - dt / 2 * Lambda  # (H, N/2)
            PD = P / D0  # (R, H, N/2)
            eye = torch.eye(self.rank, dtype=dt.dtype, device=dt.device)
            G = eye + dt[:, :, None] / 2 * self._pair_inner(P[:, None], PD[None]).permute(2, 0, 1)  # (H, R, R)
            return Lambda, P, B, C, dt, D0, PD, torch.linalg.inv(G)

        return self.memo("bilinear", (rate,), compute)

    def _bilinear_step(self, u: Tensor, x: Tensor, rate: float) -> Tensor:
        Lambda, P, B, _, dt, D0, PD, Ginv = self._bilinear_consts(rate)
        # v = (I + dt/2 A) x + dt B u, with A x = Lambda x - sum_r P_r (P_r^* x)
        s = self._pair_inner(P[:, None], x[None])  # (R, B, H)
        Ax = Lambda * x - torch.einsum("rhn,rbh->bhn", P, s.to(P.dtype))
        v = x + dt / 2 * Ax + dt * B * u[..., None].to(B.dtype)
        # (I - dt/2 A)^{-1} v by Woodbury: D0^-1 v - D0^-1 U G^-1 V^* D0^-1 v with U = dt/2 P, V = P
        w = v / D0
        coef = torch.einsum("hrs,sbh->hrb", Ginv, self._pair_inner(P[:, None], w[None]))  # (H, R, B)
        return w - dt / 2 * torch.einsum("rhn,hrb->bhn", PD, coef.to(PD.dtype))

    def _step(self, u: Tensor, state: Tensor, rate: float):
        if self.disc == "bilinear":
            x = self._bilinear_step(u, state, rate)
            C = as_complex(self.C)
            return 2 * torch.einsum("chn,bhn->bch", C, x).real, x
        Ab, Bb, Cf, _ = self._dense(rate)
        N2 = self.d_state // 2
        xf = torch.cat([state, state.conj()], dim=-1)  # (B, H, N)
        xf = torch.einsum("hmn,bhn->bhm", Ab, xf) + Bb * u[..., None].to(Bb.dtype)
        return torch.einsum("chn,bhn->bch", Cf, xf).real, xf[..., :N2]

    def _zero_input_response(self, state: Tensor, L: int, rate: float) -> Tensor:
        # y_k = Re(C Ab^k v) with v = Ab x_{-1}: the DPLR kernel with a B whose discretization is v.
        Lambda, P, B, C, dt = self._system(rate)
        Bsz, H, N2 = state.shape
        x = state.to(B.dtype)
        if self.disc == "bilinear":
            # Bb = dt (I - dt/2 A)^{-1} B and (I - dt/2 A) Ab = I + dt/2 A, so B = (I + dt/2 A) x / dt.
            s = self._pair_inner(P[:, None], x[None])
            Ax = Lambda * x - torch.einsum("rhn,rbh->bhn", P, s.to(P.dtype))
            B_equiv = (x + dt[:, None] / 2 * Ax) / dt[:, None]
        else:
            # Bb = Phi B with Phi = int_0^dt exp(sA) ds, read off the augmented exponential of [[A, I], [0, 0]].
            Ab, _, _, _ = self._dense(rate)
            Lf, Pf = conj_expand(Lambda, P)[:2]
            A = dplr_to_dense(Lf, Pf).to(B.dtype)  # (H, N, N)
            N = A.shape[-1]
            M = torch.zeros(H, 2 * N, 2 * N, dtype=A.dtype, device=A.device)
            M[:, :N, :N] = A
            M[:, :N, N:] = torch.eye(N, dtype=A.dtype, device=A.device)
            Phi = torch.linalg.matrix_exp(M * dt[:, None, None].to(A.dtype))[:, :N, N:]
            xf = torch.cat([x, x.conj()], dim=-1)
            v = torch.einsum("hmn,bhn->bhm", Ab, xf)
            B_equiv = torch.linalg.solve(Phi[:, None], v.transpose(0, 1).unsqueeze(-1))  # (H, B, N, 1)
            B_equiv = B_equiv.squeeze(-1).transpose(0, 1)[..., :N2]
        def per_batch(t: Tensor) -> Tensor:  # (..., H, *) -> (..., B*H, *): one "feature" per (batch, h)
            lead = t.ndim - 2 if t.ndim >= 2 else 0
            t = t.unsqueeze(lead).expand(*t.shape[:lead], Bsz, *t.shape[lead:])
            return t.reshape(*t.shape[:lead], Bsz * H, *t.shape[lead + 2:])

        K = dplr_kernel(per_batch(Lambda), per_batch(P), B_equiv.reshape(Bsz * H, N2),
                        per_batch(C[: self.channels]), dt.repeat(Bsz), L, disc=self.disc, conj_pairs=True)
        return K.reshape(self.channels, Bsz, H, L).transpose(0, 1)

    def _chunk_state(self, u: Tensor, state, rate: float) -> Tensor:
        Ab, Bb, _, _ = self._dense(rate)
        N2 = self.d_state // 2
        xf = None if state is None else torch.cat([state, state.conj()], dim=-1)
        return final_state(Ab, Bb, u, xf)[..., :N2]
