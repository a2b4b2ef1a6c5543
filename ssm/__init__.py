"""ssm: structured state-space sequence layers (HiPPO, S4, S4D, RTF, S5, Mamba, Mamba-2) for PyTorch.

Public API: the layers ``S4``, ``S4D``, ``RTF``, ``S5``, ``Mamba``, ``Mamba2`` (``ssm.layers``), the residual
``SSMBlock``, the stacked
``SSMModel``, and the pure-function modules ``hippo``, ``discretize``, ``systems`` (one module per SSM
family), ``kernels``, ``transfer`` and ``optim``. ``ssm.reference`` (the float64 oracle of the tests),
``ssm.data`` and ``ssm.export`` (ONNX export) are imported on first access, so importing ``ssm`` never loads
them.
"""

__version__ = "0.1.0"

import importlib

from . import discretize, hippo, kernels, layers, optim, systems, transfer
from .blocks import SSMBlock
from .layers import RTF, S4, S4D, S5, LTILayer, Mamba, Mamba2, SSMLayer
from .models import SSMModel

__all__ = [
    "LTILayer",
    "Mamba",
    "Mamba2",
    "RTF",
    "S4",
    "S4D",
    "S5",
    "SSMBlock",
    "SSMLayer",
    "SSMModel",
    "__version__",
    "data",
    "discretize",
    "export",
    "hippo",
    "kernels",
    "layers",
    "optim",
    "reference",
    "systems",
    "transfer",
]

_LAZY = ("data", "export", "reference")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ssm' has no attribute {name!r}")
