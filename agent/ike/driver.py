"""A minimal blocking UDP driver for an IkeConnection (tests, tools).

The daemon uses its own asyncio adapter; this one owns two UDP sockets (IKE
port and NAT-T port on the connection's local address), moves datagrams and
timer ticks between them and the connection, and can record a trace that
:func:`write_pcap` turns into a capture file for tshark.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time
from typing import Callable

from agent.inet import checksum

from .const import IKE_PORT, NATT_PORT
from .events import Event

Address = tuple[str, int]


def udp_socket(ip: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    return s


class BlockingDriver:
    def __init__(self, conn, *, ports: tuple[int, int] = (IKE_PORT, NATT_PORT),
                 socket_factory: Callable[[str, int], socket.socket] = udp_socket,
                 clock: Callable[[], float] = time.monotonic, trace: list | None = None,
                 rx_filter: Callable[[bytes, Address, Address], list[bytes]] | None = None):
        """``rx_filter(data, src, dst)`` may replace a received datagram by
        any number of datagrams (tests: tampering, replays)."""
        self.conn = conn
        self.rx_filter = rx_filter
        self.clock = clock
        self.trace = trace
        ip = conn.path.local[0]
        self.socks: dict[int, socket.socket] = {}
        try:
            for p in ports:
                self.socks[p] = socket_factory(ip, p)
        except BaseException:
            self.close()
            raise
        self.events: list[Event] = []

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def flush(self) -> None:
        now = self.clock()
        for data, local, remote in self.conn.datagrams_to_send(now):
            sock = self.socks.get(local[1])
            if sock is None:
                raise RuntimeError(f"no socket for local port {local[1]}")
            sock.sendto(data, remote)
            if self.trace is not None:
                self.trace.append((time.time(), local, tuple(remote), data))

    def step(self, max_wait: float) -> None:
        """Send what is queued, wait for one datagram or the timer (at most
        ``max_wait`` s), feed it in."""
        self.flush()
        now = self.clock()
        t = self.conn.get_timer()
        wait = max_wait if t is None else max(0.0, min(max_wait, t - now))
        ready, _, _ = select.select(list(self.socks.values()), [], [], wait)
        now = self.clock()
        for sock in ready:
            data, addr = sock.recvfrom(65535)
            local = sock.getsockname()[:2]
            if self.trace is not None:
                self.trace.append((time.time(), tuple(addr[:2]), tuple(local), data))
            feed = [data] if self.rx_filter is None else self.rx_filter(data, tuple(addr[:2]), tuple(local))
            for d in feed:
                self.conn.receive_datagram(d, tuple(addr[:2]), tuple(local), now)
        t = self.conn.get_timer()
        if t is not None and self.clock() >= t:
            self.conn.handle_timer(self.clock())
        while (ev := self.conn.next_event()) is not None:
            self.events.append(ev)
        self.flush()

    def run_until(self, predicate: Callable[[Event], bool], timeout: float) -> Event | None:
        """Run until an event satisfies ``predicate`` (returned) or timeout (None)."""
        deadline = self.clock() + timeout
        seen = len(self.events)
        while True:
            for ev in self.events[seen:]:
                if predicate(ev):
                    return ev
            seen = len(self.events)
            left = deadline - self.clock()
            if left <= 0:
                return None
            self.step(min(left, 0.2))

    def run_for(self, seconds: float) -> None:
        deadline = self.clock() + seconds
        while (left := deadline - self.clock()) > 0:
            self.step(min(left, 0.2))


def write_pcap(path: str, trace: list) -> None:
    """Write a trace of (time, src, dst, udp payload) as a raw-IPv4 pcap."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))  # LINKTYPE_RAW
        for ts, src, dst, data in trace:
            udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(data), 0) + data
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                             ipaddress.IPv4Address(src[0]).packed, ipaddress.IPv4Address(dst[0]).packed)
            csum = checksum(ip)
            ip = ip[:10] + struct.pack("!H", csum) + ip[12:]
            pkt = ip + udp
            sec = int(ts)
            f.write(struct.pack("<IIII", sec, int((ts - sec) * 1e6), len(pkt), len(pkt)) + pkt)
