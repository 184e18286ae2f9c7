"""Shared helpers for the agent.mip unit tests (no tests of its own besides a smoke test)."""

from __future__ import annotations

from ipaddress import IPv4Address

from agent.mip import (
    HaConfig,
    HaNode,
    HomeAgent,
    MnConfig,
    MobileNode,
    SecurityAssociation,
)

T0 = 1_800_000_000.0  # a fixed UNIX time (2027) for fake clocks
HA = IPv4Address("10.1.0.1")
HOA = IPv4Address("10.1.0.10")
HOA2 = IPv4Address("10.1.0.11")
COA = IPv4Address("192.0.2.7")
FA = IPv4Address("198.51.100.1")
KEY = bytes(range(16))
FH_KEY = b"fa-ha shared key"
MF_KEY = b"mn-fa shared key"


def sa(spi=256, key=KEY, **kw) -> SecurityAssociation:
    return SecurityAssociation(spi, key, **kw)


class Rng:
    """Deterministic 32-bit 'random' numbers."""

    def __init__(self, start=0x1000):
        self.n = start

    def __call__(self):
        self.n += 0x01010101
        return self.n & 0xFFFFFFFF


def make_ha(**kw) -> HomeAgent:
    nodes = kw.pop("nodes", None) or [HaNode(HOA, sa(), nai="mn1@example.com")]
    return HomeAgent(HaConfig(HA, nodes, **kw), rng=Rng(0x5000))


def make_mn(**kw) -> MobileNode:
    kw.setdefault("sa", sa())
    return MobileNode(MnConfig(HOA, HA, **kw), rng=Rng(0x9000))


def drain_events(engine) -> list:
    out = []
    while (ev := engine.next_event()) is not None:
        out.append(ev)
    return out


def test_support_smoke():
    assert make_ha().get_timer() is None
    assert make_mn().get_timer() is None
