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

import os
import secrets

import pytest

from agent.gate import Gate, GateState
from agent.gate import loader
from agent.gate.bpf_backend import ensure_bpffs, unmount_bpffs
from tests.lib.names import RUN

ENC_AB, ENC_BA = "0x" + "13579bdf02468ace" * 2, "0x" + "eca86420fdb97531" * 2
AUTH_AB, AUTH_BA = "0x" + "0a1b2c3d" * 8, "0x" + "d3c2b1a0" * 8
A, B, A_IN, B_IN = "10.99.0.1", "10.99.0.2", "192.168.201.1", "192.168.202.1"


@pytest.fixture(scope="module")
def gate_cache(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("gatecache"))
    loader.compiled(d)
    return d


@pytest.fixture(scope="module")
def bpffs():
    root = f"/run/mipmobike/test-{RUN}-{secrets.token_hex(3)}"
    ensure_bpffs(root)
    try:
        yield root
    finally:
        unmount_bpffs(root)
        try:
            os.rmdir(root)
        except OSError:
            pass


def esp_tunnel(topology):
    a, b = topology.ns("a"), topology.ns("b")
    ia, ib = topology.link(a, b, f"{A}/24", f"{B}/24")
    a.addr("lo", f"{A_IN}/32")
    b.addr("lo", f"{B_IN}/32")
    a.route("192.168.202.0/24", "via", B, "src", A_IN)
    b.route("192.168.201.0/24", "via", A, "src", B_IN)
    for n in (a, b):
        n.ip("xfrm", "state", "add", "src", A, "dst", B, "proto", "esp", "spi", "0x3001", "reqid", "1",
             "mode", "tunnel", "enc", "cbc(aes)", ENC_AB, "auth-trunc", "hmac(sha256)", AUTH_AB, "128")
        n.ip("xfrm", "state", "add", "src", B, "dst", A, "proto", "esp", "spi", "0x4002", "reqid", "2",
             "mode", "tunnel", "enc", "cbc(aes)", ENC_BA, "auth-trunc", "hmac(sha256)", AUTH_BA, "128")
    for n, me, peer, lo, hi, out_req, in_req in ((a, A, B, "192.168.201.0/24", "192.168.202.0/24", "1", "2"),
                                                  (b, B, A, "192.168.202.0/24", "192.168.201.0/24", "2", "1")):
        n.ip("xfrm", "policy", "add", "src", lo, "dst", hi, "dir", "out", "tmpl", "src", me, "dst", peer,
             "proto", "esp", "reqid", out_req, "mode", "tunnel")
        n.ip("xfrm", "policy", "add", "src", hi, "dst", lo, "dir", "in", "tmpl", "src", peer, "dst", me,
             "proto", "esp", "reqid", in_req, "mode", "tunnel")
    return a, b, ia


def flat(counters: dict) -> dict:
    return {f"{d}.{k}.{r}": n for d, kinds in counters.items() if d in ("egress", "ingress")
            for k, rs in kinds.items() for r, n in rs.items() if isinstance(n, int)}


@pytest.mark.parametrize("backend,ingress", [("bpf", "tc"), ("bpf", "xdp"), ("netfilter", "tc")])
def test_closed_gate_admits_what_an_sa_decrypted(backend, ingress, topology, bpffs, gate_cache):
    a, b, ia = esp_tunnel(topology)
    g = Gate(f"k{RUN[-6:]}{secrets.token_hex(2)}", backend=backend, netns=a.name, bpffs=bpffs,
             cache_dir=gate_cache, ingress=ingress)
    try:
        g.set_allowed(gateways=[B])
        assert g.attach(ia) == GateState.CLOSED
        before = flat(g.counters(ia))
        # through the tunnel: out as ESP (admitted), back as ESP (admitted), then the decrypted reply
        assert a.ping(B_IN, 3, 2, "-I", A_IN), f"{backend}/{ingress}: the tunnel does not pass the closed gate"
        after = flat(g.counters(ia))
        d = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
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
        final = flat(g.counters(ia))
        assert final.get("ingress.drop.icmp", 0) > after.get("ingress.drop.icmp", 0) or \
            final.get("egress.drop.icmp", 0) > after.get("egress.drop.icmp", 0), final
        g.open(ia)
        assert b.ping(A, 1, 2) and a.ping(B_IN, 1, 2, "-I", A_IN)
    finally:
        try:
            g.destroy()
        finally:
            g.release()
