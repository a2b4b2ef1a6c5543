"""The diagonal family (S4D): A = diag(Lambda), one complex mode per conjugate pair or in full.

Pure functions of the structured parameters; ``ssm.layers.S4D`` owns the parameters and calls these.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_choice, check_shape, check_tensor
from ..discretize import discretize_diag, phi1
from ..ops.scan import final_state as scan_final_state
from ..ops.scan import states_at as scan_states_at
from ..ops.vandermonde import vandermonde
from .common import check_kernel_args, complex_dtype

#: The family's tier (``ssm.systems``): linear time-invariant, so it adds kernel and free_response.
TIER = "lti"


def bilinear_log(x: Tensor) -> Tensor:
    """log Ab of the bilinear map Ab = (1 + x/2) / (1 - x/2), x = dt Lambda.

    ``log(1 + x/2) - log(1 - x/2)`` cancels at small dt (|x| ~ 1e-6 keeps about one float32 digit): there,
    |x/2| < 1/2, it is 2 atanh(x/2), accurate to rounding. Ab vanishes at x = -2 (K_k = 0 for k >= 1,
    continuously in x): the numerator is floored at the smallest normal number, so log Ab and its gradient
    stay finite.
    """
    w = x / 2
    small = w.abs() < 0.5
    num = 1 + w
    tiny = torch.finfo(x.real.dtype).tiny
    num = torch.where(num.abs() < tiny, torch.full_like(num, tiny), num)
    near = 2 * torch.atanh(torch.where(small, w, torch.zeros_like(w)))  # no inf in the branch not taken
    return torch.where(small, near, torch.log(num) - torch.log(1 - w))


def diag_kernel(
    Lambda: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    dt: torch.Tensor,
    L: int,
    disc: str = "zoh",
    *,
    conj_pairs: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Convolution kernel of a diagonal SSM: the S4D kernel.

    With A_h = diag(Lambda_h) discretized elementwise (``ssm.discretize.discretize_diag``),

        K[h, k] = Re(sum_n C[h, n] Bb[h, n] Ab[h, n]^k),        k = 0, ..., L - 1,

    one Vandermonde product (``ssm.ops.vandermonde``) in log space: log Ab = dt Lambda for ``"zoh"`` (with
    Bb = dt phi1(dt Lambda) B, phi1(x) = (e^x - 1) / x) and log((1 + dt Lambda / 2) / (1 - dt Lambda / 2))
    for ``"bilinear"`` (Bb = dt B / (1 - dt Lambda / 2)). Cost O(H N L), memory per ``backend``.

    With ``conj_pairs=True`` the N states stand for 2N (conjugates appended); as the modes are decoupled
    the kernel is K = 2 Re(sum over the given half).

    Args:
        Lambda: (H, N) complex diagonal of A (real is promoted).
        B: (H, N).
        C: (H, N) or (Ch, H, N).
        dt: (H,) positive real.
        L: kernel length >= 1.
        disc: ``"zoh"`` or ``"bilinear"``.
        conj_pairs: the inputs hold one state per conjugate pair.
        backend: Vandermonde backend: ``"auto"``, ``"naive"``, ``"chunked"`` or ``"triton"``.

    Returns:
        K: (H, L) or (Ch, H, L), real (float32 for complex64 inputs, float64 for complex128).
        Differentiable in Lambda, B, C and dt.
    """
    H, N, L = check_kernel_args(Lambda, B, C, dt, L, disc, backend)
    if not isinstance(conj_pairs, bool):
        raise ValueError(f"conj_pairs must be a bool; got {conj_pairs!r}")
    cdtype = complex_dtype(Lambda, B, C, dt)
    Lambda, B, C = Lambda.to(cdtype), B.to(cdtype), C.to(cdtype)
    dtc = dt.to(cdtype).unsqueeze(-1)  # (H, 1)
    x = dtc * Lambda  # (H, N)
    if disc == "zoh":
        Bb, log_Ab = dtc * B * phi1(x), x
    else:
        Bb, log_Ab = dtc * B / (1 - x / 2), bilinear_log(x)
    K = vandermonde(C * Bb, log_Ab, L, log=True, backend=backend).real  # (..., H, L)
    return 2 * K if conj_pairs else K


# ---- the family verbs on the layer's storage: one complex mode per conjugate pair ----


class DiagSystem(NamedTuple):
    """A discrete diagonal system in conjugate-pair half storage (what ``ssm.S4D.discrete_system`` returns).

    The real N-state system is the half with its conjugates appended, so every output is 2 Re of the
    half-storage sum.

    Fields:
        Lambda: (H, N/2) complex continuous eigenvalues, B: (H, N/2), C: (Ch, H, N/2), dt: (H,),
            disc: ``"zoh"`` or ``"bilinear"``.
        Ab: (H, N/2) discrete eigenvalues, Bb: (H, N/2) discrete input vector.
        log_Ab: (H, N/2) log Ab (dt Lambda for zoh), the nodes of the log-Vandermonde products; its real
            part is floored at log of the smallest normal number, so Ab = 0 (bilinear at dt Lambda = -2) is
            finite.
    """

    Lambda: Tensor
    B: Tensor
    C: Tensor
    dt: Tensor
    disc: str
    Ab: Tensor
    Bb: Tensor
    log_Ab: Tensor


