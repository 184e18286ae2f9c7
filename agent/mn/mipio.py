"""asyncio adapter for the Mobile IPv4 mobile-node engine.

The engine (``agent.mip.mn.MobileNode``) is pure; this adapter owns its
sockets and timer. Registration requests leave from the source address the
engine names (``Datagram.src``): the care-of address on the access link for
a co-located registration (the detection request among them), the home
address for a registration through a foreign agent, the VPN tunnel inner
address in mode mc. How a source address is reached is set per address with
``set_path``: the access interface to pin the socket to and whether the
socket bypasses IPsec policies (the detection request must not enter the
VPN). Sockets are made by a factory so the gate's steering helper can supply
the detection socket.

Agent advertisements are read from a raw ICMP socket per access interface
and fed to the engine; ``solicit`` sends an Agent Solicitation there.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable

from agent.mip.engine import Datagram, IcmpPacket
from agent.mip.mn import MobileNode

log = logging.getLogger("mipmobike.mn.mip")

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)    # linux/in.h; not in Python 3.11


@dataclass(frozen=True)
class Path:
    src: ipaddress.IPv4Address
    ifname: str | None
    bypass: bool


def default_socket_factory(path: Path) -> socket.socket:
    """A UDP socket bound to ``path.src`` (any port), pinned to its interface.

    A bypass path gets the gate's detection socket: IPsec-bypassed both ways and
    marked, so a closed gate lets exactly this request (and its reply) through.
    """
    if path.bypass:
        from agent.gate import open_detection_socket
        return open_detection_socket(path.ifname, str(path.src), freebind=True)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if path.ifname:
            s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, path.ifname.encode())
        s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)   # the address may still be tentative
        s.bind((str(path.src), 0))
    except OSError:
        s.close()
        raise
    return s


class MipIo:
    """Drive a ``MobileNode``: ``on_event`` gets every engine event, in order."""

    def __init__(self, engine: MobileNode, on_event: Callable[[object], None],
                 socket_factory: Callable[[Path], socket.socket] = default_socket_factory) -> None:
        self.engine = engine
        self.on_event = on_event
        self.socket_factory = socket_factory
        self.loop = asyncio.get_running_loop()
        self.paths: dict[ipaddress.IPv4Address, Path] = {}
        self.socks: dict[ipaddress.IPv4Address, socket.socket] = {}
        self.icmp: dict[str, socket.socket] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.send_errors = 0

    # the engine keeps wall-clock time (timestamps are NTP); the loop's clock is monotonic
    @staticmethod
    def now() -> float:
        return time.time()

    # -- paths and sockets -------------------------------------------------------------------
    def set_path(self, src, ifname: str | None, bypass: bool) -> None:
        src = ipaddress.IPv4Address(src)
        p = Path(src, ifname, bypass)
        if self.paths.get(src) != p:
            self._close_sock(src)
            self.paths[src] = p

    def drop_path(self, src) -> None:
        src = ipaddress.IPv4Address(src)
        self.paths.pop(src, None)
        self._close_sock(src)

    def _close_sock(self, src) -> None:
        s = self.socks.pop(src, None)
        if s is not None:
            self.loop.remove_reader(s.fileno())
            s.close()

    def _sock(self, src) -> socket.socket:
        s = self.socks.get(src)
        if s is None:
            path = self.paths.get(src) or Path(src, None, False)
            s = self.socket_factory(path)
            self.socks[src] = s
            self.loop.add_reader(s.fileno(), self._readable, s)
        return s

    def _readable(self, s: socket.socket) -> None:
        while True:
            try:
                data, (ip, port) = s.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:      # e.g. ICMP port unreachable reported on the socket
                log.debug("registration socket: %s", e)
                break
            local = s.getsockname()[0]
            self.engine.receive_datagram(data, ip, port, local, self.now())
        self.flush()

    # -- agent discovery ---------------------------------------------------------------------
    def listen_adverts(self, ifname: str) -> None:
        if ifname in self.icmp:
            return
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                          socket.IPPROTO_ICMP)
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
        try:
            idx = socket.if_nametoindex(ifname)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, struct.pack("=4s4si", b"\0" * 4, b"\0" * 4, idx))
        except OSError:
            pass
        self.icmp[ifname] = s
        self.loop.add_reader(s.fileno(), self._icmp_readable, s)

    def stop_adverts(self, ifname: str) -> None:
        s = self.icmp.pop(ifname, None)
        if s is not None:
            self.loop.remove_reader(s.fileno())
            s.close()

    def _icmp_readable(self, s: socket.socket) -> None:
        while True:
            try:
                pkt, (ip, _) = s.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if len(pkt) < 20:
                continue
            ihl = (pkt[0] & 0x0F) * 4
            if len(pkt) > ihl and pkt[ihl] == 9:          # router advertisements only
                self.engine.receive_icmp(pkt[ihl:], ip, self.now())
        self.flush()

    def solicit(self, ifname: str) -> None:
        if self.engine.solicit(self.now()):
            self._flush_out(solicit_if=ifname)
        self.flush()

    # -- commands ----------------------------------------------------------------------------
    def register(self, care_of_address, *, foreign_agent=None, lifetime: int | None = None) -> None:
        self.engine.register(self.now(), care_of_address, foreign_agent=foreign_agent, lifetime=lifetime)
        self.flush()

    def deregister(self, care_of_address=None, *, foreign_agent=None) -> None:
        self.engine.deregister(self.now(), care_of_address, foreign_agent=foreign_agent)
        self.flush()

    def cancel(self) -> None:
        self.engine.cancel()
        self.flush()

    # -- output, timers, events -------------------------------------------------------------
    def _flush_out(self, solicit_if: str | None = None) -> None:
        for item in self.engine.datagrams_to_send():
            if isinstance(item, Datagram):
                src = item.src or next(iter(self.paths), None)
                try:
                    self._sock(src).sendto(item.data, item.addr)
                except OSError as e:
                    self.send_errors += 1
                    log.info("registration request from %s to %s not sent: %s", src, item.dst, e.strerror or e)
            elif isinstance(item, IcmpPacket):
                targets = [solicit_if] if solicit_if else list(self.icmp)
                for ifname in targets:
                    s = self.icmp.get(ifname)
                    if s is not None:
                        try:
                            s.sendto(item.data, (str(item.dst), 0))
                        except OSError as e:
                            log.debug("solicitation on %s not sent: %s", ifname, e)

    def flush(self) -> None:
        self._flush_out()
        while (ev := self.engine.next_event()) is not None:
            self.on_event(ev)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.engine.get_timer()
        if deadline is not None:
            delay = max(0.0, deadline - self.now())
            self._timer = self.loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.engine.handle_timer(self.now())
        self.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for src in list(self.socks):
            self._close_sock(src)
        for ifname in list(self.icmp):
            self.stop_adverts(ifname)
