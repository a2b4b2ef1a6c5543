"""HiPPO transition matrices, their normal-plus-low-rank (NPLR) forms and the S4D diagonal initializations.

Continuous system (LegS is time-varying: x'(t) = (1/t) (A x(t) + B u(t))):

    x'(t) = A x(t) + B u(t),        A (N, N),  B (N,)

Measures returned by :func:`transition` (HiPPO paper, Gu et al. 2020; S4, Gu et al. 2022; "How to Train
Your HiPPO", Gu et al. 2023). P_n is the Legendre polynomial, L_n the Laguerre polynomial.

``"legt"``  translated Legendre, window 1, in the LMU form:
            A_nk = -(2n+1) * (1 if n < k else (-1)^(n-k)),   B_n = (2n+1) (-1)^n,
            and u(t - r) ~ sum_n x_n(t) P_n(2r - 1) for r in [0, 1]
            (x_n is the shifted-Legendre coefficient (2n+1) int_0^1 u(t - r) P_n(2r - 1) dr).
``"legs"``  scaled Legendre (the time-varying system above, over the whole history [0, t]):
            A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k),  -(n+1) (n = k),  0 (n < k);   B_n = sqrt(2n+1),
            and u(s) ~ sum_n x_n(t) sqrt(2n+1) P_n(2s/t - 1) for s in [0, t].
``"lagt"``  translated Laguerre (beta = 1, the S4 form):  A = I/2 - tril(ones),  B = ones,
            and x_n(t) = int_0^inf u(t - s) L_n(s) e^{-s/2} ds exactly, so
            u(t - s) ~ sum_n x_n(t) L_n(s) e^{-s/2} for s >= 0 (orthonormal Laguerre functions).
``"fout"``  translated Fourier, window 1, N even. State n = 2j is the coefficient of
            g_{2j}(r) = sqrt(2) cos(2 pi j r) and state 2j+1 that of g_{2j+1}(r) = sqrt(2) sin(2 pi j r),
            j = 0 .. N/2 - 1 (g_0 = 1; g_1 = 0 is a placeholder state that keeps frequency 0 a conjugate
            pair, as in S4). With e = g(0) = (1, 0, sqrt2, 0, sqrt2, 0, ...) and J the rotation generator
            (J_{2j,2j+1} = -2 pi j, J_{2j+1,2j} = 2 pi j):
            A = J - 2 e e^T,  B = 2 e,   and u(t - r) ~ sum_n x_n(t) g_n(r) for r in [0, 1].
            The factor 2 comes from estimating the lagged input u(t-1) by the Fourier partial sum at the
            window's seam, which converges to (u(t) + u(t-1)) / 2 ("How to Train Your HiPPO", FouT).
            (S4's code uses the same matrices with time stretched by 2: A/2, B/2, window 2.)

NPLR form (:func:`nplr`): each A is unitarily similar to normal minus low rank,

    A_hat = V (diag(Lambda) - P P^*) V^*,     V unitary,

in an orthonormal basis A_hat = T^{-1} A T, B_hat = T^{-1} B with T = diag(:func:`nplr_basis`): T = I for
legs, lagt and fout, T = diag(sqrt(2n+1)) for legt (the LMU rows are scaled by 2n+1). The transfer function
is unchanged if C is replaced by C T. The normal part A_hat + P_r P_r^T (summed over r, P from
:func:`rank_correction`) is c I + S with S real skew-symmetric and c the mean of its diagonal; it is
diagonalized through the Hermitian matrix -i S (``eigh``) so V is unitary to rounding and Re(Lambda) = c
exactly (-1/2 for legs, 0 for legt, lagt and fout).
"""

from __future__ import annotations

import math

import torch

from ._checks import check_choice, check_int

__all__ = ["MEASURES", "DIAG_INITS", "transition", "rank_correction", "nplr_basis", "nplr", "diag_init"]

MEASURES = ("legt", "legs", "lagt", "fout")
DIAG_INITS = ("lin", "inv", "legs", "real")

# Rank of the correction P P^T that makes each measure's A_hat normal, and the constant diagonal c of the
# normal part A_hat + P^T P = c I + skew.
#: The rank of the low-rank correction of each measure (``rank_correction``).
RANKS = {"legt": 2, "legs": 1, "lagt": 1, "fout": 1}
_SHIFTS = {"legt": 0.0, "legs": -0.5, "lagt": 0.0, "fout": 0.0}


