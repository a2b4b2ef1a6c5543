"""Power sums of conjugate pairs (ssm.ops.vandermonde.vandermonde_pairs) against the reference twin: values,
the float32 accuracy that float64 nodes buy at long L, x = 0, gradients (float64 gradcheck and
gradgradcheck, groups of rows), bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, rel_err

import ssm.ops.vandermonde as vandermonde
from ssm.ops.vandermonde import vandermonde_pairs, vandermonde_pairs_ref

C128 = torch.complex128


def _operands(E=3, W=5, N=4, radius=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = radius * torch.rand(W, N, generator=g, dtype=torch.float64) ** 0.1
    theta = 3 * torch.rand(W, N, generator=g, dtype=torch.float64)
    x = torch.polar(r, theta)
    v = torch.complex(torch.randn(E, W, N, generator=g, dtype=torch.float64),
                      torch.randn(E, W, N, generator=g, dtype=torch.float64))
    return v, x


@pytest.mark.parametrize("L", [1, 2, 3, 10, 65])
def test_matches_reference(L):
    v, x = _operands()
    x[0, 0] = 0  # a node at zero (no logarithm is taken)
    got = vandermonde_pairs(v, x, L)
    assert got.shape == (3, 5, L) and got.dtype == torch.float64
    assert rel_err(got, vandermonde_pairs_ref(v, x, L)) <= TOL[torch.float64][0]


def test_float64_nodes_keep_float32_accuracy_at_long_L():
    # complex64 coefficients with complex128 nodes near the unit circle: the powers are formed in float64 and
    # rounded once, where rounding the nodes first costs a phase error ~ l |Im log x| 2^-24
    v, x = _operands(E=2, W=3, N=8, radius=0.9999)
    L = 4096
    ref = vandermonde_pairs_ref(v, x, L)
    got = vandermonde_pairs(v.to(torch.complex64), x, L)
    assert got.dtype == torch.float32
    rounded_nodes = vandermonde_pairs(v.to(torch.complex64), x.to(torch.complex64), L)
    assert rel_err(got, ref) <= 1e-6
    assert rel_err(got, ref) < rel_err(rounded_nodes, ref) / 10
    wide_out = vandermonde_pairs(v.to(torch.complex64), x, L, torch.float64)
    assert wide_out.dtype == torch.float64 and rel_err(wide_out, ref) <= 1e-6


def test_groups_of_rows_give_the_same_values_and_gradients(monkeypatch):
    v, x = (t.requires_grad_() for t in _operands(W=7))
    w = torch.randn(3, 7, 40, dtype=torch.float64)
    full = vandermonde_pairs(v, x, 40)
    g_full = torch.autograd.grad((full * w).sum(), (v, x))
    monkeypatch.setattr(vandermonde, "PAIRS_GROUP_BYTES", 1)  # one row per group
    grouped = vandermonde_pairs(v, x, 40)
    g_grouped = torch.autograd.grad((grouped * w).sum(), (v, x))
    assert torch.equal(full, grouped)
    for a, b in zip(g_full, g_grouped):
        assert rel_err(a, b) <= 1e-14
    # against autograd through the reference
    g_ref = torch.autograd.grad((vandermonde_pairs_ref(v, x, 40) * w).sum(), (v, x))
    for a, b in zip(g_full, g_ref):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("L", [1, 5, 12])
def test_gradcheck_and_gradgradcheck(L):
    v, x = _operands(E=2, W=3, N=2)
    x[1, 1] = 0
    v, x = v.requires_grad_(), x.requires_grad_()

    def f(v, x):
        return vandermonde_pairs(v, x, L)

    assert torch.autograd.gradcheck(f, (v, x))
    assert torch.autograd.gradgradcheck(f, (v, x))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda v, x: vandermonde_pairs(v.real, x, 4), "must be complex"),
        (lambda v, x: vandermonde_pairs(v, x.to(torch.complex64), 4), "at least as wide"),
        (lambda v, x: vandermonde_pairs(v[:, :2], x, 4), "shape \\(E, W, N\\)"),
        (lambda v, x: vandermonde_pairs(v[0], x, 4), "3 dimensions"),
        (lambda v, x: vandermonde_pairs(v, x, 0), "L"),
        (lambda v, x: vandermonde_pairs(v, x, 4, torch.int64), "dtype must be"),
        (lambda v, x: vandermonde_pairs(v, x.to("meta"), 4), "one device"),
    ],
)
def test_bad_input(call, match):
    v, x = _operands()
    with pytest.raises(ValueError, match=match):
        call(v, x)
