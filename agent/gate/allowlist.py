"""The gate's allow-list: an ipset (hash:ip,port) managed with pyroute2.

The ipset is the one place the allowed peers live, so an operator sees them
with ``ipset list mipmobike-<instance>``:

    10.20.0.1,udp:434 comment "home-agent"
    192.0.2.1,udp:500 comment "vpn-gateway"
    192.0.2.1,udp:4500 comment "vpn-gateway"
    192.0.2.1,esp:0 comment "vpn-gateway"

Each member is (remote address, IP protocol, remote port). The netfilter
backend matches the set directly (``-m set``); the BPF backend mirrors it
into its ``allow`` map.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Iterable

from pyroute2.ipset import IPSet, IPSetError, PortEntry

IPPROTO_UDP = socket.IPPROTO_UDP
IPPROTO_TCP = socket.IPPROTO_TCP
IPPROTO_ESP = 50
IKE_PORTS = (500, 4500)
MIP_PORT = 434
PROTO_NAMES = {IPPROTO_UDP: "udp", IPPROTO_TCP: "tcp", IPPROTO_ESP: "esp"}


class GateConfigError(ValueError):
    """A bad allow-list entry (names the offending value)."""


@dataclass(frozen=True, order=True)
class AllowEntry:
    addr: str
    proto: int
    port: int
    comment: str = ""

    def key(self) -> tuple[str, int, int]:
        return (self.addr, self.proto, self.port)

    def __str__(self) -> str:
        return f"{self.addr},{PROTO_NAMES.get(self.proto, str(self.proto))}:{self.port}"


def _ipv4(value, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise GateConfigError(f"{what}: {value!r} is not an IPv4 address") from None


def _port(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise GateConfigError(f"{what}: port {value!r} is not in 1..65535")
    return value


def build_entries(home_agents: Iterable = (), gateways: Iterable = (),
                  ike_ports: Iterable[int] = IKE_PORTS) -> list[AllowEntry]:
    """Allow-list members for home agents ``[(ip, port)]`` (or bare ips: port
    434) and VPN gateways ``[ip]`` (IKE ports over UDP, and ESP)."""
    out: dict[tuple, AllowEntry] = {}
    for ha in home_agents:
        if isinstance(ha, (tuple, list)):
            if len(ha) != 2:
                raise GateConfigError(f"home agent {ha!r}: expected (address, port)")
            ip, port = ha
        else:
            ip, port = ha, MIP_PORT
        e = AllowEntry(_ipv4(ip, "home agent"), IPPROTO_UDP, _port(port, f"home agent {ip}"), "home-agent")
        out.setdefault(e.key(), e)
    ports = [_port(p, "IKE port") for p in ike_ports]
    for gw in gateways:
        ip = _ipv4(gw, "VPN gateway")
        for p in ports:
            e = AllowEntry(ip, IPPROTO_UDP, p, "vpn-gateway")
            out.setdefault(e.key(), e)
        e = AllowEntry(ip, IPPROTO_ESP, 0, "vpn-gateway")
        out.setdefault(e.key(), e)
    return sorted(out.values())


class AllowList:
    """One ipset, created on demand; all calls open a short-lived netlink socket
    (in the caller's current network namespace)."""

    TYPE = "hash:ip,port"

    def __init__(self, name: str) -> None:
        if not 0 < len(name) <= 31:
            raise GateConfigError(f"ipset name {name!r} must be 1..31 characters")
        self.name = name

    def exists(self) -> bool:
        with IPSet() as s:
            try:
                return bool(list(s.list(self.name)))
            except IPSetError:
                return False

    def ensure(self) -> None:
        with IPSet() as s:
            s.create(self.name, stype=self.TYPE, comment=True, exclusive=False)

    def entries(self) -> list[AllowEntry]:
        out = []
        with IPSet() as s:
            try:
                msgs = list(s.list(self.name))
            except IPSetError:
                return []
        for m in msgs:
            adt = m.get_attr("IPSET_ATTR_ADT")
            if adt is None:
                continue
            for d in adt.get_attrs("IPSET_ATTR_DATA"):
                ipf = d.get_attr("IPSET_ATTR_IP_FROM")
                addr = ipf.get_attr("IPSET_ATTR_IPADDR_IPV4") if ipf is not None else None
                if addr is None:
                    continue
                out.append(AllowEntry(addr, d.get_attr("IPSET_ATTR_PROTO") or 0,
                                      d.get_attr("IPSET_ATTR_PORT_FROM") or 0,
                                      d.get_attr("IPSET_ATTR_COMMENT") or ""))
        return sorted(out)

    def replace(self, entries: Iterable[AllowEntry]) -> None:
        """Make the set hold exactly ``entries``: additions first, then removals,
        so a peer present before and after is never missing in between."""
        want = {e.key(): e for e in entries}
        self.ensure()
        have = {e.key(): e for e in self.entries()}
        with IPSet() as s:
            for k, e in want.items():
                if k not in have or have[k].comment != e.comment:
                    s.add(self.name, (e.addr, PortEntry(e.port, e.proto)), etype="ip,port",
                          comment=e.comment or None, exclusive=False)
            for k, e in have.items():
                if k not in want:
                    s.delete(self.name, (e.addr, PortEntry(e.port, e.proto)), etype="ip,port",
                             exclusive=False)

    def destroy(self) -> None:
        with IPSet() as s:
            try:
                s.destroy(self.name)
            except IPSetError:
                pass
