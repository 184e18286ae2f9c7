"""xfrm events and per-socket bypass on the host kernel (no ESP needed).

Two namespaces joined by a veth (loopback traffic never meets XFRM).
"""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest
from pyroute2 import netns as pr_netns

import xfrm
from xfrm import (Action, AsyncXfrm, Dir, Lifetime, Policy, Selector, Template, XfrmMonitor)
from xfrm.model import DEFAULT_OWNER
from tests.lib.topo import Topology

R = DEFAULT_OWNER.reqid_min


@pytest.fixture(scope="module")
def pair():
    with Topology("xe") as t:
        a, b = t.ns("a"), t.ns("b")
        t.link(a, b, "10.60.0.1/24", "10.60.0.2/24")
        a.route("10.55.0.0/16", "via", "10.60.0.2")
        yield a, b


@pytest.fixture
def clean(pair):
    yield
    for n in pair:
        n.ip("xfrm", "policy", "flush")
        n.ip("xfrm", "state", "flush")


async def drain(mon, timeout=0.3):
    out = []
    try:
        while True:
            out.append(await mon.get(timeout=timeout))
    except asyncio.TimeoutError:
        return out


def udp_in(ns, bind=None):
    s = pr_netns.create_socket(ns.name, socket.AF_INET, socket.SOCK_DGRAM, flags=0)
    if bind:
        s.bind(bind)
    return s


def test_policy_events_acquire_and_spi(pair, clean):
    a, _ = pair

    async def main():
        async with AsyncXfrm(a.name) as x, XfrmMonitor(a.name) as mon:
            sel = Selector("10.60.0.0/24", "10.55.0.0/16")
            p = Policy(sel, Dir.OUT, priority=10,
                       templates=[Template("192.0.2.1", "192.0.2.2", reqid=R + 1)])
            await x.add_policy(p)
            await x.update_policy(Policy(sel, Dir.OUT, priority=11, templates=p.templates))
            evs = await drain(mon)
            assert [(type(e).__name__, e.kind) for e in evs] == \
                [("PolicyChanged", "new"), ("PolicyChanged", "update")]
            assert evs[0].policy.selector == sel and evs[0].policy.templates == p.templates
            assert evs[1].policy.priority == 11

            # traffic without an SA: the kernel asks for one
            s = udp_in(a)
            try:
                s.sendto(b"hello", ("10.55.0.9", 9))
            except OSError as e:                  # a larval-drop blackhole may refuse it
                assert e.errno in (errno.EAGAIN, errno.EHOSTUNREACH), e
            finally:
                s.close()
            acq = [e for e in await drain(mon) if isinstance(e, xfrm.Acquire)]
            assert len(acq) == 1, acq
            ev = acq[0]
            assert ev.template.reqid == R + 1 and str(ev.dst) == "192.0.2.2"
            assert str(ev.selector.dst) == "10.55.0.9/32" and ev.selector.proto == 17
            assert ev.policy.dir == Dir.OUT and ev.policy.selector == sel

            # ALLOCSPI: the kernel picks inbound SPIs (no ESP needed for larval SAs)
            s1 = await x.allocate_spi("192.0.2.2", "192.0.2.1", reqid=R + 1,
                                      spi_min=0x1000, spi_max=0x1FFF)
            s2 = await x.allocate_spi("192.0.2.2", "192.0.2.1", reqid=R + 1,
                                      spi_min=0x1000, spi_max=0x1FFF)
            assert s1 != s2 and 0x1000 <= s1 <= 0x1FFF and 0x1000 <= s2 <= 0x1FFF
            st = a.ip("xfrm", "state").stdout
            assert f"spi 0x{s1:08x}" in st and f"spi 0x{s2:08x}" in st, st

            await x.delete_policy(p)
            evs = [e for e in await drain(mon) if isinstance(e, xfrm.PolicyChanged)]
            assert [e.kind for e in evs] == ["delete"] and evs[0].policy.selector == sel
            # the larval SAs carry our reqid: an owned flush removes them
            nsa, npol = await x.flush_owned()
            assert (nsa, npol) == (2, 0)
            assert [sa.spi for sa in await x.sas()] == [0]   # the acquire's larval state
    asyncio.run(main())


