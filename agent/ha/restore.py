"""Putting saved state back into the home agent engine.

agent.mip.ha.HomeAgent has no public call (yet) to re-create bindings or the
last accepted identification of each node after a restart; until it has,
this thin adapter reaches into two of its internals (``_install`` and the
per-node state's ``last_ident``) and is the only place that does. It uses
``HomeAgent.restore`` / ``HomeAgent.identifications`` when they exist.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from agent.mip.ha import Binding, HomeAgent


def restore(ha: HomeAgent, bindings: list[Binding], identifications: dict, now: float) -> list[Binding]:
    """Re-install the still-valid ``bindings`` of configured nodes.

    Emits the engine's BindingAdded events (the daemon installs the kernel
    state from them as for any registration). Returns the bindings used.
    """
    live = []
    nodes = getattr(ha, "_nodes", {})
    for b in bindings:
        if b.expires_at is not None and b.expires_at <= now:
            continue
        if nodes and b.home_address not in nodes:
            continue  # the node left the configuration
        live.append(b)
    if hasattr(ha, "restore"):  # a public API, once agent.mip has one
        ha.restore(live, identifications)
        return live
    for b in live:
        multi = ha.config.max_bindings_per_node > 1
        ha._install(b, multi)
    for hoa, ident in identifications.items():
        state = nodes.get(IPv4Address(str(hoa)))
        if state is not None and (state.last_ident is None or ident > state.last_ident):
            state.last_ident = int(ident)
    return live


def identifications(ha: HomeAgent) -> dict[IPv4Address, int]:
    """The last accepted (timestamp) identification of each node."""
    if hasattr(ha, "identifications"):
        return dict(ha.identifications())
    return {hoa: st.last_ident for hoa, st in getattr(ha, "_nodes", {}).items()
            if st.last_ident is not None}


def all_bindings(ha: HomeAgent) -> list[Binding]:
    return [b for per in ha.bindings.values() for b in per.values()]
