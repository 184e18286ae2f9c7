"""Link and address events from rtnetlink, as an asyncio stream.

The mobile node is driven by what the kernel says about its access
interfaces: a link going down or up (carrier), an IPv4 address appearing or
going away. ``LinkWatcher`` opens one NETLINK_ROUTE socket bound to the link
and IPv4-address multicast groups, parses messages with pyroute2's rtnetlink
classes and yields typed events. It runs in the caller's network namespace
(the daemon is started inside the namespace it manages).

The socket is read with ``loop.add_reader``, so no thread is involved. After
opening it takes a snapshot (a dump of links and addresses) and reports the
current state as events, so nothing that happened before start is missed.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from dataclasses import dataclass

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.rtnl import (RTM_DELADDR, RTM_DELLINK, RTM_GETADDR, RTM_GETLINK, RTM_NEWADDR,
                                   RTM_NEWLINK, RTMGRP_IPV4_IFADDR, RTMGRP_LINK)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

IFF_UP = 0x1
IFF_RUNNING = 0x40
IFF_LOWER_UP = 0x10000


@dataclass(frozen=True)
class LinkEvent:
    ifname: str
    index: int
    up: bool            # administratively up and carrier present
    removed: bool = False
    carrier_changes: int | None = None   # IFLA_CARRIER_CHANGES: a fast down+up shows here
                                         # even when the kernel reports only the final state


@dataclass(frozen=True)
class AddrEvent:
    ifname: str
    index: int
    address: ipaddress.IPv4Interface
    added: bool


_MSG = {RTM_NEWLINK: ifinfmsg, RTM_DELLINK: ifinfmsg, RTM_NEWADDR: ifaddrmsg, RTM_DELADDR: ifaddrmsg}


def parse(data: bytes) -> list:
    """Turn a buffer of rtnetlink messages into LinkEvent / AddrEvent (others are ignored)."""
    out = []
    offset = 0
    while offset + 16 <= len(data):
        length, mtype = int.from_bytes(data[offset:offset + 4], "little"), int.from_bytes(data[offset + 4:offset + 6], "little")
        if length < 16 or offset + length > len(data):
            break
        cls = _MSG.get(mtype)
        if cls is not None:
            msg = cls(data[offset:offset + length])
            msg.decode()
            if cls is ifinfmsg:
                flags = msg["flags"]
                name = msg.get_attr("IFLA_IFNAME") or ""
                up = bool(flags & IFF_UP) and bool(flags & (IFF_RUNNING | IFF_LOWER_UP))
                out.append(LinkEvent(name, msg["index"], up and mtype == RTM_NEWLINK, removed=mtype == RTM_DELLINK,
                                     carrier_changes=msg.get_attr("IFLA_CARRIER_CHANGES")))
            elif msg["family"] == socket.AF_INET:
                addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                label = msg.get_attr("IFA_LABEL") or ""
                if addr:
                    out.append(AddrEvent(label.split(":")[0], msg["index"],
                                         ipaddress.IPv4Interface(f"{addr}/{msg['prefixlen']}"),
                                         added=mtype == RTM_NEWADDR))
        offset += (length + 3) & ~3
    return out


class LinkWatcher:
    """``async for ev in LinkWatcher(names)``: events for the named interfaces (all if None)."""

    def __init__(self, ifnames: list[str] | None = None) -> None:
        self.ifnames = set(ifnames) if ifnames else None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sock: socket.socket | None = None
        self._names: dict[int, str] = {}

    async def start(self) -> None:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                          socket.NETLINK_ROUTE)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))
        self.sock = s
        asyncio.get_running_loop().add_reader(s.fileno(), self._readable)
        # snapshot after subscribing: an event racing with the dump shows up twice, never zero times
        for mtype, family, seq in ((RTM_GETLINK, socket.AF_UNSPEC, 1), (RTM_GETADDR, socket.AF_INET, 2)):
            hdr = (17).to_bytes(4, "little") + mtype.to_bytes(2, "little") + \
                (NLM_F_REQUEST | NLM_F_DUMP).to_bytes(2, "little") + seq.to_bytes(4, "little") + bytes(4)
            s.send(hdr + bytes([family]) + bytes(3))  # rtgenmsg, padded

    def _readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    # the kernel dropped events: resynchronise with a fresh dump
                    asyncio.get_running_loop().create_task(self._resync())
                    continue
                raise
            for ev in parse(data):
                if isinstance(ev, LinkEvent):
                    if ev.removed:
                        self._names.pop(ev.index, None)
                    else:
                        self._names[ev.index] = ev.ifname
                elif not ev.ifname:
                    ev = AddrEvent(self._names.get(ev.index, ""), ev.index, ev.address, ev.added)
                if self.ifnames is None or ev.ifname in self.ifnames:
                    self.queue.put_nowait(ev)

    async def _resync(self) -> None:
        sock, self.sock = self.sock, None
        asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()
        await self.start()

    def close(self) -> None:
        if self.sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            except RuntimeError:
                pass
            self.sock.close()
            self.sock = None

    async def get(self):
        return await self.queue.get()

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.queue.get()
