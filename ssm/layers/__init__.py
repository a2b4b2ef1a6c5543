"""SSM layers: nn.Modules that own the parameters and call the kernel functions."""

from .base import SSMLayer
from .lti import LTILayer
from .rtf import RTF
from .s4 import S4
from .s4d import S4D
from .s5 import S5

LAYERS = {"s4": S4, "s4d": S4D, "rtf": RTF, "s5": S5}

__all__ = ["LAYERS", "LTILayer", "RTF", "S4", "S4D", "S5", "SSMLayer"]
