"""The DPLR family (S4): A = diag(Lambda) - P Q^*, in conjugate-pair half storage or in full.

Pure functions of the structured parameters; ``ssm.layers.S4`` owns the parameters and calls these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_choice, check_shape, check_tensor, traced_size
from .._checks import traced as tracing
from ..discretize import discretize as _discretize_dense
from ..discretize import discretize_diag
from ..ops.cauchy import cauchy
from ..ops.scan import states_at as scan_states_at
from ..ops.series import series_fraction
from ..ops.vandermonde import vandermonde_pairs
from . import diag
from .common import SYMBOLIC_POWER_BITS, check_kernel_args, complex_dtype, power_rows, small_solve
from .dense import DenseSystem
from .dense import final_state as dense_final_state
from .dense import free_response as dense_free_response
from .dense import kernel as dense_kernel
from .dense import step as dense_step
from .diag import PairStep, output_rows, pair_step, real_rows

#: The family's tier (``ssm.systems``): linear time-invariant, so it adds kernel and free_response.
TIER = "lti"


def dplr_dense(Lambda: torch.Tensor, P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """A = diag(Lambda) - sum_r P_r Q_r^*: Lambda (H, N), P, Q (R, H, N) -> (H, N, N)."""
    return torch.diag_embed(Lambda) - torch.einsum("rhn,rhm->hnm", P, Q.conj())


def expand_pairs(t: Tensor) -> Tensor:
    """Half storage (..., N/2) -> the full system (..., N): ``t`` with its conjugates appended."""
    return torch.cat([t, t.conj()], dim=-1)


def bilinear_dense(
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
    Minv = torch.diag_embed(Dinv) - U @ small_solve(K, V)
    return 2 * Minv - torch.eye(Lambda.shape[-1], dtype=Lambda.dtype, device=Lambda.device)


_TOO_LONG = f"L must be < 2^{SYMBOLIC_POWER_BITS} under torch.compile / torch.export"


def _row_power(C: torch.Tensor, Ab: torch.Tensor, L: int) -> torch.Tensor:
    """C Ab^L on row vectors: C (Ch, H, N), Ab (H, N, N) -> (Ch, H, N).

    Binary powering whose squarings stop at Ab^(2^j), j = max(0, bit_length(L) - 4): the row then takes the
    remaining L >> j < 16 products with that power one by one; for a symbolic L (a dynamic
    length under torch.compile / torch.export) a fixed ``SYMBOLIC_POWER_BITS`` of them (``power_rows``).
    """
    if traced_size(L):
        torch._check(L < 2**SYMBOLIC_POWER_BITS, lambda: _TOO_LONG)
        e = torch.ones(C.shape[0], dtype=torch.int64, device=C.device) * L  # (Ch,)
        return power_rows(C.transpose(0, 1), Ab, e).transpose(0, 1)
    # The squarings stop when fewer than 16 vector products with the last power remain: a squaring costs
    # O(N^3) per feature, a vector product O(N^2) plus a fixed overhead, and the top squarings are the
    # costly ones (measured fwd+bwd, float64, N = 64: 15-25% less time at L = 196..4096).
    out = C
    G = Ab
    for _ in range(max(0, L.bit_length() - 4)):
        if L & 1:
            out = torch.einsum("chn,hnm->chm", out, G)
        L >>= 1
        G = G @ G
    for _ in range(L):
        out = torch.einsum("chn,hnm->chm", out, G)
    return out


def _bilinear_freqs(
    L: int, M: int, dtype: torch.dtype, device: torch.device, *, keep_half: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear images of the roots of unity z_k = exp(-2 pi i k / L), k < M, skipping z = -1 (k = L/2).

    With t = tan(pi k / L):  s_k = 2 (1 - z_k) / (1 + z_k) = 2 i t  and  2 / (1 + z_k) = 1 + i t,
    computed in float64 from t to avoid the cancellation in 1 - z_k and 1 + z_k.

    With ``keep_half`` nothing depends on the parity of L (a symbolic L under torch.compile /
    torch.export): k = L/2 is kept, and it and k = 0 (computed apart, in complex128) get t = 1 (s = 2i, away
    from the poles), a finite placeholder that the caller replaces.
    """
    k = torch.arange(M, dtype=torch.float64, device=device)
    if keep_half:
        t = torch.where((2 * k == L) | (k == 0), 1.0, torch.tan(math.pi * k / L))
    else:
        if L % 2 == 0:
            k = k[k != L // 2]
        t = torch.tan(math.pi * k / L)
    s = torch.complex(torch.zeros_like(t), 2 * t)
    factor = torch.complex(torch.ones_like(t), t)
    return s.to(dtype), factor.to(dtype)


def _woodbury(r: torch.Tensor, Ch: int) -> torch.Tensor:
    """C~ (D + P Q^*)^{-1} B from the Cauchy products r (Ch+R, 1+R, H, M) (rows: C~, Q^*; columns: B, P).

        k00 - k01 (I + k11)^{-1} k10,
        k00 = C~ D^{-1} B,  k01 = C~ D^{-1} P,  k10 = Q^* D^{-1} B,  k11 = Q^* D^{-1} P
    """
    R = r.shape[0] - Ch
    k00 = r[:Ch, 0]  # (Ch, H, M)
    if R == 0:
        return k00
    k01, k10, k11 = r[:Ch, 1:], r[Ch:, 0], r[Ch:, 1:]  # (Ch, R, H, M), (R, H, M), (R, R, H, M)
    if R == 1:
        return k00 - k01[:, 0] * (k10[0] / (1 + k11[0, 0]))
    eye = torch.eye(R, dtype=r.dtype, device=r.device)
    lhs = eye + k11.permute(2, 3, 0, 1)  # (H, M, R, R)
    sol = small_solve(lhs, k10.permute(1, 2, 0).unsqueeze(-1)).squeeze(-1)  # (H, M, R)
    return k00 - (k01 * sol.permute(2, 0, 1)).sum(1)


#: Features per step of the series kernel: the float64 Vandermonde series of a chunk take about this many
#: bytes.
SERIES_CHUNK_BYTES = 32 * 2**20

#: ``dplr_kernel``'s methods for the bilinear kernel: "cauchy" (C~ and the Cauchy products at the roots of
#: unity), "series" (power series, no C~), "auto" (the series where it applies, on the CPU).
METHODS = ("auto", "cauchy", "series")


def resolve_method(method: str, *, disc: str, conj_pairs: bool, rank: int, c_tilde: bool, L: int,
                   backend: str, device: torch.device) -> str:
    """``dplr_kernel``'s method for these arguments, "series" or "cauchy" (``METHODS``): "auto" takes the
    series where it applies (bilinear, conjugate pairs, rank <= 1, true C, a concrete L) on the CPU with
    ``backend="auto"`` outside ``torch.compile`` / ``torch.export`` / ``torch.func``."""
    method = check_choice("method", method, METHODS)
    series_ok = disc == "bilinear" and conj_pairs and rank <= 1 and not c_tilde and not traced_size(L)
    if method == "series" and not series_ok:
        raise ValueError("method='series' needs disc='bilinear', conj_pairs=True, rank R <= 1 (P of shape "
                         f"(R, H, N)), c_tilde=False and a concrete L; got disc={disc!r}, "
                         f"conj_pairs={conj_pairs}, R={rank}, c_tilde={c_tilde}")
    if method == "auto":
        on_cpu = torch.device(device).type == "cpu"
        return "series" if series_ok and backend == "auto" and on_cpu and not tracing() else "cauchy"
    return method


def _series_kernel(Lambda: Tensor, P: Tensor, Q: Tensor, B: Tensor, C: Tensor, dt: Tensor, L: int) -> Tensor:
    """The bilinear conjugate-pair kernel of rank R <= 1 as truncated power series (``dplr_kernel``,
    method "series"): Lambda, B (H, N), P, Q (R, H, N), C (Ch, H, N), dt (H,) -> K (Ch, H, L).

    With D(z) = (1 - z) - (1 + z) dt/2 Lambda diagonal and Woodbury on D(z) + (1 + z) dt/2 P Q^*,

        sum_k K_k z^k = C (I - z Ab)^{-1} Bb = 2 (S_CB - (1 + z) S_CP S_QB / (1 + (1 + z) S_QP)),
        S_xy(z) = sum_n x_n y_n e_n / (1 - mu_n z) = sum_k (sum_n x_n y_n e_n mu_n^k) z^k,

    mu = (1 + dt/2 Lambda) / (1 - dt/2 Lambda) and e = dt/2 / (1 - dt/2 Lambda): the first L coefficients
    of four Vandermonde series (``vandermonde_pairs``, products in the input precision with powers formed in
    float64) and of one quotient of float64 series (``series_fraction``). No C~ = C (I - Ab^L), no dense
    power, no roots of unity; in float64 throughout for complex128 inputs.
    """
    cdtype = Lambda.dtype
    wide, rwide = torch.complex128, torch.float64
    out = rwide if cdtype == wide else torch.float32
    Lw, Pw, Qw, Bw, Cw = (t.to(wide) for t in (Lambda, P, Q, B, C))
    # the diagonal part's bilinear discretization: mu, and dt y / (1 - dt/2 Lambda) = 2 e y for y = B, P
    mu, BPd = discretize_diag(Lw, torch.cat([Bw[None], Pw]), dt.to(rwide), "bilinear")  # (1+R, H, N)
    mu, Bd, Pd = mu[0], BPd[0] / 2, BPd[1:] / 2  # mu (H, N); e B, e P
    Ch, R = C.shape[0], P.shape[0]
    rows = [Cw * Bd]  # S_CB: (Ch, H, N)
    if R:
        rows += [Cw * Pd, Qw.conj() * Bd, Qw.conj() * Pd]  # S_CP (Ch), S_QB (1), S_QP (1)
    v = torch.cat(rows).to(cdtype)  # (E, H, N)
    H = v.shape[1]
    # features in chunks whose float64 series take about SERIES_CHUNK_BYTES: at long L the (E, H, L) series
    # of all features at once would be the largest tensor of the layer
    size = max(1, min(H, SERIES_CHUNK_BYTES // (v.shape[0] * L * 8)))
    parts = []
    for h in range(0, H, size):
        S = vandermonde_pairs(v[:, h:h + size], mu[h:h + size], L, rwide)  # (E, size, L) float64
        if not R:
            parts.append((2 * S).to(out))
            continue
        S_CB, S_CP, S_QB, S_QP = S.split([Ch, Ch, 1, 1])  # one split: its backward is one concatenation
        d = _one_plus_z(S_QP[0]) + torch.nn.functional.pad(S.new_ones(1), (0, L - 1))  # 1 + (1 + z) S_QP
        # S_QB copied: the fraction keeps it for its backward, and a view would keep all of S alive
        parts.append((2 * (S_CB - series_fraction(_one_plus_z(S_CP), S_QB[0].clone(), d))).to(out))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _one_plus_z(s: Tensor) -> Tensor:
    """(1 + z) s mod z^L of series s (..., L)."""
    return s + torch.nn.functional.pad(s[..., :-1], (1, 0))


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
    c_tilde: bool = False,
    method: str = "auto",
) -> torch.Tensor:
    """Convolution kernel of a diagonal-plus-low-rank (DPLR) SSM: the S4 kernel.

    The state matrix of feature h is A_h = diag(Lambda_h) - sum_r P[r, h] Q[r, h]^*, discretized with step
    dt_h into (Ab_h, Bb_h) (``ssm.discretize``), and

        K[h, k] = Re(sum_n C[h, n] (Ab_h^k Bb_h)[n]),        k = 0, ..., L - 1.

    ``disc="bilinear"`` with ``method="cauchy"`` is the S4 algorithm (S4 paper, Alg. 1 and Sec. 3.3); the
    power-series method, the CPU default, follows below. ``C`` is the true C; the Cauchy method forms
    C~ = C (I - Ab^L) (dense Ab^L by repeated squaring, O(H N^3 log L)) so that the truncated generating
    function is exact,

        sum_{k<L} C Ab^k Bb z^k = C~ (I - Ab z)^{-1} Bb = 2 / (1 + z) C~ (g(z) - A)^{-1} B,
        g(z) = 2 / dt (1 - z) / (1 + z),

    evaluates it at the L-th roots of unity z = exp(-2 pi i k / L) (at z = -1 directly: dt/2 C~ B) through
    the Woodbury identity with D = g(z) - diag(Lambda):

        (D + P Q^*)^{-1} = D^{-1} - D^{-1} P (I + Q^* D^{-1} P)^{-1} Q^* D^{-1},

    where every term u^T D^{-1} v is one Cauchy product ``cauchy(dt u v, dt g(z), dt Lambda)``, and takes
    an inverse FFT. Cost O(H N L) for the Cauchy products (``backend``) plus the dense O(H N^3 log L).

    Precision: only the O(H N L) Cauchy products at z != 1 run in the input precision. C~ (Ab^L of a
    matrix whose eigenvalues approach 1 as dt Lambda -> 0, non-normal for HiPPO), the Woodbury solves
    of rank R >= 2 (I + Q^* D^{-1} P nearly singular for legt) and the whole z = 1 term (s_0 = 0, so
    the denominators s_0 - dt Lambda vanish with Lambda, e.g. fout's zero eigenvalue clamped to -1e-4,
    and the Woodbury step cancels terms ~ 1 / |dt Lambda|) are computed in complex128 and rounded
    once: in complex64 these steps cost up to 1e-2 relative error.

    ``method="series"`` (bilinear, ``conj_pairs``, rank R <= 1, true C) computes the same kernel without
    C~ and without roots of unity, as the first L coefficients of power series (``_series_kernel``): four
    Vandermonde series (the S4D kernel's work, four times) and one quotient of float64 series by FFTs,
    O(H N L + H L log L); on the CPU it costs a fraction of the Cauchy method's (benchmarks/s4_cost.py).
    ``method="auto"`` takes it where it applies on the CPU, with ``backend="auto"`` (an explicit backend
    names a Cauchy backend) and outside ``torch.compile`` / ``torch.export`` / ``torch.func``; else the
    Cauchy method (``"cauchy"``) described above.

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
        c_tilde: (bilinear) ``C`` is already C~ = C (I - Ab^L) for this L, as trained by the official S4:
            the O(H N^3 log L) power is skipped.
        method: (bilinear) ``"auto"``, ``"cauchy"`` or ``"series"`` (see above; "series" needs
            ``conj_pairs``, R <= 1, ``c_tilde=False`` and a concrete L).

    Returns:
        K: (H, L), or (Ch, H, L) for a 3-d C; real, float32 for complex64 inputs and float64 for
        complex128. Differentiable in Lambda, P, Q, B, C and dt.
    """
    H, N, L = check_kernel_args(Lambda, B, C, dt, L, disc, backend)
    check_tensor("P", P, ndim=3)
    check_shape("P", P, (None, H, N), "(R, H, N) with (H, N) like Lambda")
    if Q is None:
        Q = P
    check_tensor("Q", Q, ndim=3)
    check_shape("Q", Q, tuple(P.shape), "(R, H, N) like P")
    if not isinstance(conj_pairs, bool):
        raise ValueError(f"conj_pairs must be a bool; got {conj_pairs!r}")
    if c_tilde and disc != "bilinear":
        raise ValueError(f"c_tilde needs disc='bilinear' (C~ belongs to the Cauchy form); got disc={disc!r}")
    method = resolve_method(method, disc=disc, conj_pairs=conj_pairs, rank=P.shape[0], c_tilde=c_tilde, L=L,
                            backend=backend, device=Lambda.device)

    cdtype = complex_dtype(Lambda, P, Q, B, C, dt)
    Lambda, P, Q, B, C = (t.to(cdtype) for t in (Lambda, P, Q, B, C))
    rdtype = dt.new_empty(0, dtype=cdtype).real.dtype
    dt = dt.to(rdtype)
    squeeze = C.ndim == 2
    C = C.unsqueeze(0) if squeeze else C  # (Ch, H, N)
    Ch = C.shape[0]

    full = expand_pairs if conj_pairs else (lambda t: t)

    if disc == "zoh":
        Af = dplr_dense(full(Lambda), full(P), full(Q))  # (H, Nf, Nf)
        # The exponential is taken in complex128: in complex64, matrix_exp of a stiff non-normal matrix
        # (HiPPO-LegS, |dt A| ~ 1e2) loses ~1e-4 relative accuracy, 100x the rest of the computation.
        wide = torch.complex128
        Ab, Bb = _discretize_dense(Af.to(wide), full(B).to(wide), dt.to(torch.float64), "zoh")
        K = dense_kernel(DenseSystem(Ab.to(cdtype), Bb.to(cdtype), full(C)), L).real
        return K[0] if squeeze else K

    if method == "series":
        K = _series_kernel(Lambda, P, Q, B, C, dt, L)
        return K[0] if squeeze else K

    # Everything but the O(H N L) Cauchy products runs in complex128 and is rounded once (see Precision).
    wide, rwide = torch.complex128, torch.float64
    Lw, Pw, Qw, Bw, Cw = (t.to(wide) for t in (Lambda, P, Q, B, C))
    dtw = dt.to(rwide)
    if c_tilde:
        Ctw = full(Cw)
    elif conj_pairs:
        # Ab is conjugate-symmetric, [[A1, A2], [conj A2, conj A1]]: its powers are taken as the real matrix
        # acting on [Re x, Im x] (float64 at half the cost of complex64), with the row C~ -> [2 Re, -2 Im].
        Ar = to_real_coords(bilinear_dense(full(Lw), full(Pw), full(Qw), dtw))
        Cr = _row_power(torch.cat([2 * Cw.real, -2 * Cw.imag], -1), Ar, L)  # C Ab^L, (Ch, H, 2N)
        Ctw = full(Cw - torch.complex(Cr[..., :N], -Cr[..., N:]) / 2)  # C~ = C (I - Ab^L), (Ch, H, Nf)
    else:
        Cf = full(Cw)
        Ctw = Cf - _row_power(Cf, bilinear_dense(Lw, Pw, Qw, dtw), L)  # C~ = C (I - Ab^L), (Ch, H, Nf)
    M = L // 2 + 1 if conj_pairs else L
    # Under torch.compile / torch.export (L may be symbolic) the conjugate-pair frequencies k <= L/2 are
    # taken whatever the parity of L, and z = 1 and z = -1 (k = L/2, even L) are put in place by selects
    # (no slice of a symbolic size, which could be 1 and would then be specialized).
    traced = conj_pairs and traced_size(L)
    s, factor = _bilinear_freqs(L, M, wide, Lambda.device, keep_half=traced)
    first = 0 if traced else 1  # the first frequency of the input-precision Cauchy products

    def products(Ct, Q, B, P, Lambda, dt):
        left = torch.cat([Ct[..., :N], Q.conj()], dim=0)  # (Ch+R, H, N)
        right = torch.cat([B.unsqueeze(0), P], dim=0)  # (1+R, H, N)
        dtc = dt.to(Lambda.dtype).unsqueeze(-1)  # (H, 1)
        v = left.unsqueeze(1) * right.unsqueeze(0) * dtc  # (Ch+R, 1+R, H, N)
        return full(v), full(dtc * Lambda)

    # z = 1 (k = 0) in complex128: there s_0 = 0 and the denominators s_0 - dt Lambda vanish with Lambda.
    v, w = products(Ctw, Qw, Bw, Pw, Lw, dtw)
    s0, f0 = (s.new_zeros(1), factor.new_ones(1)) if traced else (s[:1], factor[:1])
    khat = _woodbury(cauchy(v, s0, w, backend="naive"), Ch) * f0  # (Ch, H, 1)
    if traced or s.shape[0] > 1:
        v, w = products(Ctw.to(cdtype), Q, B, P, Lambda, dt)
        r = cauchy(v, s[first:].to(cdtype), w, backend=backend)  # (Ch+R, 1+R, H, M'-first)
        # Rank 1 keeps the input precision; the rank >= 2 solve (legt) loses ~1e-3 in complex64.
        r = r.to(wide) if P.shape[0] > 1 else r
        rest = _woodbury(r, Ch) * factor[first:].to(r.dtype)
        if traced:
            khat = torch.where(torch.arange(M, device=khat.device) == 0, khat, rest.to(wide))  # (Ch, H, M)
        else:
            khat = torch.cat([khat, rest.to(wide)], dim=-1)  # (Ch, H, M')
    if traced or L % 2 == 0:
        # z = -1: (I + Ab)^{-1} Bb = dt/2 B for any A, so the generating function there is dt/2 C~ B.
        nyq = (Ctw * full(Bw)).sum(-1) * dtw / 2  # (Ch, H)
        if conj_pairs:
            nyq = nyq.real.to(wide)
        if traced:
            half = 2 * torch.arange(M, device=khat.device) == L  # k = L/2: never true for odd L
            khat = torch.where(half, nyq.unsqueeze(-1), khat)
        else:
            khat = torch.cat([khat[..., : L // 2], nyq.unsqueeze(-1), khat[..., L // 2 :]], dim=-1)
    khat = khat.to(cdtype)
    if traced:
        # The full Hermitian spectrum by an index and a complex ifft: irfft of the L // 2 + 1 terms would
        # guard on a divisibility of L // 2 that a symbolic L cannot prove.
        j = torch.arange(L, device=khat.device)
        mirror = j > L // 2
        khat = khat[..., torch.where(mirror, L - j, j)]  # (Ch, H, L)
        K = torch.fft.ifft(torch.where(mirror, khat.conj(), khat), n=L).real
        return K[0] if squeeze else K
    K = torch.fft.irfft(khat, n=L) if conj_pairs else torch.fft.ifft(khat, n=L).real
    return K[0] if squeeze else K


# ---- the family verbs on the layer's storage: conjugate-pair half storage, N/2 complex modes ----
#
# The real N-state system is the half (Lambda, P, B, C) with its conjugates appended. Its state in half
# storage is x (B, H, N/2) complex (the full state is [x, conj(x)]); in real coordinates it is
# [Re x, Im x] (B, H, N), where the discrete matrices are real: ``real_system``.


@dataclass(frozen=True)
class DPLRSystem:
    """A discrete DPLR system in conjugate-pair half storage (what ``ssm.S4.discrete_system`` returns).

    Fields:
        Lambda: (H, N/2) complex, P: (R, H, N/2), B: (H, N/2), C: (Ch, H, N/2): the continuous system
            A = diag(Lambda) - P P^* with the conjugate modes appended.
        dt: (H,) step; disc: ``"bilinear"`` or ``"zoh"``.
        D0: (H, N/2) = 1 - dt/2 Lambda and Ginv: (H, R, R) = (I_R + dt/2 P^* D0^{-1} P)^{-1}, the constants
            of the Woodbury step (bilinear).
        dense: (computed on first use, then kept) the same discrete system in real coordinates
            [Re x, Im x], a ``DenseSystem`` with Ab (H, N, N), Bb (H, N), C (Ch, H, N), real; the free
            response, the final state, and the zoh step and kernel use it. It is formed in float64 from the
            dense full A (an O(H N^3) solve or matrix exponential) and rounded once.
    """

    Lambda: Tensor
    P: Tensor
    B: Tensor
    C_in: Tensor
    dt: Tensor
    disc: str
    D0: Tensor
    Ginv: Tensor
    L_tilde: int = 0

    @property
    def C(self) -> Tensor:
        """The true output vectors (Ch, H, N/2). With ``L_tilde`` (``C_in`` is C~ = C (I - Ab^L_tilde), the
        official S4's parametrization), C = C~ (I - Ab^L_tilde)^{-1}: a float64 solve on first use, kept."""
        if not self.L_tilde:
            return self.C_in
        cached = self.__dict__.get("_C")
        if cached is None:
            Ar = to_real_coords(bilinear_dense(expand_pairs(self.Lambda).to(torch.complex128),
                                               *(expand_pairs(self.P).to(torch.complex128),) * 2,
                                               self.dt.to(torch.float64)))  # (H, N, N)
            eye = torch.eye(Ar.shape[-1], dtype=Ar.dtype, device=Ar.device)
            Ct = self.C_in.to(torch.complex128)
            rows = torch.cat([Ct.real, -Ct.imag], dim=-1)  # C~ in real coordinates (halved)
            # rows = Cr (I - Ar^L) with Cr = [Re C, -Im C]: solve (I - Ar^L)^T Cr^T = rows^T.
            M = (eye - torch.linalg.matrix_power(Ar, self.L_tilde)).mT  # (H, N, N)
            Cr = torch.linalg.solve(M, rows.permute(1, 2, 0)).permute(2, 0, 1)  # (Ch, H, N)
            n = Cr.shape[-1] // 2
            cached = torch.complex(Cr[..., :n], -Cr[..., n:]).to(self.C_in.dtype)
            object.__setattr__(self, "_C", cached)
        return cached

    @property
    def dense(self) -> DenseSystem:
        # Kept in the instance's __dict__ by hand: functools.cached_property takes a lock (Python < 3.12),
        # which torch.compile cannot trace.
        cached = self.__dict__.get("_dense")
        if cached is None:
            cached = self._real_dense()
            object.__setattr__(self, "_dense", cached)
        return cached

    def _real_dense(self) -> DenseSystem:
        wide = torch.complex128
        Lf, Pf = expand_pairs(self.Lambda).to(wide), expand_pairs(self.P).to(wide)
        Br = real_state(self.B.to(wide))  # (H, N)
        dt = self.dt.to(torch.float64)
        if self.disc == "bilinear":
            # Ab by the Woodbury identity, O(H N^2 R); (I - dt/2 A)^{-1} = (Ab + I) / 2, so
            # Bb = dt (I - dt/2 A)^{-1} B = dt/2 (Ab + I) B.
            Ab = to_real_coords(bilinear_dense(Lf, Pf, Pf, dt))
            Bb = dt[:, None] / 2 * (Br + (Ab @ Br.unsqueeze(-1)).squeeze(-1))
        else:
            Ab, Bb = _discretize_dense(to_real_coords(dplr_dense(Lf, Pf, Pf)), Br, dt, self.disc)
        Cr = torch.cat([2 * self.C.real, -2 * self.C.imag], dim=-1)  # y = 2 Re(C x) = Cr [Re x, Im x]
        real = self.dt.dtype
        return DenseSystem(Ab.to(real), Bb.to(real), Cr.to(real))


def pair_inner(a: Tensor, x: Tensor) -> Tensor:
    """a_full^* x_full for conjugate-symmetric vectors in half storage: 2 Re(sum_n conj(a_n) x_n)."""
    return 2 * torch.einsum("...n,...n->...", a.conj(), x).real


def to_real_coords(M: Tensor) -> Tensor:
    """The real (..., N, N) matrix acting on [Re x, Im x] like the conjugate-symmetric complex M (..., N, N)
    acts on [x, conj(x)] (M = [[M11, M12], [conj(M12), conj(M11)]] in blocks of N/2)."""
    n = M.shape[-1] // 2
    S, Dm = M[..., :n, :n] + M[..., :n, n:], M[..., :n, :n] - M[..., :n, n:]
    top = torch.cat([S.real, -Dm.imag], dim=-1)
    bottom = torch.cat([S.imag, Dm.real], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def real_state(x: Tensor) -> Tensor:
    """Half-storage state (..., N/2) complex -> real coordinates [Re x, Im x] (..., N)."""
    return torch.cat([x.real, x.imag], dim=-1)


def complex_state(xr: Tensor) -> Tensor:
    """Inverse of ``real_state``."""
    n = xr.shape[-1] // 2
    return torch.complex(xr[..., :n], xr[..., n:])


def discretize(
    Lambda: Tensor, P: Tensor, B: Tensor, C: Tensor, dt: Tensor, disc: str = "bilinear", *, L_tilde: int = 0
) -> DPLRSystem:
    """The discrete system of S4's half storage: Lambda, B (H, N/2), P (R, H, N/2), C (Ch, H, N/2), dt (H,).
    With ``L_tilde`` > 0 (bilinear only), C is C~ = C (I - Ab^L_tilde) (see ``DPLRSystem.C``).

    Bilinear: x_k = (I - dt/2 A)^{-1} [(I + dt/2 A) x_{k-1} + dt B u_k]; zoh: Ab = exp(dt A), dense. The
    real-coordinate dense form (``DPLRSystem.dense``) is formed on first use only.
    """
    check_choice("disc", disc, ("bilinear", "zoh"))
    check_tensor("Lambda", Lambda, ndim=2)
    H, N2 = Lambda.shape
    check_tensor("P", P, ndim=3)
    check_shape("P", P, (None, H, N2), "(R, H, N/2) like Lambda")
    check_tensor("B", B)
    check_shape("B", B, (H, N2), "(H, N/2) like Lambda")
    check_tensor("C", C, ndim=3)
    check_shape("C", C, (None, H, N2), "(Ch, H, N/2) like Lambda")
    check_tensor("dt", dt)
    check_shape("dt", dt, (H,), "(H,)")
    real = dt.dtype
    dtc = dt[:, None]
    D0 = 1 - dtc / 2 * Lambda  # (H, N/2)
    R = P.shape[0]
    eye = torch.eye(R, dtype=real, device=dt.device)
    G = eye + dtc[:, :, None] / 2 * pair_inner(P[:, None], (P / D0)[None]).permute(2, 0, 1)  # (H, R, R)
    if L_tilde and disc != "bilinear":
        raise ValueError(f"L_tilde needs disc='bilinear'; got disc={disc!r}")
    return DPLRSystem(Lambda, P, B, C, dt, disc, D0, torch.linalg.inv(G), int(L_tilde))


def kernel(sys: DPLRSystem, L: int, *, backend: str = "auto") -> Tensor:
    """The convolution kernel (Ch, H, L): ``dplr_kernel`` (Cauchy + Woodbury) for bilinear; for zoh the
    two-level Krylov taps of the real-coordinate dense system (``ssm.systems.dense.kernel``). With
    ``L_tilde`` and L <= L_tilde, the first L taps of the length-L_tilde kernel from C~ (no power)."""
    if sys.disc == "zoh":
        return dense_kernel(sys.dense, L)
    if sys.L_tilde and L <= sys.L_tilde and not traced_size(L):
        # C~ of L_tilde: the kernel of that length with no power, its first L taps (exact).
        return dplr_kernel(sys.Lambda, sys.P, sys.B, sys.C_in, sys.dt, sys.L_tilde, disc="bilinear",
                           conj_pairs=True, backend=backend, c_tilde=True)[..., :L]
    return dplr_kernel(sys.Lambda, sys.P, sys.B, sys.C, sys.dt, L, disc="bilinear", conj_pairs=True,
                       backend=backend)


def step(sys: DPLRSystem, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """One step: x (B, H, N/2) complex, u (B, H) -> (y (B, Ch, H) real, next x).

    Bilinear, O(N R): v = (I + dt/2 A) x + dt B u with A x = Lambda x - P (P^* x), then (I - dt/2 A)^{-1} v
    by the Woodbury identity D0^{-1} v - D0^{-1} U G^{-1} V^* D0^{-1} v with U = dt/2 P, V = P.
    Zoh: the real-coordinate dense step, O(N^2) real.
    """
    if sys.disc == "zoh":
        y, xr = dense_step(sys.dense, real_state(x), u)
        return y, complex_state(xr)
    Lambda, P, B, C, dt = sys.Lambda, sys.P, sys.B, sys.C, sys.dt[:, None]
    x = x.to(Lambda.dtype)
    s = pair_inner(P[:, None], x[None])  # (R, B, H)
    Ax = Lambda * x - torch.einsum("rhn,rbh->bhn", P, s.to(P.dtype))
    v = x + dt / 2 * Ax + dt * B * u[..., None].to(B.dtype)
    w = v / sys.D0
    coef = torch.einsum("hrs,sbh->hrb", sys.Ginv, pair_inner(P[:, None], w[None]))  # (H, R, B)
    x = w - dt / 2 * torch.einsum("rhn,hrb->bhn", P / sys.D0, coef.to(P.dtype))
    return 2 * torch.einsum("chn,bhn->bch", C, x).real, x


def prepare_step(sys: DPLRSystem) -> PairStep | DenseSystem:
    """The constants of ``step``, computed once per system (``ssm.layers.LTILayer`` caches them).

    Bilinear: the Woodbury step folded into one low-rank correction. With E = (1 + dt/2 Lambda) / D0,
    Pd = dt/2 P / D0, Bd = dt B / D0 and G = I + P^* Pd (so I - G^{-1} (G - I) = G^{-1}),

        c = G^{-1} [P^* (2 / D0) x + P^* Bd u],    x_k = E x_{k-1} + Bd u - Pd c,

    a ``PairStep`` (P^* v = 2 Re(sum conj(P) v) over the pairs). Zoh: the real-coordinate dense system.
    """
    if sys.disc == "zoh":
        return sys.dense
    P, dt = sys.P, sys.dt[:, None]
    Dinv = 1 / sys.D0  # (H, N/2)
    Pd = dt / 2 * P * Dinv  # (R, H, N/2)
    Bd = dt * sys.B * Dinv  # (H, N/2)
    Ginv = sys.Ginv.to(P.dtype)  # (H, R, R)
    W = torch.einsum("hrq,qhn->rhn", Ginv, P.conj()) * (2 * Dinv)  # (R, H, N/2): c = 2 Re(W x) + h u
    h = torch.einsum("hrq,qh->rh", sys.Ginv, pair_inner(P, Bd[None]))  # (R, H)
    Q = torch.view_as_real(torch.cat([Bd[None], -Pd], dim=0))  # (1+R, H, N/2, 2)
    return PairStep(2 * Dinv - 1, real_rows(W), h, Q.flatten(-2), *output_rows(sys.C))


def step_prepared(c: PairStep | DenseSystem, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """``step(sys, x, u)`` from ``prepare_step(sys)``: the same update, in real arithmetic."""
    if isinstance(c, DenseSystem):
        y, xr = dense_step(c, real_state(x), u)
        return y, complex_state(xr)
    return pair_step(c, x, u)


# ---- the real route (ONNX export: no complex type; docs/deployment.md) ----


def prepare_real_step(c: PairStep | DenseSystem) -> PairStep | DenseSystem:
    """``prepare_step``'s constants in real tensors only (bilinear: E as planes; zoh: already real)."""
    return c if isinstance(c, DenseSystem) else diag.prepare_real_step(c)


def real_step(c: PairStep | DenseSystem, xr: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """``step_prepared`` in real arithmetic on the real state of ``to_real_state``."""
    if isinstance(c, DenseSystem):
        return dense_step(c, xr, u)
    return diag.real_step(c, xr, u)


def to_real_state(c: PairStep | DenseSystem, x: Tensor) -> Tensor:
    """x (B, H, N/2) complex -> the real state of ``real_step``: [Re x, Im x] (zoh), the planes (bilinear)."""
    return real_state(x).to(c.Ab.dtype) if isinstance(c, DenseSystem) else diag.to_real_state(c, x)


def from_real_state(c: PairStep | DenseSystem, xr: Tensor) -> Tensor:
    """Inverse of ``to_real_state``."""
    return complex_state(xr) if isinstance(c, DenseSystem) else diag.from_real_state(c, xr)


def free_response(sys: DPLRSystem, x0: Tensor, L: int) -> Tensor:
    """Zero-input response y_k = C Ab^{k+1} x0 (B, Ch, H, L) of the half-storage state x0 (B, H, N/2): the
    dense free response in real coordinates (a per-feature basis applied to the batch by one product)."""
    return dense_free_response(sys.dense, real_state(x0), L)


def final_state(sys: DPLRSystem, u: Tensor, x0: Tensor | None = None) -> Tensor:
    """State (B, H, N/2) complex after the chunk u (B, H, L) from x0 (None: zeros), in real coordinates."""
    xr = dense_final_state(sys.dense, u.to(sys.dense.Ab.dtype), None if x0 is None else real_state(x0))
    return complex_state(xr)


def states_at(sys: DPLRSystem, u: Tensor, ends: list[int], x0: Tensor | None = None) -> dict[int, Tensor]:
    """{e: the state (B, H, N/2) after u[..., :e]} for several prefixes at once, in real coordinates."""
    d = sys.dense
    out = scan_states_at(d.Ab, d.Bb, u.to(d.Ab.dtype), ends, None if x0 is None else real_state(x0))
    return {e: complex_state(x) for e, x in out.items()}


def transfer_function(sys: DPLRSystem) -> tuple[Tensor, Tensor]:
    """Transfer-function coefficients of the real N-state system (``ssm.transfer.ssm_to_rtf`` of the
    real-coordinate dense form), float64: b (Ch, H, N+1) (b_0 = C Bb included) and a (H, N)."""
    from ..transfer import ssm_to_rtf  # deferred: ssm.transfer imports the RTF family of this package

    Ab, Bb, C = (t.double() for t in sys.dense)
    Ch = C.shape[0]
    b, a = ssm_to_rtf(Ab.expand(Ch, *Ab.shape), Bb.expand(Ch, *Bb.shape), C, real=True)
    return b, a[0]
