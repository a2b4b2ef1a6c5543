"""ssm.systems.rtf: the family verbs (system, kernel, step, free_response, final_state, state_input).

The chain: kernel == scipy.signal.lfilter impulse response; a loop of step == convolution with the kernel +
free response; final_state == the state after the loop; conv(K, u + p) + q == conv(K, u) + free response;
chunks == one pass. All in float64 with the tolerances of conftest.TOL.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import torch
from conftest import TOL, rel_err

from ssm.reference import causal_conv_ref
from ssm.systems import rtf
from ssm.systems.rtf import RTFSystem, is_stable, stable_denominator

F64 = torch.float64
RTOL64 = TOL[F64][0]


def _system(Ch: int, H: int, N: int, dtype=F64) -> RTFSystem:
    a = stable_denominator(0.8 * torch.randn(H, N, dtype=F64))
    return rtf.system(torch.randn(Ch, H, N + 1, dtype=F64).to(dtype), a.to(dtype))


def _step_loop(sys: RTFSystem, u: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y (B, Ch, H, L) and the final state by a loop of rtf.step over u (B, H, L)."""
    ys, x = [], x0
    for t in range(u.shape[-1]):
        y, x = rtf.step(sys, x, u[..., t])
        ys.append(y)
    return torch.stack(ys, -1), x


def test_system_is_a_namedtuple_with_promoted_dtypes():
    sys = rtf.system(torch.randn(2, 3, 5, dtype=torch.float16), torch.randn(3, 4))
    assert isinstance(sys, RTFSystem) and sys.b.shape == (2, 3, 5) and sys.a.shape == (3, 4)
    assert sys.b.dtype == sys.a.dtype == torch.float32
    assert rtf.system(torch.randn(1, 3, 5, dtype=F64), torch.randn(3, 4)).a.dtype == F64


@pytest.mark.parametrize("N", [0, 1, 4, 9])
def test_kernel_matches_lfilter_impulse(N):
    Ch, H, L = 3, 2, 50
    sys = _system(Ch, H, N)
    K = rtf.kernel(sys, L)
    assert K.shape == (Ch, H, L) and K.dtype == F64
    impulse = np.zeros(L)
    impulse[0] = 1.0
    lfilter = scipy.signal.lfilter
    ref = np.array([[lfilter(sys.b[c, h].numpy(), np.r_[1.0, sys.a[h].numpy()], impulse) for h in range(H)]
                    for c in range(Ch)])
    assert rel_err(K, torch.from_numpy(ref)) < RTOL64


def test_kernel_equals_single_channel_face():
    sys = _system(2, 3, 5)
    K = rtf.kernel(sys, 40)
    for c in range(2):
        torch.testing.assert_close(K[c], rtf.rtf_kernel(sys.b[c], sys.a, 40), rtol=0, atol=1e-14)


@pytest.mark.parametrize("N,L", [(0, 10), (1, 20), (6, 37), (12, 5)])
def test_step_loop_equals_convolution_plus_free_response(N, L):
    Bsz, Ch, H = 2, 3, 4
    sys = _system(Ch, H, N)
    u = torch.randn(Bsz, H, L, dtype=F64)
    x0 = torch.randn(Bsz, H, N, dtype=F64)
    y_loop, x_loop = _step_loop(sys, u, x0)
    K = rtf.kernel(sys, L)
    zir = rtf.free_response(sys, x0, L)
    assert zir.shape == (Bsz, Ch, H, L)
    assert rel_err(causal_conv_ref(u, K) + zir, y_loop) < RTOL64
    assert rel_err(rtf.final_state(sys, u, x0), x_loop) < RTOL64
    # zero input: the loop is the free response alone
    y_zero, _ = _step_loop(sys, torch.zeros_like(u), x0)
    torch.testing.assert_close(zir, y_zero, rtol=RTOL64, atol=1e-12)


