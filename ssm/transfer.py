"""Rational transfer functions (RTF) and state-space models: exact conversions, companion recurrence.

A discrete SSM in the library convention (x_k = A x_{k-1} + B u_k, y_k = C x_k + D u_k) has the
impulse response K_0 = C B + D, K_k = C A^k B, whose generating function (w = z^-1)

    H(w) = sum_k K_k w^k = D + C (I - w A)^-1 B = b(w) / a(w),
    a(w) = det(I - w A) = prod_n (1 - lambda_n w) = 1 + a_1 w + ... + a_N w^N,
    b(w) = b_0 + b_1 w + ... + b_N w^N,

is rational of degree N (Parnichkun et al., "State-Free Inference of State-Space Models: The Transfer
Function Approach", ICML 2024). The 2N + 1 coefficients (b, a) are invariant under a change of state
basis, so dense, diagonal and DPLR systems with the same dynamics map to the same RTF, and the kernel is
computed without any state by :func:`ssm.kernels.rtf_kernel`.

Recurrent form (direct form II, O(N) per step): with w_k = u_k - a_1 w_(k-1) - ... - a_N w_(k-N),

    y_k = b_0 w_k + b_1 w_(k-1) + ... + b_N w_(k-N),

and the state is the last N values (w_(k-1), ..., w_(k-N)), most recent first: :func:`rtf_step`,
:func:`rtf_filter` (a whole chunk by FFTs) and :func:`rtf_to_ssm` (the same recurrence as an SSM).

Shapes: coefficients b (H, N+1), a (H, N) for the kernel and the recurrence; the conversions accept any
leading batch shape (...). Sequences are (B, H, L) (the internal layout).
"""

from __future__ import annotations

import copy

import torch

from ._checks import check_int, check_tensor
from .systems import rtf as rtf_family
from .systems.rtf import STABLE_METHODS, rtf_filter, rtf_init, rtf_kernel, rtf_step, stable_denominator

__all__ = [
    "STABLE_METHODS",
    "rtf_filter",
    "rtf_init",
    "rtf_step",
    "rtf_to_ssm",
    "ssm_to_rtf",
    "ssm_to_rtf_dplr",
    "stable_denominator",
    "to_rtf",
]

# ssm_to_rtf(real=None) returns real coefficients when max |Im| <= _REAL_RTOL * max |.| (computed in
# complex128): conjugate-symmetric systems give imaginary parts at rounding level, others O(1).
_REAL_RTOL = 1e-9


# ---------------------------------------------------------------------------------------------------------
# polynomial helpers (coefficients in increasing powers of w = z^-1, last dim)


def _poly_from_roots(lam: torch.Tensor) -> torch.Tensor:
    """prod_n (1 - lam_n w) as coefficients (..., N+1), by N sequential products (np.poly-like)."""
    c = torch.ones(*lam.shape[:-1], 1, dtype=lam.dtype, device=lam.device)
    zero = torch.zeros_like(c)
    for n in range(lam.shape[-1]):
        c = torch.cat([c, zero], dim=-1) - lam[..., n : n + 1] * torch.cat([zero, c], dim=-1)
    return c


