"""The mobile node's data path per access mode (RFC 5266 section 3-4).

One object owns every kernel object the agent makes in its namespace
(tagged "mn" through ``agent.kernel.Kernel``): the care-of address on the
access interface, host routes to the home agent and the VPN gateway, the
Mobile IP tunnel, the home address and the default route.

* ``access(ifname, lease)``: the new link's DHCP address and host routes to
  the i-HA and the gateway via the link's router, so detection (RRQ) and
  IKE/MOBIKE can leave on it. Nothing else changes yet: the gate is closed.
* ``mode_c(coa)``: ipip tunnel CoA -> i-HA carrying the home address; the
  default route goes into it (reverse tunnelling).
* ``mode_mc(tia)``: the same tunnel from the VPN's inner address; its outer
  packets (TIA -> i-HA) match the CHILD SA's policy, so the Mobile IP tunnel
  rides inside IPsec. MTU leaves room for ESP (and NAT-T), TCP MSS clamped.
* ``mode_c_udp(coa)``: RFC 3519 behind a NAT: the home address on a TUN device
  the default route goes into; the agent carries what the device emits to the
  i-HA as UDP tunnel data messages on the registration flow (``tun`` is the
  device, None in the other modes).
* ``mode_f(fa)``: no tunnel on the node: the home address on the access link,
  the foreign agent as default router; the FA reverse-tunnels to the i-HA.
* ``home(lease)``: the home address on the home link itself.
* ``clear()``: remove everything (shutdown; a start reconciles leftovers).

``kind="none"`` keeps the access part (address, host routes) and makes the
modes record themselves without a tunnel or default route: signalling only,
for hosts without ipip (the netns test tier).
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess

from agent.kernel import Kernel, KernelError, TunDevice

log = logging.getLogger("mipmobike.mn.datapath")

TUNNEL = "mip0"
UDP_TUNNEL = "mipu0"
IPIP_OVERHEAD = 20
UDP_TUNNEL_OVERHEAD = 20 + 8 + 4          # outer IP, UDP, the type-4 message header
# ESP tunnel mode with NAT-T, worst case of our suites: outer IP 20 + UDP 8 + ESP hdr 8 + IV 16
# + pad up to 15 + pad len/next hdr 2 + ICV 16 = 85, rounded up
ESP_OVERHEAD = 88


class Datapath:
    def __init__(self, home_address, home_agent, gateway=None, kernel: Kernel | None = None,
                 tunnel: str = TUNNEL, kind: str = "ipip") -> None:
        if kind not in ("ipip", "none"):
            raise ValueError(f"data path kind {kind!r}: want ipip or none")
        self.kind = kind
        self.hoa = ipaddress.IPv4Address(home_address)
        self.ha = ipaddress.IPv4Address(home_agent)
        self.gw = ipaddress.IPv4Address(gateway) if gateway else None
        self.k = kernel or Kernel("mn")
        self.tunnel = tunnel
        self.ifname: str | None = None
        self.lease = None
        self.mode: str | None = None
        self.tia: ipaddress.IPv4Address | None = None
        self._mss_rule: list[str] | None = None
        self.tun: TunDevice | None = None

    # -- helpers ---------------------------------------------------------------------------
    def _mtu(self, ifname: str) -> int:
        link = self.k.link(ifname)
        return int(link.get("mtu") or 1500) if link else 1500

    def _default_via(self, **kw) -> None:
        if self.kind != "none":
            self.k.add_route("0.0.0.0/0", **kw)

    def _tunnel_up(self, local, mtu: int) -> None:
        if self.kind == "none":
            return
        link = self.k.link(self.tunnel)
        if link is not None and link.get("local") != str(local):
            self.k.delete_link(self.tunnel)
        self.k.create_ipip(self.tunnel, local, self.ha, mtu=mtu)
        self.k.add_address(self.tunnel, self.hoa, 32)
        for dev in ("all", self.tunnel):
            try:
                self.k.set_sysctl(f"net/ipv4/conf/{dev}/rp_filter", "0")
            except Exception:
                pass

    def _tunnel_down(self) -> None:
        self.k.delete_link(self.tunnel)
        self._udp_down()
        self._clamp_mss(False)

    def _udp_down(self) -> None:
        if self.tun is not None:
            self.tun.close()             # the device goes with its file descriptor
            self.tun = None

    def _clamp_mss(self, on: bool) -> None:
        """TCP MSS of connections from/to the home address clamped to the path MTU (the tunnel's)."""
        if self.kind == "none":
            return
        rules = [["POSTROUTING", "-s", str(self.hoa)], ["PREROUTING", "-d", str(self.hoa)]]
        tail = ["-p", "tcp", "--tcp-flags", "SYN,RST", "SYN", "-j", "TCPMSS", "--clamp-mss-to-pmtu"]
        if on and self._mss_rule is None:
            for chain, *match in rules:
                subprocess.run(["iptables", "-t", "mangle", "-A", chain, *match, *tail], capture_output=True)
            self._mss_rule = tail
        elif not on and self._mss_rule is not None:
            for chain, *match in rules:
                subprocess.run(["iptables", "-t", "mangle", "-D", chain, *match, *tail], capture_output=True)
            self._mss_rule = None

    # -- modes -------------------------------------------------------------------------------
    def access(self, ifname: str, lease) -> None:
        """Configure the new link's address and the host routes detection and IKE need."""
        if self.ifname and self.ifname != ifname:
            self.leave(self.ifname)
        old = self.lease
        self.ifname, self.lease = ifname, lease
        if old is not None and old.ip != lease.ip:
            self.k.del_address(ifname, old.ip, old.address.network.prefixlen)
        self.k.add_address(ifname, lease.ip, lease.address.network.prefixlen)
        if lease.router is not None:
            for host in (self.ha, self.gw):
                if host is not None and host not in lease.address.network:
                    self.k.add_route(f"{host}/32", dev=ifname, gateway=lease.router, src=lease.ip)

    def leave(self, ifname: str) -> None:
        """The link went down or away: forget its address and routes (the kernel drops most itself)."""
        if self.lease is not None:
            try:
                self.k.del_address(ifname, self.lease.ip, self.lease.address.network.prefixlen)
            except KernelError:
                pass
        for host in (self.ha, self.gw):
            if host is not None:
                self.k.del_route(f"{host}/32")
        self.lease = None
        self.ifname = None

    def mode_c(self, coa) -> None:
        self._drop_hoa_on_access()
        self._udp_down()
        self._tunnel_up(coa, self._mtu(self.ifname) - IPIP_OVERHEAD)
        self._clamp_mss(True)
        self._default_via(dev=self.tunnel, src=self.hoa)
        self.mode, self.tia = "c", None

    def mode_c_udp(self, coa) -> TunDevice | None:
        """RFC 3519 data path; returns the TUN device whose packets the agent tunnels."""
        self._drop_hoa_on_access()
        self.k.delete_link(self.tunnel)
        if self.kind == "none":
            self.mode, self.tia = "c", None
            return None
        if self.tun is None:
            self.tun = TunDevice(UDP_TUNNEL)
        self.k.set_link(self.tun.name, mtu=self._mtu(self.ifname) - UDP_TUNNEL_OVERHEAD, up=True, tag=True)
        self.k.add_address(self.tun.name, self.hoa, 32)
        for dev in ("all", self.tun.name):
            try:
                self.k.set_sysctl(f"net/ipv4/conf/{dev}/rp_filter", "0")
            except Exception:
                pass
        self._clamp_mss(True)
        self._default_via(dev=self.tun.name, src=self.hoa)
        self.mode, self.tia = "c", None
        return self.tun

    def mode_mc(self, tia) -> None:
        self._drop_hoa_on_access()
        self._udp_down()
        self.tia = ipaddress.IPv4Address(tia)
        self._tunnel_up(self.tia, self._mtu(self.ifname) - IPIP_OVERHEAD - ESP_OVERHEAD)
        self._clamp_mss(True)
        self._default_via(dev=self.tunnel, src=self.hoa)
        self.mode = "mc"

    def mode_f(self, foreign_agent) -> None:
        self._tunnel_down()
        self.k.add_address(self.ifname, self.hoa, 32)    # the registration through the FA leaves from it
        self._default_via(dev=self.ifname, gateway=foreign_agent, src=self.hoa, onlink=True)
        self.mode, self.tia = "f", None

    def home(self, lease) -> None:
        """At home: the home address on the home link, routes through the home router."""
        self._tunnel_down()
        ifname = self.ifname
        if lease.ip != self.hoa:
            self.k.del_address(ifname, lease.ip, lease.address.network.prefixlen)
        self.k.add_address(ifname, self.hoa, lease.address.network.prefixlen)
        for host in (self.ha, self.gw):
            if host is not None:
                self.k.del_route(f"{host}/32")
        if lease.router is not None:
            self._default_via(dev=ifname, gateway=lease.router, src=self.hoa)
        self.mode, self.tia = "home", None

    def _drop_hoa_on_access(self) -> None:
        if self.ifname:
            for name, net, addr in self.k.addresses(self.ifname):
                if addr == self.hoa:
                    self.k.del_address(self.ifname, addr, net.prefixlen)

    def clear(self) -> None:
        """Remove everything this data path made."""
        self._tunnel_down()
        try:
            self.k.del_route("0.0.0.0/0")
        except KernelError:
            pass
        if self.ifname:
            self.leave(self.ifname)
        self.mode = None

    def reconcile(self) -> int:
        """At start: remove what a crashed predecessor left (our tunnel, routes)."""
        n = 0
        for link in self.k.own_links():
            if self.k.delete_link(link["index"]):
                n += 1
        n += self.k.flush_routes()
        return n
