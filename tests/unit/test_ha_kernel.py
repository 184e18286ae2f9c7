"""agent.kernel pieces that need no privileges: tunnel naming and refcounting, ARP frames."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest

from agent.kernel.arp import arp_frame, mac_bytes
from agent.kernel.tunnels import NullBackend, make_backend


class _K:
    owner = "ha"


def test_tunnel_names_are_deterministic_and_short():
    be = NullBackend(_K())
    a = be.name_for(IPv4Address("10.1.0.2"), IPv4Address("192.0.2.10"))
    assert a == be.name_for(IPv4Address("10.1.0.2"), IPv4Address("192.0.2.10"))
    assert a.startswith("mipc000020a") and len(a) <= 15
    assert a != be.name_for(IPv4Address("10.1.0.3"), IPv4Address("192.0.2.10"))
    with pytest.raises(ValueError):
        NullBackend(_K(), prefix="toolong")


def test_tunnels_are_refcounted():
    be = NullBackend(_K())
    t1 = be.tunnel("10.1.0.2", "192.0.2.10")
    t2 = be.tunnel("10.1.0.2", "192.0.2.10")
    assert t1 is t2 and t1.refs == 2 and len(be.tunnels) == 1
    be.route_to(t1, "10.1.0.100")
    be.release(t1)
    assert be.tunnels and t1.refs == 1
    be.release(t1)
    assert be.tunnels == {}
    assert be.table_base == 43400 and be.stats()["tunnels"] == 0


def test_make_backend_names():
    assert make_backend("none", _K()).kind == "none"
    with pytest.raises(ValueError, match="unknown tunnel backend"):
        make_backend("gre", _K())


def test_gratuitous_arp_frame():
    mac = mac_bytes("02:00:00:00:00:01")
    f = arp_frame(1, mac, IPv4Address("10.1.0.100"), b"\0" * 6, IPv4Address("10.1.0.100"))
    assert f[:6] == b"\xff" * 6 and f[6:12] == mac and f[12:14] == b"\x08\x06"
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack("!HHBBH6s4s6s4s", f[14:])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)
    assert sha == mac and spa == tpa == IPv4Address("10.1.0.100").packed
    with pytest.raises(ValueError):
        mac_bytes("02:00:00")
