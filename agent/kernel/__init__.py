"""Kernel programming for the agents (i-HA, i-FA, mobile node), behind small interfaces.

The protocol engines never import this package; the daemons do.

Public API:

:class:`~agent.kernel.netlink.Kernel` (pyroute2, one namespace)
    links: ``ifindex``, ``link``, ``links``, ``own_links``, ``mac``,
    ``create_ipip(name, local, remote, mtu=, ttl=)``, ``delete_link``,
    ``set_link(name, mtu=, up=, tag=)``, ``set_mtu``;
    addresses: ``addresses``, ``local_addresses``, ``interface_on_link``,
    ``add_address``, ``del_address``;
    routes: ``add_route(dst, dev=, gateway=, src=, table=, metric=, scope=,
    onlink=)`` (replace semantics), ``del_route``, ``routes``,
    ``flush_routes``, ``route_get``;
    rules: ``add_rule(table=, priority=, src=, iif=, fwmark=)``,
    ``del_rule``, ``rules``, ``flush_rules``;
    neighbours: ``add_proxy_arp``, ``del_proxy_arp``, ``add_neighbour``
    (permanent), ``del_neighbour``, ``neighbour``; sysctls:
    ``set_sysctl``, ``get_sysctl``, ``set_proxy_delay``,
    ``enable_forwarding``. Everything it creates is tagged by owner (link
    alias ``mipmobike:<owner>``, route/rule protocol), errors are
    :class:`~agent.kernel.netlink.KernelError`.

:mod:`~agent.kernel.tunnels`
    ``make_backend(kind, kernel, prefix=, mtu=, table_base=, rule_priority=,
    decap_interfaces=)`` -> a :class:`~agent.kernel.tunnels.TunnelBackend`
    ("ipip", "bpf", "none" or "auto"): ``reconcile()``, ``open()``,
    ``tunnel(local, remote)`` / ``release(t)`` (refcounted),
    ``route_to(t, host)``, ``route_from(t, host, iif=)``,
    ``accept_for(t, host)`` and their inverses, ``stats()``, ``memory()``,
    ``close()``.

:func:`~agent.kernel.arp.send_gratuitous_arp`, :class:`~agent.kernel.tun.TunDevice`,
:class:`~agent.kernel.bpftunnel.BpfTunnelProgram`, :func:`~agent.kernel.netns.in_netns`.
"""

from .arp import send_gratuitous_arp
from .netlink import OWNER_PROTOCOLS, Kernel, KernelError, ipv4
from .netns import in_netns
from .tun import TunDevice
from .tunnels import (
    BpfBackend,
    IpipBackend,
    NullBackend,
    Tunnel,
    TunnelBackend,
    ipip_available,
    make_backend,
)

__all__ = [
    "Kernel",
    "KernelError",
    "OWNER_PROTOCOLS",
    "ipv4",
    "in_netns",
    "send_gratuitous_arp",
    "TunDevice",
    "Tunnel",
    "TunnelBackend",
    "IpipBackend",
    "BpfBackend",
    "NullBackend",
    "make_backend",
    "ipip_available",
]
