"""i-HA daemon on the host (no ipip here): signalling, TNC, authentication, replay,
restart from the state file, lifetime expiry, the BPF data path, RFC 3519 through a NAT."""

from __future__ import annotations

import signal
import socket
import time
from ipaddress import IPv4Address

from agent.kernel import Kernel, make_backend
from agent.kernel.netns import in_netns
from agent.mip.mn import Denied, Deregistered, Registered, TimedOut
from tests.lib.capture import Capture
from tests.lib.procs import wait_until
from tests.netns.test_ha_support import (
    CN,
    HA_HOME,
    HOA,
    HOA3,
    NAT_OUTSIDE,
    NAT_PRIVATE,
    TRUSTED_COA,
    UNTRUSTED_COA,
    Lab,
    MnStandIn,
    icmp_echo,
    own_links,
    own_routes,
    parse_icmp,
    proxy_entries,
    start_daemon,
    status,
    tc_filters,
    write_ha_config,
)


def _ha_config(tmp_path, lab, backend="bpf", **extra):
    return write_ha_config(tmp_path, lab, backend, **extra)


def _binding(sock, hoa=HOA):
    return next((b for b in status(sock)["bindings"] if b["home_address"] == hoa), None)


def test_ha_signalling_tnc_auth_replay_restart(topology, procs, tmp_path):
    lab = Lab(topology)
    cfg = _ha_config(tmp_path, lab)
    sock = str(tmp_path / "ha.sock")
    ha = start_daemon(procs, "ha", cfg, lab.ha, sock)
    st = status(sock)
    assert st["role"] == "ha" and st["dataplane"] == "bpf" and st["bindings"] == []

    # a registration from a trusted network gets TNC, one from elsewhere does not
    mn = MnStandIn(lab.mn.name, home_address=HOA, home_agent=HA_HOME, nai="mn1@corp.example",
                   bind=TRUSTED_COA, lifetime=300)
    ev = mn.register(TRUSTED_COA)
    assert isinstance(ev, Registered) and ev.tnc, ev
    b = _binding(sock)
    assert b["care_of_address"] == TRUSTED_COA and b["trusted"] and b["reverse_tunnel"]
    assert f"{HOA} dev mip-bpf" in own_routes(lab.ha)
    assert HOA in proxy_entries(lab.ha)
    mn.close()
    mn = MnStandIn(lab.mn.name, home_address=HOA, home_agent=HA_HOME, bind=UNTRUSTED_COA, lifetime=300)
    ev = mn.register(UNTRUSTED_COA)
    assert isinstance(ev, Registered) and not ev.tnc, ev
    assert _binding(sock)["care_of_address"] == UNTRUSTED_COA and not _binding(sock)["trusted"]

    # reverse tunnelling is mandatory for this node: 138
    mn_nt = MnStandIn(lab.mn.name, home_address=HOA, home_agent=HA_HOME, bind=UNTRUSTED_COA,
                      reverse_tunnel=False)
    ev = mn_nt.register(UNTRUSTED_COA)
    assert isinstance(ev, Denied) and ev.code == 138, ev
    mn_nt.close()

    # a node with the wrong key: the HA answers 131, which the node cannot authenticate
    c0 = status(sock)["counters"]
    bad = MnStandIn(lab.mn.name, home_address=HOA, home_agent=HA_HOME, key=b"not the right key",
                    bind=TRUSTED_COA, max_retransmissions=1, initial_timeout=0.3)
    assert isinstance(bad.register(TRUSTED_COA), TimedOut)
    bad.close()
    c1 = status(sock)["counters"]
    assert c1["auth_failures"] == c0["auth_failures"] + 2
    assert c1["replies_by_code"].get("131", 0) == c0["replies_by_code"].get("131", 0) + 2
    assert _binding(sock)["care_of_address"] == UNTRUSTED_COA   # nothing changed

    # a replayed request (same bytes again) is refused with 133 and changes nothing
    mn.engine.register(time.time(), UNTRUSTED_COA)
    (dgram,) = mn.engine.datagrams_to_send()
    mn.sock.sendto(dgram.data, dgram.addr)
    ev = mn.pump(lambda e: isinstance(e, (Registered, Denied)))
    assert isinstance(ev, Registered)
    before = _binding(sock)
    mn.sock.sendto(dgram.data, dgram.addr)
    mn.sock.settimeout(5)
    reply = mn.sock.recv(2048)
    assert reply[0] == 3 and reply[1] == 133
    c2 = status(sock)["counters"]
    assert c2["identification_mismatches"] >= 1
    assert _binding(sock)["registered_at"] == before["registered_at"]

    # garbage is counted and dropped
    mn.sock.sendto(b"\x01\x02garbage", (HA_HOME, 434))
    wait_until(lambda: status(sock)["counters"]["malformed"] == c2["malformed"] + 1, 5, "malformed counted")

    # SIGTERM: every kernel object goes, the binding stays in the state file
    ha.signal(signal.SIGTERM)
    assert ha.popen.wait(15) == 0, ha.output()[-3000:]
    assert own_routes(lab.ha) == "" and own_links(lab.ha, exclude=()) == [] and proxy_entries(lab.ha) == ""
    assert "mip-bpf" not in lab.ha.ip("link").stdout and "mip-udp" not in lab.ha.ip("link").stdout
    assert "tun_" not in tc_filters(lab.ha, lab.ha_up)
    assert (tmp_path / "ha-state.json").exists()

    # leftovers of a crashed instance are found and removed at start
    lab.ha.ip("route", "add", "10.1.0.222/32", "dev", lab.ha_home, "proto", "180")
    lab.ha.ip("neigh", "add", "proxy", HOA3, "dev", lab.ha_home)
    ha2 = start_daemon(procs, "ha", cfg, lab.ha, sock)
    assert "10.1.0.222" not in own_routes(lab.ha)
    assert HOA3 not in proxy_entries(lab.ha)
    b = _binding(sock)
    assert b is not None and b["care_of_address"] == UNTRUSTED_COA, status(sock)
    assert status(sock)["counters"]["restored"] == 1
    assert f"{HOA} dev mip-bpf" in own_routes(lab.ha) and HOA in proxy_entries(lab.ha)

    # the restored replay state still refuses the old request
    mn.sock.sendto(dgram.data, dgram.addr)
    assert mn.sock.recv(2048)[1] == 133

    # deregistration removes the binding and its kernel state
    ev = mn.deregister(UNTRUSTED_COA)
    assert isinstance(ev, Deregistered), ev
    assert _binding(sock) is None
    assert HOA not in own_routes(lab.ha) and HOA not in proxy_entries(lab.ha)

    # lifetime expiry does too
    ev = mn.register(UNTRUSTED_COA, lifetime=2)
    assert isinstance(ev, Registered) and ev.lifetime == 2
    assert HOA in own_routes(lab.ha)
    wait_until(lambda: _binding(sock) is None, 10, "binding expiry")
    assert HOA not in own_routes(lab.ha) and HOA not in proxy_entries(lab.ha)
    assert status(sock)["counters"]["expired"] == 1
    mn.close()
    ha2.signal(signal.SIGTERM)
    assert ha2.popen.wait(15) == 0
    assert own_routes(lab.ha) == "" and proxy_entries(lab.ha) == ""


