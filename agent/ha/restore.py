"""Putting saved state back into the home agent engine after a restart.

The engine's public calls do the work (``HomeAgent.restore`` re-installs
still-valid bindings of configured nodes and the last accepted
identifications; ``HomeAgent.identifications`` reads the latter); these
helpers keep the daemon's call sites short.
"""

from __future__ import annotations

from agent.mip.ha import Binding, HomeAgent


def restore(ha: HomeAgent, bindings: list[Binding], identifications: dict, now: float) -> list[Binding]:
    """Re-install the still-valid ``bindings`` of configured nodes.

    Emits the engine's BindingAdded events (the daemon installs the kernel
    state from them as for any registration). Returns the bindings used.
    """
    return ha.restore(bindings, identifications, now=now)


def identifications(ha: HomeAgent) -> dict:
    """The last accepted (timestamp) identification of each node."""
    return ha.identifications()


def all_bindings(ha: HomeAgent) -> list[Binding]:
    return [b for per in ha.bindings.values() for b in per.values()]
