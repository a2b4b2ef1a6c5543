"""FFT convolution against the direct O(L^2) reference, for any L, both layouts, channels, bidirectional."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tol

import ssm.ops.fftconv as fftconv_module
from ssm.ops.fftconv import circular_conv, fftconv, next_fast_len
from ssm.reference import causal_conv_ref

F64 = tol(torch.float64)


def _smooth(m: int) -> bool:
    for p in (2, 3, 5):
        while m % p == 0:
            m //= p
    return m == 1


def test_next_fast_len_is_smallest_smooth():
    for n in range(1, 2000):
        m = next_fast_len(n)
        assert m >= n and _smooth(m), n
        assert not any(_smooth(k) for k in range(n, m)), n
    for n in (2**20 + 1, 10**6 + 7, 3**13 + 1):
        m = next_fast_len(n)
        assert m >= n and _smooth(m) and not any(_smooth(k) for k in range(n, m)), n
    with pytest.raises(ValueError, match="n"):
        next_fast_len(0)


LENGTHS = [1, 2, 3, 7, 13, 31, 64, 97, 100, 257]


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("kernel_len", ["short", "equal", "long"])
def test_causal_matches_reference_float64(L, kernel_len):
    Bsz, H = 2, 3
    Lk = {"short": max(1, L // 3), "equal": L, "long": 2 * L + 5}[kernel_len]
    u = torch.randn(Bsz, H, L, dtype=torch.float64)
    K = torch.randn(H, Lk, dtype=torch.float64)
    D = torch.randn(H, dtype=torch.float64)
    y = fftconv(u, K, D)
    assert y.shape == (Bsz, H, L) and y.dtype == torch.float64
    torch.testing.assert_close(y, causal_conv_ref(u, K, D), **F64)
    torch.testing.assert_close(fftconv(u, K), causal_conv_ref(u, K), **F64)


@pytest.mark.parametrize("L", [1, 5, 13, 64, 97])
@pytest.mark.parametrize("layout", ["BHL", "BLH"])
def test_channels_bidirectional_layouts(L, layout, device):
    Bsz, Ch, H = 2, 3, 4
    Lk = L + 2
    u = torch.randn(Bsz, H, L, dtype=torch.float64)
    K = torch.randn(Ch, H, Lk, dtype=torch.float64)
    K_rev = torch.randn(Ch, H, Lk, dtype=torch.float64)
    D = torch.randn(Ch, H, dtype=torch.float64)
    ref = causal_conv_ref(u, K, D, K_rev=K_rev)  # (B, C, H, L)
    x = (u if layout == "BHL" else u.transpose(1, 2)).to(device)
    y = fftconv(x, K.to(device), D.to(device), K_rev=K_rev.to(device), layout=layout).cpu()
    if layout == "BLH":
        assert y.shape == (Bsz, L, Ch, H)
        y = y.permute(0, 2, 3, 1)
    assert y.shape == (Bsz, Ch, H, L)
    torch.testing.assert_close(y, ref, **F64)
    # a per-feature D (H,) is shared by all channels
    y_shared = fftconv(x, K.to(device), D[0].to(device), layout=layout).cpu()
    ref_shared = causal_conv_ref(u, K, D[0].expand(Ch, H))
    if layout == "BLH":
        y_shared = y_shared.permute(0, 2, 3, 1)
    torch.testing.assert_close(y_shared, ref_shared, **F64)


@pytest.mark.parametrize("L", [1, 2, 11, 40])
@pytest.mark.parametrize("Lk", [1, 3, 50])
def test_bidirectional_direct_formula(L, Lk):
    Bsz, H = 2, 2
    u = torch.randn(Bsz, H, L, dtype=torch.float64)
    K = torch.randn(H, Lk, dtype=torch.float64)
    K_rev = torch.randn(H, Lk, dtype=torch.float64)
    D = torch.randn(H, dtype=torch.float64)
    expected = D[:, None] * u
    for t in range(L):
        for s in range(L):
            if s <= t and t - s < Lk:
                expected[:, :, t] += K[:, t - s] * u[:, :, s]
            if s > t and s - t - 1 < Lk:
                expected[:, :, t] += K_rev[:, s - t - 1] * u[:, :, s]
    torch.testing.assert_close(fftconv(u, K, D, K_rev=K_rev), expected, **F64)
    torch.testing.assert_close(
        fftconv(u.transpose(1, 2), K, D, K_rev=K_rev, layout="BLH"), expected.transpose(1, 2), **F64
    )


@pytest.mark.parametrize("L", [17, 128, 1000])
def test_float32_against_float64_reference(L):
    Bsz, Ch, H = 2, 2, 8
    u = torch.randn(Bsz, H, L)
    K = torch.randn(Ch, H, L) * torch.exp(-torch.arange(L) / 50.0)
    K_rev = torch.randn(Ch, H, L) / L
    D = torch.randn(Ch, H)
    y = fftconv(u, K, D, K_rev=K_rev)
    assert y.dtype == torch.float32
    ref = causal_conv_ref(u, K, D, K_rev=K_rev)
    # the float32 result must be as good as the float32-rounded truth up to a small factor of eps * log n
    assert rel_err(y, ref) < 1e-5


def test_half_precision_inputs_upcast():
    Bsz, H, L = 2, 4, 50
    u = torch.randn(Bsz, L, H).to(torch.bfloat16)
    K = (torch.randn(H, L) / 5).to(torch.bfloat16)
    y = fftconv(u, K, layout="BLH")
    assert y.dtype == torch.bfloat16
    ref = causal_conv_ref(u.transpose(1, 2), K).transpose(1, 2)
    # upcast computation: the only error is the final rounding to bfloat16 (2^-8 relative)
    assert rel_err(y, ref) < 2 ** -8
    y16 = fftconv(u.to(torch.float16), K.to(torch.float16), layout="BLH")
    assert y16.dtype == torch.float16
    assert rel_err(y16, ref) < 1e-3


def test_gradcheck():
    Bsz, Ch, H, L = 2, 2, 3, 7
    u = torch.randn(Bsz, L, H, dtype=torch.float64, requires_grad=True)
    K = torch.randn(Ch, H, 5, dtype=torch.float64, requires_grad=True)
    K_rev = torch.randn(Ch, H, 5, dtype=torch.float64, requires_grad=True)
    D = torch.randn(Ch, H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: fftconv(*a[:3], K_rev=a[3], layout="BLH"), (u, K, D, K_rev))
    u2 = u.detach().transpose(1, 2).contiguous().requires_grad_()
    K2 = torch.randn(H, 9, dtype=torch.float64, requires_grad=True)  # longer than L: extra taps get zero grad
    D2 = torch.randn(H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: fftconv(a, b, c), (u2, K2, D2))
    fftconv(u2, K2, D2).sum().backward()
    assert torch.all(K2.grad[:, L:] == 0)


def test_validation():
    u = torch.randn(2, 3, 10)
    K = torch.randn(3, 10)
    with pytest.raises(ValueError, match="u"):
        fftconv(u[0], K)
    with pytest.raises(ValueError, match="u"):
        fftconv(torch.randn(2, 3, 0), K)
    with pytest.raises(ValueError, match="u"):
        fftconv(u.to(torch.complex64), K)
    with pytest.raises(ValueError, match="layout"):
        fftconv(u, K, layout="LBH")
    with pytest.raises(ValueError, match="K"):
        fftconv(u, torch.randn(4, 10))
    with pytest.raises(ValueError, match="K"):
        fftconv(u, torch.randn(10))
    with pytest.raises(ValueError, match="K"):
        fftconv(u, torch.randn(3, 0))
    with pytest.raises(ValueError, match="K"):
        fftconv(u, K.to(torch.complex64))
    with pytest.raises(ValueError, match="K"):
        fftconv(u, K, layout="BLH")  # u read as (B, L=3, H=10)
    with pytest.raises(ValueError, match="D"):
        fftconv(u, K, torch.randn(4))
    with pytest.raises(ValueError, match="D"):
        fftconv(u, K, torch.randn(2, 3))
    with pytest.raises(ValueError, match="D"):
        fftconv(u, torch.randn(2, 3, 10), torch.randn(3, 3))
    with pytest.raises(ValueError, match="K_rev"):
        fftconv(u, K, K_rev=torch.randn(3, 9))


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("channels", [False, True])
def test_circular_conv_gradcheck(channels, grouped, monkeypatch):
    """The custom backward (real FFTs only) is the adjoint of the forward: float64 gradcheck, with a strided
    (transposed) input as the layers pass it; ``grouped``: one feature per group."""
    if grouped:
        monkeypatch.setattr(fftconv_module, "GROUP_BYTES", 1)
    torch.manual_seed(0)
    u = torch.randn(2, 9, 3, dtype=torch.float64).transpose(1, 2).requires_grad_()  # (B, H, L) = (2, 3, 9)
    k = torch.randn(*((2,) if channels else ()), 3, 20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, k: circular_conv(u, k, 20), (u, k))


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("channels", [False, True])
def test_circular_conv_equals_plain_ffts(channels, grouped, monkeypatch):
    """Eager (custom Function) and the plain-op route taken under tracing give the same values and
    gradients: the latter by autograd's own FFT backward; ``grouped``: features in groups of 3 (4 = 3 + 1)."""
    if grouped:
        per_feature = 3 * (2 if channels else 1) * 51 * 2 * 8
        monkeypatch.setattr(fftconv_module, "GROUP_BYTES", 3 * per_feature)
    torch.manual_seed(1)
    u = torch.randn(3, 4, 50, dtype=torch.float64, requires_grad=True)
    k = torch.randn(*((2,) if channels else ()), 4, 100, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, *((2,) if channels else ()), 4, 50, dtype=torch.float64)
    U = torch.fft.rfft(u, n=100)
    plain = torch.fft.irfft((U.unsqueeze(1) if channels else U) * torch.fft.rfft(k, n=100), n=100)[..., :50]
    fast = circular_conv(u, k, 100)
    assert torch.allclose(fast, plain, rtol=0, atol=1e-13)
    want = torch.autograd.grad(plain, (u, k), g, retain_graph=True)
    for a, b in zip(torch.autograd.grad(fast, (u, k), g), want):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # a kernel without grad: the input's gradient alone
    (gu,) = torch.autograd.grad(circular_conv(u, k.detach(), 100), (u,), g)
    assert torch.allclose(gu, torch.autograd.grad(plain, (u,), g)[0], rtol=0, atol=1e-12)


