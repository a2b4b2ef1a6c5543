"""Selective SSM layers: Mamba (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", 2023) and Mamba-2 (Dao & Gu, "Transformers are SSMs", 2024), with mamba_ssm's parameter names,
shapes and initializations, so its state dicts and Hugging Face's ``MambaMixer`` / ``Mamba2Mixer`` weights
load as they are (``ssm.interop.from_hf_mamba``).

Mamba, per token (D = expand * H channels, N states per channel):

    x, z = in_proj(u)                                   x, z (B, L, D)
    x = silu(causal depthwise conv1d(x))                kernel d_conv
    dt, B, C = x_proj(x)                                dt (B, L, dt_rank), B, C (B, L, N)
    delta = softplus(dt_proj(dt))                       (B, L, D), input-dependent step
    h_t = exp(delta_t A) h_(t-1) + delta_t B_t x_t      ZOH on A, Euler on B; A = -exp(A_log) (D, N)
    y_t = C_t h_t + D x_t;  y = y * silu(z);  out = out_proj(y)

Mamba-2 shares one scalar A per head of P = headdim channels and B, C per group of heads; the scan is the
chunked state-space duality (``ssm.ops.ssd``) and the output is a gated RMSNorm before ``out_proj``.

The state is a tuple (the last d_conv - 1 inputs of the convolution, the SSM state), float32 at least, so
``forward(x, state, return_state=True)`` continues a stream exactly across chunks and ``step`` equals
``forward``. The math is ``ssm.systems.selective``; this module owns the parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_bool, check_choice, check_int, check_real, real_route, traced
from ..ops.causal_conv import causal_conv1d_fn
from ..systems import selective
from .base import SSMLayer, check_dt_range

DT_INITS = ("random", "constant")


def reverse_rows(t: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse t (B, C, L) in time, each row within its first lengths[b] positions (padding stays last)."""
    if lengths is None:
        return t.flip(-1)
    L = t.shape[-1]
    ar = torch.arange(L, device=t.device)
    n = lengths.to(t.device)[:, None]
    idx = torch.where(ar < n, n - 1 - ar, ar)  # (B, L)
    return t.gather(-1, idx[:, None, :].expand_as(t))


def inverse_softplus(dt: Tensor) -> Tensor:
    """The bias b with softplus(b) = dt (mamba_ssm's dt initialization)."""
    return dt + torch.log(-torch.expm1(-dt))


