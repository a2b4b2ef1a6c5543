"""The base of the linear time-invariant (LTI) layers S4, S4D, RTF and S5: the convolution, the eval cache,
the kernel and state folding.

* convolutional (``forward``): y = activation(K * u + D u) -> dropout -> output linear, with the kernel
  K (C, H, L) of the family's ``kernel`` verb;
* recurrent (``step``): one token at a time, x_k = Ab x_{k-1} + Bb u_k, y_k = C x_k + D u_k, then the same
  output stage.

A subclass owns the parameters and provides ``family`` (its module in ``ssm.systems``, of the LTI tier),
``discrete_system`` and ``default_state``; every path here calls the family's verbs (kernel, step,
free_response, final_state) on that system and nothing else.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
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

    # ---- packed documents and states at positions (exact, from the family's verbs) -----------------------
    def _chain(self, system: NamedTuple, u: Tensor, state: Tensor | None, ends: list[int],
               seq: Tensor | None) -> dict:
        """{e: the state after position e - 1} for each e in ``ends``, by ``final_state`` over the segments
        between consecutive cuts (O(L) in all, no state per step); with ``seq`` each document starts from
        zero (the rows whose document starts at a cut are reset there)."""
        if seq is None:
            return self._unpacked_states(system, u, state, ends)
        found, start = {}, 0
        for e in self._cuts(u.shape[-1], ends, seq, boundaries=True):
            state = self.family.final_state(system, u[..., start:e], self._reset_rows(state, seq, start))
            found[e] = state
            start = e
        return found

    def _unpacked_states(self, system: NamedTuple, u: Tensor, state: Tensor | None, ends: list[int]) -> dict:
        """{e: the state after u[..., :e]} of one run from ``state``: the family's ``states_at`` (one basis
        for every prefix) where it has one, else ``final_state`` between consecutive ends."""
        if hasattr(self.family, "states_at"):
            return self.family.states_at(system, u, ends, state)
        found, start = {}, 0
        for e in sorted(set(ends)):
            state = self.family.final_state(system, u[..., start:e], state)
            found[e], start = state, e
        return found

    def _leak(self, system: NamedTuple, u: Tensor, state: Tensor | None, seq: Tensor) -> Tensor | None:
        """What one convolution over packed documents lets cross their boundaries, (B, C', H, L): at each
        document start t0 of a row, the free response of that row's unpacked state after t0 - 1, over the
        document (subtracting it leaves every document starting from zero)."""
        Bsz, _, L = u.shape
        starts = (seq[:, 1:] != seq[:, :-1]).nonzero()  # (pairs, 2): row, t0 - 1
        if starts.shape[0] == 0:
            return None
        rows, t0 = starts[:, 0], starts[:, 1] + 1
        full = self._unpacked_states(system, u, state, sorted(set(t0.tolist())))  # at the document starts
        x0 = torch.stack([full[int(t)][int(b)] for b, t in zip(rows.tolist(), t0.tolist())])  # (pairs, ...)
        # each document's end: the next start in its row, else L
        nxt = torch.full_like(t0, L)
        same = rows[1:] == rows[:-1]
        nxt[:-1] = torch.where(same, t0[1:], nxt[:-1])
        n = int((nxt - t0).max())
        fr = self.family.free_response(system, x0, n)  # (pairs, C', H, n)
        ar = torch.arange(n, device=u.device)
        valid = ar[None, :] < (nxt - t0)[:, None]  # (pairs, n)
        leak = fr.new_zeros(Bsz, L, *fr.shape[1:3])  # (B, L, C', H)
        leak = leak.index_put((rows[:, None].expand(-1, n)[valid], (t0[:, None] + ar)[valid]),
                              fr.permute(0, 3, 1, 2)[valid])
        return leak.permute(0, 2, 3, 1)  # (B, C', H, L)

    # ---- the two paths ------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        state: Tensor | None = None,
        *,
        return_state: bool = False,
        lengths: Tensor | None = None,
        rate: float | Tensor = 1.0,
        seq_idx: Tensor | None = None,
        return_states_at: Tensor | None = None,
    ):
        """Convolutional path.

        Args:
            x: (B, L, H), or (B, H, L) when ``transposed``.
            state: recurrent state to continue from (shape of ``default_state(B)``), or None for zero.
            return_state: also return the state after the last position.
            lengths: (B,) valid lengths; positions >= lengths[b] are padding and do not change any output at
                a valid position (their inputs are zeroed, which matters for bidirectional layers).
            rate: sampling-rate factor; dt is multiplied by ``rate``. A (B,) tensor gives each row its own
                rate: one system and one kernel per distinct value (the cost of that many forwards' kernels).
            seq_idx: (B, L) integer document index, non-decreasing along each row (packed documents): each
                document starts from the zero state (``state`` belongs to each row's first document) and
                reads no other document. One convolution, minus the free response of the state at each
                document start over that document (docs/lm.md).
            return_states_at: 1-D integer positions in [0, L): also return the states after them, with a
                leading position axis (``final_state`` between consecutive positions, no state per step).
        Returns:
            y with the layout of x, then ``next_state`` when ``return_state``, then the states when
            ``return_states_at`` (a tuple when there is more than y).
        """
        if isinstance(rate, Tensor):
            return self._rows_by_rate(self.forward, x, state, rate, lengths, seq_idx, return_state,
                                      return_states_at)
        done, u, rate, seq, order, index = self._open(x, state, return_state, lengths, rate, seq_idx,
                                                      return_states_at)
        if done is not None:
            return done
        state = self._outside_inference(state)
        Bsz, H, L = u.shape
        if u.dtype in (torch.float16, torch.bfloat16):
            u = u.float()
        system = self._system(rate)
        y, u = self._conv(system, u, state, rate)  # (B, C', H, L)
        if seq is not None:
            leak = self._leak(system, u, state, seq)
            if leak is not None:
                y = y - leak.to(y.dtype)
        ends = ([L] if return_state else []) + ([] if order is None else [p + 1 for p in order])
        found = self._chain(system, u, state, ends, seq) if ends else {}
        y = self._post(y, x)  # (B, L, H)
        states = None if order is None else self._gather_states(found, order, index)
        return self._result(y, found.get(L) if return_state else None, states, return_state, order)

    def _conv(self, system: NamedTuple, u: Tensor, state: Tensor | None, rate: float
              ) -> tuple[Tensor, Tensor]:
        """The SSM output (B, C', H, L) before the output stage (D skip included), and u in the kernel's
        dtype: one FFT convolution, plus the state's zero-input response (``free_response``)."""
        L = u.shape[-1]
        K = self._kernel_of(system, L, rate)  # (C', H, L)
        K_rev = None
        if self.bidirectional:
            K, K_rev = K[: self.channels], K[self.channels :]
        u = u.to(K.dtype)
        D = with_param_strides(self.D).to(K.dtype)
        y = fftconv(u, K, D, K_rev=K_rev, layout="BHL")  # (B, C, H, L)
        if state is None:
            return y, u
        # The zero-input response, in the family's state precision and rounded once (RTF: float64, not
        # folded into the convolution of u, whose precision it would then get).
        return y + self.family.free_response(system, state, L).to(y.dtype), u

    def _step_constants(self, rate: float):
        """The family's ``prepare_step(discrete_system(rate))`` in float32 or wider, cached for inference
        (``memo``): the per-token step then reads constants only."""
        dev = self.D.device.type

        def compute():
            with torch.autocast(device_type=dev, enabled=False):
                return self.family.prepare_step(self.discrete_system(rate))

        return self.memo("step", (rate,), compute)

    def step(self, x: Tensor, state: Tensor, *, rate: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
        """Recurrent path: one token x (B, H) and the state -> (y (B, H), next_state); a (B,) ``rate`` runs
        each distinct value on its rows.

        A family with ``prepare_step`` steps from constants prepared once per parameter values (cached in
        eval mode without autograd, like the kernel); the others call ``step`` on the system."""
        self._check_step_input(x)
        self._check_state(state, x.shape[0], x.device)
        if isinstance(rate, Tensor):
            rate = self._check_rate_rows(rate, x.shape[0])
            parts = [((rate == r).nonzero().flatten(), r) for r in sorted(set(rate.tolist()))]
            outs = [self.step(x[i], state[i], rate=r) for i, r in parts]
            inv = torch.argsort(torch.cat([i for i, _ in parts]))
            return torch.cat([o[0] for o in outs])[inv], torch.cat([o[1] for o in outs])[inv]
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
