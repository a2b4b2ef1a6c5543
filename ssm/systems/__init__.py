"""One module of pure functions per SSM family, with the same verbs, in two tiers (docs/systems.md).

Every family (tier ``"scan"`` or ``"lti"``) provides:

* ``discretize(...)``: its continuous parameters (and, for a selective family, the input-dependent step)
  -> the discrete system;
* ``step(...)``: one token through the recurrence, -> (y, next state);
* its parallel path over a whole sequence: ``scan`` for scan families; the kernel (below) for LTI ones;
* ``final_state(...)``: the state after the last position, without the outputs.

Linear time-invariant families (tier ``"lti"``: the system does not depend on the input) add

* ``kernel(sys, L)``: the convolution kernel K_k = C Ab^k Bb, (Ch, H, L);
* ``free_response(sys, x0, L)``: the zero-input response C Ab^(k+1) x0 of a state;

and, where they exist, ``state_input`` (the state folded into the input of the one convolution),
``transfer_function`` (the rational form) and ``prepare_step(sys)`` / ``step_prepared(prep, x, u)`` (the
step from constants computed once per system, in real arithmetic; equal to ``step``, its reference).
A module declares its tier in ``TIER``; ``tests/test_layout.py``
checks every family module against ``VERBS[TIER]``. What only LTI families have is never assumed of every
family.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from . import dense, diag, dplr, rtf, s5, selective

#: The verbs every family of a tier provides.
VERBS = {
    "scan": ("discretize", "step", "scan", "final_state"),
    "lti": ("discretize", "step", "kernel", "free_response", "final_state"),
}
#: Every family module, by name.
FAMILIES = {"dense": dense, "diag": diag, "dplr": dplr, "rtf": rtf, "s5": s5, "selective": selective}


@runtime_checkable
class Family(Protocol):
    """What every family module provides (its signatures are the family's own)."""

    TIER: str

    def discretize(self, *args: Any, **kwargs: Any) -> Any: ...

    def step(self, *args: Any, **kwargs: Any) -> Any: ...

    def final_state(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class ScanFamily(Family, Protocol):
    """A family whose parallel path is a scan over the sequence (selective SSMs: Mamba, Mamba-2)."""

    def scan(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class LTIFamily(Family, Protocol):
    """A linear time-invariant family: its parallel path is a convolution with ``kernel``."""

    def kernel(self, sys: Any, L: int, **kwargs: Any) -> Any: ...

    def free_response(self, sys: Any, x0: Any, L: int, **kwargs: Any) -> Any: ...


def missing_verbs(module) -> list[str]:
    """The verbs of its tier that a family module lacks (empty when it conforms)."""
    tier = getattr(module, "TIER", None)
    if tier not in VERBS:
        return [f"TIER (one of {sorted(VERBS)}; got {tier!r})"]
    return [verb for verb in VERBS[tier] if not callable(getattr(module, verb, None))]


__all__ = ["FAMILIES", "VERBS", "Family", "LTIFamily", "ScanFamily", "dense", "diag", "dplr", "missing_verbs",
           "rtf", "s5", "selective"]
