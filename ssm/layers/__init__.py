"""SSM layers: nn.Modules that own the parameters and call the kernel functions."""

from .base import SSMLayer
from .lti import LTILayer
from .mamba import Mamba, Mamba2
from .rtf import RTF
from .s4 import S4
from .s4d import S4D
from .s5 import S5

LAYERS = {"s4": S4, "s4d": S4D, "rtf": RTF, "s5": S5, "mamba": Mamba, "mamba2": Mamba2}

__all__ = ["LAYERS", "LTILayer", "Mamba", "Mamba2", "RTF", "S4", "S4D", "S5", "SSMLayer"]
