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

import sys
from contextlib import nullcontext
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from .._checks import check_int, real_route, traced
from ..ops.fftconv import fftconv
from ..ops.scan import step_scan
from .base import SSMLayer, with_param_strides

#: Dtypes whose CPU values the eval cache snapshots as bytes (numpy views them; bfloat16 it cannot).
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128)


_MEMCMP: list = []  # libc's memcmp through ctypes, looked up on first use (None where there is none)


def _memcmp():
    """libc's ``memcmp(a, b, n)`` on addresses (the eval cache's value comparison), or None."""
    if not _MEMCMP:
        try:
            import ctypes

            f = (ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(None)).memcmp
            f.restype, f.argtypes = ctypes.c_int, (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
            _MEMCMP.append(f)
        except (OSError, AttributeError):
            _MEMCMP.append(None)
    return _MEMCMP[0]


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (a step enters autocast-off only then: the context
    manager costs as much as a small op). Torch < 2.4 has no per-device query: assume it is on."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return True


def _padded_size(n: int, coarse: bool = False) -> int:
    """The length a packed document of length n is padded to, to batch it with others: n itself up to 8,
    else the smallest of 2^k times 5/4, 6/4, 7/4 or 2 that is >= n (at most 25% padding, and few groups);
    ``coarse``: the next power of two (at most 2x padding, fewer groups, for ops that cost per call)."""
    if coarse:
        return 1 << max(0, n - 1).bit_length()
    if n <= 8:
        return n
    p = 1 << ((n - 1).bit_length() - 1)  # the largest power of two below n, >= 8
    return next(p * m // 4 for m in (5, 6, 7, 8) if p * m // 4 >= n)


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

    packs_bidirectional = True  # each packed document is convolved on its own, in both directions


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
        for p, (obj, place, view, shape, dtype, device, value, addr, ids) in zip(params, snap):
            if (view is not None and p is obj and (id(view), id(value)) == ids
                    and (p.data_ptr(), p.shape, p.stride(), p.dtype) == place):
                # the same storage in the same layout: its current bytes against the kept copy's (the ids:
                # these arrays are the snapshot's own, not copies made by deepcopy or pickle, whose recorded
                # addresses would be stale)
                memcmp = _memcmp() if addr is not None else None
                if memcmp is not None:
                    if memcmp(place[0], addr, value.nbytes):
                        return False
                elif view.tobytes() != value.tobytes():
                    return False
                continue
            if p.dtype != dtype or p.shape != shape:
                return False
            if view is not None:  # a CPU snapshot: the values as bytes
                if not p.is_cpu or p.detach().numpy().tobytes() != value.tobytes():
                    return False
            elif p.device != device or not torch.equal(p, value):
                return False
        return True

    @staticmethod
    def _snapshot(p: Tensor) -> tuple:
        """(p, its place (data_ptr, shape, strides, dtype), a numpy view of it, shape, dtype, device, a copy
        of its values, the copy's address when p is contiguous, the ids of view and copy). On the CPU the
        values are compared as bytes, by one memcmp on the storage while p keeps its place (the kept view
        keeps that storage alive: its address cannot be reused), a fraction of ``torch.equal``'s cost, which
        a step pays per parameter; bitwise, so a NaN parameter still hits."""
        t = p.detach()
        if t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES:
            view = t.numpy()
            place = (p.data_ptr(), p.shape, p.stride(), p.dtype)
            copy = view.copy()
            addr = copy.ctypes.data if view.flags.c_contiguous else None
            return (p, place, view, t.shape, t.dtype, t.device, copy, addr, (id(view), id(copy)))
        return (p, None, None, t.shape, t.dtype, t.device, t.clone(), None, None)

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
        # contiguous before the activation: GELU's backward with a strided input and a contiguous gradient
        # (what the linear after it returns) runs 5x slower than on two contiguous tensors
        y = rearrange(y, "b c h l -> b l (c h)").contiguous() if y.ndim == 4 else y.flatten(1)  # (B, L, C H)
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
                reads no other document: each document is convolved on its own, batched by similar lengths
                (docs/lm.md).
            return_states_at: 1-D integer positions in [0, L): also return the states after them, with a
                leading position axis (``final_state`` between consecutive positions, no state per step).
        Returns:
            y with the layout of x, then ``next_state`` when ``return_state``, then the states when
            ``return_states_at`` (a tuple when there is more than y).
        """
        if real_route():
            return self._real_forward(x, state, return_state, lengths, rate, seq_idx, return_states_at)
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
        y, u = self._conv(system, u, state, rate, seq)  # (B, C', H, L)
        ends = ([L] if return_state else []) + ([] if order is None else [p + 1 for p in order])
        found = self._chain(system, u, state, ends, seq) if ends else {}
        y = self._post(y, x)  # (B, L, H)
        states = None if order is None else self._gather_states(found, order, index)
        return self._result(y, found.get(L) if return_state else None, states, return_state, order)

    def _conv(self, system: NamedTuple, u: Tensor, state: Tensor | None, rate: float,
              seq: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The SSM output (B, C', H, L) before the output stage (D skip included), and u in the kernel's
        dtype: one FFT convolution, plus the state's zero-input response (``free_response``).

        With ``seq`` (packed documents) every document is convolved on its own from the zero state, so
        nothing crosses a boundary: one batched FFT convolution per group of similar lengths
        (``_each_document``) with the kernel of the longest document, about the cost of one convolution of
        the whole row; the state's free response covers each row's first document only."""
        L = u.shape[-1]
        if seq is not None:
            lens, _, first = self._documents(seq)
        K = self._kernel_of(system, L if seq is None else max(lens), rate)  # (C', H, L or the longest)
        K_rev = None
        if self.bidirectional:
            K, K_rev = K[: self.channels], K[self.channels :]
        u = u.to(K.dtype)
        D = with_param_strides(self.D).to(K.dtype)
        if seq is None:
            y = fftconv(u, K, D, K_rev=K_rev, layout="BHL")  # (B, C, H, L)
        else:
            y = self._each_document(u.transpose(1, 2), lens,
                                    lambda ub, _: fftconv(ub, K, D, K_rev=K_rev, layout="BLH"))
            y = y.permute(0, 2, 3, 1)  # (B, L, C, H) -> (B, C, H, L)
        if state is None:
            return y, u
        # The zero-input response, in the family's state precision and rounded once (RTF: float64, not
        # folded into the convolution of u, whose precision it would then get).
        if seq is None:
            return y + self.family.free_response(system, state, L).to(y.dtype), u
        n0 = torch.tensor(lens, device=u.device)[first]  # each row's first document length, (B,)
        n = int(n0.max())
        fr = self.family.free_response(system, state, n)  # (B, C, H, n)
        fr = fr * (torch.arange(n, device=u.device) < n0[:, None]).to(fr.dtype)[:, None, None, :]
        return y + nn.functional.pad(fr, (0, L - n)).to(y.dtype), u

    @staticmethod
    def _documents(seq: Tensor) -> tuple[list[int], Tensor, Tensor]:
        """The packed documents of all rows in order: (their lengths, their flat start positions in B * L,
        (docs,) bool whether each starts its row)."""
        Bsz, L = seq.shape
        new = torch.ones_like(seq, dtype=torch.bool)
        new[:, 1:] = seq[:, 1:] != seq[:, :-1]
        starts = new.flatten().nonzero().flatten()  # rows in order; a document never spans two rows
        sizes = torch.diff(starts, append=starts.new_tensor([Bsz * L]))
        return sizes.tolist(), starts, starts % L == 0

    @staticmethod
    def _each_document(v: Tensor, lens: list[int], run, *, coarse: bool = False) -> Tensor:
        """``run`` on every packed document of v (B, L, ...) on its own: the documents are grouped by padded
        length (``_padded_size``: at most 25% padding, 2x when ``coarse``), ``run(batch, group)`` maps each
        group (docs in group, size, ...) right-padded with zeros, and ``group`` its document numbers, to
        outputs (docs in group, size, ...); returns them reassembled as (B, L, ...). Split, pad, stack and
        their inverses only: the backward pass slices and concatenates."""
        docs = v.flatten(0, 1).split(lens)
        padded = [_padded_size(n, coarse) for n in lens]
        out: list = [None] * len(lens)
        for size in sorted(set(padded)):
            group = [i for i, p in enumerate(padded) if p == size]
            pad = [0, 0] * (v.ndim - 2)  # the trailing dimensions are not padded
            batch = torch.stack([nn.functional.pad(docs[i], pad + [0, size - lens[i]]) for i in group])
            for i, yi in zip(group, run(batch, group).unbind(0)):
                out[i] = yi[: lens[i]]
        return torch.cat(out).view(*v.shape[:2], *out[0].shape[1:])

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

    # ---- the real route (ONNX export: no complex type; docs/deployment.md) ------------------------------
    #: Lag of the anti-causal direction: 1 for the convolution (lag 0 counted once, in K), 0 for S5's
    #: reverse scan (``ssm.systems.s5.scan(..., reverse=True)``).
    reverse_lag: int = 1

    def prepare_real(self, rate: float = 1.0):
        """The family's step constants in real tensors only (``family.prepare_real_step``), from the current
        parameters (differentiable)."""
        with torch.autocast(device_type=self.D.device.type, enabled=False):
            return self.family.prepare_real_step(self.family.prepare_step(self.discrete_system(rate)))

    def _real_constants(self, rate: float) -> tuple:
        """(constants, the real state's shape after the batch axis, its dtype) of the real route: those that
        ``ssm.export.real_arithmetic(layer)`` computed before a trace, else computed now (eager only: under a
        trace their complex arithmetic would enter the graph)."""
        frozen = self.__dict__.get("_real_frozen")
        if frozen is not None and frozen[0] == rate:
            return frozen[1]
        if traced() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():  # (the exporter's fallbacks)
            raise ValueError(f"{type(self).__name__}: exporting needs the step constants computed outside "
                             f"the trace (ONNX has no complex type): export inside "
                             f"`with ssm.export.real_arithmetic(model, rate={rate}):`")
        c = self.prepare_real(rate)
        # each constant in its own storage: a loop operator refuses inputs that alias each other
        c = c._make(t.clone() if isinstance(t, Tensor) else t for t in c)
        probe = self.family.to_real_state(c, self.default_state(1, device="meta"))
        return c, tuple(probe.shape[1:]), probe.dtype

    def to_real_state(self, state, rate: float = 1.0) -> Tensor:
        """The layer's state -> the real state of the real route (complex states as real planes)."""
        return self.family.to_real_state(self._real_constants(rate)[0], state)

    def from_real_state(self, xr: Tensor, rate: float = 1.0):
        """Inverse of ``to_real_state``."""
        return self.family.from_real_state(self._real_constants(rate)[0], xr)

    def _real_ssm(self, u: Tensor, rate: float) -> Tensor:
        """The SSM outputs (B, C, H, L) of u (B, H, L), no D skip, by the family's ``real_step`` repeated in
        one loop operator (``step_scan``): real arithmetic, a dynamic length; bidirectional runs the reversed
        inputs as more rows of the batch and reads the second half of the channels from them."""
        c, shape, dtype = self._real_constants(rate)
        Bsz = u.shape[0]
        ub = torch.cat([u, u.flip(-1)]) if self.bidirectional else u  # (B', H, L)
        x0 = ub.new_zeros((ub.shape[0], *shape), dtype=dtype)

        def body(xr, u_t):
            y, xr = self.family.real_step(c, xr, u_t)
            return xr.contiguous(), y  # (the loop keeps the carry's layout: the initial one)

        _, ys = step_scan(body, x0, ub.permute(2, 0, 1))  # (L, B', C', H)
        y = ys.permute(1, 2, 3, 0)  # (B', C', H, L)
        if not self.bidirectional:
            return y
        half = y.shape[1] // 2
        rev = y[Bsz:, half:].flip(-1)  # sum_{s >= t} K_rev[s - t] u_s
        if self.reverse_lag:
            rev = torch.cat([rev[..., 1:], torch.zeros_like(rev[..., :1])], dim=-1)
        return y[:Bsz, :half] + rev

    def _real_input(self, x: Tensor, state, return_state, lengths, rate, seq_idx, positions) -> tuple:
        """The checks of the real route's ``forward``: (u (B, H, L) float32 or wider, rate)."""
        if (state is not None or return_state or lengths is not None or seq_idx is not None
                or positions is not None or isinstance(rate, Tensor)):
            raise ValueError("the real route (ONNX export) takes forward(x, rate=number) only: stream with "
                             "ssm.export.StepModule")
        u = self._to_BHL(x)
        return (u.float() if u.dtype in (torch.float16, torch.bfloat16) else u), self._check_rate(rate)

    def _real_forward(self, x: Tensor, state, return_state, lengths, rate, seq_idx, positions) -> Tensor:
        """``forward`` on the real route: the recurrence (``_real_ssm``) instead of the convolution."""
        u, rate = self._real_input(x, state, return_state, lengths, rate, seq_idx, positions)
        y = self._real_ssm(u, rate)  # in the state's precision (RTF: float64), rounded once
        y = y.to(torch.promote_types(u.dtype, with_param_strides(self.D).dtype))
        y = y + with_param_strides(self.D).to(y.dtype)[..., None] * u[:, None].to(y.dtype)
        return self._post(y, x)

    def real_step(self, x: Tensor, xr: Tensor, *, rate: float = 1.0) -> tuple[Tensor, Tensor]:
        """``step`` on the real route: x (B, H) and the real state (``to_real_state``) -> (y, next real
        state); ``ssm.export.StepModule`` exports it."""
        self._check_step_input(x)
        rate = self._check_rate(rate)
        c = self._real_constants(rate)[0]
        u = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y, xr = self.family.real_step(c, xr, u)
        y = y.to(u.dtype)
        y = torch.addcmul(y, with_param_strides(self.D).to(u.dtype), u[:, None, :])
        return self._post(y, x), xr

