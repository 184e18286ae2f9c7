"""Build namespaces, veths and bridges; always torn down.

    with Topology() as t:
        gw, mn = t.ns("gw"), t.ns("mn")
        a, b = t.link(gw, mn, "10.0.0.1/24", "10.0.0.2/24")
        mn.run("ping", "-c1", "10.0.0.1")

Each ``Netns`` knows its interfaces; ``Topology.close()`` kills every process
still inside the namespaces it made and deletes them (which removes their
veths, bridges, XFRM state and routes with them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

from .names import ns_prefix, unique


class CommandFailed(RuntimeError):
    pass


def sh(*argv: str, check: bool = True, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode:
        raise CommandFailed(f"{' '.join(argv)} -> exit {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


@dataclass
class Netns:
    name: str
    ifaces: list[str] = field(default_factory=list)

    def run(self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.name, *argv, check=check, timeout=timeout, input=input)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "-n", self.name, *args, check=check)

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def addr(self, ifname: str, cidr: str) -> None:
        self.ip("addr", "add", cidr, "dev", ifname)

    def route(self, *spec: str) -> None:
        self.ip("route", "replace", *spec)

    def pids(self) -> list[int]:
        p = sh("ip", "netns", "pids", self.name, check=False)
        return [int(x) for x in p.stdout.split()]

    def ping(self, dst: str, count: int = 1, timeout: float = 2, *extra: str) -> bool:
        p = self.run("ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(timeout), *extra, dst, check=False,
                     timeout=count * (timeout + 1) + 10)
        return p.returncode == 0


class Topology:
    def __init__(self, tag: str = "t") -> None:
        self.tag = tag
        self.namespaces: list[Netns] = []

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ns(self, role: str, forward: bool = False) -> Netns:
        n = Netns(f"{ns_prefix()}{self.tag}-{role}-{unique('n')[-3:]}")
        sh("ip", "netns", "add", n.name)
        self.namespaces.append(n)
        n.ip("link", "set", "lo", "up")
        n.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
        n.sysctl("net.ipv6.conf.default.disable_ipv6", "1")
        if forward:
            n.sysctl("net.ipv4.ip_forward", "1")
        return n

    def veth(self, a: Netns, b: Netns, name_a: str | None = None, name_b: str | None = None) -> tuple[str, str]:
        ia, ib = name_a or unique("v"), name_b or unique("v")
        sh("ip", "link", "add", ia, "netns", a.name, "type", "veth", "peer", "name", ib, "netns", b.name)
        a.ifaces.append(ia)
        b.ifaces.append(ib)
        a.ip("link", "set", ia, "up")
        b.ip("link", "set", ib, "up")
        return ia, ib

    def link(self, a: Netns, b: Netns, cidr_a: str | None = None, cidr_b: str | None = None) -> tuple[str, str]:
        ia, ib = self.veth(a, b)
        if cidr_a:
            a.addr(ia, cidr_a)
        if cidr_b:
            b.addr(ib, cidr_b)
        return ia, ib

    def bridge(self, where: Netns, cidr: str | None = None, name: str | None = None) -> str:
        br = name or unique("br")
        where.ip("link", "add", br, "type", "bridge")
        where.ip("link", "set", br, "up")
        where.ifaces.append(br)
        if cidr:
            where.addr(br, cidr)
        return br

    def attach(self, where: Netns, bridge: str, other: Netns, cidr: str | None = None) -> str:
        """A veth from ``other`` into ``bridge`` (which lives in ``where``); returns other's end."""
        port, ifname = self.veth(where, other)
        where.ip("link", "set", port, "master", bridge)
        if cidr:
            other.addr(ifname, cidr)
        return ifname

    def close(self) -> None:
        errors = []
        for n in reversed(self.namespaces):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                pids = n.pids()
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 3
                while pids and time.monotonic() < deadline and n.pids():
                    time.sleep(0.05)
            p = sh("ip", "netns", "del", n.name, check=False)
            if p.returncode:
                errors.append(f"{n.name}: {p.stderr.strip()}")
        self.namespaces.clear()
        if errors:
            raise CommandFailed("teardown: " + "; ".join(errors))
