"""The i-FA daemon: the foreign agent engine wired to sockets, timers and the kernel.

Sockets:

* UDP 434 on the FA address and each care-of address (requests from
  visiting nodes, replies from home agents);
* a raw ICMP socket on the visited link: solicitations in (everything but
  type 10 filtered out in the kernel), advertisements out (TTL 1, multicast
  to 224.0.0.1 or unicast to a soliciting node);
* a packet socket on the visited link that sees only UDP to port 434: a
  visiting node sends from its home address, which is not on the link, so
  the FA learns the node's link-layer address from the frame carrying its
  request (RFC 5944 section 3.7.2.2).

Kernel state per visitor: delivery on the link (a host route for the home
address on the visited interface and a permanent neighbour entry with the
node's link-layer address), the tunnel from the care-of address to the
home agent (shared by the visitors of one home agent; its decapsulated
packets for the home address are accepted), and with reverse tunnelling a
policy rule sending what the node sends on the link into that tunnel.
Delivery exists from the node's first request on (replies, denials) and is
removed shortly after the node stops being a visitor or pending.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import socket
import struct
import time
from collections import Counter
from ipaddress import IPv4Address

from agent.control import ControlServer
from agent.ha.runtime import EngineTimer, UdpEndpoint
from agent.kernel.netlink import Kernel, KernelError
from agent.kernel.tunnels import Tunnel, make_backend
from agent.log import RateLimitedLog
from agent.mip.engine import IcmpPacket
from agent.mip.errors import MipDecodeError
from agent.mip.fa import ForeignAgent, Visitor, VisitorAdded, VisitorRemoved, VisitorUpdated
from agent.mip.icmp import split_ipv4

from .config import FaSettings

log = logging.getLogger("mipmobike.fa")

ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
SOL_RAW = 255
ICMP_FILTER = 1
IP_MULTICAST_ALL = 49
SO_ATTACH_FILTER = 26
DELIVERY_GRACE = 2.0  # seconds a delivery entry outlives its pending request / visitor
DROP_COUNTERS = {
    "malformed": "malformed datagram",
    "mn_auth_failed": "mobile node failed authentication",
    "ha_auth_failed": "home agent failed authentication",
    "unmatched_reply": "reply matching no pending request",
    "malformed_icmp": "malformed ICMP",
}

# classic BPF for the packet socket (SOCK_DGRAM: offsets from the IP header):
# IPv4 UDP, first fragment, destination port 434
_PORT_FILTER = [
    (0x30, 0, 0, 9),        # ldb [9]            protocol
    (0x15, 0, 6, 17),       # jeq #17 ? next : drop
    (0x28, 0, 0, 6),        # ldh [6]            flags + fragment offset
    (0x45, 4, 0, 0x1FFF),   # jset #0x1fff ? drop : next
    (0xB1, 0, 0, 0),        # ldxb 4*([0]&0xf)   header length
    (0x48, 0, 0, 2),        # ldh [x+2]          destination port
    (0x15, 0, 1, 434),      # jeq #434 ? accept : drop
    (0x06, 0, 0, 64),       # ret #64            accept (headers only)
    (0x06, 0, 0, 0),        # ret #0             drop
]


def _attach_filter(sock: socket.socket, port: int) -> None:
    prog = [(c, jt, jf, port if k == 434 else k) for c, jt, jf, k in _PORT_FILTER]
    buf = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    cbuf = ctypes.create_string_buffer(buf)
    fprog = struct.pack("HL", len(prog), ctypes.addressof(cbuf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies the program


class FaDaemon:
    role = "fa"

    def __init__(self, settings: FaSettings, *, clock=time.time):
        self.s = settings
        self.clock = clock
        self.engine = ForeignAgent(settings.engine)
        self.counters: Counter = Counter()
        self.rl = RateLimitedLog(log)
        self.started_at = None
        self.kernel: Kernel | None = None
        self.backend = None
        self.endpoint: UdpEndpoint | None = None
        self.timer: EngineTimer | None = None
        self.control: ControlServer | None = None
        self.icmp: socket.socket | None = None
        self.packet: socket.socket | None = None
        self.macs: dict[IPv4Address, tuple[str, float]] = {}
        self.delivery: dict[IPv4Address, str] = {}            # home address -> lladdr installed
        self.delivery_until: dict[IPv4Address, float] = {}    # for non-visitors
        self.tunnels: dict[IPv4Address, tuple[Tunnel, bool]] = {}  # home address -> (tunnel, reverse)
        self.kernel_errors = 0
        self._onlink: list = []
        self._sweep_handle = None
        self._sweep_at = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        s, dps = self.s, self.s.dataplane
        self.started_at = self.clock()
        self.kernel = Kernel("fa", protocol=dps.route_protocol)
        k = self.kernel
        self.ifindex = k.require_ifindex(s.interface)
        self.backend = make_backend(dps.backend, k, prefix=dps.device_prefix, mtu=dps.mtu,
                                    table_base=dps.table_base, rule_priority=dps.rule_priority,
                                    decap_interfaces=dps.decap_interfaces, max_entries=dps.max_entries)
        rec = self.backend.reconcile()
        if any(rec.values()):
            log.info("removed leftovers of an earlier run: %s", rec)
        k.set_sysctl("net/ipv4/ip_forward", 1)
        self.backend.open()
        self._onlink = [net for name, net, _ in k.addresses(s.interface)]
        addrs = [s.address, *s.engine.care_of_addresses]
        self.endpoint = UdpEndpoint(addrs, s.port, self._on_datagram)
        self._open_link_sockets()
        self.timer = EngineTimer(self.engine, self._on_timer, self.clock)
        self.engine.start(self.clock())
        self._pump()
        self.control = ControlServer(s.control_socket)
        self.control.register("status", self._status)
        await self.control.start()
        log.info("foreign agent %s on %s ready: care-of %s, %s data plane", s.address, s.interface,
                 ", ".join(map(str, s.engine.care_of_addresses)), self.backend.kind)

    def _open_link_sockets(self) -> None:
        s = self.s
        loop = asyncio.get_running_loop()
        icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                             socket.IPPROTO_ICMP)
        self.icmp = icmp
        icmp.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, s.interface.encode())
        icmp.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("I", 0xFFFFFFFF & ~(1 << 10)))
        icmp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        icmp.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
        icmp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        icmp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        mreqn = struct.pack("4s4si", b"\0" * 4, s.address.packed, self.ifindex)
        icmp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
        icmp.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        struct.pack("4s4si", IPv4Address("224.0.0.2").packed, s.address.packed, self.ifindex))
        # not bound to the FA address: a bound raw socket only receives packets
        # to that address, and solicitations go to 224.0.0.2 (or broadcast)
        loop.add_reader(icmp.fileno(), self._icmp_readable)
        pkt = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                            socket.htons(ETH_P_IP))
        self.packet = pkt
        _attach_filter(pkt, s.port)
        pkt.bind((s.interface, ETH_P_IP))
        loop.add_reader(pkt.fileno(), self._drain_packets)

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.close()
            self.control = None
        loop = asyncio.get_running_loop()
        for sock in (self.icmp, self.packet):
            if sock is not None:
                try:
                    loop.remove_reader(sock.fileno())
                except (ValueError, OSError):
                    pass
                sock.close()
        self.icmp = self.packet = None
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        if self.timer is not None:
            self.timer.cancel()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        if self.kernel is not None:
            for hoa in list(self.tunnels):
                self._drop_tunnel(hoa)
            for hoa in list(self.delivery):
                self._drop_delivery(hoa)
            if self.backend is not None:
                self.backend.close()
            self.kernel.close()
        log.info("foreign agent stopped; kernel state removed")

    # ------------------------------------------------------------------ input

    def _drain_packets(self) -> None:
        now = self.clock()
        for _ in range(256):
            try:
                data, addr = self.packet.recvfrom(128)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(addr) < 5 or addr[2] == PACKET_OUTGOING or len(data) < 20 or len(addr[4]) != 6:
                continue
            src = IPv4Address(data[12:16])
            self.macs[src] = (":".join(f"{b:02x}" for b in addr[4]), now)
        if len(self.macs) > 4096:  # bounded: forget the oldest half
            for ip, _ in sorted(self.macs.items(), key=lambda kv: kv[1][1])[:2048]:
                del self.macs[ip]

    def _on_link(self, addr: IPv4Address) -> bool:
        return any(addr in net for net in self._onlink)

    def _on_datagram(self, data: bytes, src: IPv4Address, sport: int, local: IPv4Address) -> None:
        now = self.clock()
        request = data[:1] == b"\x01"
        if request:
            self.counters["requests"] += 1
            if self.packet is not None:
                self._drain_packets()
        elif data[:1] == b"\x03":
            self.counters["replies_from_ha"] += 1
        eng = self.engine.counters
        before = {k: eng[k] for k in DROP_COUNTERS}
        relayed, denied = eng["requests_relayed"], eng["denied"]
        self.engine.receive_datagram(data, src, sport, local, now)
        for k, what in DROP_COUNTERS.items():
            if eng[k] != before[k]:
                self.rl.once(k, str(src), "%s from %s:%d (counted)", what, src, sport)
        if request and (eng["requests_relayed"] != relayed or eng["denied"] != denied):
            # only a request the engine took (relayed, or answered with a denial) earns a
            # delivery path to its off-link source, and never one that redirects our own
            # addresses or an existing visitor's home address to another link-layer address
            known = self.macs.get(src)
            if known is not None and not self._on_link(src) and now - known[1] < 10 \
                    and src not in self._own_addresses() \
                    and (src not in self.engine.visitors or self.delivery.get(src) in (None, known[0])):
                self._ensure_delivery(src, known[0], now + self.s.engine.pending_timeout + DELIVERY_GRACE)
        self._pump()

    def _own_addresses(self) -> set:
        e = self.s.engine
        return {self.s.address, *e.care_of_addresses, *(getattr(e, "allowed_home_agents", None) or ()),
                *getattr(e, "ha_sas", {}).keys()}

    def _icmp_readable(self) -> None:
        for _ in range(64):
            try:
                pkt, (host, _) = self.icmp.recvfrom(2048)
            except OSError:  # BlockingIOError: drained
                break
            try:
                src, _dst, _ttl, _proto, icmp = split_ipv4(pkt)
            except MipDecodeError as e:
                self.counters["malformed_icmp"] += 1
                self.rl.once("malformed_icmp", host, "malformed IPv4 header from %s: %s", host, e)
                continue
            self.engine.receive_icmp(icmp, src, self.clock())
        self._pump()

    def _on_timer(self) -> None:
        self.engine.handle_timer(self.clock())
        self._pump()

    # ------------------------------------------------------------------ output

    def _pump(self) -> None:
        later = []
        while (ev := self.engine.next_event()) is not None:
            if isinstance(ev, VisitorAdded):
                self._visitor(ev.visitor)
                log.info("visitor %s (home agent %s, care-of %s) added, lifetime %d s", ev.visitor.home_address,
                         ev.visitor.home_agent, ev.visitor.care_of_address, ev.visitor.lifetime)
            elif isinstance(ev, VisitorUpdated):
                self._visitor(ev.visitor)
            elif isinstance(ev, VisitorRemoved):
                v = ev.visitor
                self._drop_tunnel(v.home_address)
                later.append(v.home_address)
                log.info("visitor %s removed (%s)", v.home_address, ev.reason)
        for d in self.engine.datagrams_to_send():
            if isinstance(d, IcmpPacket):
                self._send_icmp(d)
                continue
            if d.data[:1] == b"\x03" and len(d.data) > 1:
                self.counters[f"replies_to_mn_{d.data[1]}"] += 1
            if self.endpoint is not None:
                self.endpoint.send(d)
        now = self.clock()
        for hoa in later:  # delivery outlives the relayed (de)registration reply a little
            if hoa not in self.engine.visitors:
                self.delivery_until[hoa] = now + DELIVERY_GRACE
        self._arm_sweep()
        if self.timer is not None:
            self.timer.rearm()

    def _send_icmp(self, p: IcmpPacket) -> None:
        if self.icmp is None:
            return
        dst = p.dst
        if not dst.is_multicast and dst != IPv4Address("255.255.255.255") and not self._on_link(dst):
            # a visiting node solicits from its home address, which is not on this
            # link: a unicast answer would be routed away, so multicast it
            dst = self.s.engine.advertisement_destination
        try:
            self.icmp.sendto(p.data, (str(dst), 0))
            self.counters["icmp_sent"] += 1
        except OSError as e:
            self.counters["icmp_send_errors"] += 1
            self.rl.once("icmp_send", str(p.dst), "sending an advertisement to %s: %s", p.dst, e)

    # ------------------------------------------------------------------ kernel state

    def _ensure_delivery(self, hoa: IPv4Address, mac: str, until: float | None) -> None:
        try:
            if self.delivery.get(hoa) != mac:
                self.kernel.add_neighbour(hoa, mac, self.s.interface)
                self.kernel.add_route(hoa, dev=self.s.interface, scope=253, src=self.s.address)
                self.delivery[hoa] = mac
        except KernelError as e:
            self.kernel_errors += 1
            log.error("delivery to %s on %s: %s", hoa, self.s.interface, e)
            return
        if until is None:
            self.delivery_until.pop(hoa, None)
        elif hoa not in self.engine.visitors:
            self.delivery_until[hoa] = max(until, self.delivery_until.get(hoa, 0))
        self._arm_sweep()

    def _drop_delivery(self, hoa: IPv4Address) -> None:
        self.delivery_until.pop(hoa, None)
        if self.delivery.pop(hoa, None) is None:
            return
        try:
            self.kernel.del_route(hoa, dev=self.s.interface)
            self.kernel.del_neighbour(hoa, self.s.interface)
        except KernelError as e:
            self.kernel_errors += 1
            log.error("removing delivery to %s: %s", hoa, e)

    def _arm_sweep(self) -> None:
        if not self.delivery_until:
            return
        at = min(self.delivery_until.values())
        if self._sweep_handle is not None:
            if self._sweep_at <= at:
                return
            self._sweep_handle.cancel()
        self._sweep_at = at
        self._sweep_handle = asyncio.get_running_loop().call_later(max(0.05, at - self.clock()), self._sweep)

    def _sweep(self) -> None:
        self._sweep_handle = None
        self._sweep_at = 0.0
        now = self.clock()
        for hoa, until in list(self.delivery_until.items()):
            if until <= now and hoa not in self.engine.visitors:
                self._drop_delivery(hoa)
        self._arm_sweep()

    def _visitor(self, v: Visitor) -> None:
        hoa = v.home_address
        mac = self.delivery.get(hoa) or (self.macs.get(v.mn_address) or (None,))[0]
        if mac is not None:
            self._ensure_delivery(hoa, mac, None)
        else:
            self.kernel_errors += 1
            log.error("visitor %s: its link-layer address is unknown; no delivery", hoa)
        self.delivery_until.pop(hoa, None)
        cur = self.tunnels.get(hoa)
        want = (v.care_of_address, v.home_agent, v.reverse_tunnel)
        if cur is not None and (cur[0].local, cur[0].remote, cur[1]) == want:
            return
        try:
            t = self.backend.tunnel(v.care_of_address, v.home_agent)
            self.backend.accept_for(t, hoa)
            if v.reverse_tunnel:
                self.backend.route_from(t, hoa, iif=self.s.interface)
        except (KernelError, OSError) as e:
            self.kernel_errors += 1
            log.error("tunnel for visitor %s: %s", hoa, e)
            return
        if cur is not None:
            self._drop_tunnel(hoa, cur)
        self.tunnels[hoa] = (t, v.reverse_tunnel)

    def _drop_tunnel(self, hoa: IPv4Address, entry=None) -> None:
        entry = entry or self.tunnels.get(hoa)
        if entry is None:
            return
        if self.tunnels.get(hoa) is entry:
            del self.tunnels[hoa]
        t, reverse = entry
        try:
            if reverse:
                self.backend.unroute_from(t, hoa, iif=self.s.interface)
            self.backend.unaccept_for(t, hoa)
            self.backend.release(t)
        except (KernelError, OSError) as e:
            self.kernel_errors += 1
            log.error("removing the tunnel of visitor %s: %s", hoa, e)

    # ------------------------------------------------------------------ status

    def _visitors_json(self) -> list[dict]:
        now = self.clock()
        out = []
        for v in sorted(self.engine.visitors.values(), key=lambda v: int(v.home_address)):
            t = self.tunnels.get(v.home_address)
            out.append({
                "home_address": str(v.home_address),
                "home_agent": str(v.home_agent),
                "care_of_address": str(v.care_of_address),
                "lladdr": self.delivery.get(v.home_address),
                "lifetime": v.lifetime,
                "remaining": None if v.expires_at is None else round(max(0.0, v.expires_at - now), 1),
                "reverse_tunnel": v.reverse_tunnel,
                "tunnel": t[0].ifname if t else None,
            })
        return out

    def _status(self, req: dict) -> dict:
        s, eng = self.s, self.engine.counters
        replies = {k.rsplit("_", 1)[1]: v for k, v in self.counters.items() if k.startswith("replies_to_mn_")}
        return {
            "role": "fa",
            "pid": os.getpid(),
            "address": str(s.address),
            "interface": s.interface,
            "care_of_addresses": [str(a) for a in s.engine.care_of_addresses],
            "uptime": round(self.clock() - self.started_at, 1) if self.started_at else 0,
            "dataplane": self.backend.kind if self.backend else None,
            "visitors": self._visitors_json(),
            "counters": {
                "requests": self.counters["requests"],
                "requests_relayed": eng["requests_relayed"],
                "replies_relayed": eng["replies_relayed"],
                "replies": sum(replies.values()),
                "replies_by_code": dict(sorted(replies.items())),
                "denied": eng["denied"],
                "auth_failures": eng["mn_auth_failed"] + eng["ha_auth_failed"],
                "malformed": eng["malformed"] + self.counters["malformed_icmp"],
                "registration_timeouts": eng["registration_timeouts"],
                "advertisements": eng["advertisements"],
                "icmp_sent": self.counters["icmp_sent"],
                "icmp_send_errors": self.counters["icmp_send_errors"],
                "solicitations": eng["solicitations"],
                "visitors": len(self.engine.visitors),
                "kernel_errors": self.kernel_errors,
                "engine": dict(eng),
            },
            "kernel": {"delivery": {str(h): m for h, m in self.delivery.items()},
                       "backend": self.backend.stats() if self.backend else {}},
        }
