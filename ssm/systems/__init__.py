"""One module of pure functions per SSM family, with the same verbs (see docs/systems.md)."""

from . import dense, diag, dplr, rtf, s5, selective

__all__ = ["dense", "diag", "dplr", "rtf", "s5", "selective"]