def draw_dt(n: int, dt_min: float, dt_max: float, floor: float, dtype: torch.dtype) -> Tensor:
    """dt log-uniform in [dt_min, dt_max], clamped below at ``floor`` (on the CPU)."""
    r = torch.rand(n, dtype=dtype)
    dt = torch.exp(r * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt.clamp(min=floor)


def wide(t: Tensor) -> Tensor:
    """t in float32 or wider (half and bfloat16 are widened; float64 stays)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def state_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def conv_window(xc: Tensor, k: int, ends: Tensor | None) -> Tensor:
    """The last k - 1 convolution inputs before each row's end, from xc (B, C, k - 1 + L) = [window, x]; a
    copy (a view would keep all of xc alive with the state)."""
    if k == 1:
        return xc.new_empty((*xc.shape[:2], 0))
    if ends is None:
        return xc[..., xc.shape[-1] - (k - 1):].clone()
    idx = ends.to(xc.device)[:, None] + torch.arange(k - 1, device=xc.device)  # (B, k-1)
    return xc.gather(-1, idx[:, None, :].expand(xc.shape[0], xc.shape[1], k - 1))


def silu_(t: Tensor) -> Tensor:
    """SiLU of a fresh temporary t, in place where autograd does not need t (no gradient flows)."""
    return F.silu(t, inplace=not t.requires_grad)


def stream_window(window: Tensor, x: Tensor, ends: Tensor | None) -> Tensor:
    """``conv_window`` of the stream [window, x] without concatenating it: window (B, C, k - 1), x (B, C, L)
    -> the k - 1 inputs before each row's end (a new tensor)."""
    Bsz, Cn, k1 = window.shape
    if k1 == 0:
        return window.clone()
    L = x.shape[-1]
    ends = torch.full((Bsz,), L, device=x.device) if ends is None else ends.to(x.device)
    idx = ends[:, None] + torch.arange(k1, device=x.device)  # positions in [window, x]
    from_x = x.gather(-1, (idx - k1).clamp(min=0)[:, None, :].expand(Bsz, Cn, k1))
    from_w = window.gather(-1, idx.clamp(max=k1 - 1)[:, None, :].expand(Bsz, Cn, k1))
    return torch.where((idx >= k1)[:, None, :], from_x, from_w)


def causal_conv(xc: Tensor, conv: nn.Conv1d) -> Tensor:
    """Depthwise causal convolution of xc (B, C, k - 1 + L) (the window first) -> (B, C, L), then SiLU."""
    return silu_(F.conv1d(xc, conv.weight, conv.bias, groups=conv.weight.shape[0]))


def conv_step(window: Tensor, x: Tensor, conv: nn.Conv1d) -> tuple[Tensor, Tensor]:
    """One token of ``causal_conv``: window (B, C, k - 1), x (B, C) -> (SiLU output (B, C), next window)."""
    xc = torch.cat([window.to(x.dtype), x[..., None]], dim=-1)  # (B, C, k)
    y = (xc * conv.weight[:, 0, :]).sum(-1)
    if conv.bias is not None:
        y = y + conv.bias
    return F.silu(y), xc[..., 1:]


def packed_conv(xc: Tensor, conv: nn.Conv1d, seq: Tensor) -> Tensor:
    """``causal_conv`` of packed documents: tap i of output t reads xc[t + i] only when it lies in t's
    document. xc (B, C, k - 1 + L) = [window, x], seq (B, k - 1 + L) the document of each column."""
    k, L = conv.weight.shape[-1], xc.shape[-1] - conv.weight.shape[-1] + 1
    own = seq[:, k - 1:]  # (B, L)
    y = sum(xc[..., i:i + L] * conv.weight[:, 0, i, None] * (seq[:, i:i + L] == own)[:, None].to(xc.dtype)
            for i in range(k))
    if conv.bias is not None:
        y = y + conv.bias[:, None]
    return F.silu(y)


def packed_fix(y: Tensor, xc: Tensor, conv: nn.Conv1d, seq: Tensor) -> Tensor:
    """``packed_conv`` from ``causal_conv``'s output y (B, C, L): only the outputs whose taps reach into an
    earlier document (the first k - 1 of each document) differ; they are recomputed with those taps masked.
    xc (B, C, k - 1 + L) = [window, x], seq (B, k - 1 + L) the document of each column."""
    k, L = conv.weight.shape[-1], y.shape[-1]
    own = seq[:, k - 1:]  # (B, L)
    rows, t = (seq[:, :L] != own).nonzero(as_tuple=True)  # output t reads columns t .. t + k - 1
    if not rows.numel():
        return y
    cols = t[:, None] + torch.arange(k, device=y.device)  # (n, k)
    taps = xc[rows[:, None], :, cols] * (seq[rows[:, None], cols] == own[rows, t][:, None])[..., None]
    pre = (taps * conv.weight[:, 0].t()).sum(1)  # (n, C)
    if conv.bias is not None:
        pre = pre + conv.bias
    return y.transpose(1, 2).index_put((rows, t), F.silu(pre).to(y.dtype)).transpose(1, 2)


def packed_window(xc: Tensor, k: int, e: int, seq: Tensor | None) -> Tensor:
    """The convolution window after position e - 1 (its last k - 1 inputs), the columns of earlier
    documents zeroed when ``seq`` (B, k - 1 + L) numbers the columns of xc."""
    win = xc[..., e:e + k - 1]
    if seq is None or k == 1:
        return win
    return win * (seq[:, e:e + k - 1] == seq[:, e + k - 2:e + k - 1])[:, None].to(win.dtype)


def scale_rate(delta: Tensor, rate: float | Tensor) -> Tensor:
    """The step times the rate: a number, or a (B,) tensor (one per row) broadcast over delta."""
    if not isinstance(rate, Tensor):
        return delta * rate
    return delta * rate.to(delta.dtype).view(-1, *[1] * (delta.ndim - 1))


class _Selective(SSMLayer):
    """What Mamba and Mamba2 share: the tuple state, padding by masks, the reversed second direction."""

    family = selective
    zero_padding = False  # padded positions are masked inside (their step and input are zero)
    ragged_state = True  # with lengths, return_state gives each row's state at its own end

    def config(self) -> dict:
        return {"activation": "identity"}

    def _suffixes(self) -> tuple[str, ...]:
        """The parameter-name suffixes of the directions: "" forward, "_b" backward when bidirectional."""
        return ("", "_b") if self.bidirectional else ("",)

    def init_extra(self) -> None:
        """Initializations drawn after the submodules' own (Mamba's dt projection)."""

    def reset_parameters(self) -> None:
        """Every parameter to its initialization, in the order of construction (so a seeded reset equals a
        seeded build): the submodules, ``init_extra``, then the SSM parameters of ``ssm_init``."""
        with torch.no_grad():
            for module in self.children():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            self.init_extra()
            with torch.device("cpu"):
                values = self.ssm_init(self._real_dtype())
            for name, (value, _, _) in values.items():
                getattr(self, name).copy_(value)

    def _end_of_rows(self, keep: Tensor | None, lengths: Tensor | None) -> Tensor | None:
        if lengths is not None:
            return lengths
        if keep is None:
            return None
        L = keep.shape[1]
        return (keep.to(torch.long) * torch.arange(1, L + 1, device=keep.device)).amax(1)

    def forward(self, x: Tensor, state=None, *, return_state: bool = False, lengths: Tensor | None = None,
                rate: float | Tensor = 1.0, seq_idx: Tensor | None = None,
                return_states_at: Tensor | None = None):
        """x (B, L, H) (or (B, H, L) when ``transposed``) -> y of the same layout; with ``return_state`` also
        the state after the last position (with ``lengths``: after each row's last valid position).

        Args:
            state: (conv window, SSM state) to continue from (``default_state``), or None for zero.
            lengths: (B,) valid lengths (right padding): padded positions change no valid output.
            rate: sampling-rate factor; every step delta is multiplied by it; a (B,) tensor gives each row
                its own (at no extra cost).
            seq_idx: (B, L) integer document index, non-decreasing along each row (packed documents): the
                convolution reads no earlier document and the scan restarts from zero at each document
                start (``state`` belongs to each row's first document).
            return_states_at: 1-D integer positions in [0, L): also return the states after them (each leaf
                with a leading position axis), by splitting the scan there.
        Returns:
            y, then ``next_state`` when ``return_state``, then the states when ``return_states_at``.
        """
        return self._run(x, state, return_state, lengths, None, rate, seq_idx, return_states_at)

    def masked_forward(self, x: Tensor, keep: Tensor, state=None, *, return_state: bool = False,
                       return_states_at: Tensor | None = None):
        """``forward`` with a key-padding mask ``keep`` (B, L), True = a real token: padded positions get a
        zero convolution input and a zero step (the state passes them unchanged), so left padding is exact."""
        if not isinstance(keep, Tensor) or keep.shape != (x.shape[0], x.shape[2 if self.transposed else 1]):
            raise ValueError(f"keep must be a (B, L) mask like x's batch and length; got {keep!r}")
        return self._run(x, state, return_state, None, keep.bool(), 1.0, None, return_states_at)

    def _run(self, x, state, return_state, lengths, keep, rate, seq_idx=None, positions=None):
        rows = None
        if isinstance(rate, Tensor):
            rows = self._check_rate_rows(rate, x.shape[0] if isinstance(x, Tensor) and x.ndim == 3 else -1)
            rate = 1.0
        done, u, rate, seq, order, index = self._open(x, state, return_state, lengths, rate, seq_idx,
                                                      positions, split_rate=rows)
        if done is not None:
            return done
        if rows is not None:
            rate = rows.to(u.device)
        Bsz, _, L = u.shape
        if lengths is not None:
            keep = torch.arange(L, device=u.device)[None, :] < lengths.to(u.device)[:, None]
        ends = self._end_of_rows(keep, lengths)
        cuts = None
        if seq is not None or order is not None:
            cuts = ([L] if return_state else []) + ([] if order is None else [p + 1 for p in order])
        y, next_state, found = self._mix(u.transpose(1, 2), state, keep, ends, lengths, rate, seq, cuts)
        y = self.output(y, x)
        if found is not None and return_state:
            next_state = found[L]
        states = None if order is None else self._gather_states(found, order, index)
        return self._result(y, next_state, states, return_state, order)

    def _segments(self, run, L: int, h0, seq: Tensor | None, cuts: list[int], *, boundaries: bool):
        """The scan split at ``cuts`` (and at every document start when ``boundaries``): ``run(a, b, h)`` ->
        (y over [a, b), state after b - 1) chained, the rows whose document starts at a cut reset to zero.
        Returns (the list of y pieces, {cut: state})."""
        ys, found, start = [], {}, 0
        for e in self._cuts(L, cuts, seq, boundaries=boundaries):
            y, h0 = run(start, e, self._reset_rows(h0, seq, start))
            ys.append(y)
            found[e], start = h0, e
        return ys, found

    @staticmethod
    def _seq_columns(seq: Tensor | None, k: int) -> Tensor | None:
        """The document of each column of [window, x] (the window belongs to the first document)."""
        return None if seq is None else torch.cat([seq[:, :1].expand(-1, k - 1), seq], dim=1)


class Mamba(_Selective):
    """Mamba (selective SSM) layer with mamba_ssm's ``Mamba`` arguments and parameter names.

    Args:
        d_model: H.
        d_state: N, states per channel.
        d_conv: width of the causal depthwise convolution.
        expand: D = expand * H inner channels.
        dt_rank: rank of the step projection; "auto" is ceil(H / 16).
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: the initialization of the step (softplus of
            dt_proj's bias log-uniform in [dt_min, dt_max], clamped at dt_init_floor).
        conv_bias, bias: biases of the convolution and of the in/out projections.
        bidirectional: a second scan backwards in time with its own convolution, projections, A and D
            (Vision Mamba's layout); the two directions are averaged before the gate's output projection.
        transposed: (B, H, L) inputs and outputs.
        ssm_lr, ssm_weight_decay: optimizer hints of A_log, D and the dt bias (default: the global
            learning rate, no weight decay, as mamba_ssm's ``_no_weight_decay``).

    Shapes: forward x (B, L, H) -> (B, L, H); step x (B, H); state (conv window (B, D, d_conv - 1), SSM
    state (B, D, N)), float32 (float64 for a float64 layer).
    """

    repr_names = ("d_state", "d_conv", "expand", "dt_rank")

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        *,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        bidirectional: bool = False,
        transposed: bool = False,
        ssm_lr: float | None = None,
        ssm_weight_decay: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(d_model, bidirectional=bidirectional, transposed=transposed, ssm_lr=ssm_lr,
                         ssm_weight_decay=ssm_weight_decay, dtype=dtype)
        H = self.d_model
        self.d_state = check_int("d_state", d_state, minimum=1)
        self.d_conv = check_int("d_conv", d_conv, minimum=1)
        self.expand = check_int("expand", expand, minimum=1)
        self.d_inner = D = self.expand * H
        if dt_rank == "auto":
            dt_rank = math.ceil(H / 16)
        elif isinstance(dt_rank, str):
            raise ValueError(f"dt_rank must be 'auto' or a positive integer; got {dt_rank!r}")
        self.dt_rank = check_int("dt_rank", dt_rank, minimum=1)
        self.dt_min, self.dt_max = check_dt_range(dt_min, dt_max)
        self.dt_init = check_choice("dt_init", dt_init, DT_INITS)
        self.dt_scale = check_real("dt_scale", dt_scale, positive=True)
        self.dt_init_floor = check_real("dt_init_floor", dt_init_floor, positive=True)
        conv_bias, bias = check_bool("conv_bias", conv_bias), check_bool("bias", bias)
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(H, 2 * D, bias=bias, **factory)
        for suffix in self._suffixes():
            self.add_module("conv1d" + suffix, nn.Conv1d(D, D, self.d_conv, groups=D, padding=self.d_conv - 1,
                                                         bias=conv_bias, **factory))
            self.add_module("x_proj" + suffix, nn.Linear(D, self.dt_rank + 2 * self.d_state, bias=False,
                                                         **factory))
            self.add_module("dt_proj" + suffix, nn.Linear(self.dt_rank, D, bias=True, **factory))
        self.init_output(D, bias=bias, **factory)
        self.init_extra()
        self.build_ssm(device, dtype)
        self._hinted_names += [f"dt_proj{s}.bias" for s in self._suffixes()]

    def init_extra(self) -> None:
        """mamba_ssm's dt_proj initialization: weight uniform (or constant) at dt_rank^-1/2 * dt_scale, bias
        the inverse softplus of a log-uniform dt."""
        std = self.dt_rank ** -0.5 * self.dt_scale
        real = state_dtype(self.in_proj.weight)
        for s in self._suffixes():
            proj = getattr(self, "dt_proj" + s)
            with torch.no_grad(), torch.device("cpu"):
                if self.dt_init == "random":
                    w = torch.empty(proj.weight.shape, dtype=real).uniform_(-std, std)
                else:
                    w = torch.full(proj.weight.shape, std, dtype=real)
                dt = draw_dt(self.d_inner, self.dt_min, self.dt_max, self.dt_init_floor, real)
                b = inverse_softplus(dt)
            proj.weight.data = w.to(proj.weight.device, proj.weight.dtype)
            proj.bias.data = b.to(proj.bias.device, proj.bias.dtype)

    def ssm_init(self, real_dtype: torch.dtype) -> dict:
        """A_log = log(1..N) per channel (S4D-Real) and D = 1, per direction, all with the optimizer hints."""
        A = torch.arange(1, self.d_state + 1, dtype=real_dtype).expand(self.d_inner, self.d_state)
        values = {}
        for s in self._suffixes():
            values["A_log" + s] = (torch.log(A).contiguous(), False, True)
            values["D" + s] = (torch.ones(self.d_inner, dtype=real_dtype), False, True)
        return values

    def default_state(self, batch_size: int, *, device=None) -> tuple[Tensor, Tensor]:
        """(conv window (B, D, d_conv - 1), SSM state (B, D, N)), zeros, float32 (float64 for float64)."""
        check_int("batch_size", batch_size, minimum=1)
        device = device if device is not None else self.A_log.device
        dtype = state_dtype(self.A_log)
        return (torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
                torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=dtype))

    def _direction(self, xs, z, window, h0, keep, ends, rate, s: str, seq=None, cuts=None):
        """One direction: conv inputs xs (B, D, L), gate z (B, D, L) -> (y (B, D, L), (window, state),
        {cut: state after cut - 1} or None)."""
        conv, x_proj, dt_proj = getattr(self, "conv1d" + s), getattr(self, "x_proj" + s), getattr(self,
                                                                                                "dt_proj" + s)
        k = self.d_conv
        if keep is not None:
            xs = xs * keep[:, None, :].to(xs.dtype)
        win = window.to(xs.dtype) if window is not None else xs.new_zeros(xs.shape[0], xs.shape[1], k - 1)
        xc = torch.cat([win, xs], dim=-1)
        cols = self._seq_columns(seq, k)
        xconv = causal_conv(xc, conv) if cols is None else packed_conv(xc, conv, cols)  # (B, D, L)
        dt, Bm, Cm = x_proj(xconv.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # (B, D, L); the bias goes in with softplus
        A = -torch.exp(self.ssm_param("A_log" + s))
        D = self.ssm_param("D" + s)
        Bm, Cm = Bm.transpose(1, 2), Cm.transpose(1, 2)  # (B, N, L)
        opts = {"delta_bias": wide(dt_proj.bias), "delta_softplus": True}
        if keep is not None or isinstance(rate, Tensor) or rate != 1.0:
            # the step made explicit: scaled by the rate, zero at padded positions (the state holds)
            delta = scale_rate(F.softplus(wide(delta) + wide(dt_proj.bias)[:, None]), rate)
            if keep is not None:
                delta = delta * keep[:, None, :]
            opts = {}
        sd = state_dtype(self.A_log)
        scan = selective.scan_loop if real_route() else selective.scan  # (the export route: one loop op)
        if cuts is None:
            y, h = scan(xconv, delta, A, Bm, Cm, D, z, initial_state=h0, **opts)
            return y, (conv_window(xc, k, ends).to(sd), h), None

        def run(a, b, h):
            return scan(xconv[..., a:b], delta[..., a:b], A, Bm[..., a:b], Cm[..., a:b], D, z[..., a:b],
                        initial_state=h, **opts)

        ys, found = self._segments(run, xs.shape[-1], h0, seq, cuts, boundaries=True)
        found = {e: (packed_window(xc, k, e, cols).to(sd), h) for e, h in found.items()}
        return torch.cat(ys, dim=-1), found[xs.shape[-1]], found

    def _mix(self, h, state, keep, ends, lengths, rate, seq=None, cuts=None):
        xs, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)  # (B, D, L) each
        window, h0 = state if state is not None else (None, None)
        y, next_state, found = self._direction(xs, z, window, h0, keep, ends, rate, "", seq, cuts)
        if self.bidirectional:
            rev = self._direction(reverse_rows(xs, ends), reverse_rows(z, ends), None, None,
                                  None if keep is None else reverse_rows(keep[:, None], ends)[:, 0], None,
                                  rate, "_b")[0]
            y = (y + reverse_rows(rev, ends)) / 2
        return y.transpose(1, 2), next_state, found  # (B, L, D)

    def step(self, x: Tensor, state, *, rate: float | Tensor = 1.0):
        """One token x (B, H) and the state -> (y (B, H), next state); ``rate`` a number or (B,) tensor."""
        self._check_step_input(x)
        self._check_state(state, x.shape[0])
        rate = (self._check_rate_rows(rate, x.shape[0]) if isinstance(rate, Tensor)
                else self._check_rate(rate))
        window, h0 = state
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, D)
        xconv, window = conv_step(window, xs, self.conv1d)
        dt, Bm, Cm = self.x_proj(xconv).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)
        A = -torch.exp(self.ssm_param("A_log"))
        if not isinstance(rate, Tensor) and rate == 1.0:
            y, h = selective.step(h0, xconv, delta, A, Bm, Cm, self.ssm_param("D"), z,
                                  delta_bias=wide(self.dt_proj.bias), delta_softplus=True)
        else:
            delta = scale_rate(F.softplus(wide(delta) + wide(self.dt_proj.bias)), rate)
            y, h = selective.step(h0, xconv, delta, A, Bm, Cm, self.ssm_param("D"), z)
        return self.output(y.to(xconv.dtype), x), (window.to(h0.dtype), h)


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z) in groups of ``group_size`` channels, times a weight (Mamba-2's output norm,
    mamba_ssm's ``RMSNormGated`` with norm_before_gate=False)."""

    def __init__(self, d: int, *, group_size: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        """g = y silu(z) (in float32 at least), g / rms(g) per group, times the weight; y, z (..., d). Without
        autograd every step after the first works in place (one temporary of y's size)."""
        dtype, inplace = y.dtype, not torch.is_grad_enabled() or not (y.requires_grad or z.requires_grad
                                                                     or self.weight.requires_grad)
        g = F.silu(wide(z))
        g = g.mul_(y) if inplace else g * wide(y)
        g = g.unflatten(-1, (-1, self.group_size))
        # 1 / rms = rsqrt(mean(g^2) + eps), the mean of squares as a norm: no temporary of g's size
        ms = torch.linalg.vector_norm(g, dim=-1, keepdim=True).square() / self.group_size
        r = torch.rsqrt(ms + self.eps)
        g = (g.mul_(r) if inplace else g * r).flatten(-2)
        g = g.mul_(self.weight) if inplace else g * wide(self.weight)
        return g.to(dtype)


class Mamba2(_Selective):
    """Mamba-2 layer (SSD) with mamba_ssm's ``Mamba2`` arguments and parameter names.

    Args:
        d_model: H.
        d_state: N, states per head channel.
        d_conv: width of the causal depthwise convolution (over x, B and C).
        expand: D = expand * H inner channels, in D / headdim heads.
        headdim: P, channels per head (one scalar A and one step per head).
        ngroups: G, groups of heads sharing B and C (the heads must divide evenly).
        chunk_size: the SSD chunk length (any sequence length works).
        A_init_range: A = -uniform(A_init_range) per head.
        dt_min, dt_max, dt_init_floor, dt_limit: step initialization and the clamp of the step.
        conv_bias, bias, norm_eps: biases; the epsilon of the gated RMSNorm.
        bidirectional, transposed, ssm_lr, ssm_weight_decay: as ``Mamba``.

    Shapes: forward x (B, L, H) -> (B, L, H); step x (B, H); state (conv window (B, D + 2 G N, d_conv - 1),
    SSM state (B, D / P, P, N)).
    """

    repr_names = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size")

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        *,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-5,
        bidirectional: bool = False,
        transposed: bool = False,
        ssm_lr: float | None = None,
        ssm_weight_decay: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(d_model, bidirectional=bidirectional, transposed=transposed, ssm_lr=ssm_lr,
                         ssm_weight_decay=ssm_weight_decay, dtype=dtype)
        H = self.d_model
        self.d_state = check_int("d_state", d_state, minimum=1)
        self.d_conv = check_int("d_conv", d_conv, minimum=1)
        self.expand = check_int("expand", expand, minimum=1)
        self.d_inner = D = self.expand * H
        self.headdim = check_int("headdim", headdim, minimum=1)
        if D % self.headdim:
            raise ValueError(f"headdim must divide d_inner = expand * d_model = {D}; got headdim={headdim}")
        self.nheads = D // self.headdim
        self.ngroups = check_int("ngroups", ngroups, minimum=1)
        if self.nheads % self.ngroups:
            raise ValueError(f"ngroups must divide the number of heads {self.nheads}; got ngroups={ngroups}")
        self.chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        lo, hi = (check_real("A_init_range", v, positive=True) for v in A_init_range)
        if lo > hi:
            raise ValueError(f"A_init_range must be (low, high) with 0 < low <= high; got {A_init_range!r}")
        self.A_init_range = (float(lo), float(hi))
        self.dt_min, self.dt_max = check_dt_range(dt_min, dt_max)
        self.dt_init_floor = check_real("dt_init_floor", dt_init_floor, positive=True)
        if (not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2
                or not 0 <= float(dt_limit[0]) <= float(dt_limit[1])):
            raise ValueError(f"dt_limit must be (low, high) with 0 <= low <= high; got {dt_limit!r}")
        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        conv_bias, bias = check_bool("conv_bias", conv_bias), check_bool("bias", bias)
        factory = {"device": device, "dtype": dtype}
        self.conv_dim = D + 2 * self.ngroups * self.d_state
        d_in = 2 * D + 2 * self.ngroups * self.d_state + self.nheads  # z, x B C (convolved), dt
        self.in_proj = nn.Linear(H, d_in, bias=bias, **factory)
        for suffix in self._suffixes():
            self.add_module("conv1d" + suffix, nn.Conv1d(self.conv_dim, self.conv_dim, self.d_conv,
                                                         groups=self.conv_dim, padding=self.d_conv - 1,
                                                         bias=conv_bias, **factory))
        self.norm = GatedRMSNorm(D, group_size=D // self.ngroups, eps=check_real("norm_eps", norm_eps,
                                                                                  positive=True), **factory)
        self.init_output(D, bias=bias, **factory)
        self.build_ssm(device, dtype)

    def ssm_init(self, real_dtype: torch.dtype) -> dict:
        """Per direction: dt_bias (inverse softplus of a log-uniform dt), A_log (log of a uniform A in
        A_init_range) and D = 1, one per head, all with the optimizer hints (no weight decay)."""
        values = {}
        for s in self._suffixes():
            dt = draw_dt(self.nheads, self.dt_min, self.dt_max, self.dt_init_floor, real_dtype)
            values["dt_bias" + s] = (inverse_softplus(dt), False, True)
            A = torch.empty(self.nheads, dtype=real_dtype).uniform_(*self.A_init_range)
            values["A_log" + s] = (torch.log(A), False, True)
            values["D" + s] = (torch.ones(self.nheads, dtype=real_dtype), False, True)
        return values

    def default_state(self, batch_size: int, *, device=None) -> tuple[Tensor, Tensor]:
        """(conv window (B, D + 2 G N, d_conv - 1), SSM state (B, heads, P, N)), zeros, float32 at least."""
        check_int("batch_size", batch_size, minimum=1)
        device = device if device is not None else self.A_log.device
        dtype = state_dtype(self.A_log)
        return (torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
                torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=dtype))

    def _split_in(self, zxbcdt: Tensor):
        return zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)  # z, xBC, dt

    def _split_conv(self, xbc: Tensor):
        D, GN = self.d_inner, self.ngroups * self.d_state
        x, Bm, Cm = xbc.split([D, GN, GN], dim=-1)
        return (x.unflatten(-1, (self.nheads, self.headdim)), Bm.unflatten(-1, (self.ngroups, self.d_state)),
                Cm.unflatten(-1, (self.ngroups, self.d_state)))

    def _direction(self, xbc, dt, window, h0, keep, ends, rate, s: str, seq=None, cuts=None):
        """xBC (B, C, L) conv inputs, dt (B, L, heads) -> (y (B, L, heads, P), (window, state),
        {cut: state after cut - 1} or None)."""
        conv, k = getattr(self, "conv1d" + s), self.d_conv
        if keep is not None:
            xbc = xbc * keep[:, None, :].to(xbc.dtype)
        win = window.to(xbc.dtype) if window is not None else xbc.new_zeros(xbc.shape[0], xbc.shape[1], k - 1)
        if cuts is None:
            if traced():  # compile, export, ONNX: plain ops, no custom autograd.Function
                xconv = causal_conv(torch.cat([win, xbc], dim=-1), conv)
            else:  # shifted multiply-adds on xbc itself, recomputing backward
                xconv = causal_conv1d_fn(xbc, conv.weight[:, 0], conv.bias, win, "silu")
            window = stream_window(win, xbc, ends)
        else:
            xc = torch.cat([win, xbc], dim=-1)
            cols = self._seq_columns(seq, k)
            if cols is None:
                xconv = causal_conv(xc, conv)
            elif traced():
                xconv = packed_conv(xc, conv, cols)
            else:  # the unpacked convolution, then the first k - 1 outputs of each document again
                xconv = packed_fix(causal_conv1d_fn(xbc, conv.weight[:, 0], conv.bias, win, "silu"), xc, conv,
                                   cols)
        x, Bm, Cm = self._split_conv(xconv.transpose(1, 2))  # (B, L, ...)
        A = -torch.exp(self.ssm_param("A_log" + s))
        D, dt_bias = self.ssm_param("D" + s), self.ssm_param("dt_bias" + s)
        opts = {"dt_bias": dt_bias, "dt_softplus": True, "dt_limit": self.dt_limit}
        if keep is not None or isinstance(rate, Tensor) or rate != 1.0:
            # the step made explicit: clamped, scaled by the rate, zero at padded positions
            dt = scale_rate(F.softplus(wide(dt) + dt_bias).clamp(*self.dt_limit), rate)
            if keep is not None:
                dt = dt * keep[..., None]
            opts = {}
        sd = state_dtype(self.A_log)
        scan_heads = selective.scan_heads_loop if real_route() else selective.scan_heads  # (export route)
        if cuts is None:
            y, h = scan_heads(x, dt, A, Bm, Cm, self.chunk_size, D, initial_states=h0, **opts)
            return y, (window.to(sd), h), None

        def run(a, b, h):
            sq = None if seq is None else seq[:, a:b] - seq[:, a:a + 1]
            return scan_heads(x[:, a:b], dt[:, a:b], A, Bm[:, a:b], Cm[:, a:b], self.chunk_size, D,
                              initial_states=h, seq_idx=sq, **opts)

        ys, found = self._segments(run, xbc.shape[-1], h0, seq, cuts, boundaries=False)
        found = {e: (packed_window(xc, k, e, cols).to(sd), h) for e, h in found.items()}
        return torch.cat(ys, dim=1), found[xbc.shape[-1]], found

    def _mix(self, h, state, keep, ends, lengths, rate, seq=None, cuts=None):
        z, xbc, dt = self._split_in(self.in_proj(h))
        xbc = xbc.transpose(1, 2)  # (B, C, L)
        window, h0 = state if state is not None else (None, None)
        y, next_state, found = self._direction(xbc, dt, window, h0, keep, ends, rate, "", seq, cuts)
        y = y.flatten(-2)  # (B, L, D)
        if self.bidirectional:
            rkeep = None if keep is None else reverse_rows(keep[:, None], ends)[:, 0]
            rdt = reverse_rows(dt.transpose(1, 2), ends).transpose(1, 2)
            rev = self._direction(reverse_rows(xbc, ends), rdt,
                                  None, None, rkeep, None, rate, "_b")[0].flatten(-2)
            y = (y + reverse_rows(rev.transpose(1, 2), ends).transpose(1, 2)) / 2
        return self.norm(y, z), next_state, found

    def step(self, x: Tensor, state, *, rate: float | Tensor = 1.0):
        """One token x (B, H) and the state -> (y (B, H), next state); ``rate`` a number or (B,) tensor."""
        self._check_step_input(x)
        self._check_state(state, x.shape[0])
        rate = (self._check_rate_rows(rate, x.shape[0]) if isinstance(rate, Tensor)
                else self._check_rate(rate))
        window, h0 = state
        z, xbc, dt = self._split_in(self.in_proj(x))
        xconv, window = conv_step(window, xbc, self.conv1d)
        xh, Bm, Cm = self._split_conv(xconv)
        A = -torch.exp(self.ssm_param("A_log"))
        D, dt_bias = self.ssm_param("D"), self.ssm_param("dt_bias")
        if not isinstance(rate, Tensor) and rate == 1.0:
            y, h = selective.step_heads(h0, xh, dt, A, Bm, Cm, D, dt_bias=dt_bias, dt_softplus=True,
                                        dt_limit=self.dt_limit)
        else:
            step = scale_rate(F.softplus(wide(dt) + dt_bias).clamp(*self.dt_limit), rate)
            y, h = selective.step_heads(h0, xh, step, A, Bm, Cm, D)
        y = self.norm(y.flatten(-2).to(z.dtype), z)
        return self.output(y, x), (window.to(h0.dtype), h)
