"""Pure functions mapping SSM parameters to convolution kernels K (H, L).

No function here owns a parameter; layers in ``ssm.layers`` call these.
"""

from __future__ import annotations

# ---- S4 (DPLR) and S4D (diagonal) kernels: dplr_kernel, diag_kernel ----
import math

import torch

from ._checks import check_choice, check_int, check_positive, check_shape, check_tensor
from .discretize import discretize, phi1
from .ops.cauchy import BACKENDS as _OP_BACKENDS
from .ops.cauchy import cauchy
from .ops.vandermonde import vandermonde

KERNEL_DISCS = ("zoh", "bilinear")


def _s4_complex_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Common complex dtype of ``tensors`` (complex64 for float32 inputs, complex128 for float64)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_complex:
        dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return dtype


def _s4_check_args(
    Lambda: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor, L: int, disc: str, backend: str
) -> tuple[int, int, int]:
    """Validate the arguments shared by ``dplr_kernel`` and ``diag_kernel``; return (H, N, L)."""
    check_choice("disc", disc, KERNEL_DISCS)
    check_choice("backend", backend, _OP_BACKENDS)
    L = check_int("L", L, minimum=1)
    check_tensor("Lambda", Lambda, ndim=2)
    H, N = Lambda.shape
    check_tensor("B", B)
    check_shape("B", B, (H, N), "(H, N) like Lambda")
    check_tensor("C", C, ndim=(2, 3))
    check_shape("C", C, (None,) * (C.ndim - 2) + (H, N), "(H, N) or (channels, H, N) like Lambda")
    check_tensor("dt", dt)
    check_shape("dt", dt, (H,), "(H,) like Lambda's first dimension")
    if dt.is_complex() or not dt.is_floating_point():
        raise ValueError(f"dt must be a real floating tensor; got dtype {dt.dtype}")
    check_positive("dt", dt)
    return H, N, L


