"""Adapters that put ``ssm`` layers into other libraries' models.

``ssm.integrations.hf``: Hugging Face ``transformers`` (the ``hf`` extra), imported on first access so that
importing ``ssm.integrations`` needs nothing beyond ``ssm``'s own dependencies. ``SSMMixer``
(``ssm.integrations.generic``): any codebase that calls attention as ``attn(x, mask=...)``.
"""

import importlib

from .generic import SSMMixer

__all__ = ["SSMMixer", "generic", "hf"]


def __getattr__(name: str):
    if name == "hf":
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ssm.integrations' has no attribute {name!r}")
