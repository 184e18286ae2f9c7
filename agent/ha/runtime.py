"""asyncio plumbing shared by the i-HA and i-FA daemons.

* :class:`UdpEndpoint`: one non-blocking UDP socket per local address on the
  Mobile IP port, read with ``loop.add_reader``; ``send(Datagram)`` picks the
  socket bound to the datagram's source address.
* :class:`EngineTimer`: keeps one asyncio timer armed at the engine's
  ``get_timer()`` deadline (engines use UNIX time, asyncio a monotonic
  clock).
* :func:`notify_ready`: systemd readiness (``NOTIFY_SOCKET``), if present.
* :func:`run_daemon`: the ``run(args)`` of ``mipmobike ha|fa``: load the
  configuration, set up logging, run until SIGTERM/SIGINT, clean up.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
from ipaddress import IPv4Address
from typing import Callable

from agent import config as cfgmod
from agent import log as logmod
from agent.mip.engine import Datagram

from agent.sdnotify import notify

log = logging.getLogger("mipmobike.daemon")

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


class UdpEndpoint:
    """UDP sockets on ``port`` bound to each of ``addresses``."""

    def __init__(self, addresses, port: int,
                 on_datagram: Callable[[bytes, IPv4Address, int, IPv4Address], None],
                 *, device: str | None = None):
        self.port = port
        self.on_datagram = on_datagram
        self.socks: dict[IPv4Address, socket.socket] = {}
        self._loop = asyncio.get_running_loop()
        try:
            for a in addresses:
                a = IPv4Address(str(a))
                if a in self.socks:
                    continue
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
                self.socks[a] = s
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
                if device:
                    s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, device.encode())
                s.bind((str(a), port))
                self._loop.add_reader(s.fileno(), self._readable, s, a)
        except OSError:
            self.close()
            raise

    def _readable(self, s: socket.socket, local: IPv4Address) -> None:
        for _ in range(64):  # bounded burst, then let other readers run
            try:
                data, (host, sport) = s.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # ICMP errors queued on the socket
                log.debug("recvfrom on %s: %s", local, e)
                continue
            try:
                self.on_datagram(data, IPv4Address(host), sport, local)
            except Exception:  # a bug handling one datagram must not stop the daemon
                log.exception("handling a datagram from %s:%d", host, sport)

    def sock_for(self, src: IPv4Address | None) -> socket.socket:
        if src is not None and src in self.socks:
            return self.socks[src]
        return next(iter(self.socks.values()))

    def send(self, d: Datagram) -> bool:
        try:
            self.sock_for(d.src).sendto(d.data, d.addr)
            return True
        except OSError as e:
            log.warning("send to %s:%d failed: %s", d.dst, d.port, e)
            return False

    def close(self) -> None:
        for s in self.socks.values():
            try:
                self._loop.remove_reader(s.fileno())
            except (ValueError, OSError):
                pass
            s.close()
        self.socks.clear()


class EngineTimer:
    """Arms ``callback`` at the engine's next deadline (UNIX time)."""

    def __init__(self, engine, callback: Callable[[], None], clock: Callable[[], float] = time.time):
        self.engine = engine
        self.callback = callback
        self.clock = clock
        self._handle: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._loop = asyncio.get_running_loop()

    def rearm(self) -> None:
        deadline = self.engine.get_timer()
        if deadline == self._deadline and self._handle is not None:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._deadline = deadline
        if deadline is not None:
            delay = max(0.0, deadline - self.clock())
            self._handle = self._loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._deadline = None
        self.callback()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def notify_ready(status: str = "") -> None:
    """Tell systemd (Type=notify) that the daemon is ready, if it is listening."""
    notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def run_daemon(role: str, load: Callable, make_daemon: Callable, config_path: str,
               log_level: str | None = None) -> int:
    """Load ``config_path``, run the daemon until SIGTERM/SIGINT; 0 on a clean exit."""
    try:
        settings = load(config_path)
    except cfgmod.ConfigError as e:
        print(f"mipmobike {role}: {config_path}: {e}", file=sys.stderr)
        return 1
    logmod.setup(log_level or settings.log_level)
    for noisy in ("pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    daemon = make_daemon(settings)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await daemon.start()
        except Exception as e:
            logging.getLogger(f"mipmobike.{role}").error("start failed: %s", e, exc_info=True)
            await daemon.stop()
            return 1
        notify_ready(f"{role} ready")
        await stop.wait()
        await daemon.stop()
        return 0

    return asyncio.run(main())