def _check_real_dtype(dtype: torch.dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a real floating torch.dtype; got {dtype!r}")
    return dtype


def _check_complex_dtype(dtype: torch.dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_complex:
        raise ValueError(f"dtype must be a complex torch.dtype; got {dtype!r}")
    return dtype


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool; got {value!r}")
    return value


def _fourier_endpoint(N: int) -> torch.Tensor:
    """e = g(0) for the FouT basis: (1, 0, sqrt2, 0, sqrt2, 0, ...)[:N], float64 (N,)."""
    e = torch.zeros(N, dtype=torch.float64)
    e[0::2] = math.sqrt(2.0)
    e[0] = 1.0
    return e


def transition(measure: str, N: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """HiPPO state matrices (A, B) of ``measure`` with N states (see the module docstring for the formulas).

    Args:
        measure: one of ``"legt"``, ``"legs"``, ``"lagt"``, ``"fout"``.
        N: state size, >= 1 (even for ``"fout"``: a truncated cos/sin pair breaks its dynamics).
        dtype: real floating dtype of the result (computed in float64).

    Returns:
        A (N, N) and B (N,) of x'(t) = A x(t) + B u(t) (for ``"legs"``: x'(t) = (1/t) (A x + B u)).
    """
    check_choice("measure", measure, MEASURES)
    N = check_int("N", N, 1)
    _check_real_dtype(dtype)
    if measure == "fout" and N % 2:
        raise ValueError(f"N must be even for measure 'fout' (cos/sin pairs); got {N}")
    n = torch.arange(N, dtype=torch.float64)
    row, col = n[:, None], n[None, :]
    if measure == "legt":
        r = 2 * n + 1
        sign = torch.where(row < col, torch.ones_like(row * col), (-1.0) ** (row - col))
        A = -r[:, None] * sign
        B = r * (-1.0) ** n
    elif measure == "legs":
        r = torch.sqrt(2 * n + 1)
        A = -torch.tril(r[:, None] * r[None, :], -1) - torch.diag(n + 1)
        B = r.clone()
    elif measure == "lagt":
        A = 0.5 * torch.eye(N, dtype=torch.float64) - torch.tril(torch.ones(N, N, dtype=torch.float64))
        B = torch.ones(N, dtype=torch.float64)
    else:  # fout
        e = _fourier_endpoint(N)
        freq = 2 * math.pi * torch.div(n, 2, rounding_mode="floor")  # 2 pi j for states 2j and 2j+1
        J = torch.zeros(N, N, dtype=torch.float64)
        even = torch.arange(0, N - 1, 2)
        J[even, even + 1] = -freq[even]
        J[even + 1, even] = freq[even]
        A = J - 2 * e[:, None] * e[None, :]
        B = 2 * e
    return A.to(dtype), B.to(dtype)


def rank_correction(measure: str, N: int, rank: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Low-rank term P (rank, N) with A_hat + sum_r P_r P_r^T normal (= c I + skew-symmetric).

    A_hat is A in the basis of :func:`nplr_basis` (A itself except for legt). Needed ranks: legs, lagt and
    fout 1, legt 2. A larger ``rank`` pads with zero rows (as S4 does); a smaller one raises ValueError.

        legs:  P_0 = sqrt(n + 1/2)                                 (A + P P^T = -I/2 + skew)
        legt:  P_0 = sqrt(2n+1) [n even],  P_1 = sqrt(2n+1) [n odd]  (A_hat + P P^T skew)
        lagt:  P_0 = sqrt(1/2) ones                                (A + P P^T skew)
        fout:  P_0 = sqrt(2) e,  e = (1, 0, sqrt2, 0, sqrt2, ...)    (A + P P^T = J skew)
    """
    check_choice("measure", measure, MEASURES)
    N = check_int("N", N, 1)
    rank = check_int("rank", rank, 1)
    _check_real_dtype(dtype)
    if measure == "fout" and N % 2:
        raise ValueError(f"N must be even for measure 'fout' (cos/sin pairs); got {N}")
    need = RANKS[measure]
    if rank < need:
        raise ValueError(f"rank must be >= {need} for measure {measure!r}; got {rank}")
    n = torch.arange(N, dtype=torch.float64)
    if measure == "legs":
        P = torch.sqrt(n + 0.5)[None]
    elif measure == "legt":
        r = torch.sqrt(2 * n + 1)
        even = (n % 2 == 0).to(torch.float64)
        P = torch.stack([r * even, r * (1 - even)])
    elif measure == "lagt":
        P = torch.full((1, N), math.sqrt(0.5), dtype=torch.float64)
    else:  # fout
        P = math.sqrt(2.0) * _fourier_endpoint(N)[None]
    if rank > need:
        P = torch.cat([P, torch.zeros(rank - need, N, dtype=torch.float64)])
    return P.to(dtype)


def nplr_basis(measure: str, N: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Diagonal d (N,) of the similarity T = diag(d) in which :func:`nplr` works.

    nplr decomposes A_hat = T^{-1} A T and B_hat = T^{-1} B; so A = T V (diag(Lambda) - P P^*) V^* T^{-1},
    B = T V B_eig, and a readout C of the original system becomes C T. d_n = sqrt(2n+1) for ``"legt"`` (the
    LMU form is not unitarily NPLR in its own basis), d = 1 for the other measures.
    """
    check_choice("measure", measure, MEASURES)
    N = check_int("N", N, 1)
    _check_real_dtype(dtype)
    if measure == "legt":
        return torch.sqrt(2 * torch.arange(N, dtype=torch.float64) + 1).to(dtype)
    return torch.ones(N, dtype=dtype)


def _phase_fix(V: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Rotate each column of V (N, M) by a unit phase so that V^* B is real and >= 0."""
    b = V.conj().T @ B.to(V.dtype)
    mag = b.abs()
    keep = mag > 1e-12 * B.norm().clamp_min(1e-300)
    phase = torch.where(keep, b / mag.clamp_min(1e-300), torch.ones_like(b))
    return V * phase[None, :]


def nplr(
    measure: str, N: int, rank: int = 1, *, half: bool = False, dtype: torch.dtype = torch.complex128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normal-plus-low-rank form of a HiPPO matrix: A_hat = V (diag(Lambda) - P P^*) V^*, V unitary.

    Here P P^* = sum_r P_r P_r^* over the rows of P (``P.T @ P.conj()``), an (M, M) matrix.

    With A_hat = T^{-1} A T, B_hat = T^{-1} B and T = diag(nplr_basis(measure, N)) (T = I except for legt)
    and P0 = rank_correction(measure, N, rank):

        A_hat + P0^T P0 = V diag(Lambda) V^*,   P = V^* P0 (per row),   B = V^* B_hat.

    Eigenvector phases are fixed so that B is real and nonnegative (stored as complex).

    Args:
        measure: one of ``"legt"``, ``"legs"``, ``"lagt"``, ``"fout"``.
        N: state size, >= 1 (even when ``half``).
        rank: rank of the correction, >= the measure's rank (legt 2, others 1); extra rows are zero.
        half: keep one eigenvalue of each conjugate pair, the one with Im(Lambda) >= 0 (a pair of
            eigenvalues on the real axis is kept once with a complex eigenvector). The half system stands
            for the full one with the conjugates appended: A_hat = 2 Re(V diag(Lambda) V^*) - P0^T P0, and
            a real C gives C V (N//2,) with the same transfer function when used with conjugate pairs
            (the kernel functions' ``conj_pairs=True``). Requires even N.
        dtype: complex dtype of the results (the decomposition is computed in complex128).

    Returns:
        Lambda (M,), P (rank, M), B (M,), V (N, M) with M = N, or N//2 when ``half``. Ordering: the
        eigenvalues are sorted by increasing imaginary part within the half with Im >= 0; the full form is
        that half followed by its conjugates (even N), or, for odd N, the eigenvalues on the real axis first
        (real eigenvectors) followed by the pairs (Im > 0 ascending, then their conjugates).
    """
    check_choice("measure", measure, MEASURES)
    N = check_int("N", N, 1)
    rank = check_int("rank", rank, 1)
    _check_bool("half", half)
    _check_complex_dtype(dtype)
    if half and N % 2:
        raise ValueError(f"N must be even when half=True (eigenvalues come in conjugate pairs); got {N}")
    A, B0 = transition(measure, N)
    d = nplr_basis(measure, N)
    A = A * d[None, :] / d[:, None]  # T^{-1} A T
    B0 = B0 / d  # T^{-1} B
    P0 = rank_correction(measure, N, rank)  # (rank, N)
    AN = A + P0.T @ P0
    c = _SHIFTS[measure]  # the mean of diag(AN), exact
    S = 0.5 * (AN - AN.T)
    sym = 0.5 * (AN + AN.T) - c * torch.eye(N, dtype=torch.float64)
    if float(sym.abs().max()) > 1e-10 * max(1.0, float(AN.abs().max())):
        raise RuntimeError(f"internal error: normal part of {measure!r} is not c I + skew")

    omega, U = torch.linalg.eigh(-1j * S.to(torch.complex128))  # S = U diag(i omega) U^*, omega ascending
    tol = 1e-9 * max(1.0, float(omega.abs().max()))
    pos = omega > tol
    neg = omega < -tol
    if int(pos.sum()) != int(neg.sum()):
        raise RuntimeError("internal error: eigenvalues of the skew part are not in conjugate pairs")
    V_pos = _phase_fix(U[:, pos], B0)
    w_pos = omega[pos]
    # Null space of S: a real orthonormal basis Z from the real and imaginary parts of its eigenvectors.
    U0 = U[:, ~(pos | neg)]
    m = U0.shape[1]
    if m:
        Zs, _, _ = torch.linalg.svd(torch.cat([U0.real, U0.imag], dim=1), full_matrices=False)
        Z = Zs[:, :m]
    else:
        Z = torch.zeros(N, 0, dtype=torch.float64)

    if m % 2 == 0:
        W = (Z[:, 0::2] + 1j * Z[:, 1::2]) / math.sqrt(2.0)  # (N, m/2); W and conj(W) orthonormal
        W = _phase_fix(W, B0)
        V_half = torch.cat([W, V_pos], dim=1)
        w_half = torch.cat([torch.zeros(m // 2, dtype=torch.float64), w_pos])
        if half:
            V, w = V_half, w_half
        else:
            V = torch.cat([V_half, V_half.conj()], dim=1)
            w = torch.cat([w_half, -w_half])
    else:
        Zc = _phase_fix(Z.to(torch.complex128), B0)
        V = torch.cat([Zc, V_pos, V_pos.conj()], dim=1)
        w = torch.cat([torch.zeros(m, dtype=torch.float64), w_pos, -w_pos])

    Lambda = c + 1j * w.to(torch.complex128)
    Vh = V.conj().T
    P = P0.to(torch.complex128) @ Vh.T  # (rank, M): row r is V^* P0_r
    B = Vh @ B0.to(torch.complex128)
    return Lambda.to(dtype), P.to(dtype), B.to(dtype), V.to(dtype)


def diag_init(
    init: str, N: int, *, half: bool = True, dtype: torch.dtype = torch.complex128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal state matrices of S4D ("On the Parameterization and Initialization of Diagonal SSMs").

    With n = 0 .. N//2 - 1 (one mode per conjugate pair):

        "lin"   (S4D-Lin)   Lambda_n = -1/2 + i pi n,                        B_n = 1
        "inv"   (S4D-Inv)   Lambda_n = -1/2 + i (N/pi) (N/(2n+1) - 1),       B_n = 1
        "legs"  (S4D-LegS)  Lambda, B = the diagonal part and B of nplr("legs", N, half=half)
        "real"  (S4D-Real)  Lambda_n = -(n+1),                               B_n = 1

    ``half=True`` returns N//2 modes standing for N states with the conjugates appended (used with the
    kernels' ``conj_pairs=True``); N must be even. ``half=False`` returns N modes: for lin and inv the
    N//2 modes followed by their conjugates (N even); for legs the full nplr("legs", N) diagonal (any N);
    for real the N distinct modes -(n+1), n = 0 .. N-1 (any N). For "real" with half=True the N//2 real
    modes -(n+1) are what S4's code uses: appending conjugates repeats each real mode, i.e. the same
    modes with C doubled.

    Returns:
        Lambda (M,), B (M,) of ``dtype``, with M = N//2 when ``half`` else N.
    """
    check_choice("init", init, DIAG_INITS)
    N = check_int("N", N, 1)
    _check_bool("half", half)
    _check_complex_dtype(dtype)
    if init == "legs":
        Lambda, _, B, _ = nplr("legs", N, half=half, dtype=dtype)
        return Lambda, B
    if init == "real" and not half:
        Lambda = -(torch.arange(N, dtype=torch.float64) + 1)
        return Lambda.to(dtype), torch.ones(N, dtype=dtype)
    if N % 2:
        raise ValueError(f"N must be even for init {init!r} (modes come in conjugate pairs); got {N}")
    n = torch.arange(N // 2, dtype=torch.float64)
    if init == "lin":
        Lambda = -0.5 + 1j * math.pi * n
    elif init == "inv":
        Lambda = -0.5 + 1j * (N / math.pi) * (N / (2 * n + 1) - 1)
    else:  # real, half
        Lambda = -(n + 1) + 0j
    if not half:
        Lambda = torch.cat([Lambda, Lambda.conj()])
    return Lambda.to(dtype), torch.ones(Lambda.shape[0], dtype=dtype)
