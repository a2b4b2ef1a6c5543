"""Datasets: LRA loaders, ListOps and Pathfinder generators, MNIST-format sequential images.

Malformed files raise :class:`DataError` (a ``ValueError`` naming the file and the line or record).

Names are resolved lazily (PEP 562), so ``python -m ssm.data.listops`` does not import its own module twice.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ListOpsDataset": "listops",
    "generate_listops": "listops",
    "write_listops": "listops",
    "LRA_TASKS": "lra",
    "AANDataset": "lra",
    "CIFARGrayDataset": "lra",
    "DataError": "errors",
    "IMDBDataset": "lra",
    "PathfinderDataset": "lra",
    "load_lra": "lra",
    "SequentialMNIST": "mnist",
    "load_mnist": "mnist",
    "read_idx": "mnist",
    "generate_pathfinder": "pathfinder",
    "write_pathfinder": "pathfinder",
    "collate_pad": "text",
    "collate_pair": "text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ssm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
