"""Property-based tests (hypothesis): random valid configurations and random stable systems, small sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rel_err

import ssm
from ssm.kernels import diag_kernel, dplr_kernel, rtf_kernel
from ssm.reference import conj_expand, dense_kernel, dplr_to_dense

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

F64, C128 = torch.float64, torch.complex128
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)

configs = st.one_of(
    st.builds(lambda init, disc, ch: (ssm.S4, {"init": init, "disc": disc, "channels": ch}),
              st.sampled_from(["legs", "legt", "lagt", "fout", "diag-lin"]),
              st.sampled_from(["bilinear", "zoh"]), st.integers(1, 2)),
    st.builds(lambda init, disc, ch: (ssm.S4D, {"init": init, "disc": disc, "channels": ch}),
              st.sampled_from(["diag-lin", "diag-inv", "diag-legs", "diag-real"]),
              st.sampled_from(["zoh", "bilinear"]), st.integers(1, 2)),
    st.builds(lambda constraint, ch: (ssm.RTF, {"constraint": constraint, "channels": ch}),
              st.sampled_from(["montel", "reflection"]), st.integers(1, 2)),
)


@SETTINGS
@given(config=configs, H=st.integers(1, 3), half_n=st.integers(1, 4), L=st.integers(1, 40),
       seed=st.integers(0, 2**16), activation=st.sampled_from(["gelu", "identity", "tanh"]),
       glu=st.booleans())
def test_forward_equals_step_for_random_configurations(config, H, half_n, L, seed, activation, glu):
    cls, kw = config
    torch.manual_seed(seed)
    layer = cls(H, 2 * half_n, activation=activation, glu=glu, dtype=F64, **kw)
    x = torch.randn(2, L, H, dtype=F64)
    y = layer(x)
    state, ys = layer.default_state(2), []
    for t in range(L):
        y_t, state = layer.step(x[:, t], state)
        ys.append(y_t)
    assert rel_err(torch.stack(ys, 1), y) < 1e-9


def _stable_dplr(rng: np.random.Generator, H: int, N: int, R: int):
    Lambda = torch.complex(-torch.from_numpy(rng.uniform(0.05, 2.0, (H, N))),
                           torch.from_numpy(rng.normal(0, 3, (H, N))))
    P = torch.from_numpy(0.3 * (rng.normal(size=(R, H, N)) + 1j * rng.normal(size=(R, H, N))))
    B = torch.from_numpy(rng.normal(size=(H, N)) + 1j * rng.normal(size=(H, N)))
    C = torch.from_numpy(rng.normal(size=(H, N)) + 1j * rng.normal(size=(H, N)))
    return Lambda, P, B, C


@SETTINGS
@given(seed=st.integers(0, 2**16), N=st.integers(1, 5), R=st.integers(0, 2), L=st.integers(1, 300),
       log_dt=st.floats(-3, 2), disc=st.sampled_from(["bilinear", "zoh"]), pairs=st.booleans())
def test_structured_kernels_equal_the_dense_reference(seed, N, R, L, log_dt, disc, pairs):
    """DPLR (Cauchy + Woodbury / Krylov) and diagonal (Vandermonde) kernels == explicit dense powers, dt up to
    100."""
    rng = np.random.default_rng(seed)
    H = 2
    Lambda, P, B, C = _stable_dplr(rng, H, N, R)
    dt = torch.full((H,), 10.0**log_dt, dtype=F64)
    # keep A stable: the low-rank term is small against the damping of Lambda (real part <= -0.05)
    if R:
        P = P * 0.05 / (1 + P.abs().amax())
    K = dplr_kernel(Lambda, P, B, C, dt, L, disc=disc, conj_pairs=pairs)
    Lf, Pf, Bf, Cf = conj_expand(Lambda, P, B, C) if pairs else (Lambda, P, B, C)
    Ab, Bb = ssm.discretize.discretize(dplr_to_dense(Lf, Pf), Bf, dt, disc)
    ref = dense_kernel(Ab, Bb, Cf, L).real
    scale = ref.abs().max().clamp_min(1e-300)
    assert float((K - ref).abs().max() / scale) < 1e-8
    Kd = diag_kernel(Lambda, B, C, dt, L, disc=disc, conj_pairs=pairs)
    Ab_d, Bb_d = ssm.discretize.discretize(torch.diag_embed(Lf), Bf, dt, disc)
    ref_d = dense_kernel(Ab_d, Bb_d, Cf, L).real
    assert float((Kd - ref_d).abs().max() / ref_d.abs().max().clamp_min(1e-300)) < 1e-8


@SETTINGS
@given(seed=st.integers(0, 2**16), N=st.integers(0, 8), L=st.integers(1, 300), radius=st.floats(0.0, 0.995))
def test_rtf_kernel_equals_lfilter(seed, N, L, radius):
    signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(seed)
    poles = radius * rng.uniform(0, 1, N) * np.exp(1j * rng.uniform(0, np.pi, N))
    a = np.poly(np.concatenate([poles, poles.conj()])).real if N else np.ones(1)
    b = rng.normal(size=a.shape[0])
    impulse = np.zeros(L)
    impulse[0] = 1
    ref = signal.lfilter(b, a, impulse)
    h = rtf_kernel(torch.from_numpy(b)[None], torch.from_numpy(a[1:])[None], L)[0]
    assert float(np.abs(h.numpy() - ref).max() / max(np.abs(ref).max(), 1e-300)) < 1e-9