def test_ha_bpf_data_path_reverse_tunnelled(topology, procs, tmp_path):
    """CN <-> home address both ways through the BPF tunnel (no ipip module on this host)."""
    lab = Lab(topology)
    cfg = _ha_config(tmp_path, lab)
    sock = str(tmp_path / "ha.sock")
    start_daemon(procs, "ha", cfg, lab.ha, sock)
    # the mobile node's side of the tunnel: the same BPF backend, in its namespace
    k = Kernel("test", netns=lab.mn.name)
    be = make_backend("bpf", k, prefix="mnt", decap_interfaces=[lab.mn_trusted])
    try:
        be.reconcile()
        be.open()
        lab.mn.addr("lo", f"{HOA}/32")
        t = be.tunnel(TRUSTED_COA, HA_HOME)
        be.route_from(t, HOA)
        mn = MnStandIn(lab.mn.name, home_address=HOA, home_agent=HA_HOME, bind=TRUSTED_COA)
        assert isinstance(mn.register(TRUSTED_COA), Registered)
        mn.close()
        with Capture(lab.rt, lab.rt_ha, tmp_path / "uplink.pcap") as cap:
            assert lab.cn.ping(HOA, 3, 2), "CN -> home address"
            assert lab.mn.ping(CN, 3, 2, "-I", HOA), "home address -> CN"
        pkts = [p for p in cap.packets() if p.haslayer("IP")]
        ipip = [p for p in pkts if p["IP"].proto == 4]
        assert len(ipip) >= 12, [p.summary() for p in pkts]
        assert {(p["IP"].src, p["IP"].dst) for p in ipip} == {(HA_HOME, TRUSTED_COA), (TRUSTED_COA, HA_HOME)}
        clear = [p.summary() for p in pkts if p["IP"].proto == 1]
        assert not clear, f"ICMP outside the tunnel: {clear}"
        bpf = status(sock)["kernel"]["backend"]["bpf"]
        assert bpf["encap_ok"] >= 6 and bpf["decap_ok"] >= 6, bpf
    finally:
        be.close()
        k.close()