def test_circular_conv_validation():
    u, k = torch.randn(2, 3, 5), torch.randn(3, 10)
    for args, match in [((u[0], k, 10), "u must"), ((u, k.double(), 10), "one dtype"),
                        ((u, torch.randn(4, 10), 10), "H = 3"), ((u, k, 12), "equal k's length"),
                        ((u, k[:, :4], 4), "n must be >= u's length")]:
        with pytest.raises(ValueError, match=match):
            circular_conv(*args)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("channels", [False, True])
def test_circular_conv_double_backward(channels, grouped, monkeypatch):
    """The custom backward is differentiable: float64 gradgradcheck (create_graph, as a gradient penalty or
    a Hessian-vector product needs), with one feature per group or all in one."""
    if grouped:
        monkeypatch.setattr(fftconv_module, "GROUP_BYTES", 1)
    torch.manual_seed(2)
    u = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(*((2,) if channels else ()), 3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda u, k: circular_conv(u, k, 12), (u, k))


@pytest.mark.parametrize("name", ["S4", "S4-chunked", "S4D", "S4D-chunked", "RTF"])
def test_lti_layers_double_backward(name):
    """A gradient penalty through a layer (create_graph=True) equals the one through the plain FFT ops
    (what torch.func and torch.compile differentiate); "-chunked": the kernel's chunked Cauchy / blocked
    Vandermonde Function, which "auto" takes at large sizes."""
    import ssm

    torch.manual_seed(3)
    cls, _, chunked = name.partition("-")
    layer = getattr(ssm, cls)(4, 8, **({"backend": "chunked"} if chunked else {})).double()
    x = torch.randn(2, 16, 4, dtype=torch.float64, requires_grad=True)

    params = [p for p in layer.parameters() if p.requires_grad]

    def penalty():
        # the input's gradient and the parameters' gradients penalized: the second differentiates the
        # kernel's own backward
        gs = torch.autograd.grad(layer(x).square().sum(), [x, *params], create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in gs), [x, *params], allow_unused=True)

    fast = penalty()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fftconv_module, "traced", lambda: True)  # the plain-op route
        plain = penalty()
    for a, b in zip(fast, plain):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