def test_policy_expire_events(pair, clean):
    a, _ = pair

    async def main():
        async with AsyncXfrm(a.name) as x, XfrmMonitor(a.name, [xfrm.Group.EXPIRE]) as mon:
            p = Policy(Selector("10.61.0.0/24", "10.62.0.0/24"), Dir.OUT, action=Action.BLOCK,
                       lifetime=Lifetime(soft_add_seconds=1, hard_add_seconds=2))
            await x.add_policy(p)
            first = await mon.get(timeout=5)
            second = await mon.get(timeout=5)
            assert isinstance(first, xfrm.PolicyExpire) and not first.hard
            assert isinstance(second, xfrm.PolicyExpire) and second.hard
            assert first.policy.selector == p.selector
            with pytest.raises(xfrm.XfrmNotFound):
                await x.get_policy(p)               # a hard expiry removes it
    asyncio.run(main())


def test_events_lost_then_continue(pair, clean):
    a, _ = pair

    async def main():
        async with AsyncXfrm(a.name) as x, \
                XfrmMonitor(a.name, [xfrm.Group.POLICY], rcvbuf=1) as mon:
            pols = [Policy(Selector(f"10.70.{i}.0/24", "10.71.0.0/16"), Dir.OUT,
                           action=Action.BLOCK) for i in range(64)]
            for p in pols:
                await x.add_policy(p)
            evs = await drain(mon, 0.2)
            assert any(isinstance(e, xfrm.EventsLost) for e in evs), evs
            await x.delete_policy(pols[0])
            later = await drain(mon, 0.3)
            assert later and isinstance(later[-1], xfrm.PolicyChanged)
            assert later[-1].kind == "delete"
            await x.flush_owned()
    asyncio.run(main())


def test_bypass_sockets(pair, clean):
    """Block everything between the namespaces; only bypass sockets get through."""
    a, b = pair
    anynet = Selector("0.0.0.0/0", "0.0.0.0/0")

    async def main():
        async with AsyncXfrm(a.name) as xa, AsyncXfrm(b.name) as xb:
            await xa.add_policy(Policy(anynet, Dir.OUT, action=Action.BLOCK))
            await xb.add_policy(Policy(anynet, Dir.IN, action=Action.BLOCK))
            plain_rx, bypass_rx = udp_in(b, ("10.60.0.2", 0)), udp_in(b, ("10.60.0.2", 0))
            plain_tx, bypass_tx = udp_in(a), udp_in(a)
            try:
                xfrm.socket_bypass(bypass_rx)
                xfrm.socket_bypass(bypass_tx)
                for s in (plain_rx, bypass_rx):
                    s.settimeout(1)
                with pytest.raises(OSError) as ei:
                    plain_tx.sendto(b"x", bypass_rx.getsockname())
                assert ei.value.errno == errno.EPERM       # the block policy
                bypass_tx.sendto(b"to-plain", plain_rx.getsockname())
                bypass_tx.sendto(b"to-bypass", bypass_rx.getsockname())
                assert bypass_rx.recv(100) == b"to-bypass"
                with pytest.raises(socket.timeout):
                    plain_rx.recv(100)                     # dropped by b's in-block policy
                # the per-socket policies show in the dump, apart from global ones
                socket_pols = [p for p in await xa.policies() if p.dir >= Dir.SOCKET_IN]
                assert {p.dir for p in socket_pols} == {Dir.SOCKET_IN, Dir.SOCKET_OUT}
                assert all(p.action == Action.ALLOW for p in socket_pols)
                assert await xa.policies(include_socket=False) == \
                    [p for p in await xa.policies() if p.dir <= Dir.FWD]
                # NAT-T option on a UDP socket
                xfrm.socket_espinudp(bypass_rx)
                assert bypass_rx.getsockopt(socket.IPPROTO_UDP, 100) == 2
            finally:
                for s in (plain_rx, bypass_rx, plain_tx, bypass_tx):
                    s.close()
            await xa.flush_owned()
            await xb.flush_owned()
    asyncio.run(main())
