"""Argument validation shared by the whole library.

Every public function validates its inputs with these helpers so that bad input raises a ``ValueError``
that names the argument and says what was expected, instead of failing deep inside torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` naming ``name``."""
    if not isinstance(value, str) or value not in choices:
        opts = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {opts}; got {value!r}")
    return value


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer (not a bool) >= ``minimum``.

    A symbolic size (``torch.SymInt``: a dynamic sequence length under ``torch.compile`` or ``torch.export``)
    is returned as is, not specialized by ``int()``; its minimum becomes a runtime assertion of the graph.
    """
    if isinstance(value, torch.SymInt):
        if minimum is not None:
            msg = f"{name} must be >= {minimum}"  # a constant: Dynamo traces no closure over a SymInt
            torch._check(value >= minimum, lambda: msg)
        return value
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
        isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point()
    ):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def traced_size(n: Any) -> bool:
    """Whether a size may be symbolic, so that the code using it must not branch on its value: a
    ``torch.SymInt`` (``torch.export``), or any int while ``torch.compile`` traces (Dynamo shows a dynamic
    size as a plain int, so the traced code takes the symbolic-safe path whatever the size)."""
    return isinstance(n, torch.SymInt) or torch.compiler.is_compiling()


def traced() -> bool:
    """Inside ``torch.compile`` / ``torch.export`` tracing or a ``torch.func`` transform (vmap, grad, jvp):
    a value-dependent check or a cache would break the graph or the batching there."""
    if torch.compiler.is_compiling():
        return True
    try:
        return torch._C._functorch.maybe_current_level() is not None
    except AttributeError:  # a torch without functorch levels
        return False


#: Depth of ``ssm.export.real_arithmetic`` contexts (the real route is taken while it is positive).
_REAL_ROUTE = [0]


def real_route() -> bool:
    """Whether the layers take their route in real arithmetic (no complex tensor; recurrences as one loop
    operator): while ``torch.onnx.export`` runs (``torch.onnx.is_in_onnx_export()``), or inside
    ``ssm.export.real_arithmetic`` (docs/deployment.md)."""
    if _REAL_ROUTE[0]:
        return True
    # the exporter traces (is_compiling; asked first, it keeps an eager call at ~0.3 us). Its flag is read
    # as well: Dynamo folds is_in_onnx_export() to False, and the exporter's strict fallback runs Dynamo.
    return torch.compiler.is_compiling() and (torch.onnx.is_in_onnx_export()
                                              or torch.compiler.is_exporting() and _onnx_flag())


def _onnx_flag() -> bool:
    """The dynamo exporter's own flag (torch's, private: read defensively)."""
    try:
        import torch.onnx._internal.exporter._flags as flags
    except ImportError:  # a torch without the dynamo exporter
        return False
    return bool(getattr(flags, "_is_onnx_exporting", False))


def check_positive(name: str, value: Any) -> Any:
    """Check that a float or tensor is strictly positive (all entries)."""
    if isinstance(value, torch.Tensor):
        if traced():
            # A value-dependent check would break the compiled graph; eager calls (and tests) still check.
            return value
        if value.is_complex():
            raise ValueError(f"{name} must be real and positive; got a complex tensor")
        if value.numel() and not bool((value > 0).all()):
            raise ValueError(f"{name} must be positive; got min {value.min().item():.3g}")
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} must be finite; got max {value.max().item():.3g}")
    # 0 < value < inf rather than math.isfinite, which torch.compile cannot trace for a symbolic float.
    elif not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite positive number; got {value!r}")
    return value


def check_tensor(name: str, value: Any, ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    """Check that ``value`` is a tensor, optionally of the given number of dimensions."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions; got shape {tuple(value.shape)}")
    return value


def check_shape(name: str, value: torch.Tensor, shape: Sequence[int | None], what: str = "") -> torch.Tensor:
    """Check ``value.shape`` against ``shape`` (``None`` matches any size)."""
    ok = value.ndim == len(shape) and all(s is None or s == v for s, v in zip(shape, value.shape))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        extra = f" {what}" if what else ""
        raise ValueError(f"{name} must have shape {want}{extra}; got {tuple(value.shape)}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool (``bool()`` of a string such as 'no' would be True)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}")
    return value


def check_real(name: str, value: Any, *, minimum: float | None = None, below: float | None = None,
               positive: bool = False) -> float:
    """Return ``value`` as a finite float (not a bool, string or None), optionally >= ``minimum``, < ``below``
    or > 0; non-finite values (inf, nan) are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    value = float(value)
    if positive and not value > 0:
        raise ValueError(f"{name} must be positive; got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    if below is not None and not value < below:
        raise ValueError(f"{name} must be < {below}; got {value!r}")
    return value


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_dtype(name: str, value: Any) -> torch.dtype | None:
    """``value`` if it is None or a floating torch dtype (the parameters' dtype of a module)."""
    if value is not None and value not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be None or one of torch.float16, torch.bfloat16, torch.float32, "
                         f"torch.float64; got {value!r}")
    return value


def single_backward(op: str, instead: str):
    """Decorator for the backward of a custom ``autograd.Function`` that is not itself differentiable.

    Torch's ``once_differentiable`` alone lets a graph of such a backward be asked for
    (``create_graph=True``: a gradient penalty, a Hessian-vector product) and then returns wrong higher
    derivatives or fails deep inside autograd; this raises a ``RuntimeError`` naming ``op`` and ``instead``
    (what to use for higher derivatives) first."""

    def wrap(backward):
        inner = once_differentiable(backward)

        @functools.wraps(backward)
        def checked(ctx, *grads):
            # the engine runs a backward with grad mode on only for create_graph; torch.func transforms
            # (torch.func.grad) run it with grad mode on for a first derivative too: not refused there
            if torch.is_grad_enabled() and not traced():
                raise RuntimeError(f"{op}: its custom backward is not differentiable, so double backward "
                                   f"(create_graph=True: gradient penalties, Hessian-vector products) is not "
                                   f"supported; {instead}")
            return inner(ctx, *grads)

        return checked

    return wrap


def twin_backward(twin, inputs: tuple, needs: tuple, grads: tuple) -> tuple:
    """The backward of a custom ``autograd.Function`` under ``create_graph=True``: the gradients of
    ``twin(*inputs)`` (the same function in plain differentiable ops) with their graph, so that higher
    derivatives are exact; None for the inputs whose ``needs`` flag is False."""
    wanted = [t for t, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        got = iter(torch.autograd.grad(twin(*inputs), wanted, grads, create_graph=True, allow_unused=True))
    return tuple(next(got) if need else None for need in needs)
