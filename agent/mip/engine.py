"""What the three engines share: outputs, the event queue, counters.

Every engine follows the same sans-I/O contract (aioquic's QuicConnection is
the model):

* input: ``receive_datagram(data, src, src_port, dst, now)`` for UDP port 434
  (plus ``receive_icmp(...)`` on the agents that do discovery), and
  ``handle_timer(now)`` when the deadline from ``get_timer()`` has passed;
* output: ``datagrams_to_send()`` drains what to send (:class:`Datagram` for
  UDP, :class:`IcmpPacket` for agent discovery), ``next_event()`` pops typed
  events (dataclasses) one at a time, ``get_timer()`` gives the next deadline
  (or None);
* ``now`` is always the caller's clock in UNIX seconds (``time.time()``):
  identifications are NTP timestamps derived from it, and timer deadlines
  are on the same scale;
* ``counters`` is a plain dict of event counts (malformed, auth failures,
  replies, ...). Bad input never raises out of an engine: it is counted,
  logged once per reason, and dropped.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass
from ipaddress import IPv4Address

from .constants import MIP_PORT


@dataclass(frozen=True)
class Datagram:
    """A UDP datagram to send: payload ``data`` to (``dst``, ``port``).

    ``src`` is the local address it must leave from when that matters
    (None: any). ``src_port`` is the local port (434 for agents).
    """

    dst: IPv4Address
    port: int
    data: bytes
    src: IPv4Address | None = None
    src_port: int = MIP_PORT

    @property
    def addr(self) -> tuple[str, int]:
        """(host, port), ready for ``transport.sendto(data, addr)``."""
        return str(self.dst), self.port


@dataclass(frozen=True)
class IcmpPacket:
    """An ICMP message (agent advertisement or solicitation) to send.

    ``data`` is the ICMP message with its checksum; the IP header is the
    sender's job, with TTL ``ttl`` (1 for agent discovery) and source ``src``.
    """

    dst: IPv4Address
    data: bytes
    ttl: int = 1
    src: IPv4Address | None = None


class EngineBase:
    """Output queue, event queue, counters and log-once for the engines."""

    _log = logging.getLogger("agent.mip")

    def __init__(self) -> None:
        self._out: list = []
        self._events: deque = deque()
        self.counters: Counter = Counter()
        self._logged: set = set()

    def datagrams_to_send(self) -> list:
        """Return and forget everything queued for sending, in order."""
        out, self._out = self._out, []
        return out

    def next_event(self):
        """Pop the oldest pending event, or None."""
        return self._events.popleft() if self._events else None

    def _event(self, ev) -> None:
        self._events.append(ev)

    def _drop(self, reason: str, detail: str = "") -> None:
        """Count a dropped input; log the first one of each reason."""
        self.counters[reason] += 1
        if reason not in self._logged:
            self._logged.add(reason)
            self._log.warning("%s: dropped input (%s)%s%s", type(self).__name__, reason,
                              ": " if detail else "", detail)
