"""Small, typed wrapper over pyroute2 for what the agents program.

Everything the agents create is tagged so that a restarted (or crashed)
daemon can find and remove its leftovers without touching anything else:

* links get the interface alias ``mipmobike:<owner>`` (``ip link`` shows it);
* routes and policy rules carry the route protocol number of the owner
  (``ip route show proto 180``), see :data:`OWNER_PROTOCOLS`;
* proxy-ARP entries cannot carry a tag (the kernel keeps no protocol for
  them); owners remove the ones for the addresses they manage.

All methods are synchronous netlink calls (micro- to milliseconds); they
raise :class:`KernelError` naming the operation and the object, and
deleting something that is already gone is not an error. pyroute2's
synchronous API runs its own event loop and so cannot be called from a
thread that runs one (an asyncio daemon); the netlink socket therefore
lives in a private worker thread and every call is handed to it.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NTF_PROXY, NUD_PERMANENT

log = logging.getLogger("mipmobike.kernel")

# route/rule protocol numbers (rtm_protocol) marking what each daemon made
OWNER_PROTOCOLS = {"ha": 180, "fa": 181, "mn": 182, "test": 183}
ALIAS_PREFIX = "mipmobike:"
RT_TABLE_MAIN = 254
RT_SCOPE_NOWHERE = 255  # in a delete request: any scope
AF_INET = 2


class KernelError(RuntimeError):
    """A netlink operation failed; str() names the operation and the object."""

    def __init__(self, what: str, err: Exception | int | str):
        if isinstance(err, NetlinkError):
            detail = f"{os.strerror(err.code)} (errno {err.code})" if err.code > 0 else str(err)
            self.errno = err.code
        elif isinstance(err, OSError):
            detail, self.errno = f"{err.strerror or err}", err.errno
        else:
            detail, self.errno = str(err), None
        super().__init__(f"{what}: {detail}")


def _v4(x) -> IPv4Address:
    return x if isinstance(x, IPv4Address) else IPv4Address(x)


def _net(x) -> IPv4Network:
    if isinstance(x, IPv4Network):
        return x
    if isinstance(x, IPv4Address):
        return IPv4Network((x, 32))
    return ip_network(str(x), strict=False)


class _ThreadBoundIPRoute:
    """An IPRoute living in (and only ever called from) one worker thread.

    Attribute access returns a function that runs the call in that thread
    and turns generators into lists there, so nothing lazily re-enters
    pyroute2 from the caller's thread.
    """

    def __init__(self, netns: str | None):
        from .netns import in_netns

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="netlink")

        def open_():
            with in_netns(netns):
                return IPRoute()

        self._ipr = self._pool.submit(open_).result()

    def _run(self, name, args, kwargs):
        res = getattr(self._ipr, name)(*args, **kwargs)
        if inspect.isgenerator(res) or (hasattr(res, "__next__") and not isinstance(res, (list, tuple))):
            res = list(res)
        return res

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            return self._pool.submit(self._run, name, args, kwargs).result()

        return call

    def close(self) -> None:
        try:
            self._pool.submit(self._ipr.close).result()
        finally:
            self._pool.shutdown(wait=True)


class Kernel:
    """Links, addresses, routes, rules and neighbours of one network namespace.

    ``owner`` ("ha", "fa", "mn") chooses the tags (alias, route protocol);
    ``netns`` (an ``ip netns`` name) programs that namespace instead of the
    caller's: the netlink socket is opened inside it and sysctls and
    device files are written from inside it.
    """

    def __init__(self, owner: str = "ha", *, netns: str | None = None,
                 protocol: int | None = None):
        from .netns import in_netns

        self.owner = owner
        self.netns = netns
        self.alias = ALIAS_PREFIX + owner
        self.protocol = protocol if protocol is not None else OWNER_PROTOCOLS.get(owner, 183)
        self.inside = lambda: in_netns(netns)
        self.ipr = _ThreadBoundIPRoute(netns)
        self._ifindex: dict[str, int] = {}

    def close(self) -> None:
        self.ipr.close()

    # ------------------------------------------------------------------ links

    def ifindex(self, name: str) -> int | None:
        """The index of interface ``name``, or None (cached; see :meth:`forget`)."""
        idx = self._ifindex.get(name)
        if idx is not None:
            return idx
        try:
            msgs = self.ipr.link("get", ifname=name)
        except NetlinkError as e:
            if e.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise KernelError(f"look up interface {name}", e) from None
        if not msgs:
            return None
        idx = msgs[0]["index"]
        self._ifindex[name] = idx
        return idx

    def forget(self, name: str | None = None) -> None:
        """Drop the cached index of ``name`` (of every interface with None)."""
        if name is None:
            self._ifindex.clear()
        else:
            self._ifindex.pop(name, None)

    def require_ifindex(self, name: str) -> int:
        idx = self.ifindex(name)
        if idx is None:
            raise KernelError(f"interface {name}", "no such interface")
        return idx

    def ifname(self, index: int) -> str | None:
        try:
            links = self.ipr.get_links(index)
        except NetlinkError:
            return None
        return links[0].get("IFLA_IFNAME") if links else None

    def link(self, name_or_index) -> dict | None:
        """A summary of one link: index, name, kind, mtu, mac, alias, up, and
        for ipip tunnels local/remote; None if it does not exist."""
        idx = name_or_index if isinstance(name_or_index, int) else self.ifindex(name_or_index)
        if idx is None:
            return None
        try:
            msgs = self.ipr.get_links(idx)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                if isinstance(name_or_index, str) and name_or_index in self._ifindex:
                    self.forget(name_or_index)  # stale cache: the device was re-created
                    return self.link(name_or_index)
                return None
            raise KernelError(f"get link {name_or_index}", e) from None
        summary = self._summary(msgs[0]) if msgs else None
        if isinstance(name_or_index, str) and summary is not None and summary["name"] != name_or_index:
            self.forget(name_or_index)
            return self.link(name_or_index)
        return summary

    def links(self) -> list[dict]:
        try:
            return [self._summary(m) for m in self.ipr.get_links()]
        except NetlinkError as e:
            raise KernelError("list links", e) from None

    @staticmethod
    def _summary(m) -> dict:
        info = m.get("IFLA_LINKINFO")
        kind = info.get("IFLA_INFO_KIND") if info else None
        out = {
            "index": m["index"],
            "name": m.get("IFLA_IFNAME"),
            "kind": kind,
            "mtu": m.get("IFLA_MTU"),
            "mac": m.get("IFLA_ADDRESS"),
            "alias": m.get("IFLA_IFALIAS"),
            "up": bool(m["flags"] & 1),
        }
        if kind == "ipip" and info is not None:
            data = info.get("IFLA_INFO_DATA")
            if data is not None:
                out["local"] = data.get("IFLA_IPIP_LOCAL")
                out["remote"] = data.get("IFLA_IPIP_REMOTE")
        return out

    def own_links(self) -> list[dict]:
        """Links tagged with this owner's alias."""
        return [link for link in self.links() if link["alias"] == self.alias]

    def mac(self, name: str) -> str:
        info = self.link(name)
        if info is None:
            raise KernelError(f"interface {name}", "no such interface")
        return info["mac"]

    def create_ipip(self, name: str, local, remote, *, mtu: int | None = None, ttl: int = 64,
                    link: str | None = None) -> int:
        """Create (or adopt an identical) ipip tunnel ``name`` local -> remote, up.

        A non-zero ``ttl`` makes the kernel set DF on the outer header
        (path MTU discovery). The link is tagged with this owner's alias.
        Raises KernelError with errno EOPNOTSUPP where the kernel has no ipip.
        """
        local, remote = _v4(local), _v4(remote)
        existing = self.link(name)
        if existing is not None:
            if existing["kind"] == "ipip" and existing.get("local") == str(local) \
                    and existing.get("remote") == str(remote):
                idx = existing["index"]
            else:
                raise KernelError(f"create ipip {name}", "a different interface has this name")
        else:
            kw = dict(ifname=name, kind="ipip", ipip_local=str(local), ipip_remote=str(remote),
                      ipip_ttl=ttl)
            if link is not None:
                kw["ipip_link"] = self.require_ifindex(link)
            try:
                self.ipr.link("add", **kw)
            except NetlinkError as e:
                if e.code in (errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL) and self.ifindex(name) is None:
                    raise KernelError(f"create ipip {name} ({local} -> {remote}); "
                                      "no ipip support in this kernel?", e) from None
                raise KernelError(f"create ipip {name} ({local} -> {remote})", e) from None
            idx = self.require_ifindex(name)
        try:
            kw = dict(index=idx, state="up", ifalias=self.alias)
            if mtu:
                kw["mtu"] = mtu
            self.ipr.link("set", **kw)
        except NetlinkError as e:
            raise KernelError(f"bring up {name}", e) from None
        return idx

    def delete_link(self, name_or_index) -> bool:
        """Delete a link; False if it did not exist."""
        idx = name_or_index if isinstance(name_or_index, int) else self.ifindex(name_or_index)
        if idx is None:
            return False
        for n, i in list(self._ifindex.items()):
            if i == idx:
                del self._ifindex[n]
        try:
            self.ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise KernelError(f"delete link {name_or_index}", e) from None
        return True

    def set_link(self, name: str, *, mtu: int | None = None, up: bool | None = None,
                 tag: bool = False) -> None:
        """Set a link's MTU / state; ``tag`` marks it with this owner's alias."""
        idx = self.require_ifindex(name)
        kw: dict = {"index": idx}
        if mtu is not None:
            kw["mtu"] = mtu
        if up is not None:
            kw["state"] = "up" if up else "down"
        if tag:
            kw["ifalias"] = self.alias
        try:
            self.ipr.link("set", **kw)
        except NetlinkError as e:
            raise KernelError(f"set link {name} {kw}", e) from None

    def set_mtu(self, name: str, mtu: int) -> None:
        self.set_link(name, mtu=mtu)

    # ------------------------------------------------------------------ addresses

    def addresses(self, ifname: str | None = None) -> list[tuple[str, IPv4Network, IPv4Address]]:
        """[(interface name, connected prefix, local address)] of every IPv4 address."""
        kw = {"family": AF_INET}
        if ifname is not None:
            kw["index"] = self.require_ifindex(ifname)
        try:
            msgs = self.ipr.get_addr(**kw)
        except NetlinkError as e:
            raise KernelError("list addresses", e) from None
        out = []
        names: dict[int, str | None] = {}
        for m in msgs:
            idx = m["index"]
            if idx not in names:
                names[idx] = self.ifname(idx)
            local = m.get("IFA_LOCAL") or m.get("IFA_ADDRESS")
            out.append((names[idx], ip_network(f"{local}/{m['prefixlen']}", strict=False), _v4(local)))
        return out

    def local_addresses(self) -> set[IPv4Address]:
        return {a for _, _, a in self.addresses()}

    def interface_on_link(self, address) -> str | None:
        """The interface with a connected subnet holding ``address`` (the
        longest such prefix; host routes and /32 addresses do not count)."""
        address = _v4(address)
        best = None
        for name, net, _ in self.addresses():
            if net.prefixlen < 32 and address in net and (best is None or net.prefixlen > best[1]):
                best = (name, net.prefixlen)
        return best[0] if best else None

    def add_address(self, ifname: str, address, prefixlen: int = 32, **extra) -> None:
        """Add an address (already present is fine)."""
        try:
            self.ipr.addr("add", index=self.require_ifindex(ifname), address=str(address),
                          prefixlen=prefixlen, **extra)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise KernelError(f"add address {address}/{prefixlen} on {ifname}", e) from None

    def del_address(self, ifname: str, address, prefixlen: int = 32) -> bool:
        idx = self.ifindex(ifname)
        if idx is None:
            return False
        try:
            self.ipr.addr("del", index=idx, address=str(address), prefixlen=prefixlen)
        except NetlinkError as e:
            if e.code in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                return False
            raise KernelError(f"delete address {address}/{prefixlen} on {ifname}", e) from None
        return True

    # ------------------------------------------------------------------ routes

    def _route_kw(self, dst, dev, gateway, src, table, metric, scope, onlink) -> dict:
        net = _net(dst)
        kw: dict = {"dst": f"{net.network_address}/{net.prefixlen}", "proto": self.protocol}
        if dev is not None:
            kw["oif"] = dev if isinstance(dev, int) else self.require_ifindex(dev)
        if gateway is not None:
            kw["gateway"] = str(gateway)
        if src is not None:
            kw["prefsrc"] = str(src)
        if table is not None and table != RT_TABLE_MAIN:
            kw["table"] = table
        if metric is not None:
            kw["priority"] = metric
        if scope is not None:
            kw["scope"] = scope
        if onlink:
            kw["flags"] = 4  # RTNH_F_ONLINK
        return kw

    def add_route(self, dst, *, dev=None, gateway=None, src=None, table: int | None = None,
                  metric: int | None = None, scope: int | None = None, onlink: bool = False) -> None:
        """Install (replace) a route tagged with this owner's protocol."""
        kw = self._route_kw(dst, dev, gateway, src, table, metric, scope, onlink)
        try:
            self.ipr.route("replace", **kw)
        except NetlinkError as e:
            if e.code == errno.ENODEV and isinstance(dev, str) and dev in self._ifindex:
                self.forget(dev)  # stale cached index: once more with a fresh one
                return self.add_route(dst, dev=dev, gateway=gateway, src=src, table=table, metric=metric,
                                      scope=scope, onlink=onlink)
            raise KernelError(f"add route {dst} dev {dev} via {gateway} table {table}", e) from None

    def del_route(self, dst, *, dev=None, gateway=None, table: int | None = None,
                  metric: int | None = None) -> bool:
        """Delete one of our routes; False if it was not there."""
        kw = self._route_kw(dst, None, gateway, None, table, metric, RT_SCOPE_NOWHERE, False)
        if dev is not None:
            idx = dev if isinstance(dev, int) else self.ifindex(dev)
            if idx is None:
                return False
            kw["oif"] = idx
        try:
            self.ipr.route("del", **kw)
        except NetlinkError as e:
            if e.code in (errno.ESRCH, errno.ENOENT, errno.ENODEV):
                return False
            raise KernelError(f"delete route {dst} table {table}", e) from None
        return True

    def routes(self, table: int | None = None, own: bool = True) -> list[dict]:
        """Routes of ``table`` (main by default; 0 for all tables): dicts with
        dst (IPv4Network), table, dev (name), gateway, protocol."""
        kw: dict = {"family": AF_INET}
        if table != 0:
            kw["table"] = table if table is not None else RT_TABLE_MAIN
        if own:
            kw["proto"] = self.protocol
        try:
            msgs = self.ipr.get_routes(**kw)
        except NetlinkError as e:
            raise KernelError("list routes", e) from None
        out = []
        names: dict = {}
        for m in msgs:
            oif = m.get("RTA_OIF")
            if oif is not None and oif not in names:
                names[oif] = self.ifname(oif)
            dst = m.get("RTA_DST") or "0.0.0.0"
            out.append({
                "dst": ip_network(f"{dst}/{m['dst_len']}", strict=False),
                "table": m.get("RTA_TABLE", m["table"]),
                "dev": names.get(oif),
                "oif": oif,
                "gateway": m.get("RTA_GATEWAY"),
                "protocol": m["proto"],
                "type": m["type"],
                "priority": m.get("RTA_PRIORITY"),
            })
        return out

    def flush_routes(self, table: int | None = None) -> int:
        """Delete every route of ours in ``table`` (0: all tables)."""
        n = 0
        for r in self.routes(table=table, own=True):
            kw = {"dst": f"{r['dst'].network_address}/{r['dst'].prefixlen}", "proto": self.protocol,
                  "table": r["table"], "scope": RT_SCOPE_NOWHERE}
            if r["oif"] is not None:
                kw["oif"] = r["oif"]
            if r["priority"] is not None:
                kw["priority"] = r["priority"]
            try:
                self.ipr.route("del", **kw)
                n += 1
            except NetlinkError as e:
                if e.code not in (errno.ESRCH, errno.ENOENT):
                    raise KernelError(f"delete route {r['dst']} table {r['table']}", e) from None
        return n

    def route_get(self, dst, src=None) -> dict:
        """What the kernel would do for ``dst``: {dev, oif, gateway, prefsrc}."""
        kw = {"dst": str(dst)}
        if src is not None:
            kw["src"] = str(src)
        try:
            m = self.ipr.route("get", **kw)[0]
        except NetlinkError as e:
            raise KernelError(f"route get {dst}", e) from None
        oif = m.get("RTA_OIF")
        return {"dev": self.ifname(oif) if oif else None, "oif": oif,
                "gateway": m.get("RTA_GATEWAY"), "prefsrc": m.get("RTA_PREFSRC")}

    # ------------------------------------------------------------------ policy rules

    def _rule_kw(self, src, iif, table, priority, fwmark) -> dict:
        kw: dict = {"family": AF_INET, "table": table, "priority": priority, "protocol": self.protocol}
        if src is not None:
            net = _net(src)
            kw["src"] = str(net.network_address)
            kw["src_len"] = net.prefixlen
        if iif is not None:
            kw["iifname"] = iif
        if fwmark is not None:
            kw["fwmark"] = fwmark
        return kw

    def add_rule(self, *, table: int, priority: int, src=None, iif: str | None = None,
                 fwmark: int | None = None) -> None:
        """``ip rule add [from SRC] [iif IIF] lookup TABLE pref PRIORITY`` (idempotent)."""
        try:
            self.ipr.rule("add", **self._rule_kw(src, iif, table, priority, fwmark))
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise KernelError(f"add rule from {src} iif {iif} lookup {table}", e) from None

    def del_rule(self, *, table: int, priority: int, src=None, iif: str | None = None,
                 fwmark: int | None = None) -> bool:
        try:
            self.ipr.rule("del", **self._rule_kw(src, iif, table, priority, fwmark))
        except NetlinkError as e:
            if e.code in (errno.ENOENT, errno.ESRCH):
                return False
            raise KernelError(f"delete rule from {src} iif {iif} lookup {table}", e) from None
        return True

    def rules(self, own: bool = True) -> list[dict]:
        try:
            msgs = self.ipr.get_rules(family=AF_INET)
        except NetlinkError as e:
            raise KernelError("list rules", e) from None
        out = []
        for m in msgs:
            proto = m.get("FRA_PROTOCOL")
            if own and proto != self.protocol:
                continue
            src = m.get("FRA_SRC")
            out.append({"priority": m.get("FRA_PRIORITY", 0), "table": m.get("FRA_TABLE", m["table"]),
                        "src": ip_network(f"{src}/{m['src_len']}", strict=False) if src else None,
                        "iif": m.get("FRA_IIFNAME"), "fwmark": m.get("FRA_FWMARK"),
                        "protocol": proto})
        return out

    def flush_rules(self) -> int:
        n = 0
        for r in self.rules(own=True):
            if self.del_rule(table=r["table"], priority=r["priority"], src=r["src"], iif=r["iif"],
                             fwmark=r["fwmark"]):
                n += 1
        return n

    # ------------------------------------------------------------------ neighbours

    def add_proxy_arp(self, address, dev: str) -> None:
        """Answer ARP for ``address`` on ``dev`` (a proxy neighbour entry).

        The kernel answers only for addresses routed through another
        interface and only with forwarding on; the per-interface
        ``proxy_delay`` (see :meth:`set_proxy_delay`) delays the answers.
        """
        try:
            self.ipr.neigh("add", dst=str(address), ifindex=self.require_ifindex(dev), flags=NTF_PROXY)
        except NetlinkError as e:
            if e.code == errno.ENODEV and dev in self._ifindex:
                self.forget(dev)
                return self.add_proxy_arp(address, dev)
            if e.code != errno.EEXIST:
                raise KernelError(f"add proxy ARP {address} on {dev}", e) from None

    def del_proxy_arp(self, address, dev: str) -> bool:
        idx = self.ifindex(dev)
        if idx is None:
            return False
        try:
            self.ipr.neigh("del", dst=str(address), ifindex=idx, flags=NTF_PROXY)
        except NetlinkError as e:
            if e.code in (errno.ENOENT, errno.ESRCH, errno.ENODEV):
                return False
            raise KernelError(f"delete proxy ARP {address} on {dev}", e) from None
        return True

    def add_neighbour(self, address, lladdr: str, dev: str) -> None:
        """A permanent neighbour entry (address -> link-layer address on dev)."""
        try:
            self.ipr.neigh("replace", dst=str(address), lladdr=lladdr,
                           ifindex=self.require_ifindex(dev), state=NUD_PERMANENT)
        except NetlinkError as e:
            raise KernelError(f"add neighbour {address} lladdr {lladdr} on {dev}", e) from None

    def del_neighbour(self, address, dev: str) -> bool:
        idx = self.ifindex(dev)
        if idx is None:
            return False
        try:
            self.ipr.neigh("del", dst=str(address), ifindex=idx)
        except NetlinkError as e:
            if e.code in (errno.ENOENT, errno.ESRCH, errno.ENODEV):
                return False
            raise KernelError(f"delete neighbour {address} on {dev}", e) from None
        return True

    def neighbour(self, address, dev: str) -> dict | None:
        """{lladdr, state} of the (non-proxy) neighbour entry, or None."""
        idx = self.ifindex(dev)
        if idx is None:
            return None
        try:
            msgs = self.ipr.get_neighbours(family=AF_INET, ifindex=idx, dst=str(address))
        except NetlinkError:
            return None
        for m in msgs:
            if m.get("NDA_DST") == str(address) and not m["flags"] & NTF_PROXY:
                return {"lladdr": m.get("NDA_LLADDR"), "state": m["state"]}
        return None

    # ------------------------------------------------------------------ sysctl

    @staticmethod
    def sysctl_path(key: str) -> str:
        if key.startswith("/"):
            return key
        return "/proc/sys/" + (key if "/" in key else key.replace(".", "/"))

    def set_sysctl(self, key: str, value) -> None:
        """Write a sysctl of the current namespace: ``net/ipv4/conf/eth0/forwarding``
        (slash form, safe for interface names with dots) or dotted form."""
        path = self.sysctl_path(key)
        try:
            with self.inside(), open(path, "w") as f:
                f.write(str(value))
        except OSError as e:
            raise KernelError(f"sysctl {key}={value}", e) from None

    def get_sysctl(self, key: str) -> str:
        try:
            with self.inside(), open(self.sysctl_path(key)) as f:
                return f.read().strip()
        except OSError as e:
            raise KernelError(f"sysctl {key}", e) from None

    def set_proxy_delay(self, dev: str, centiseconds: int = 0) -> None:
        """How long proxy-ARP answers on ``dev`` are delayed (kernel default 0.8 s)."""
        # neigh/<dev>/proxy_delay is in jiffies (USER_HZ); 0 answers at once
        self.set_sysctl(f"net/ipv4/neigh/{dev}/proxy_delay", centiseconds)

    def enable_forwarding(self, dev: str | None = None) -> None:
        self.set_sysctl(f"net/ipv4/conf/{dev or 'all'}/forwarding", 1)


def ipv4(x) -> IPv4Address:
    """An IPv4Address from a string, int or IPv4Address."""
    return _v4(ip_address(x) if not isinstance(x, IPv4Address) else x)
