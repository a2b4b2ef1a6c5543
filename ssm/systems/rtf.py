"""The transfer-function family (RTF): H(z) = b(z) / a(z), state-free kernel, O(N) companion recurrence.

Pure functions of the coefficients; ``ssm.layers.RTF`` owns the parameters and calls these. The family
verbs act on an :class:`RTFSystem` (Ch numerators b (Ch, H, N+1) over one denominator a (H, N) per
feature): :func:`system`, :func:`kernel`, :func:`step`, :func:`free_response`, :func:`final_state`,
:func:`state_input`. The single-channel faces :func:`rtf_kernel`, :func:`rtf_step`, :func:`rtf_filter` take
b (H, N+1). The SSM <-> RTF conversions live in ``ssm.transfer``.

State convention (direct form II): w_k = u_k - sum_i a_i w_(k-i) is the all-pole part, shared by the
channels of a feature, y_k = sum_j b_j w_(k-j) each channel's output, and the state before step k is
x = (w_(k-1), ..., w_(k-N)), most recent first (zeros at the start).

States are float64 (complex128 for complex coefficients) whatever the coefficients' dtype, and everything
computed from or into a state (free response, final state, the step with a state) runs in that precision:
with poles near the unit circle the state w is large and the output depends on differences of its
entries, so a float32 state alone puts chunked streaming 1e-3 off one pass at pole radius 0.9999
(docs/rtf.md).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_positive, check_shape, check_tensor, traced_size
from ..ops.fftconv import next_fast_len

#: The family's tier (``ssm.systems``): linear time-invariant, so it adds kernel and free_response.
TIER = "lti"

STABLE_METHODS = ("reflection", "montel")

# rtf_kernel evaluates H in float64 on M = max(RTF_OVERSAMPLE * L, RTF_MIN_POINTS) points (rounded up to a
# fast length); the tilt r^(M + L - 1) = eps balances the damped truncation error r^M against the amplified
# rounding error eps r^-(L-1), both eps^(M / (M + L - 1)) <= eps^(4/5). Float32 (and lower) results need
# less: RTF_OVERSAMPLE_32 = 2 gives eps^(2/3) ~ 4e-11, far below float32 rounding, at half the FFT length.
RTF_OVERSAMPLE = 4
RTF_OVERSAMPLE_32 = 2
RTF_MIN_POINTS = 16

# stable_denominator keeps |k_m| <= 1 - STABLE_MARGIN_ULPS eps (reflection) and sum |a_i| <= 1 - that (N + 1)
# times (Montel), so that rounding never puts a pole on or outside the unit circle.
STABLE_MARGIN_ULPS = 4


def wrap(x: torch.Tensor, M: int) -> torch.Tensor:
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


def fft_any(x: torch.Tensor, n: int) -> torch.Tensor:
    """n-point DFT of ``x`` (zero-padded to n): a real FFT for real x, a full FFT for complex x."""
    return torch.fft.fft(x, n=n) if x.is_complex() else torch.fft.rfft(x, n=n)


def ifft_any(X: torch.Tensor, n: int, complex_out: bool) -> torch.Tensor:
    """Inverse of :func:`fft_any`."""
    return torch.fft.ifft(X, n=n) if complex_out else torch.fft.irfft(X, n=n)


def rtf_taps(num: torch.Tensor, den: torch.Tensor, L: int) -> torch.Tensor:
    """First L power-series coefficients of num(w) / den(w) (w = z^-1), state-free; see :func:`rtf_kernel`.

    Computed in float64 (complex128) whatever the input precision, returned in the promoted dtype.

    Args:
        num: (..., K, P) K numerators sharing one denominator per leading index.
        den: (..., Q) denominator with den[..., 0] = 1.
        L: number of taps, >= 1.

    Returns:
        (..., K, L), the promoted dtype of num and den.
    """
    dtype = torch.promote_types(num.dtype, den.dtype)
    work = torch.complex128 if dtype.is_complex else torch.float64
    num, den = num.to(work), den.to(work)
    over = RTF_OVERSAMPLE if dtype in (torch.float64, torch.complex128) else RTF_OVERSAMPLE_32
    if traced_size(L):
        # A symbolic L (dynamic under torch.compile / torch.export): M = over L + a constant that covers the
        # coefficients (no fold, no smooth rounding, neither of which has a symbolic form); the same bound.
        M = over * L + max(RTF_MIN_POINTS, num.shape[-1], den.shape[-1])
    else:
        M = next_fast_len(max(over * L, RTF_MIN_POINTS))
    log_r = math.log(torch.finfo(torch.float64).eps) / (M + L - 1)

    def tilted(x: torch.Tensor) -> torch.Tensor:  # x_j r^j, folded onto M points
        j = torch.arange(x.shape[-1], device=x.device, dtype=torch.float64)
        return wrap(x * torch.exp(log_r * j), M)

    spectrum = fft_any(tilted(num), M) / fft_any(tilted(den), M).unsqueeze(-2)
    taps = ifft_any(spectrum, M, work.is_complex)[..., :L]
    k = torch.arange(L, device=num.device, dtype=torch.float64)
    return (taps * torch.exp(-log_r * k)).to(dtype)


def check_coefficients(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def monic(a: torch.Tensor) -> torch.Tensor:
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
    amplified by at most r^-(L-1). With M = max(4L, 16) (rounded up to a 2,3,5-smooth length) and
    r^(M+L-1) = eps both are O(eps^(M/(M+L-1))) <= O(eps^(4/5)) relative to the kernel's scale, times the
    conditioning of the division on the circle, for every filter whose poles lie in the closed unit disc,
    whatever their radius (for L = 1 the tap is b_0 to rounding). The division always runs in float64
    (complex128): for float32 inputs it costs three float64 FFTs of length ~4L per channel, little beside
    the B-fold convolution, and the float32 kernel is then the exact response of the float32 coefficients
    rounded once (a float32 division would lose up to 2e-2 on N = 7 poles near 0.999, L = 72). Measured
    against scipy.signal.lfilter (tests/test_rtf.py), for stable random filters and pole pairs at radius
    0.999, N from 1 to L: <= 1e-12 relative in float64 and <= 1e-7 in float32 (a few float32 roundings;
    the same for seven poles of radius up to 0.999). The conditioning grows when many poles crowd the
    unit circle (sixteen poles of radius 0.9 to 0.999, L = 1000: ~1e-7 relative in float64), as does the
    sensitivity of such a kernel to its monomial coefficients. Poles outside the unit disc give growing
    kernels; accuracy holds while |pole|^M r^M stays small, i.e. up to |pole| ~ 1 + ln(1/eps) / (5 L);
    beyond it the result is wrong without warning, so a layer whose coefficients are unconstrained checks
    them with :func:`is_stable` (``ssm.layers.RTF``). A denominator whose monomial coefficients are so
    ill-conditioned that it vanishes to rounding on the circle (see :func:`ssm.transfer.ssm_to_rtf`)
    gives non-finite taps. Coefficient vectors longer than M are folded (summed mod M), which is the
    exact evaluation at the M-th roots of unity. (Power-series division by Newton's iteration,
    g <- g (2 - a g), is exact too and also needs FFTs of length ~L only, but it multiplies the rounding
    error by ~2 |a g|_1 per doubling: it overflows for a pole pair at 0.99 with L = 8192 in float64, so it
    is not used.)

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
        h: (H, L), the promoted dtype of b and a, float32 at least (float16 / bfloat16 inputs give
        float32), complex64 / complex128 for complex coefficients; computed in float64 / complex128.
    """
    b, a = check_coefficients(b, a)
    L = check_int("L", L, minimum=1)
    return rtf_taps(b.unsqueeze(-2), monic(a), L).squeeze(-2)


