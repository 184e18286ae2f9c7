"""RFC 3519 UDP tunnelling for the home agent, in userspace through a TUN device.

Why userspace: the tunnel shares the UDP port-434 flow with the
registration signalling (the NAT's mapping is the mobile node's
registration source address and port, which the engine keeps per binding),
so the home agent's socket and engine are already where the packets arrive,
and the traffic of nodes behind a NAT is modest. A TUN device gives the
kernel a routing target: the home address of each UDP-tunnelled binding is
routed into it, the daemon reads those packets and sends them to the node in
type-4 tunnel data messages (``HomeAgent.send_tunnel_data``); inner packets
the node sends (type 4, next header 4) are checked (IPv4, source = the
binding's home address) and written to the device, from which the kernel
forwards them like any received packet. Keepalives need nothing extra: the
node's ICMP echo to the home agent comes out of the tunnel, the kernel
answers, and the answer is routed back into the device. No ipip or fou
module is involved, so this runs on any kernel with TUN.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from ipaddress import IPv4Address
from typing import Callable

from agent.kernel.netlink import Kernel
from agent.kernel.tun import TunDevice
from agent.mip.constants import ENCAP_IPIP

log = logging.getLogger("mipmobike.ha.udptunnel")

UDP_OVERHEAD = 20 + 8 + 4  # outer IPv4, UDP, tunnel data header


class UdpTunnelPlane:
    def __init__(self, kernel: Kernel, name: str, send: Callable[[IPv4Address, bytes], bool],
                 *, mtu: int = 1500 - UDP_OVERHEAD):
        self.kernel = kernel
        self.name = name
        self.send = send
        self.counters: Counter = Counter()
        kernel.delete_link(name)  # a persistent leftover of the same name
        with kernel.inside():
            self.tun = TunDevice(name)
        try:
            kernel.set_link(name, up=True, tag=True, mtu=mtu)
            kernel.set_sysctl(f"net/ipv4/conf/{name}/forwarding", 1)
            kernel.set_sysctl(f"net/ipv4/conf/{name}/rp_filter", 0)
        except Exception:
            self.tun.close()
            raise
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.tun.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(64):
            pkt = self.tun.read()
            if pkt is None:
                return
            if len(pkt) < 20 or pkt[0] >> 4 != 4:
                self.counters["to_node_not_ipv4"] += 1
                continue
            dst = IPv4Address(pkt[16:20])
            if self.send(dst, pkt):
                self.counters["to_node"] += 1
            else:
                self.counters["to_node_no_binding"] += 1

    def deliver(self, home_address: IPv4Address, next_header: int, payload: bytes) -> bool:
        """An inner packet from a node's tunnel: forward it if it is what it claims."""
        if next_header != ENCAP_IPIP:
            self.counters["from_node_bad_next_header"] += 1
            return False
        if len(payload) < 20 or payload[0] >> 4 != 4 or (payload[0] & 0xF) < 5:
            self.counters["from_node_not_ipv4"] += 1
            return False
        if IPv4Address(payload[12:16]) != home_address:
            self.counters["from_node_spoofed"] += 1
            return False
        try:
            self.tun.write(payload)
        except OSError as e:
            self.counters["from_node_write_error"] += 1
            log.debug("tun write: %s", e)
            return False
        self.counters["from_node"] += 1
        return True

    def close(self) -> None:
        try:
            self._loop.remove_reader(self.tun.fileno())
        except (ValueError, OSError):
            pass
        self.tun.close()
        self.kernel.forget(self.name)
