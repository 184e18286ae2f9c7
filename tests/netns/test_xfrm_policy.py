"""xfrm on the host kernel (no ESP needed): policies, ownership, errors, probe.

What the API adds must be what ``ip xfrm policy`` shows, field by field.
"""

from __future__ import annotations

import errno
import os
import re

import pytest

import xfrm
from xfrm import (Action, Algorithms, Dir, Lifetime, Mark, Policy, Selector, Template, Xfrm)
from xfrm.model import DEFAULT_OWNER, policy_from_msg, policy_to_msg, sa_from_msg, sa_to_msg
from tests.lib.topo import Topology

R = DEFAULT_OWNER.reqid_min          # reqids we own


@pytest.fixture(scope="module")
def ns():
    with Topology("xp") as t:
        yield t.ns("a")


@pytest.fixture
def x(ns):
    with Xfrm(ns.name) as h:
        try:
            yield h
        finally:
            h.flush_owned()
            ns.ip("xfrm", "policy", "flush")


def ip_policies(ns) -> list[str]:
    """``ip xfrm policy`` output split per policy, whitespace normalised."""
    out = ns.ip("xfrm", "policy").stdout
    blocks, cur = [], []
    for line in out.splitlines():
        if line and not line[0].isspace() and cur:
            blocks.append(" ".join(cur))
            cur = []
        cur.append(line.strip())
    if cur:
        blocks.append(" ".join(cur))
    return [re.sub(r"\s+", " ", b) for b in blocks if b.strip()]


def block_for(blocks, sel_src, sel_dst, direction):
    hits = [b for b in blocks if b.startswith(f"src {sel_src} dst {sel_dst}")
            and f"dir {direction} " in b + " "]
    assert len(hits) == 1, (sel_src, sel_dst, direction, blocks)
    return hits[0]


def test_policies_match_ip_xfrm(ns, x):
    tun = Template("192.0.2.1", "198.51.100.7", reqid=R + 1)
    pols = [
        Policy(Selector("10.1.0.0/16", "10.2.0.0/24"), Dir.OUT, priority=1000,
               templates=[tun]),
        Policy(Selector("10.2.0.0/24", "10.1.0.0/16"), Dir.IN, priority=1001,
               templates=[Template("198.51.100.7", "192.0.2.1", reqid=R + 1, optional=True)],
               mark=Mark(0x5, 0xFF)),
        Policy(Selector("10.2.0.0/24", "10.1.0.0/16"), Dir.FWD, priority=1002,
               templates=[Template("198.51.100.7", "192.0.2.1", reqid=R + 2)], if_id=0x42),
        Policy(Selector("10.3.0.0/16", "0.0.0.0/0", proto=17, dport=4500), Dir.OUT,
               priority=50, action=Action.ALLOW),
        Policy(Selector("10.4.0.0/16", "10.5.0.0/16"), Dir.OUT, priority=60,
               action=Action.BLOCK),
        Policy(Selector("fd00:1::/64", "fd00:2::/64"), Dir.OUT, priority=70,
               templates=[Template("2001:db8::1", "2001:db8::2", reqid=R + 3)]),
    ]
    for p in pols:
        x.add_policy(p)

    blocks = ip_policies(ns)
    b = block_for(blocks, "10.1.0.0/16", "10.2.0.0/24", "out")
    assert "priority 1000" in b and "tmpl src 192.0.2.1 dst 198.51.100.7" in b
    assert f"proto esp reqid {R + 1} mode tunnel" in b and "level use" not in b
    b = block_for(blocks, "10.2.0.0/24", "10.1.0.0/16", "in")
    assert "priority 1001" in b and "mark 0x5/0xff" in b and "level use" in b
    b = block_for(blocks, "10.2.0.0/24", "10.1.0.0/16", "fwd")
    assert "if_id 0x42" in b and f"reqid {R + 2}" in b
    b = block_for(blocks, "10.3.0.0/16", "0.0.0.0/0", "out")
    assert "proto udp dport 4500" in b and "tmpl" not in b
    b = block_for(blocks, "10.4.0.0/16", "10.5.0.0/16", "out")
    assert "action block" in b
    b = block_for(blocks, "fd00:1::/64", "fd00:2::/64", "out")
    assert "tmpl src 2001:db8::1 dst 2001:db8::2" in b

    # and the dump reads back what was added
    dumped = {(p.selector, p.dir): p for p in x.policies()}
    for p in pols:
        got = dumped[(p.selector, p.dir)]
        assert (got.priority, got.action, got.templates, got.mark, got.if_id) == \
            (p.priority, p.action, p.templates, p.mark, p.if_id)
        assert DEFAULT_OWNER.owns_policy(got)          # every one got an owned index
    assert x.get_policy(pols[1]).templates == pols[1].templates


