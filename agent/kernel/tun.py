"""A TUN device (bare IPv4 packets, no packet-information header).

Used as a routing target without a netdevice per binding: the BPF backend
routes home addresses into one TUN device whose egress program encapsulates
them, and the RFC 3519 UDP tunnel plane reads the packets routed into its
TUN device and writes the decapsulated ones back. The device lives as long
as the file descriptor: a daemon that dies takes it along.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import subprocess

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_PACKET = 65535


TUN_PATH = "/dev/net/tun"
TUN_MAJOR, TUN_MINOR = 10, 200


def ensure_tun_node() -> None:
    """Make /dev/net/tun exist: load the module, or create the (misc 10:200) node.

    Minimal systems (a VM's initramfs, containers) may lack the node although
    the kernel has TUN.
    """
    if os.path.exists(TUN_PATH):
        return
    subprocess.run(["modprobe", "tun"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if os.path.exists(TUN_PATH):
        return
    os.makedirs(os.path.dirname(TUN_PATH), exist_ok=True)
    try:
        os.mknod(TUN_PATH, stat.S_IFCHR | 0o666, os.makedev(TUN_MAJOR, TUN_MINOR))
    except FileExistsError:
        pass


class TunDevice:
    """Create (open) TUN device ``name``; ``fileno()`` is non-blocking."""

    def __init__(self, name: str):
        if not 0 < len(name) <= 15:
            raise ValueError(f"interface name {name!r} must be 1..15 characters")
        ensure_tun_node()
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        except OSError:
            os.close(fd)
            raise
        self.name = ifr[:16].rstrip(b"\0").decode()
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def read(self) -> bytes | None:
        """One packet, or None when nothing is queued."""
        try:
            return os.read(self.fd, MAX_PACKET)
        except BlockingIOError:
            return None

    def write(self, packet: bytes) -> None:
        """Hand ``packet`` (an IPv4 packet) to the kernel as received on the device."""
        os.write(self.fd, packet)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
