"""Per-socket IPsec settings an IKE or detection socket needs.

``socket_bypass`` installs a per-socket XFRM policy with action ALLOW in both
directions (``IP_XFRM_POLICY``), so packets of this socket are neither matched
by global policies (a VPN's 0.0.0.0/0 included) nor required to arrive
protected. ``socket_espinudp`` turns on RFC 3948 decapsulation of ESP-in-UDP
on a UDP socket (``UDP_ENCAP``). Both need CAP_NET_ADMIN.
"""

from __future__ import annotations

import socket
import struct

IP_XFRM_POLICY = 17          # linux/in.h; Python's socket module has no name for it
IPV6_XFRM_POLICY = 35        # linux/in6.h
UDP_ENCAP = 100              # linux/udp.h
UDP_ENCAP_ESPINUDP = 2

XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_ALLOW = 0

# struct xfrm_userpolicy_info (x86_64 layout, 168 bytes):
#   xfrm_selector sel         56 bytes: daddr(16) saddr(16) dport sport(be16, masks)
#                             family(u16) prefixlen_d prefixlen_s proto(u8) ifindex(i32) user(u32)
#   xfrm_lifetime_cfg lft     64 bytes (8 x u64)
#   xfrm_lifetime_cur curlft  32 bytes (4 x u64)
#   u32 priority, u32 index, u8 dir, u8 action, u8 flags, u8 share  (+ 4 pad)
_SELECTOR = struct.Struct("=16s16sHHHHHBBBxxxiI")
_USERPOLICY_TAIL = struct.Struct("=8Q4QIIBBBB4x")
assert _SELECTOR.size == 56 and _SELECTOR.size + _USERPOLICY_TAIL.size == 168


def _allow_policy(family: int, direction: int) -> bytes:
    sel = _SELECTOR.pack(b"", b"", 0, 0, 0, 0, family, 0, 0, 0, 0, 0)
    inf = 0xFFFFFFFFFFFFFFFF
    tail = _USERPOLICY_TAIL.pack(inf, inf, inf, inf, 0, 0, 0, 0, 0, 0, 0, 0,
                                 0, 0, direction, XFRM_POLICY_ALLOW, 0, 0)
    return sel + tail


def socket_bypass(sock: socket.socket) -> None:
    """Exempt ``sock`` from every global IPsec policy, inbound and outbound."""
    if sock.family == socket.AF_INET:
        level, opt = socket.IPPROTO_IP, IP_XFRM_POLICY
    elif sock.family == socket.AF_INET6:
        level, opt = socket.IPPROTO_IPV6, IPV6_XFRM_POLICY
    else:
        raise ValueError(f"IPsec bypass needs an AF_INET/AF_INET6 socket, not {sock.family!r}")
    for direction in (XFRM_POLICY_IN, XFRM_POLICY_OUT):
        sock.setsockopt(level, opt, _allow_policy(sock.family, direction))


def socket_espinudp(sock: socket.socket) -> None:
    """Let the kernel take ESP-in-UDP (RFC 3948) packets arriving on ``sock``."""
    sock.setsockopt(socket.IPPROTO_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
