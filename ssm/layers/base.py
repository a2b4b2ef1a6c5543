"""The shared base of every SSM layer: shapes, the two forward paths, D skip, output projection.

A layer maps u (B, L, H) to y (B, L, H) in two equivalent ways:

* convolutional (``forward``): y = activation(K * u + D u) -> dropout -> output linear, with the kernel
  K (C, H, L) from a pure function in ``ssm.kernels``;
* recurrent (``step``): one token at a time, x_k = Ab x_{k-1} + Bb u_k, y_k = C x_k + D u_k, then the same
  pointwise post-processing.

``forward(x, state)`` continues from a recurrent state, so a stream processed in chunks equals one pass.
A subclass owns the parameters and provides ``family`` (its module in ``ssm.systems``), ``discrete_system``
and ``default_state``; every path here calls the family's verbs (kernel, step, free_response or
state_input, final_state) on that system and nothing else.
"""

from __future__ import annotations

import copy
import json
import math
from types import ModuleType
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .._checks import (
    FLOAT_DTYPES,
    check_bool,
    check_choice,
    check_float_dtype,
    check_int,
    check_positive,
    check_real,
)
from ..ops.cauchy_triton import works as triton_works
from ..ops.fftconv import fftconv

ACTIVATIONS = ("gelu", "silu", "relu", "tanh", "identity")
_ACT = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh, "identity": lambda t: t}


def complex_param(z: Tensor) -> nn.Parameter:
    """Store a complex tensor as a real parameter (..., 2) (complex parameters as real views)."""
    return nn.Parameter(torch.view_as_real(z.resolve_conj().contiguous()).clone())


def as_complex(p: Tensor) -> Tensor:
    """Inverse of ``complex_param``: (..., 2) real -> (...) complex (a view, differentiable)."""
    return torch.view_as_complex(p if p.is_contiguous() else p.contiguous())


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