def test_policy_update_get_delete(ns, x):
    sel = Selector("10.9.0.0/24", "10.8.0.0/24")
    p = Policy(sel, Dir.OUT, priority=5, templates=[Template("192.0.2.1", "192.0.2.2",
                                                            reqid=R + 9)])
    x.add_policy(p)
    with pytest.raises(xfrm.XfrmExists) as ei:
        x.add_policy(p)
    assert ei.value.errno == errno.EEXIST and ei.value.operation == "add policy"
    index = x.get_policy(p).index
    p2 = Policy(sel, Dir.OUT, priority=6, templates=[Template("192.0.2.3", "192.0.2.2",
                                                             reqid=R + 9)])
    x.update_policy(p2)
    got = x.get_policy(p2.id)
    assert got.priority == 6 and got.templates[0].src.compressed == "192.0.2.3"
    assert got.index == index                        # update keeps the index
    assert "tmpl src 192.0.2.3 dst 192.0.2.2" in block_for(ip_policies(ns), "10.9.0.0/24",
                                                           "10.8.0.0/24", "out")
    assert x.delete_policy(p2) is True
    assert x.delete_policy(p2, missing_ok=True) is False
    with pytest.raises(xfrm.XfrmNotFound) as ei:
        x.get_policy(p2)
    assert ei.value.errno == errno.ENOENT and "get policy" in str(ei.value)


def test_lifetime_and_flush_spares_foreign(ns, x):
    # a foreign daemon's policies (reqid 5, no index of ours) must survive
    ns.ip("xfrm", "policy", "add", "src", "10.20.0.0/16", "dst", "10.21.0.0/16", "dir", "out",
          "tmpl", "src", "192.0.2.1", "dst", "192.0.2.9", "proto", "esp", "reqid", "5",
          "mode", "tunnel")
    ns.ip("xfrm", "policy", "add", "src", "10.22.0.0/16", "dst", "10.23.0.0/16", "dir", "in",
          "action", "block")
    lt = Lifetime(soft_add_seconds=3000, hard_add_seconds=3600, soft_packets=1000)
    ours = [Policy(Selector("10.30.0.0/16", "10.31.0.0/16"), Dir.OUT, lifetime=lt,
                   templates=[Template("192.0.2.1", "192.0.2.9", reqid=R + 30)]),
            Policy(Selector("10.32.0.0/16", "10.33.0.0/16"), Dir.IN, action=Action.BLOCK)]
    for p in ours:
        x.add_policy(p)
    got = x.get_policy(ours[0])
    assert got.lifetime == lt
    out = re.sub(r"\s+", " ", ns.ip("-s", "xfrm", "policy", "get", "src", "10.30.0.0/16",
                                    "dst", "10.31.0.0/16", "dir", "out").stdout)
    assert "limit: soft 1000(packets), hard (INF)(packets)" in out, out
    assert "expire add: soft 3000(sec), hard 3600(sec)" in out, out
    assert f"index {got.index} " in out and DEFAULT_OWNER.owns_index(got.index), out
    assert len(x.policies(owned_only=True)) == 2
    assert x.flush_owned() == (0, 2)
    left = ip_policies(ns)
    assert len(left) == 2 and any("10.20.0.0/16" in b for b in left) \
        and any("10.22.0.0/16" in b for b in left), left


def test_reqid_allocation_and_range(x):
    r1 = x.allocate_reqid()
    r2 = x.allocate_reqid()
    assert r1 != r2 and DEFAULT_OWNER.owns_reqid(r1) and DEFAULT_OWNER.owns_reqid(r2)
    with pytest.raises(ValueError, match="outside"):
        x.add_policy(Policy(Selector("10.0.0.0/8", "0.0.0.0/0"), Dir.OUT,
                            templates=[Template("192.0.2.1", "192.0.2.2", reqid=7)]))


