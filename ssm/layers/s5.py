"""S5: one MIMO diagonal state-space system shared by all features (Smith, Warrington, Linderman,
"Simplified State Space Layers for Sequence Modeling", ICLR 2023).

Where S4 and S4D run H independent single-input single-output systems, S5 runs one P-state system with
H inputs and H outputs: x_k = Ab x_{k-1} + Bb u_k, y_k = Re(C x_k) + D u_k, with A = diag(Lambda) and one
timescale dt per state. The math is ``ssm.systems.s5`` (a chunked parallel scan); this module owns the
parameters and the initialization of the paper's Section 4.3 / Appendix B.1:

* Lambda: the eigenvalues of the normal part of HiPPO-LegS ("HiPPO-N", A_LegS + P P^T = -I/2 + skew, from
  ``ssm.hippo.nplr``), of size P/J, repeated for J blocks (a block-diagonal A);
* B = V^{-1} B_0 and C = C_0 V with V the block-diagonal eigenvectors (unitary, so V^{-1} = V^*), B_0 (P, H)
  real LeCun normal (std 1/sqrt(H)), C_0 (H, P) complex with truncated standard normal real and imaginary
  parts (the paper's default ``trunc_standard_normal``);
* conjugate symmetry (``conj_sym``): one eigenvalue of each pair is stored (P/2 states) and the output is
  2 Re(C x);
* log dt per state, uniform in [log dt_min, log dt_max].

Lambda is stored as log(-Re Lambda) and Im Lambda (as S4D does), so the real part stays negative; the
paper stores Re Lambda itself with an optional clip.

The base class's forward is a depthwise FFT convolution with a (C, H, L) kernel; a MIMO system has none,
so this layer overrides ``forward`` with the scan (its ``step`` is the base's, through ``s5.step``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_bool, check_choice, check_int, real_route
from ..hippo import nplr
from ..systems import s5
from .base import as_complex, check_dt_range, init_log_dt
from .lti import LTILayer
from .s4d import lambda_from_params, real_part_param


def s5_init(
    P: int, H: int, blocks: int, conj_sym: bool, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(Lambda (Q,), B (Q, H), C (H, Q)) complex128 of the S5 initialization; Q = P/2 with ``conj_sym``.

    Each of the J = ``blocks`` diagonal blocks is the eigendecomposition V_j diag(Lambda_j) V_j^* of the
    normal part of HiPPO-LegS of size P/J (``ssm.hippo.nplr("legs", P/J)``, half of each conjugate pair
    with ``conj_sym``); B = V^* B_0, C = C_0 V with the block-diagonal V.
    """
    size = P // blocks
    Lambda_j, _, _, V_j = nplr("legs", size, 1, half=conj_sym)  # (M,), (size, M)
    B0 = torch.randn(P, H, dtype=torch.float64, generator=generator) / H**0.5  # LeCun normal
    re, im = (torch.nn.init.trunc_normal_(torch.empty(H, P, dtype=torch.float64), a=-2.0, b=2.0,
                                          generator=generator) for _ in range(2))
    C0 = torch.complex(re, im)
    Bs, Cs = [], []
    for j in range(blocks):
        rows = slice(j * size, (j + 1) * size)
        Bs.append(V_j.conj().T @ B0[rows].to(torch.complex128))
        Cs.append(C0[:, rows] @ V_j)
    return Lambda_j.repeat(blocks), torch.cat(Bs, 0), torch.cat(Cs, 1)


