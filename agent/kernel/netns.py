"""Run a block of code inside a named network namespace (``ip netns`` names).

    with in_netns("mm-ha"):
        sock = socket.socket(...)      # the socket lives in mm-ha for good
        ipr = IPRoute()                # so does this netlink socket

Only the calling thread switches (setns(2) on /run/netns/NAME) and it
switches back on exit, so sockets and file descriptors opened inside keep
their namespace while the rest of the process is unaffected. Used by tests,
benchmarks and the testbed to drive several namespaces from one process.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(name: str) -> str:
    return name if name.startswith("/") else os.path.join(NETNS_RUN_DIR, name)


@contextmanager
def in_netns(name: str | None):
    """Switch this thread into network namespace ``name`` (None: stay)."""
    if name is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns_path(name), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)