def test_step_runs_the_all_pole_part_once_per_feature():
    """The next state depends on a and u only, not on the channels' numerators."""
    sys = _system(3, 2, 5)
    x, u = torch.randn(4, 2, 5, dtype=F64), torch.randn(4, 2, dtype=F64)
    y, x_next = rtf.step(sys, x, u)
    other = rtf.system(torch.randn(1, 2, 6, dtype=F64), sys.a)
    torch.testing.assert_close(rtf.step(other, x, u)[1], x_next, rtol=0, atol=0)
    w = u - (sys.a * x).sum(-1)
    torch.testing.assert_close(x_next[..., 0], w, rtol=0, atol=1e-15)
    torch.testing.assert_close(y, sys.b[..., 0] * w[:, None] + (sys.b[..., 1:] * x[:, None]).sum(-1))


@pytest.mark.parametrize("N,L", [(1, 1), (5, 3), (5, 30), (8, 8)])
def test_state_input_folds_the_state_into_the_convolution(N, L):
    Bsz, Ch, H = 2, 2, 3
    sys = _system(Ch, H, N)
    u = torch.randn(Bsz, H, L, dtype=F64)
    x0 = torch.randn(Bsz, H, N, dtype=F64)
    p, q = rtf.state_input(sys, x0, L)
    n = min(N, L)
    assert p.shape == (Bsz, H, n) and q.shape == (Bsz, Ch, H, n)
    K = rtf.kernel(sys, L)
    pad = torch.nn.functional.pad
    folded = causal_conv_ref(u + pad(p, (0, L - n)), K) + pad(q, (0, L - n))
    assert rel_err(folded, causal_conv_ref(u, K) + rtf.free_response(sys, x0, L)) < RTOL64


def test_final_state_equals_the_state_after_a_loop_of_step():
    Bsz, H, N, L = 3, 2, 7, 45
    sys = _system(1, H, N)
    u = torch.randn(Bsz, H, L, dtype=F64)
    _, x_loop = _step_loop(sys, u, torch.zeros(Bsz, H, N, dtype=F64))
    assert rel_err(rtf.final_state(sys, u), x_loop) < RTOL64


def test_chunks_equal_one_pass():
    Bsz, Ch, H, N, L = 2, 2, 3, 6, 60
    sys = _system(Ch, H, N)
    u = torch.randn(Bsz, H, L, dtype=F64)
    x0 = torch.randn(Bsz, H, N, dtype=F64)
    y_full = causal_conv_ref(u, rtf.kernel(sys, L)) + rtf.free_response(sys, x0, L)
    x_full = rtf.final_state(sys, u, x0)
    ys, x = [], x0
    for lo, hi in [(0, 2), (2, 3), (3, 20), (20, 60)]:  # chunks shorter and longer than N
        chunk = u[..., lo:hi]
        ys.append(causal_conv_ref(chunk, rtf.kernel(sys, hi - lo)) + rtf.free_response(sys, x, hi - lo))
        x = rtf.final_state(sys, chunk, x)
    assert rel_err(torch.cat(ys, -1), y_full) < RTOL64
    assert rel_err(x, x_full) < RTOL64


def test_float32_step_and_complex_coefficients():
    sys = _system(2, 3, 4, torch.float32)
    y, x = rtf.step(sys, torch.zeros(1, 3, 4), torch.randn(1, 3))
    # the output in the system's dtype, the state in float64 whatever it (ssm.systems.rtf: state precision)
    assert y.dtype == torch.float32 and x.dtype == F64 and y.shape == (1, 2, 3)
    poles = 0.9 * torch.exp(2j * torch.pi * torch.rand(3, 4, dtype=F64))
    a = torch.stack([torch.from_numpy(np.poly(p.numpy())[1:]) for p in poles])
    sys_c = rtf.system(torch.randn(2, 3, 5, dtype=torch.complex128), a)
    u = torch.randn(2, 3, 25, dtype=F64)
    x0 = torch.randn(2, 3, 4, dtype=torch.complex128)
    y_loop, x_loop = _step_loop(sys_c, u, x0)
    y = causal_conv_ref(u, rtf.kernel(sys_c, 25)) + rtf.free_response(sys_c, x0, 25)
    assert y.dtype == torch.complex128
    assert rel_err(y, y_loop) < RTOL64 and rel_err(rtf.final_state(sys_c, u, x0), x_loop) < RTOL64