def test_error_mapping(ns, x):
    # a kernel without ESP says so in plain words; a kernel with it takes the SA
    sa = xfrm.SA("192.0.2.1", "192.0.2.2", 0x4242, Algorithms.cbc_hmac(bytes(16), bytes(32)),
                 reqid=R + 40)
    if xfrm.probe().esp:
        x.add_sa(sa)
        assert x.get_sa(sa).spi == 0x4242
    else:
        with pytest.raises(xfrm.EspUnavailable) as ei:
            x.add_sa(sa)
        e = ei.value
        assert e.errno == errno.EPROTONOSUPPORT and e.operation == "add SA"
        assert "this kernel has no ESP support" in str(e) and "spi=0x00004242" in str(e)
        assert isinstance(e, OSError) and isinstance(e, xfrm.XfrmUnsupported)
    with pytest.raises(xfrm.XfrmNotFound) as ei:
        x.delete_sa(xfrm.SAId(xfrm.model.ip("192.0.2.77"), 0x999))
    assert ei.value.errno == errno.ESRCH and ei.value.operation == "delete SA"
    assert x.delete_sa(xfrm.SAId(xfrm.model.ip("192.0.2.77"), 0x999), missing_ok=True) is False
    with pytest.raises(xfrm.NamespaceNotFound):
        Xfrm("mm-no-such-netns-" + os.urandom(3).hex())
    # MIGRATE of a policy that is not there: the kernel's ENOENT, typed
    ghost = Policy(Selector("10.77.0.0/16", "10.78.0.0/16"), Dir.OUT,
                   templates=[Template("192.0.2.1", "192.0.2.2", reqid=R + 77)])
    b = xfrm.Bundle(xfrm.SA("192.0.2.1", "192.0.2.2", 0x77, reqid=R + 77),
                    xfrm.SA("192.0.2.2", "192.0.2.1", 0x78, reqid=R + 77), [ghost])
    with pytest.raises(xfrm.XfrmNotFound) as ei:
        x.migrate(b, local="192.0.2.5", remote="192.0.2.2")
    assert ei.value.operation in ("migrate", "get SA")
    # the kernel's own validation: a template mode it does not know
    bad = Policy(Selector("10.79.0.0/16", "10.80.0.0/16"), Dir.OUT,
                 templates=[Template("192.0.2.1", "192.0.2.2", reqid=R + 79, mode=xfrm.Mode.BEET,
                                     proto=200)])
    with pytest.raises(xfrm.XfrmInvalid) as ei:
        x.add_policy(bad)
    assert ei.value.errno == errno.EINVAL


def test_probe_and_no_leftover_namespaces():
    before = set(os.listdir("/run/netns"))
    r = xfrm.probe()
    assert set(os.listdir("/run/netns")) == before
    assert r.migrate is True                    # the host kernel has CONFIG_XFRM_MIGRATE
    if not r.esp:
        assert "no ESP" in r.esp_error and r.algorithms == {}
    else:
        assert r.algorithms["cbc(aes)+hmac(sha256)"]
    assert "XFRM migrate: yes" in str(r)
    ok, detail = xfrm.probe_migrate()             # what `mipmobike doctor` calls
    assert ok is True and "MIGRATE" in detail


def test_codec_round_trip():
    """Model -> pyroute2 message -> bytes -> message -> model is the identity."""
    from xfrm import messages as m
    sa = xfrm.SA("192.0.2.1", "192.0.2.2", 0xdeadbeef,
                 Algorithms.gcm(bytes(range(20)), 12), reqid=R, esn=True, replay_window=128,
                 encap=xfrm.Encap(4500, 4501), mark=Mark(1, 3), if_id=9,
                 lifetime=Lifetime(soft_bytes=10, hard_packets=20, soft_add_seconds=5),
                 selector=Selector("10.0.0.0/8", "10.1.0.0/16", proto=6, dport=80),
                 replay=xfrm.ReplayState(oseq=7, seq=9, seq_hi=1, bitmap=(1, 2, 3, 4),
                                         window=128),
                 counters=xfrm.Counters(100, 2, 1700000000, 0),
                 output_mark=Mark(0x10, 0xF0))
    msg = sa_to_msg(sa)
    msg.encode()
    back = m.xfrm_usersa_info(bytes(msg.data))
    back.decode()
    got = sa_from_msg(back)
    assert got.algorithms == sa.algorithms and got.encap == sa.encap and got.mark == sa.mark
    assert got.replay.bitmap == (1, 2, 3, 4) and got.replay.inbound_count == (1 << 32) | 9
    assert (got.esn, got.replay_window, got.if_id, got.selector, got.lifetime, got.counters,
            got.output_mark) == (True, 128, 9, sa.selector, sa.lifetime, sa.counters,
                                 sa.output_mark)
    pol = Policy(Selector("10.0.0.0/8", "0.0.0.0/0"), Dir.FWD, priority=3, index=0x6D6D0012,
                 templates=[Template("192.0.2.1", "192.0.2.2", reqid=R, optional=True),
                            Template(reqid=R + 1, mode=xfrm.Mode.TRANSPORT)],
                 mark=Mark(4), if_id=2)
    msg = policy_to_msg(pol)
    msg.encode()
    back = m.xfrm_userpolicy_info(bytes(msg.data))
    back.decode()
    got = policy_from_msg(back)
    assert got.templates[0] == pol.templates[0]
    assert got.templates[1].mode == xfrm.Mode.TRANSPORT and got.templates[1].src is None
    assert (got.selector, got.dir, got.priority, got.index, got.mark, got.if_id) == \
        (pol.selector, pol.dir, pol.priority, pol.index, pol.mark, pol.if_id)
    # keys stay out of logs
    assert bytes(range(20)).hex() not in repr(sa) and "\\x00\\x01\\x02" not in repr(sa)
