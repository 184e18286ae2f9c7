"""Logging for the daemons: stderr in a form journald understands.

Each line starts with a syslog priority prefix (``<3>`` error ... ``<7>``
debug), which systemd-journald turns into the entry's priority when the unit's
output goes to the journal; on a terminal it is still readable. ``once()``
logs a message the first time a key is seen, and afterwards only counts it
(at most once per ``interval`` seconds per key), which is what malformed or
unauthenticated packets get: counted, logged once, dropped.
"""

from __future__ import annotations

import logging
import sys
import time

_PRIO = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return f"<{_PRIO.get(record.levelno, 6)}>{record.name}: {msg}"


def setup(level: str | int = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else level.upper())


class RateLimitedLog:
    """Log each (kind, source) once per ``interval`` seconds; count every occurrence."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0, clock=time.monotonic) -> None:
        self.logger, self.interval, self.clock = logger, interval, clock
        self._last: dict[tuple, float] = {}
        self.suppressed: dict[tuple, int] = {}

    def once(self, kind: str, source: object, msg: str, *args, level: int = logging.WARNING) -> bool:
        key = (kind, source)
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return False
        if len(self._last) >= 4096:          # bounded memory under a flood from many sources
            self._last.clear()
        self._last[key] = now
        extra = self.suppressed.pop(key, 0)
        self.logger.log(level, msg + (f" (+{extra} more since last report)" if extra else ""), *args)
        return True