def test_gradcheck_of_the_verbs():
    sys = _system(2, 2, 3)
    b, a = sys.b.clone().requires_grad_(), sys.a.clone().requires_grad_()
    x0 = torch.randn(1, 2, 3, dtype=F64, requires_grad=True)
    u = torch.randn(1, 2, 7, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, a: rtf.kernel(rtf.system(b, a), 9), (b, a))
    assert torch.autograd.gradcheck(lambda b, a, x: rtf.free_response(rtf.system(b, a), x, 7), (b, a, x0))
    assert torch.autograd.gradcheck(lambda b, a, x, u: rtf.final_state(rtf.system(b, a), u, x), (b, a, x0, u))


def test_is_stable_against_roots():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.standard_normal((200, 4)) * 0.7)
    radius = torch.tensor([np.abs(np.roots(np.r_[1.0, row])).max() for row in a.numpy()])
    ok = is_stable(a)
    assert ok.shape == (200,) and 0 < int(ok.sum()) < 200
    assert bool((ok == (radius < 1)).all())
    assert bool(is_stable(torch.zeros(3, 0)).all())
    assert not bool(is_stable(torch.tensor([[-1.0]])).any())  # a pole on the circle is not stable
    assert not bool(is_stable(torch.tensor([[float("nan"), 0.1]])).any())


@pytest.mark.parametrize(
    "fn,match",
    [
        (lambda: rtf.system(torch.randn(3, 5), torch.randn(3, 4)), "b"),
        (lambda: rtf.system(torch.randn(1, 3, 5), torch.randn(3)), "a"),
        (lambda: rtf.system(torch.randn(1, 2, 5), torch.randn(3, 4)), "b"),
        (lambda: rtf.system(torch.randn(1, 3, 4), torch.randn(3, 4)), "b"),
        (lambda: rtf.system(torch.ones(1, 3, 5, dtype=torch.int64), torch.randn(3, 4)), "b"),
        (lambda: rtf.system(torch.randn(1, 3, 5), torch.ones(3, 4, dtype=torch.int64)), "a"),
        (lambda: rtf.system([[[1.0]]], torch.randn(1, 0)), "b"),
        (lambda: rtf.kernel((torch.randn(1, 3, 5), torch.randn(3, 4)), 8), "sys"),
        (lambda: rtf.kernel(_system(1, 3, 4), 0), "L"),
        (lambda: rtf.step(_system(1, 3, 4), torch.zeros(2, 3, 4), torch.randn(2, 4)), "u"),
        (lambda: rtf.step(_system(1, 3, 4), torch.zeros(2, 3, 5), torch.randn(2, 3)), "x"),
        (lambda: rtf.step(_system(1, 3, 4), torch.zeros(1, 3, 4), torch.randn(2, 3)), "x"),
        (lambda: rtf.free_response(_system(1, 3, 4), torch.zeros(2, 3, 5), 8), "x0"),
        (lambda: rtf.free_response(_system(1, 3, 4), torch.zeros(2, 3, 4), 0), "L"),
        (lambda: rtf.state_input(_system(1, 3, 4), torch.zeros(2, 4), 8), "x0"),
        (lambda: rtf.final_state(_system(1, 3, 4), torch.randn(2, 4, 8)), "u"),
        (lambda: rtf.final_state(_system(1, 3, 4), torch.randn(2, 3, 0)), "u"),
        (lambda: rtf.final_state(_system(1, 3, 4), torch.randn(2, 3, 8), torch.zeros(1, 3, 4)), "x0"),
        (lambda: is_stable(torch.tensor(0.5)), "a"),
    ],
)
def test_bad_input(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()