def _polymul(x: torch.Tensor, y: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Product of polynomials x (..., P) and y (..., Q) by direct summation, truncated to n coefficients."""
    n = x.shape[-1] + y.shape[-1] - 1 if n is None else n
    shape = torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    out = torch.zeros(*shape, n, dtype=torch.promote_types(x.dtype, y.dtype), device=x.device)
    for j in range(min(x.shape[-1], n)):
        m = min(y.shape[-1], n - j)
        out = out + torch.nn.functional.pad(x[..., j : j + 1] * y[..., :m], (j, n - j - m))
    return out


# ---------------------------------------------------------------------------------------------------------
# SSM -> RTF


def _wide(*tensors: torch.Tensor) -> torch.dtype:
    """complex128 if any tensor is complex, else float64 (conversions are computed in double precision)."""
    return torch.complex128 if any(t.is_complex() for t in tensors) else torch.float64


def _out_dtype(is_complex: bool, *tensors: torch.Tensor) -> torch.dtype:
    """The result dtype: the inputs' precision (float32 at least), complex when ``is_complex``."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.real.dtype if t.is_complex() else t.dtype)
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    if is_complex:
        return torch.complex128 if dtype == torch.float64 else torch.complex64
    return dtype


def _check_D(D: torch.Tensor | float | None, batch: torch.Size) -> torch.Tensor | None:
    if D is None:
        return None
    if isinstance(D, (int, float, complex)) and not isinstance(D, bool):
        return torch.tensor(D)
    check_tensor("D", D)
    try:
        torch.broadcast_shapes(D.shape, batch)
    except RuntimeError:
        raise ValueError(
            f"D must be a number or a tensor broadcastable to the batch shape {tuple(batch)}; "
            f"got shape {tuple(D.shape)}"
        ) from None
    return D


def _check_flags(conj_pairs: bool, real: bool | None) -> None:
    if not isinstance(conj_pairs, bool):
        raise ValueError(f"conj_pairs must be True or False; got {conj_pairs!r}")
    if real is not None and not isinstance(real, bool):
        raise ValueError(f"real must be None, True or False; got {real!r}")


def _check_vec(name: str, t: torch.Tensor, N: int) -> torch.Tensor:
    check_tensor(name, t)
    if t.ndim < 1 or t.shape[-1] != N:
        raise ValueError(f"{name} must have shape (..., N) with N = {N}; got {tuple(t.shape)}")
    if not (t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name} must be a floating-point or complex tensor; got dtype {t.dtype}")
    return t


def _finish(
    num: torch.Tensor,
    den: torch.Tensor,
    D: torch.Tensor | None,
    conj_pairs: bool,
    real: bool | None,
    out_dtype_of: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add D, expand conjugate pairs, decide real vs complex output; num, den (..., N+1) in double."""
    if conj_pairs:
        # H_full = H_half + conj(H_half) (+ D): a = a_h conj(a_h), b = b_h conj(a_h) + conj(b_h) a_h.
        den_c = den.conj()
        num = _polymul(num, den_c) + _polymul(num.conj(), den)
        den = _polymul(den, den_c)
        num, den = num.real, den.real
    if D is not None:
        num = num + D.to(torch.complex128 if D.is_complex() else torch.float64).unsqueeze(-1) * den
    if num.is_complex():
        if real is None:
            scale_n = num.abs().amax().clamp_min(1e-300)
            scale_d = den.abs().amax().clamp_min(1e-300)
            real = bool(
                num.imag.abs().amax() <= _REAL_RTOL * scale_n
                and den.imag.abs().amax() <= _REAL_RTOL * scale_d
            )
        elif real:
            rel = max(
                float(num.imag.abs().amax() / num.abs().amax().clamp_min(1e-300)),
                float(den.imag.abs().amax() / den.abs().amax().clamp_min(1e-300)),
            )
            if rel > 1e-6:
                raise ValueError(
                    f"real=True but the system is not conjugate-symmetric: the transfer-function "
                    f"coefficients have relative imaginary part {rel:.2e}"
                )
        if real:
            num, den = num.real, den.real
    elif real is False:
        num, den = num.to(torch.complex128), den.to(torch.complex128)
    dtype = _out_dtype(num.is_complex(), *out_dtype_of)
    return num.to(dtype), den[..., 1:].to(dtype)


def ssm_to_rtf(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | float | None = None,
    *,
    conj_pairs: bool = False,
    real: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transfer-function coefficients (b, a) of a discrete SSM, with the same impulse response.

    For x_k = A x_{k-1} + B u_k, y_k = C x_k + D u_k (so K_0 = C B + D, K_k = C A^k B):

        a(w) = det(I - w A) = prod_n (1 - lambda_n w)            (characteristic polynomial, reversed)
        b(w) = a(w) H(w) mod w^(N+1),   i.e.   b_k = sum_(j <= k) a_j K_(k-j),   k = 0..N,

    which is exact because a(w) H(w) = D a(w) + C adj(I - w A) B is a polynomial of degree <= N. The
    eigenvalues lambda_n are the diagonal for a diagonal A and ``torch.linalg.eigvals`` for a dense one
    (O(N^3)); the polynomial is built by N sequential products (like ``numpy.poly``) and K_0..K_N by N
    matrix-vector products. Everything is computed in float64 / complex128 and returned in the inputs'
    precision (float32 at least). Differentiable (eigvals' gradient needs distinct eigenvalues).

    Which form: A.ndim == B.ndim means diagonal A (..., N) (the diagonal entries are the eigenvalues);
    A.ndim == B.ndim + 1 means dense A (..., N, N), so a dense A shared by a batch of B must carry the
    batch dims (``A.expand(H, N, N)`` for B (H, N)). For a DPLR A use :func:`ssm_to_rtf_dplr`.

    Real or complex output: real inputs give real coefficients. With ``conj_pairs=True`` the system holds
    one state per conjugate pair and its kernel is K_k = 2 Re(C A^k B) (+ D), the S4D storage (for S4's
    DPLR storage, whose low-rank term couples the halves, see :func:`ssm_to_rtf_dplr`); the full
    2N-state system is the half system plus its conjugate, so a = a_h conj(a_h) and
    b = b_h conj(a_h) + conj(b_h) a_h (+ D a), real and of degree 2N. A complex system given in full is
    conjugate-symmetric when its eigenvalues and residues come in conjugate pairs; then the coefficients
    are real up to rounding. ``real=None`` returns real coefficients when their imaginary parts are below
    1e-9 relative (in complex128) and complex ones otherwise; ``real=True`` takes the real part and raises
    when the imaginary part is above 1e-6 relative; ``real=False`` always returns complex.

    Conditioning: the monomial coefficients of prod_n (1 - lambda_n w) are ill-conditioned when many
    poles cluster in a small arc near the unit circle, and then the rounded coefficients describe a
    different (eventually unstable) filter. Measured for S4D-Lin poles exp(dt (-1/2 + i pi n)),
    n < N/2, with conjugates (tests/test_transfer.py): with dt = 0.1 the poles spread around the circle
    and the kernel is recovered to ~1e-8 up to N = 256; with dt = 0.01 all poles lie within
    0.01 pi N / 2 rad of z = 1 and the error is ~1e-8 at N = 4, ~1e-2 at N = 8, and from N = 12 on the
    rounded coefficients are meaningless (the companion recurrence grows without bound, rtf_kernel
    returns non-finite taps). This is a property of the representation, not of this routine (the
    companion recurrence built from the same coefficients fails alike); the paper's RTF layer
    parametrizes (b, a) directly instead of converting large clustered systems.

    Args:
        A: (..., N) diagonal or (..., N, N) dense state matrix.
        B: (..., N) input vector.
        C: (..., N) output vector.
        D: (...) skip term, a number, or None (0).
        conj_pairs: the system stores one state per conjugate pair (kernel 2 Re(C A^k B) + D).
        real: force real (True) or complex (False) coefficients; None decides as described above.

    Returns:
        b: (..., M+1) numerator and a: (..., M) denominator (a_0 = 1 implicit), M = N (2N with
        ``conj_pairs``), broadcast over the leading dims of A, B, C and D.
    """
    check_tensor("A", A)
    check_tensor("B", B)
    if B.ndim < 1:
        raise ValueError(f"B must have shape (..., N); got {tuple(B.shape)}")
    N = B.shape[-1]
    if A.ndim == B.ndim and A.shape[-1] == N:
        dense = False
    elif A.ndim == B.ndim + 1 and A.shape[-2:] == (N, N):
        dense = True
    else:
        raise ValueError(
            f"A must be diagonal (..., N) with A.ndim == B.ndim or dense (..., N, N) with "
            f"A.ndim == B.ndim + 1, N = {N}; got A {tuple(A.shape)} and B {tuple(B.shape)}"
        )
    _check_vec("A", A, N)
    _check_vec("B", B, N)
    _check_vec("C", C, N)
    batch_A = A.shape[:-2] if dense else A.shape[:-1]
    try:
        batch = torch.broadcast_shapes(batch_A, B.shape[:-1], C.shape[:-1])
    except RuntimeError:
        hint = ""
        if not dense and A.ndim >= 2 and A.shape[-2] == N:
            hint = " (A.ndim == B.ndim reads A as diagonal; give a dense A the batch dims of B)"
        raise ValueError(
            f"A, B and C must have broadcastable batch shapes; got {tuple(A.shape)}, {tuple(B.shape)}, "
            f"{tuple(C.shape)}{hint}"
        ) from None
    D = _check_D(D, batch)
    _check_flags(conj_pairs, real)

    wide = _wide(A, B, C) if not conj_pairs else torch.complex128
    Aw, Bw, Cw = A.to(wide), B.to(wide), C.to(wide)
    if dense:
        lam = torch.linalg.eigvals(Aw) if N else Aw.new_zeros(*batch_A, 0).to(torch.complex128)
        den = _poly_from_roots(lam)
        if not wide.is_complex:
            den = den.real
    else:
        den = _poly_from_roots(Aw)
    den = den.expand(*batch, N + 1)
    head = _impulse_head(lambda x: _matvec(Aw, x) if dense else Aw * x, Bw, Cw, N + 1, batch)
    num = _polymul(den, head, N + 1)
    return _finish(num, den, D, conj_pairs, real, (A, B, C) + (() if D is None else (D,)))


def _matvec(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (A @ x.unsqueeze(-1)).squeeze(-1)


def _impulse_head(apply_A, B: torch.Tensor, C: torch.Tensor, n: int, batch: torch.Size) -> torch.Tensor:
    """K_k = C A^k B for k = 0..n-1 (without D), by repeated application of A: (*batch, n)."""
    x = B.expand(*batch, B.shape[-1]) if B.shape[:-1] != batch else B
    taps = []
    for k in range(n):
        taps.append((C * x).sum(-1))
        if k + 1 < n:
            x = apply_A(x)
    return torch.stack(taps, dim=-1).expand(*batch, n)


def ssm_to_rtf_dplr(
    Lambda: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor | None,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | float | None = None,
    *,
    conj_pairs: bool = False,
    real: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ssm_to_rtf` for a discrete diagonal-plus-low-rank state matrix

        A = diag(Lambda) - sum_r P_r Q_r^*        (Q = P when None; ^* is the conjugate transpose),

    the layout of ``ssm.reference.dplr_to_dense``. The impulse response K_0..K_N uses the structure
    (A x = Lambda x - P (Q^* x), O(N R) per step); the characteristic polynomial uses the eigenvalues of
    the assembled N x N matrix (O(N^3), once per conversion). ``real`` as in :func:`ssm_to_rtf`.

    ``conj_pairs=True`` follows ``ssm.kernels.dplr_kernel``: the N given states stand for 2N, the system
    with the conjugates of Lambda, P, Q, B and C appended along the last dimension
    (``ssm.reference.conj_expand``); the low-rank term couples both halves, so that system is converted
    as a whole (it is conjugate-symmetric, so the coefficients are real, degree 2N).

    Args:
        Lambda: (..., N) diagonal part.
        P: (R, ..., N) low-rank factors (leading R is the rank).
        Q: (R, ..., N) or None.
        B, C: (..., N).
        D: (...), a number or None.

    Returns:
        b: (..., M+1), a: (..., M) with M = N (2N with ``conj_pairs``).
    """
    check_tensor("Lambda", Lambda)
    if Lambda.ndim < 1:
        raise ValueError(f"Lambda must have shape (..., N); got {tuple(Lambda.shape)}")
    N = Lambda.shape[-1]
    _check_vec("Lambda", Lambda, N)
    _check_vec("P", P, N)
    if P.ndim != Lambda.ndim + 1:
        raise ValueError(f"P must have shape (R, ..., N) with one more dim than Lambda; got {tuple(P.shape)}")
    if Q is None:
        Q = P
    _check_vec("Q", Q, N)
    if Q.shape != P.shape:
        raise ValueError(f"Q must have the shape of P {tuple(P.shape)}; got {tuple(Q.shape)}")
    _check_vec("B", B, N)
    _check_vec("C", C, N)
    try:
        batch = torch.broadcast_shapes(Lambda.shape[:-1], P.shape[1:-1], B.shape[:-1], C.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"Lambda, P, Q, B and C must have broadcastable batch shapes; got {tuple(Lambda.shape)}, "
            f"{tuple(P.shape)}, {tuple(B.shape)}, {tuple(C.shape)}"
        ) from None
    D = _check_D(D, batch)
    _check_flags(conj_pairs, real)

    wide = _wide(Lambda, P, Q, B, C) if not conj_pairs else torch.complex128
    Lw, Pw, Qw, Bw, Cw = (t.to(wide) for t in (Lambda, P, Q, B, C))
    if conj_pairs:
        Lw, Pw, Qw, Bw, Cw = (torch.cat([t, t.conj()], dim=-1) for t in (Lw, Pw, Qw, Bw, Cw))
        N = 2 * N
        real = True if real is None else real
    Qc = Qw.conj()
    A = torch.diag_embed(Lw) - torch.einsum("r...n,r...m->...nm", Pw, Qc)
    lam = torch.linalg.eigvals(A) if N else A.new_zeros(*A.shape[:-2], 0).to(torch.complex128)
    den = _poly_from_roots(lam)
    if not wide.is_complex:
        den = den.real
    den = den.expand(*batch, N + 1)

    def apply_A(x: torch.Tensor) -> torch.Tensor:
        return Lw * x - (Pw * (Qc * x).sum(-1, keepdim=True)).sum(0)

    head = _impulse_head(apply_A, Bw, Cw, N + 1, batch)
    num = _polymul(den, head, N + 1)
    return _finish(num, den, D, False, real, (Lambda, P, Q, B, C) + (() if D is None else (D,)))


# ---------------------------------------------------------------------------------------------------------
# RTF -> SSM (companion realization)


def rtf_to_ssm(
    b: torch.Tensor, a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Companion (controllable canonical) realization of b(w) / a(w) in the library convention.

    With the state x_k = (w_k, w_(k-1), ..., w_(k-N)) of the direct-form-II recurrence
    w_k = u_k - a_1 w_(k-1) - ... - a_N w_(k-N), y_k = b_0 w_k + ... + b_N w_(k-N):

        A = [[-a_1, ..., -a_N, 0],        B = e_1,    C = (b_0, ..., b_N),    D = 0,
             [ I_N            , 0]],

    an (N+1) x (N+1) matrix whose impulse response C A^k B is exactly h_k. The extra state (an extra pole
    at 0) is needed in this convention (y_k = C x_k + D u_k with x_k already containing u_k): it gives
    K_0 = C B + D and K_k = (C A) A^(k-1) B, so an N-state realization needs C A = c for the strictly
    proper part c, i.e. an invertible A, which fails whenever a_N = 0 (the FIR b_N w^N, for instance, needs
    C A^N B != 0 with A^N = 0). :func:`rtf_step` runs the same recurrence keeping only the N states
    (w_(k-1), ..., w_(k-N)).

    Args:
        b: (..., N+1), a: (..., N), same leading dims.

    Returns:
        A: (..., N+1, N+1), B: (..., N+1), C: (..., N+1), D: (...), in the dtype of b and a.
    """
    check_tensor("b", b)
    check_tensor("a", a)
    if b.ndim < 1 or a.ndim < 1 or b.shape[:-1] != a.shape[:-1] or b.shape[-1] != a.shape[-1] + 1:
        raise ValueError(
            f"b and a must have shapes (..., N+1) and (..., N) with the same leading dims; got b "
            f"{tuple(b.shape)} and a {tuple(a.shape)}"
        )
    for name, t in (("b", b), ("a", a)):
        if not (t.is_floating_point() or t.is_complex()):
            raise ValueError(f"{name} must be a floating-point or complex tensor; got dtype {t.dtype}")
    dtype = torch.promote_types(b.dtype, a.dtype)
    b, a = b.to(dtype), a.to(dtype)
    N = a.shape[-1]
    batch = a.shape[:-1]
    shift = torch.diag(torch.ones(N, dtype=dtype, device=a.device), -1)  # (N+1, N+1) sub-diagonal
    top = torch.nn.functional.pad(-a, (0, 1)).unsqueeze(-2)  # (..., 1, N+1)
    A = torch.cat([top, shift[1:].expand(*batch, N, N + 1)], dim=-2)
    B = torch.zeros(*batch, N + 1, dtype=dtype, device=a.device)
    B[..., 0] = 1
    return A, B, b.clone(), torch.zeros(batch, dtype=dtype, device=a.device)


def to_rtf(layer, rate: float = 1.0, *, dtype: torch.dtype | None = None, check_length: int = 1024):
    """An ``ssm.RTF`` layer with the same outputs as the LTI ``layer``: the exact transfer function of its
    system (also reached as ``layer.to_rtf(...)``).

    An RTF layer returns a copy of itself. Otherwise the family's ``transfer_function`` gives (b, a) in
    float64 (b_0, the lag-0 tap, goes into the RTF layer's D, which keeps a strictly proper numerator);
    D, the output projection, activation and GLU are copied. The result is built with
    ``constraint="none"`` (the denominator is set, not mapped), in ``dtype`` (default: this layer's;
    float64 coefficients survive conditioning that float32 ones do not).

    Raises:
        ValueError: the layer is bidirectional; or the conversion is ill-conditioned, which happens when
            many poles cluster near z = 1 (small dt, large d_state: docs/convert_to_rtf.md): a
            denominator root on or outside the unit circle, or a kernel of the converted coefficients
            (in float64 and rounded to ``dtype``) that differs from this layer's over ``check_length``
            taps by more than the tolerance of the dtype (1e-6 in float64, 1e-4 in float32).

    A converted system that cannot be streamed (the layer's own probe, ``ssm.systems.rtf.streaming_error``
    on ``2 STREAM_PROBE`` white-noise steps in chunks, off one pass by more than ``STREAM_RTOL`` of the
    dtype, 2e-5 float32 / 1e-6 float64, relative to the output scale: clustered poles near the unit circle
    make the direct-form state ill-conditioned) is returned with ``stream_refusal`` set: its one
    pass is exact, ``step`` (the float64 recurrence) too, and every route that folds a state into a chunk
    (``forward`` with ``state``, ``return_state`` or ``return_states_at``) raises a ValueError saying why
    (``RTF.streaming_refusal``, docs/convert_to_rtf.md).
    """
    from .layers.rtf import RTF  # deferred: the layers import this module's siblings

    rate = layer._check_rate(rate)  # the checks come first, for an RTF layer too
    L = check_int("check_length", check_length, minimum=1)
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    if isinstance(layer, RTF):
        return copy.deepcopy(layer) if dtype is None else copy.deepcopy(layer).to(dtype)
    if layer.bidirectional:
        raise ValueError("to_rtf converts causal layers; got a bidirectional layer")
    if not hasattr(layer.family, "transfer_function"):
        raise ValueError(f"{type(layer).__name__} has no transfer-function conversion")
    device = layer.D.device
    dtype = layer.D.dtype if dtype is None else dtype
    wide = copy.deepcopy(layer).double()
    with torch.no_grad():
        system = wide.discrete_system(rate)
        b, a = layer.family.transfer_function(system)  # (C, H, N+1), (H, N)
        K = layer.family.kernel(system, L, **wide.kernel_options())[: layer.channels]  # (C, H, L)
        C, H, N = b.shape[0], layer.d_model, a.shape[-1]
        if N:
            companion = torch.zeros(H, N, N, dtype=a.dtype)
            companion[:, 0] = -a
            companion[:, 1:, :-1] = torch.eye(N - 1, dtype=a.dtype)
            radius = torch.linalg.eigvals(companion).abs().max().item()
            if not radius < 1:
                raise ValueError(
                    f"the transfer function of this layer is ill-conditioned (clustered poles): its "
                    f"denominator has a root of modulus {radius:.6g} >= 1 although the system is stable; "
                    "a larger dt or a smaller d_state converts well"
                )
        rtol = 1e-6 if dtype == torch.float64 else 1e-4
        rounded = (b.to(dtype).double(), a.to(dtype).double())
        for what, (bb, aa) in (("float64", (b, a)), (str(dtype), rounded)):
            K_rtf = rtf_kernel(bb.reshape(C * H, N + 1), aa.repeat(C, 1), L).reshape(C, H, L)
            err = ((K_rtf - K).norm() / K.norm().clamp_min(1e-300)).item()
            if not err <= rtol:
                raise ValueError(
                    f"the transfer function of this layer is ill-conditioned (clustered poles): with "
                    f"{what} coefficients its kernel differs from the layer's by {err:.3g} relative over "
                    f"{L} taps (tolerance {rtol:g}); a larger dt, a smaller d_state or "
                    "dtype=torch.float64 converts well"
                )
        out = RTF(H, N, constraint="none", channels=layer.channels, transposed=layer.transposed,
                  activation=layer.activation, glu=layer.glu, dropout=layer.drop.p,
                  ssm_lr=layer._hint.get("lr"), ssm_weight_decay=layer._hint["weight_decay"],
                  device=device, dtype=dtype)
        b0 = b[..., 0]  # (C, H)
        out.a.copy_(a)
        out.b.copy_(b[..., 1:] - b0[..., None] * a)
        out.D.copy_(layer.D.double() + b0)
        out.out_proj.load_state_dict(layer.out_proj.state_dict())
        if N:
            # the layer's own streaming probe and tolerance (``RTF.streaming_refusal``), so that what the
            # conversion accepts the layer never refuses later
            with torch.no_grad():
                err = rtf_family.streaming_error(out.discrete_system(), rtf_family.STREAM_PROBE)
            srtol = rtf_family.STREAM_RTOL.get(out.a.dtype, rtf_family.STREAM_RTOL[torch.float32])
            if not err <= srtol:
                out.stream_refusal = (
                    f"converted from {type(layer).__name__} with clustered poles near the unit circle, its "
                    f"direct-form state (float64) puts chunked outputs {err:.3g} off one pass relative to "
                    f"the output scale (tolerance {srtol:g}); stream the original layer or step it token by "
                    "token, or convert with a larger dt or a smaller d_state"
                )
    return out.train(layer.training)
