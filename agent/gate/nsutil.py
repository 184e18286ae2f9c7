"""Run a piece of kernel configuration inside a named network namespace.

The gate normally works in the namespace it runs in. Tests (and a testbed
that keeps several mobile nodes on one host) give it a namespace name instead:
each operation then switches the calling thread into that namespace with
setns(2) and back, so netlink sockets it opens and commands it starts
(iptables, ipset) act there. Mount namespaces are left alone, which keeps the
gate's bpffs visible (``ip netns exec`` would remount /sys and give the
command a private mount table).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(name: str) -> str:
    return name if name.startswith("/") else f"/run/netns/{name}"


@contextlib.contextmanager
def netns(name: str | None):
    """Switch this thread into namespace ``name`` (None: stay) for the block."""
    if not name:
        yield
        return
    target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)
