"""S4's opt-in C~ parametrization (``c_tilde_length``): the same system as the true-C layer whose C is
C~ (I - Ab^L0)^{-1}, so kernels (shorter, equal and longer than L0), step and state passing all agree."""

from __future__ import annotations

import pytest
import torch

import ssm


def pair(L0: int, channels: int = 1):
    """(layer with C~ for L0, true-C layer with C = C~ (I - Ab^L0)^{-1} and the other parameters equal)."""
    torch.manual_seed(0)
    tilde = ssm.S4(6, 8, c_tilde_length=L0, channels=channels, dtype=torch.float64)
    plain = ssm.S4(6, 8, channels=channels, dtype=torch.float64)
    state = {k: v for k, v in tilde.state_dict().items() if k != "_extra_state"}
    plain.load_state_dict(state, strict=False)
    with torch.no_grad():
        plain.C.copy_(torch.view_as_real(tilde.discrete_system().C))
    return tilde, plain


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("L", [1, 7, 24, 40])
def test_kernel_equals_the_true_c_layer(channels, L):
    tilde, plain = pair(24, channels)
    torch.testing.assert_close(tilde.kernel(L), plain.kernel(L), rtol=1e-9, atol=1e-11)


def test_step_and_state_passing_equal_forward():
    tilde, plain = pair(16)
    x = torch.randn(2, 20, 6, dtype=torch.float64)
    y, s = tilde(x[:, :12], return_state=True)
    y2 = tilde(x[:, 12:], s)
    torch.testing.assert_close(torch.cat([y, y2], 1), plain(x), rtol=1e-9, atol=1e-10)
    state, ys = tilde.default_state(2), []
    for t in range(20):
        yt, state = tilde.step(x[:, t], state)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), plain(x), rtol=1e-9, atol=1e-10)


def test_the_kernel_at_l0_forms_no_power_and_trains_c_tilde():
    tilde, _ = pair(16)
    x = torch.randn(2, 16, 6, dtype=torch.float64)
    tilde(x).square().sum().backward()
    assert tilde.C.grad is not None and tilde.C.grad.abs().sum() > 0


def test_checkpoints_of_the_two_parametrizations_do_not_mix():
    """A mismatch is listed like the other configuration mismatches (warned, unexpected key)."""
    tilde, plain = pair(16)
    other = ssm.S4(6, 8, c_tilde_length=32, dtype=torch.float64)
    for target, source in ((plain, tilde), (tilde, plain), (other, tilde)):
        with pytest.warns(UserWarning, match="c_tilde_length"), \
                pytest.raises(RuntimeError, match="_extra_state"):
            target.load_state_dict(source.state_dict())
    again = ssm.S4(6, 8, c_tilde_length=16, dtype=torch.float64)
    again.load_state_dict(tilde.state_dict())


@pytest.mark.parametrize("kwargs, match", [({"c_tilde_length": 0}, "c_tilde_length"),
                                           ({"c_tilde_length": 8, "disc": "zoh"}, "bilinear")])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ssm.S4(4, 4, **kwargs)
