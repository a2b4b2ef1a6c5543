"""Truncated power series (ssm.ops.series) against their float64 reference twins: values, gradients (the
FFT backward against plain autograd, float64 gradcheck and gradgradcheck), groups of features, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, rel_err

import ssm.ops.series as series
from ssm.ops.series import series_fraction, series_fraction_ref, series_inverse, series_inverse_ref

F64 = torch.float64


def _denominator(*shape, dtype=F64, seed=0):
    """1 + a small series: its inverse decays, so the test is well conditioned at any length."""
    g = torch.Generator().manual_seed(seed)
    d = 0.3 * torch.randn(*shape, generator=g, dtype=F64) / (1 + torch.arange(shape[-1], dtype=F64)) ** 2
    d[..., 0] = 1 + d[..., 0].abs()
    return d.to(dtype)


def _operands(C, M, L, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    p = torch.randn(*((C,) if C else ()), M, L, generator=g, dtype=F64).to(dtype)
    q = torch.randn(M, L, generator=g, dtype=F64).to(dtype)
    return p, q, _denominator(M, L, dtype=dtype, seed=seed)


@pytest.mark.parametrize("L", [1, 2, 3, 5, 16, 37, 64])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_inverse_matches_forward_substitution(L, dtype):
    d = _denominator(2, 3, L, dtype=dtype)
    g = series_inverse(d)
    assert g.dtype == dtype and g.shape == d.shape
    assert rel_err(g, series_inverse_ref(d)) <= TOL[dtype][0]
    one = _one(L, dtype).expand_as(d).contiguous()
    assert rel_err(series_fraction(g, d, one), one) <= TOL[dtype][0]  # g d = 1 mod z^L


def _one(L, dtype):
    e = torch.zeros(L, dtype=dtype)
    e[0] = 1
    return e


@pytest.mark.parametrize("L", [1, 2, 7, 64, 100])
@pytest.mark.parametrize("C", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fraction_matches_direct_sums(L, C, dtype):
    p, q, d = _operands(C, 4, L, dtype)
    y = series_fraction(p, q, d)
    assert y.shape == p.shape and y.dtype == dtype
    assert rel_err(y, series_fraction_ref(p, q, d)) <= TOL[dtype][0]


@pytest.mark.parametrize("C", [0, 2])
def test_fraction_gradients_match_plain_autograd_with_groups(monkeypatch, C):
    # the FFT backward (several feature groups) against autograd through the plain FFT ops
    p, q, d = (t.requires_grad_() for t in _operands(C, 5, 300))
    w = torch.randn(p.shape, dtype=F64)
    monkeypatch.setattr(series, "FRACTION_GROUP_BYTES", 1)  # one feature per group
    got = torch.autograd.grad((series_fraction(p, q, d) * w).sum(), (p, q, d))
    want = torch.autograd.grad((series._fraction_plain(p, q, d) * w).sum(), (p, q, d))
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-12
    # a subset of the inputs needing gradients
    q2 = q.detach()
    got_d = torch.autograd.grad((series_fraction(p.detach(), q2, d) * w).sum(), d)[0]
    assert rel_err(got_d, want[2]) <= 1e-12


@pytest.mark.parametrize("L", [1, 2, 6, 13])
def test_fraction_gradcheck_and_gradgradcheck(L):
    p, q, d = (t.requires_grad_() for t in _operands(2, 3, L))
    assert torch.autograd.gradcheck(series_fraction, (p, q, d))
    assert torch.autograd.gradgradcheck(series_fraction, (p, q, d))


@pytest.mark.parametrize("L", [1, 4, 11])
def test_inverse_gradcheck_and_gradgradcheck(L):
    d = _denominator(3, L).requires_grad_()
    assert torch.autograd.gradcheck(series_inverse, (d,))
    assert torch.autograd.gradgradcheck(series_inverse, (d,))


def test_without_grad_matches_with_grad():
    p, q, d = _operands(1, 3, 50)
    with torch.no_grad():
        plain = series_fraction(p, q, d)
    fast = series_fraction(p.requires_grad_(), q, d)
    assert torch.equal(plain, fast.detach()) or rel_err(fast, plain) <= 1e-14


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: series_inverse(torch.zeros(2, 3, dtype=F64)), "nonzero constant coefficient"),
        (lambda: series_inverse(torch.ones(2, 0)), "at least one coefficient"),
        (lambda: series_inverse(torch.ones(3, dtype=torch.complex64)), "real floating-point"),
        (lambda: series_inverse([1.0, 2.0]), "torch.Tensor"),
        (lambda: series_fraction(*_operands(0, 2, 5)[:2], torch.ones(2, 4, dtype=F64)), "q must have d's"),
        (lambda: series_fraction(torch.ones(3, 5, dtype=F64), *_operands(0, 2, 5)[1:]), "p must have shape"),
        (lambda: series_fraction(torch.ones(1, 1, 2, 5, dtype=F64), *_operands(0, 2, 5)[1:]), "p must have"),
        (lambda: series_fraction(_operands(0, 2, 5)[0].float(), *_operands(0, 2, 5)[1:]), "one dtype"),
        (lambda: series_fraction(_operands(0, 2, 5)[0].to("meta"), *_operands(0, 2, 5)[1:]), "one device"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