class S5(LTILayer):
    """S5 layer: one MIMO diagonal SSM shared by all features, run by a parallel scan.

    Args:
        d_model: H.
        d_state: P, the latent size of the shared system; P/2 complex states are stored with ``conj_sym``.
        blocks: J, the number of blocks of the initialization (P must be divisible by J, and P/J even with
            ``conj_sym``).
        disc: "zoh" or "bilinear".
        dt_min, dt_max: range of the log-uniform initialization of dt (one per state).
        conj_sym: store one state per conjugate pair, output 2 Re(C x).
        bidirectional: a second scan backward in time, read by its own C (the paper's bidirectional S5).
        Other keyword arguments: see ``LTILayer`` (``channels`` is 1: the output projection mixes H
            features).

    Shapes: forward x (B, L, H) -> (B, L, H); step x (B, H), state (B, Q) complex, Q = P/2 or P.
    """

    packs_bidirectional = False  # the backward scan runs over the whole row: documents run one by one


    family = s5

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        blocks: int = 1,
        disc: str = "zoh",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        conj_sym: bool = True,
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
        super().__init__(d_model, channels=1, bidirectional=bidirectional, transposed=transposed,
                         activation=activation, glu=glu, dropout=dropout, ssm_lr=ssm_lr,
                         ssm_weight_decay=ssm_weight_decay, device=device, dtype=dtype)
        self.d_state = P = check_int("d_state", d_state, minimum=1)
        self.blocks = J = check_int("blocks", blocks, minimum=1)
        self.conj_sym = check_bool("conj_sym", conj_sym)
        if P % J:
            raise ValueError(f"blocks must divide d_state (J blocks of size P/J); got d_state={P}, "
                             f"blocks={J}")
        if conj_sym and (P // J) % 2:
            raise ValueError(f"d_state / blocks must be even with conj_sym=True (conjugate pairs within each "
                             f"block); got d_state={P}, blocks={J}")
        self.disc = check_choice("disc", disc, s5.S5_DISCS)
        self.dt_min, self.dt_max = check_dt_range(dt_min, dt_max)
        self.build_ssm(device, dtype)

    def ssm_init(self, real_dtype: torch.dtype) -> dict:
        """The initial SSM parameters (name -> (value, complex, optimizer hint)), computed on the CPU:
        ``s5_init`` (a second C for the backward scan when bidirectional) and log dt per state."""
        cdtype = torch.complex128 if real_dtype == torch.float64 else torch.complex64
        Lambda, B, C = s5_init(self.d_state, self.d_model, self.blocks, self.conj_sym)
        Q = Lambda.shape[0]
        log_dt = init_log_dt(Q, self.dt_min, self.dt_max, dtype=real_dtype)
        Cs = [C]
        if self.bidirectional:
            Cs.append(s5_init(self.d_state, self.d_model, self.blocks, self.conj_sym)[2])
        return {
            "log_neg_real": (real_part_param(Lambda).to(real_dtype), False, True),
            "Lambda_imag": (Lambda.imag.to(real_dtype), False, True),
            "B": (B.to(cdtype), True, True),
            "log_dt": (log_dt, False, True),
            # C follows the global optimizer settings, as in S4
            "C": (torch.stack(Cs).to(cdtype), True, False),
        }

    def config(self) -> dict:
        """``LTILayer.config`` plus ``conj_sym`` (it changes the output, 2 Re or Re, not only shapes)."""
        return {**super().config(), "conj_sym": self.conj_sym}

    # ---- parameters -> system ----------------------------------------------------------------------------
    def discrete_system(self, rate: float = 1.0) -> s5.S5System:
        """The discrete system ``ssm.systems.s5.S5System`` at steps dt * rate (differentiable): Lambda (Q,),
        B (Q, H), C (C', H, Q) (C' = 2 when bidirectional), dt (Q,), Ab (Q,), Bb (Q, H)."""
        rate = self._check_rate(rate)
        p = self.ssm_param
        Lambda = lambda_from_params(p("log_neg_real"), p("Lambda_imag"))
        dt = torch.exp(p("log_dt")) * rate
        return s5.discretize(Lambda, as_complex(p("B")), as_complex(p("C")), dt, self.disc,
                             conj_sym=self.conj_sym)

    def default_state(self, batch_size: int, *, device=None) -> Tensor:
        """The zero state (B, Q) complex64 (complex128 for a float64 layer)."""
        check_int("batch_size", batch_size, minimum=1)
        dtype = torch.complex128 if self.log_dt.dtype == torch.float64 else torch.complex64
        return torch.zeros(batch_size, self.log_dt.shape[0], dtype=dtype,
                           device=device if device is not None else self.log_dt.device)

    def kernel(self, L: int, rate: float = 1.0) -> Tensor:
        """The transfer matrix (C', H, H, L) of ``ssm.systems.s5.kernel`` (tests and conversions: the layer
        never convolves with it). Cached in eval mode like the other layers' kernels."""
        return super().kernel(L, rate)

    # ---- the scan path ------------------------------------------------------------------------------------
    def _scan_documents(self, system, v: Tensor, state: Tensor | None, seq: Tensor) -> Tensor:
        """The scan of packed documents v (B, L, H), each from the zero state (``state`` for each row's
        first document), batched by similar lengths (``_each_document``) -> (B, L, H)."""
        lens, starts, first = self._documents(seq)
        rows, first = (starts // v.shape[1]).tolist(), first.tolist()

        def run(batch: Tensor, group: list[int]) -> Tensor:
            x0 = None
            if state is not None:
                zero = torch.zeros_like(state[0])
                x0 = torch.stack([state[rows[i]] if first[i] else zero for i in group])
            return s5.scan(system, batch, x0)[0]

        return self._each_document(v, lens, run, coarse=True)  # a scan call costs more than its padding

    def forward(
        self,
        x: Tensor,
        state: Tensor | None = None,
        *,
        return_state: bool = False,
        lengths: Tensor | None = None,
        rate: float | Tensor = 1.0,
        seq_idx: Tensor | None = None,
        return_states_at: Tensor | None = None,
    ):
        """Scan path; the arguments and results are those of ``LTILayer.forward``.

        y = post(scan(u) + D u) with ``ssm.systems.s5.scan`` from ``state`` (the state after the chunk comes
        from the same scan with ``return_state``); bidirectional adds a scan backward in time read by C[1].
        With ``seq_idx`` each document is scanned on its own (batched by similar lengths).
        """
        if real_route():
            return self._real_forward(x, state, return_state, lengths, rate, seq_idx, return_states_at)
        if isinstance(rate, Tensor):
            return self._rows_by_rate(self.forward, x, state, rate, lengths, seq_idx, return_state,
                                      return_states_at)
        done, u, rate, seq, order, index = self._open(x, state, return_state, lengths, rate, seq_idx,
                                                      return_states_at)
        if done is not None:
            return done
        if u.dtype in (torch.float16, torch.bfloat16):
            u = u.float()
        system = self._system(rate)
        L = u.shape[-1]
        with torch.autocast(device_type=u.device.type, enabled=False):
            v = u.transpose(1, 2).to(system.Bb.real.dtype)  # (B, L, H)
            if seq is None:
                y, next_state = s5.scan(system, v, state)
            else:
                y, next_state = self._scan_documents(system, v, state, seq), None
            if self.bidirectional:
                y = y + s5.scan(system, v, channel=1, reverse=True)[0]
            found = {}
            if seq is not None or order is not None:
                ends = ([L] if return_state else []) + ([] if order is None else [p + 1 for p in order])
                found = self._chain(system, u, state, ends, seq) if ends else {}
                next_state = found.get(L, next_state)
            y = y + self.D[0].to(y.dtype) * v  # (B, L, H)
        y = self.output(y, x)  # (B, L, H)
        states = None if order is None else self._gather_states(found, order, index)
        return self._result(y, next_state if return_state else None, states, return_state, order)

    # ---- the real route (ONNX export; docs/deployment.md): the step repeated by one loop operator ------
    reverse_lag = 0  # the reverse scan reads u_t at lag 0 (its D skip is added once)

    def prepare_real(self, rate: float = 1.0) -> s5.S5RealStep:
        """``ssm.systems.s5.prepare_real_step`` of ``discrete_system(rate)`` (real tensors only)."""
        with torch.autocast(device_type=self.D.device.type, enabled=False):
            return s5.prepare_real_step(self.discrete_system(rate))

    def _real_forward(self, x, state, return_state, lengths, rate, seq_idx, positions) -> Tensor:
        u, rate = self._real_input(x, state, return_state, lengths, rate, seq_idx, positions)
        y = self._real_ssm(u, rate)[:, 0].transpose(1, 2)  # (B, L, H)
        y = y + self.D[0].to(y.dtype) * u.transpose(1, 2).to(y.dtype)
        return self.output(y, x)

