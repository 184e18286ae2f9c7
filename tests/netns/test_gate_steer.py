"""RRQ steering under a VPN's 0.0.0.0/0 IPsec policies (host kernel: policies
work without ESP; no SA exists, so anything the policy catches cannot leave).

mn (10.62.0.1, virtual IP 10.99.0.5 as a strongSwan client would have it) <-> far
(home agent 10.62.0.2, VPN gateway 10.62.0.3). The gate on mn is closed.

* the detection socket's RRQ leaves on the physical link, unencapsulated, from
  the physical address; the home agent's reply comes back to it;
* an ordinary socket's datagram to the same home agent is caught by the
  policy (XfrmOutNoStates) and never reaches the wire, also when bound to the
  physical address and device like the detection socket (the per-socket
  policy is what exempts it);
* a plain reply to an ordinary socket is refused by the inbound policy;
* a socket exempt from IPsec but without the detection mark is stopped by the
  closed gate (BPF / netfilter), so only the agent's RRQ gets out in the clear.
"""

from __future__ import annotations

import secrets
import socket

import pytest

from agent.gate import Gate, open_detection_socket
from agent.gate.steer import DETECT_MARK, SO_MARK
from tests.lib.capture import Capture
from tests.netns.test_gate_filter import BACKENDS, recv_or_none, sock_in, try_send
from xfrm import socket_bypass

MN, HA, GW, VIP = "10.62.0.1", "10.62.0.2", "10.62.0.3", "10.99.0.5"


def xfrm_stat(ns) -> dict[str, int]:
    out = {}
    for line in ns.run("cat", "/proc/net/xfrm_stat").stdout.splitlines():
        k, v = line.split()
        out[k] = int(v)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_detection_rrq_bypasses_vpn_policy_ordinary_traffic_does_not(backend, topology, bpffs,  # noqa: F811
                                                                     gate_cache, tmp_path):  # noqa: F811
    mn, far = topology.ns("mn"), topology.ns("far")
    mn_if, far_if = topology.link(mn, far, f"{MN}/24", f"{HA}/24")
    far.addr(far_if, f"{GW}/24")
    # the VPN as a strongSwan client installs it: virtual IP, table 220 routes
    # preferring it as source, and policies for everything through the gateway
    mn.addr("lo", f"{VIP}/32")
    mn.ip("route", "add", "10.62.0.0/24", "dev", mn_if, "src", VIP, "table", "220")
    mn.ip("rule", "add", "pref", "220", "lookup", "220")
    for d, (s, t) in (("out", (MN, GW)), ("in", (GW, MN)), ("fwd", (GW, MN))):
        mn.ip("xfrm", "policy", "add", "src", "0.0.0.0/0", "dst", "0.0.0.0/0", "dir", d,
              "tmpl", "src", s, "dst", t, "proto", "esp", "mode", "tunnel")

    gate = Gate("s" + secrets.token_hex(3), backend=backend, netns=mn.name, bpffs=bpffs, cache_dir=gate_cache)
    socks = []
    try:
        gate.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        gate.attach(mn_if)
        tag = secrets.token_hex(4).encode()
        ha = sock_in(far, bind=(HA, 434))
        det = open_detection_socket(mn_if, MN, netns=mn.name)
        plain = sock_in(mn)
        bound = sock_in(mn, bind=(MN, 0), device=mn_if)           # everything but the bypass
        bound.setsockopt(socket.SOL_SOCKET, SO_MARK, DETECT_MARK)
        nomark = sock_in(mn, bind=(MN, 0), device=mn_if)          # bypass, no detection mark
        socket_bypass(nomark)
        listener = sock_in(mn, bind=(MN, 5555))
        socks += [ha, det, plain, bound, nomark, listener]

        c0, x0 = gate.counters(mn_if), xfrm_stat(mn)
        with Capture(far, far_if, tmp_path / "far.pcap") as cap:
            det.sendto(b"rrq-" + tag, (HA, 434))
            data, peer = recv_or_none(ha)
            assert data == b"rrq-" + tag
            assert peer[0] == MN, "the RRQ must carry the physical address, not the VIP"
            ha.sendto(b"rrp-" + tag, peer)
            det.settimeout(1)
            assert recv_or_none(det) == (b"rrp-" + tag, (HA, 434))

            try_send(plain, b"plain-" + tag, (HA, 434))
            try_send(bound, b"bound-" + tag, (HA, 434))
            try_send(nomark, b"nomark-" + tag, (HA, 434))
            assert recv_or_none(ha, 0.3) is None
            ha.sendto(b"plain-reply-" + tag, (MN, 5555))
            assert recv_or_none(listener, 0.3) is None
        c1, x1 = gate.counters(mn_if), xfrm_stat(mn)
    finally:
        for s in socks:
            s.close()
        gate.destroy()
        gate.release()

    from scapy.layers.inet import IP, UDP
    pkts = cap.packets()
    rrq = [p for p in pkts if p.haslayer(UDP) and b"rrq-" + tag in bytes(p)]
    assert len(rrq) == 1
    assert rrq[0][IP].src == MN and rrq[0][IP].dst == HA and rrq[0][IP].proto == 17
    assert rrq[0][UDP].dport == 434
    for m in (b"plain-", b"bound-", b"nomark-"):
        assert not any(m + tag in bytes(p) and p[IP].src != HA for p in pkts if p.haslayer(IP)), m
    assert not any(p.haslayer(IP) and (p[IP].src == VIP or p[IP].proto == 50) for p in pkts)
    # the policy caught the two sockets without the bypass before they reached the device ...
    assert x1["XfrmOutNoStates"] - x0["XfrmOutNoStates"] == 2
    # ... and refused the plain reply to the ordinary socket
    assert sum(x1[k] - x0[k] for k in x1 if k.startswith("XfrmIn")) >= 1
    # the gate saw the RRQ (passed, marked), the unmarked bypassing datagram
    # (dropped) and nothing of the two caught by the policy
    eg = {f"{kind}.{k}": c1["egress"][kind][k] - c0["egress"][kind][k] for kind in ("pass", "drop")
          for k in c1["egress"][kind] if c1["egress"][kind][k] is not None}
    assert eg["pass.mip"] == 1 and eg["drop.mip_nomark"] == 1 and eg["drop.udp"] == 0
    assert c1["ingress"]["pass"]["mip"] - c0["ingress"]["pass"]["mip"] == 2   # both replies from HA:434
