"""The base that every SSM layer shares, whatever its family's tier (docs/systems.md).

A layer maps u (B, L, H) to y (B, L, H) by a parallel path (``forward``) and a recurrent one (``step``) that
agree; ``forward(x, state, return_state=True)`` continues from a state, so a stream in chunks equals one pass.
The state is whatever structure the family needs (a tensor, or a tuple such as Mamba's convolution window
and SSM state): nothing outside the layer looks inside it, callers go through ``default_state``, ``step``
and ``forward(..., return_state=True)``.

This base holds what does not depend on the family: argument and state checks, the SSM parameters and their
optimizer hints (``register_ssm``), ``build_ssm`` / ``reset_parameters``, the configuration carried in the
state_dict (``_extra_state``) and the output stage (activation, dropout, projection, GLU). The LTI layers
(S4, S4D, RTF, S5) add the convolution, the eval cache and the kernel in ``ssm.layers.lti.LTILayer``; the
selective ones (Mamba, Mamba-2) their scan in ``ssm.layers.mamba``.
"""

from __future__ import annotations

import json
import math
import warnings
from types import ModuleType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import (
    FLOAT_DTYPES,
    check_bool,
    check_choice,
    check_float_dtype,
    check_int,
    check_positive,
    check_real,
    traced,
)

ACTIVATIONS = ("gelu", "silu", "relu", "tanh", "identity")
_ACT = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh, "identity": lambda t: t}


def complex_param(z: Tensor) -> nn.Parameter:
    """Store a complex tensor as a real parameter (..., 2) (complex parameters as real views)."""
    return nn.Parameter(torch.view_as_real(z.resolve_conj().contiguous()).clone())


def as_complex(p: Tensor) -> Tensor:
    """Inverse of ``complex_param``: (..., 2) real -> (...) complex (a view, differentiable)."""
    return torch.view_as_complex(p if p.is_contiguous() else p.contiguous())


class _ParamStrides(torch.autograd.Function):
    """The identity, whose gradient has the strides of its input (see ``with_param_strides``)."""

    @staticmethod
    def forward(ctx, p: Tensor) -> Tensor:
        ctx.stride = p.stride()
        return p.view_as(p)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g if g.stride() == ctx.stride else g.new_empty_strided(g.shape, ctx.stride).copy_(g)


def with_param_strides(p: Tensor) -> Tensor:
    """``p`` itself, but its gradient is laid out with ``p``'s strides, size-1 dimensions included.

    Autograd's layout contract leaves the strides of size-1 dimensions free, and a gradient reaching C
    (1, H, N/2, 2) through a broadcast or ``view_as_complex`` takes others; DDP's bucket views require them
    exactly and warn "Grad strides do not match bucket view strides" on every rank (issue 23)."""
    if traced() or not (p.requires_grad and torch.is_grad_enabled()):  # torch.func / compile: no DDP there
        return p
    return _ParamStrides.apply(p)


def check_dt_range(dt_min: float, dt_max: float) -> tuple[float, float]:
    """(dt_min, dt_max) as floats: finite, positive, dt_min <= dt_max."""
    for name, value in (("dt_min", dt_min), ("dt_max", dt_max)):
        check_positive(name, value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite positive number; got {value!r}")
    if dt_min > dt_max:
        raise ValueError(f"dt_min must be <= dt_max; got dt_min={dt_min}, dt_max={dt_max}")
    return float(dt_min), float(dt_max)


def init_log_dt(H: int, dt_min: float, dt_max: float, *, device=None, dtype=None) -> Tensor:
    """log dt_h drawn uniformly in [log dt_min, log dt_max] (S4's initialization of the step size)."""
    dt_min, dt_max = check_dt_range(dt_min, dt_max)
    r = torch.rand(H, device=device, dtype=dtype)
    return r * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)


def _accept_missing_config(module, state_dict, prefix, *args) -> None:
    """State dicts saved before the configuration was carried have no ``_extra_state``: accept them."""
    state_dict.setdefault(prefix + "_extra_state", module.get_extra_state())


