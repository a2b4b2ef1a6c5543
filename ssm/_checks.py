"""Argument validation shared by the whole library.

Every public function validates its inputs with these helpers so that bad input raises a ``ValueError``
that names the argument and says what was expected, instead of failing deep inside torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` naming ``name``."""
    if not isinstance(value, str) or value not in choices:
        opts = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {opts}; got {value!r}")
    return value


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
        isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point()
    ):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def check_positive(name: str, value: Any) -> Any:
    """Check that a float or tensor is strictly positive (all entries)."""
    if isinstance(value, torch.Tensor):
        if torch.compiler.is_compiling():
            # A value-dependent check would break the compiled graph; eager calls (and tests) still check.
            return value
        if value.is_complex():
            raise ValueError(f"{name} must be real and positive; got a complex tensor")
        if value.numel() and not bool((value > 0).all()):
            raise ValueError(f"{name} must be positive; got min {value.min().item():.3g}")
    elif not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive number; got {value!r}")
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
