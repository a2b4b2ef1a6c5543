"""The base of the linear time-invariant (LTI) layers S4, S4D, RTF and S5: the convolution, the eval cache,
the kernel and state folding.

* convolutional (``forward``): y = activation(K * u + D u) -> dropout -> output linear, with the kernel
  K (C, H, L) of the family's ``kernel`` verb;
* recurrent (``step``): one token at a time, x_k = Ab x_{k-1} + Bb u_k, y_k = C x_k + D u_k, then the same
  output stage.

A subclass owns the parameters and provides ``family`` (its module in ``ssm.systems``, of the LTI tier),
``discrete_system`` and ``default_state``; every path here calls the family's verbs (kernel, step,
free_response or state_input, final_state) on that system and nothing else.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .._checks import check_int, traced
from ..ops.fftconv import fftconv
from .base import SSMLayer, with_param_strides

#: Dtypes whose CPU values the eval cache snapshots as bytes (numpy views them; bfloat16 it cannot).
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (a step enters autocast-off only then: the context
    manager costs as much as a small op). Torch < 2.4 has no per-device query: assume it is on."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return True


class LTILayer(SSMLayer):
    """Base class of S4, S4D, RTF and S5.

    Args:
        d_model: H, the number of features (independent SSMs, one per feature).
        channels: C, output channels per feature, mixed by the output projection (C*H -> H).
        bidirectional: add an anti-causal kernel (a second set of C channels applied backwards in time).
        transposed: inputs/outputs are (B, H, L) instead of the default (B, L, H).
        activation: applied to the SSM output before the projection, one of ``ACTIVATIONS``.
        glu: the output projection maps to 2H and a GLU gates it back to H (S4's ``postact='glu'``).
        dropout: dropout after the activation.
        ssm_lr, ssm_weight_decay: optimizer hints attached to the SSM parameters (read by ``ssm.optim``);
            ``ssm_lr=None`` lets them follow the global learning rate.
    """

    def __init__(
        self,
        d_model: int,
        *,
        channels: int = 1,
        bidirectional: bool = False,
        transposed: bool = False,
        activation: str = "gelu",
        glu: bool = False,
        dropout: float = 0.0,
        ssm_lr: float | None = 1e-3,
        ssm_weight_decay: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(d_model, bidirectional=bidirectional, transposed=transposed, ssm_lr=ssm_lr,
                         ssm_weight_decay=ssm_weight_decay, dtype=dtype)
        self.channels = check_int("channels", channels, minimum=1)
        self.D = nn.Parameter(torch.randn(self.channels, d_model, device=device, dtype=dtype))
        self.init_output(self.channels * d_model, activation=activation, glu=glu, dropout=dropout,
                         device=device, dtype=dtype)
        # (snapshot of the SSM parameter values, {name: (key, inputs, value)}), replaced as one object.
        self._memo: tuple[list[tuple], dict] | None = None

    def discrete_system(self, rate: float = 1.0) -> NamedTuple:
        """The layer's discrete system in its family's structured form (differentiable; see the subclass)."""
        raise NotImplementedError

    def kernel_options(self) -> dict:
        """Keyword arguments of the family's ``kernel`` verb (the Cauchy / Vandermonde backend)."""
        return {}

    def reset_extra(self, real_dtype: torch.dtype) -> None:
        with torch.device("cpu"):
            D = torch.randn(self.D.shape, dtype=real_dtype)
        self.D.copy_(D)

    # ---- the eval cache -----------------------------------------------------------------------------------
    def _params_equal(self, snap: list[tuple]) -> bool:
        params = self.ssm_parameters()
        if len(snap) != len(params):
            return False
        for p, (shape, dtype, device, value) in zip(params, snap):
            if p.dtype != dtype or p.shape != shape:
                return False
            if isinstance(value, bytes):
                if not p.is_cpu or p.detach().numpy().tobytes() != value:
                    return False
            elif p.device != device or not torch.equal(p, value):
                return False
        return True

    @staticmethod
    def _snapshot(p: Tensor) -> tuple:
        """(shape, dtype, device, values) of a parameter. On the CPU the values are kept as bytes, compared by
        one memcmp (half the cost of ``torch.equal``, which a step pays per parameter); bitwise, so a NaN
        parameter still hits."""
        t = p.detach()
        raw = t.numpy().tobytes() if t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES else t.clone()
        return (t.shape, t.dtype, t.device, raw)

    def memo(self, name: str, key: tuple, fn, *, inputs: tuple = ()):
        """``fn()``, cached under ``name`` in eval mode without autograd while ``key`` and the values of the
        SSM parameters are unchanged; recomputed whenever a graph may be needed.

        The values are compared with a stored copy (O(H N), beside the O(H N L) kernel), so every route
        that changes a parameter counts: in-place on ``.data``, ``p.data = t``, a new Parameter object,
        ``vector_to_parameters``, ``load_state_dict``, optimizer steps, ``.to()``, ``.half().float()``.
        Thread-safe in what it stores: a value is stored only in the cache generation whose snapshot the
        parameters still equal after ``fn()`` ran, and only if its ``inputs`` (earlier cached values that
        ``fn`` reads, such as the system a kernel is built from) are that generation's own, so a call that
        raced a ``load_state_dict`` never leaves a stale value behind.
        Under ``torch.compile`` / ``torch.export`` and under ``torch.func`` transforms (``vmap`` over stacked
        parameters) the cache is bypassed (its value comparison would break the graph or the batching).
        """
        if traced():
            return fn()
        if self.training or torch.is_grad_enabled():
            self._memo = None
            return fn()
        memo = self._memo
        if memo is None or not self._params_equal(memo[0]):
            memo = ([self._snapshot(p) for p in self.ssm_parameters()], {})
            self._memo = memo
        snap, store = memo
        hit = store.get(name)
        if hit is not None and hit[0] == key and len(hit[1]) == len(inputs) and all(
                a is b for a, b in zip(hit[1], inputs)):
            return hit[2]
        value = fn()
        own = all(any(v[2] is x for v in store.values()) for x in inputs)
        if own and self._memo is memo and self._params_equal(snap):
            store[name] = (key, inputs, value)
        return value

    def _system(self, rate: float) -> NamedTuple:
        """``discrete_system(rate)`` in float32 or wider (autocast off), cached for inference."""
        dev = self.D.device.type

        def compute():
            with torch.autocast(device_type=dev, enabled=False):
                return self.discrete_system(rate)

        return self.memo("system", (rate,), compute)

    def _kernel_of(self, system: NamedTuple, L: int, rate: float) -> Tensor:
        dev = self.D.device.type

        def compute() -> Tensor:
            with torch.autocast(device_type=dev, enabled=False):
                return self.family.kernel(system, L, **self.kernel_options())

        return self.memo("kernel", (L, rate), compute, inputs=(system,))

    def kernel(self, L: int, rate: float = 1.0) -> Tensor:
        """The convolution kernel (C', H, L) in float32 or wider, even under autocast; C' = 2C when
        bidirectional (forward channels first).

        In eval mode without autograd the kernel is cached (``memo``) and reused while the SSM parameters,
        L and rate are unchanged, so repeated inference pays only for the convolution.
        """
        L = check_int("L", L, minimum=1)
        rate = self._check_rate(rate)
        return self._kernel_of(self._system(rate), L, rate)

    def to_rtf(
        self, rate: float = 1.0, *, dtype: torch.dtype | None = None, check_length: int = 1024
    ) -> LTILayer:
        """An ``ssm.RTF`` layer with the same outputs: ``ssm.transfer.to_rtf(self, ...)`` (its docstring says
        when the conversion is refused)."""
        from ..transfer import to_rtf  # deferred: the conversion builds an ``ssm.RTF``, an LTILayer

        return to_rtf(self, rate, dtype=dtype, check_length=check_length)

    def _post(self, y: Tensor, like: Tensor) -> Tensor:
        """(B, C, H, L) or (B, C, H) SSM outputs -> the output stage -> the layout of ``like``."""
        y = rearrange(y, "b c h l -> b l (c h)") if y.ndim == 4 else y.flatten(1)  # (B, L, C H) or (B, C H)
        return self.output(y, like)

    # ---- the two paths ------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        state: Tensor | None = None,
        *,
        return_state: bool = False,
        lengths: Tensor | None = None,
        rate: float = 1.0,
    ):
        """Convolutional path.

        Args:
            x: (B, L, H), or (B, H, L) when ``transposed``.
            state: recurrent state to continue from (shape of ``default_state(B)``), or None for zero.
            return_state: also return the state after the last position.
            lengths: (B,) valid lengths; positions >= lengths[b] are padding and do not change any output at
                a valid position (their inputs are zeroed, which matters for bidirectional layers).
            rate: sampling-rate factor; dt is multiplied by ``rate``.
        Returns:
            y with the layout of x, or (y, next_state) when ``return_state``.
        """
        u, rate, empty = self._prepare(x, state, return_state, lengths, rate)
        if empty is not None:
            return empty
        state = self._outside_inference(state)
        Bsz, H, L = u.shape
        if u.dtype in (torch.float16, torch.bfloat16):
            u = u.float()
        system = self._system(rate)
        K = self._kernel_of(system, L, rate)  # (C', H, L)
        K_rev = None
        if self.bidirectional:
            K, K_rev = K[: self.channels], K[self.channels :]
        u = u.to(K.dtype)
        D = with_param_strides(self.D).to(K.dtype)
        if state is None:
            y = fftconv(u, K, D, K_rev=K_rev, layout="BHL")  # (B, C, H, L)
        elif hasattr(self.family, "state_input"):
            # The state folded into the one convolution: conv(K, u + p) + q (+ D u).
            # The D skip sees u + p inside fftconv, so D p is taken back where p is nonzero (n <= N steps).
            p, q = self.family.state_input(system, state, L)  # (B, H, n), (B, C, H, n)
            p = p.to(u.dtype)
            n = p.shape[-1]
            y = fftconv(u + F.pad(p, (0, L - n)), K, D, layout="BHL")  # (B, C, H, L)
            y[..., :n] += q.to(y.dtype) - D[..., None] * p[:, None]
        else:
            y = fftconv(u, K, D, K_rev=K_rev, layout="BHL")
            y = y + self.family.free_response(system, state, L).to(y.dtype)
        next_state = self.family.final_state(system, u, state) if return_state else None
        y = self._post(y, x)  # (B, L, H)
        return (y, next_state) if return_state else y

    def _step_constants(self, rate: float):
        """The family's ``prepare_step(discrete_system(rate))`` in float32 or wider, cached for inference
        (``memo``): the per-token step then reads constants only."""
        dev = self.D.device.type

        def compute():
            with torch.autocast(device_type=dev, enabled=False):
                return self.family.prepare_step(self.discrete_system(rate))

        return self.memo("step", (rate,), compute)

    def step(self, x: Tensor, state: Tensor, *, rate: float = 1.0) -> tuple[Tensor, Tensor]:
        """Recurrent path: one token x (B, H) and the state -> (y (B, H), next_state).

        A family with ``prepare_step`` steps from constants prepared once per parameter values (cached in
        eval mode without autograd, like the kernel); the others call ``step`` on the system."""
        self._check_step_input(x)
        self._check_state(state, x.shape[0], x.device)
        state = self._outside_inference(state)
        rate = self._check_rate(rate)
        u = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        dev = u.device.type
        with torch.autocast(device_type=dev, enabled=False) if _autocast_on(dev) else nullcontext():
            if hasattr(self.family, "prepare_step"):
                y, next_state = self.family.step_prepared(self._step_constants(rate), state, u)  # (B, C, H)
            else:
                y, next_state = self.family.step(self._system(rate), state, u)
        y, D = y.real, with_param_strides(self.D)
        y, D = (y if y.dtype == u.dtype else y.to(u.dtype)), (D if D.dtype == u.dtype else D.to(u.dtype))
        y = torch.addcmul(y, D, u[:, None, :])
        return self._post(y, x), next_state
