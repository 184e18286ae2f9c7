"""The trust-detection gate on a veth, BPF and netfilter backends alike.

mn (gated veth, 10.61.0.1) <-> far (10.61.0.2 home agent, .3 VPN gateway, .4 any host)

Closed: ordinary ping / TCP / UDP never reach the far side (tcpdump there),
in either direction, while DHCP, ARP, the detection RRQ, IKE and ESP do, and
the counters match what was sent. Open: everything flows. SIGKILL of the
agent that closed the gate leaves the link closed, and a new agent (or the
``mipmobike gate`` command) adopts the state instead of opening.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

import pytest

from agent.gate import Gate, GateConfigError, GateState, open_detection_socket
from agent.gate.nsutil import netns
from tests.lib.capture import Capture
from tests.lib.procs import wait_until
from tests.lib.topo import Netns

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MN, HA, GW, OTHER = "10.61.0.1", "10.61.0.2", "10.61.0.3", "10.61.0.4"
BACKENDS = ["bpf", "netfilter"]


# -- fixtures ------------------------------------------------------------------
@dataclass
class Lab:
    mn: Netns
    far: Netns
    mn_if: str
    far_if: str


@pytest.fixture
def lab(topology):
    mn, far = topology.ns("mn"), topology.ns("far")
    mn_if, far_if = topology.link(mn, far, f"{MN}/24", f"{HA}/24")
    far.addr(far_if, f"{GW}/24")
    far.addr(far_if, f"{OTHER}/24")
    return Lab(mn, far, mn_if, far_if)


def _instance() -> str:
    return "t" + secrets.token_hex(3)


@pytest.fixture(params=BACKENDS)
def gate(request, lab, bpffs, gate_cache):
    g = Gate(_instance(), backend=request.param, netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache)
    assert g.backend_name == request.param
    try:
        yield g
    finally:
        try:
            g.destroy()
        finally:
            g.release()


# -- traffic helpers -------------------------------------------------------------
def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def echo_request(payload: bytes, seq: int) -> bytes:
    hdr = struct.pack("!BBHHH", 8, 0, 0, 0x4D4D, seq)
    return struct.pack("!BBHHH", 8, 0, _csum(hdr + payload), 0x4D4D, seq) + payload


def sock_in(ns: Netns, family=socket.AF_INET, type_=socket.SOCK_DGRAM, proto=0, bind=None,
            device=None, broadcast=False, timeout=1.0) -> socket.socket:
    with netns(ns.name):
        s = socket.socket(family, type_, proto)
    if broadcast:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    if device:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    if bind:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(bind)
    s.settimeout(timeout)
    return s


def try_send(s: socket.socket, data: bytes, addr) -> None:
    """Send; a local drop may surface as EPERM (netfilter) or ENOBUFS: the attempt still counts."""
    try:
        s.sendto(data, addr)
    except OSError:
        pass


def ping(ns: Netns, dst: str, n: int, tag: bytes) -> None:
    s = sock_in(ns, type_=socket.SOCK_RAW, proto=socket.IPPROTO_ICMP)
    with s:
        for i in range(n):
            try_send(s, echo_request(tag, i), (dst, 0))


def echo_ok(ns: Netns, dst: str, timeout: float = 0.5) -> bool:
    """One echo request from ``ns``; True when the reply comes back within ``timeout``."""
    seq = secrets.randbelow(65536)
    payload = secrets.token_bytes(8)
    s = sock_in(ns, type_=socket.SOCK_RAW, proto=socket.IPPROTO_ICMP)
    with s:
        try_send(s, echo_request(payload, seq), (dst, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                data, peer = s.recvfrom(2048)
            except socket.timeout:
                return False
            ihl = (data[0] & 0xF) * 4
            if peer[0] == dst and data[ihl] == 0 and data[ihl + 8:] == payload:
                return True
    return False


def tcp_attempt(ns: Netns, dst: str, port: int) -> None:
    """One SYN: connect without waiting, give up before the first retransmission (1 s)."""
    s = sock_in(ns, type_=socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect((dst, port))
    except OSError:
        pass
    time.sleep(0.3)
    s.close()


def recv_or_none(s: socket.socket, timeout=1.0):
    s.settimeout(timeout)
    try:
        return s.recvfrom(2048)
    except (socket.timeout, BlockingIOError):
        return None


def delta(after: dict, before: dict) -> dict:
    out = {}
    for d in ("egress", "ingress"):
        for kind in ("pass", "drop"):
            for r, v in after[d][kind].items():
                if v is not None:
                    out[f"{d}.{kind}.{r}"] = v - before[d][kind][r]
    return {k: v for k, v in out.items() if v}


def payloads(pkts) -> list[bytes]:
    return [bytes(p) for p in pkts]


def seen(pkts, marker: bytes) -> bool:
    return any(marker in raw for raw in payloads(pkts))


# -- tests -------------------------------------------------------------------------
def test_closed_admits_only_detection_traffic(lab, gate, tmp_path):
    tag = secrets.token_hex(4).encode()
    gate.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
    assert gate.attach(lab.mn_if) == GateState.CLOSED
    assert gate.interfaces() == {lab.mn_if: GateState.CLOSED}

    # far-side peers: home agent, VPN gateway (IKE, NAT-T, ESP), DHCP server
    ha = sock_in(lab.far, bind=(HA, 434))
    ike = sock_in(lab.far, bind=(GW, 500))
    natt = sock_in(lab.far, bind=(GW, 4500))
    dhcp_srv = sock_in(lab.far, bind=("0.0.0.0", 67), device=lab.far_if, broadcast=True)
    far_esp = sock_in(lab.far, type_=socket.SOCK_RAW, proto=50, bind=(GW, 0))  # also keeps far quiet
    # mn-side endpoints
    det = open_detection_socket(lab.mn_if, MN, netns=lab.mn.name)
    det.settimeout(1)
    mn_ike = sock_in(lab.mn, bind=(MN, 500))
    mn_natt = sock_in(lab.mn, bind=(MN, 4500))
    mn_dhcp = sock_in(lab.mn, bind=("0.0.0.0", 68), device=lab.mn_if, broadcast=True)
    mn_esp = sock_in(lab.mn, type_=socket.SOCK_RAW, proto=50)
    mn_udp = sock_in(lab.mn, bind=(MN, 7777))
    plain = sock_in(lab.mn)
    socks = [ha, ike, natt, dhcp_srv, far_esp, det, mn_ike, mn_natt, mn_dhcp, mn_esp, mn_udp, plain]
    try:
        before = gate.counters(lab.mn_if)
        with Capture(lab.far, lab.far_if, tmp_path / "far.pcap") as cap:
            # -- from the mobile node: to be dropped
            ping(lab.mn, OTHER, 3, b"deny-out-ping-" + tag)
            ping(lab.mn, HA, 2, b"deny-out-ping-" + tag)
            tcp_attempt(lab.mn, OTHER, 80)
            for _ in range(4):
                try_send(plain, b"deny-out-udp-" + tag, (OTHER, 9999))
            try_send(plain, b"deny-out-udp-" + tag, (GW, 53))
            for _ in range(2):     # to the home agent's port, but not from the detection socket
                try_send(plain, b"deny-out-nomark-" + tag, (HA, 434))
            # -- from the mobile node: detection traffic
            try_send(mn_dhcp, b"dhcp-discover-" + tag, ("255.255.255.255", 67))
            assert recv_or_none(dhcp_srv)[0] == b"dhcp-discover-" + tag
            det.sendto(b"rrq-" + tag, (HA, 434))
            data, peer = recv_or_none(ha)
            assert data == b"rrq-" + tag and peer[0] == MN
            ha.sendto(b"rrp-" + tag, peer)
            assert recv_or_none(det) == (b"rrp-" + tag, (HA, 434))
            for s, srv, port in ((mn_ike, ike, 500), (mn_natt, natt, 4500)):
                s.sendto(b"ike-" + tag, (GW, port))
                data, peer = recv_or_none(srv)
                assert data == b"ike-" + tag and peer == (MN, port)
                srv.sendto(b"ike-reply-" + tag, peer)
                assert recv_or_none(s) == (b"ike-reply-" + tag, (GW, port))
            mn_esp.sendto(b"\0\0\0\1\0\0\0\1esp-out-" + tag, (GW, 0))
            # -- from the far side: to be dropped
            ping(lab.far, MN, 2, b"deny-in-ping-" + tag)
            far_udp = sock_in(lab.far)
            for _ in range(3):
                far_udp.sendto(b"deny-in-udp-" + tag, (MN, 7777))
            far_udp.close()
            tcp_attempt(lab.far, MN, 80)
            # -- from the far side: detection traffic
            dhcp_srv.sendto(b"dhcp-offer-" + tag, ("255.255.255.255", 68))
            assert recv_or_none(mn_dhcp)[0] == b"dhcp-offer-" + tag
            far_esp.sendto(b"\0\0\0\2\0\0\0\1esp-in-" + tag, (MN, 0))
            got = recv_or_none(mn_esp)
            assert got is not None and b"esp-in-" + tag in got[0]
            assert recv_or_none(mn_udp, 0.3) is None
        after = gate.counters(lab.mn_if)
    finally:
        for s in socks:
            s.close()

    pkts = cap.packets()
    from scapy.layers.inet import IP, TCP, ICMP
    from scapy.layers.l2 import ARP
    assert not seen(pkts, b"deny-out-"), "a denied packet crossed the closed gate"
    assert not any(p.haslayer(TCP) and p[IP].src == MN for p in pkts), "TCP from the mobile node leaked"
    assert not any(p.haslayer(ICMP) and p[IP].src == MN and p[ICMP].type == 8 for p in pkts)
    for m in (b"dhcp-discover-", b"rrq-", b"ike-", b"esp-out-"):
        assert seen(pkts, m + tag), f"{m!r} missing on the far side"
    assert any(p.haslayer(ARP) and p[ARP].psrc == MN for p in pkts), "no ARP from the mobile node"

    d = delta(after, before)
    expected = {
        "egress.drop.icmp": 5, "egress.drop.tcp": 1, "egress.drop.udp": 5, "egress.drop.mip_nomark": 2,
        "egress.pass.dhcp": 1, "egress.pass.mip": 1, "egress.pass.ike": 2, "egress.pass.esp": 1,
        "ingress.drop.icmp": 2, "ingress.drop.udp": 3, "ingress.drop.tcp": 1,
        "ingress.pass.dhcp": 1, "ingress.pass.mip": 1, "ingress.pass.ike": 2, "ingress.pass.esp": 1,
    }
    if gate.backend_name == "netfilter":
        # netfilter also sees the local loopback copy of the broadcast DISCOVER
        # (POSTROUTING, then PREROUTING on the same device, where it is no DHCP reply)
        expected["egress.pass.dhcp"] += 1
        expected["ingress.drop.udp"] += 1
    arp = {k: d.pop(k) for k in list(d) if k.endswith(".arp")}
    assert d == expected
    if gate.backend_name == "bpf":      # netfilter never sees ARP
        assert arp.get("egress.pass.arp", 0) >= 1 and arp.get("ingress.pass.arp", 0) >= 1


def test_open_lets_everything_flow(lab, gate, tmp_path):
    tag = secrets.token_hex(4).encode()
    gate.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
    gate.attach(lab.mn_if)
    assert not echo_ok(lab.mn, OTHER)
    gate.open(lab.mn_if)
    assert gate.state(lab.mn_if) == GateState.OPEN
    srv = sock_in(lab.far, bind=(OTHER, 9999))
    lst = sock_in(lab.far, type_=socket.SOCK_STREAM, bind=(OTHER, 8080))
    lst.listen(1)
    try:
        before = gate.counters(lab.mn_if)
        with Capture(lab.far, lab.far_if, tmp_path / "far.pcap") as cap:
            assert lab.mn.ping(OTHER, 2, 2)
            assert lab.far.ping(MN, 1, 2)
            c = sock_in(lab.mn, type_=socket.SOCK_STREAM, timeout=3)
            c.connect((OTHER, 8080))
            conn, _ = lst.accept()
            c.sendall(b"tcp-" + tag)
            assert conn.recv(100) == b"tcp-" + tag
            conn.close()
            c.close()
            u = sock_in(lab.mn)
            u.sendto(b"udp-" + tag, (OTHER, 9999))
            assert recv_or_none(srv)[0] == b"udp-" + tag
            u.close()
        after = gate.counters(lab.mn_if)
    finally:
        srv.close()
        lst.close()
    assert seen(cap.packets(), b"tcp-" + tag) and seen(cap.packets(), b"udp-" + tag)
    d = delta(after, before)
    assert d.get("egress.pass.open", 0) >= 6 and d.get("ingress.pass.open", 0) >= 6
    assert not any(k.startswith(("egress.drop", "ingress.drop")) for k in d), d
    # off: attached but not enforcing, nothing counted
    gate.off(lab.mn_if)
    c_off = gate.counters(lab.mn_if)
    assert echo_ok(lab.mn, OTHER, 2)
    assert delta(gate.counters(lab.mn_if), c_off) == {}
    # and closing again stops it
    gate.close(lab.mn_if)
    assert not echo_ok(lab.mn, OTHER)


AGENT = textwrap.dedent("""
    import sys, time
    from agent.gate import Gate
    inst, backend, ns, bpffs, cache, ifname, ha, gw = sys.argv[1:9]
    g = Gate(inst, backend=backend, netns=ns, bpffs=bpffs, cache_dir=cache)
    g.set_allowed(home_agents=[(ha, 434)], gateways=[gw])
    print("STATE", g.attach(ifname).value, g.backend_name, flush=True)
    print("BCC_IMPORTED", "bcc" in sys.modules, flush=True)   # the compile came from the disk cache
    time.sleep(600)
