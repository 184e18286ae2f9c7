"""The closed gate and IPsec tunnel mode (needs ESP: the kernel tier).

A MOBIKE-only move keeps the gate closed until the verdict and relies on ESP
from the gateway passing it. In tunnel mode the kernel decrypts that ESP and
hands the inner packet to the same device again, so an ingress hook that runs
in the stack (TC, netfilter PREROUTING) sees it a second time: it has to let
packets through that an SA decrypted, or replies only arrive once the gate
opens (the bench caught this: echoes 7 s late after every MOBIKE-only move
with TC ingress). Native XDP sees only the outer packet.

    a (gated, 10.99.0.1; inner 192.168.201.1) <- ESP tunnel -> b (10.99.0.2; inner 192.168.202.1)
"""

from __future__ import annotations

import secrets

import pytest

from agent.gate import Gate, GateState
from tests.lib.esp import A, A_IN, B, B_IN, esp_tunnel
from tests.lib.names import RUN
from tests.netns.test_gate_filter import delta


@pytest.mark.parametrize("backend,ingress", [("bpf", "tc"), ("bpf", "xdp"), ("netfilter", "tc")])
def test_closed_gate_admits_what_an_sa_decrypted(backend, ingress, topology, bpffs, gate_cache):
    a, b, ia, _ = esp_tunnel(topology)
    g = Gate(f"k{RUN[-6:]}{secrets.token_hex(2)}", backend=backend, netns=a.name, bpffs=bpffs,
             cache_dir=gate_cache, ingress=ingress)
    try:
        g.set_allowed(gateways=[B])
        assert g.attach(ia) == GateState.CLOSED
        before = g.counters(ia)
        # through the tunnel: out as ESP (admitted), back as ESP (admitted), then the decrypted reply
        assert a.ping(B_IN, 3, 2, "-I", A_IN), f"{backend}/{ingress}: the tunnel does not pass the closed gate"
        after = g.counters(ia)
        d = delta(after, before)
        assert d.get("egress.pass.esp", 0) >= 3 and d.get("ingress.pass.esp", 0) >= 3, d
        if ingress == "tc":
            assert d.get("ingress.pass.ipsec", 0) >= 3, d      # the inner replies, seen a second time
        else:
            assert d.get("ingress.pass.ipsec", 0) == 0, d      # native XDP sees only the outer packet
        # netfilter's POSTROUTING also sees the requests before encryption; TC egress only the ESP
        assert (d.get("egress.pass.ipsec", 0) >= 3) == (backend == "netfilter"), d
        assert not any(".drop." in k for k in d), d
        # what did not come through an SA is still stopped, both ways
        assert not b.ping(A, 1, 1), "clear ICMP from the peer crossed the closed gate"
        assert not a.ping(B, 1, 1), "clear ICMP to the peer left through the closed gate"
        d = delta(g.counters(ia), after)
        assert d.get("ingress.drop.icmp", 0) > 0 or d.get("egress.drop.icmp", 0) > 0, d
        g.open(ia)
        assert b.ping(A, 1, 2) and a.ping(B_IN, 1, 2, "-I", A_IN)
    finally:
        try:
            g.destroy()
        finally:
            g.release()
