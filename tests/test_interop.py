"""ssm.interop.from_official_s4: state dicts laid out as the official S4 code stores them, built from known
parameters; the expected outputs come from a float64 re-implementation of the official kernel formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ssm
from ssm.interop import from_official_s4

f64, c128 = torch.float64, torch.complex128


def c2r(z):
    return torch.view_as_real(z.resolve_conj().contiguous())


def known(H=3, N2=4, R=1, Ch=1, S=None, seed=0):
    """Known continuous parameters: Lambda (S, N/2), P (R, S, N/2), B (S, N/2), C (Ch, H, N/2), dt (H,)."""
    g = torch.Generator().manual_seed(seed)
    S = S or H
    Lambda = torch.complex(-0.1 - torch.rand(S, N2, generator=g, dtype=f64),
                           -3 * torch.rand(S, N2, generator=g, dtype=f64))
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=c128)  # noqa: E731
    dt = 0.01 + 0.09 * torch.rand(H, generator=g, dtype=f64)
    return Lambda, 0.3 * rnd(R, S, N2), rnd(S, N2), rnd(Ch, H, N2), dt


def tile(t, H):
    return t.repeat(*([1] * (t.ndim - 2)), H // t.shape[-2], 1)


# ---- the official formulas, re-implemented in float64 -----------------------------------------------------
def dense_bilinear(Lambda, P, dt):
    """Ab of the conjugate-doubled DPLR system diag(Lambda) - P P^* (the official ``_setup_state``)."""
    Lf, Pf = torch.cat([Lambda, Lambda.conj()], -1), torch.cat([P, P.conj()], -1)
    A = torch.diag_embed(Lf) - torch.einsum("rhn,rhm->hnm", Pf, Pf.conj())
    inv = torch.linalg.inv(2 / dt[:, None, None] * torch.eye(A.shape[-1], dtype=c128) - A)  # (2/dt - A)^-1
    return inv @ (2 / dt[:, None, None] * torch.eye(A.shape[-1], dtype=c128) + A)


def c_tilde(C, Lambda, P, dt, L):
    """The official ``_setup_C``: C~ = C (I - Ab^L), conjugate pairs taken again."""
    Ab_L = torch.linalg.matrix_power(dense_bilinear(Lambda, P, dt), L)
    Cf = torch.cat([C, C.conj()], -1)
    return (Cf - torch.einsum("chn,hnm->chm", Cf, Ab_L))[..., : C.shape[-1]]


def official_dplr_kernel(Lambda, P, B, Ct, dt, l_kernel, L):
    """SSMKernelDPLR.forward: Cauchy products at the bilinear nodes, Woodbury, irfft of length l_kernel."""
    omega = torch.exp(torch.tensor(-2j * math.pi / l_kernel, dtype=c128)) ** torch.arange(l_kernel // 2 + 1)
    z = 2 * (1 - omega) / (1 + omega)
    dtA = Lambda * dt[:, None]
    R = P.shape[0]
    Bs = torch.cat([B[None], P], 0)  # (1+R, H, N/2)
    Cs = torch.cat([Ct, P.conj()], 0)  # (C+R, H, N/2)
    v = Bs[:, None] * Cs[None] * dt[:, None]
    v, w = torch.cat([v, v.conj()], -1), torch.cat([dtA, dtA.conj()], -1)
    r = (v[..., None] / (z - w[..., None])).sum(-2)  # (1+R, C+R, H, M)
    r00, r01, r10, r11 = r[:-R, :-R], r[:-R, -R:], r[-R:, :-R], r[-R:, -R:]
    r11 = torch.linalg.inv(torch.eye(R, dtype=c128) + r11.permute(2, 3, 0, 1)).permute(2, 3, 0, 1)
    k_f = (r00 - torch.einsum("ijhn,jkhn,klhn->ilhn", r01, r11, r10)) * 2 / (1 + omega)
    return torch.fft.irfft(k_f, n=l_kernel)[..., :L][-1]  # (C, H, L)


def official_diag_kernel(Lambda, B, C, dt, L, disc):
    dtA = Lambda * dt[:, None]
    BC = B * C
    if disc == "zoh":
        Ct, logA = BC * (torch.exp(dtA) - 1) / Lambda, dtA
    else:
        Ct, logA = BC / (1 - dtA / 2) * dt[:, None], torch.log((1 + dtA / 2) / (1 - dtA / 2))
    return 2 * torch.einsum("chn,hnl->chl", Ct, torch.exp(logA[..., None] * torch.arange(L))).real


def official_fftconv(x, k, D, bidirectional, act=F.gelu):
    """FFTConv.forward (transposed=False): (B, L, H) -> (B, L, C*H)."""
    u = x.transpose(1, 2)
    L = u.shape[-1]
    if bidirectional:
        k0, k1 = k.chunk(2, 0)
        k = F.pad(k0, (0, L)) + F.pad(k1.flip(-1), (L, 0))
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L)[:, None] * torch.fft.rfft(k, n=2 * L), n=2 * L)[..., :L]
    y = y + u[:, None] * D[None, :, :, None]
    return act(y.flatten(1, 2).transpose(1, 2))


def official_block(x, k, D, bidirectional, weight, bias):
    """S4Block.forward with final_act='glu' (Linear then GLU) or 'id' (weight of shape (H, C*H))."""
    y = official_fftconv(x, k, D, bidirectional) @ weight.T + bias
    return F.glu(y, -1) if weight.shape[0] == 2 * x.shape[-1] else y


def dplr_state_dict(Lambda, P, B, C, dt, l_kernel, D, weight=None, bias=None, prefix=""):
    Ct = c_tilde(C, tile(Lambda, C.shape[1]), tile(P, C.shape[1]), dt, l_kernel) if l_kernel else C
    inner = prefix + ("layer." if weight is not None else "")
    sd = {inner + "D": D, inner + "kernel.inv_dt": torch.log(dt)[:, None],
          inner + "kernel.A_real": torch.log(-Lambda.real), inner + "kernel.A_imag": -Lambda.imag,
          inner + "kernel.B": c2r(B[None]), inner + "kernel.C": c2r(Ct), inner + "kernel.P": c2r(P),
          inner + "kernel.l_kernel": torch.tensor(l_kernel)}
    if weight is not None:
        sd[prefix + "output_linear.0.weight"], sd[prefix + "output_linear.0.bias"] = weight, bias
    return sd, Ct


@pytest.mark.parametrize("R,Ch,bidirectional,glu,l_kernel", [
    (1, 1, False, True, 32), (2, 1, False, False, 32), (1, 2, True, True, 32), (1, 1, False, True, 0)])
def test_s4block_dplr(R, Ch, bidirectional, glu, l_kernel):
    H, L = 3, 24
    g = torch.Generator().manual_seed(1)
    C_out = Ch * (2 if bidirectional else 1)
    Lambda, P, B, C, dt = known(H, 4, R, C_out)
    D = torch.randn(Ch, H, generator=g, dtype=f64)
    weight = torch.randn((2 if glu else 1) * H, Ch * H, generator=g, dtype=f64) / H
    bias = torch.randn((2 if glu else 1) * H, generator=g, dtype=f64)
    sd, Ct = dplr_state_dict(Lambda, P, B, C, dt, l_kernel, D, weight, bias, prefix="blocks.0.")
    layer = from_official_s4(sd, dtype=f64)
    assert isinstance(layer, ssm.S4) and (layer.rank, layer.channels, layer.bidirectional, layer.glu) == (
        R, Ch, bidirectional, glu)
    torch.testing.assert_close(torch.view_as_complex(layer.C), C, rtol=1e-9, atol=1e-9)  # C recovered from C~
    x = torch.randn(2, L, H, generator=g, dtype=f64)
    if not l_kernel:  # a kernel never run stores C; its first forward turns it into C~ at that length
        l_kernel, Ct = 64, c_tilde(C, Lambda, P, dt, 64)
    k = official_dplr_kernel(Lambda, P, B, Ct, dt, l_kernel, L)
    torch.testing.assert_close(layer.kernel(L), k, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer(x), official_block(x, k, D, bidirectional, weight, bias),
                               rtol=1e-9, atol=1e-9)


def test_fftconv_diag_with_shared_ssm_and_softplus_dt():
    H, L = 4, 30
    g = torch.Generator().manual_seed(2)
    Lambda, _, B, C, dt = known(H, 4, 1, 1, S=2)
    D = torch.randn(1, H, generator=g, dtype=f64)
    sd = {"D": D, "kernel.inv_dt": torch.log(torch.expm1(dt))[:, None].repeat(1, 4),  # untied but constant
          "kernel.A_real": torch.log(-Lambda.real), "kernel.A_imag": -Lambda.imag,
          "kernel.B": c2r(B[None]), "kernel.C": c2r(C)}
    for disc in ("zoh", "bilinear"):
        layer = from_official_s4(sd, dt_transform="softplus", disc=disc, activation="id", dtype=f64)
        assert isinstance(layer, ssm.S4D) and not layer.glu
        x = torch.randn(2, L, H, generator=g, dtype=f64)
        k = official_diag_kernel(tile(Lambda, H), tile(B, H), C, dt, L, disc)
        torch.testing.assert_close(layer(x), official_fftconv(x, k, D, False, act=lambda t: t),
                                   rtol=1e-9, atol=1e-9)


def test_minimal_s4d():
    H, N2, L = 3, 5, 20
    g = torch.Generator().manual_seed(3)
    log_A_real = math.log(0.5) + 0.1 * torch.randn(H, N2, generator=g, dtype=f64)
    A_imag = math.pi * torch.arange(N2, dtype=f64).repeat(H, 1)
    C = torch.randn(H, N2, generator=g, dtype=c128)
    log_dt = torch.log(0.01 + 0.09 * torch.rand(H, generator=g, dtype=f64))
    D = torch.randn(H, generator=g, dtype=f64)
    w, b = torch.randn(2 * H, H, 1, generator=g, dtype=f64), torch.randn(2 * H, generator=g, dtype=f64)
    sd = {"D": D, "kernel.C": c2r(C), "kernel.log_dt": log_dt, "kernel.log_A_real": log_A_real,
          "kernel.A_imag": A_imag, "output_linear.0.weight": w, "output_linear.0.bias": b}
    layer = from_official_s4(sd, dtype=f64)
    # s4d.py: K = 2 Re sum C (exp(dtA) - 1) / A exp(dtA k), conv, + D u, GELU, 1x1 conv, GLU
    dt = torch.exp(log_dt)
    A = torch.complex(-torch.exp(log_A_real), A_imag)
    dtA = A * dt[:, None]
    powers = torch.exp(dtA[..., None] * torch.arange(L))  # (H, N/2, L)
    K = 2 * torch.einsum("hn,hnl->hl", C * (torch.exp(dtA) - 1) / A, powers).real
    x = torch.randn(2, L, H, generator=g, dtype=f64)
    u = x.transpose(1, 2)
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L), n=2 * L)[..., :L]
    y = y + u * D[:, None]
    y = F.glu(torch.einsum("oh,bhl->bol", w[..., 0], F.gelu(y)) + b[:, None], dim=-2).transpose(1, 2)
    torch.testing.assert_close(layer(x), y, rtol=1e-9, atol=1e-9)
    assert from_official_s4({k: v.float() for k, v in sd.items()}).D.dtype == torch.float32


def test_refusals_name_the_key():
    Lambda, P, B, C, dt = known()
    sd, _ = dplr_state_dict(Lambda, P, B, C, dt, 16, torch.ones(1, 3, dtype=f64))
    with pytest.raises(ValueError, match="contradicts"):
        from_official_s4(sd, disc="zoh")
    with pytest.raises(ValueError, match="'extra.weight'"):
        from_official_s4({**sd, "extra.weight": torch.zeros(1)})
    varying = dict(sd, **{"kernel.inv_dt": torch.randn(3, 4, dtype=f64)})
    with pytest.raises(ValueError, match="'kernel.inv_dt'"):
        from_official_s4(varying)
    with pytest.raises(ValueError, match="one official S4 layer"):
        from_official_s4({**{"a." + k: v for k, v in sd.items()}, **{"b." + k: v for k, v in sd.items()}})
    with pytest.raises(ValueError, match="dt_transform"):
        from_official_s4(sd, dt_transform="tanh")


def test_incomplete_or_malformed_dicts_are_refused_naming_the_key():
    Lambda, P, B, C, dt = known()
    H = 3
    w, b = torch.randn(2 * H, H, dtype=f64), torch.randn(2 * H, dtype=f64)
    sd, _ = dplr_state_dict(Lambda, P, B, C, dt, 16, torch.ones(1, H, dtype=f64), w, b)
    drop = lambda key: {k: v for k, v in sd.items() if k != key}  # noqa: E731
    cases = [
        (drop("layer.kernel.l_kernel"), "'layer.kernel.l_kernel'"),  # C~ would be read as C
        (drop("output_linear.0.bias"), "'output_linear.0.bias'"),  # would become zero
        (drop("layer.kernel.P"), "'layer.kernel.P'"),  # with l_kernel: would load an S4D
        (dict(sd, **{"layer.kernel.l_kernel": torch.tensor(1.5)}), "'layer.kernel.l_kernel'.*integer"),
        (dict(sd, **{"layer.kernel.B": sd["layer.kernel.B"][:, :, :3]}), "'layer.kernel.B'.*shape"),
        (dict(sd, **{"layer.kernel.A_imag": sd["layer.kernel.A_imag"][:2]}), "'layer.kernel.A_imag'.*shape"),
        (dict(sd, **{"layer.kernel.P": sd["layer.kernel.P"][..., 0]}), "'layer.kernel.P'.*shape"),
        (dict(sd, **{"layer.D": torch.ones(1, 2, dtype=f64)}), "'layer.D'.*shape"),
        (dict(sd, **{"output_linear.0.bias": torch.ones(5, dtype=f64)}), "'output_linear.0.bias'.*shape"),
        (dict(sd, **{"layer.kernel.inv_dt": torch.full((H, 1), math.nan)}), "'layer.kernel.inv_dt'.*finite"),
        (dict(sd, **{"layer.kernel.A_real": [[0.0]]}), "'layer.kernel.A_real'.*tensor"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            from_official_s4(bad)


def test_minimal_s4d_malformed_keys_are_named():
    H, N2 = 2, 3
    sd = {"D": torch.ones(H), "kernel.log_dt": torch.zeros(H), "kernel.log_A_real": torch.zeros(H, N2),
          "kernel.A_imag": torch.zeros(H, N2), "kernel.C": torch.zeros(H, N2, 2),
          "output_linear.0.weight": torch.zeros(2 * H, H, 1), "output_linear.0.bias": torch.zeros(2 * H)}
    assert isinstance(from_official_s4(sd), ssm.S4D)
    for key, value in [("kernel.log_dt", torch.zeros(H + 1)), ("kernel.A_imag", torch.zeros(H, N2 + 1)),
                       ("output_linear.0.weight", torch.zeros(2 * H, H)), ("D", torch.zeros(H, 1))]:
        with pytest.raises(ValueError, match=f"'{key}'.*shape"):
            from_official_s4(dict(sd, **{key: value}))
    with pytest.raises(ValueError, match="'output_linear.0.bias'"):
        from_official_s4({k: v for k, v in sd.items() if k != "output_linear.0.bias"})