# ---------------------------------------------------------------------------------------------------------
# recurrent inference


def _check_state(state: torch.Tensor, Bsz: int, H: int, N: int) -> torch.Tensor:
    check_tensor("state", state, ndim=3)
    return check_shape("state", state, (Bsz, H, N), "(B, H, N)")


def _run_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Promoted dtype, float32 at least (states are kept in float32 or wider)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def state_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype of states and of everything computed with one: float64, or complex128 when any of
    ``tensors`` is complex (see the module docstring)."""
    return torch.complex128 if any(t.is_complex() for t in tensors) else torch.float64


def rtf_step(
    b: torch.Tensor, a: torch.Tensor, u_t: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the direct-form-II recurrence of H(z) = b(z) / a(z), O(N) per channel:

        w_t = u_t - sum_i a_i w_(t-i),    y_t = b_0 w_t + sum_i b_i w_(t-i),
        state = (w_(t-1), ..., w_(t-N))  ->  next_state = (w_t, ..., w_(t-N+1)).

    Args:
        b: (H, N+1), a: (H, N).
        u_t: (B, H) input at step t.
        state: (B, H, N) the last N values of w, most recent first (zeros at the start).

    Returns:
        y_t: (B, H) in the promoted dtype (float32 at least) and next_state: (B, H, N) in float64
        (complex128 for complex inputs), the precision it is computed in.
    """
    b, a = check_coefficients(b, a)
    H, N = a.shape
    check_tensor("u_t", u_t, ndim=2)
    if u_t.shape[1] != H:
        raise ValueError(f"u_t must have shape (B, H) with H = {H}; got {tuple(u_t.shape)}")
    _check_state(state, u_t.shape[0], H, N)
    dtype = _run_dtype(b, a, u_t, state)
    wide = state_dtype(b, a, u_t, state)
    b, a, u_t, state = b.to(wide), a.to(wide), u_t.to(wide), state.to(wide)
    w = u_t - (a * state).sum(-1)
    y = b[:, 0] * w + (b[:, 1:] * state).sum(-1)
    return y.to(dtype), torch.cat([w.unsqueeze(-1), state[..., :-1]], dim=-1) if N else state


