"""ssm: structured state-space sequence layers (HiPPO, S4, S4D, RTF) for PyTorch."""

__version__ = "0.1.0"

from . import discretize, hippo, kernels, reference, transfer  # noqa: F401

__all__ = ["__version__", "discretize", "hippo", "kernels", "reference", "transfer"]