def discretize(Lambda: Tensor, B: Tensor, C: Tensor, dt: Tensor, disc: str = "zoh") -> DiagSystem:
    """Elementwise zoh / bilinear discretization (``ssm.discretize.discretize_diag``) of the half storage:
    Lambda, B (H, N/2), C (Ch, H, N/2), dt (H,)."""
    check_choice("disc", disc, ("zoh", "bilinear"))
    check_tensor("Lambda", Lambda, ndim=2)
    H, N2 = Lambda.shape
    check_tensor("C", C, ndim=3)
    check_shape("C", C, (None, H, N2), "(Ch, H, N/2) like Lambda")
    Ab, Bb = discretize_diag(Lambda, B, dt, disc)
    x = dt[:, None].to(Lambda.dtype) * Lambda
    if disc == "zoh":
        log_Ab = x
    else:
        log_Ab = bilinear_log(x)
    return DiagSystem(Lambda, B, C, dt, disc, Ab, Bb, log_Ab)


def kernel(sys: DiagSystem, L: int, *, backend: str = "auto") -> Tensor:
    """The convolution kernel (Ch, H, L) = ``diag_kernel`` of the half storage (one Vandermonde product)."""
    return diag_kernel(sys.Lambda, sys.B, sys.C, sys.dt, L, sys.disc, conj_pairs=True, backend=backend)


