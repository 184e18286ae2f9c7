"""The NETLINK_XFRM request channel.

The kernel handles an XFRM request inside the ``send()`` that carries it:
by the time ``send()`` returns, the answer (an ACK, an error, a reply or the
first part of a dump) is queued on the socket, and the rest of a dump is
produced as it is read. So a request is a send and a few receives that never
wait, and the same channel serves synchronous and asyncio code without an
event loop in between. Messages are pyroute2 ``nlmsg`` classes
(:mod:`xfrm.messages`); the socket is opened inside a network namespace by
pyroute2's :func:`pyroute2.netns.create_socket`.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
import threading
from typing import List, Optional

from pyroute2 import netns as pr_netns

from .messages import MESSAGE_CLASSES

NETLINK_XFRM = 6
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100          # in an error message
NLM_F_ACK_TLVS = 0x200        # in an error message
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSGERR_ATTR_MSG = 1

_HDR = struct.Struct("=IHHII")


class KernelError(Exception):
    """A negative acknowledgement: ``code`` (positive errno), ``text`` (extack)."""

    def __init__(self, code: int, text: Optional[str]):
        super().__init__(code, text)
        self.code, self.text = code, text


def open_socket(netns: Optional[str]) -> socket.socket:
    """A NETLINK_XFRM socket in ``netns`` (name or path; None: ours).
    Raises FileNotFoundError when the namespace does not exist."""
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    if "/" in netns:                  # a path (/run/netns/x, /proc/PID/ns/net): by fd
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return pr_netns.create_socket(fd, socket.AF_NETLINK, socket.SOCK_RAW,
                                          NETLINK_XFRM, flags=0)
        finally:
            os.close(fd)
    return pr_netns.create_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM,
                                  flags=0)


def _error_text(data, off: int, length: int, flags: int) -> Optional[str]:
    """The NLMSGERR_ATTR_MSG of an extended ACK, if any."""
    if not flags & NLM_F_ACK_TLVS:
        return None
    pos = off + 16 + 4
    if flags & NLM_F_CAPPED:
        pos += 16
    else:
        pos += (_HDR.unpack_from(data, pos)[0] + 3) & ~3
    end = off + length
    while pos + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, pos)
        if alen < 4:
            break
        if atype & 0x3FFF == NLMSGERR_ATTR_MSG:
            return bytes(data[pos + 4:pos + alen]).split(b"\0", 1)[0].decode(errors="replace")
        pos += (alen + 3) & ~3
    return None


class XfrmChannel:
    """Request/response on one NETLINK_XFRM socket (thread-safe)."""

    def __init__(self, netns: Optional[str] = None, *, timeout: float = 10.0):
        self.netns = netns
        sock = open_socket(netns)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            sock.bind((0, 0))
            sock.settimeout(timeout)          # a safety net: answers are already queued
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._seq = itertools.count(int.from_bytes(os.urandom(2), "little") + 1)
        self._lock = threading.Lock()
        self._buf = bytearray(1 << 18)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, msg, msg_type: int, flags: int) -> List:
        """Send ``msg`` as ``msg_type`` with ``flags``; return the decoded
        replies (empty for a plain ACK). Raises :class:`KernelError`."""
        if self.sock is None:
            raise OSError(errno.EBADF, "XFRM channel is closed")
        with self._lock:
            seq = next(self._seq) & 0xFFFFFFFF
            hdr = msg["header"]
            hdr["type"], hdr["flags"] = int(msg_type), flags
            hdr["sequence_number"], hdr["pid"] = seq, 0
            msg.encode()
            self.sock.send(msg.data)
            dump = (flags & NLM_F_DUMP) == NLM_F_DUMP
            out = []
            while True:
                n = self.sock.recv_into(self._buf)
                data = memoryview(self._buf)[:n]
                off = 0
                while off + 16 <= n:
                    length, mtype, mflags, mseq, _ = _HDR.unpack_from(data, off)
                    if length < 16 or off + length > n:
                        break
                    if mseq != seq:                     # a stale answer: skip it
                        off += (length + 3) & ~3
                        continue
                    if mtype == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, off + 16)[0]
                        if code:
                            raise KernelError(code, _error_text(data, off, length, mflags))
                        return out                       # ACK
                    if mtype == NLMSG_DONE:
                        return out
                    cls = MESSAGE_CLASSES.get(mtype)
                    if cls is not None:
                        m = cls(bytes(data[off:off + length]))
                        m.decode()
                        out.append(m)
                    if not dump and not mflags & NLM_F_MULTI and not flags & NLM_F_ACK:
                        return out
                    off += (length + 3) & ~3