def _prehistory(x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """c_k = sum_(m=0)^(N-1-k) x_(k+m) s_m for k = 0..N-1, x (H, N), state s (B, H, N): (B, H, N).

    The correlation of the coefficients with the state, by one FFT convolution of x with the reversed state
    (c_k is entry N-1+k of x * reverse(s)).
    """
    N = x.shape[-1]
    M = next_fast_len(2 * N - 1)
    prod = fft_any(x, M) * fft_any(state.flip(-1), M)
    return ifft_any(prod, M, state.is_complex())[..., N - 1 : 2 * N - 1]


def rtf_filter(
    b: torch.Tensor, a: torch.Tensor, u: torch.Tensor, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence of :func:`rtf_step` over a whole chunk by FFTs (no loop over time).

    The pre-chunk state s = (w_(-1), ..., w_(-N)) enters the recurrence for k < N as the equivalent input
    p_k = -sum_(i > k) a_i w_(k-i) and the output as q_k = sum_(j > k) b_j w_(k-j), so with v = u + p,

        w = g * v,    y = h * v + q,    (first L terms)

    where h = rtf_kernel(b, a, L) and g = rtf_kernel(1, a, L) are computed state-free in one pass sharing
    the denominator's spectrum, and p, q by an FFT correlation of length ~2N. The zero-state part h * u is
    the convolution mode; the rest is the zero-input response. The next state is the last N values of w
    (reaching back into ``state`` when L < N). Cost O(L log L + N log N) per channel and sequence; a
    stream processed in chunks equals one pass and equals a loop of :func:`rtf_step` (up to rounding).
    Everything runs in float64 (complex128) and y is rounded once: the state's precision (module
    docstring).

    Args:
        b: (H, N+1), a: (H, N).
        u: (B, H, L) input chunk, L >= 1.
        state: (B, H, N) state before the chunk, or None for zeros.

    Returns:
        y: (B, H, L) in the promoted dtype (float32 at least) and next_state: (B, H, N) in float64
        (complex128 for complex inputs).
    """
    b, a = check_coefficients(b, a)
    H, N = a.shape
    check_tensor("u", u, ndim=3)
    if u.shape[1] != H or u.shape[2] < 1:
        raise ValueError(f"u must have shape (B, H, L) with H = {H} and L >= 1; got {tuple(u.shape)}")
    Bsz, _, L = u.shape
    dtype = _run_dtype(b, a, u, *(() if state is None else (state,)))
    wide = state_dtype(b, a, u, *(() if state is None else (state,)))
    if state is None:
        state = torch.zeros(Bsz, H, N, dtype=wide, device=u.device)
    else:
        _check_state(state, Bsz, H, N)
    b, a, u, state = b.to(wide), a.to(wide), u.to(wide), state.to(wide)

    unit = torch.zeros_like(b)
    unit[:, 0] = 1
    taps = rtf_taps(torch.stack([b, unit], dim=1), monic(a), L)  # (H, 2, L): h and g
    v, q = u, None
    if N:
        pq = _prehistory(torch.stack([-a, b[:, 1:]], dim=0), state.unsqueeze(1))  # (B, 2, H, N)
        n = min(N, L)
        v = u + torch.nn.functional.pad(pq[:, 0, :, :n], (0, L - n))
        q = torch.nn.functional.pad(pq[:, 1, :, :n], (0, L - n))
    M = next_fast_len(2 * L - 1)
    out = ifft_any(fft_any(taps, M).unsqueeze(0) * fft_any(v, M).unsqueeze(2), M, wide.is_complex)
    y, w = out[..., 0, :L], out[..., 1, :L]  # (B, H, L) each
    if q is not None:
        y = y + q
    history = torch.cat([state.flip(-1), w], dim=-1)  # w_(-N), ..., w_(-1), w_0, ..., w_(L-1)
    next_state = history[..., history.shape[-1] - N :].flip(-1)
    return y.to(dtype), next_state


# ---------------------------------------------------------------------------------------------------------
# the family verbs: Ch numerators over one denominator per feature


class RTFSystem(NamedTuple):
    """The discrete system of an RTF layer in structured form, H_(c,h)(z) = b_(c,h)(z) / a_h(z)."""

    b: Tensor  # (Ch, H, N+1) numerators b_0..b_N, one per output channel
    a: Tensor  # (H, N) denominator a_1..a_N (a_0 = 1), shared by the channels of a feature


def system(b: Tensor, a: Tensor) -> RTFSystem:
    """Validate and build an :class:`RTFSystem`.

    Args:
        b: (Ch, H, N+1) numerators, real or complex floating point.
        a: (H, N) denominators a_1..a_N, N >= 0.

    Returns:
        RTFSystem with b and a in their promoted dtype, float32 at least.
    """
    check_tensor("b", b, ndim=3)
    check_tensor("a", a, ndim=2)
    for name, t in (("b", b), ("a", a)):
        if not (t.is_floating_point() or t.is_complex()):
            raise ValueError(f"{name} must be a floating-point or complex tensor; got dtype {t.dtype}")
    H, N = a.shape
    check_shape("b", b, (None, H, N + 1), f"(Ch, H, N+1) with H = {H}, N = {N} from a (H, N)")
    if b.device != a.device:
        raise ValueError(f"b and a must be on the same device; got {b.device} and {a.device}")
    dtype = _run_dtype(b, a)
    return RTFSystem(b.to(dtype), a.to(dtype))


def _check_system(sys: RTFSystem) -> RTFSystem:
    if not isinstance(sys, RTFSystem):
        raise ValueError(f"sys must be an RTFSystem (see ssm.systems.rtf.system); got {type(sys).__name__}")
    return sys


def _check_batch_state(name: str, x: Tensor, H: int, N: int, Bsz: int | None = None) -> Tensor:
    check_tensor(name, x, ndim=3)
    return check_shape(name, x, (Bsz, H, N), f"(B, H, N) with H = {H}, N = {N}")


def discretize(b: Tensor, a: Tensor) -> RTFSystem:
    """The family verb: an RTF is discrete by construction, so discretizing is building the system
    (``system(b, a)``)."""
    return system(b, a)


def kernel(sys: RTFSystem, L: int) -> Tensor:
    """Impulse responses K[c, h, k] = h_k of b_(c,h) / a_h, state-free (see :func:`rtf_kernel`).

    The denominator's spectrum is computed once per feature and shared by its Ch numerators.

    Args:
        sys: RTFSystem, b (Ch, H, N+1), a (H, N).
        L: number of taps, >= 1.

    Returns:
        K: (Ch, H, L), the dtype of the system (real for real coefficients).
    """
    b, a = _check_system(sys)
    L = check_int("L", L, minimum=1)
    return rtf_taps(b.transpose(0, 1), monic(a), L).transpose(0, 1)


def step(sys: RTFSystem, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the recurrence, O(N) per feature for w and O(N) per channel for y:

        w_k = u_k - sum_i a_i w_(k-i),    y_k = b_0 w_k + sum_j b_j w_(k-j),
        x_next = (w_k, ..., w_(k-N+1)).

    The all-pole part w runs once per feature; only the numerators are per channel. There is no extra
    skip term: b_0 w_k is part of y.

    Args:
        sys: RTFSystem, b (Ch, H, N+1), a (H, N).
        x: (B, H, N) state (w_(k-1), ..., w_(k-N)).
        u: (B, H) input at step k.

    Returns:
        y: (B, Ch, H) in the promoted dtype (float32 at least) and x_next: (B, H, N) in float64
        (complex128), the precision the step runs in (module docstring).
    """
    b, a = _check_system(sys)
    H, N = a.shape
    check_tensor("u", u, ndim=2)
    check_shape("u", u, (None, H), f"(B, H) with H = {H}")
    _check_batch_state("x", x, H, N, u.shape[0])
    dtype = _run_dtype(b, a, x, u)
    wide = state_dtype(b, a, x, u)
    b, a, x, u = b.to(wide), a.to(wide), x.to(wide), u.to(wide)
    w = u - (a * x).sum(-1)  # (B, H)
    y = b[..., 0] * w.unsqueeze(1) + torch.einsum("chn,bhn->bch", b[..., 1:], x)  # (B, Ch, H)
    return y.to(dtype), torch.cat([w.unsqueeze(-1), x[..., :-1]], dim=-1) if N else x


class RTFStep(NamedTuple):
    """The step constants of an RTF (``prepare_step``): w_k and y_k both read [u_k, x] linearly,

        [w_k; y_k] = M . x + m u_k,    M = [-a; b_(1:) - b_0 a],    m = [1; b_0] (1+Ch, H),

    M laid out per feature, (H, 1+Ch, N), for one batched product with the state; in the state's precision
    (float64, complex128 for complex coefficients), like ``step``.
    """

    M: Tensor
    m: Tensor


def prepare_step(sys: RTFSystem) -> RTFStep:
    """The constants of ``step`` (computed once per system; ``ssm.layers.LTILayer`` caches them)."""
    b, a = _check_system(sys)
    wide = state_dtype(b, a)  # the step runs in the state's precision (a float32 one put a stream 7e-2 off)
    b, a = b.to(wide), a.to(wide)
    M = torch.cat([-a[None], b[..., 1:] - b[..., :1] * a], dim=0)  # (1+Ch, H, N)
    m = torch.cat([torch.ones_like(b[:1, :, 0]), b[..., 0]], dim=0)  # (1+Ch, H)
    return RTFStep(M.transpose(0, 1).contiguous(), m)


def step_prepared(c: RTFStep, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """``step(sys, x, u)`` from ``prepare_step(sys)``: w and every channel's y in one product, in the
    constants' precision (float64 / complex128): y and the next state come back in it."""
    x = x if x.dtype == c.M.dtype else x.to(c.M.dtype)
    u = u if u.dtype == c.M.dtype else u.to(c.M.dtype)
    # one batched product per feature, (1+Ch, N) x (N, B): at B = 16 half the time of a broadcast multiply
    # and sum (whose (B, 1+Ch, H, N) temporary is twice the float64 state)
    wy = torch.addcmul(torch.bmm(c.M, x.permute(1, 2, 0)).permute(2, 1, 0), c.m, u[:, None])  # (B, 1+Ch, H)
    if not x.shape[-1]:
        return wy[:, 1:], x
    return wy[:, 1:], torch.cat([wy[:, :1].transpose(1, 2), x[..., :-1]], dim=-1)


# ---- the real route (ONNX export; docs/deployment.md): the step is real already ----


def prepare_real_step(c: RTFStep) -> RTFStep:
    """``prepare_step``'s constants, real already."""
    return c


def real_step(c: RTFStep, xr: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """``step_prepared`` (real arithmetic)."""
    return step_prepared(c, xr, u)


def to_real_state(c: RTFStep, x: Tensor) -> Tensor:
    """The state, real already (float64)."""
    return x.to(c.M.dtype)


def from_real_state(c: RTFStep, xr: Tensor) -> Tensor:
    return xr


def state_input(sys: RTFSystem, x0: Tensor, L: int) -> tuple[Tensor, Tensor]:
    """The initial state as an equivalent input p and output offset q, n = min(N, L) terms each:

        p_k = -sum_(i > k) a_i w_(k-i),    q_k = sum_(j > k) b_j w_(k-j),    k < n,

    the terms of the recurrence that reach before the chunk. With p and q added to the first n inputs
    and outputs, conv(K, u + p) + q == conv(K, u) + free_response(sys, x0, L) for K = kernel(sys, L), so
    a layer folds state passing into its one FFT convolution. An FFT correlation of length ~2N.

    Args:
        sys: RTFSystem, b (Ch, H, N+1), a (H, N).
        x0: (B, H, N) state before the chunk.
        L: chunk length, >= 1.

    Returns:
        p: (B, H, n) and q: (B, Ch, H, n), in float64 (complex128): the state's precision, which the
        convolution with p must keep (:func:`free_response` does).
    """
    b, a = _check_system(sys)
    H, N = a.shape
    L = check_int("L", L, minimum=1)
    _check_batch_state("x0", x0, H, N)
    dtype = state_dtype(b, a, x0)
    b, a, x0 = b.to(dtype), a.to(dtype), x0.to(dtype)
    n = min(N, L)
    if N == 0:
        return x0, x0.new_zeros(x0.shape[0], b.shape[0], H, 0)
    p = _prehistory(-a, x0)[..., :n]  # (B, H, n)
    q = _prehistory(b[..., 1:], x0.unsqueeze(1))[..., :n]  # (B, Ch, H, n)
    return p, q


def _causal_conv(k: Tensor, v: Tensor, L: int) -> Tensor:
    """First L terms of the causal convolution of k (..., L) with v (..., n), n <= L, by FFTs."""
    M = next_fast_len(L + max(v.shape[-1], 1) - 1)
    return ifft_any(fft_any(k, M) * fft_any(v, M), M, k.is_complex() or v.is_complex())[..., :L]


def _short_conv(k: Tensor, p: Tensor, start: int, stop: int) -> Tensor:
    """Terms start..stop-1 of the causal convolution of k (..., >= stop) with a short p (..., n), n <= N, as
    n direct products (no FFT): each term keeps its own relative accuracy. An FFT's error is relative to
    the norms of k and p, and p, the state seen as an input, is large near the unit circle, where the
    output is a difference of such terms."""
    out = 0
    for i in range(min(p.shape[-1], stop)):
        lo = max(start - i, 0)
        term = k[..., lo : stop - i] * p[..., i : i + 1]
        out = out + torch.nn.functional.pad(term, (stop - start - term.shape[-1], 0))
    return out


def free_response(sys: RTFSystem, x0: Tensor, L: int) -> Tensor:
    """Output caused by the initial state alone (zero input): y_k = (K * p)_k + q_k, see :func:`state_input`.

    Args:
        sys: RTFSystem, b (Ch, H, N+1), a (H, N).
        x0: (B, H, N) state before the chunk.
        L: number of outputs, >= 1.

    Returns:
        (B, Ch, H, L) in float64 (complex128): computed in the state's precision, kernel included; the
        caller rounds it once.
    """
    p, q = state_input(sys, x0, L)
    K = kernel(RTFSystem(sys.b.to(p.dtype), sys.a.to(p.dtype)), L)  # (Ch, H, L), taps not rounded
    y = _short_conv(K, p.unsqueeze(1), 0, L)  # (B, Ch, H, L)
    return y + torch.nn.functional.pad(q, (0, L - q.shape[-1]))


def final_state(sys: RTFSystem, u: Tensor, x0: Tensor | None = None) -> Tensor:
    """State after the chunk u: the last N values of w = g * (u + p), g the all-pole response 1 / a(z).

    Depends on a only (the numerators do not enter the state). Reaches back into x0 when L < N.

    Args:
        sys: RTFSystem, b (Ch, H, N+1), a (H, N).
        u: (B, H, L) input chunk, L >= 1.
        x0: (B, H, N) state before the chunk, or None for zeros.

    Returns:
        (B, H, N) in float64 (complex128), the state's precision.
    """
    b, a = _check_system(sys)
    H, N = a.shape
    check_tensor("u", u, ndim=3)
    check_shape("u", u, (None, H, None), f"(B, H, L) with H = {H}")
    Bsz, _, L = u.shape
    if L < 1:
        raise ValueError(f"u must have L >= 1 steps; got shape {tuple(u.shape)}")
    if x0 is None:
        x0 = torch.zeros(Bsz, H, N, dtype=state_dtype(a, u), device=u.device)
    _check_batch_state("x0", x0, H, N, Bsz)
    dtype = state_dtype(a, u, x0)
    a, u, x0 = a.to(dtype), u.to(dtype), x0.to(dtype)
    if N == 0:
        return x0
    g = rtf_taps(torch.ones_like(a[:, :1]).unsqueeze(-2), monic(a), L).squeeze(-2)  # (H, L)
    n = min(N, L)
    # w = g * (u + p): the part from u by an FFT, the part from the state's p term by term (_short_conv)
    w = _causal_conv(g, u, L)[..., L - n :] + _short_conv(g, _prehistory(-a, x0)[..., :n], L - n, L)
    history = torch.cat([x0.flip(-1), w], dim=-1)  # w_(-N), ..., w_(-1), w_(L-n), ..., w_(L-1)
    return history[..., history.shape[-1] - N :].flip(-1)


#: Relative tolerance (to the output scale) of chunked streaming against one pass, by the coefficients'
#: dtype: what :func:`streaming_error` must stay within for a layer to carry a state (``ssm.RTF``).
STREAM_RTOL = {torch.float32: 2e-5, torch.float64: 1e-6}
#: Probe length of :func:`streaming_error` in an ``ssm.RTF`` layer (2 STREAM_PROBE steps, 8 chunks).
STREAM_PROBE = 1024


def streaming_error(sys: RTFSystem, L: int = STREAM_PROBE) -> float:
    """max |chunked - one pass| / max |one pass| on a fixed white-noise probe of 2L steps in chunks of
    ceil(L / 4), through the state path of a layer (``final_state``, ``free_response``), in float64.

    The direct-form state w is large where poles crowd the unit circle (the output is a difference of its
    entries), and a carried state adds its own rounding at every chunk boundary: clustered poles near
    z = 1 put chunks 1e-3 off one pass, and eight poles at radius 0.99 overflow, although every pole is
    inside the circle (docs/rtf.md). The one pass is unaffected.

    Args:
        sys: RTFSystem, b (Ch, H, N+1), a (H, N).
        L: half the probe length, >= 1.

    Returns:
        the relative error (inf when the chunked output is not finite).
    """
    b, a = _check_system(sys)
    L = check_int("L", L, minimum=1)
    sys = RTFSystem(b.detach().to(state_dtype(b, a)), a.detach().to(state_dtype(b, a)))
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, a.shape[0], 2 * L, generator=g, dtype=torch.float64).to(a.device, sys.a.dtype)
    chunk = -(-L // 4)
    whole = _causal_conv(kernel(sys, 2 * L), u.unsqueeze(1), 2 * L)  # (1, Ch, H, 2L)
    state, parts = None, []
    for start in range(0, 2 * L, chunk):
        v = u[..., start : start + chunk]
        y = _causal_conv(kernel(sys, v.shape[-1]), v.unsqueeze(1), v.shape[-1])
        if state is not None:
            y = y + free_response(sys, state, v.shape[-1])
        state = final_state(sys, v, state)
        parts.append(y)
    err = (torch.cat(parts, dim=-1) - whole).abs().max()
    if not bool(torch.isfinite(err)):
        return math.inf
    return (err / whole.abs().max().clamp_min(1e-300)).item()


def is_stable(a: Tensor) -> Tensor:
    """Schur-Cohn (step-down) test: True where every root of z^N + a_1 z^(N-1) + ... + a_N is inside |z| < 1.

    The Levinson step-down recursion, the inverse of the step-up of :func:`stable_denominator`,

        k_m = a^(m)_m,    a^(m-1)_i = (a^(m)_i - k_m conj(a^(m)_(m-i))) / (1 - |k_m|^2),

    gives the reflection coefficients; the polynomial is stable if and only if every |k_m| < 1. Run in
    float64 (complex128), O(N^2) per feature.

    Args:
        a: (..., N) denominator coefficients a_1..a_N, real or complex.

    Returns:
        (...,) bool.
    """
    check_tensor("a", a)
    if a.ndim < 1 or not (a.is_floating_point() or a.is_complex()):
        raise ValueError(
            f"a must be a floating-point tensor of shape (..., N); got {a.dtype} {tuple(a.shape)}"
        )
    cur = a.detach().to(torch.complex128 if a.is_complex() else torch.float64)
    ok = torch.isfinite(cur).all(-1)
    for m in range(cur.shape[-1], 0, -1):
        k = cur[..., m - 1 : m]
        ok = ok & (k.abs().squeeze(-1) < 1)
        denom = torch.where(k.abs() < 1, 1 - (k * k.conj()).real, torch.ones_like(k.real))
        cur = (cur[..., : m - 1] - k * cur[..., : m - 1].flip(-1).conj()) / denom
    return ok


# ---------------------------------------------------------------------------------------------------------
# initialization and stability


def rtf_init(
    H: int,
    N: int,
    *,
    scale: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial RTF coefficients: a = 0 (all poles at the origin, an FIR filter) and a small random b.

    The paper initializes the denominator at zero so that training starts from a trivially stable system
    (with a and b both zero); a random numerator b ~ N(0, scale^2) makes the initial kernel the FIR filter
    h = b (so the gradient with respect to a, proportional to b, is nonzero from the first step). The
    default scale 1 / sqrt(N + 1) gives the kernel unit expected energy sum_k h_k^2 = 1.

    Returns:
        b: (H, N+1) and a: (H, N).
    """
    H = check_int("H", H, minimum=1)
    N = check_int("N", N, minimum=0)
    scale = 1.0 / math.sqrt(N + 1) if scale is None else float(check_positive("scale", scale))
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    b = scale * torch.randn(H, N + 1, dtype=dtype, device=device, generator=generator)
    return b, torch.zeros(H, N, dtype=dtype, device=device)


def stable_denominator(a_raw: torch.Tensor, method: str = "reflection") -> torch.Tensor:
    """Map unconstrained parameters (..., N) to denominator coefficients with all poles inside |z| < 1.

    ``"reflection"`` (complete): k_m = tanh(a_raw_m) are reflection (PARCOR) coefficients in (-1, 1) and
    the Levinson step-up recursion

        a^(m)_i = a^(m-1)_i + k_m a^(m-1)_(m-i)  (i < m),    a^(m)_m = k_m,

    builds 1 + a_1 z^-1 + ... + a_N z^-N; by the Schur-Cohn criterion its roots are inside the unit disc
    if and only if every |k_m| < 1, so the map reaches every (and only) stable denominator, and a_raw = 0
    gives a = 0 (poles at the origin, the initialization of :func:`rtf_init`). Numerically the guarantee
    is exact only as long as the rounded coefficients stay away from the stability boundary: the poles
    crowd towards the unit circle as prod_m (1 - k_m^2) shrinks, and the monomial coefficients of such
    polynomials are ill-conditioned. Measured with an extended-precision Schur-Cohn test on the float64
    output (tests/test_transfer.py): every draw stable for a_raw ~ N(0, 1) up to N = 20; for N = 50 all
    draws stable at N(0, 0.5^2) but only a quarter at N(0, 1); for N = 100, 93% at N(0, 0.5^2). Start
    from a_raw = 0 and keep it moderate for large N. tanh rounds to +-1 for |a_raw| > ~9 in float32 (a pole
    on the circle), so k is scaled by 1 - 4 eps: |k_m| < 1 holds for any finite a_raw. That keeps the exact
    map stable, not the rounded coefficients: in float32 with a_raw ~ N(0, 10^2), N = 8 already gives
    unstable rounded denominators, and the float32 recurrence of such filters is inaccurate anyway.

    ``"montel"`` (sufficient, restrictive): a = a_raw / (1 + sum_i |a_raw_i|), so sum_i |a_i| < 1; then
    for |z| >= 1, |sum_i a_i z^(N-i)| <= |z|^(N-1) sum_i |a_i| < |z|^N and z^N + a_1 z^(N-1) + ... has no
    root there (Montel's bound). This is the constraint the paper compares against (its code normalizes
    by sum |a_i| plus a learned scalar); the region excludes most stable filters with several poles near
    the unit circle, e.g. a double pole at 0.99 (sum |a_i| = 2.96), which is why the paper prefers the
    zero initialization without a constraint. The scale 1 - 4 (N + 1) eps keeps sum |a_i| < 1 after
    rounding. It is robust for any N and any finite a_raw: |a(z)| >= 1 - sum |a_i| on the circle, the
    all-pole response is bounded by 1, and the float32 recurrence matches the float64 kernel to ~1e-7
    (N = 64, a_raw ~ N(0, 10^4)), which is why ``ssm.layers.RTF`` uses it by default.

    Args:
        a_raw: (..., N) real parameters.
        method: "reflection" or "montel".

    Returns:
        a: (..., N), same dtype.
    """
    check_tensor("a_raw", a_raw)
    check_choice("method", method, STABLE_METHODS)
    if a_raw.ndim < 1 or not a_raw.is_floating_point():
        raise ValueError(
            f"a_raw must be a real floating-point tensor of shape (..., N); "
            f"got {a_raw.dtype} {tuple(a_raw.shape)}"
        )
    N = a_raw.shape[-1]
    eps = torch.finfo(a_raw.dtype).eps
    if method == "montel":
        # The margin is that of float32 (or of a narrower dtype) whatever the dtype: 4 (N + 1) eps is far
        # above rounding (3e-5 at N = 64), so .double() of a layer would otherwise change its filter.
        scale = 1 - STABLE_MARGIN_ULPS * (N + 1) * max(eps, torch.finfo(torch.float32).eps)
        return scale * a_raw / (1 + a_raw.abs().sum(-1, keepdim=True))
    k = (1 - STABLE_MARGIN_ULPS * eps) * torch.tanh(a_raw)
    a = k[..., :0]
    for m in range(N):
        km = k[..., m : m + 1]
        a = torch.cat([a + km * a.flip(-1), km], dim=-1)
    return a
