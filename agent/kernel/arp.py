"""Gratuitous ARP (RFC 5944 section 4.6) from an AF_PACKET socket.

A home agent that starts answering ARP for a mobile node's home address
(proxy ARP) announces it, so that hosts on the home link drop the node's own
link-layer address from their caches; after a deregistration it announces
the node's own address again. The announcement is an ARP request whose
sender and target protocol addresses are both the announced address,
broadcast (RFC 5227's "ARP announcement" form, which every stack accepts).
"""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address

ETH_P_ARP = 0x0806
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
BROADCAST = b"\xff" * 6


def mac_bytes(mac: str | bytes) -> bytes:
    if isinstance(mac, bytes):
        if len(mac) != 6:
            raise ValueError(f"link-layer address must be 6 bytes, got {len(mac)}")
        return mac
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def arp_frame(op: int, sender_mac: bytes, sender_ip: IPv4Address, target_mac: bytes,
              target_ip: IPv4Address, dst_mac: bytes = BROADCAST) -> bytes:
    """An Ethernet frame carrying one IPv4-over-Ethernet ARP message."""
    eth = dst_mac + sender_mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, sender_mac, sender_ip.packed,
                      target_mac, target_ip.packed)
    return eth + arp


def send_gratuitous_arp(ifname: str, address, mac: str | bytes, *, count: int = 1,
                        reply: bool = False) -> None:
    """Broadcast ``count`` announcements that ``address`` is at ``mac`` on ``ifname``.

    ``reply`` sends the ARP-reply form instead of the request form.
    """
    ip = IPv4Address(str(address))
    hw = mac_bytes(mac)
    if reply:
        frame = arp_frame(ARPOP_REPLY, hw, ip, BROADCAST, ip)
    else:
        frame = arp_frame(ARPOP_REQUEST, hw, ip, b"\x00" * 6, ip)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
        s.bind((ifname, ETH_P_ARP))
        for _ in range(count):
            s.send(frame)
