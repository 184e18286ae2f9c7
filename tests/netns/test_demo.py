"""The demo's pieces on the host (no ipip or ESP needed): the flow prober across two namespaces
(echo losses and outage while the link is down, the TCP stream surviving it), the access-link
capture and its detection-traffic classifier, and the agent configuration it writes.
The whole demo runs in the kernel tier's world (see tests/kernel/test_e2e_roaming.py, scripts/demo.sh)."""

import ipaddress
import struct
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

from agent.demo.capture import DetectionPeers, LinkCapture, describe, detection_kind, kinds, leaks, read_pcap
from agent.demo.flow import Flow
from agent.demo.roam import agent_config, set_toml_keys

HOA, CN = "10.77.0.100", "10.77.0.10"
HA, FA, GW = "10.1.0.2", "10.2.2.1", "192.0.2.2"
MN_MAC, OTHER_MAC = bytes.fromhex("026d6d000001"), bytes.fromhex("02aabbccddee")


def test_flow_survives_a_link_outage(topology):
    mn, cn = topology.ns("mn"), topology.ns("cn")
    a, b = topology.link(mn, cn, f"{HOA}/24", f"{CN}/24")
    flow = Flow(mn.name, cn.name, HOA, CN, rate=50, tcp_rate=50)
    try:
        flow.start_server()
        flow.start_client()
        assert flow.wait_recovered(time.time() - 5, 10), flow.summary()
        time.sleep(0.5)
        t_down = time.time()
        mn.ip("link", "set", a, "down")
        time.sleep(1.0)
        mn.ip("link", "set", a, "up")
        t_up = time.time()
        got = flow.wait_recovered(t_up, 20)
        assert got is not None, flow.summary()
        w = flow.window(t_down, max(got))
        assert w.lost >= 30, w                       # ~50 probes went out while the link was down
        assert w.outage is not None and 0.9 <= w.outage < 10, w
        assert flow.drain(20), flow.summary()        # every byte written reached the correspondent
        s = flow.summary()
        assert s["tcp_error"] is None and s["tcp_written"] == s["tcp_received"] > 0, s
        assert s["udp_sources"] == [HOA] and len(s["tcp_peers"]) == 1 and s["tcp_peers"][0].startswith(HOA + ":")
        assert flow.alive()
    finally:
        flow.stop()


def _frame(src_mac: bytes, proto: int, src: str, dst: str, l4: bytes) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0,
                     ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return b"\xff" * 6 + src_mac + b"\x08\x00" + ip + l4


def _udp(sp: int, dp: int, payload: bytes = b"x") -> bytes:
    return struct.pack("!HHHH", sp, dp, 8 + len(payload), 0) + payload


def _write_pcap(path: Path, frames: list[tuple[float, bytes]]) -> None:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for ts, fr in frames:
        out.append(struct.pack("<IIII", int(ts), int(round((ts % 1) * 1e6)), len(fr), len(fr)) + fr)
    path.write_bytes(b"".join(out))


