"""The testbed's networks as data: namespaces, links, segments, routes, firewall rules.

A ``Layout`` says what to build; ``agent.testbed.testbed.Testbed`` builds it.
Everything here is pure data (no I/O), so the address plan can be read and
checked without root.

Figure 1 of RFC 5266 (``figure1()``)::

                       home 10.1.0.0/24 (br-home)
          i-HA 10.1.0.2 --+-- CN 10.1.0.10 --+-- core 10.1.0.1
                                                  |  (internal router)
   internal-1 10.2.1.0/24 (br-int1) ---- core 10.2.1.1
   internal-2 10.2.2.0/24 (br-int2) ---- fa 10.2.2.1   (i-FA; 10.0.1.2 -- core 10.0.1.1)
   internal-3 192.168.3.0/24 (br-int3) - inat 192.168.3.1 [NAT -> 10.0.4.2 -- core 10.0.4.1]
                                                  |
        VPN gateway gw: inside 10.0.2.2 -- core 10.0.2.1; pool 10.3.0.0/24 (TIAs)
                        outside 192.0.2.2 (DMZ) -- fw 192.0.2.1
        firewall fw: inside 10.0.3.2 -- core 10.0.3.1; outside 203.0.113.2 -- inet 203.0.113.1
   external-1 198.51.100.0/24 (br-ext1) -- inet 198.51.100.1      (the Internet)
   external-2 192.168.2.0/24 (br-ext2) --- nat 192.168.2.1 [NAT -> 203.0.113.6 -- inet 203.0.113.5]

The access segments are bridges in one "switch" namespace (``sw``); the
mobile node's single interface (``eth0`` in namespace ``mn``) has its peer
``mn`` in the switch, and moving the node re-enslaves that peer to another
bridge (link down, new master, link up), so the node sees real carrier events.

``operator()`` is RFC 5266 Appendix A (a mobile operator's network) on the
same skeleton: op-lan, op-wlan (i-FA), cellular (behind a carrier-grade NAT,
trusted), internet and hotspot (behind a NAT, untrusted).

The firewall forwards from outside only IKE (UDP 500/4500), ESP and ICMP to
the gateway's outside address; the Internet router routes 10.0.0.0/8 to the
firewall, so it is the firewall's policy that blocks the plain path to the
inside (silently: the mobile node sees no answer, no ICMP error). The gateway
itself also refuses to forward plaintext that arrives on its outside
interface (only decrypted traffic may enter).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Net:
    """An access network (L2 segment) the mobile node can be moved to."""

    name: str            # NET as given to ``move``: "internal-1"
    bridge: str          # bridge in the switch namespace
    prefix: str          # "10.2.1.0/24"
    router: str          # default router / DHCP server address on the segment
    router_node: str     # role of the namespace that routes (and serves DHCP) for it
    router_if: str       # its interface on the segment
    zone: str            # "home" | "internal" | "external"
    dhcp: tuple[str, str] | None = None   # dynamic pool (first, last)
    nat: str | None = None                # public (outside) address of a NAT in front of it
    fa: str | None = None                 # foreign agent address (care-of address) on it
    trusted: bool = False                 # the i-HA answers requests from it with TNC
    note: str = ""

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.prefix).prefixlen

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(self.prefix).netmask)


@dataclass(frozen=True)
class Link:
    """A point-to-point veth between two namespaces."""

    a: str
    a_if: str
    a_cidr: str | None
    b: str
    b_if: str
    b_cidr: str | None


@dataclass(frozen=True)
class Port:
    """A host interface on an access segment (its veth peer is a port of the segment's bridge)."""

    net: str       # Net.name
    node: str
    ifname: str
    cidr: str | None


@dataclass(frozen=True)
class Addresses:
    """The addresses a mobile node, an agent or a test needs (attributes, no lookups)."""

    home_prefix: str
    home_router: str
    ha: str
    cn: str
    home_address: str
    fa: str
    gw_public: str
    gw_inside: str
    gw_id: str
    pool: str
    internal_prefixes: tuple[str, ...]
    trusted_prefixes: tuple[str, ...]
    nat_public: str               # the external-2 NAT's outside address
    inside_nat_public: str        # the internal-3 NAT's outside address
    inet: str                     # an Internet address reachable from everywhere outside (inet's)


@dataclass
class Layout:
    name: str
    nodes: dict[str, str]                       # role -> description
    routers: set[str]                           # roles with IPv4 forwarding on
    nets: dict[str, Net]
    links: list[Link]
    ports: list[Port]
    routes: dict[str, list[str]]                # role -> ["PREFIX via ADDR", ...]
    firewall: dict[str, str]                    # role -> iptables-restore text
    addr: Addresses
    mn_node: str = "mn"
    mn_if: str = "eth0"
    mn_mac: str = "02:6d:6d:00:00:01"
    switch: str = "sw"
    switch_mn_port: str = "mn"                  # the MN veth peer inside the switch
    gw_node: str = "gw"
    gw_outside_if: str = "out"
    ha_node: str = "ha"
    ha_if: str = "eth0"
    fa_node: str = "fa"
    fa_if: str = "int2"
    cn_node: str = "cn"
    dhcp_lease: str = "1h"
    reservations: dict[str, str] = field(default_factory=dict)   # NET -> address given to the MN's MAC
    default_at: str = "internal-1"

    def port_name(self, port: Port) -> str:
        """The bridge-side name (in the switch namespace) of a host's segment interface."""
        short = self.nets[port.net].bridge.removeprefix("br-")
        return f"{short}-{port.node}"[:15]

    def net_of_bridge(self, bridge: str) -> str | None:
        for n in self.nets.values():
            if n.bridge == bridge:
                return n.name
        return None

    def check(self) -> None:
        """Internal consistency (names fit, every referenced role exists)."""
        roles = set(self.nodes)
        for link in self.links:
            assert link.a in roles and link.b in roles, link
            assert len(link.a_if) <= 15 and len(link.b_if) <= 15, link
        for p in self.ports:
            assert p.node in roles and p.net in self.nets, p
            assert len(p.ifname) <= 15
        names = [self.port_name(p) for p in self.ports] + [self.switch_mn_port]
        names += [n.bridge for n in self.nets.values()]
        assert len(names) == len(set(names)), f"duplicate switch interface names: {names}"
        for n in self.nets.values():
            assert n.router_node in roles, n
            assert len(n.bridge) <= 15


_FW_FIGURE1 = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i inside -j ACCEPT
-A FORWARD -i dmz -o ext -j ACCEPT
-A FORWARD -i ext -o dmz -d {gw} -p udp --dport 500 -j ACCEPT
-A FORWARD -i ext -o dmz -d {gw} -p udp --dport 4500 -j ACCEPT
-A FORWARD -i ext -o dmz -d {gw} -p esp -j ACCEPT
-A FORWARD -i ext -o dmz -d {gw} -p icmp -j ACCEPT
COMMIT
"""

# the gateway forwards into the inside only what it decrypted: with kernel ESP
# decrypted packets come in on the outside interface carrying an IPsec policy,
# with kernel-libipsec they come in on its TUN device
_GW_FIGURE1 = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -i out -m policy --dir in --pol none -j DROP
COMMIT
"""

# a home-router-style NAT that also rewrites UDP source ports, so NAT-T and
# RFC 3519 must cope with a port that is not the one sent from
_NAT = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -o wan -p udp -j MASQUERADE --to-ports 40000-40999
-A POSTROUTING -o wan -j MASQUERADE
COMMIT
"""


def figure1() -> Layout:
    """RFC 5266 Figure 1: home network with i-HA, internal network with i-FA, DMZ with VPN gateway."""
    a = Addresses(
        home_prefix="10.1.0.0/24", home_router="10.1.0.1", ha="10.1.0.2", cn="10.1.0.10",
        home_address="10.1.0.100", fa="10.2.2.1", gw_public="192.0.2.2", gw_inside="10.0.2.2",
        gw_id="gw.vpn.example", pool="10.3.0.0/24", internal_prefixes=("10.0.0.0/8",),
        trusted_prefixes=("10.0.0.0/16", "10.1.0.0/16", "10.2.0.0/16"),
        nat_public="203.0.113.6", inside_nat_public="10.0.4.2", inet="203.0.113.1")
    nets = {n.name: n for n in (
        Net("home", "br-home", "10.1.0.0/24", "10.1.0.1", "core", "home", "home",
            dhcp=("10.1.0.200", "10.1.0.249"), trusted=True,
            note="the mobile node's home link (its MAC gets the home address by DHCP)"),
        Net("internal-1", "br-int1", "10.2.1.0/24", "10.2.1.1", "core", "int1", "internal",
            dhcp=("10.2.1.100", "10.2.1.199"), trusted=True),
        Net("internal-2", "br-int2", "10.2.2.0/24", "10.2.2.1", "fa", "int2", "internal",
            dhcp=("10.2.2.100", "10.2.2.199"), fa="10.2.2.1", trusted=True, note="i-FA"),
        Net("internal-3", "br-int3", "192.168.3.0/24", "192.168.3.1", "inat", "lan", "internal",
            dhcp=("192.168.3.100", "192.168.3.199"), nat="10.0.4.2", trusted=True,
            note="behind a NAT inside the enterprise (RFC 3519)"),
        Net("external-1", "br-ext1", "198.51.100.0/24", "198.51.100.1", "inet", "ext1", "external",
            dhcp=("198.51.100.100", "198.51.100.199")),
        Net("external-2", "br-ext2", "192.168.2.0/24", "192.168.2.1", "nat", "lan", "external",
            dhcp=("192.168.2.100", "192.168.2.199"), nat="203.0.113.6", note="behind a NAT"),
    )}
    nodes = {
        "sw": "switch: the access segments' bridges",
        "mn": "mobile node (one access interface, eth0)",
        "ha": "i-HA (home agent) on the home link",
        "cn": "correspondent host on the home link",
        "core": "internal router (home, internal-1)",
        "fa": "access router of internal-2 with the i-FA",
        "inat": "NAT router of internal-3",
        "gw": "VPN gateway (strongSwan) in the DMZ",
        "fw": "firewall between the Internet, the DMZ and the inside",
        "inet": "Internet router (external-1)",
        "nat": "NAT router of external-2",
    }
    links = [
        Link("core", "to-fa", "10.0.1.1/30", "fa", "to-core", "10.0.1.2/30"),
        Link("core", "to-gw", "10.0.2.1/30", "gw", "in", "10.0.2.2/30"),
        Link("core", "to-fw", "10.0.3.1/30", "fw", "inside", "10.0.3.2/30"),
        Link("core", "to-inat", "10.0.4.1/30", "inat", "wan", "10.0.4.2/30"),
        Link("fw", "dmz", "192.0.2.1/24", "gw", "out", "192.0.2.2/24"),
        Link("fw", "ext", "203.0.113.2/30", "inet", "to-fw", "203.0.113.1/30"),
        Link("inet", "to-nat", "203.0.113.5/30", "nat", "wan", "203.0.113.6/30"),
    ]
    ports = [
        Port("home", "core", "home", "10.1.0.1/24"),
        Port("home", "ha", "eth0", "10.1.0.2/24"),
        Port("home", "cn", "eth0", "10.1.0.10/24"),
        Port("internal-1", "core", "int1", "10.2.1.1/24"),
        Port("internal-2", "fa", "int2", "10.2.2.1/24"),
        Port("internal-3", "inat", "lan", "192.168.3.1/24"),
        Port("external-1", "inet", "ext1", "198.51.100.1/24"),
        Port("external-2", "nat", "lan", "192.168.2.1/24"),
    ]
    routes = {
        "ha": ["default via 10.1.0.1"],
        "cn": ["default via 10.1.0.1"],
        "core": ["10.2.2.0/24 via 10.0.1.2", "10.3.0.0/24 via 10.0.2.2", "default via 10.0.3.2"],
        "fa": ["default via 10.0.1.1"],
        "inat": ["default via 10.0.4.1"],
        "gw": ["10.0.0.0/8 via 10.0.2.1", "default via 192.0.2.1"],
        "fw": ["10.0.0.0/8 via 10.0.3.1", "default via 203.0.113.1"],
        "inet": ["192.0.2.0/24 via 203.0.113.2", "10.0.0.0/8 via 203.0.113.2"],
        "nat": ["default via 203.0.113.5"],
    }
    firewall = {
        "fw": _FW_FIGURE1.format(gw=a.gw_public),
        "gw": _GW_FIGURE1,
        "nat": _NAT,
        "inat": _NAT,
    }
    lay = Layout("figure1", nodes, {"core", "fa", "inat", "gw", "fw", "inet", "nat"}, nets, links, ports,
                 routes, firewall, a, reservations={"home": a.home_address})
    lay.check()
    return lay


def operator() -> Layout:
    """RFC 5266 Appendix A, a mobile operator's network (Figure 2), as modelled here.

    The same machinery as Figure 1 with the operator's roles: the i-HA and an
    operator service (the correspondent) in the operator core; trusted
    accesses are the operator's own LAN (op-lan), its WLAN with the i-FA
    (op-wlan) and its cellular access behind a carrier-grade NAT in shared
    address space 100.64.0.0/10 (cellular: trusted, yet NATed, so RFC 3519);
    untrusted accesses are the public Internet (internet) and a third-party
    hotspot behind a NAT (hotspot), from where only the operator's VPN
    gateway (an ePDG-like IPsec edge) leads in. Written from the RFC's
    description of the operator case; the address plan is this project's.
    """
    base = figure1()
    rename = {"home": "home", "internal-1": "op-lan", "internal-2": "op-wlan", "internal-3": "cellular",
              "external-1": "internet", "external-2": "hotspot"}
    notes = {"op-lan": "the operator's own fixed access", "op-wlan": "the operator's WLAN with the i-FA",
             "cellular": "the operator's cellular access behind a carrier-grade NAT (RFC 3519)",
             "internet": "the public Internet", "hotspot": "a third-party hotspot behind a NAT",
             "home": "the operator core: i-HA and an operator service (correspondent)"}
    cgn = {"prefix": "100.64.1.0/24", "router": "100.64.1.1", "dhcp": ("100.64.1.100", "100.64.1.199")}
    nets = {}
    for n in base.nets.values():
        new = rename[n.name]
        kw = dict(name=new, note=notes[new])
        if new == "cellular":
            kw.update(cgn)
        nets[new] = replace(n, **kw)
    ports = []
    for p in base.ports:
        cidr = "100.64.1.1/24" if rename[p.net] == "cellular" else p.cidr
        ports.append(replace(p, net=rename[p.net], cidr=cidr))
    nodes = dict(base.nodes, core="operator core router (core network, op-lan)",
                 fa="access router of op-wlan with the i-FA", inat="carrier-grade NAT of the cellular access",
                 gw="the operator's VPN gateway (strongSwan) at its edge",
                 fw="the operator's firewall towards the Internet", inet="Internet router (internet)",
                 nat="NAT router of the hotspot", cn="operator service host (correspondent) in the core",
                 ha="i-HA (the operator's home agent) in the core")
    lay = replace(base, name="operator", nets=nets, ports=ports, nodes=nodes,
                  reservations={"home": base.addr.home_address}, default_at="op-lan")
    lay.check()
    return lay


LAYOUTS = {"figure1": figure1, "operator": operator}
