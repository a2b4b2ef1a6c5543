"""Registry-wide checks: every layer in ``ssm.layers.LAYERS``, LTI or selective, whatever its state's
structure, goes through the same verbs with the same guarantees (step == forward == chunks, padding, meta
builds, optimizer hints, half precision, checks). A new family in the registry is covered here at once."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SMALL, make_layer, tol

import ssm
from ssm.layers import LAYERS
from ssm.layers.base import map_state, state_leaves

NAMES = sorted(LAYERS)
H, N = 4, 8


def _close_states(a, b, dtype=torch.float64):
    la, lb = state_leaves(a), state_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, **tol(y.dtype if y.dtype in (torch.float32, torch.float64,
                                                                       torch.complex64, torch.complex128)
                                               else dtype))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("L", [1, 11])
def test_step_equals_forward_equals_chunks(name, L):
    layer = make_layer(name, H, N, dtype=torch.float64)
    x = torch.randn(2, L, H, dtype=torch.float64)
    s0 = map_state(lambda t: torch.randn_like(t) * 0.3, layer.default_state(2))
    y, s = layer(x, s0, return_state=True)
    state, ys = s0, []
    for t in range(L):
        yt, state = layer.step(x[:, t], state)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, **tol(torch.float64))
    _close_states(state, s)
    k = L // 2
    y1, s1 = layer(x[:, :k], s0, return_state=True)
    y2, s2 = layer(x[:, k:], s1, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, **tol(torch.float64))
    _close_states(s2, s)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_right_padding_changes_no_valid_output(name, bidirectional):
    layer = make_layer(name, H, N, bidirectional=bidirectional, dtype=torch.float64)
    x = torch.randn(3, 9, H, dtype=torch.float64)
    lengths = torch.tensor([9, 4, 0])
    noisy = x.clone()
    noisy[1, 4:] = 1e3
    y = layer(noisy, lengths=lengths)
    torch.testing.assert_close(y[1, :4], layer(x[1:2, :4])[0], **tol(torch.float64))
    torch.testing.assert_close(y[0], layer(x[:1])[0], **tol(torch.float64))


@pytest.mark.parametrize("name", NAMES)
def test_return_state_with_lengths(name):
    layer = make_layer(name, H, N, dtype=torch.float64)
    x = torch.randn(2, 9, H, dtype=torch.float64)
    lengths = torch.tensor([9, 5])
    if not layer.ragged_state:
        with pytest.raises(ValueError, match="return_state with lengths"):
            layer(x, lengths=lengths, return_state=True)
        return
    _, s = layer(x, lengths=lengths, return_state=True)
    _, s_short = layer(x[1:, :5], return_state=True)
    _close_states(map_state(lambda t: t[1:], s), s_short)


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_through_masked_forward(name):
    layer = make_layer(name, H, N, dtype=torch.float64)
    x = torch.randn(2, 9, H, dtype=torch.float64)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, :3] = False
    noisy = x.clone()
    noisy[1, :3] = 1e3
    y, s = layer.masked_forward(noisy, keep, return_state=True)
    y_ref, s_ref = layer(x[1:, 3:], return_state=True)
    torch.testing.assert_close(y[1, 3:], y_ref[0], **tol(torch.float64))
    _close_states(map_state(lambda t: t[1:], s), s_ref)


@pytest.mark.parametrize("name", NAMES)
def test_states_at_positions_through_masked_forward(name):
    """A left-padded prefill (a generation cache's), then a padded chunk continuing its state: the states
    after chosen positions equal the masked run of each prefix."""
    layer = make_layer(name, H, N, dtype=torch.float64)
    if layer.bidirectional:
        pytest.skip("no state passing in a bidirectional layer")
    x = torch.randn(2, 9, H, dtype=torch.float64)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, :3] = False
    at = torch.tensor([6, 2, 8])
    for s0, k in ((None, keep), (layer(x, return_state=True)[1], keep | True)):
        # (a state continued under padding: each family's own masked semantics, so only real tokens here)
        y, s, states = layer.masked_forward(x, k, s0, return_state=True, return_states_at=at)
        torch.testing.assert_close(y, layer.masked_forward(x, k, s0), **tol(torch.float64))
        _close_states(s, layer.masked_forward(x, k, s0, return_state=True)[1])
        for i, p in enumerate(at.tolist()):
            _, s_p = layer.masked_forward(x[:, :p + 1], k[:, :p + 1], s0, return_state=True)
            _close_states(map_state(lambda t, i=i: t[i], states), s_p)


@pytest.mark.parametrize("name", NAMES)
def test_meta_build_then_reset_parameters_restores_the_initialization(name):
    torch.manual_seed(3)
    ref = make_layer(name, H, N)
    with torch.device("meta"):
        torch.manual_seed(3)
        layer = make_layer(name, H, N)
    assert all(p.device.type == "meta" for p in layer.parameters())
    layer.to_empty(device="cpu")
    torch.manual_seed(3)
    layer.reset_parameters()
    for (n, p), (_, q) in zip(layer.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", NAMES)
def test_ssm_parameters_get_their_hints(name):
    layer = make_layer(name, H, N, ssm_weight_decay=0.0)
    groups = ssm.optim.param_groups(layer, lr=1e-2, weight_decay=0.1)
    hinted = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = {n for n, p in layer.named_parameters() if id(p) in hinted}
    assert names and set(layer.optimizer_hints()) <= names
    if name in ("mamba", "mamba2"):
        assert {"A_log", "D"} <= names and ({"dt_proj.bias"} <= names or {"dt_bias"} <= names)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_with_a_float32_state(name, dtype):
    layer = make_layer(name, H, N)
    x = torch.randn(2, 10, H)
    ref = layer(x)
    half = copy.deepcopy(layer).to(dtype)
    y, s = half(x.to(dtype), return_state=True)
    assert y.dtype == dtype
    # states in float32 at least (RTF keeps float64 states: streaming near the unit circle needs them)
    wide = (torch.float64,) if name == "rtf" else (torch.float32, torch.complex64)
    assert all(t.dtype in wide for t in state_leaves(s))
    err = float((y.float() - ref).norm() / ref.norm())
    assert err < 0.05, err
    yt, _ = half.step(x[:, 0].to(dtype), half.default_state(2))
    assert yt.dtype == dtype


@pytest.mark.parametrize("name", NAMES)
def test_bad_states_and_steps_are_named(name):
    layer = make_layer(name, H, N)
    with pytest.raises(ValueError, match="state must"):
        layer(torch.randn(2, 5, H), map_state(lambda t: t[:1], layer.default_state(2)))
    with pytest.raises(ValueError, match="state must"):
        layer.step(torch.randn(2, H), torch.zeros(3))
    with pytest.raises(ValueError, match="x must"):
        layer.step(torch.randn(2, H + 1), layer.default_state(2))
    bi = make_layer(name, H, N, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional"):
        bi.step(torch.randn(2, H), layer.default_state(2))
    with pytest.raises(ValueError, match="bidirectional"):
        bi(torch.randn(2, 5, H), return_state=True)


@pytest.mark.parametrize("name", NAMES)
def test_transposed_layout_and_state_dict_round_trip(name):
    layer = make_layer(name, H, N, transposed=True)
    x = torch.randn(2, H, 7)
    y = layer(x)
    assert y.shape == (2, H, 7)
    other = make_layer(name, H, N, transposed=True)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(x), y)
    assert "d_state=8" in repr(layer)


@pytest.mark.parametrize("name", NAMES)
def test_blocks_and_models_carry_any_state(name):
    model = ssm.SSMModel(3, 2, d_model=H, n_layers=2, layer=name, d_state=N, pool="none",
                         layer_kwargs=SMALL.get(name), dtype=torch.float64)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    y, state = model(x, return_state=True)
    s, ys = model.default_state(2), []
    for t in range(6):
        yt, s = model.step(x[:, t], s)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, **tol(torch.float64))
