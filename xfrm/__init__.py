"""NETLINK_XFRM for Python, built on pyroute2's netlink message classes.

- :class:`Xfrm` / :class:`AsyncXfrm`: SAs, policies, CHILD_SA bundles
  (install all-or-nothing, remove, migrate to new addresses), ownership-aware
  flush, SPI and reqid allocation; netns-aware.
- :class:`XfrmMonitor`: kernel events (acquire, expire, NAT mapping, SA and
  policy changes) as an async iterator of typed events.
- :func:`probe` / :func:`probe_migrate`: can this kernel hold ESP SAs, does
  it have XFRM migrate? (tested in a scratch namespace)
- :func:`socket_bypass`, :func:`socket_espinudp`: per-socket settings of
  IKE sockets.
- The data model (:mod:`xfrm.model`) and typed errors (:mod:`xfrm.errors`).
"""

from .api import AsyncXfrm, Xfrm
from .constants import (IPPROTO_ESP, UDP_ENCAP_ESPINUDP, XFRM_INF, Action, Dir, Group,
                        Mode, PolicyType, StateFlag)
from .errors import (AlgorithmUnavailable, EspUnavailable, MigrateUnsupported,
                     NamespaceNotFound, XfrmError, XfrmExists, XfrmInvalid, XfrmNotFound,
                     XfrmPermissionError, XfrmUnsupported)
from .events import (Acquire, Event, EventsLost, Expire, Flushed, Mapping, Migrated,
                     PolicyChanged, PolicyExpire, SAChanged, Unknown, XfrmMonitor)
from .model import (DEFAULT_OWNER, SA, Aead, Algorithms, Auth, Bundle, Counters, Crypt,
                    Encap, Lifetime, Mark, Owner, Policy, PolicyId, ReplayState, SAId,
                    Selector, Stats, Template, tunnel_bundle)
from .probe import ProbeResult, probe, probe_async, probe_migrate
from .sockopt import socket_bypass, socket_espinudp

__all__ = [
    "AsyncXfrm", "Xfrm", "XfrmMonitor", "probe", "probe_async", "probe_migrate", "ProbeResult",
    "socket_bypass", "socket_espinudp",
    "SA", "SAId", "Policy", "PolicyId", "Selector", "Template", "Algorithms", "Aead",
    "Crypt", "Auth", "Encap", "Lifetime", "Counters", "ReplayState", "Stats", "Mark",
    "Bundle", "tunnel_bundle", "Owner", "DEFAULT_OWNER",
    "Mode", "Dir", "Action", "Group", "PolicyType", "StateFlag", "IPPROTO_ESP",
    "UDP_ENCAP_ESPINUDP", "XFRM_INF",
    "XfrmError", "XfrmNotFound", "XfrmExists", "XfrmInvalid", "XfrmPermissionError",
    "XfrmUnsupported", "EspUnavailable", "AlgorithmUnavailable", "MigrateUnsupported",
    "NamespaceNotFound",
    "Event", "Acquire", "Expire", "PolicyExpire", "Mapping", "SAChanged",
    "PolicyChanged", "Flushed", "Migrated", "EventsLost", "Unknown",
]
