"""The home agent's kernel state for its bindings.

For every home address with at least one binding:

* a path to the mobile node: a host route into the tunnel HA -> care-of
  address (shared by every node behind the same care-of address, e.g. a
  foreign agent), or, for an RFC 3519 UDP-tunnelled binding, a host route
  into the UDP tunnel device that the daemon reads (see udptunnel.py);
  reverse-tunnelled packets from the node come out of the same tunnel;
* a proxy-ARP entry for the home address on the home link, announced with
  gratuitous ARP when the first binding appears.

With simultaneous bindings the most recent one carries the traffic. When the
last binding goes, the path and the proxy entry go; after a deregistration
from home the node's own link-layer address is announced again once the
kernel has learnt it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import IPv4Address

from agent.kernel.arp import send_gratuitous_arp
from agent.kernel.netlink import Kernel, KernelError
from agent.kernel.tunnels import Tunnel, TunnelBackend
from agent.mip.ha import Binding

log = logging.getLogger("mipmobike.ha.dataplane")


@dataclass
class _Path:
    kind: str  # "tunnel" | "udp"
    care_of_address: IPv4Address
    tunnel: Tunnel | None = None


class HaDataPlane:
    def __init__(self, kernel: Kernel, backend: TunnelBackend, *, local: IPv4Address,
                 home_interface: str | None = None, garp_count: int = 2,
                 udp_device: str | None = None):
        self.kernel = kernel
        self.backend = backend
        self.local = local
        self.home_interface = home_interface
        self.garp_count = garp_count
        self.udp_device = udp_device
        self.bindings: dict[IPv4Address, dict[IPv4Address, Binding]] = {}
        self.paths: dict[IPv4Address, _Path] = {}
        self.proxied: dict[IPv4Address, str] = {}
        self._home_if: dict[IPv4Address, str | None] = {}
        self._macs: dict[str, str] = {}
        self.errors = 0

    # ------------------------------------------------------------------ lifecycle

    def reconcile(self, home_addresses) -> dict:
        """Remove what an earlier instance left: tagged links/routes/rules/filters
        and the proxy-ARP entries of every configured home address."""
        out = self.backend.reconcile()
        n = 0
        for hoa in home_addresses:
            dev = self.home_if(hoa)
            if dev and self.kernel.del_proxy_arp(hoa, dev):
                n += 1
        out["proxy_arp"] = n
        return out

    def open(self) -> None:
        self.kernel.set_sysctl("net/ipv4/ip_forward", 1)
        self.backend.open()

    def close(self) -> None:
        """Remove every kernel object made for the bindings, and the backend's own."""
        for hoa in list(self.bindings):
            self.bindings[hoa].clear()
            self._sync(hoa, reason="shutdown")
        self.backend.close()

    def home_if(self, hoa: IPv4Address) -> str | None:
        if self.home_interface:
            return self.home_interface
        if hoa not in self._home_if:
            try:
                self._home_if[hoa] = self.kernel.interface_on_link(hoa)
            except KernelError as e:
                log.warning("%s", e)
                self._home_if[hoa] = None
            if self._home_if[hoa] is None:
                log.warning("no interface holds %s's home subnet: no proxy ARP for it", hoa)
        return self._home_if[hoa]

    # ------------------------------------------------------------------ engine events

    def added(self, b: Binding) -> None:
        self.bindings.setdefault(b.home_address, {})[b.care_of_address] = b
        self._sync(b.home_address)

    def updated(self, b: Binding, previous: Binding) -> None:
        per = self.bindings.setdefault(b.home_address, {})
        per.pop(previous.care_of_address, None)
        per[b.care_of_address] = b
        self._sync(b.home_address)

    def removed(self, b: Binding, reason: str) -> None:
        per = self.bindings.get(b.home_address, {})
        if per.get(b.care_of_address) is not None:
            del per[b.care_of_address]
        self._sync(b.home_address, reason)

    # ------------------------------------------------------------------ internals

    def _want(self, hoa) -> tuple[str, IPv4Address] | None:
        per = self.bindings.get(hoa)
        if not per:
            return None
        b = max(per.values(), key=lambda x: x.registered_at)
        return ("udp" if b.udp_tunnel else "tunnel"), b.care_of_address

    def _sync(self, hoa: IPv4Address, reason: str | None = None) -> None:
        want = self._want(hoa)
        cur = self.paths.get(hoa)
        had_proxy = hoa in self.proxied
        try:
            if cur is None or want is None or (cur.kind, cur.care_of_address) != want:
                new = self._make_path(hoa, *want) if want is not None else None
                if cur is not None:
                    self._drop_path(hoa, cur)
                    del self.paths[hoa]
                if new is not None:
                    self.paths[hoa] = new
            if want is not None and not had_proxy:
                dev = self.home_if(hoa)
                if dev:
                    self.kernel.add_proxy_arp(hoa, dev)
                    self.proxied[hoa] = dev
                    if self.garp_count > 0:
                        self.announce(hoa, dev, self._mac(dev))
            elif want is None and had_proxy:
                dev = self.proxied.pop(hoa)
                self.kernel.del_proxy_arp(hoa, dev)
        except (KernelError, OSError) as e:
            self.errors += 1
            log.error("kernel state for %s: %s", hoa, e)
        if want is None:
            self.bindings.pop(hoa, None)

    def _make_path(self, hoa, kind, coa) -> _Path:
        if kind == "udp":
            if not self.udp_device:
                raise KernelError(f"UDP tunnel for {hoa}", "no UDP tunnel device")
            self.kernel.add_route(hoa, dev=self.udp_device)
            return _Path("udp", coa)
        t = self.backend.tunnel(self.local, coa)
        try:
            self.backend.route_to(t, hoa)
        except Exception:
            self.backend.release(t)
            raise
        return _Path("tunnel", coa, t)

    def _drop_path(self, hoa, p: _Path) -> None:
        if p.kind == "udp":
            # matches only while the route still points at the UDP device (a
            # new path installed first has replaced it otherwise)
            self.kernel.del_route(hoa, dev=self.udp_device)
            return
        self.backend.unroute_to(p.tunnel, hoa)
        self.backend.release(p.tunnel)

    def _mac(self, dev: str) -> str:
        mac = self._macs.get(dev)
        if mac is None:
            mac = self._macs[dev] = self.kernel.mac(dev)
        return mac

    def announce(self, hoa, dev: str, mac: str) -> None:
        """Gratuitous ARP: ``hoa`` is at ``mac`` on ``dev``."""
        if self.garp_count <= 0:
            return
        try:
            send_gratuitous_arp(dev, hoa, mac, count=self.garp_count)
        except (OSError, ValueError) as e:
            log.warning("gratuitous ARP for %s on %s: %s", hoa, dev, e)

    def announce_returned(self, hoa) -> bool:
        """After a deregistration from home: re-announce the node's own MAC if known."""
        if hoa in self.paths:
            return False
        dev = self.home_if(hoa)
        if not dev:
            return False
        n = self.kernel.neighbour(hoa, dev)
        if not n or not n.get("lladdr"):
            return False
        self.announce(hoa, dev, n["lladdr"])
        return True

    def snapshot(self) -> dict:
        return {
            "paths": {str(h): {"kind": p.kind, "care_of_address": str(p.care_of_address),
                               "device": p.tunnel.ifname if p.tunnel else self.udp_device}
                      for h, p in self.paths.items()},
            "proxy_arp": {str(h): d for h, d in self.proxied.items()},
            "errors": self.errors,
            "backend": self.backend.stats(),
        }
