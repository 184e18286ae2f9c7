"""Shared helpers for the i-HA / i-FA tests (netns and kernel tiers); one smoke test.

* :class:`MnStandIn`: a mobile node stand-in: the real MN engine
  (agent.mip.mn) with a UDP socket opened inside the node's namespace,
  driven synchronously (``register`` waits for the engine's event).
* :func:`write_key`, :func:`ha_toml`, :func:`fa_toml`: configuration files.
* :func:`start_daemon`: ``mipmobike ha|fa`` through the ``procs`` fixture,
  ready once its control socket answers; :func:`status` asks it.
* :func:`icmp_echo`: a raw IPv4 ICMP echo request (for UDP-tunnel data).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

from agent.control import ControlError, request
from agent.kernel.netns import in_netns
from agent.mip import MnConfig, MobileNode, SecurityAssociation
from agent.mip.mn import Denied, Deregistered, Registered, TimedOut
from tests.lib.procs import wait_until

KEY_HEX = "00112233445566778899aabbccddeeff"
KEY = bytes.fromhex(KEY_HEX)
FA_HA_KEY_HEX = "f0e1d2c3b4a5968778695a4b3c2d1e0f"


def write_key(path: Path, hexkey: str = KEY_HEX) -> Path:
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(hexkey + "\n")
    os.chmod(path, 0o600)
    return path


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _table(name: str, d: dict) -> str:
    lines = [f"[{name}]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in d.items() if v is not None]
    return "\n".join(lines) + "\n"


def ha_toml(path: Path, *, ha: dict, nodes: list[dict], dataplane: dict | None = None,
            foreign_agents: list[dict] | None = None) -> Path:
    text = _table("ha", ha)
    if dataplane:
        text += _table("ha.dataplane", dataplane)
    for n in nodes:
        text += "[[ha.nodes]]\n" + _table("", n).split("\n", 1)[1]
    for f in foreign_agents or []:
        text += "[[ha.foreign_agents]]\n" + _table("", f).split("\n", 1)[1]
    Path(path).write_text(text)
    return Path(path)


def fa_toml(path: Path, *, fa: dict, dataplane: dict | None = None,
            home_agents: list[dict] | None = None, nodes: list[dict] | None = None) -> Path:
    text = _table("fa", fa)
    if dataplane:
        text += _table("fa.dataplane", dataplane)
    for h in home_agents or []:
        text += "[[fa.home_agents]]\n" + _table("", h).split("\n", 1)[1]
    for n in nodes or []:
        text += "[[fa.nodes]]\n" + _table("", n).split("\n", 1)[1]
    Path(path).write_text(text)
    return Path(path)


def status(sock: str, cmd: str = "status") -> dict:
    return request(str(sock), cmd, timeout=10)


def start_daemon(procs, role: str, config: Path, ns, sock: str, timeout: float = 60, wait: bool = True):
    """Start ``mipmobike ROLE --config CONFIG`` in ``ns``; return once ``sock`` answers
    (``wait=False``: at once; then :func:`wait_ready`)."""
    p = procs.start(f"{role}-{ns.name}", [sys.executable, "-m", "agent.cli", role, "--config", str(config),
                                           "--log-level", "DEBUG"], ns=ns.name,
                    cwd=str(Path(__file__).resolve().parents[2]))
    if wait:
        wait_ready(p, sock, timeout)
    return p


def wait_ready(p, sock: str, timeout: float = 60):
    def ready():
        try:
            return status(sock)
        except (ControlError, OSError):
            return None

    wait_until(ready, timeout, f"{p.name} control socket {sock}", interval=0.1, proc=p)
    return p


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def icmp_echo(src, dst, ident: int = 0x4242, seq: int = 1, payload: bytes = b"mipmobike" * 4,
              reply: bool = False) -> bytes:
    icmp = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0,
                      IPv4Address(str(src)).packed, IPv4Address(str(dst)).packed)
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + icmp


def parse_icmp(pkt: bytes) -> dict | None:
    if len(pkt) < 28 or pkt[0] >> 4 != 4 or pkt[9] != 1:
        return None
    ihl = (pkt[0] & 0xF) * 4
    t, code, _, ident, seq = struct.unpack_from("!BBHHH", pkt, ihl)
    return {"src": IPv4Address(pkt[12:16]), "dst": IPv4Address(pkt[16:20]), "type": t, "id": ident, "seq": seq}


class MnStandIn:
    """The MN engine with a UDP socket in namespace ``ns`` (bound to ``bind``:port)."""

    def __init__(self, ns: str, *, home_address, home_agent, spi: int = 256, key: bytes = KEY,
                 bind=None, port: int = 0, device: str | None = None, **cfg):
        cfg.setdefault("initial_timeout", 0.5)
        cfg.setdefault("max_retransmissions", 3)
        self.sa = SecurityAssociation(spi, key, **cfg.pop("sa_kw", {}))
        self.ns = ns
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
        if device:
            self.sock.setsockopt(socket.SOL_SOCKET, 25, device.encode())
        self.sock.bind((str(bind or "0.0.0.0"), port))
        self.port = self.sock.getsockname()[1]
        self.engine = MobileNode(MnConfig(home_address=home_address, home_agent=home_agent, sa=self.sa,
                                          src_port=self.port, **cfg))
        self.events: list = []
        self.tunnel_packets: list = []

    def close(self) -> None:
        self.sock.close()

    def _flush(self) -> None:
        for d in self.engine.datagrams_to_send():
            if hasattr(d, "port"):
                self.sock.sendto(d.data, d.addr)

    def pump(self, until, timeout: float = 10.0):
        """Run the engine until ``until(event)`` is true for an event; return it (None on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            self._flush()
            while (ev := self.engine.next_event()) is not None:
                self.events.append(ev)
                if type(ev).__name__ == "MnTunnelPacket":
                    self.tunnel_packets.append(ev)
                if until(ev):
                    return ev
            now = time.monotonic()
            if now >= deadline:
                return None
            wait = deadline - now
            t = self.engine.get_timer()
            if t is not None:
                wait = min(wait, max(0.0, t - time.time()))
            r, _, _ = select.select([self.sock], [], [], wait)
            if r:
                data, (host, sport) = self.sock.recvfrom(65535)
                self.engine.receive_datagram(data, host, sport, None, time.time())
            else:
                self.engine.handle_timer(time.time())

    def register(self, care_of_address, *, foreign_agent=None, lifetime=None, timeout: float = 10.0):
        """Register; returns Registered, Denied or TimedOut (or None)."""
        self.engine.register(time.time(), care_of_address, foreign_agent=foreign_agent, lifetime=lifetime)
        return self.pump(lambda ev: isinstance(ev, (Registered, Denied, TimedOut)), timeout)

    def deregister(self, care_of_address=None, *, foreign_agent=None, timeout: float = 10.0):
        self.engine.deregister(time.time(), care_of_address, foreign_agent=foreign_agent)
        return self.pump(lambda ev: isinstance(ev, (Deregistered, Denied, TimedOut)), timeout)

    def tunnel_roundtrip(self, packet: bytes, match, timeout: float = 5.0):
        """Send ``packet`` in the RFC 3519 tunnel; wait for a tunnelled packet ``match``es."""
        assert self.engine.send_tunnel_data(packet), "no UDP-tunnel binding"
        return self.pump(lambda ev: type(ev).__name__ == "MnTunnelPacket" and match(ev.payload), timeout)


def test_support_icmp_echo_is_well_formed():
    pkt = icmp_echo("10.1.0.100", "10.1.0.10", seq=7)
    assert checksum(pkt[:20]) == 0 and checksum(pkt[20:]) == 0
    assert parse_icmp(pkt) == {"src": IPv4Address("10.1.0.100"), "dst": IPv4Address("10.1.0.10"),
                               "type": 8, "id": 0x4242, "seq": 7}


# --------------------------------------------------------------------------- the lab

HA_HOME, HA_UP, RT_UP = "10.1.0.2", "10.2.0.2", "10.2.0.1"
CN = "10.1.0.10"
HOA, HOA2, HOA3 = "10.1.0.100", "10.1.0.101", "10.1.0.102"
TRUSTED_COA, TRUSTED_GW = "10.30.0.10", "10.30.0.1"
UNTRUSTED_COA, UNTRUSTED_GW = "192.0.2.10", "192.0.2.1"
NAT_PRIVATE, NAT_INSIDE, NAT_OUTSIDE, NAT_GW = "172.16.0.10", "172.16.0.1", "203.0.113.2", "203.0.113.1"
FA_ADDR, FA_UP, FA_GW = "10.40.0.1", "10.50.0.2", "10.50.0.1"
TRUSTED_PREFIXES = ["10.30.0.0/16", "10.40.0.0/16"]


class Lab:
    """home link (HA 10.1.0.2, CN 10.1.0.10) -- HA -- 10.2.0.0/24 -- rt -- visited networks:

    * ``mn``: co-located node with CoAs 10.30.0.10 (trusted) and 192.0.2.10 (untrusted);
    * ``nat``/``mnn`` (nat=True): a node at 172.16.0.10 behind a MASQUERADE to 203.0.113.2;
    * ``fa``/``mnf`` (fa=True): a foreign agent 10.40.0.1 (uplink 10.50.0.2) and a node
      on its link that has only its home address.
    """

    def __init__(self, topology, *, nat: bool = False, fa: bool = False, mn: bool = True):
        t = self.topo = topology
        self.ha = t.ns("ha", forward=True)
        self.cn = t.ns("cn")
        self.rt = t.ns("rt", forward=True)
        self.ha_home, self.cn_if = t.link(self.ha, self.cn, f"{HA_HOME}/24", f"{CN}/24")
        self.ha_up, self.rt_ha = t.link(self.ha, self.rt, f"{HA_UP}/24", f"{RT_UP}/24")
        self.cn.route("default", "via", HA_HOME)
        self.ha.route("default", "via", RT_UP)
        self.rt.route("10.1.0.0/24", "via", HA_UP)
        if mn:
            self.mn = t.ns("mn")
            self.rt_trusted, self.mn_trusted = t.link(self.rt, self.mn, f"{TRUSTED_GW}/24", f"{TRUSTED_COA}/24")
            self.rt_untrusted, self.mn_untrusted = t.link(self.rt, self.mn, f"{UNTRUSTED_GW}/24",
                                                          f"{UNTRUSTED_COA}/24")
            self.mn.route("default", "via", TRUSTED_GW)
            self.mn.ip("rule", "add", "from", UNTRUSTED_COA, "lookup", "100", "pref", "100")
            self.mn.route("default", "via", UNTRUSTED_GW, "table", "100")
        if nat:
            self.nat = t.ns("nat", forward=True)
            self.mnn = t.ns("mnn")
            self.rt_nat, self.nat_out = t.link(self.rt, self.nat, f"{NAT_GW}/24", f"{NAT_OUTSIDE}/24")
            self.nat_in, self.mnn_if = t.link(self.nat, self.mnn, f"{NAT_INSIDE}/24", f"{NAT_PRIVATE}/24")
            self.nat.route("default", "via", NAT_GW)
            self.mnn.route("default", "via", NAT_INSIDE)
            self.nat.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", self.nat_out, "-j", "MASQUERADE")
        if fa:
            self.fa = t.ns("fa", forward=True)
            self.mnf = t.ns("mnf")
            self.rt_fa, self.fa_up = t.link(self.rt, self.fa, f"{FA_GW}/24", f"{FA_UP}/24")
            self.fa_link, self.mnf_if = t.link(self.fa, self.mnf, f"{FA_ADDR}/24", None)
            self.fa.route("default", "via", FA_GW)
            self.rt.route("10.40.0.0/24", "via", FA_UP)
            self.mnf.addr(self.mnf_if, f"{HOA2}/32")
            self.mnf.route("default", "via", FA_ADDR, "dev", self.mnf_if, "onlink")


def own_routes(ns, proto: int = 180) -> str:
    return ns.ip("route", "show", "table", "all", "proto", str(proto)).stdout.strip()


def own_rules(ns, proto: int = 180) -> str:
    return "\n".join(line for line in ns.ip("rule").stdout.splitlines() if f"proto {proto}" in line)


def own_links(ns, alias: str = "mipmobike:", exclude=("mip-udp", "mip-bpf")) -> list[str]:
    """Links tagged by the daemons, without the shared devices (``exclude=()`` to see all)."""
    out = ns.ip("-d", "link").stdout
    names, cur = [], None
    for line in out.splitlines():
        if line and line[0].isdigit():
            cur = line.split(":")[1].strip().split("@")[0]
        elif "alias " + alias in line and cur and cur not in exclude:
            names.append(cur)
    return names


def proxy_entries(ns) -> str:
    return ns.ip("neigh", "show", "proxy").stdout.strip()


def tc_filters(ns, ifname: str) -> str:
    return (ns.run("tc", "filter", "show", "dev", ifname, "ingress", check=False).stdout
            + ns.run("tc", "filter", "show", "dev", ifname, "egress", check=False).stdout).strip()


def write_ha_config(tmp_path: Path, lab: Lab, backend: str = "bpf", **extra) -> Path:
    """The lab's home agent: nodes HOA (NAI, reverse tunnel required), HOA2 (FA user), HOA3 (UDP)."""
    key = write_key(tmp_path / "mn.key")
    ha = {"address": HA_HOME, "home_interface": lab.ha_home, "max_lifetime": 600,
          "trusted_prefixes": TRUSTED_PREFIXES, "state_file": str(tmp_path / "ha-state.json"),
          "control_socket": str(tmp_path / "ha.sock"), "log_level": "DEBUG"}
    ha.update(extra)
    nodes = [
        {"home_address": HOA, "nai": "mn1@corp.example", "spi": 256, "key_file": str(key),
         "reverse_tunnel_required": True},
        {"home_address": HOA2, "spi": 257, "key_file": str(key)},
        {"home_address": HOA3, "spi": 258, "key_file": str(key), "udp_tunnel_allowed": True},
    ]
    dp = {"backend": backend}
    if backend == "bpf":
        dp["decap_interfaces"] = [lab.ha_up]
    fh_key = write_key(tmp_path / "fa-ha.key", FA_HA_KEY_HEX)
    return ha_toml(tmp_path / "ha.toml", ha=ha, nodes=nodes, dataplane=dp,
                   foreign_agents=[{"address": FA_ADDR, "spi": 300, "key_file": str(fh_key)}])


def write_fa_config(tmp_path: Path, lab: Lab, backend: str = "bpf", **extra) -> Path:
    fa = {"interface": lab.fa_link, "address": FA_ADDR, "advertisement_interval": 1.0,
          "registration_lifetime": 600, "control_socket": str(tmp_path / "fa.sock"), "log_level": "DEBUG"}
    fa.update(extra)
    dp = {"backend": backend}
    if backend == "bpf":
        dp["decap_interfaces"] = [lab.fa_up]
    fh_key = write_key(tmp_path / "fa-ha.key", FA_HA_KEY_HEX)
    return fa_toml(tmp_path / "fa.toml", fa=fa, dataplane=dp,
                   home_agents=[{"address": HA_HOME, "spi": 300, "key_file": str(fh_key)}])


def icmp_socket(ns: str, device: str | None = None) -> socket.socket:
    with in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    if device:
        s.setsockopt(socket.SOL_SOCKET, 25, device.encode())
    return s


def wait_advertisement(sock: socket.socket, timeout: float = 5.0):
    """The next Agent Advertisement on a raw ICMP socket: (source, AgentAdvertisement) or None."""
    from agent.mip.icmp import AgentAdvertisement, decode_icmp, split_ipv4

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        pkt, (host, _) = sock.recvfrom(2048)
        try:
            icmp = split_ipv4(pkt)[4]
            msg = decode_icmp(icmp)
        except Exception:
            continue
        if isinstance(msg, AgentAdvertisement):
            return IPv4Address(host), msg, pkt
    return None