def step(sys: DiagSystem, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """x_k = Ab x_{k-1} + Bb u_k elementwise, y_k = 2 Re(C x_k).

    x (B, H, N/2), u (B, H) -> (y (B, Ch, H), x_k (B, H, N/2)).
    """
    x = sys.Ab * x.to(sys.Ab.dtype) + sys.Bb * u[..., None].to(sys.Bb.dtype)
    return 2 * torch.einsum("chn,bhn->bch", sys.C, x).real, x


class PairStep(NamedTuple):
    """The step constants of a conjugate-pair system (``prepare_step``), in the real views the step reads:

        c_r = W_r . xr + h_r u,    xr_k = view_as_real(E x_{k-1}) + Q_0 u + sum_r Q_(1+r) c_r,
        y_k = Cr . xr_k,

    xr = [Re x_1, Im x_1, ...] (``torch.view_as_real`` of the half-storage state, (B, H, N)).

    Fields:
        E: (H, N/2) complex, the diagonal update.
        W: (R, H, N) real rows of the low-rank coefficients c (R = 0: none, the diagonal family).
        h: (R, H) real, the input's share of c.
        Q: (1+R, H, N) real: what u and each c_r add to xr.
        Cr: (Ch, H, N) real, y = 2 Re(C x) = Cr . xr.
        Crh: the same rows laid out per feature, (H, Ch, N), for one batched product with the state.
    """

    E: Tensor
    W: Tensor
    h: Tensor
    Q: Tensor
    Cr: Tensor
    Crh: Tensor


def output_rows(C: Tensor) -> tuple[Tensor, Tensor]:
    """``PairStep``'s (Cr (Ch, H, N), Crh (H, Ch, N)) of C (Ch, H, N/2)."""
    Cr = real_rows(C)
    return Cr, Cr.transpose(0, 1).contiguous()


def real_rows(v: Tensor) -> Tensor:
    """Complex rows v (..., n) -> real rows r (..., 2n) with r . view_as_real(x) = 2 Re(sum_n v_n x_n)."""
    return torch.view_as_real((2 * v).conj().resolve_conj()).flatten(-2)


def pair_step(c: PairStep, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """One step from the constants of ``PairStep``: x (B, H, N/2) complex, u (B, H) ->
    (y (B, Ch, H) real, x_k (B, H, N/2)). Elementwise products and sums over the state only: at small
    batches a batched matrix product per feature (einsum) costs more than the arithmetic."""
    Bsz, H, n = x.shape
    x = x if x.dtype == c.E.dtype else x.to(c.E.dtype)
    u = (u if u.dtype == c.Q.dtype else u.to(c.Q.dtype))[..., None]  # (B, H, 1)
    out = torch.addcmul(torch.view_as_real(c.E * x).view(Bsz, H, 2 * n), u, c.Q[0])  # (B, H, N)
    if c.W.shape[0]:
        xr = torch.view_as_real(x).reshape(Bsz, H, 2 * n)
        for r in range(c.W.shape[0]):
            coef = torch.addcmul((xr * c.W[r]).sum(-1, keepdim=True), u, c.h[r, :, None])  # (B, H, 1)
            out = torch.addcmul(out, coef, c.Q[1 + r])
    if Bsz > 1:  # one batched product per feature, (Ch, N) x (N, B): at B = 16 0.6x a multiply and sum
        y = torch.bmm(c.Crh, out.permute(1, 2, 0)).permute(2, 1, 0)  # (B, Ch, H)
    else:  # (at B = 1 the product costs more than the multiply and sum)
        y = (out[:, None] * c.Cr).sum(-1)  # (B, Ch, H)
    return y, torch.view_as_complex(out.view(Bsz, H, n, 2))


def prepare_step(sys: DiagSystem) -> PairStep:
    """The constants of ``step`` (computed once per system; ``ssm.layers.LTILayer`` caches them)."""
    H, n = sys.Ab.shape
    real = sys.Ab.real.dtype
    return PairStep(sys.Ab, sys.Ab.new_zeros((0, H, 2 * n), dtype=real), sys.Ab.new_zeros((0, H), dtype=real),
                    torch.view_as_real(sys.Bb.resolve_conj()).reshape(1, H, 2 * n), *output_rows(sys.C))


def step_prepared(c: PairStep, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """``step(sys, x, u)`` from ``prepare_step(sys)``: the same update in real arithmetic."""
    return pair_step(c, x, u)


# ---- the real route (ONNX export: no complex type; docs/deployment.md) ----


def prepare_real_step(c: PairStep) -> PairStep:
    """``prepare_step``'s constants with E as real planes (H, N/2, 2) = [Re E, Im E]: all real."""
    return c._replace(E=torch.view_as_real(c.E.resolve_conj()).clone())


def real_step(c: PairStep, xr: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """``pair_step`` in real arithmetic only, on the state's planes xr = view_as_real(x) (B, H, N) flattened
    [Re x_1, Im x_1, ...], from ``prepare_real_step``: (y (B, Ch, H), next xr). E x on planes:
    (Er Re x - Ei Im x, Er Im x + Ei Re x)."""
    Bsz, H, N = xr.shape
    xr = xr.to(c.Q.dtype)
    x = xr.view(Bsz, H, N // 2, 2)
    Er, Ei = c.E[..., 0], c.E[..., 1]
    Ex = torch.stack([Er * x[..., 0] - Ei * x[..., 1], Er * x[..., 1] + Ei * x[..., 0]], dim=-1)
    u = u.to(c.Q.dtype)[..., None]  # (B, H, 1)
    out = torch.addcmul(Ex.reshape(Bsz, H, N), u, c.Q[0])
    for r in range(c.W.shape[0]):
        coef = torch.addcmul((xr * c.W[r]).sum(-1, keepdim=True), u, c.h[r, :, None])  # (B, H, 1)
        out = torch.addcmul(out, coef, c.Q[1 + r])
    return (out[:, None] * c.Cr).sum(-1), out


def to_real_state(c: PairStep, x: Tensor) -> Tensor:
    """The half-storage state x (B, H, N/2) complex -> the planes of ``real_step`` (B, H, N)."""
    return torch.view_as_real(x.to(torch.complex128 if c.Q.dtype == torch.float64 else torch.complex64)
                              ).flatten(-2)


def from_real_state(c: PairStep, xr: Tensor) -> Tensor:
    """Inverse of ``to_real_state``."""
    return torch.view_as_complex(xr.unflatten(-1, (-1, 2)).contiguous())


def free_response(sys: DiagSystem, x0: Tensor, L: int, *, backend: str = "auto") -> Tensor:
    """Zero-input response y_k = 2 Re(sum_n C_n Ab_n^{k+1} x0_n): x0 (B, H, N/2) -> (B, Ch, H, L), one
    Vandermonde product whose nodes (and powers) are shared by the batch."""
    v = sys.C[:, None] * (sys.Ab * x0.to(sys.C.dtype))  # (Ch, B, H, N/2)
    return 2 * vandermonde(v, sys.log_Ab, L, log=True, backend=backend).real.transpose(0, 1)


def final_state(sys: DiagSystem, u: Tensor, x0: Tensor | None = None) -> Tensor:
    """State (B, H, N/2) after the chunk u (B, H, L) from x0 (None: zeros), by blocked Krylov products."""
    return scan_final_state(sys.Ab, sys.Bb, u, x0)


def states_at(sys: DiagSystem, u: Tensor, ends: list[int], x0: Tensor | None = None) -> dict[int, Tensor]:
    """{e: the state (B, H, N/2) after u[..., :e]} for several prefixes of u (B, H, L) at once (one Krylov
    basis; ``ssm.ops.scan.states_at``)."""
    return scan_states_at(sys.Ab, sys.Bb, u, ends, x0)


def transfer_function(sys: DiagSystem) -> tuple[Tensor, Tensor]:
    """Transfer-function coefficients of the real N-state system (``ssm.transfer.ssm_to_rtf``), float64:
    b (Ch, H, N+1) (b_0 = C Bb included) and a (H, N), shared by the channels."""
    from ..transfer import ssm_to_rtf  # deferred: ssm.transfer imports the RTF family of this package

    wide = torch.complex128
    b, a = ssm_to_rtf(sys.Ab.to(wide), sys.Bb.to(wide), sys.C.to(wide), conj_pairs=True, real=True)
    return b.double(), a[0].double()
