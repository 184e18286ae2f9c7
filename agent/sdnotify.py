"""systemd's notification protocol (``Type=notify`` units): one datagram to ``$NOTIFY_SOCKET``.

A no-op outside systemd; a failure to send is logged at debug level and
never stops a daemon.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("mipmobike.sdnotify")


def notify(state: str) -> None:
    """Send ``state`` (e.g. "READY=1", "STOPPING=1", "STATUS=...", newline-separated)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]          # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
    except OSError as e:
        log.debug("sd_notify: %s", e)
