"""The one backend resolver of the package: every op that has more than one implementation calls
``resolve_backend(op, backend, device)`` once per call and dispatches on the answer; layers pass their
``backend`` argument through.

``OPS`` holds, per op, the backends it accepts (``"auto"`` first), the module of its optional Triton kernels
in ``ssm.ops`` (each re-exports ``triton_available`` as ``available()``: whether triton imports; importing
the module does not import triton) and the rule that resolves ``"auto"``. Asking for ``"triton"``
explicitly needs CUDA tensors, or CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), else
``ValueError``; and the triton package, else ``ImportError`` with the install command. Nothing is imported,
printed or logged at import time.

A new op is one line in ``OPS`` (e.g. SSD: ``"ssd": Op(TORCH_OR_TRITON, "ssd_triton", _flagged("ssd"))``;
its "auto" stays "torch" until ``ssm.ops.ssd`` sets ``AUTO_TRITON = True``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._checks import check_choice, traced, traced_size

__all__ = ["OPS", "Op", "TRITON_INSTALL", "interpreting", "resolve_backend", "triton_accepts",
           "triton_available"]

TRITON_INSTALL = "pip install triton  (or: pip install 'ssm-layers[triton]')"


@dataclass(frozen=True)
class Op:
    """An op's backends (``"auto"`` first), the ``ssm.ops`` module of its Triton kernels (None: no
    ``"triton"`` backend) and ``auto(device, nbytes)``: what ``"auto"`` resolves to."""

    backends: tuple[str, ...]
    kernels: str | None
    auto: Callable[[torch.device, int | None], str]


def _kernels(op: str):
    return importlib.import_module(f"{__package__}.{OPS[op].kernels}")


def triton_available() -> bool:
    """Whether the triton package can be imported (the Triton kernel modules' ``available``)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton's interpreter is switched on (``TRITON_INTERPRET=1``): kernels then run on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_accepts(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of ``device``: CUDA, or the CPU under the interpreter."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and interpreting())


def _auto_cauchy(op: str) -> Callable[[torch.device, int | None], str]:
    """Cauchy / Vandermonde: ``"triton"`` on CUDA when installed and agreeing with the reference on a probe
    (once per device), else ``"naive"`` while the (W, N, L) temporary (``nbytes``) stays within
    ``ssm.ops.cauchy.AUTO_NAIVE_MAX_BYTES``, else ``"chunked"``; ``"naive"`` under torch.compile / export."""

    def auto(device: torch.device, nbytes: int | None) -> str:
        from . import cauchy

        if traced_size(nbytes) or torch.compiler.is_compiling():
            return "naive"  # the chunked loop needs a concrete length: the materialized product is traced
        if device.type == "cuda" and not traced() and _kernels(op).works(device):
            return "triton"
        return "naive" if nbytes is None or nbytes <= cauchy.AUTO_NAIVE_MAX_BYTES else "chunked"

    return auto


def _flagged(op: str) -> Callable[[torch.device, int | None], str]:
    """``"triton"`` for CUDA tensors once ``ssm.ops.<op>.AUTO_TRITON`` is set (a kernel checked on a GPU) and
    triton imports, else ``"torch"``."""

    def auto(device: torch.device, nbytes: int | None) -> str:
        flag = getattr(importlib.import_module(f"{__package__}.{op}"), "AUTO_TRITON", False)
        return "triton" if flag and device.type == "cuda" and _kernels(op).available() else "torch"

    return auto


TORCH_OR_TRITON = ("auto", "torch", "triton")

OPS: dict[str, Op] = {
    "cauchy": Op(("auto", "naive", "chunked", "triton"), "cauchy_triton", _auto_cauchy("cauchy")),
    "vandermonde": Op(("auto", "naive", "chunked", "triton"), "cauchy_triton", _auto_cauchy("vandermonde")),
    "selective_scan": Op(TORCH_OR_TRITON, "selective_scan_triton", _flagged("selective_scan")),
    "ssd": Op(TORCH_OR_TRITON, "ssd_triton", _flagged("ssd")),
}


def resolve_backend(op: str, backend: str, device: torch.device, *, nbytes: int | None = None) -> str:
    """The concrete backend of ``op`` (a key of ``OPS``) for ``backend`` and operands on ``device``.

    Args:
        op: ``"cauchy"``, ``"vandermonde"``, ``"selective_scan"``, ``"ssd"``.
        backend: one of ``OPS[op].backends``.
        device: device of the operands.
        nbytes: the size of the temporary a materializing backend would need (Cauchy / Vandermonde: the
            (W, N, L) matrix; a ``torch.SymInt`` under a dynamic length), read by ``"auto"``.

    Returns:
        a backend of ``OPS[op].backends`` other than ``"auto"``.

    Raises:
        ValueError: unknown ``op`` or ``backend``, or ``"triton"`` asked for with tensors that are neither on
            CUDA nor on the CPU under ``TRITON_INTERPRET=1``.
        ImportError: ``"triton"`` asked for without the triton package (the message gives the install
            command).
    """
    check_choice("op", op, tuple(OPS))
    spec = OPS[op]
    check_choice("backend", backend, spec.backends)
    device = torch.device(device)
    if backend == "auto":
        return spec.auto(device, nbytes)
    if backend == "triton":
        if not triton_accepts(device):
            raise ValueError(f"backend 'triton' needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1, "
                             f"Triton's interpreter); got tensors on {device.type!r}")
        if not _kernels(op).available():
            raise ImportError(f"backend 'triton' needs the triton package: {TRITON_INSTALL}")
    return backend