def _s4_dplr_dense(Lambda: torch.Tensor, P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """A = diag(Lambda) - sum_r P_r Q_r^*: Lambda (H, N), P, Q (R, H, N) -> (H, N, N)."""
    return torch.diag_embed(Lambda) - torch.einsum("rhn,rhm->hnm", P, Q.conj())


def _s4_small_solve(K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """K^{-1} V for a batch of small R x R systems, K (..., R, R), V (..., R, X).

    Ranks 1 and 2 (the HiPPO cases) are solved in closed form: torch's batched LU solve on CPU is
    occasionally slower by orders of magnitude for many tiny matrices.
    """
    R = K.shape[-1]
    if R == 1:
        return V / K
    if R == 2:
        a, b, c, d = K[..., 0, 0, None], K[..., 0, 1, None], K[..., 1, 0, None], K[..., 1, 1, None]
        v0, v1 = V[..., 0, :], V[..., 1, :]
        det = a * d - b * c
        return torch.stack([(d * v0 - b * v1) / det, (a * v1 - c * v0) / det], dim=-2)
    return torch.linalg.solve(K, V)


def _s4_bilinear_dense(
    Lambda: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, dt: torch.Tensor
) -> torch.Tensor:
    """Dense bilinear Ab = (I - dt/2 A)^{-1} (I + dt/2 A) = 2 (I - dt/2 A)^{-1} - I of a DPLR matrix.

    I - dt/2 A = diag(D) + Pt Q^* with D = 1 - dt/2 Lambda and Pt = dt/2 P, so by the Woodbury identity

        (I - dt/2 A)^{-1} = diag(1/D) - (Pt / D) (I_R + Q^* (Pt / D))^{-1} (Q^* / D),

    O(H N^2 R) instead of a dense O(H N^3) solve. Lambda (H, N), P, Q (R, H, N), dt (H,) -> (H, N, N).
    """
    half_dt = (dt / 2).to(Lambda.dtype).unsqueeze(-1)  # (H, 1)
    Dinv = 1 / (1 - half_dt * Lambda)  # (H, N)
    Pt = (half_dt * P).permute(1, 2, 0)  # (H, N, R)
    U = Pt * Dinv.unsqueeze(-1)  # (H, N, R): Pt / D
    V = (Q.conj() * Dinv).permute(1, 0, 2)  # (H, R, N): Q^* / D
    eye_r = torch.eye(P.shape[0], dtype=Lambda.dtype, device=Lambda.device)
    K = eye_r + V @ Pt  # (H, R, R): I + Q^* D^{-1} Pt
    Minv = torch.diag_embed(Dinv) - U @ _s4_small_solve(K, V)
    return 2 * Minv - torch.eye(Lambda.shape[-1], dtype=Lambda.dtype, device=Lambda.device)


def _s4_row_power(C: torch.Tensor, Ab: torch.Tensor, L: int) -> torch.Tensor:
    """C Ab^L by binary powering on row vectors: C (Ch, H, N), Ab (H, N, N) -> (Ch, H, N).

    Costs floor(log2 L) batched squarings of Ab plus vector-matrix products.
    """
    out = C
    G = Ab
    while True:
        if L & 1:
            out = torch.einsum("chn,hnm->chm", out, G)
        L >>= 1
        if not L:
            return out
        G = G @ G


def _s4_krylov(Ab: torch.Tensor, Bb: torch.Tensor, C: torch.Tensor, L: int) -> torch.Tensor:
    """K[c, h, k] = C[c, h] Ab[h]^k Bb[h] for k < L, by two-level Krylov doubling.

    With a block length b (a power of two >= sqrt(L)) and q = ceil(L / b) blocks,
    K_{i b + j} = (C Ab^{i b}) (Ab^j Bb): both factors are built by doubling (one squaring of the matrix per
    step) and the taps are one batched product (Ch q, N) x (N, b). Cost O(H N^3 log L + H N^2 (b + q Ch)
    + Ch H N L), memory O(Ch H L + H N (b + q Ch)); no eigendecomposition, so it is as stable as the
    matrix products themselves (non-normal Ab are fine).

    Ab (H, N, N), Bb (H, N), C (Ch, H, N) -> (Ch, H, L).
    """
    H, N, _ = Ab.shape
    Ch = C.shape[0]
    b = 1 << max(0, math.ceil(math.log2(math.sqrt(L))))
    q = -(-L // b)
    U = Bb.unsqueeze(-1)  # (H, N, 1): columns Ab^j Bb
    G = Ab
    while U.shape[-1] < b:
        U = torch.cat([U, G @ U], dim=-1)
        G = G @ G  # G = Ab^(number of columns of U)
    W = C.permute(1, 0, 2).unsqueeze(2)  # (H, Ch, 1, N): rows C Ab^(i b)
    while W.shape[2] < q:
        m = W.shape[2]
        W = torch.cat([W, (W.reshape(H, Ch * m, N) @ G).reshape(H, Ch, m, N)], dim=2)
        if 2 * m < q:
            G = G @ G
    W = W[:, :, :q].reshape(H, Ch * q, N)
    K = torch.bmm(W, U).reshape(H, Ch, q * b)[..., :L]  # (H, Ch, L)
    return K.permute(1, 0, 2)


def _s4_bilinear_freqs(
    L: int, M: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear images of the roots of unity z_k = exp(-2 pi i k / L), k < M, skipping z = -1 (k = L/2).

    With t = tan(pi k / L):  s_k = 2 (1 - z_k) / (1 + z_k) = 2 i t  and  2 / (1 + z_k) = 1 + i t,
    computed in float64 from t to avoid the cancellation in 1 - z_k and 1 + z_k.
    """
    k = torch.arange(M, dtype=torch.float64, device=device)
    if L % 2 == 0:
        k = k[k != L // 2]
    t = torch.tan(math.pi * k / L)
    s = torch.complex(torch.zeros_like(t), 2 * t)
    factor = torch.complex(torch.ones_like(t), t)
    return s.to(dtype), factor.to(dtype)


def _s4_woodbury(r: torch.Tensor, Ch: int) -> torch.Tensor:
    """C~ (D + P Q^*)^{-1} B from the Cauchy products r (Ch+R, 1+R, H, M) (rows: C~, Q^*; columns: B, P).

        k00 - k01 (I + k11)^{-1} k10,
        k00 = C~ D^{-1} B,  k01 = C~ D^{-1} P,  k10 = Q^* D^{-1} B,  k11 = Q^* D^{-1} P
    """
    R = r.shape[0] - Ch
    k00 = r[:Ch, 0]  # (Ch, H, M)
    if R == 0:
        return k00
    k01, k10, k11 = r[:Ch, 1:], r[Ch:, 0], r[Ch:, 1:]  # (Ch, R, H, M), (R, H, M), (R, R, H, M)
    eye = torch.eye(R, dtype=r.dtype, device=r.device)
    lhs = eye + k11.permute(2, 3, 0, 1)  # (H, M, R, R)
    sol = _s4_small_solve(lhs, k10.permute(1, 2, 0).unsqueeze(-1)).squeeze(-1)  # (H, M, R)
    return k00 - torch.einsum("crhm,hmr->chm", k01, sol)


def dplr_kernel(
    Lambda: torch.Tensor,
    P: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    dt: torch.Tensor,
    L: int,
    Q: torch.Tensor | None = None,
    disc: str = "zoh",
    *,
    conj_pairs: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Convolution kernel of a diagonal-plus-low-rank (DPLR) SSM: the S4 kernel.

    The state matrix of feature h is A_h = diag(Lambda_h) - sum_r P[r, h] Q[r, h]^*, discretized with step
    dt_h into (Ab_h, Bb_h) (``ssm.discretize``), and

        K[h, k] = Re(sum_n C[h, n] (Ab_h^k Bb_h)[n]),        k = 0, ..., L - 1.

    ``disc="bilinear"`` is the S4 algorithm (S4 paper, Alg. 1 and Sec. 3.3). ``C`` is the true C; the
    function forms C~ = C (I - Ab^L) (dense Ab^L by repeated squaring, O(H N^3 log L)) so that the
    truncated generating function is exact,

        sum_{k<L} C Ab^k Bb z^k = C~ (I - Ab z)^{-1} Bb = 2 / (1 + z) C~ (g(z) - A)^{-1} B,
        g(z) = 2 / dt (1 - z) / (1 + z),

    evaluates it at the L-th roots of unity z = exp(-2 pi i k / L) (at z = -1 directly: dt/2 C~ B) through
    the Woodbury identity with D = g(z) - diag(Lambda):

        (D + P Q^*)^{-1} = D^{-1} - D^{-1} P (I + Q^* D^{-1} P)^{-1} Q^* D^{-1},

    where every term u^T D^{-1} v is one Cauchy product ``cauchy(dt u v, dt g(z), dt Lambda)``, and takes
    an inverse FFT. Cost O(H N L) for the Cauchy products (``backend``) plus the dense O(H N^3 log L).

    ``disc="zoh"`` (Ab = exp(dt A)): exp of a DPLR matrix is dense, so no Cauchy form exists (S4's own
    DPLR kernel ignores ``disc`` and always uses the bilinear transform). This path discretizes the dense
    matrix with a matrix exponential and builds the taps K_k = C Ab^k Bb directly by two-level Krylov
    doubling, O(H N^3 log L + H N L) time and O(H L + H N sqrt(L)) memory, exact up to rounding and, as it
    never diagonalizes, accurate for the non-normal HiPPO matrices too; ``backend`` is not used.

    Conjugate pairs: with ``conj_pairs=True`` the N given states stand for 2N, the system with the
    conjugates of Lambda, P, Q, B, C appended along the last dimension (``ssm.reference.conj_expand``);
    the result is the (real) kernel of that expanded system. The low-rank term couples both halves, so
    the Cauchy sums run over both; as the kernel is real only the L//2 + 1 non-negative frequencies are
    evaluated and ``irfft`` is used. This is how layers store S4 parameters (N/2 complex states for an
    N-dimensional real system).

    Args:
        Lambda: (H, N) complex diagonal part.
        P: (R, H, N) complex low-rank factor (R >= 0).
        B: (H, N) complex.
        C: (H, N) or (Ch, H, N) complex; Ch output channels.
        dt: (H,) positive real step per feature.
        L: kernel length, any integer >= 1.
        Q: (R, H, N) complex, or None for Q = P.
        disc: ``"zoh"`` or ``"bilinear"``.
        conj_pairs: the inputs hold one state per conjugate pair (see above).
        backend: Cauchy backend for the bilinear path (``ssm.ops.cauchy``): ``"auto"``, ``"naive"``,
            ``"chunked"`` or ``"triton"``.

    Returns:
        K: (H, L), or (Ch, H, L) for a 3-d C; real, float32 for complex64 inputs and float64 for
        complex128. Differentiable in Lambda, P, Q, B, C and dt.
    """
    H, N, L = _s4_check_args(Lambda, B, C, dt, L, disc, backend)
    check_tensor("P", P, ndim=3)
    check_shape("P", P, (None, H, N), "(R, H, N) with (H, N) like Lambda")
    if Q is None:
        Q = P
    check_tensor("Q", Q, ndim=3)
    check_shape("Q", Q, tuple(P.shape), "(R, H, N) like P")
    if not isinstance(conj_pairs, bool):
        raise ValueError(f"conj_pairs must be a bool; got {conj_pairs!r}")

    cdtype = _s4_complex_dtype(Lambda, P, Q, B, C, dt)
    Lambda, P, Q, B, C = (t.to(cdtype) for t in (Lambda, P, Q, B, C))
    rdtype = dt.new_empty(0, dtype=cdtype).real.dtype
    dt = dt.to(rdtype)
    squeeze = C.ndim == 2
    C = C.unsqueeze(0) if squeeze else C  # (Ch, H, N)
    Ch = C.shape[0]

    full = (lambda t: torch.cat([t, t.conj()], dim=-1)) if conj_pairs else (lambda t: t)

    if disc == "zoh":
        Af = _s4_dplr_dense(full(Lambda), full(P), full(Q))  # (H, Nf, Nf)
        # The exponential is taken in complex128: in complex64, matrix_exp of a stiff non-normal matrix
        # (HiPPO-LegS, |dt A| ~ 1e2) loses ~1e-4 relative accuracy, 100x the rest of the computation.
        wide = torch.complex128
        Ab, Bb = discretize(Af.to(wide), full(B).to(wide), dt.to(torch.float64), "zoh")
        K = _s4_krylov(Ab.to(cdtype), Bb.to(cdtype), full(C), L).real
        return K[0] if squeeze else K

    Ab = _s4_bilinear_dense(full(Lambda), full(P), full(Q), dt)  # (H, Nf, Nf)
    Cf = full(C)
    Ct = Cf - _s4_row_power(Cf, Ab, L)  # C~ = C (I - Ab^L), (Ch, H, Nf)
    M = L // 2 + 1 if conj_pairs else L
    s, factor = _s4_bilinear_freqs(L, M, cdtype, Lambda.device)
    left = torch.cat([Ct[..., :N], Q.conj()], dim=0)  # (Ch+R, H, N)
    right = torch.cat([B.unsqueeze(0), P], dim=0)  # (1+R, H, N)
    dtc = dt.to(cdtype).unsqueeze(-1)  # (H, 1)
    v = left.unsqueeze(1) * right.unsqueeze(0) * dtc  # (Ch+R, 1+R, H, N)
    w = dtc * Lambda  # (H, N)
    r = cauchy(full(v), s, full(w), backend=backend)  # (Ch+R, 1+R, H, M')
    khat = _s4_woodbury(r, Ch) * factor  # (Ch, H, M')
    if L % 2 == 0:
        # z = -1: (I + Ab)^{-1} Bb = dt/2 B for any A, so the generating function there is dt/2 C~ B.
        nyq = (Ct * full(B)).sum(-1) * dtc.squeeze(-1) / 2  # (Ch, H)
        if conj_pairs:
            nyq = nyq.real.to(cdtype)
        khat = torch.cat([khat[..., : L // 2], nyq.unsqueeze(-1), khat[..., L // 2 :]], dim=-1)
    K = torch.fft.irfft(khat, n=L) if conj_pairs else torch.fft.ifft(khat, n=L).real
    return K[0] if squeeze else K


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
    H, N, L = _s4_check_args(Lambda, B, C, dt, L, disc, backend)
    if not isinstance(conj_pairs, bool):
        raise ValueError(f"conj_pairs must be a bool; got {conj_pairs!r}")
    cdtype = _s4_complex_dtype(Lambda, B, C, dt)
    Lambda, B, C = Lambda.to(cdtype), B.to(cdtype), C.to(cdtype)
    dtc = dt.to(cdtype).unsqueeze(-1)  # (H, 1)
    x = dtc * Lambda  # (H, N)
    if disc == "zoh":
        Bb, log_Ab = dtc * B * phi1(x), x
    else:
        den = 1 - x / 2
        Bb, log_Ab = dtc * B / den, torch.log((1 + x / 2) / den)
    K = vandermonde(C * Bb, log_Ab, L, log=True, backend=backend).real  # (..., H, L)
    return 2 * K if conj_pairs else K


# ---- RTF (rational transfer function) kernel: rtf_kernel ----

# rtf_kernel evaluates H on M >= RTF_OVERSAMPLE * L points; the tilt r^(L-1) = eps^(1 / (RTF_OVERSAMPLE + 1))
# balances the damped truncation error r^M against the amplified rounding error r^-(L-1).
RTF_OVERSAMPLE = 4


def _wrap(x: torch.Tensor, M: int) -> torch.Tensor:
    """Fold the last dim of ``x`` onto length M (sum of x[k + jM] over j); a shorter x is returned as is.

    The M-point DFT of the folded vector (zero-padded to M by the FFT) is the polynomial with coefficients
    x evaluated at the M-th roots of unity (w^M = 1), whatever the length of x.
    """
    n = x.shape[-1]
    if n <= M:
        return x
    reps = -(-n // M)
    x = torch.nn.functional.pad(x, (0, reps * M - n))
    return x.reshape(*x.shape[:-1], reps, M).sum(-2)


def _fft_any(x: torch.Tensor, n: int) -> torch.Tensor:
    """n-point DFT of ``x`` (zero-padded to n): a real FFT for real x, a full FFT for complex x."""
    return torch.fft.fft(x, n=n) if x.is_complex() else torch.fft.rfft(x, n=n)


def _ifft_any(X: torch.Tensor, n: int, complex_out: bool) -> torch.Tensor:
    """Inverse of :func:`_fft_any`."""
    return torch.fft.ifft(X, n=n) if complex_out else torch.fft.irfft(X, n=n)


def _rtf_taps(num: torch.Tensor, den: torch.Tensor, L: int) -> torch.Tensor:
    """First L power-series coefficients of num(w) / den(w) (w = z^-1), state-free; see :func:`rtf_kernel`.

    Args:
        num: (..., K, P) K numerators sharing one denominator per leading index.
        den: (..., Q) denominator with den[..., 0] = 1.
        L: number of taps, >= 1.

    Returns:
        (..., K, L), the promoted dtype of num and den.
    """
    from .ops.fftconv import next_fast_len  # deferred: keeps this section's imports out of the shared header

    dtype = torch.promote_types(num.dtype, den.dtype)
    num, den = num.to(dtype), den.to(dtype)
    real_dtype = torch.empty((), dtype=dtype).real.dtype
    M = next_fast_len(RTF_OVERSAMPLE * L)
    log_r = math.log(torch.finfo(real_dtype).eps) / ((RTF_OVERSAMPLE + 1) * max(L - 1, 1))

    def tilted(x: torch.Tensor) -> torch.Tensor:  # x_j r^j, folded onto M points
        j = torch.arange(x.shape[-1], device=x.device, dtype=real_dtype)
        return _wrap(x * torch.exp(log_r * j), M)

    spectrum = _fft_any(tilted(num), M) / _fft_any(tilted(den), M).unsqueeze(-2)
    taps = _ifft_any(spectrum, M, dtype.is_complex)[..., :L]
    k = torch.arange(L, device=num.device, dtype=real_dtype)
    return taps * torch.exp(-log_r * k)


def _check_rtf_coeffs(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate b (H, N+1) and a (H, N); return both in their promoted floating (or complex) dtype."""
    check_tensor("b", b, ndim=2)
    check_tensor("a", a, ndim=2)
    for name, t in (("b", b), ("a", a)):
        if not (t.is_floating_point() or t.is_complex()):
            raise ValueError(f"{name} must be a floating-point or complex tensor; got dtype {t.dtype}")
    if b.shape[0] != a.shape[0] or b.shape[1] != a.shape[1] + 1:
        raise ValueError(
            "b and a must have shapes (H, N+1) and (H, N) (numerator b_0..b_N over denominator "
            f"1 + a_1 z^-1 + ... + a_N z^-N); got b {tuple(b.shape)} and a {tuple(a.shape)}"
        )
    if b.device != a.device:
        raise ValueError(f"b and a must be on the same device; got {b.device} and {a.device}")
    dtype = torch.promote_types(torch.promote_types(b.dtype, a.dtype), torch.float32)  # float32 at least
    return b.to(dtype), a.to(dtype)


def _monic(a: torch.Tensor) -> torch.Tensor:
    """[1, a_1, ..., a_N] (..., N+1) from a (..., N)."""
    return torch.cat([torch.ones(*a.shape[:-1], 1, dtype=a.dtype, device=a.device), a], dim=-1)


def rtf_kernel(b: torch.Tensor, a: torch.Tensor, L: int) -> torch.Tensor:
    """Impulse response (first L taps) of a rational transfer function, computed state-free.

        H(z) = (b_0 + b_1 z^-1 + ... + b_N z^-N) / (1 + a_1 z^-1 + ... + a_N z^-N) = sum_k h_k z^-k,

    i.e. h_k + a_1 h_(k-1) + ... + a_N h_(k-N) = b_k (b_k = 0 for k > N, h_k = 0 for k < 0): the kernel
    of the recurrence run by :func:`ssm.transfer.rtf_step`, K_k = h_k.

    Derivation (w = z^-1, a(w) = 1 + a_1 w + ... + a_N w^N, h_L(w) = h_0 + ... + h_(L-1) w^(L-1)).
    One pointwise division at the L-th roots of unity (the paper's Algorithm 1),

        h~ = iFFT_L(FFT_L(b) / FFT_L(a)),        h~_k = sum_(m >= 0) h_(k + mL),

    gives the L-periodized (aliased) response, not the first L taps. Exactly, the tail of the series is
    w^L r(w) / a(w) with a tail numerator r of degree < N, so b = a h_L + w^L r and, on w^L = 1,
    h_L = iFFT_L((FFT_L(b) - FFT_L(r)) / FFT_L(a)). The corrected numerator b - r is the transfer-function
    twin of S4's C~ = C (I - A^L): r = b w^-L mod a needs w^L mod a, i.e. the state after L steps (the
    paper computes it once, at deployment, with a companion-matrix power, O(N^3 log L), and trains the
    corrected numerator directly). Without any state, the same effect is obtained by evaluating H on a
    circle of radius 1/r > 1 in z instead of the unit circle: the M-point DFT of the tilted taps
    h_k r^k is b(r w) / a(r w) at w^M = 1 (coefficients b_j r^j and a_j r^j), and

        r^-k iFFT_M(FFT_M(b_j r^j) / FFT_M(a_j r^j))_k = h_k + sum_(m >= 1) r^(mM) h_(k + mM),

    so the truncation (aliasing) error is damped by r^M while the rounding error of the division is
    amplified by at most r^-(L-1). With M >= 4L (2,3,5-smooth) and r^(L-1) = eps^(1/5) both are
    O(eps^(4/5)) relative to the kernel's scale (about 1e-13 in float64, 3e-6 in float32), times the
    conditioning of the division on the circle, for every filter whose poles lie in the closed unit
    disc, whatever their radius: the first L taps are exact to working accuracy. Measured against
    scipy.signal.lfilter (tests/test_rtf.py), for stable random filters and pole pairs at radius 0.999,
    N from 1 to L: <= 1e-12 relative in float64 and <= 3e-5 in float32 (in float32 this is the accuracy
    of any FFT division; the float32 recurrence is ~10x more accurate on such filters). Poles outside
    the unit disc give growing kernels; accuracy holds while |pole|^M r^M stays small, i.e. up to
    |pole| ~ 1 + ln(1/eps) / (5 L). A denominator whose monomial coefficients are so ill-conditioned
    that it vanishes to rounding on the circle (see :func:`ssm.transfer.ssm_to_rtf`) gives non-finite
    taps. Coefficient vectors longer than M are folded (summed mod M), which is the exact evaluation at
    the M-th roots of unity. (Power-series division by Newton's iteration, g <- g (2 - a g), is exact
    too and also needs FFTs of length ~L only, but it multiplies the rounding error by ~2 |a g|_1 per
    doubling: it overflows for a pole pair at 0.99 with L = 8192 in float64, so it is not used.)

    Cost: three FFTs of length M ~ 4L (the aliased version uses three of length L) plus O(N) to read the
    coefficients: O(N + L log L) time and O(N + L) memory per channel, flat in N (no state, no N x L
    Vandermonde or Cauchy matrix). Real inputs use real FFTs; complex coefficients (non-conjugate-
    symmetric systems, see :func:`ssm.transfer.ssm_to_rtf`) give a complex kernel. Differentiable in b and
    a (autograd through the FFTs).

    Args:
        b: (H, N+1) numerator coefficients b_0..b_N.
        a: (H, N) denominator coefficients a_1..a_N (a_0 = 1 is implicit), N >= 0.
        L: number of taps, >= 1.

    Returns:
        h: (H, L), the promoted dtype of b and a, float32 at least (float16 / bfloat16 inputs are
        computed and returned in float32), complex64 / complex128 for complex coefficients.
    """
    b, a = _check_rtf_coeffs(b, a)
    L = check_int("L", L, minimum=1)
    return _rtf_taps(b.unsqueeze(-2), _monic(a), L).squeeze(-2)
