"""Traffic that must survive every handover: a UDP echo and a TCP stream, home address <-> correspondent.

    flow = Flow(mn_ns, cn_ns, hoa="10.1.0.100", cn="10.1.0.10")
    flow.start_server()              # echo server and TCP sink in the correspondent's namespace
    flow.start_client()              # once the home address is reachable (raises FlowError if not)
    ...moves...
    flow.wait_recovered(after=t, timeout=30)
    s = flow.window(t0, t1)          # probes sent in [t0, t1): sent, answered, lost, outage
    flow.stop(); flow.summary()

Everything runs in this process: each socket is made inside its namespace
(``agent.testbed.nsenter.netns`` switches only the calling thread), then two
threads serve them, so no Python start is paid (it costs seconds under TCG).

* UDP echo: a sequence-numbered probe every ``1/rate`` s from the home
  address to the correspondent, which sends it back; each probe's send and
  answer times are kept, so losses and outages can be counted per handover.
* TCP: one connection from the home address to the correspondent that keeps
  writing ``chunk`` bytes ``tcp_rate`` times a second (never more than
  ``max_inflight`` unacknowledged), the correspondent counting what arrives.
  The stream "died" if the socket reports an error (reset, timeout) or the
  correspondent did not receive every byte written by the end.

The correspondent records every source address it saw (UDP and TCP), so a
caller can check that the peer was the home address throughout.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import ipaddress
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from agent.testbed.nsenter import netns

SIOCOUTQ = 0x5411                  # TIOCOUTQ: bytes in the send queue not yet acknowledged
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
MAGIC = b"MMP1"
PROBE = struct.Struct("!4sId")     # magic, sequence, send time


class FlowError(RuntimeError):
    """The flow could not be started or lost its connection; the message says why."""


@dataclass
class Window:
    sent: int = 0
    answered: int = 0
    lost: int = 0                      # not answered although a later probe was
    outage: float | None = None        # longest gap between answered probes across the window (s)
    tcp_bytes: int = 0                 # bytes the correspondent received in the window

    def as_dict(self) -> dict:
        return {"sent": self.sent, "answered": self.answered, "lost": self.lost,
                "outage": None if self.outage is None else round(self.outage, 3), "tcp_bytes": self.tcp_bytes}


@dataclass
class _Server:
    udp_sources: set = field(default_factory=set)
    tcp_peers: list = field(default_factory=list)
    rx: list = field(default_factory=list)          # (time, total bytes) after each read
    total: int = 0
    closed: int = 0                                 # TCP connections the peer closed or reset


class Flow:
    def __init__(self, mn_ns: str, cn_ns: str, hoa: str, cn: str, *, udp_port: int = 7007, tcp_port: int = 7008,
                 rate: float = 20.0, tcp_rate: float = 20.0, chunk: int = 512, max_inflight: int = 32768) -> None:
        self.mn_ns, self.cn_ns = mn_ns, cn_ns
        self.hoa, self.cn = str(ipaddress.IPv4Address(hoa)), str(ipaddress.IPv4Address(cn))
        self.udp_port, self.tcp_port = udp_port, tcp_port
        self.rate, self.tcp_rate, self.chunk, self.max_inflight = rate, tcp_rate, chunk, max_inflight
        self.lock = threading.Lock()
        self.server = _Server()
        self.sent: list[float] = []                  # send time per sequence number
        self.answered: dict[int, float] = {}         # sequence -> time the echo came back
        self.send_errors = 0
        self.tcp_written = 0
        self.tcp_error: str | None = None
        self.tcp_local: tuple[str, int] | None = None
        self.started_at: float | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._srv_socks: list[socket.socket] = []
        self._cli_udp: socket.socket | None = None
        self._cli_tcp: socket.socket | None = None

    # -- correspondent side ---------------------------------------------------------------------
    def start_server(self) -> None:
        with netns(self.cn_ns):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            for s in (u, t):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            u.bind((self.cn, self.udp_port))
            t.bind((self.cn, self.tcp_port))
            t.listen(4)
        except OSError as e:
            u.close()
            t.close()
            raise FlowError(f"correspondent {self.cn}: cannot listen on UDP {self.udp_port} / TCP {self.tcp_port}: "
                            f"{e}") from None
        self._srv_socks = [u, t]
        th = threading.Thread(target=self._serve, args=(u, t), name="flow-server", daemon=True)
        th.start()
        self._threads.append(th)

    def _serve(self, u: socket.socket, t: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(u, selectors.EVENT_READ, "udp")
        sel.register(t, selectors.EVENT_READ, "listen")
        srv = self.server
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.2):
                    s = key.fileobj
                    if key.data == "udp":
                        for _ in range(64):
                            try:
                                data, addr = s.recvfrom(2048)
                            except (BlockingIOError, InterruptedError):
                                break
                            except OSError:
                                break
                            with self.lock:
                                srv.udp_sources.add(addr[0])
                            try:
                                s.sendto(data, addr)
                            except OSError:
                                pass
                    elif key.data == "listen":
                        try:
                            c, addr = s.accept()
                        except OSError:
                            continue
                        c.setblocking(False)
                        with self.lock:
                            srv.tcp_peers.append(addr)
                        self._srv_socks.append(c)
                        sel.register(c, selectors.EVENT_READ, "conn")
                    else:
                        try:
                            data = s.recv(65536)
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError:
                            data = b""
                        if not data:
                            sel.unregister(s)
                            with self.lock:
                                srv.closed += 1
                            continue
                        with self.lock:
                            srv.total += len(data)
                            srv.rx.append((time.time(), srv.total))
        finally:
            sel.close()

    # -- mobile node side -----------------------------------------------------------------------
    def start_client(self, connect_timeout: float = 20.0) -> None:
        """Open the TCP connection from the home address and start both streams."""
        with netns(self.mn_ns):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._cli_udp, self._cli_tcp = u, t
        try:
            u.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            u.bind((self.hoa, 0))
            t.bind((self.hoa, 0))
            t.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            deadline = time.monotonic() + connect_timeout
            while True:
                t.settimeout(max(0.5, min(5.0, deadline - time.monotonic())))
                try:
                    t.connect((self.cn, self.tcp_port))
                    break
                except OSError as e:
                    if time.monotonic() >= deadline:
                        raise FlowError(f"no TCP connection {self.hoa} -> {self.cn}:{self.tcp_port} within "
                                        f"{connect_timeout:.0f} s: {e}") from None
                    if e.errno in (errno.ECONNREFUSED, errno.ECONNABORTED, errno.EINVAL):
                        t.close()
                        with netns(self.mn_ns):
                            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                        self._cli_tcp = t
                        t.bind((self.hoa, 0))
                    time.sleep(0.3)
            t.setblocking(False)
            self.tcp_local = t.getsockname()
        except OSError as e:
            raise FlowError(f"mobile node: cannot use the home address {self.hoa}: {e}") from None
        self.started_at = time.time()
        th = threading.Thread(target=self._client, name="flow-client", daemon=True)
        th.start()
        self._threads.append(th)

    def _client(self) -> None:
        u, t = self._cli_udp, self._cli_tcp
        sel = selectors.DefaultSelector()
        sel.register(u, selectors.EVENT_READ, "udp")
        sel.register(t, selectors.EVENT_READ, "tcp")
        payload = bytes(self.chunk)
        next_probe = next_write = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_probe:
                    seq = len(self.sent)
                    wall = time.time()
                    with self.lock:
                        self.sent.append(wall)
                    try:
                        u.sendto(PROBE.pack(MAGIC, seq, wall), (self.cn, self.udp_port))
                    except OSError:
                        self.send_errors += 1
                    next_probe += 1.0 / self.rate
                    if next_probe < now:                       # fell behind (a stall): do not burst
                        next_probe = now + 1.0 / self.rate
                if now >= next_write and self.tcp_error is None:
                    next_write = max(next_write + 1.0 / self.tcp_rate, now)
                    self._write_tcp(t, payload)
                timeout = max(0.0, min(next_probe, next_write) - time.monotonic())
                for key, _ in sel.select(timeout):
                    if key.data == "udp":
                        self._read_echoes(u)
                    else:
                        self._read_tcp(t, sel)
        finally:
            sel.close()

    def _write_tcp(self, t: socket.socket, payload: bytes) -> None:
        try:
            outq = struct.unpack("i", fcntl.ioctl(t.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
            if outq + len(payload) > self.max_inflight:
                return
            n = t.send(payload)
            with self.lock:
                self.tcp_written += n
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            # EHOSTUNREACH/ENETUNREACH/EADDRNOTAVAIL while the address moves are passing states;
            # a reset, a timeout or a broken pipe end the connection
            if e.errno in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE, errno.ENOTCONN):
                self.tcp_error = f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"

    def _read_tcp(self, t: socket.socket, sel: selectors.BaseSelector) -> None:
        try:
            data = t.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                return                                        # an ICMP error, not the end of the stream
            self.tcp_error = f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
            sel.unregister(t)
            return
        if not data:
            self.tcp_error = "the correspondent closed the connection"
            sel.unregister(t)

    def _read_echoes(self, u: socket.socket) -> None:
        for _ in range(64):
            try:
                data, addr = u.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(data) < PROBE.size or addr[0] != self.cn:
                continue
            magic, seq, _ = PROBE.unpack_from(data)
            if magic == MAGIC and seq < len(self.sent):
                with self.lock:
                    self.answered.setdefault(seq, time.time())

    # -- results ----------------------------------------------------------------------------------
    def window(self, t0: float, t1: float | None = None) -> Window:
        """Probes sent in [t0, t1) and what became of them; TCP bytes received in the window."""
        with self.lock:
            sent = list(self.sent)
            answered = dict(self.answered)
            rx = list(self.server.rx)
        t1 = time.time() if t1 is None else t1
        lo, hi = bisect.bisect_left(sent, t0), bisect.bisect_left(sent, t1)
        w = Window(sent=hi - lo)
        w.answered = sum(1 for s in range(lo, hi) if s in answered)
        # a probe sent after the newest answered one may still be on its way: pending, not lost
        newest = max(answered, default=-1)
        w.lost = sum(1 for s in range(lo, min(hi, newest + 1)) if s not in answered)
        # the longest time between two probes that got through, from the last one before the window
        # to the first one at or after its end
        ok = [sent[s] for s in range(lo, hi) if s in answered]
        prev = next((sent[s] for s in range(lo - 1, max(-1, lo - 400), -1) if s in answered), None)
        nxt = next((sent[s] for s in range(hi, len(sent)) if s in answered), None)
        seq = ([prev] if prev is not None else []) + ok + ([nxt] if nxt is not None else [])
        if prev is not None and len(seq) >= 2:
            w.outage = max(b - a for a, b in zip(seq, seq[1:]))
        w.tcp_bytes = _bytes_at(rx, t1) - _bytes_at(rx, t0)
        return w

    def first_echo(self, after: float) -> float | None:
        """When the first echo came back for a probe sent after ``after`` (None: none yet)."""
        with self.lock:
            sent = list(self.sent)
            answered = dict(self.answered)
        lo = bisect.bisect_left(sent, after)
        return min((answered[s] for s in range(lo, len(sent)) if s in answered), default=None)

    def recovered(self, after: float) -> tuple[float, float] | None:
        """(time of the first echo answered for a probe sent after ``after``, time the correspondent
        first received TCP data after it), or None while either is missing."""
        udp = self.first_echo(after)
        with self.lock:
            rx = list(self.server.rx)
        i = bisect.bisect_right([t for t, _ in rx], after)
        tcp = rx[i][0] if i < len(rx) else None
        return (udp, tcp) if udp is not None and tcp is not None else None

    def wait_recovered(self, after: float, timeout: float) -> tuple[float, float] | None:
        deadline = time.monotonic() + timeout
        while True:
            r = self.recovered(after)
            if r is not None or self.tcp_error is not None or time.monotonic() >= deadline:
                return r
            time.sleep(0.1)

    def drain(self, timeout: float = 30.0) -> bool:
        """Stop writing and wait until the correspondent has every byte written (True if so)."""
        self.tcp_rate = 1e-9
        time.sleep(1.0 / max(self.rate, 1))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.server.total >= self.tcp_written:
                    return True
            if self.tcp_error is not None:
                return False
            time.sleep(0.1)
        return False

    def alive(self) -> bool:
        return self.tcp_error is None and self.server.closed == 0

    def summary(self) -> dict:
        with self.lock:
            n = len(self.sent)
            return {
                "udp_sent": n, "udp_answered": len(self.answered), "udp_lost": n - len(self.answered),
                "udp_send_errors": self.send_errors, "udp_sources": sorted(self.server.udp_sources),
                "tcp_local": list(self.tcp_local) if self.tcp_local else None,
                "tcp_peers": [f"{a}:{p}" for a, p in self.server.tcp_peers],
                "tcp_written": self.tcp_written, "tcp_received": self.server.total, "tcp_error": self.tcp_error,
                "tcp_closed_by_peer": self.server.closed,
            }

    def stop(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(5)
        self._threads.clear()
        for s in [self._cli_udp, self._cli_tcp, *self._srv_socks]:
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        self._srv_socks = []
        self._cli_udp = self._cli_tcp = None

    def __enter__(self) -> "Flow":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _bytes_at(rx: list[tuple[float, int]], t: float) -> int:
    i = bisect.bisect_right([x for x, _ in rx], t)
    return rx[i - 1][1] if i else 0