def check_input_dtype(x: Tensor) -> None:
    """Layers take real floating inputs: integer, bool and complex ones are refused, not truncated."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a real floating-point tensor (float16, bfloat16, float32 or float64); "
                         f"got {x.dtype}")


def state_leaves(state: Any) -> list[Tensor]:
    """The tensors of a state, in order (a tensor, or nested tuples / lists of tensors)."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, (tuple, list)):
        return [t for s in state for t in state_leaves(s)]
    raise ValueError(f"a state is a tensor or a tuple of tensors; got {type(state).__name__}")


def map_state(fn, state: Any) -> Any:
    """``state`` with ``fn`` applied to every tensor, keeping the structure (e.g. ``lambda t: t[:, idx]``)."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, (tuple, list)):
        return type(state)(map_state(fn, s) for s in state)
    raise ValueError(f"a state is a tensor or a tuple of tensors; got {type(state).__name__}")


class SSMLayer(nn.Module):
    """Base class of every SSM layer (S4, S4D, RTF, S5, Mamba, Mamba2).

    Args:
        d_model: H, the number of features.
        bidirectional: add a pass backwards in time (the output reads the future; no state passing).
        transposed: inputs/outputs are (B, H, L) instead of the default (B, L, H).
        ssm_lr, ssm_weight_decay: optimizer hints attached to the SSM parameters (read by ``ssm.optim``);
            ``ssm_lr=None`` lets them follow the global learning rate.

    A subclass provides ``family`` (its module in ``ssm.systems``), ``ssm_init``, ``default_state``,
    ``forward`` and ``step``, and calls ``init_output`` for its output stage.
    """

    def __init__(
        self,
        d_model: int,
        *,
        bidirectional: bool = False,
        transposed: bool = False,
        ssm_lr: float | None = 1e-3,
        ssm_weight_decay: float = 0.0,
        dtype=None,
    ) -> None:
        super().__init__()
        self.d_model = check_int("d_model", d_model, minimum=1)
        self.bidirectional = check_bool("bidirectional", bidirectional)
        self.transposed = check_bool("transposed", transposed)
        if ssm_lr is not None:
            ssm_lr = check_real("ssm_lr", ssm_lr, positive=True)
        ssm_weight_decay = check_real("ssm_weight_decay", ssm_weight_decay, minimum=0.0)
        check_float_dtype("dtype", dtype)
        self._hint = {"weight_decay": ssm_weight_decay}
        if ssm_lr is not None:
            self._hint["lr"] = ssm_lr
        self._ssm_names: list[str] = []
        self._hinted_names: list[str] = []
        self.register_load_state_dict_pre_hook(_accept_missing_config)

    #: Opt-in check (off by default: it synchronizes a GPU) that ``forward`` raises a ``ValueError`` naming
    #: the batch index and the first position of a non-finite input, instead of letting the FFT spread it.
    #: Set it on one layer (``layer.check_finite = True``) or on the class for all. Skipped under
    #: ``torch.compile`` / ``torch.export``, where a value check would break the graph.
    check_finite: bool = False

    # ---- what a subclass provides ------------------------------------------------------------------------
    #: The family module in ``ssm.systems`` whose verbs this layer calls.
    family: ClassVar[ModuleType]

    def default_state(self, batch_size: int, *, device=None) -> Any:
        """The zero state for a batch: the starting point of ``step`` and ``forward(x, state=...)``."""
        raise NotImplementedError

    def ssm_init(self, real_dtype: torch.dtype) -> dict[str, tuple[Tensor, bool, bool]]:
        """The initial SSM parameters, name -> (value, complex, optimizer hint), in the order they are drawn;
        called on the CPU (inside ``torch.device("cpu")``) by ``build_ssm`` and ``reset_parameters``."""
        raise NotImplementedError

    # ---- the output stage ---------------------------------------------------------------------------------
    def init_output(self, features: int, *, activation: str = "identity", glu: bool = False,
                    dropout: float = 0.0, bias: bool = True, device=None, dtype=None) -> None:
        """The output stage: y (B, L, features) -> activation -> dropout -> ``out_proj`` -> GLU -> (B, L, H).
        """
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.glu = check_bool("glu", glu)
        self.drop = nn.Dropout(check_real("dropout", dropout, minimum=0.0, below=1.0))
        out = (2 if self.glu else 1) * self.d_model
        self.out_proj = nn.Linear(features, out, bias=check_bool("bias", bias), device=device, dtype=dtype)

    def output(self, y: Tensor, like: Tensor) -> Tensor:
        """The output stage on y (B, L, F) or (B, F); the result in the layout and dtype of the input ``like``
        (autocast keeps its own dtype)."""
        y = _ACT[self.activation](y)
        if self.drop.p and self.drop.training:  # (an identity module call costs as much as a small op)
            y = self.drop(y)
        autocast = torch.is_autocast_enabled()
        wdtype = self.out_proj.weight.dtype
        y = y.to(wdtype) if not autocast and y.dtype != wdtype else y  # (a no-op .to still dispatches)
        y = self.out_proj(y)
        if self.glu:
            y = F.glu(y, dim=-1)
        if self.transposed and y.ndim == 3:
            y = y.transpose(1, 2)
        return y.to(like.dtype) if not autocast and y.dtype != like.dtype else y

    # ---- SSM parameters, hints, initialization -----------------------------------------------------------
    def ssm_param(self, name: str) -> Tensor:
        """The SSM parameter ``name`` in float32 or wider: after ``.half()`` / ``.bfloat16()`` the system,
        kernel and state are still computed in float32 (as under autocast); gradients reach the parameter."""
        p = with_param_strides(getattr(self, name))
        return p.float() if p.dtype in (torch.float16, torch.bfloat16) else p

    def register_ssm(
        self, name: str, value: Tensor, *, complex_: bool = False, hint: bool = True
    ) -> nn.Parameter:
        """Register a parameter of the SSM system. With ``hint`` (Lambda, P, B, dt, the denominator, A_log)
        it gets this layer's optimizer hints (lr, weight_decay; ``optimizer_hints``, read by ``ssm.optim``);
        without (C, the numerators) it follows the global optimizer settings. Either way it keys the cache."""
        # contiguous: a strided view (Lambda.imag) would make a parameter whose storage holds other values
        param = complex_param(value) if complex_ else nn.Parameter(value.contiguous())
        self.register_parameter(name, param)
        if name not in self._ssm_names:
            self._ssm_names.append(name)
        if hint and name not in self._hinted_names:
            self._hinted_names.append(name)
        return param

    def ssm_parameters(self) -> list[nn.Parameter]:
        """The parameters ``register_ssm`` marked (the system's), looked up by name, so a replaced Parameter
        object counts too."""
        params = self._parameters  # (read directly: Module.__getattr__ costs a microsecond a name per step)
        return [p for p in (params[n] if n in params else getattr(self, n, None) for n in self._ssm_names)
                if p is not None]

    def optimizer_hints(self) -> dict[str, dict]:
        """Parameter name -> its optimizer hint (lr, weight_decay), read by ``ssm.optim.param_groups``.

        The hints live on the module, keyed by name, so they survive every route that makes new Parameter
        objects (``copy.deepcopy``, ``load_state_dict(assign=True)``, ``to_empty``, ``.to("meta")``,
        Hugging Face ``from_pretrained``, FSDP2 ``fully_shard``)."""
        return {name: dict(self._hint) for name in self._hinted_names}

    def build_ssm(self, device=None, dtype=None) -> None:
        """Register the SSM parameters of ``ssm_init`` on ``device`` (None: the current default device, so
        ``with torch.device("meta"):`` builds on meta; the values are computed on the CPU either way)."""
        target = torch.empty(0, device=device).device
        dtype = dtype or torch.get_default_dtype()
        real_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # half: drawn in float32
        with torch.device("cpu"):
            values = self.ssm_init(real_dtype)
        for name, (value, complex_, hint) in values.items():
            param = self.register_ssm(name, value.to(target), complex_=complex_, hint=hint)
            if param.dtype != dtype:
                param.data = param.data.to(dtype)

    def _real_dtype(self) -> torch.dtype:
        p = next(iter(self.ssm_parameters()), None)
        return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32

    def reset_extra(self, real_dtype: torch.dtype) -> None:
        """Re-initialize the parameters a subclass owns outside the SSM and the submodules (e.g. D)."""

    def reset_parameters(self) -> None:
        """Restore the initialization of every parameter in place: every submodule that has
        ``reset_parameters`` (projections, convolutions, norms), the subclass's own (``reset_extra``: D, the
        dt bias) and the SSM parameters (new random draws where the initialization is random). After
        ``to_empty()`` this gives a layer built on the meta device (FSDP2, Hugging Face) its real values."""
        real_dtype = self._real_dtype()
        with torch.no_grad():  # in the order of construction, so a seeded reset equals a seeded build
            self.reset_extra(real_dtype)
            for module in self.modules():
                if module is not self and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            with torch.device("cpu"):
                values = self.ssm_init(real_dtype)
            for name, (value, complex_, _) in values.items():
                getattr(self, name).copy_(torch.view_as_real(value.resolve_conj().contiguous()) if complex_
                                          else value)

    # ---- configuration in the state_dict -----------------------------------------------------------------
    #: Attributes shown by ``extra_repr`` after d_model, when the layer has them.
    repr_names: ClassVar[tuple[str, ...]] = ("d_state", "init", "disc", "rank", "constraint", "blocks",
                                             "backend")

    def extra_repr(self) -> str:
        parts = [str(self.d_model)]
        for name in self.repr_names:
            if hasattr(self, name):
                parts.append(f"{name}={getattr(self, name)!r}")
        if hasattr(self, "channels"):
            parts.append(f"channels={self.channels}")
        parts.append(f"bidirectional={self.bidirectional}")
        if self.transposed:
            parts.append("transposed=True")
        if getattr(self, "activation", "identity") != "identity" or hasattr(self, "channels"):
            parts.append(f"activation={self.activation!r}")
        if getattr(self, "glu", False):
            parts.append("glu=True")
        return ", ".join(parts)

    def config(self) -> dict:
        """The configuration that changes the computation without showing in any parameter's shape (the
        discretization, RTF's constraint, the activation); carried in the state_dict (``get_extra_state``)."""
        out = {"activation": self.activation}
        for name in ("disc", "constraint"):
            if hasattr(self, name):
                out[name] = getattr(self, name)
        return out

    def get_extra_state(self) -> Tensor:
        """``config()`` as a uint8 tensor of JSON (a tensor, so safetensors and Hugging Face can store it)."""
        return torch.tensor(list(json.dumps(self.config(), sort_keys=True).encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        """Refuse a state_dict saved from a layer with another configuration (e.g. zoh into bilinear)."""
        problem = self._config_mismatch(state)
        if problem is not None:
            raise ValueError(problem)

    def _config_mismatch(self, state) -> str | None:
        """Why the saved ``_extra_state`` does not fit this layer, or None when it does."""
        try:
            raw = bytes(state.tolist()).decode() if isinstance(state, torch.Tensor) else None
            saved = json.loads(raw) if raw is not None else dict(state)
        except (ValueError, TypeError, UnicodeDecodeError):
            return (f"the state_dict's _extra_state of {type(self).__name__} is not a layer configuration; "
                    f"got {state!r}")
        mine = self.config()
        diffs = [f"{k}={saved[k]!r} in the state_dict but {k}={mine.get(k)!r} in this layer"
                 for k in sorted(saved) if saved[k] != mine.get(k)]
        if diffs:
            return (f"{type(self).__name__}: the state_dict was saved from a layer with another "
                    f"configuration: {'; '.join(diffs)}")
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """PyTorch's, but an ``_extra_state`` of another configuration is reported like the other mismatches,
        in ``unexpected_keys`` (the reason as a warning), not raised before PyTorch lists them: strict loading
        fails with all of them, ``strict=False`` returns them. The layer keeps its own configuration."""
        key = prefix + "_extra_state"
        problem = self._config_mismatch(state_dict[key]) if key in state_dict else None
        if problem is not None:
            warnings.warn(f"{problem}; the layer keeps its own (the key is listed as unexpected)",
                          stacklevel=2)
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if problem is not None:
            if key in missing_keys:  # PyTorch lists the extra state it was not given as missing
                missing_keys.remove(key)
            unexpected_keys.append(key)

    # ---- checks shared by every forward and step ---------------------------------------------------------
    def _check_rate(self, rate: float) -> float:
        check_positive("rate", rate)
        return float(rate)

    def _to_BHL(self, x: Tensor) -> Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            want = "(B, H, L)" if self.transposed else "(B, L, H)"
            raise ValueError(f"x must be a 3-D tensor {want}; got {shape}")
        check_input_dtype(x)
        H = x.shape[1] if self.transposed else x.shape[2]
        if H != self.d_model:
            raise ValueError(f"x must have d_model={self.d_model} features; got {H} (shape {tuple(x.shape)})")
        return x if self.transposed else x.transpose(1, 2)

    def _check_step_input(self, x: Tensor) -> None:
        if self.bidirectional:
            raise ValueError("step is undefined for a bidirectional layer: its output depends on future "
                             "inputs")
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, d_model={self.d_model}) in step; got {got}")
        check_input_dtype(x)

    def _check_finite(self, u: Tensor) -> None:
        """The opt-in check of ``check_finite``: name the first non-finite input (it synchronizes)."""
        bad = ~torch.isfinite(u).all(dim=1)  # (B, L)
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"x has a non-finite value at batch index {b}, position {t}: the FFT "
                             "convolution would spread it to every output of that sequence, earlier "
                             "positions included")

    def _check_lengths(self, lengths: Tensor, Bsz: int, L: int) -> Tensor:
        if (not isinstance(lengths, torch.Tensor) or lengths.shape != (Bsz,) or lengths.is_floating_point()
                or lengths.is_complex() or lengths.dtype == torch.bool):
            raise ValueError(f"lengths must be an integer (not bool) tensor of shape ({Bsz},); "
                             f"got {lengths!r}")
        if traced():  # the value check would break the graph; eager calls check
            return lengths
        if bool((lengths < 0).any()) or bool((lengths > L).any()):
            raise ValueError(f"lengths must lie in [0, L={L}]; got {lengths.tolist()}")
        return lengths

    def _check_state(self, state: Any, Bsz: int, device: torch.device | None = None) -> None:
        """``state`` has the structure, shapes and kinds of ``default_state(Bsz)``, on ``device`` (x's).
        What is expected is worked out once per batch size, so a step pays only comparisons."""
        shapes, kinds = self._state_spec(Bsz)
        try:
            got = state_leaves(state)
        except ValueError:
            got = None
        if got is None or len(got) != len(shapes) or any(g.shape != s for g, s in zip(got, shapes)):
            have = ([tuple(g.shape) for g in got] if got is not None else type(state).__name__)
            want_txt = shapes[0] if len(shapes) == 1 else tuple(shapes)
            have_txt = have[0] if isinstance(have, list) and len(have) == 1 else have
            raise ValueError(f"state must have shape {want_txt} (see default_state); got {have_txt}")
        where = None if device is None else torch.device(device)
        for i, (g, complex_) in enumerate(zip(got, kinds)):
            if not (g.is_complex() if complex_ else g.is_floating_point()):
                kind = "complex64 or complex128" if complex_ else "a floating dtype"
                dtype = state_leaves(self.default_state(1, device="meta"))[i].dtype
                raise ValueError(f"state must be {kind} (it is computed in {dtype} or wider); got {g.dtype}")
            if where is not None and g.device != where:
                raise ValueError(f"state must be on x's device {where}; got one on {g.device}")

    def _state_spec(self, Bsz: int) -> tuple[list[tuple[int, ...]], list[bool]]:
        """(shapes, complex flags) of the leaves of ``default_state(Bsz)``, worked out once on meta and kept
        per batch size in the instance (they depend on the configuration only, never on values or dtype)."""
        specs = self.__dict__.setdefault("_state_specs", {})
        spec = specs.get(Bsz)
        if spec is None:
            want = state_leaves(self.default_state(max(Bsz, 1), device="meta"))
            shapes = [(0, *w.shape[1:]) if Bsz == 0 else tuple(w.shape) for w in want]
            spec = (shapes, [w.is_complex() for w in want])
            if len(specs) >= 16:
                specs.clear()
            specs[Bsz] = spec
        return spec

    @staticmethod
    def _outside_inference(state: Any) -> Any:
        """A state made under ``torch.inference_mode``, copied out of it when autograd may need it (an
        inference tensor cannot be saved for backward). Not under ``torch.compile`` / ``torch.export``, which
        cannot trace the inference-mode queries (a compiled caller passes ordinary tensors)."""
        if state is None or traced() or torch.is_inference_mode_enabled():
            return state
        return map_state(lambda t: t.clone() if t.is_inference() else t, state)

    def _prepare(self, x: Tensor, state, return_state: bool, lengths, rate: float):
        """The checks and padding shared by every ``forward``: (u (B, H, L) with padded inputs zeroed, rate,
        the result to return at once for an empty batch or sequence, else None)."""
        u = self._to_BHL(x)  # (B, H, L), a view
        Bsz, H, L = u.shape
        check_bool("return_state", return_state)
        if (state is not None or return_state) and self.bidirectional:
            raise ValueError("state passing is undefined for a bidirectional layer (it reads the future); "
                             "pass state=None and return_state=False")
        if lengths is not None:
            self._check_lengths(lengths, Bsz, L)
            if return_state and not self.ragged_state:
                raise ValueError("return_state with lengths is not supported: pass equal-length chunks, or "
                                 "use step for ragged streams")
            mask = torch.arange(L, device=u.device)[None, :] < lengths.to(u.device)[:, None]  # (B, L)
            if self.zero_padding:
                u = u * mask[:, None, :].to(u.dtype)
        if state is not None:
            self._check_state(state, Bsz, u.device)
        rate = self._check_rate(rate)
        if Bsz == 0 or L == 0:  # nothing to compute: an empty output (and the state unchanged)
            y = x.new_zeros(x.shape) + 0 * sum(p.sum() for p in self.parameters()).to(x.dtype)
            if not return_state:
                return u, rate, y
            if state is None:  # no step taken: the zero state, of this batch
                state = self._zero_state(Bsz, u.device)
            return u, rate, (y, state)
        if self.check_finite and not traced():  # value checks would break the graph
            self._check_finite(u)
        return u, rate, None

    # ---- packed documents, states at chosen positions, per-row rates ------------------------------------
    def _check_packing(self, u: Tensor, seq_idx, positions, lengths) -> tuple[Tensor | None, list[int] | None,
                                                                              Tensor | None]:
        """The checks of ``seq_idx`` and ``return_states_at``: (seq (B, L) long with each row's first document
        numbered 0, or None; the sorted distinct positions, or None; their order, i.e. for each requested
        position its index in the sorted list)."""
        Bsz, _, L = u.shape
        seq = None
        if seq_idx is not None:
            if (not isinstance(seq_idx, Tensor) or seq_idx.shape != (Bsz, L) or seq_idx.is_floating_point()
                    or seq_idx.is_complex() or seq_idx.dtype == torch.bool):
                got = (f"{tuple(seq_idx.shape)} {seq_idx.dtype}" if isinstance(seq_idx, Tensor)
                       else type(seq_idx).__name__)
                raise ValueError(f"seq_idx must be an integer tensor of shape (B, L) = {(Bsz, L)}; got {got}")
            if lengths is not None:
                raise ValueError("seq_idx and lengths cannot be combined: pack the documents without "
                                 "padding, or give the padding its own document index")
            seq = seq_idx.to(device=u.device, dtype=torch.long)
            if L > 1 and bool((seq[:, 1:] < seq[:, :-1]).any()):
                raise ValueError("seq_idx must be non-decreasing along each row (document indices); got a "
                                 "decrease")
            seq = seq - seq[:, :1]
        if positions is None:
            return seq, None, None
        if self.bidirectional:
            raise ValueError("return_states_at is undefined for a bidirectional layer (it reads the future)")
        pos = torch.as_tensor(positions) if not isinstance(positions, Tensor) else positions
        if pos.ndim != 1 or pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
            raise ValueError(f"return_states_at must be a 1-D integer tensor of positions; got "
                             f"{tuple(pos.shape)} {pos.dtype}")
        if lengths is not None:
            raise ValueError("return_states_at cannot be combined with lengths")
        if pos.numel() and (bool((pos < 0).any()) or bool((pos >= L).any())):
            raise ValueError(f"return_states_at must hold positions in [0, L={L}); got {pos.tolist()}")
        flat = pos.tolist()
        order = sorted(set(flat))
        where = {p: i for i, p in enumerate(order)}
        return seq, order, torch.tensor([where[p] for p in flat], dtype=torch.long, device=u.device)

    @staticmethod
    def _cuts(L: int, ends: list[int], seq: Tensor | None, *, boundaries: bool) -> list[int]:
        """Sorted segment ends: ``ends`` and L, with every document start of any row when ``boundaries``."""
        cuts = set(ends) | {L}
        if boundaries and seq is not None and L > 1:
            cuts |= {int(t) + 1 for t in (seq[:, 1:] != seq[:, :-1]).any(0).nonzero().flatten().tolist()}
        return sorted(cuts)

    @staticmethod
    def _reset_rows(state: Any, seq: Tensor | None, start: int) -> Any:
        """``state`` with the rows whose document starts at ``start`` set to zero (they start afresh)."""
        if state is None or seq is None or start == 0:
            return state
        keep = seq[:, start] == seq[:, start - 1]  # (B,)
        return map_state(lambda t: t * keep.view(-1, *[1] * (t.ndim - 1)).to(t.dtype), state)

    @staticmethod
    def _gather_states(found: dict, order: list[int], index: Tensor) -> Any:
        """The states after the requested positions, with a leading position axis, from {end: state}."""
        chosen = [found[p + 1] for p in order]
        leaves = [state_leaves(s) for s in chosen]
        stacks = [torch.stack([lv[i] for lv in leaves])[index] for i in range(len(leaves[0]))]
        it = iter(stacks)
        return map_state(lambda _: next(it), chosen[0])

    @staticmethod
    def _result(y: Tensor, next_state: Any, states: Any, return_state: bool, positions) -> Any:
        """y, then the state after the last position (``return_state``), then the states at positions."""
        out = (y,) + ((next_state,) if return_state else ()) + ((states,) if positions is not None else ())
        return out if len(out) > 1 else y

    def _zero_state(self, Bsz: int, device) -> Any:
        """``default_state(Bsz)``, also for an empty batch (``default_state`` takes batch_size >= 1)."""
        if Bsz:
            return self.default_state(Bsz, device=device)
        return map_state(lambda t: t[:0], self.default_state(1, device=device))

    def _open(self, x: Tensor, state, return_state: bool, lengths, rate, seq_idx, positions,
              split_rate=None) -> tuple:
        """Every ``forward``'s preamble: ``_prepare`` and ``_check_packing``, then what ends the call at once
        (an empty batch or sequence; the packed documents of a bidirectional layer, run one by one, at
        ``split_rate`` when given). Returns (result or None, u, rate, seq, order, index)."""
        u, rate, empty = self._prepare(x, state, return_state, lengths, rate)
        seq, order, index = self._check_packing(u, seq_idx, positions, lengths)
        if empty is not None:
            if order is not None:
                y, st = empty if return_state else (empty, None)
                empty = self._result(y, st, self._gather_states(
                    {p + 1: self._zero_state(u.shape[0], u.device) for p in order}, order, index),
                    return_state, order)
            return empty, u, rate, seq, order, index
        if seq is not None and self.bidirectional and not self.packs_bidirectional:
            done = self._split_documents(x, seq, rate if split_rate is None else split_rate)
            return done, u, rate, seq, order, index
        return None, u, rate, seq, order, index

    def _split_documents(self, x: Tensor, seq: Tensor, rate) -> Tensor:
        """Each document of each row run on its own (the exact route of a bidirectional layer)."""
        dim = 2 if self.transposed else 1
        rows = []
        for b in range(x.shape[0]):
            starts = [0] + (seq[b, 1:] != seq[b, :-1]).nonzero().flatten().add(1).tolist() + [x.shape[dim]]
            r = rate[b:b + 1] if isinstance(rate, Tensor) else rate
            rows.append(torch.cat([self(x[b:b + 1].narrow(dim, t0, t1 - t0), rate=r)
                                   for t0, t1 in zip(starts[:-1], starts[1:])], dim=dim))
        return torch.cat(rows, dim=0)

    def _check_rate_rows(self, rate: Tensor, Bsz: int) -> Tensor:
        """A per-row rate: a real (B,) tensor of finite positive values."""
        if rate.shape != (Bsz,) or not rate.is_floating_point():
            raise ValueError(f"rate must be a positive number or a real floating tensor of shape (B,) = "
                             f"({Bsz},); got {tuple(rate.shape)} {rate.dtype}")
        if not traced() and not bool(((rate > 0) & torch.isfinite(rate)).all()):
            raise ValueError(f"rate must be finite and positive in every row; got {rate.tolist()}")
        return rate

    def _rows_by_rate(self, fn, x: Tensor, state: Any, rate: Tensor, lengths, seq_idx, return_state: bool,
                      positions) -> Any:
        """``fn`` (a forward) with a per-row rate (B,): one call per distinct rate on its rows, reassembled.
        Exactly each row run with its own scalar rate; costs one system (and kernel) per distinct rate."""
        Bsz = x.shape[0]
        rate = self._check_rate_rows(rate, Bsz)
        groups = []
        for r in sorted(set(rate.tolist())):
            idx = (rate == r).nonzero().flatten().to(x.device)

            def pick(t: Tensor, i: Tensor = idx) -> Tensor:
                return t[i.to(t.device)]

            out = fn(x[idx], None if state is None else map_state(pick, state), return_state=return_state,
                     lengths=None if lengths is None else pick(lengths),
                     seq_idx=None if seq_idx is None else pick(seq_idx), rate=r, return_states_at=positions)
            groups.append((idx, out if isinstance(out, tuple) else (out,)))
        inv = torch.argsort(torch.cat([g[0] for g in groups]))
        parts = list(zip(*[g[1] for g in groups]))

        def join(items, dim):
            leaves = [state_leaves(s) for s in items]
            cat = [torch.cat([lv[i] for lv in leaves], dim=dim).index_select(dim, inv.to(leaves[0][i].device))
                   for i in range(len(leaves[0]))]
            it = iter(cat)
            return map_state(lambda _: next(it), items[0])

        y = join(parts[0], 0)
        next_state = join(parts[1], 0) if return_state else None
        states = join(parts[-1], 1) if positions is not None else None
        return self._result(y, next_state, states, return_state, positions)

    #: Right padding (``lengths``) by zeroing the padded inputs: exact for LTI layers, whose state stays zero
    #: through zeros; a selective layer masks its own way (False).
    zero_padding: ClassVar[bool] = True
    #: ``return_state`` together with ``lengths`` (each row's state at its own end) is supported.
    ragged_state: ClassVar[bool] = False
    #: ``forward`` stops a bidirectional pass at document boundaries itself (else ``seq_idx`` runs each
    #: document on its own, one call per document).
    packs_bidirectional: ClassVar[bool] = False

    def forward(self, x: Tensor, state: Any = None, *, return_state: bool = False,
                lengths: Tensor | None = None, rate: float = 1.0):
        raise NotImplementedError

    def step(self, x: Tensor, state: Any, *, rate: float = 1.0) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def masked_forward(self, x: Tensor, keep: Tensor, state: Any = None, *, return_state: bool = False,
                       return_states_at: Tensor | None = None):
        """``self(x, state, return_state=..., return_states_at=...)`` with a key-padding mask ``keep`` (B, L),
        True = a real token, for the integrations: the padded inputs are zeroed, which keeps an LTI layer's
        state at exactly its value through left padding (and right padding never reaches a valid output of a
        causal layer). A family for which zeroed inputs are not neutral (Mamba: projection and convolution
        biases) overrides it."""
        keep = (keep[:, None, :] if self.transposed else keep[..., None]).to(x.dtype)
        return self(x * keep, state, return_state=return_state, return_states_at=return_states_at)
