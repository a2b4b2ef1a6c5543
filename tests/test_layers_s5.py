"""ssm.S5: the layer on the family protocol (state passing, streaming, bidirectional, lengths, the paper's
initialization, optimizer hints, argument checks)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tol

import ssm
from ssm.hippo import nplr, rank_correction, transition
from ssm.layers.s5 import s5_init
from ssm.systems import s5

F64 = torch.float64
CONFIGS = [{}, {"disc": "bilinear"}, {"conj_sym": False}, {"blocks": 2}, {"blocks": 4, "d_state": 8}]


def _layer(**kw):
    kw = {"d_state": 8, **kw}
    return ssm.S5(6, kw.pop("d_state"), dtype=F64, **kw)


@pytest.mark.parametrize("kw", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("L", [1, 17, 130])
def test_forward_from_state_equals_step_loop(kw, L):
    layer = _layer(**kw)
    state = layer.default_state(3)
    state = state + torch.randn_like(state)
    x = torch.randn(3, L, 6, dtype=F64)
    y, next_state = layer(x, state, return_state=True, rate=1.5)
    s, ys = state, []
    for k in range(L):
        yk, s = layer.step(x[:, k], s, rate=1.5)
        ys.append(yk)
    assert rel_err(y, torch.stack(ys, 1)) < 1e-10
    assert rel_err(next_state, s) < 1e-10


def test_streaming_in_chunks_equals_one_pass():
    layer = _layer(blocks=2).eval()
    x = torch.randn(2, 100, 6, dtype=F64)
    with torch.no_grad():
        y, s = layer(x, return_state=True)
        state, parts = layer.default_state(2), []
        for a, b in ((0, 1), (1, 38), (38, 64), (64, 100)):
            y_part, state = layer(x[:, a:b], state, return_state=True)
            parts.append(y_part)
    assert rel_err(torch.cat(parts, 1), y) < 1e-12 and rel_err(state, s) < 1e-12


def test_forward_is_the_system_scan_plus_skip():
    layer = _layer(activation="identity")
    x = torch.randn(2, 40, 6, dtype=F64)
    sys = layer.discrete_system()
    y_ref, _ = s5.scan_ref(sys, x)
    y_ref = layer.out_proj(y_ref + layer.D[0] * x)
    assert rel_err(layer(x), y_ref) < 1e-10
    assert isinstance(sys, s5.S5System) and sys.Bb.shape == (4, 6) and sys.C.shape == (1, 6, 4)
    torch.testing.assert_close(layer.discrete_system(rate=2.0).dt, 2 * sys.dt)


def test_bidirectional_is_a_second_scan_backward_in_time():
    layer = _layer(bidirectional=True, activation="identity")
    x = torch.randn(2, 33, 6, dtype=F64)
    sys = layer.discrete_system()
    assert sys.C.shape[0] == 2
    y_fwd, _ = s5.scan_ref(sys, x, channel=0)
    y_bwd, _ = s5.scan_ref(sys, x.flip(1), channel=1)
    y_ref = layer.out_proj(y_fwd + y_bwd.flip(1) + layer.D[0] * x)
    assert rel_err(layer(x), y_ref) < 1e-10
    # position 0 sees the future
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert (layer(x2)[:, 0] - layer(x)[:, 0]).abs().max() > 1e-6
    with pytest.raises(ValueError, match="bidirectional"):
        layer(x, torch.zeros(2, 4, dtype=torch.complex128))
    with pytest.raises(ValueError, match="bidirectional"):
        layer.step(x[:, 0], torch.zeros(2, 4, dtype=torch.complex128))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lengths_make_padding_invisible(bidirectional):
    layer = _layer(bidirectional=bidirectional)
    x = torch.randn(3, 20, 6, dtype=F64)
    lengths = torch.tensor([20, 7, 13])
    y = layer(x, lengths=lengths)
    x2 = x.clone()
    for b, n in enumerate(lengths.tolist()):
        x2[b, n:] = 100 * torch.randn_like(x2[b, n:])
    y2 = layer(x2, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        assert rel_err(y2[b, :n], y[b, :n]) < 1e-12


def test_transposed_layout_and_float32():
    layer64 = ssm.S5(6, 8, transposed=True, dtype=F64)
    layer32 = ssm.S5(6, 8, transposed=True)
    layer32.load_state_dict(layer64.state_dict())
    x = torch.randn(2, 6, 50, dtype=F64)
    y64 = layer64(x)
    assert y64.shape == (2, 6, 50)
    assert rel_err(layer32(x.float()), y64) < 1e-4
    assert layer32.default_state(2).dtype == torch.complex64


@pytest.mark.parametrize("conj_sym", [True, False])
@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_init_is_hippo_n_diagonalized_in_blocks(conj_sym, blocks):
    P, H = 16, 3
    Lambda, B, C = s5_init(P, H, blocks, conj_sym, generator=torch.Generator().manual_seed(5))
    size = P // blocks
    g = torch.Generator().manual_seed(5)
    B0 = torch.randn(P, H, dtype=F64, generator=g) / H**0.5
    Lam_j, _, _, V_j = nplr("legs", size, 1, half=conj_sym)
    assert rel_err(Lambda, Lam_j.repeat(blocks)) < 1e-14
    assert torch.allclose(Lambda.real, torch.full_like(Lambda.real, -0.5))
    # the normal part of HiPPO-LegS, A + P P^T = -I/2 + skew, is V diag(Lambda) V^* (2 Re(...) in halves)
    A, _ = transition("legs", size)
    P0 = rank_correction("legs", size)
    AN = A + P0.T @ P0
    full = V_j @ torch.diag(Lam_j) @ V_j.conj().T
    assert rel_err(2 * full.real if conj_sym else full, AN) < 1e-12
    # B = V^* B0 per block
    B_ref = torch.cat([V_j.conj().T @ B0[j * size:(j + 1) * size].to(torch.complex128)
                       for j in range(blocks)])
    assert rel_err(B, B_ref) < 1e-14
    assert C.shape == (H, Lambda.shape[0])
    layer = ssm.S5(H, P, blocks=blocks, conj_sym=conj_sym, dt_min=0.01, dt_max=0.02)
    assert layer.log_dt.shape == Lambda.shape
    assert bool(((layer.log_dt.exp() >= 0.01 - 1e-7) & (layer.log_dt.exp() <= 0.02 + 1e-7)).all())


def test_parameters_registered_with_hints():
    layer = ssm.S5(4, 8, ssm_lr=2e-3)
    assert set(layer._ssm_names) == {"log_neg_real", "Lambda_imag", "B", "log_dt", "C"}
    hints = layer.optimizer_hints()
    assert "C" not in hints  # C follows the global optimizer settings, as in S4
    assert hints["B"] == hints["log_dt"] == {"weight_decay": 0.0, "lr": 2e-3}
    groups = ssm.optim.param_groups(layer, lr=0.01, weight_decay=0.1)
    assert sorted(len(g["params"]) for g in groups) == [4, 4]  # D, C, out_proj (2) | Lambda (2), B, dt
    x = torch.randn(2, 30, 4)
    layer(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_eval_cache_and_kernel():
    layer = _layer().eval()
    x = torch.randn(2, 25, 6, dtype=F64)
    with torch.no_grad():
        K1 = layer.kernel(16)
        assert layer.kernel(16) is K1 and K1.shape == (1, 6, 6, 16)
        y1 = layer(x)
        layer.log_dt.data.add_(0.3)
        assert layer.kernel(16) is not K1
        torch.testing.assert_close(layer(x), layer.train()(x), **tol(F64))
        assert rel_err(layer(x), y1) > 1e-6


def test_block_and_model_build_s5_by_name():
    block = ssm.SSMBlock(8, layer="s5", d_state=8, layer_kwargs={"blocks": 2})
    assert isinstance(block.layer, ssm.S5)
    x = torch.randn(2, 30, 8)
    assert block(x).shape == (2, 30, 8)
    model = ssm.SSMModel(1, 10, d_model=8, n_layers=2, layer="s5", d_state=8)
    assert model(torch.randn(2, 30, 1)).shape == (2, 10)
    assert "s5" in ssm.layers.LAYERS and "S5" in ssm.__all__


@pytest.mark.parametrize("kwargs, word", [
    ({"d_state": 12, "blocks": 5}, "blocks"),
    ({"d_state": 12, "blocks": 4}, "d_state"),  # blocks of 3 states cannot hold conjugate pairs
    ({"blocks": 0}, "blocks"),
    ({"d_state": 0}, "d_state"),
    ({"disc": "euler"}, "disc"),
    ({"conj_sym": "yes"}, "conj_sym"),
    ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
    ({"activation": "swish"}, "activation"),
])
def test_bad_arguments_name_the_argument(kwargs, word):
    kwargs = {"d_state": 8, **kwargs}
    with pytest.raises(ValueError, match=word):
        ssm.S5(4, kwargs.pop("d_state"), **kwargs)


def test_bad_call_arguments():
    layer = ssm.S5(4, 8)
    assert ssm.S5(4, 12, blocks=3, conj_sym=False).default_state(1).shape == (1, 12)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(2, 10, 5))
    with pytest.raises(ValueError, match="state"):
        layer(torch.randn(2, 10, 4), torch.zeros(2, 5, dtype=torch.complex64))
    with pytest.raises(ValueError, match="state"):
        layer.step(torch.randn(2, 4), torch.zeros(2, 4))  # real instead of complex
    with pytest.raises(ValueError, match="lengths"):
        layer(torch.randn(2, 10, 4), lengths=torch.tensor([11, 3]))
    with pytest.raises(ValueError, match="rate"):
        layer(torch.randn(2, 10, 4), rate=0.0)