def test_ha_udp_tunnel_through_nat(topology, procs, tmp_path):
    """RFC 3519: a co-located registration through a MASQUERADE runs over UDP 434."""
    lab = Lab(topology, nat=True, mn=False)
    cfg = _ha_config(tmp_path, lab)
    sock = str(tmp_path / "ha.sock")
    start_daemon(procs, "ha", cfg, lab.ha, sock)
    mn = MnStandIn(lab.mnn.name, home_address=HOA3, home_agent=HA_HOME, spi=258, bind=NAT_PRIVATE,
                   udp_tunnel=True)
    try:
        ev = mn.register(NAT_PRIVATE)
        assert isinstance(ev, Registered) and ev.binding.udp_tunnel, ev
        assert ev.binding.keepalive == 110 and not ev.tnc
        b = _binding(sock, HOA3)
        assert b["udp_tunnel"] and b["nat_detected"] and b["source"].startswith(NAT_OUTSIDE + ":"), b
        assert f"{HOA3} dev mip-udp" in own_routes(lab.ha)
        # to the correspondent and back, both ways inside the UDP tunnel
        for seq in (1, 2):
            got = mn.tunnel_roundtrip(icmp_echo(HOA3, CN, seq=seq),
                                      lambda p, s=seq: (i := parse_icmp(p)) and i["type"] == 0 and i["seq"] == s)
            assert got is not None, mn.events
            assert parse_icmp(got.payload)["src"] == IPv4Address(CN)
        # a keepalive-style echo to the home agent itself is answered through the tunnel
        got = mn.tunnel_roundtrip(icmp_echo(HOA3, HA_HOME, seq=9),
                                  lambda p: (i := parse_icmp(p)) and i["type"] == 0 and i["seq"] == 9)
        assert got is not None
        # the correspondent reaches the node too (initiated from the home side)
        with in_netns(lab.cn.name):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"hello node", (HOA3, 9999))
        s.close()
        got = mn.pump(lambda e: type(e).__name__ == "MnTunnelPacket" and e.payload[9] == 17, 5)
        assert got is not None and got.payload.endswith(b"hello node")
        # a spoofed inner source is not forwarded
        udp = status(sock)["udp_tunnel"]
        mn.engine.send_tunnel_data(icmp_echo("10.1.0.7", CN, seq=5))
        mn.pump(lambda e: False, 0.5)
        assert status(sock)["udp_tunnel"]["from_node_spoofed"] == udp.get("from_node_spoofed", 0) + 1
        c = status(sock)["counters"]
        assert c["tunnel_data_in"] >= 4 and c["tunnel_data_out"] >= 4
    finally:
        mn.close()