def test_detection_traffic_classifier(tmp_path):
    peers = DetectionPeers({HA, FA}, {GW})
    coa = "10.2.1.147"
    allowed = {
        "arp": b"\xff" * 6 + MN_MAC + b"\x08\x06" + bytes(28),
        "dhcp": _frame(MN_MAC, 17, "0.0.0.0", "255.255.255.255", _udp(68, 67)),
        "router-discovery": _frame(MN_MAC, 1, "0.0.0.0", "224.0.0.2", bytes([10, 0]) + bytes(6)),
        "mip": _frame(MN_MAC, 17, coa, HA, _udp(40000, 434)),
        "ike": _frame(MN_MAC, 17, coa, GW, _udp(4500, 4500)),
        "esp": _frame(MN_MAC, 50, coa, GW, bytes(16)),
    }
    for kind, fr in allowed.items():
        assert detection_kind(fr, peers) == kind, (kind, describe(fr))
    refused = {
        "tcp": _frame(MN_MAC, 6, HOA, CN, struct.pack("!HHII", 40000, 7008, 1, 0) + bytes(12)),
        "echo": _frame(MN_MAC, 1, coa, HA, bytes([8, 0]) + bytes(6)),
        "ipip": _frame(MN_MAC, 4, coa, HA, bytes(20)),
        "udp elsewhere": _frame(MN_MAC, 17, HOA, CN, _udp(5000, 7007)),
        "434 to a stranger": _frame(MN_MAC, 17, coa, "10.9.9.9", _udp(40000, 434)),
        "ike to a stranger": _frame(MN_MAC, 17, coa, "10.9.9.9", _udp(500, 500)),
        "dhcp server port": _frame(MN_MAC, 17, coa, "10.2.1.1", _udp(67, 68)),
    }
    for name, fr in refused.items():
        assert detection_kind(fr, peers) is None, (name, describe(fr))
    assert describe(refused["tcp"]) == ("tcp", f"TCP {HOA}:40000 > {CN}:7008")

    # through a pcap file: leaks() names exactly what is not detection traffic inside the window
    t = 1_700_000_000.25
    frames = [(t + i * 0.01, fr) for i, fr in enumerate(allowed.values())]
    frames += [(t + 0.5, refused["tcp"]), (t + 2.0, refused["echo"])]
    path = tmp_path / "x.pcap"
    _write_pcap(path, frames)
    back = read_pcap(path)
    assert [fr for _, fr in back] == [fr for _, fr in frames]
    assert abs(back[0][0] - t) < 1e-5
    bad = leaks(back, t, t + 1.0, peers)
    assert len(bad) == 1 and f"TCP {HOA}:40000 > {CN}:7008" in bad[0], bad
    assert kinds(back, t, t + 1.0, peers) == {"arp": 1, "dhcp": 1, "router-discovery": 1, "mip": 1, "ike": 1,
                                              "esp": 1, "other": 1}
    # a cut last record (tcpdump still writing) is left out, not an error
    path.write_bytes(path.read_bytes()[:-5])
    assert len(read_pcap(path)) == len(frames) - 1


def test_link_capture_records_what_the_node_sent(topology, tmp_path):
    mn, sw = topology.ns("mn"), topology.ns("sw")
    a, b = topology.link(mn, sw, "10.78.0.2/24", "10.78.0.1/24")
    cap = LinkCapture(sw.name, b, tmp_path / "access.pcap").start()
    try:
        t0 = time.time()
        mn.run("python3", "-c", "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                                "[s.sendto(b'x', ('10.78.0.1', p)) for p in (434, 9999)]")
        sw.run("python3", "-c", "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                                "s.sendto(b'x', ('10.78.0.2', 5555))")
        time.sleep(0.3)
    finally:
        cap.stop()
    frames = cap.frames()
    texts = [describe(fr)[1] for ts, fr in frames if ts >= t0 - 1]
    assert any("> 10.78.0.1:434" in x for x in texts) and any("> 10.78.0.1:9999" in x for x in texts), texts
    assert not any("10.78.0.2:5555" in x for x in texts), "frames towards the node were recorded too"
    bad = leaks(frames, t0 - 1, time.time(), DetectionPeers({"10.78.0.1"}, set()))
    assert any("> 10.78.0.1:9999" in x for x in bad) and not any(":434" in x for x in bad), bad


def test_agent_config_sets_detection_and_vpn_keys(tmp_path):
    (tmp_path / "conf").mkdir()
    base = tmp_path / "mn.toml"
    base.write_text('# header\n[mn]\ninterfaces = ["eth0"]\nlog_level = "DEBUG"\n\n[vpn]\ngateway = "192.0.2.2"\n'
                    'dpd_interval = 30\n\n[gate]\nbackend = "auto"\n')
    saved = []
    tb = SimpleNamespace(files={"mn_config": str(base)}, dir=str(tmp_path), save=lambda: saved.append(1))
    path = agent_config(tb, initial_timeout=1.0, retransmissions=2, max_timeout=2.0, vpn={"dpd_interval": 5},
                        mn={"use_fa": True})
    doc = tomllib.loads(Path(path).read_text())
    assert doc["mn"]["log_level"] == "INFO" and doc["mn"]["use_fa"] is True
    assert doc["mn"]["detection"] == {"initial_timeout": 1.0, "retransmissions": 2, "max_timeout": 2.0}
    assert doc["vpn"] == {"gateway": "192.0.2.2", "dpd_interval": 5}
    assert doc["gate"] == {"backend": "auto"}
    assert tb.files["mn_config"] == path and saved
    # a second pass replaces, never duplicates
    again = set_toml_keys(Path(path).read_text(), "mn.detection", {"initial_timeout": 0.5})
    assert tomllib.loads(again)["mn"]["detection"]["initial_timeout"] == 0.5
