"""xfrm with kernel ESP (runs in the VM): what the API installs is what
``ip xfrm`` shows, carries pings, migrates under a running ping, expires.

One namespace pair for the module: a (192.168.201.1 on lo) and b
(192.168.202.1 on lo), joined by two veth links, 10.99.0.0/24 and
10.98.0.0/24 (with a second address pair 10.97.0.0/24 on the same link).
The inner routes point at link 2, so link 1 can go down after a migration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import re
import socket
import subprocess
import time

import pytest
from pyroute2 import netns as pr_netns

import xfrm
from xfrm import (Algorithms, Dir, Encap, Lifetime, Mark, Policy, SA, Selector, Template,
                  Xfrm, tunnel_bundle)
from xfrm.model import DEFAULT_OWNER
from tests.lib.topo import Topology

R = DEFAULT_OWNER.reqid_min
A_IN, B_IN = "192.168.201.0/24", "192.168.202.0/24"


@pytest.fixture(scope="module")
def lab():
    subprocess.run(["modprobe", "-a", "esp4", "xfrm_user", "xfrm4_tunnel"], check=False)
    with Topology("xk") as t:
        a, b = t.ns("a"), t.ns("b")
        l1a, l1b = t.link(a, b, "10.99.0.1/24", "10.99.0.2/24")
        l2a, l2b = t.link(a, b, "10.98.0.1/24", "10.98.0.2/24")
        a.addr(l2a, "10.97.0.1/24")
        b.addr(l2b, "10.97.0.2/24")
        a.addr("lo", "192.168.201.1/32")
        b.addr("lo", "192.168.202.1/32")
        a.route(B_IN, "via", "10.98.0.2", "src", "192.168.201.1")
        b.route(A_IN, "via", "10.98.0.1", "src", "192.168.202.1")
        # IKE-like UDP 4500 sockets: ESP-in-UDP is decapsulated only where one listens
        socks = []
        for n in (a, b):
            s = pr_netns.create_socket(n.name, socket.AF_INET, socket.SOCK_DGRAM, flags=0)
            s.bind(("0.0.0.0", 4500))
            xfrm.socket_bypass(s)
            xfrm.socket_espinudp(s)
            socks.append(s)
        try:
            with Xfrm(a.name) as xa, Xfrm(b.name) as xb:
                yield dict(a=a, b=b, xa=xa, xb=xb, l1a=l1a)
        finally:
            for s in socks:
                s.close()


@pytest.fixture
def clean(lab):
    yield
    for x in (lab["xa"], lab["xb"]):
        x.flush_owned()
    for n in (lab["a"], lab["b"]):
        n.ip("xfrm", "policy", "flush")
        n.ip("xfrm", "state", "flush")


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def pair(la, lb, spi_a_in, spi_b_in, algs_ab, algs_ba, encap=None, **kw):
    """Mirror bundles for a and b: a's outbound is b's inbound."""
    ea = eb = None
    if encap:
        ea, eb = encap, (encap[1], encap[0])
    ba = tunnel_bundle(local=la, remote=lb, local_ts=[A_IN], remote_ts=[B_IN], spi_in=spi_a_in,
                       spi_out=spi_b_in, algs_in=algs_ba, algs_out=algs_ab, reqid=R + 1,
                       encap_ports=ea, **kw)
    bb = tunnel_bundle(local=lb, remote=la, local_ts=[B_IN], remote_ts=[A_IN], spi_in=spi_b_in,
                       spi_out=spi_a_in, algs_in=algs_ab, algs_out=algs_ba, reqid=R + 1,
                       encap_ports=eb, **kw)
    return ba, bb


def ping(ns, count=3, interval="0.2"):
    p = ns.run("ping", "-n", "-q", "-c", str(count), "-i", interval, "-W", "3",
               "-I", "192.168.201.1", "192.168.202.1", check=False, timeout=60)
    m = re.search(r"(\d+) received", p.stdout)
    return int(m.group(1)) if m else 0


GCM_KEYS = (bytes(range(20)), bytes(range(100, 120)))
CBC = (Algorithms.cbc_hmac(bytes(range(16)), bytes(range(32)), "sha256"),
       Algorithms.cbc_hmac(bytes(range(50, 66)), bytes(range(64, 96)), "sha256"))


@pytest.mark.parametrize("algs,encap", [
    ("gcm", None), ("gcm", (4500, 4500)), ("cbc", None), ("cbc", (4500, 4500))],
    ids=["gcm", "gcm-udp", "cbc-hmac", "cbc-hmac-udp"])
def test_ping_through_api_bundles(lab, clean, algs, encap):
    a, b, xa, xb = lab["a"], lab["b"], lab["xa"], lab["xb"]
    if algs == "gcm":
        ab, ba = Algorithms.gcm(GCM_KEYS[0], 16), Algorithms.gcm(GCM_KEYS[1], 16)
    else:
        ab, ba = CBC
    # a's inbound SPI comes from the kernel (ALLOCSPI, completed in place by install)
    spi_a_in = xa.allocate_spi("10.99.0.2", "10.99.0.1", reqid=R + 1)
    ba_, bb_ = pair("10.99.0.1", "10.99.0.2", spi_a_in, 0xB0000001, ab, ba, encap)
    mon = None
    if encap and algs == "cbc":
        # b expects a behind port 4501: a's packets from 4500 look like a NAT rebinding
        bb_ = dataclasses.replace(bb_, inbound=dataclasses.replace(
            bb_.inbound, encap=Encap(4501, 4500)))
        mon = xfrm.XfrmMonitor(b.name, [xfrm.Group.MAPPING]).open()
    xa.install(ba_)
    xb.install(bb_)
    assert ping(a) == 3
    if mon is not None:
        with mon:
            ev = asyncio.run(mon.get(timeout=5))
        assert isinstance(ev, xfrm.Mapping), ev
        assert (ev.sa.spi, ev.reqid, ev.old_sport, ev.new_sport) == \
            (0xB0000001, R + 1, 4501, 4500), ev
        assert str(ev.old_src) == str(ev.new_src) == "10.99.0.1"
    for x, bundle in ((xa, ba_), (xb, bb_)):
        out, inn = x.get_sa(bundle.outbound), x.get_sa(bundle.inbound)
        assert out.counters.packets >= 3 and inn.counters.packets >= 3, (out, inn)
        assert out.replay.oseq >= 3 and inn.replay.seq >= 3
        assert inn.stats.integrity_failed == 0 and inn.stats.replay == 0
    state = norm(a.ip("xfrm", "state").stdout)
    if encap:
        assert "encap type espinudp sport 4500 dport 4500" in state, state
    else:
        assert "encap" not in state
    xa.remove(ba_)
    xb.remove(bb_)
    assert a.ip("xfrm", "state").stdout.strip() == ""
    assert " dir " not in a.ip("xfrm", "policy").stdout     # only the 4500 socket's policies


def test_fields_match_ip_xfrm(lab, clean):
    """Every field the API sets shows up in ``ip xfrm`` the same; then update,
    expiry events, typed errors and the all-or-nothing install."""
    a, xa = lab["a"], lab["xa"]
    lt = Lifetime(soft_bytes=1_000_000, hard_bytes=2_000_000, soft_packets=1000,
                  hard_packets=2000, soft_add_seconds=3000, hard_add_seconds=3600,
                  soft_use_seconds=1500, hard_use_seconds=1800)
    sas = [
        SA("203.0.113.1", "203.0.113.2", 0xC0000008, Algorithms.gcm(bytes(20), 8), reqid=R + 2,
           replay_window=64, esn=True, lifetime=lt, mark=Mark(0x10, 0xF0), if_id=7,
           encap=Encap(4500, 4501, oa="198.51.100.9"),
           selector=Selector("10.11.0.0/16", "10.12.0.0/16")),
        SA("203.0.113.1", "203.0.113.2", 0xC000000C, Algorithms.gcm(bytes(28), 12),
           reqid=R + 3),
        SA("203.0.113.1", "203.0.113.2", 0xC0000010, Algorithms.gcm(bytes(36), 16),
           reqid=R + 4, mode=xfrm.Mode.TRANSPORT,
           selector=Selector.host_pair("203.0.113.1", "203.0.113.2")),
        SA("203.0.113.1", "203.0.113.2", 0xC0000384,
           Algorithms.cbc_hmac(bytes(32), bytes(48), "sha384"), reqid=R + 5),
        SA("203.0.113.1", "203.0.113.2", 0xC0000512,
           Algorithms.cbc_hmac(bytes(24), bytes(64), "sha512"), reqid=R + 6, replay_window=16),
    ]
    for sa in sas:
        xa.add_sa(sa)

    def ip_sa(spi):
        """``ip xfrm state get`` plain (algorithms) and with -s (lifetimes)."""
        args = ["xfrm", "state", "get", "src", "203.0.113.1", "dst", "203.0.113.2",
                "proto", "esp", "spi", hex(spi)]
        if spi == 0xC0000008:
            args += ["mark", "0x10", "mask", "0xf0"]
        return norm(a.ip(*args).stdout + " || " + a.ip("-s", *args).stdout)

    s = ip_sa(0xC0000008)
    for want in ("proto esp spi 0xc0000008", f"reqid {R + 2}", "mode tunnel",
                 "replay-window 0", "flag esn", "aead rfc4106(gcm(aes)) 0x" + "00" * 20 + " 64",
                 "encap type espinudp sport 4500 dport 4501 addr 198.51.100.9",
                 "mark 0x10/0xf0", "if_id 0x7", "sel src 10.11.0.0/16 dst 10.12.0.0/16",
                 "limit: soft 1000000(bytes), hard 2000000(bytes)",
                 "limit: soft 1000(packets), hard 2000(packets)",
                 "expire add: soft 3000(sec), hard 3600(sec)",
                 "expire use: soft 1500(sec), hard 1800(sec)",
                 "replay_window 64"):
        assert want in s, (want, s)
    assert "aead rfc4106(gcm(aes)) 0x" + "00" * 28 + " 96" in ip_sa(0xC000000C)
    s = ip_sa(0xC0000010)
    assert "mode transport" in s and "sel src 203.0.113.1/32 dst 203.0.113.2/32" in s, s
    s = ip_sa(0xC0000384)
    assert "enc cbc(aes) 0x" + "00" * 32 in s and "auth-trunc hmac(sha384) 0x" + "00" * 48 + \
        " 192" in s, s
    s = ip_sa(0xC0000512)
    assert "auth-trunc hmac(sha512) 0x" + "00" * 64 + " 256" in s and "replay-window 16" in s

    # read back through the API: same fields
    for sa in sas:
        got = xa.get_sa(sa)
        assert (got.algorithms, got.reqid, got.mode, got.encap, got.mark, got.if_id,
                got.selector, got.esn, got.replay_window) == \
            (sa.algorithms, sa.reqid, sa.mode, sa.encap, sa.mark, sa.if_id,
             sa.selector, sa.esn, sa.replay_window)
    assert xa.get_sa(sas[0]).lifetime == lt
    # update in place: new lifetimes, new NAT-T ports
    lt2 = Lifetime(soft_add_seconds=100, hard_add_seconds=200)
    xa.update_sa(dataclasses.replace(sas[0], lifetime=lt2, encap=Encap(4600, 4601)))
    got = xa.get_sa(sas[0])
    assert got.lifetime == lt2 and (got.encap.sport, got.encap.dport) == (4600, 4601)
    assert "expire add: soft 100(sec), hard 200(sec)" in ip_sa(0xC0000008)

    # typed errors from a kernel with ESP
    with pytest.raises(xfrm.AlgorithmUnavailable) as ei:
        xa.add_sa(SA("203.0.113.1", "203.0.113.2", 0xD1, xfrm.Algorithms(
            crypt=xfrm.Crypt("cbc(nosuchcipher)", bytes(16)),
            auth=xfrm.Auth("hmac(sha256)", bytes(32), 128)), reqid=R + 7))
    assert ei.value.errno == errno.ENOSYS and "cbc(nosuchcipher)" in str(ei.value)
    with pytest.raises(xfrm.XfrmExists):
        xa.add_sa(sas[1])

    # all or nothing: the third item (the out policy) collides with a foreign one
    a.ip("xfrm", "policy", "add", "src", "10.40.0.0/24", "dst", "10.41.0.0/24", "dir", "out",
         "action", "block")
    b1, _ = pair("203.0.113.5", "203.0.113.6", 0xE1, 0xE2, *CBC)
    b1 = dataclasses.replace(b1, policies=[
        Policy(Selector("10.40.0.0/24", "10.41.0.0/24"), Dir.OUT,
               templates=[Template("203.0.113.5", "203.0.113.6", reqid=R + 1)])])
    with pytest.raises(xfrm.XfrmExists):
        xa.install(b1)
    left = a.ip("xfrm", "state").stdout
    assert "203.0.113.5" not in left and "203.0.113.6" not in left, left
    pols = norm(a.ip("xfrm", "policy").stdout)
    assert "src 10.40.0.0/24 dst 10.41.0.0/24 dir out" in pols and "tmpl" not in pols

    # owned flush: everything of ours, nothing else
    a.ip("xfrm", "state", "add", "src", "203.0.113.1", "dst", "203.0.113.2", "proto", "esp",
         "spi", "0x77", "reqid", "77", "mode", "tunnel", "aead", "rfc4106(gcm(aes))",
         "0x" + "11" * 20, "128")
    assert xa.flush_owned() == (len(sas), 0)
    assert [sa.spi for sa in xa.sas()] == [0x77]


def test_expire_events(lab, clean):
    """Soft then hard expiry of an SA arrive as typed events."""
    b = lab["b"]

    async def main():
        async with xfrm.AsyncXfrm(b.name) as x, \
                xfrm.XfrmMonitor(b.name, [xfrm.Group.EXPIRE, xfrm.Group.SA]) as mon:
            sa = SA("203.0.113.7", "203.0.113.8", 0xF1, CBC[0], reqid=R + 8,
                    lifetime=Lifetime(soft_add_seconds=1, hard_add_seconds=2))
            await x.add_sa(sa)
            seen = []
            deadline = time.monotonic() + 15
            while not any(isinstance(e, xfrm.Expire) and e.hard for e in seen):
                seen.append(await mon.get(timeout=max(0.1, deadline - time.monotonic())))
            kinds = [(type(e).__name__, getattr(e, "hard", getattr(e, "kind", None)))
                     for e in seen]
            assert kinds[0] == ("SAChanged", "new"), kinds
            soft = [e for e in seen if isinstance(e, xfrm.Expire) and not e.hard]
            assert soft and soft[0].sa.spi == 0xF1 and soft[0].sa.reqid == R + 8, kinds
            assert kinds.index(("Expire", False)) < kinds.index(("Expire", True))
            with pytest.raises(xfrm.XfrmNotFound):
                await x.get_sa(sa)
            # an explicit delete is an SA event too
            other = SA("203.0.113.7", "203.0.113.8", 0xF2, CBC[1], reqid=R + 9)
            await x.add_sa(other)
            await x.delete_sa(other)
            evs = []
            while not evs or evs[-1].kind != "delete":
                e = await mon.get(timeout=5)
                if isinstance(e, xfrm.SAChanged) and e.sa.spi == 0xF2:
                    evs.append(e)
            assert [e.kind for e in evs] == ["new", "delete"]
            assert evs[1].sa.reqid == R + 9 and evs[1].sa.algorithms == CBC[1]
    asyncio.run(main())


def test_migrate_while_pinging(lab, clean):
    """MOBIKE moves under a running ping: to link 2 with UDP encapsulation
    (kernel MIGRATE), then to another address pair without it (a: read,
    delete, re-add; b: MIGRATE plus re-add where the kernel keeps the
    encapsulation). Replay counters keep counting up."""
    a, b, xa, xb = lab["a"], lab["b"], lab["xa"], lab["xb"]
    ab, ba = Algorithms.gcm(GCM_KEYS[0], 16), Algorithms.gcm(GCM_KEYS[1], 16)
    bun_a, bun_b = pair("10.99.0.1", "10.99.0.2", 0xA1000001, 0xB1000001, ab, ba,
                        esn=True, replay_window=64)
    xa.install(bun_a)
    xb.install(bun_b)
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", a.name, "ping", "-n", "-i", "0.1", "-c", "100", "-W", "2",
         "-I", "192.168.201.1", "192.168.202.1"], stdout=subprocess.PIPE, text=True)

    def seqs():
        return (xa.get_sa(bun_a.outbound).replay.outbound_count,
                xb.get_sa(bun_b.inbound).replay.inbound_count)

    def flowing(base, n=5, timeout=20.0):
        """Wait (a loaded emulated CPU starts ping late) until n more packets went each way."""
        deadline = time.monotonic() + timeout
        while True:
            cur = seqs()
            if (cur[0] >= base[0] + n and cur[1] >= base[1] + n) or time.monotonic() > deadline:
                return cur
            time.sleep(0.1)

    try:
        before = flowing((0, 0))
        assert before[0] >= 5 and before[1] >= 5, before
        # step 1: onto link 2, into a "NAT" (ESP in UDP 4500)
        bun_a = xa.migrate(bun_a, local="10.98.0.1", remote="10.98.0.2",
                           encap_ports=(4500, 4500))
        bun_b = xb.migrate(bun_b, local="10.98.0.2", remote="10.98.0.1",
                           encap_ports=(4500, 4500))
        assert xa.migrate_supported is True       # the VM kernel has XFRM_MSG_MIGRATE
        after = seqs()
        assert after[0] >= before[0] and after[1] >= before[1], (before, after)
        a.ip("link", "set", lab["l1a"], "down")   # the old path is gone
        mid = flowing(after, 6)
        assert mid[0] > after[0] + 5 and mid[1] > after[1] + 5, (after, mid)
        st = norm(a.ip("xfrm", "state").stdout)
        assert "src 10.98.0.1 dst 10.98.0.2" in st and "encap type espinudp" in st, st
        pol = norm(a.ip("xfrm", "policy").stdout)
        assert "tmpl src 10.98.0.1 dst 10.98.0.2" in pol and "10.99.0." not in pol, pol
        # step 2: other addresses, out of the NAT; a without MIGRATE
        xa.migrate_supported = False
        bun_a = xa.migrate(bun_a, local="10.97.0.1", remote="10.97.0.2", encap_ports=None)
        bun_b = xb.migrate(bun_b, local="10.97.0.2", remote="10.97.0.1", encap_ports=None)
        after2 = seqs()
        assert after2[0] >= mid[0] and after2[1] >= mid[1], (mid, after2)
        end = flowing(after2, 6)
        assert end[0] > after2[0] + 5 and end[1] > after2[1] + 5, (after2, end)
        for n in (a, b):
            st = norm(n.ip("xfrm", "state").stdout)
            assert "10.97.0.1" in st and "10.98.0." not in st and "encap" not in st, st
        out = xa.get_sa(bun_a.outbound)
        assert out.esn and out.counters.packets >= end[0] - 3     # counters carried over
    finally:
        try:
            stdout, _ = pinger.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pinger.kill()
            stdout, _ = pinger.communicate()
        a.ip("link", "set", lab["l1a"], "up")
    m = re.search(r"(\d+) packets transmitted, (\d+) received", stdout)
    sent, got = int(m.group(1)), int(m.group(2))
    assert sent == 100 and got >= sent - 6, stdout
    assert xb.get_sa(bun_b.inbound).stats.integrity_failed == 0
