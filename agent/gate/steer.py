"""RRQ steering: the detection Registration Request leaves in the clear.

While the VPN is up, its IPsec policies cover 0.0.0.0/0 (or the internal
prefixes, which contain the home agent). Link-trust detection (RFC 5265,
RFC 5266 section 3.4) still has to send a Registration Request straight to
the i-HA on the new physical link, with the new physical address as source,
and get the reply back on that path; ordinary traffic to the same home agent
must keep going into the VPN.

Why this mechanism, in this order of the packet's path:

1. XFRM. The policy lookup happens while the route for the packet is being
   resolved (ip_route_output_flow -> xfrm_lookup_route), before the hooks a
   BPF program can sit on for this: by the time a TC or cgroup-skb program
   sees the packet it is already ESP (or dropped for want of an SA), and we
   found no BPF mechanism that exempts a packet from a policy lookup (a mark
   set from BPF only helps if the VPN's policies were added with marks,
   which strongSwan's are not by default). What exempts exactly one socket
   is a per-socket policy: IP_XFRM_POLICY with action ALLOW in both
   directions (``xfrm.socket_bypass``). A socket policy is consulted instead
   of the global ones, so the RRQ is not transformed and the plain reply is
   accepted on input, while every other socket, including one sending to
   the same home agent, still hits the VPN's policy.
2. Routing. The VPN (and strongSwan's table 220) may route 0/0 with the
   virtual IP as preferred source or into a tunnel device. Binding the socket
   to the physical address and the device (SO_BINDTODEVICE) makes the route
   lookup use that device and that source, so the request leaves on the link
   under test with the CoA the home agent must see, and the reply, addressed
   to it, comes back the same way.
3. BPF. The trust gate on that device is closed while detecting. Its TC
   egress program admits UDP to a home agent's registration port only when
   the packet carries the detection mark (SO_MARK on this socket, set
   below; only a CAP_NET_ADMIN process can set it). So the closed gate lets
   through the agent's RRQ and nothing else addressed to the home agent in
   the clear. The XDP program admits the reply (source = home agent, source
   port = registration port); the per-socket IN policy then lets the kernel
   deliver it although it arrived unprotected.

The netfilter fallback gate enforces the same mark with ``-m mark``.
"""

from __future__ import annotations

import ipaddress
import socket

from .nsutil import netns as _netns

# "MM" + 0x0434 (port 434): the fwmark of detection packets
DETECT_MARK = 0x4D4D0434
DETECT_MASK = 0xFFFFFFFF
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)    # linux/in.h; not in Python 3.11


def open_detection_socket(ifname: str, local_addr: str, port: int = 0, *,
                          mark: int = DETECT_MARK, blocking: bool = False, freebind: bool = False,
                          netns: str | None = None) -> socket.socket:
    """A UDP socket for the detection RRQ on physical interface ``ifname``.

    Bound to ``local_addr`` (the new care-of address on that interface) and
    ``port`` (0: any), pinned to the device, exempt from IPsec policies in
    both directions, and marked so the closed gate passes its datagrams to
    the home agent. Needs CAP_NET_ADMIN. Send the RRQ with ``sendto`` to
    (home agent, 434); the reply arrives on this socket. ``freebind``: allow
    binding an address that is still tentative (IP_FREEBIND). ``netns``:
    create it in that named network namespace (as ``Gate(netns=...)``).

    A socket made elsewhere works too if it carries the same three settings:
    SO_BINDTODEVICE, ``xfrm.socket_bypass`` and SO_MARK = ``DETECT_MARK``
    (without the mark the closed gate drops the RRQ as "mip_nomark").
    """
    try:
        ipaddress.IPv4Address(local_addr)
    except ValueError:
        raise ValueError(f"detection socket: {local_addr!r} is not an IPv4 address") from None
    if not ifname or len(ifname) > 15:
        raise ValueError(f"detection socket: bad interface name {ifname!r}")
    # imported here: the gate itself must load even if the xfrm package cannot
    from xfrm.sockopt import socket_bypass

    with _netns(netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
        s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if freebind:
            s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        socket_bypass(s)
        s.bind((local_addr, port))
        s.setblocking(blocking)
    except BaseException:
        s.close()
        raise
    return s
