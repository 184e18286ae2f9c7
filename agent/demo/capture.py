"""What the mobile node sent on its access link, and whether it was detection traffic.

    cap = LinkCapture(tb, path).start()    # tcpdump on the switch side of the node's link
    ...moves...
    cap.stop()
    frames = cap.frames()                  # [(time, bytes)], read without scapy (slow to import under TCG)
    bad = leaks(frames, t0, t1, DetectionPeers(...))

Only frames the node sent are recorded (the switch port's ingress): what the
network sends towards the node is not under its control. While the gate is
closed the node may send only detection traffic (RFC 5266 section 3.4):

* ARP; DHCP (UDP 67/68);
* ICMP router discovery (agent solicitation, type 10; advertisements, type 9);
* Mobile IPv4 signalling (UDP 434) with the home agent or a foreign agent
  (also to the limited broadcast and the all-mobility-agents group);
* IKE (UDP 500, 4500 with its ESP-in-UDP) and ESP with the VPN gateway.

``leaks()`` returns every other frame in the window, described.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ALL_MOBILITY_AGENTS = ipaddress.IPv4Address("224.0.0.11")
ALL_SYSTEMS = ipaddress.IPv4Address("224.0.0.1")
ALL_ROUTERS = ipaddress.IPv4Address("224.0.0.2")
BROADCAST = ipaddress.IPv4Address("255.255.255.255")


@dataclass
class DetectionPeers:
    mobility_agents: set = field(default_factory=set)    # home agent(s), foreign agent(s)
    gateways: set = field(default_factory=set)           # VPN gateway(s)

    def __post_init__(self):
        self.mobility_agents = {ipaddress.IPv4Address(a) for a in self.mobility_agents}
        self.gateways = {ipaddress.IPv4Address(a) for a in self.gateways}


class LinkCapture:
    """tcpdump on (namespace, interface), frames that interface received (= what the node sent)."""

    def __init__(self, ns: str, ifname: str, path: str | Path, direction: str = "in") -> None:
        self.ns, self.ifname, self.path = ns, ifname, Path(path)
        self.direction = direction
        self.proc: subprocess.Popen | None = None
        self._err = self.path.with_suffix(".stderr")

    def start(self, timeout: float = 30.0) -> "LinkCapture":
        argv = ["ip", "netns", "exec", self.ns, "tcpdump", "-i", self.ifname, "-n", "-U", "--immediate-mode",
                "-Z", "root", "-s", "256", "-Q", self.direction, "-w", str(self.path)]
        with open(self._err, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while b"listening on" not in self._err.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                msg = self._err.read_text(errors="replace").strip()
                self.stop()
                raise RuntimeError(f"tcpdump on {self.ns}/{self.ifname} did not start: {msg}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        time.sleep(0.1)                       # what is in flight reaches the file
        try:
            os.killpg(p.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def frames(self) -> list[tuple[float, bytes]]:
        return read_pcap(self.path)

    def __enter__(self) -> "LinkCapture":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def read_pcap(path: str | Path) -> list[tuple[float, bytes]]:
    """(timestamp, frame) from a classic pcap file (what ``tcpdump -w`` writes); a cut last record is dropped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a pcap file (magic {magic.hex()})")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    if linktype != 1:
        raise ValueError(f"{path}: link type {linktype}, want Ethernet (1)")
    rec = struct.Struct(endian + "IIII")
    out, off = [], 24
    while off + rec.size <= len(data):
        sec, frac, incl, _orig = rec.unpack_from(data, off)
        off += rec.size
        if off + incl > len(data):
            break
        out.append((sec + frac / (1e9 if nano else 1e6), data[off:off + incl]))
        off += incl
    return out


def describe(frame: bytes) -> tuple[str, str]:
    """(kind, text): kind is "arp", "dhcp", "router-discovery", "mip", "ike", "esp", "ipv4" or "other"."""
    if len(frame) < 14:
        return "other", "runt frame"
    etype = struct.unpack_from("!H", frame, 12)[0]
    off = 14
    while etype == 0x8100 and len(frame) >= off + 4:     # VLAN tags (not used here, but harmless)
        etype = struct.unpack_from("!H", frame, off + 2)[0]
        off += 4
    if etype == 0x0806:
        return "arp", "ARP"
    if etype != 0x0800 or len(frame) < off + 20:
        return "other", f"ethertype 0x{etype:04x}"
    ip = frame[off:]
    ihl = (ip[0] & 0x0F) * 4
    proto = ip[9]
    src, dst = ipaddress.IPv4Address(ip[12:16]), ipaddress.IPv4Address(ip[16:20])
    l4 = ip[ihl:]
    if proto == socket.IPPROTO_UDP and len(l4) >= 8:
        sp, dp = struct.unpack_from("!HH", l4)
        return "udp", f"UDP {src}:{sp} > {dst}:{dp}"
    if proto == socket.IPPROTO_TCP and len(l4) >= 4:
        sp, dp = struct.unpack_from("!HH", l4)
        return "tcp", f"TCP {src}:{sp} > {dst}:{dp}"
    if proto == socket.IPPROTO_ICMP and len(l4) >= 2:
        return "icmp", f"ICMP type {l4[0]} code {l4[1]} {src} > {dst}"
    if proto == 50:
        return "esp", f"ESP {src} > {dst}"
    if proto == 4:
        return "ipip", f"IP-in-IP {src} > {dst}"
    return "ipv4", f"IPv4 protocol {proto} {src} > {dst}"


def detection_kind(frame: bytes, peers: DetectionPeers) -> str | None:
    """What kind of detection traffic the frame is ("arp", "dhcp", "router-discovery", "mip", "ike",
    "esp"), or None when it is anything else."""
    if len(frame) < 14:
        return None
    etype = struct.unpack_from("!H", frame, 12)[0]
    if etype == 0x0806:
        return "arp"
    if etype != 0x0800 or len(frame) < 34:
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    proto = ip[9]
    dst = ipaddress.IPv4Address(ip[16:20])
    l4 = ip[ihl:]
    if proto == socket.IPPROTO_UDP and len(l4) >= 8:
        sp, dp = struct.unpack_from("!HH", l4)
        if (sp, dp) == (68, 67):
            return "dhcp"
        if dp == 434 and (dst in peers.mobility_agents or dst in (BROADCAST, ALL_MOBILITY_AGENTS)):
            return "mip"
        if dp in (500, 4500) and dst in peers.gateways:
            return "ike"
        return None
    if proto == socket.IPPROTO_ICMP and len(l4) >= 1:
        if l4[0] in (9, 10):
            return "router-discovery"
        return None
    if proto == 50 and dst in peers.gateways:
        return "esp"
    return None


def leaks(frames: list[tuple[float, bytes]], t0: float, t1: float, peers: DetectionPeers) -> list[str]:
    """Every frame sent in [t0, t1) that is not detection traffic, described with its time."""
    out = []
    for ts, fr in frames:
        if t0 <= ts < t1 and detection_kind(fr, peers) is None:
            out.append(f"{ts:.3f} {describe(fr)[1]}")
    return out


def kinds(frames: list[tuple[float, bytes]], t0: float, t1: float, peers: DetectionPeers) -> dict[str, int]:
    """Counts of detection traffic by kind in [t0, t1) ("other" for the rest)."""
    out: dict[str, int] = {}
    for ts, fr in frames:
        if t0 <= ts < t1:
            k = detection_kind(fr, peers) or "other"
            out[k] = out.get(k, 0) + 1
    return out
