"""XFRM kernel events as typed objects for asyncio.

:class:`XfrmMonitor` is a netlink socket bound to XFRM multicast groups in
one network namespace; iterate it (``async for ev in monitor``) to get
:class:`Acquire`, :class:`Expire`, :class:`Mapping`, :class:`SAChanged`,
:class:`PolicyChanged`, ... events. When the kernel drops notifications
because the socket buffer overflowed, an :class:`EventsLost` event says so
(re-read the state with a dump), and the monitor keeps going.

Messages are decoded with pyroute2's marshal and the classes of
:mod:`xfrm.messages`; the socket itself is a plain non-blocking netlink
socket (opened inside the namespace by pyroute2) read with ``loop.sock_recv``,
so that an ENOBUFS overrun is an event, not a dead socket.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import socket
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

from . import messages as m
from .constants import Dir, Group, Msg
from .errors import NamespaceNotFound
from .netlink import NETLINK_ADD_MEMBERSHIP, SOL_NETLINK, open_socket
from .model import (SA, Encap, IPAddress, Policy, SAId, Selector, Template,
                    _selector_from, policy_from_msg, sa_from_msg, unpack_addr)

log = logging.getLogger(__name__)


DEFAULT_GROUPS = (Group.ACQUIRE, Group.EXPIRE, Group.SA, Group.POLICY, Group.MAPPING,
                  Group.MIGRATE)


class Event:
    """Base of all XFRM events."""


@dataclass(frozen=True)
class Acquire(Event):
    """Traffic matched ``policy`` but no SA exists for ``template``: the
    kernel asks the key manager to negotiate one (XFRM_MSG_ACQUIRE)."""
    policy: Policy
    template: Optional[Template]
    src: Optional[IPAddress]          # outer addresses the SA should have
    dst: Optional[IPAddress]
    selector: Optional[Selector]      # the flow that triggered it
    seq: int


@dataclass(frozen=True)
class Expire(Event):
    """An SA reached a soft (rekey now) or hard (it is gone) limit."""
    sa: SA
    hard: bool


@dataclass(frozen=True)
class PolicyExpire(Event):
    policy: Policy
    hard: bool


@dataclass(frozen=True)
class Mapping(Event):
    """ESP-in-UDP arrived for an inbound SA from a new address/port: a NAT
    in front of the peer changed its mapping (XFRM_MSG_MAPPING)."""
    sa: SAId
    reqid: int
    old_src: Optional[IPAddress]
    new_src: Optional[IPAddress]
    old_sport: int
    new_sport: int


@dataclass(frozen=True)
class SAChanged(Event):
    """An SA was added (``"new"``), updated (``"update"``) or removed
    (``"delete"``) by anyone in the namespace."""
    kind: str
    sa: SA


@dataclass(frozen=True)
class PolicyChanged(Event):
    kind: str
    policy: Policy


@dataclass(frozen=True)
class Flushed(Event):
    """All SAs (``what="sa"``, of ``proto``; 255 = any) or policies were flushed."""
    what: str
    proto: int = 0


@dataclass(frozen=True)
class Migrated(Event):
    """A policy and its SAs moved to new addresses (XFRM_MSG_MIGRATE)."""
    selector: Optional[Selector]
    dir: Dir
    moves: Tuple[tuple, ...]          # (old_src, old_dst, new_src, new_dst, reqid)
    encap: Optional[Encap]


@dataclass(frozen=True)
class EventsLost(Event):
    """The kernel dropped notifications (socket buffer overrun)."""
    reason: str = "receive buffer overrun (ENOBUFS)"


@dataclass(frozen=True)
class Unknown(Event):
    msg_type: int


class _Prefixed:
    """Read ``prefix + key`` of a message as ``key`` (the acquire's policy)."""

    def __init__(self, msg, prefix):
        self._msg, self._p = msg, prefix

    def __getitem__(self, key):
        return self._msg[self._p + key]


def decode(msg) -> Event:
    """The event for one multicast message."""
    t = msg["header"]["type"]
    kind = {Msg.NEWSA: "new", Msg.UPDSA: "update", Msg.DELSA: "delete",
            Msg.NEWPOLICY: "new", Msg.UPDPOLICY: "update", Msg.DELPOLICY: "delete"}
    if t in (Msg.NEWSA, Msg.UPDSA):
        return SAChanged(kind[t], sa_from_msg(msg))
    if t == Msg.DELSA:
        return SAChanged("delete", sa_from_msg(msg, info=msg.get_attr("XFRMA_SA")))
    if t in (Msg.NEWPOLICY, Msg.UPDPOLICY):
        return PolicyChanged(kind[t], policy_from_msg(msg))
    if t == Msg.DELPOLICY:
        info = msg.get_attr("XFRMA_POLICY")
        return PolicyChanged("delete", policy_from_msg(msg, info=info if info else msg))
    if t == Msg.EXPIRE:
        return Expire(sa_from_msg(msg), bool(msg["hard"]))
    if t == Msg.POLEXPIRE:
        return PolicyExpire(policy_from_msg(msg), bool(msg["hard"]))
    if t == Msg.ACQUIRE:
        pol = policy_from_msg(msg, info=_Prefixed(msg, "pol_"))
        sel = _selector_from(msg)
        tmpl = pol.templates[0] if pol.templates else None
        fam = (tmpl.family if tmpl and tmpl.family else None) or (sel.family if sel else None)
        src = unpack_addr(msg["saddr"], fam) if fam else None
        dst = unpack_addr(msg["id_daddr"], fam) if fam else None
        return Acquire(pol, tmpl, src, dst, sel, msg["seq"])
    if t == Msg.MAPPING:
        fam = msg["family"]
        return Mapping(SAId(unpack_addr(msg["daddr"], fam), msg["spi"], msg["proto"]),
                       msg["reqid"], unpack_addr(msg["old_saddr"], fam),
                       unpack_addr(msg["new_saddr"], fam), msg["old_sport"], msg["new_sport"])
    if t == Msg.FLUSHSA:
        return Flushed("sa", msg["proto"])
    if t == Msg.FLUSHPOLICY:
        return Flushed("policy")
    if t == Msg.MIGRATE:
        moves = []
        for e in msg.get_attr("XFRMA_MIGRATE") or []:
            of, nf = e["old_family"], e["new_family"]
            moves.append((unpack_addr(e["old_saddr"], of), unpack_addr(e["old_daddr"], of),
                          unpack_addr(e["new_saddr"], nf), unpack_addr(e["new_daddr"], nf),
                          e["reqid"]))
        enc = msg.get_attr("XFRMA_ENCAP")
        encap = Encap(enc["encap_sport"], enc["encap_dport"], None, enc["encap_type"]) \
            if enc else None
        return Migrated(_selector_from(msg), Dir(msg["dir"]), tuple(moves), encap)
    return Unknown(t)


def _open_socket(netns: Optional[str]) -> socket.socket:
    try:
        return open_socket(netns)
    except FileNotFoundError:
        raise NamespaceNotFound(errno.ENOENT, "open XFRM event socket", f"in netns {netns!r}",
                                message=f"network namespace {netns!r} does not exist"
                                ) from None


class XfrmMonitor:
    """XFRM notifications of one network namespace as an async iterator.

    ``groups`` are :class:`xfrm.constants.Group` numbers (default: acquire,
    expire, SA, policy, mapping and migrate). Open with ``async with`` or
    :meth:`open`; the socket receives from the moment it is opened.
    """

    def __init__(self, netns: Optional[str] = None, groups: Iterable[int] = DEFAULT_GROUPS,
                 *, rcvbuf: int = 1 << 20):
        self.netns = netns
        self.groups = tuple(int(g) for g in groups)
        self.rcvbuf = rcvbuf
        self._sock: Optional[socket.socket] = None
        self._pending: collections.deque = collections.deque()
        self._marshal = m.XfrmMarshal()
        self.decode_errors = 0

    def open(self) -> "XfrmMonitor":
        """Open and subscribe (synchronous: events queue up from here on)."""
        if self._sock is not None:
            return self
        sock = _open_socket(self.netns)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.bind((0, 0))
            for g in self.groups:
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, g)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    async def __aenter__(self):
        return self.open()

    async def __aexit__(self, *exc):
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self._sock is None:
            raise StopAsyncIteration
        return await self.get()

    async def get(self, timeout: Optional[float] = None) -> Event:
        """The next event; ``asyncio.TimeoutError`` after ``timeout`` seconds."""
        if timeout is not None:
            return await asyncio.wait_for(self.get(), timeout)
        loop = asyncio.get_running_loop()
        while not self._pending:
            if self._sock is None:
                raise RuntimeError("XfrmMonitor is closed")
            try:
                data = await loop.sock_recv(self._sock, 1 << 16)
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    return EventsLost()
                raise
            self._feed(data)
        return self._pending.popleft()

    def _feed(self, data: bytes) -> None:
        try:
            msgs = list(self._marshal.parse(data))
        except Exception as e:                 # malformed: count, log once, drop
            self._bad(e)
            return
        for msg in msgs:
            if msg["header"].get("error") is not None:
                self._bad(msg["header"]["error"])
                continue
            try:
                self._pending.append(decode(msg))
            except Exception as e:
                self._bad(e)

    def _bad(self, e) -> None:
        self.decode_errors += 1
        if self.decode_errors == 1:
            log.warning("undecodable XFRM notification dropped: %s", e)
