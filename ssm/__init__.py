"""ssm: structured state-space sequence layers (HiPPO, S4, S4D, RTF) for PyTorch.

Public API: the layers ``S4``, ``S4D``, ``RTF`` (``ssm.layers``), the residual ``SSMBlock``, the stacked
``SSMModel``, and the pure-function modules ``hippo``, ``discretize``, ``kernels``, ``transfer``,
``reference`` and ``optim``.
"""

__version__ = "0.1.0"

from . import discretize, hippo, kernels, layers, optim, reference, transfer
from .blocks import SSMBlock
from .layers import RTF, S4, S4D, SSMLayer
from .models import SSMModel

__all__ = [
    "RTF",
    "S4",
    "S4D",
    "SSMBlock",
    "SSMLayer",
    "SSMModel",
    "__version__",
    "discretize",
    "hippo",
    "kernels",
    "layers",
    "optim",
    "reference",
    "transfer",
]
