"""Layers: the convolutional and recurrent paths agree, for every layer, init and disc."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tol

import ssm
from ssm.layers.s4 import S4_INITS
from ssm.layers.s4d import S4D_INITS

# step == forward and chunked == one pass in float32: the tolerance table's float32 entry.
RTOL32 = tol(torch.float32)["rtol"]

H, N = 4, 16
CONFIGS = (
    [("s4", {"init": i, "disc": d}) for i in S4_INITS for d in ("bilinear", "zoh")]
    + [("s4d", {"init": i, "disc": d})
       for i in S4D_INITS if i.startswith("diag-") for d in ("zoh", "bilinear")]
    + [("rtf", {}), ("rtf", {"constraint": "stable"})]
)
IDS = [f"{name}-{'-'.join(str(v) for v in kw.values()) or 'default'}" for name, kw in CONFIGS]


def make(name: str, **kw) -> ssm.SSMLayer:
    layer = ssm.layers.LAYERS[name](H, N, **kw)
    with torch.no_grad():  # move the output weights off their init so every path is exercised
        layer.D.normal_()
    return layer.eval()


def run_steps(layer, x: torch.Tensor, state=None):
    """Loop of step over x (B, L, H) -> (y (B, L, H), final state)."""
    state = layer.default_state(x.shape[0]) if state is None else state
    ys = []
    for t in range(x.shape[1]):
        y, state = layer.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_step_equals_forward(name, kw):
    layer = make(name, **kw)
    x = torch.randn(2, 257, H)
    with torch.no_grad():
        y_conv, s_conv = layer(x, return_state=True)
        y_rec, s_rec = run_steps(layer, x)
    assert rel_err(y_rec, y_conv) <= RTOL32
    assert rel_err(s_rec, s_conv) <= RTOL32


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_chunked_forward_equals_one_pass(name, kw):
    layer = make(name, **kw)
    x = torch.randn(2, 150, H)
    with torch.no_grad():
        y_full, s_full = layer(x, return_state=True)
        state, ys = None, []
        for chunk in (x[:, :37], x[:, 37:101], x[:, 101:]):
            y, state = layer(chunk, state, return_state=True)
            ys.append(y)
        # and steps continuing from a chunk's state
        y_a, s_a = layer(x[:, :100], return_state=True)
        y_b, s_b = run_steps(layer, x[:, 100:], s_a)
    assert rel_err(torch.cat(ys, 1), y_full) <= RTOL32
    assert rel_err(state, s_full) <= RTOL32
    assert rel_err(torch.cat([y_a, y_b], 1), y_full) <= RTOL32
    assert rel_err(s_b, s_full) <= RTOL32


@pytest.mark.parametrize("name", ["s4", "s4d", "rtf"])
def test_causal_and_bidirectional(name):
    x = torch.randn(2, 64, H)
    x2 = x.clone()
    x2[:, 40:] += 1.0
    causal = make(name)
    bidir = make(name, bidirectional=True)
    with torch.no_grad():
        yc, yc2 = causal(x), causal(x2)
        yb, yb2 = bidir(x), bidir(x2)
    torch.testing.assert_close(yc[:, :40], yc2[:, :40])
    assert (yc[:, 40:] - yc2[:, 40:]).abs().max() > 1e-3
    assert (yb[:, :40] - yb2[:, :40]).abs().max() > 1e-4  # the anti-causal kernel sees the future


@pytest.mark.parametrize("name", ["s4", "s4d", "rtf"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_does_not_leak(name, bidirectional):
    layer = make(name, bidirectional=bidirectional)
    x = torch.randn(3, 50, H)
    lengths = torch.tensor([50, 31, 7])
    x2 = x.clone()
    for b, n in enumerate(lengths.tolist()):
        x2[b, n:] = torch.randn(50 - n, H) * 10
    with torch.no_grad():
        y, y2 = layer(x, lengths=lengths), layer(x2, lengths=lengths)
        y_alone = layer(x[1:2, :31])  # the valid part alone
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(y[b, :n], y2[b, :n])
    torch.testing.assert_close(y[1, :31], y_alone[0], **tol(torch.float32))


@pytest.mark.parametrize("name", ["s4", "s4d", "rtf"])
def test_transposed_layout(name):
    torch.manual_seed(1)
    a = make(name)
    torch.manual_seed(1)
    b = make(name, transposed=True)
    x = torch.randn(2, 33, H)
    with torch.no_grad():
        torch.testing.assert_close(b(x.transpose(1, 2)).transpose(1, 2), a(x))


@pytest.mark.parametrize("name", ["s4", "s4d", "rtf"])
def test_channels(name):
    layer = make(name, channels=3)
    x = torch.randn(2, 40, H)
    with torch.no_grad():
        y = layer(x)
        y_rec, _ = run_steps(layer, x)
    assert y.shape == (2, 40, H)
    assert layer.kernel(40).shape == (3, H, 40)
    assert rel_err(y_rec, y) <= RTOL32


@pytest.mark.parametrize("name", ["s4", "s4d", "rtf"])
def test_state_dict_round_trip_and_gradients(name):
    layer = make(name, channels=2).train()
    x = torch.randn(2, 30, H)
    layer(x).square().mean().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    other = ssm.layers.LAYERS[name](H, N, channels=2)
    other.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), layer.eval()(x))


@pytest.mark.parametrize("name", ["s4", "s4d"])
def test_rate_scales_dt(name):
    layer = make(name)
    x = torch.randn(1, 64, H)
    with torch.no_grad():
        K1 = layer.kernel(64, rate=0.5)
        log_dt = layer.log_dt.clone()
        layer.log_dt.add_(torch.log(torch.tensor(0.5)))
        K2 = layer.kernel(64)
        layer.log_dt.copy_(log_dt)
        y_rate = layer(x, rate=0.5)
        y_steps = torch.stack([s for s in _steps_rate(layer, x, 0.5)], 1)
    torch.testing.assert_close(K1, K2)
    assert rel_err(y_steps, y_rate) <= RTOL32


def _steps_rate(layer, x, rate):
    state = layer.default_state(x.shape[0])
    for t in range(x.shape[1]):
        y, state = layer.step(x[:, t], state, rate=rate)
        yield y


def test_kernel_cache_in_eval():
    layer = make("s4")
    with torch.no_grad():
        K1 = layer.kernel(32)
        assert layer.kernel(32) is K1  # reused while nothing changed
        layer.B.add_(0.1)
        K2 = layer.kernel(32)
    assert K2 is not K1 and not torch.allclose(K1, K2)
    layer.train()
    assert layer.kernel(32) is not layer.kernel(32)


@pytest.mark.parametrize("name", ["s4", "s4d", "rtf"])
def test_bad_inputs(name):
    layer = make(name)
    with pytest.raises(ValueError, match="x must"):
        layer(torch.randn(2, 10))
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(2, 10, H + 1))
    with pytest.raises(ValueError, match="state must"):
        layer(torch.randn(2, 10, H), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="state must"):
        layer.step(torch.randn(2, H), torch.zeros(2, H, 1))
    with pytest.raises(ValueError, match="x must"):
        layer.step(torch.randn(2, H + 1), layer.default_state(2))
    with pytest.raises(ValueError, match="lengths"):
        layer(torch.randn(2, 10, H), lengths=torch.tensor([3, 11]))
    bidir = make(name, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional"):
        bidir.step(torch.randn(2, H), bidir.default_state(2))
    with pytest.raises(ValueError, match="d_state"):
        ssm.layers.LAYERS[name](H, 0)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="init"):
        ssm.S4(H, N, init="nope")
    with pytest.raises(ValueError, match="disc"):
        ssm.S4D(H, N, disc="rk4")
    with pytest.raises(ValueError, match="d_state"):
        ssm.S4D(H, 15)
    with pytest.raises(ValueError, match="dt_min"):
        ssm.S4(H, N, dt_min=0.2, dt_max=0.1)
    with pytest.raises(ValueError, match="activation"):
        ssm.S4(H, N, activation="swish")
    with pytest.raises(ValueError, match="rank"):
        ssm.S4(H, N, init="legt", rank=1)


@pytest.mark.parametrize("name", ["s4", "s4d", "rtf"])
def test_paths_agree_on_device(name, device):
    """The same equivalences on every device (the CUDA case runs where CUDA is available)."""
    layer = make(name).to(device)
    x = torch.randn(2, 65, H, device=device)
    with torch.no_grad():
        y_conv, s_conv = layer(x, return_state=True)
        y_rec, s_rec = run_steps(layer, x)
        y1, s1 = layer(x[:, :30], return_state=True)
        y2 = layer(x[:, 30:], s1)
    assert y_conv.device.type == device.type and s_conv.device.type == device.type
    assert rel_err(y_rec, y_conv) <= RTOL32
    assert rel_err(s_rec, s_conv) <= RTOL32
    assert rel_err(torch.cat([y1, y2], 1), y_conv) <= RTOL32


@pytest.mark.parametrize("name", ["s4", "s4d", "rtf"])
def test_bf16_autocast_close_to_float32(name):
    layer = make(name)
    x = torch.randn(2, 128, H)
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            K = layer.kernel(128)
    assert K.dtype == torch.float32  # the kernel stays in float32 under autocast
    assert torch.isfinite(y).all()
    assert rel_err(y.float(), ref) <= 3e-2


@pytest.mark.parametrize("name", ["s4", "s4d", "rtf"])
def test_double_precision_layer(name):
    layer = ssm.layers.LAYERS[name](H, N, dtype=torch.float64).eval()
    x = torch.randn(1, 80, H, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        y_rec, _ = run_steps(layer, x)
    assert y.dtype == torch.float64
    assert rel_err(y_rec, y) <= 10 * tol(torch.float64)["rtol"]


@pytest.mark.parametrize("name", ["s4", "s4d", "rtf"])
def test_bidirectional_kernel_reaches_lag_minus_one(name):
    """The anti-causal kernel's first tap (lag -1, the next input) is free, as for the causal lag 0."""
    layer = make(name, bidirectional=True)
    with torch.no_grad():
        K = layer.kernel(16)
    assert K.shape == (2, H, 16)
    assert K[1, :, 0].abs().min() > 1e-6
