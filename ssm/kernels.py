"""The public kernel functions, one per structured family: K (H, L) from the SSM parameters.

They live in the family modules (``ssm.systems.dplr``, ``ssm.systems.diag``, ``ssm.systems.rtf``) beside
the other verbs of each family (step, free response, final state); this module keeps their names.
"""

from __future__ import annotations

from .systems.common import KERNEL_DISCS
from .systems.diag import diag_kernel
from .systems.dplr import dplr_kernel
from .systems.rtf import RTF_OVERSAMPLE, rtf_kernel

__all__ = ["KERNEL_DISCS", "RTF_OVERSAMPLE", "diag_kernel", "dplr_kernel", "rtf_kernel"]
