"""IP-in-IP tunnels for the agents, behind one interface with two backends.

A :class:`Tunnel` is an (outer local, outer remote) pair. Agents ask a
backend for one, then say which traffic goes into it:

    be = make_backend("ipip", Kernel("ha"), prefix="mip", mtu=1480)
    be.reconcile(); be.open()                  # remove leftovers, set up
    t = be.tunnel(ha_addr, coa)                # refcounted: shared by bindings
    be.route_to(t, hoa)                        # packets to hoa -> tunnel
    be.route_from(t, hoa, iif="eth1")          # packets from hoa -> tunnel
    be.accept_for(t, hoa)                      # decapsulate packets to hoa
    be.unroute_to(t, hoa); be.release(t)       # the last release deletes it
    be.close()                                 # everything this backend made

Decapsulated packets are accepted for the traffic a tunnel carries: both
directions of ``route_to``/``route_from`` and what ``accept_for`` names.

Backends:

``ipip``  one kernel ipip netdevice per tunnel (named ``<prefix><remote hex>``
          plus a short hash of the local address), host routes into it, and
          one routing table per tunnel for ``route_from`` (a policy rule
          ``from HOST [iif IIF] lookup TABLE``). Needs the ipip module.
``bpf``   no netdevice per tunnel: one TUN device ``<prefix>-bpf`` is the
          routing target for every tunnel; its TC egress program
          (bpf/tunnel.c) encapsulates by looking the packet up in the
          binding maps and redirects it to the interface the FIB picks; a
          TC ingress program on the physical interfaces decapsulates IPIP
          packets that belong to a binding. Works without the ipip module.
``none``  signalling only: remembers the calls, programs nothing.

Everything is tagged (see :mod:`agent.kernel.netlink`) so :meth:`reconcile`
removes what a previous instance left, and :meth:`close` removes what this
one made.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from .netlink import Kernel, KernelError, ipv4

log = logging.getLogger("mipmobike.kernel.tunnels")

DEFAULT_TABLE_BASE = {"ha": 43400, "fa": 43500, "mn": 43600}
DEFAULT_RULE_PRIORITY = 1000
IPIP_OVERHEAD = 20


@dataclass
class Tunnel:
    """An outer (local, remote) pair; ``ifname`` is the device routes point at."""

    local: IPv4Address
    remote: IPv4Address
    ifname: str
    refs: int = 0
    table: int | None = None
    routes_to: set = field(default_factory=set)
    routes_from: set = field(default_factory=set)
    accepts: set = field(default_factory=set)

    @property
    def key(self) -> tuple[IPv4Address, IPv4Address]:
        return self.local, self.remote


class TunnelBackend:
    """Base class: bookkeeping shared by the backends (see the module docstring)."""

    kind = "abstract"

    def __init__(self, kernel: Kernel, *, prefix: str = "mip", mtu: int | None = None,
                 table_base: int | None = None, rule_priority: int = DEFAULT_RULE_PRIORITY,
                 decap_interfaces: list[str] | None = None, max_entries: int | None = None):
        if not 1 <= len(prefix) <= 4:
            raise ValueError("tunnel device prefix must be 1..4 characters")
        self.kernel = kernel
        self.prefix = prefix
        self.mtu = mtu
        self.table_base = table_base if table_base is not None else \
            DEFAULT_TABLE_BASE.get(kernel.owner, 43700)
        self.rule_priority = rule_priority
        self.decap_interfaces = decap_interfaces
        self.max_entries = max_entries
        self.tunnels: dict[tuple, Tunnel] = {}

    # -- lifecycle
    def reconcile(self) -> dict:
        """Remove every object an earlier instance of this owner left behind."""
        k = self.kernel
        links = 0
        for link in k.own_links():
            if k.delete_link(link["index"]):
                links += 1
        routes = k.flush_routes(table=0)
        rules = k.flush_rules()
        return {"links": links, "routes": routes, "rules": rules}

    def open(self) -> None:
        pass

    def close(self) -> None:
        for t in list(self.tunnels.values()):
            for host in list(t.routes_to):
                self.unroute_to(t, host)
            for host, iif in list(t.routes_from):
                self.unroute_from(t, host, iif=iif)
            for host in list(t.accepts):
                self.unaccept_for(t, host)
            t.refs = 1
            self.release(t)

    # -- tunnels
    def tunnel(self, local, remote) -> Tunnel:
        """Get (creating on first use) the tunnel local -> remote; adds a reference."""
        key = (ipv4(local), ipv4(remote))
        t = self.tunnels.get(key)
        if t is None:
            t = self._create(*key)
            self.tunnels[key] = t
        t.refs += 1
        return t

    def release(self, t: Tunnel) -> None:
        """Drop a reference; the last one removes the tunnel and its routes."""
        t.refs -= 1
        if t.refs > 0:
            return
        self.tunnels.pop(t.key, None)
        self._destroy(t)

    def name_for(self, local: IPv4Address, remote: IPv4Address) -> str:
        """Deterministic device name: prefix + remote in hex + 3 hex digits of the local address."""
        tail = hashlib.sha1(local.packed).hexdigest()[:3]
        return f"{self.prefix}{int(remote):08x}{tail}"[:15]

    # -- to be provided by the backends
    def _create(self, local, remote) -> Tunnel:  # pragma: no cover - abstract
        raise NotImplementedError

    def _destroy(self, t: Tunnel) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def route_to(self, t: Tunnel, host) -> None:
        raise NotImplementedError

    def unroute_to(self, t: Tunnel, host) -> None:
        raise NotImplementedError

    def route_from(self, t: Tunnel, host, *, iif: str | None = None) -> None:
        raise NotImplementedError

    def unroute_from(self, t: Tunnel, host, *, iif: str | None = None) -> None:
        raise NotImplementedError

    def accept_for(self, t: Tunnel, host) -> None:
        t.accepts.add(ipv4(host))

    def unaccept_for(self, t: Tunnel, host) -> None:
        t.accepts.discard(ipv4(host))

    def stats(self) -> dict:
        return {"backend": self.kind, "tunnels": len(self.tunnels),
                "routes_to": sum(len(t.routes_to) for t in self.tunnels.values()),
                "routes_from": sum(len(t.routes_from) for t in self.tunnels.values())}

    def memory(self) -> int | None:
        """Kernel memory the backend can attribute to its bindings (bytes), or None."""
        return None


class NullBackend(TunnelBackend):
    """Signalling only: bookkeeping without kernel objects (tests, benchmarks)."""

    kind = "none"

    def reconcile(self) -> dict:
        return {}

    def _create(self, local, remote) -> Tunnel:
        return Tunnel(local, remote, self.name_for(local, remote))

    def _destroy(self, t: Tunnel) -> None:
        pass

    def route_to(self, t, host):
        t.routes_to.add(ipv4(host))

    def unroute_to(self, t, host):
        t.routes_to.discard(ipv4(host))

    def route_from(self, t, host, *, iif=None):
        t.routes_from.add((ipv4(host), iif))

    def unroute_from(self, t, host, *, iif=None):
        t.routes_from.discard((ipv4(host), iif))


class _TableAllocator:
    def __init__(self, base: int, size: int = 4096):
        self.base, self.size = base, size
        self.used: set[int] = set()

    def take(self) -> int:
        for i in range(self.size):
            if self.base + i not in self.used:
                self.used.add(self.base + i)
                return self.base + i
        raise KernelError("allocate routing table", "no free table in the configured range")

    def give(self, table: int) -> None:
        self.used.discard(table)


class IpipBackend(TunnelBackend):
    """Kernel ipip netdevices, one per (local, remote)."""

    kind = "ipip"

    def __init__(self, kernel: Kernel, **kw):
        super().__init__(kernel, **kw)
        self._tables = _TableAllocator(self.table_base)

    def _create(self, local, remote) -> Tunnel:
        name = self.name_for(local, remote)
        self.kernel.create_ipip(name, local, remote, mtu=self.mtu)
        # decapsulated packets arrive on the tunnel device: it must forward
        self.kernel.set_sysctl(f"net/ipv4/conf/{name}/forwarding", 1)
        self.kernel.set_sysctl(f"net/ipv4/conf/{name}/rp_filter", 0)
        return Tunnel(local, remote, name)

    def _destroy(self, t: Tunnel) -> None:
        for host in list(t.routes_to):
            self.unroute_to(t, host)
        for host, iif in list(t.routes_from):
            self.unroute_from(t, host, iif=iif)
        if t.table is not None:
            self.kernel.del_route("0.0.0.0/0", table=t.table)
            self._tables.give(t.table)
            t.table = None
        self.kernel.delete_link(t.ifname)

    def route_to(self, t, host):
        host = ipv4(host)
        self.kernel.add_route(host, dev=t.ifname)
        t.routes_to.add(host)

    def unroute_to(self, t, host):
        host = ipv4(host)
        if host in t.routes_to:
            self.kernel.del_route(host, dev=t.ifname)
            t.routes_to.discard(host)

    def _table(self, t: Tunnel) -> int:
        if t.table is None:
            t.table = self._tables.take()
            self.kernel.add_route("0.0.0.0/0", dev=t.ifname, table=t.table)
        return t.table

    def route_from(self, t, host, *, iif=None):
        host = ipv4(host)
        table = self._table(t)
        self.kernel.add_rule(table=table, priority=self.rule_priority, src=host, iif=iif)
        t.routes_from.add((host, iif))

    def unroute_from(self, t, host, *, iif=None):
        host = ipv4(host)
        if (host, iif) in t.routes_from and t.table is not None:
            self.kernel.del_rule(table=t.table, priority=self.rule_priority, src=host, iif=iif)
        t.routes_from.discard((host, iif))


class BpfBackend(TunnelBackend):
    """TC programs and two hash maps; one shared TUN device as routing target."""

    kind = "bpf"

    def __init__(self, kernel: Kernel, **kw):
        super().__init__(kernel, **kw)
        self.device_name = f"{self.prefix}-bpf"
        self.prog = None
        self.tun = None
        self._decap_on: list[str] = []
        self._dst_owner: dict[IPv4Address, Tunnel] = {}   # host -> tunnel its tun_dst entry names
        self._src_users: dict[IPv4Address, set] = {}      # host -> ids of tunnels using tun_src

    def reconcile(self) -> dict:
        from .bpftunnel import BpfTunnelProgram

        out = super().reconcile()
        out["filters"] = BpfTunnelProgram.remove_stale_filters(self.kernel)
        if self.kernel.delete_link(self.device_name):
            out["links"] = out.get("links", 0) + 1
        return out

    def open(self) -> None:
        from .bpftunnel import DEFAULT_MAX_ENTRIES, BpfTunnelProgram
        from .tun import TunDevice

        k = self.kernel
        self.prog = BpfTunnelProgram(self.max_entries or DEFAULT_MAX_ENTRIES)
        try:
            with k.inside():
                self.tun = TunDevice(self.device_name)
            k.set_link(self.device_name, up=True, tag=True,
                       mtu=self.mtu or (1500 - 20))
            # bpf_fib_lookup() treats the TUN device as the input interface
            k.set_sysctl(f"net/ipv4/conf/{self.device_name}/forwarding", 1)
            self.prog.attach_encap(k, self.device_name)
            names = self.decap_interfaces
            if names is None:
                names = [link["name"] for link in k.links()
                         if link["name"] != "lo" and link["mac"] and len(link["mac"]) == 17
                         and link["kind"] not in ("ipip", "tun")
                         and link["name"] != self.device_name]
            for name in names:
                self.prog.attach_decap(k, name)
                self._decap_on.append(name)
            k.add_route("0.0.0.0/0", dev=self.device_name, table=self.table_base)
        except Exception:
            self._teardown()
            raise

    def _teardown(self) -> None:
        if self.prog is not None:
            self.prog.close()
            self.prog = None
        if self.tun is not None:
            self.tun.close()
            self.tun = None
            self.kernel.forget(self.device_name)
        self._decap_on.clear()

    def close(self) -> None:
        super().close()
        self.kernel.flush_rules()
        self._teardown()

    def _create(self, local, remote) -> Tunnel:
        if self.prog is None:
            raise KernelError("bpf tunnel", "backend not opened")
        return Tunnel(local, remote, self.device_name, table=self.table_base)

    def _destroy(self, t: Tunnel) -> None:
        for host in list(t.routes_to):
            self.unroute_to(t, host)
        for host, iif in list(t.routes_from):
            self.unroute_from(t, host, iif=iif)
        for host in list(t.accepts):
            self.unaccept_for(t, host)

    def route_to(self, t, host):
        host = ipv4(host)
        self.prog.set_dst(host, local=t.local, remote=t.remote)
        self.kernel.add_route(host, dev=self.device_name)
        t.routes_to.add(host)
        self._dst_owner[host] = t

    def unroute_to(self, t, host):
        host = ipv4(host)
        if host not in t.routes_to:
            return
        t.routes_to.discard(host)
        if self._dst_owner.get(host) is not t:
            return  # another tunnel took this host over (a binding moved)
        del self._dst_owner[host]
        self.prog.del_dst(host)
        self.kernel.del_route(host, dev=self.device_name)

    def _src_use(self, t, host) -> None:
        self._src_users.setdefault(host, set()).add(id(t))
        self.prog.set_src(host, local=t.local, remote=t.remote)

    def _src_unuse(self, t, host) -> None:
        if host in t.accepts or any(h == host for h, _ in t.routes_from):
            return  # still used by this tunnel
        users = self._src_users.get(host)
        if users is None:
            return
        users.discard(id(t))
        if not users:
            del self._src_users[host]
            self.prog.del_src(host)

    def accept_for(self, t, host):
        host = ipv4(host)
        t.accepts.add(host)
        self._src_use(t, host)

    def unaccept_for(self, t, host):
        host = ipv4(host)
        if host in t.accepts:
            t.accepts.discard(host)
            self._src_unuse(t, host)

    def route_from(self, t, host, *, iif=None):
        host = ipv4(host)
        t.routes_from.add((host, iif))
        self._src_use(t, host)
        self.kernel.add_rule(table=self.table_base, priority=self.rule_priority, src=host, iif=iif)

    def unroute_from(self, t, host, *, iif=None):
        host = ipv4(host)
        if (host, iif) not in t.routes_from:
            return
        t.routes_from.discard((host, iif))
        self.kernel.del_rule(table=self.table_base, priority=self.rule_priority, src=host, iif=iif)
        self._src_unuse(t, host)

    def stats(self) -> dict:
        out = super().stats()
        if self.prog is not None:
            out["bpf"] = self.prog.counters()
            out["decap_interfaces"] = list(self._decap_on)
        return out

    def memory(self) -> int | None:
        return self.prog.memory() if self.prog is not None else None


BACKENDS = {"ipip": IpipBackend, "bpf": BpfBackend, "none": NullBackend}


def ipip_available(kernel: Kernel) -> bool:
    """True if this kernel can create ipip devices (tries, then cleans up)."""
    name = "mipprobe0"
    try:
        kernel.create_ipip(name, "192.0.2.1", "192.0.2.2")
    except KernelError:
        return False
    kernel.delete_link(name)
    return True


def make_backend(kind: str, kernel: Kernel, **kw) -> TunnelBackend:
    """``kind``: "ipip", "bpf", "none", or "auto" (ipip where the kernel has it, else bpf)."""
    if kind == "auto":
        kind = "ipip" if ipip_available(kernel) else "bpf"
    try:
        cls = BACKENDS[kind]
    except KeyError:
        raise ValueError(f"unknown tunnel backend {kind!r} (ipip, bpf, none, auto)") from None
    return cls(kernel, **kw)
