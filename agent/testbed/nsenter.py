"""Enter a named network namespace from the calling thread, without a helper process.

``with netns("mmtb-1-gw"): ...`` switches the calling thread into
/run/netns/NAME and back. Inside, /proc/sys/net is that namespace's, and a
child started with subprocess inherits it (so a command costs one exec, not
an extra ``ip netns exec`` with its mount-namespace set-up, which matters
under an emulated CPU). Only the calling thread moves; other threads keep
their namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({what}): {os.strerror(err)}")


@contextlib.contextmanager
def netns(name: str):
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        os.close(own)
        raise OSError(f"network namespace {name} does not exist") from None
    try:
        _setns(target, name)
        try:
            yield
        finally:
            _setns(own, "back to the original namespace")
    finally:
        os.close(target)
        os.close(own)


def sysctl(name: str, values: dict[str, str]) -> None:
    """Write sysctls (``{"net.ipv4.ip_forward": "1"}``) inside namespace ``name``."""
    with netns(name):
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)
