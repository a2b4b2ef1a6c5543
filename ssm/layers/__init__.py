"""SSM layers: nn.Modules that own the parameters and call the kernel functions."""

from .base import SSMLayer
from .rtf import RTF
from .s4 import S4
from .s4d import S4D

LAYERS = {"s4": S4, "s4d": S4D, "rtf": RTF}

__all__ = ["LAYERS", "RTF", "S4", "S4D", "SSMLayer"]
