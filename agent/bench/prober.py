"""A UDP traffic prober between two namespaces: when does traffic flow again after a move?

The sender (a socket made inside the mobile node's namespace, bound with
IP_FREEBIND to the source address, the home address or the VPN client's
virtual IP, whether or not that address exists at the moment) sends a
sequence number and its wall-clock send time every ``interval`` seconds to
the correspondent; the receiver (a socket made inside the correspondent's
namespace) records each arrival and echoes it back. Both run as threads of
the bench process: sockets keep the namespace they were made in, and both
ends read the same clock (one kernel), so one-way times are exact.

``first_after(t)``: the first packet sent at or after ``t`` that reached the
correspondent (its arrival time), and the last one that arrived before it
(the outage the correspondent saw).
"""

from __future__ import annotations

import bisect
import socket
import struct
import threading
import time

from agent.testbed.nsenter import netns

FMT = "!Id"        # sequence number, send time (time.time())
IP_FREEBIND = 15


class Prober:
    def __init__(self, src_ns: str, src: str, dst_ns: str, dst: str, port: int = 47001,
                 interval: float = 0.01) -> None:
        self.src, self.dst, self.port, self.interval = src, dst, port, interval
        with netns(dst_ns):
            self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.rx.bind((dst, port))
        self.rx.settimeout(0.2)
        with netns(src_ns):
            self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tx.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        self.tx.bind((src, 0))
        self.tx.settimeout(0.2)
        self.sent: list[float] = []               # send time of seq i
        self.arr_t: list[float] = []                # arrival times at the correspondent (in order)
        self.arr_seq: list[int] = []                # their sequence numbers
        self.echoed: list[tuple[float, int]] = []
        self.send_errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True, name=f"prober-{f.__name__}")
                         for f in (self._send, self._receive, self._echoes)]

    def start(self) -> "Prober":
        for t in self._threads:
            t.start()
        return self

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        self.tx.close()
        self.rx.close()

    def __enter__(self) -> "Prober":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- threads --------------------------------------------------------------------------
    def _send(self) -> None:
        seq = 0
        nxt = time.monotonic()
        while not self._stop.is_set():
            now = time.time()
            with self._lock:
                self.sent.append(now)
            try:
                self.tx.sendto(struct.pack(FMT, seq, now) + b"\0" * 32, (self.dst, self.port))
            except OSError:
                self.send_errors += 1        # no route, gate closed, address gone: expected during a move
            seq += 1
            nxt += self.interval
            delay = nxt - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                nxt = time.monotonic()       # fell behind (slow CPU): do not burst

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.rx.recvfrom(2048)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            t = time.time()
            if len(data) < 12:
                continue
            seq, _ = struct.unpack_from(FMT, data)
            with self._lock:
                self.arr_t.append(t)
                self.arr_seq.append(seq)
            try:
                self.rx.sendto(data, addr)
            except OSError:
                pass

    def _echoes(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.tx.recv(2048)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            t = time.time()
            if len(data) >= 12:
                seq, _ = struct.unpack_from(FMT, data)
                with self._lock:
                    self.echoed.append((t, seq))

    # -- queries ----------------------------------------------------------------------------
    def _first_seq_at(self, t: float) -> int:
        with self._lock:
            return bisect.bisect_left(self.sent, t)

    def first_after(self, t: float) -> dict | None:
        """The first packet sent at or after ``t`` that the correspondent received, or None."""
        with self._lock:
            seq0 = bisect.bisect_left(self.sent, t)
            i0 = bisect.bisect_left(self.arr_t, t)      # nothing sent at or after t arrived before t
            arr = list(zip(self.arr_t[i0:], self.arr_seq[i0:]))
            last_before = self.arr_t[i0 - 1] if i0 else None
            echoed = self.echoed[bisect.bisect_left(self.echoed, (t, -1)):]
        first = None
        for ta, s in arr:
            if s >= seq0:
                first = (ta, s)
                break
            last_before = ta                             # sent before t, still in flight at t
        if first is None:
            return None
        echo = next((te for te, s in echoed if s >= seq0), None)
        return {"t_delivered": first[0], "seq": first[1], "t_last_before": last_before, "t_echo": echo,
                "not_delivered_before": first[1] - seq0}

    def wait_first_after(self, t: float, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while True:
            r = self.first_after(t)
            if r is not None or time.monotonic() > deadline:
                return r
            time.sleep(0.02)

    def counts(self) -> dict:
        with self._lock:
            return {"sent": len(self.sent), "arrived": len(self.arr_t), "echoed": len(self.echoed),
                    "send_errors": self.send_errors}