class SSMLayer(nn.Module):
    """Base class of S4, S4D and RTF.

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
        super().__init__()
        self.d_model = H = check_int("d_model", d_model, minimum=1)
        self.channels = check_int("channels", channels, minimum=1)
        self.bidirectional = check_bool("bidirectional", bidirectional)
        self.transposed = check_bool("transposed", transposed)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        dropout = check_real("dropout", dropout, minimum=0.0, below=1.0)
        if ssm_lr is not None:
            ssm_lr = check_real("ssm_lr", ssm_lr, positive=True)
        ssm_weight_decay = check_real("ssm_weight_decay", ssm_weight_decay, minimum=0.0)
        check_float_dtype("dtype", dtype)
        self._hint = {"weight_decay": ssm_weight_decay}
        if ssm_lr is not None:
            self._hint["lr"] = ssm_lr
        factory = {"device": device, "dtype": dtype}
        self.D = nn.Parameter(torch.randn(self.channels, H, **factory))
        self.drop = nn.Dropout(dropout)
        self.glu = check_bool("glu", glu)
        self.out_proj = nn.Linear(self.channels * H, (2 if glu else 1) * H, **factory)
        self._ssm_names: list[str] = []
        self.register_load_state_dict_pre_hook(_accept_missing_config)
        self._hinted_names: list[str] = []
        self._backend_cache: dict[str, str] = {}
        self._memo_store: dict[str, tuple] = {}
        self._memo_snapshot: list[Tensor] | None = None

    #: Opt-in check (off by default: it synchronizes a GPU) that ``forward`` raises a ``ValueError`` naming
    #: the batch index and the first position of a non-finite input, instead of letting the FFT spread it.
    #: Set it on one layer (``layer.check_finite = True``) or on the class for all. Skipped under
    #: ``torch.compile`` / ``torch.export``, where a value check would break the graph.
    check_finite: bool = False

    # ---- what a subclass provides ------------------------------------------------------------------------
    #: The family module in ``ssm.systems`` whose verbs (kernel, step, free_response, final_state) run the
    #: system that ``discrete_system`` builds.
    family: ClassVar[ModuleType]

    def discrete_system(self, rate: float = 1.0) -> NamedTuple:
        """The layer's discrete system in its family's structured form (differentiable; see the subclass)."""
        raise NotImplementedError

    def default_state(self, batch_size: int, *, device=None) -> Tensor:
        """The zero state for a batch: the starting point of ``step`` and ``forward(x, state=...)``."""
        raise NotImplementedError

    def ssm_param(self, name: str) -> Tensor:
        """The SSM parameter ``name`` in float32 or wider: after ``.half()`` / ``.bfloat16()`` the system,
        kernel and state are still computed in float32 (as under autocast); gradients reach the parameter."""
        p = getattr(self, name)
        return p.float() if p.dtype in (torch.float16, torch.bfloat16) else p

    def ssm_init(self, real_dtype: torch.dtype) -> dict[str, tuple[Tensor, bool, bool]]:
        """The initial SSM parameters, name -> (value, complex, optimizer hint), in the order they are drawn;
        called on the CPU (inside ``torch.device("cpu")``) by ``build_ssm`` and ``reset_parameters``."""
        raise NotImplementedError

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

    def reset_parameters(self) -> None:
        """Restore the initialization of every parameter in place: D, the output projection and the SSM
        parameters (new random draws where the initialization is random). After ``to_empty()`` this
        gives a layer built on the meta device (FSDP2, Hugging Face) its real initial values."""
        real_dtype = torch.float64 if self.D.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            with torch.device("cpu"):
                D = torch.randn(self.D.shape, dtype=real_dtype)
            self.D.copy_(D)
            self.out_proj.reset_parameters()
            with torch.device("cpu"):
                values = self.ssm_init(real_dtype)
            for name, (value, complex_, _) in values.items():
                getattr(self, name).copy_(torch.view_as_real(value.resolve_conj().contiguous()) if complex_
                                          else value)

    def extra_repr(self) -> str:
        parts = [str(self.d_model)]
        for name in ("d_state", "init", "disc", "rank", "constraint", "blocks", "backend"):
            if hasattr(self, name):
                parts.append(f"{name}={getattr(self, name)!r}")
        parts += [f"channels={self.channels}", f"bidirectional={self.bidirectional}"]
        if self.transposed:
            parts.append("transposed=True")
        parts.append(f"activation={self.activation!r}")
        if self.glu:
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
        try:
            raw = bytes(state.tolist()).decode() if isinstance(state, torch.Tensor) else None
            saved = json.loads(raw) if raw is not None else dict(state)
        except (ValueError, TypeError, UnicodeDecodeError):
            raise ValueError(f"the state_dict's _extra_state of {type(self).__name__} is not a layer "
                             f"configuration; got {state!r}") from None
        mine = self.config()
        diffs = [f"{k}={saved[k]!r} in the state_dict but {k}={mine.get(k)!r} in this layer"
                 for k in sorted(saved) if saved[k] != mine.get(k)]
        if diffs:
            raise ValueError(f"{type(self).__name__}: the state_dict was saved from a layer with another "
                             f"configuration: {'; '.join(diffs)}")

    def kernel_options(self) -> dict:
        """Keyword arguments of the family's ``kernel`` verb (the Cauchy / Vandermonde backend)."""
        return {}

    def resolved_backend(self, device: torch.device) -> str:
        """``self.backend`` resolved once per device type: ``"auto"`` becomes ``"triton"`` on CUDA when the
        package is installed and its kernel agrees with the torch path on a probe, else ``"auto"`` of
        ``ssm.ops.cauchy`` (the torch path: materialized below 16 MiB, bounded-memory chunks above)."""
        if self.backend != "auto":
            return self.backend
        if torch.compiler.is_compiling():
            return "auto"  # a traced graph takes the torch path (no probe kernel, no guard on this cache)
        hit = self._backend_cache.get(device.type)
        if hit is None:
            hit = "triton" if device.type == "cuda" and triton_works(device) else "auto"
            self._backend_cache[device.type] = hit
        return hit

    def ssm_parameters(self) -> list[nn.Parameter]:
        """The parameters ``register_ssm`` marked (the system's): a change of any of them invalidates the
        cached system and kernel. Looked up by name, so a replaced Parameter object counts too."""
        return [p for p in (getattr(self, n, None) for n in self._ssm_names) if p is not None]

    # ---- helpers ------------------------------------------------------------------------------------------
    def register_ssm(
        self, name: str, value: Tensor, *, complex_: bool = False, hint: bool = True
    ) -> nn.Parameter:
        """Register a parameter of the SSM system. With ``hint`` (Lambda, P, B, dt, the denominator) it
        gets this layer's optimizer hints (lr, weight_decay; ``optimizer_hints``, read by ``ssm.optim``);
        without (C, the numerators) it follows the global optimizer settings. Either way it keys the cache."""
        param = complex_param(value) if complex_ else nn.Parameter(value)
        self.register_parameter(name, param)
        if name not in self._ssm_names:
            self._ssm_names.append(name)
        if hint and name not in self._hinted_names:
            self._hinted_names.append(name)
        return param

    def optimizer_hints(self) -> dict[str, dict]:
        """Parameter name -> its optimizer hint (lr, weight_decay), read by ``ssm.optim.param_groups``.

        The hints live on the module, keyed by name, so they survive every route that makes new Parameter
        objects (``copy.deepcopy``, ``load_state_dict(assign=True)``, ``to_empty``, ``.to("meta")``,
        Hugging Face ``from_pretrained``, FSDP2 ``fully_shard``)."""
        return {name: dict(self._hint) for name in self._hinted_names}

    def _check_rate(self, rate: float) -> float:
        check_positive("rate", rate)
        return float(rate)

    def _params_unchanged(self) -> bool:
        snap = self._memo_snapshot
        params = self.ssm_parameters()
        if snap is None or len(snap) != len(params):
            return False
        for p, q in zip(params, snap):
            if p.shape != q.shape or p.dtype != q.dtype or p.device != q.device or not torch.equal(p, q):
                return False
        return True

    def memo(self, name: str, key: tuple, fn):
        """``fn()``, cached under ``name`` in eval mode without autograd while ``key`` and the values of the
        SSM parameters are unchanged; recomputed whenever a graph may be needed.

        The values are compared with a stored copy (O(H N), beside the O(H N L) kernel), so every route
        that changes a parameter counts: in-place on ``.data``, ``p.data = t``, a new Parameter object,
        ``vector_to_parameters``, ``load_state_dict``, optimizer steps, ``.to()``, ``.half().float()``.
        Under ``torch.compile`` / ``torch.export`` the cache is bypassed (its value comparison would break the
        graph): the compiled graph recomputes ``fn()``.
        """
        if torch.compiler.is_compiling():
            return fn()
        if self.training or torch.is_grad_enabled():
            self._memo_store.clear()
            self._memo_snapshot = None
            return fn()
        if not self._params_unchanged():
            self._memo_store.clear()
            self._memo_snapshot = [p.detach().clone() for p in self.ssm_parameters()]
        hit = self._memo_store.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = fn()
        self._memo_store[name] = (key, value)
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

        return self.memo("kernel", (L, rate), compute)

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
    ) -> SSMLayer:
        """An ``ssm.RTF`` layer with the same outputs: the exact transfer function of this layer's system.

        An RTF layer returns a copy of itself. Otherwise the family's ``transfer_function`` gives (b, a) in
        float64 (b_0, the lag-0 tap, goes into the RTF layer's D, which keeps a strictly proper numerator);
        D, the output projection, activation and GLU are copied. The result is built with
        ``constraint="none"`` (the denominator is set, not mapped), in ``dtype`` (default: this layer's;
        float64 coefficients survive conditioning that float32 ones do not).

        Raises:
            ValueError: the layer is bidirectional; or the conversion is ill-conditioned, which happens when
                many poles cluster near z = 1 (small dt, large d_state: docs/convert_to_rtf.md): a
                denominator root on or outside the unit circle, or a kernel of the converted coefficients
                (in float64 and rounded to ``dtype``) that differs from this layer's over ``check_length``
                taps by more than the tolerance of the dtype (1e-6 in float64, 1e-4 in float32).
        """
        from ..systems.rtf import rtf_kernel
        from .rtf import RTF

        if isinstance(self, RTF):
            return copy.deepcopy(self) if dtype is None else copy.deepcopy(self).to(dtype)
        if self.bidirectional:
            raise ValueError("to_rtf converts causal layers; got a bidirectional layer")
        if not hasattr(self.family, "transfer_function"):
            raise ValueError(f"{type(self).__name__} has no transfer-function conversion")
        rate = self._check_rate(rate)
        L = check_int("check_length", check_length, minimum=1)
        device = self.D.device
        dtype = self.D.dtype if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
        wide = copy.deepcopy(self).double()
        with torch.no_grad():
            system = wide.discrete_system(rate)
            b, a = self.family.transfer_function(system)  # (C, H, N+1), (H, N)
            K = self.family.kernel(system, L, **wide.kernel_options())[: self.channels]  # (C, H, L)
            C, H, N = b.shape[0], self.d_model, a.shape[-1]
            if N:
                companion = torch.zeros(H, N, N, dtype=a.dtype)
                companion[:, 0] = -a
                companion[:, 1:, :-1] = torch.eye(N - 1, dtype=a.dtype)
                radius = torch.linalg.eigvals(companion).abs().max().item()
                if not radius < 1:
                    raise ValueError(
                        f"the transfer function of this layer is ill-conditioned (clustered poles): its "
                        f"denominator has a root of modulus {radius:.6g} >= 1 although the system is stable; "
                        "a larger dt or a smaller d_state converts well"
                    )
            rtol = 1e-6 if dtype == torch.float64 else 1e-4
            rounded = (b.to(dtype).double(), a.to(dtype).double())
            for what, (bb, aa) in (("float64", (b, a)), (str(dtype), rounded)):
                K_rtf = rtf_kernel(bb.reshape(C * H, N + 1), aa.repeat(C, 1), L).reshape(C, H, L)
                err = ((K_rtf - K).norm() / K.norm().clamp_min(1e-300)).item()
                if not err <= rtol:
                    raise ValueError(
                        f"the transfer function of this layer is ill-conditioned (clustered poles): with "
                        f"{what} coefficients its kernel differs from the layer's by {err:.3g} relative over "
                        f"{L} taps (tolerance {rtol:g}); a larger dt, a smaller d_state or "
                        "dtype=torch.float64 converts well"
                    )
            out = RTF(H, N, constraint="none", channels=self.channels, transposed=self.transposed,
                      activation=self.activation, glu=self.glu, dropout=self.drop.p,
                      ssm_lr=self._hint.get("lr"), ssm_weight_decay=self._hint["weight_decay"],
                      device=device, dtype=dtype)
            b0 = b[..., 0]  # (C, H)
            out.a.copy_(a)
            out.b.copy_(b[..., 1:] - b0[..., None] * a)
            out.D.copy_(self.D.double() + b0)
            out.out_proj.load_state_dict(self.out_proj.state_dict())
        return out.train(self.training)

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

    def _check_finite(self, u: Tensor) -> None:
        """The opt-in check of ``check_finite``: name the first non-finite input (it synchronizes)."""
        bad = ~torch.isfinite(u).all(dim=1)  # (B, L)
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"x has a non-finite value at batch index {b}, position {t}: the FFT "
                             "convolution would spread it to every output of that sequence, earlier "
                             "positions included")

    def _post(self, y: Tensor) -> Tensor:
        """(B, C, H, L) or (B, C, H) SSM outputs -> activation, dropout, projection -> (B, L, H) or (B, H)."""
        if y.ndim == 4:
            y = rearrange(y, "b c h l -> b l (c h)")
        else:
            y = rearrange(y, "b c h -> b (c h)")
        y = self.drop(_ACT[self.activation](y))
        y = y.to(self.out_proj.weight.dtype) if not torch.is_autocast_enabled() else y
        y = self.out_proj(y)
        if self.glu:
            y = F.glu(y, dim=-1)
        return y

    def _check_lengths(self, lengths: Tensor, Bsz: int, L: int) -> Tensor:
        if (not isinstance(lengths, torch.Tensor) or lengths.shape != (Bsz,) or lengths.is_floating_point()
                or lengths.is_complex() or lengths.dtype == torch.bool):
            raise ValueError(f"lengths must be an integer (not bool) tensor of shape ({Bsz},); "
                             f"got {lengths!r}")
        if torch.compiler.is_compiling():  # the value check would break the graph; eager calls check
            return lengths
        if bool((lengths < 0).any()) or bool((lengths > L).any()):
            raise ValueError(f"lengths must lie in [0, L={L}]; got {lengths.tolist()}")
        return lengths

    def _check_state_tensor(self, state: Tensor, Bsz: int) -> None:
        want = self.default_state(Bsz, device="meta")
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != tuple(want.shape):
            got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(f"state must have shape {tuple(want.shape)} (see default_state); got {got}")
        ok = (state.is_complex() if want.is_complex() else state.is_floating_point())
        if not ok:
            kinds = "complex64 or complex128" if want.is_complex() else "a floating dtype"
            raise ValueError(f"state must be {kinds} (it is computed in {want.dtype} or wider); "
                             f"got {state.dtype}")

    # ---- the two paths ------------------------------------------------------------------------------------
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
            if return_state:
                raise ValueError("return_state with lengths is not supported: pass equal-length chunks, or "
                                 "use step for ragged streams")
            mask = torch.arange(L, device=u.device)[None, :] < lengths.to(u.device)[:, None]  # (B, L)
            u = u * mask[:, None, :].to(u.dtype)
        if state is not None:
            self._check_state_tensor(state, Bsz)
        rate = self._check_rate(rate)
        if Bsz == 0 or L == 0:  # nothing to compute: an empty output (and the state unchanged)
            y = x.new_zeros(x.shape) + 0 * self.D.sum().to(x.dtype)
            if not return_state:
                return u, rate, y
            if state is None:  # no step taken: the zero state, of this batch (batch 0 has no zero state)
                state = self.default_state(Bsz, device=u.device) if Bsz else self.default_state(1)[:0]
            return u, rate, (y, state)
        if self.check_finite and not torch.compiler.is_compiling():  # value checks would break the graph
            self._check_finite(u)
        return u, rate, None

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
        Bsz, H, L = u.shape
        if u.dtype in (torch.float16, torch.bfloat16):
            u = u.float()
        system = self._system(rate)
        K = self._kernel_of(system, L, rate)  # (C', H, L)
        K_rev = None
        if self.bidirectional:
            K, K_rev = K[: self.channels], K[self.channels :]
        u = u.to(K.dtype)
        D = self.D.to(K.dtype)
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
        y = self._post(y)  # (B, L, H)
        if self.transposed:
            y = y.transpose(1, 2)
        y = y.to(x.dtype) if not torch.is_autocast_enabled() else y
        return (y, next_state) if return_state else y

    def step(self, x: Tensor, state: Tensor, *, rate: float = 1.0) -> tuple[Tensor, Tensor]:
        """Recurrent path: one token x (B, H) and the state -> (y (B, H), next_state)."""
        if self.bidirectional:
            raise ValueError("step is undefined for a bidirectional layer: its output depends on future "
                             "inputs")
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, d_model={self.d_model}) in step; got {got}")
        check_input_dtype(x)
        self._check_state_tensor(state, x.shape[0])
        rate = self._check_rate(rate)
        u = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        with torch.autocast(device_type=u.device.type, enabled=False):
            y, next_state = self.family.step(self._system(rate), state, u)  # (B, C, H)
        y = y.real.to(u.dtype) + self.D.to(u.dtype) * u[:, None, :]
        y = self._post(y).to(x.dtype)
        return y, next_state
