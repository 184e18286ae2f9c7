"""The asyncio driver of the IKEv2 initiator (the daemon's; driver.py is the
blocking one for tools and tests).

:class:`AsyncIkeDriver` owns the UDP sockets on ports 500 and 4500, bound
to the wildcard address with IP_PKTINFO, so that every datagram leaves from
the local address the state machine names (MOBIKE moves to a new address
without new sockets) and every received one tells which local address it
came to (NAT detection). Both sockets bypass the IPsec policies
(``xfrm.socket_bypass``); the kernel decapsulates ESP-in-UDP arriving on
4500 (``xfrm.socket_espinudp``). The driver runs the connection's timers on
the event loop (its clock is the loop's) and turns the state machine's
events into kernel changes through an installer (``installer.py``):
CHILD SA pairs and policies in, rekeyed pairs next to their predecessors,
MOBIKE migrations in place, removal on delete, the TIA on ``lo``.

    drv = AsyncIkeDriver(XfrmInstaller())
    await drv.open()
    child = await drv.connect(IkeConnection(cfg, ("192.0.2.50", 500), ("192.0.2.1", 500)))
    upd = await drv.update("198.51.100.50")         # MOBIKE
    await drv.delete(); await drv.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable

from .connection import IkeConnection, State
from .const import IKE_PORT, NATT_PORT
from .events import (
    AddressUpdated, AuthFailed, ChildSaDeleted, ChildSaEstablished, ChildSaFailed, Event, IkeFailed, IkeSaDeleted,
    MobikeFailed, MobikeStarted,
)
from .installer import InstallError

log = logging.getLogger("agent.ike.aio")

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO = struct.Struct("=I4s4s")          # struct in_pktinfo: ifindex, spec_dst, addr


class IkeSessionError(RuntimeError):
    """An IKE operation did not succeed; ``event`` is the state machine's
    event that says why (None: timeout or local error)."""

    def __init__(self, message: str, event: Event | None = None):
        super().__init__(message)
        self.event = event


def make_udp_socket(port: int, bind: str = "0.0.0.0", netns: str | None = None) -> socket.socket:
    """A non-blocking IPv4 UDP socket on ``bind:port`` with IP_PKTINFO (in ``netns``)."""
    from agent.kernel.netns import in_netns
    with in_netns(netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        s.bind((bind, port))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


class AsyncIkeDriver:
    """Runs one IkeConnection at a time (a new one replaces a closed one)
    over asyncio, with kernel state through ``installer``.

    ``on_event(ev)`` sees every state machine event after the kernel was
    changed for it, plus an :class:`InstallFailed` when the kernel refused.
    """

    def __init__(self, installer, *, netns: str | None = None, ports: tuple[int, int] = (IKE_PORT, NATT_PORT),
                 bind: str = "0.0.0.0", espinudp: bool = True,
                 socket_factory: Callable[[int], socket.socket] | None = None,
                 on_event: Callable[[Event], None] | None = None, name: str = "ike") -> None:
        self.installer = installer
        self.netns = netns
        self.ports = ports
        self.bind = bind
        self.espinudp = espinudp
        self.on_event = on_event
        self.name = name
        self._socket_factory = socket_factory or (lambda port: make_udp_socket(port, bind, netns))
        self.conn: IkeConnection | None = None
        self.socks: dict[int, socket.socket] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiters: list[tuple[Callable[[Event], bool], asyncio.Future]] = []
        self.stats: dict[str, int] = {}
        self.events: list[Event] = []          # the last events (for status), newest last
        self.wall_offset = 0.0                 # event.time + wall_offset = wall clock
        self.last_rx: float | None = None      # wall clock of the last socket read

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self.socks:
            return
        self._loop = asyncio.get_running_loop()
        self.wall_offset = time.time() - self._loop.time()
        import xfrm
        try:
            for port in self.ports:
                s = self._socket_factory(port)
                self.socks[port] = s
                xfrm.socket_bypass(s)
                if port == self.ports[1] and self.espinudp:
                    try:
                        xfrm.socket_espinudp(s)
                    except OSError as e:
                        log.warning("%s: no ESP-in-UDP decapsulation on port %d: %s", self.name, port, e)
                self._loop.add_reader(s.fileno(), self._readable, s)
            self.installer.open()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the sockets (the kernel state stays: see delete() / remove_all)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for s in self.socks.values():
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(s.fileno())
            s.close()
        self.socks.clear()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(IkeSessionError("the IKE driver was closed"))
        self._waiters.clear()

    def now(self) -> float:
        return self._loop.time()

    # ------------------------------------------------------------------ operations

    def attach(self, conn: IkeConnection) -> None:
        """Drive ``conn`` from now on (its inbound SPIs come from the installer)."""
        if self.conn is not None and self.conn.state not in (State.CLOSED, State.IDLE):
            raise RuntimeError("another IKE SA is still being driven")
        self.conn = conn
        conn.config.spi_allocator = self._allocate_spi(conn, conn.config.spi_allocator)

    def _allocate_spi(self, conn: IkeConnection, fallback: Callable[[], int]) -> Callable[[], int]:
        def alloc() -> int:
            try:
                spi = self.installer.allocate_spi(conn.path.local[0], conn.path.remote[0])
            except Exception as e:              # never fatal: a random SPI works as well
                log.warning("%s: SPI allocation: %s", self.name, e)
                spi = None
            return spi if spi else fallback()
        return alloc

    async def connect(self, conn: IkeConnection, timeout: float = 30.0) -> ChildSaEstablished:
        """Run IKE_SA_INIT and IKE_AUTH; return once the CHILD SA is installed.
        On failure (or cancellation) the connection is aborted and nothing
        stays in the kernel."""
        self.attach(conn)
        fut = self._waiter(lambda e: isinstance(e, (ChildSaEstablished, ChildSaFailed, AuthFailed, IkeFailed,
                                                    InstallFailed, IkeSaDeleted)))
        try:
            conn.connect(self.now())
            self._service()
            ev = await asyncio.wait_for(fut, timeout)
        except BaseException:
            self.abort()
            raise
        if not isinstance(ev, ChildSaEstablished):
            self.abort()
            raise IkeSessionError(_reason(ev), ev)
        return ev

    async def update(self, local: str, timeout: float = 30.0) -> AddressUpdated:
        """MOBIKE to our new address ``local``; returns when the gateway
        updated the SA (the kernel SAs were migrated already). Raises
        IkeSessionError when the update failed (the IKE SA is gone then)."""
        conn = self._require()
        fut = self._waiter(lambda e: isinstance(e, (AddressUpdated, MobikeFailed, IkeSaDeleted, InstallFailed)))
        conn.update_addresses((str(local), NATT_PORT), self.now())
        self._service()
        try:
            ev = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            raise IkeSessionError(f"no answer to the MOBIKE update within {timeout:.0f} s") from None
        if not isinstance(ev, AddressUpdated):
            raise IkeSessionError(_reason(ev), ev)
        return ev

    async def delete(self, timeout: float = 3.0) -> None:
        """Delete the IKE SA at the gateway (waits up to ``timeout`` for its
        answer) and remove every kernel object of it (held policies and the
        TIA included)."""
        conn = self.conn
        if conn is not None and conn.state not in (State.CLOSED, State.IDLE):
            fut = self._waiter(lambda e: isinstance(e, IkeSaDeleted))
            conn.delete(self.now())
            self._service()
            if conn.state is not State.CLOSED:
                with contextlib.suppress(asyncio.TimeoutError, IkeSessionError):
                    await asyncio.wait_for(fut, timeout)
            if conn.state is not State.CLOSED:
                conn.abort(self.now(), notify=False)
                self._service()
        self.installer.remove_all()

    def abort(self) -> None:
        """Give up the current connection now (a Delete goes out if the
        gateway may hold the SA). Its SAs go; its policies stay held (traffic
        they cover is dropped, not sent in the clear) until a new CHILD SA
        takes them over or :meth:`delete` removes everything."""
        conn = self.conn
        if conn is not None and conn.state is not State.CLOSED:
            conn.abort(self.now())
            self._service()

    def _require(self) -> IkeConnection:
        if self.conn is None or self.conn.state is not State.ESTABLISHED:
            raise IkeSessionError("no established IKE SA")
        return self.conn

    def _waiter(self, pred: Callable[[Event], bool]) -> asyncio.Future:
        fut = self._loop.create_future()
        self._waiters.append((pred, fut))
        return fut

    # ------------------------------------------------------------------ I/O

    def _readable(self, sock: socket.socket) -> None:
        self.last_rx = time.time()          # wall clock of the last read (handover step timing)
        for _ in range(64):
            try:
                data, anc, _flags, addr = sock.recvmsg(65535, socket.CMSG_SPACE(_PKTINFO.size))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._count("recv_errors")
                log.debug("%s: recvmsg: %s", self.name, e)
                break
            local_ip = None
            for level, kind, cdata in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(cdata) >= _PKTINFO.size:
                    local_ip = socket.inet_ntoa(_PKTINFO.unpack_from(cdata)[2])
            if local_ip is None:
                local_ip = sock.getsockname()[0]
            local = (local_ip, sock.getsockname()[1])
            conn = self.conn
            if conn is None:
                self._count("rx_without_sa")
                continue
            self._count("rx")
            conn.receive_datagram(data, (addr[0], addr[1]), local, self.now())
        self._service()

    def _send(self, data: bytes, local: tuple[str, int], remote: tuple[str, int]) -> None:
        sock = self.socks.get(local[1])
        if sock is None:
            self._count("tx_no_socket")
            return
        cmsg = [(socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(0, socket.inet_aton(local[0]), bytes(4)))]
        try:
            sock.sendmsg([data], cmsg, 0, (remote[0], remote[1]))
            self._count("tx")
        except OSError as e:
            # e.g. the address just went away (EINVAL) or no route yet: retransmission covers it
            self._count("tx_errors")
            if e.errno not in (errno.EINVAL, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
                log.warning("%s: send %s -> %s: %s", self.name, local, remote, e)
            else:
                log.debug("%s: send %s -> %s: %s", self.name, local, remote, e)

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    # ------------------------------------------------------------------ the loop

    def _service(self) -> None:
        """Send what the connection queued, act on its events, re-arm its timer."""
        conn = self.conn
        if conn is None or self._loop is None:
            return
        for _ in range(16):
            now = self.now()
            for data, local, remote in conn.datagrams_to_send(now):
                self._send(data, local, remote)
            ev = conn.next_event()
            if ev is None:
                break
            while ev is not None:
                self._on_event(conn, ev)
                ev = conn.next_event()
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn = self.conn
        t = conn.get_timer() if conn is not None else None
        if t is not None and self.socks:
            self._timer = self._loop.call_at(t, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        conn = self.conn
        if conn is not None:
            conn.handle_timer(self.now())
        self._service()

    def _on_event(self, conn: IkeConnection, ev: Event) -> None:
        ins = self.installer
        try:
            if isinstance(ev, ChildSaEstablished):
                ins.install(ev)
                if ev.tia is not None:
                    ins.set_tia(ev.tia)
            elif isinstance(ev, ChildSaDeleted):
                # lost with its IKE SA or deleted by the gateway: keep the policies, fail closed
                ins.remove(ev.child_id, hold=ev.by in ("ike", "peer"))
            elif isinstance(ev, MobikeStarted):
                # ESP follows IKE to the new address at once (same SPIs, encapsulation as it was)
                encap = _encap(conn)
                ins.move(ev.new_local[0], ev.remote[0], (ev.new_local[1], ev.remote[1]) if encap else None)
            elif isinstance(ev, AddressUpdated):
                ins.move(ev.local_addr[0], ev.remote_addr[0],
                         (ev.local_addr[1], ev.remote_addr[1]) if ev.encap else None)
            elif isinstance(ev, IkeSaDeleted):
                for cid in list(getattr(ins, "children", {})):
                    ins.remove(cid, hold=True)
        except InstallError as e:
            log.error("%s: %s", self.name, e)
            # the failure first: whoever waits for this exchange must see that the kernel refused it,
            # not a "CHILD SA established" it cannot use
            failed = InstallFailed(ev.time, str(e), type(ev).__name__)
            self._dispatch(failed)
            self._dispatch(ev)
            if conn.state is State.ESTABLISHED and isinstance(ev, (ChildSaEstablished, AddressUpdated,
                                                                   MobikeStarted)):
                conn.delete(self.now())         # an SA we cannot use: give it up cleanly
            return
        self._dispatch(ev)

    def _dispatch(self, ev: Event) -> None:
        self.events.append(ev)
        del self.events[:-50]
        for item in list(self._waiters):
            pred, fut = item
            if fut.done():
                self._waiters.remove(item)
            elif pred(ev):
                fut.set_result(ev)
                self._waiters.remove(item)
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:
                log.exception("%s: on_event callback failed", self.name)


@dataclass(frozen=True)
class InstallFailed(Event):
    """The kernel refused a change the state machine asked for (``during``:
    the name of the event being acted on); the IKE SA is deleted then."""

    reason: str
    during: str


def _encap(conn: IkeConnection) -> bool:
    return conn.path.natt and (conn.nat_local or conn.nat_remote)


def _reason(ev: Event | None) -> str:
    if ev is None:
        return "timed out"
    reason = getattr(ev, "reason", "") or type(ev).__name__
    if isinstance(ev, IkeSaDeleted):
        return f"IKE SA deleted ({ev.by}): {reason}"
    return reason