""")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_leaves_link_closed_and_restart_adopts(backend, lab, bpffs, gate_cache, procs, tmp_path):
    inst = _instance()
    agent = procs.start("agent", [sys.executable, "-c", AGENT, inst, backend, lab.mn.name, bpffs, gate_cache,
                                  lab.mn_if, HA, GW], cwd=REPO, env={"PYTHONPATH": REPO})
    adopted = None
    try:
        wait_until(lambda: "BCC_IMPORTED" in agent.output(), 30, "the agent to close the gate", proc=agent)
        assert "STATE closed " + backend in agent.output()
        assert "BCC_IMPORTED False" in agent.output()
        agent.signal(signal.SIGKILL)
        agent.popen.wait(5)
        assert agent.popen.returncode == -signal.SIGKILL

        tag = secrets.token_hex(4).encode()
        u = sock_in(lab.mn)
        with Capture(lab.far, lab.far_if, tmp_path / "far.pcap") as cap:
            for _ in range(3):
                try_send(u, b"after-kill-" + tag, (OTHER, 9999))
            assert not echo_ok(lab.mn, OTHER)
        u.close()
        assert not seen(cap.packets(), b"after-kill-" + tag), "the link opened when the agent died"

        # the operator's view, from a fresh process that compiles nothing
        cli = [sys.executable, "-m", "agent.cli", "gate", "status", "--instance", inst, "--netns",
               lab.mn.name, "--bpffs", bpffs, "--json"]
        p = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        st = json.loads(p.stdout)
        assert st["backend"] == backend
        assert st["interfaces"][lab.mn_if]["state"] == "closed"
        assert st["interfaces"][lab.mn_if]["counters"]["egress"]["drop"]["udp"] >= 3
        assert any(e.startswith(f"{HA},udp:434") for e in st["allowed"])

        # a restarted agent adopts: attach() keeps the link closed
        adopted = Gate(inst, netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache)
        assert adopted.adopted and adopted.backend_name == backend
        assert adopted.attach(lab.mn_if) == GateState.CLOSED
        assert not echo_ok(lab.mn, OTHER)

        # and the operator can open it
        p = subprocess.run(cli[:4] + ["open", lab.mn_if] + cli[5:-1], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0 and p.stdout.strip() == f"{lab.mn_if}: open", p.stderr
        assert adopted.state(lab.mn_if) == GateState.OPEN
        assert echo_ok(lab.mn, OTHER, 2)
    finally:
        if adopted is None:
            try:
                adopted = Gate(inst, netns=lab.mn.name, bpffs=bpffs, create=False)
            except Exception:
                import shutil
                shutil.rmtree(os.path.join(bpffs, inst), ignore_errors=True)
        if adopted is not None:
            adopted.destroy()
            adopted.release()
    assert not os.path.exists(os.path.join(bpffs, inst))


def test_dhcp_lease_through_closed_gate(lab, gate, procs, tmp_path):
    """A real DHCP exchange (dnsmasq <-> pyroute2's client) while everything else is blocked."""
    gate.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
    gate.attach(lab.mn_if)
    procs.start("dnsmasq", ["dnsmasq", "-k", "--no-ping", "--port=0", f"--interface={lab.far_if}",
                            "--bind-interfaces", "--dhcp-range=10.61.0.50,10.61.0.99,255.255.255.0,120",
                            f"--dhcp-leasefile={tmp_path / 'leases'}", f"--pid-file={tmp_path / 'dm.pid'}"],
                ns=lab.far.name)
    time.sleep(0.3)
    client = procs.start("dhcp", [os.path.join(os.path.dirname(sys.executable), "pyroute2-dhcp-client"),
                                  "--disable-hooks", "-R", lab.mn_if], ns=lab.mn.name, cwd=str(tmp_path))
    wait_until(lambda: "-> BOUND" in client.output(), 20, "a DHCP lease", proc=client)
    c = gate.counters(lab.mn_if)
    assert c["ingress"]["pass"]["dhcp"] >= 2     # OFFER, ACK
    if gate.backend_name == "bpf":               # AF_PACKET sends bypass iptables
        assert c["egress"]["pass"]["dhcp"] >= 2  # DISCOVER, REQUEST
    assert not echo_ok(lab.mn, HA)


def test_allow_list_is_an_ipset_mirrored_into_the_gate(lab, gate):
    entries = gate.set_allowed(home_agents=[(HA, 434), "10.61.0.9"], gateways=[GW])
    assert [str(e) for e in entries] == [
        f"{HA},udp:434", f"{GW},udp:500", f"{GW},udp:4500", f"{GW},esp:0", "10.61.0.9,udp:434"]
    out = lab.mn.run("ipset", "list", gate.ipset_name).stdout
    assert f"{HA},udp:434" in out and f"{GW},esp:0" in out and "vpn-gateway" in out
    if gate.backend_name == "bpf":
        assert gate.backend.allowed_keys() == sorted(e.key() for e in entries)
    # replacing drops what is gone
    gate.set_allowed(home_agents=[(HA, 434)], gateways=[])
    assert [str(e) for e in gate.allowed()] == [f"{HA},udp:434"]
    if gate.backend_name == "bpf":
        assert gate.backend.allowed_keys() == [(HA, 17, 434)]
    # an operator's edit is picked up by sync()
    lab.mn.run("ipset", "add", gate.ipset_name, f"{GW},udp:500")
    assert (GW, 17, 500) in [e.key() for e in gate.sync()]
    if gate.backend_name == "bpf":
        assert (GW, 17, 500) in gate.backend.allowed_keys()
    for bad, kw in (("not an IPv4", dict(home_agents=[("10.0.0.300", 434)])),
                    ("port", dict(home_agents=[(HA, 0)])),
                    ("VPN gateway", dict(gateways=["gw.example"]))):
        with pytest.raises(GateConfigError, match=bad):
            gate.set_allowed(**kw)


@pytest.mark.parametrize("ingress", ["xdp", "tc"])
def test_lost_pins_are_recovered_from_attached_programs(ingress, lab, bpffs, gate_cache):
    """The bpffs holding the pins can vanish (mounted in a mount namespace that
    ended); the attached programs still gate, and a new agent finds their maps."""
    import shutil
    inst = _instance()
    g = Gate(inst, backend="bpf", netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache, ingress=ingress)
    g2 = None
    try:
        g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        g.attach(lab.mn_if)
        assert not echo_ok(lab.mn, OTHER)
        g.release()
        shutil.rmtree(os.path.join(bpffs, inst))
        assert not echo_ok(lab.mn, OTHER)
        g2 = Gate(inst, netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache, ingress=ingress)
        assert g2.adopted and g2.backend_name == "bpf"
        assert g2.interfaces() == {lab.mn_if: GateState.CLOSED}
        assert g2.counters(lab.mn_if)["egress"]["drop"]["icmp"] == 2
        assert g2.backend.allowed_keys()[0] == (HA, 17, 434)
        g2.open(lab.mn_if)
        assert echo_ok(lab.mn, OTHER, 2)
    finally:
        (g2 or g).destroy()
        (g2 or g).release()
    assert "bpf" not in lab.mn.run("tc", "filter", "show", "dev", lab.mn_if, "egress").stdout
    assert "xdp" not in lab.mn.ip("link", "show", lab.mn_if).stdout


def test_auto_ingress_is_tc_on_a_veth(lab, bpffs, gate_cache):
    """gate.ingress = "auto": a virtual device (a veth here) gets the TC ingress hook, no XDP."""
    from agent.gate.bpf_backend import XDP_ATTACHED_SKB, choose_ingress
    assert choose_ingress("veth", None) == "tc" and choose_ingress(None, XDP_ATTACHED_SKB) == "tc"
    assert choose_ingress(None, 1) == "xdp" and choose_ingress(None, None) == "xdp"
    g = Gate(_instance(), backend="bpf", netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache, ingress="auto")
    try:
        g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        g.attach(lab.mn_if)
        assert "xdp" not in lab.mn.ip("link", "show", lab.mn_if).stdout
        assert "bpf" in lab.mn.run("tc", "filter", "show", "dev", lab.mn_if, "ingress").stdout
        assert not echo_ok(lab.mn, OTHER)
        g.open(lab.mn_if)
        assert echo_ok(lab.mn, OTHER, 2)
    finally:
        g.destroy()
        g.release()


def test_ingress_hook_switch_on_adoption(lab, bpffs, gate_cache):
    """A restart with another gate.ingress moves the adopted gate to that hook: the new hook is
    attached before the old one goes (the link stays closed throughout), and only one remains."""
    inst = _instance()
    g = Gate(inst, backend="bpf", netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache, ingress="xdp")
    g2 = g3 = None
    try:
        g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        g.attach(lab.mn_if)
        assert "xdp" in lab.mn.ip("link", "show", lab.mn_if).stdout
        g.release()
        g2 = Gate(inst, netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache, ingress="tc")
        assert g2.adopted and g2.attach(lab.mn_if) == GateState.CLOSED
        assert "xdp" not in lab.mn.ip("link", "show", lab.mn_if).stdout
        assert "bpf" in lab.mn.run("tc", "filter", "show", "dev", lab.mn_if, "ingress").stdout
        assert not echo_ok(lab.mn, OTHER)
        g2.release()
        g3 = Gate(inst, netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache, ingress="xdp")
        g3.attach(lab.mn_if)
        assert "xdp" in lab.mn.ip("link", "show", lab.mn_if).stdout
        assert "bpf" not in lab.mn.run("tc", "filter", "show", "dev", lab.mn_if, "ingress").stdout
        assert not echo_ok(lab.mn, OTHER)
        g3.open(lab.mn_if)
        assert echo_ok(lab.mn, OTHER, 2)
    finally:
        last = g3 or g2 or g
        last.destroy()
        last.release()


@pytest.mark.parametrize("backend", BACKENDS)
def test_usable_from_an_asyncio_daemon(backend, lab, bpffs, gate_cache):
    """The MN daemon is asyncio; pyroute2's synchronous calls cannot run inside a
    running loop, so the gate moves its work to a worker thread there. close()
    on a link the gate is not attached to yet attaches it (closed); instance
    names may be up to 20 characters."""
    import asyncio
    inst = f"mn_{secrets.token_hex(3)}-long-names"
    assert len(inst) == 20

    async def daemon():
        g = Gate(inst, backend=backend, netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache)
        try:
            g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
            g.close(lab.mn_if)
            closed = g.state(lab.mn_if)
            g.open(lab.mn_if)
            return closed, g.state(lab.mn_if), g.status()
        finally:
            g.destroy()
            g.release()

    closed, st, status = asyncio.run(daemon())
    assert closed == GateState.CLOSED and st == GateState.OPEN
    assert status["interfaces"][lab.mn_if]["state"] == "open"
    assert status["backend"] == backend and status["ipset"] == f"mipmobike-{inst}"
