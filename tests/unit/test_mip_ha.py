"""Home agent engine: every reply-code path, the binding cache, TNC, NAT, expiry."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from agent.mip import (
    BindingAdded,
    BindingRemoved,
    BindingUpdated,
    HaNode,
    NaiExtension,
    RegFlag,
    RegistrationRequest,
    SecurityAssociation,
    TrustedNetworksConfigured,
    TunnelData,
    TunnelPacket,
    UdpTunnelReply,
    UdpTunnelRequest,
    decode_message,
    sign,
    verify,
)
from agent.mip.auth import high32, low32, ntp_timestamp, ntp_to_unix
from tests.unit.test_mip_support import (
    COA,
    FA,
    FH_KEY,
    HA,
    HOA,
    HOA2,
    T0,
    drain_events,
    make_ha,
    sa,
)

NAT_PUBLIC = IPv4Address("203.0.113.50")
FH = SecurityAssociation(512, FH_KEY)


def request(now=T0, flags=RegFlag.D | RegFlag.T, lifetime=1800, hoa=HOA, ha=HA, coa=COA,
            exts=(), key_sa=None, ident=None, fh=None):
    ident = ntp_timestamp(now) if ident is None else ident
    msg = RegistrationRequest(flags, lifetime, hoa, ha, coa, ident, tuple(exts))
    msg = sign(msg, key_sa or sa())
    if fh is not None:
        msg = sign(msg, fh, 34)
    return msg


def exchange(ha, req, src=COA, port=434, now=T0, reply_sa=None):
    """Send one request; return the decoded reply (checking its MHAE) and the datagram."""
    data = req if isinstance(req, bytes) else req.encode()
    ha.receive_datagram(data, str(src), port, str(HA), now)
    out = ha.datagrams_to_send()
    assert len(out) == 1, out
    dgram = out[0]
    assert (dgram.dst, dgram.port) == (IPv4Address(src), port)
    rep = decode_message(dgram.data)
    assert verify(rep, reply_sa or sa()), "every reply carries a valid MHAE"
    return rep, dgram


def code_of(ha, req, **kw):
    return exchange(ha, req, **kw)[0].code


# ---------------------------------------------------------------- accept paths

def test_accept_code_0_binding_and_reply_fields():
    ha = make_ha()
    req = request()
    rep, dgram = exchange(ha, req)
    assert rep.code == 0 and rep.lifetime == 1800
    assert rep.identification == req.identification  # timestamp accepted: copied whole
    assert rep.home_address == HOA and rep.home_agent == HA
    assert dgram.src == HA and dgram.src_port == 434 and dgram.addr == (str(COA), 434)
    (ev,) = drain_events(ha)
    assert isinstance(ev, BindingAdded)
    b = ev.binding
    assert (b.home_address, b.care_of_address, b.lifetime) == (HOA, COA, 1800)
    assert b.expires_at == T0 + 1800 and b.registered_at == T0
    assert b.source_address == COA and not b.nat_detected and not b.udp_tunnel
    assert b.reverse_tunnel and b.foreign_agent is None and b.encapsulation == 4
    assert ha.binding_for(HOA) == b
    assert ha.counters["accepted"] == 1


def test_lifetime_capped_by_global_and_node_policy():
    ha = make_ha(max_lifetime=300)
    assert exchange(ha, request(lifetime=1000))[0].lifetime == 300
    node = HaNode(HOA, sa(), max_lifetime=60)
    ha = make_ha(nodes=[node], max_lifetime=300)
    assert exchange(ha, request(lifetime=1000))[0].lifetime == 60
    ha = make_ha(max_lifetime=0xFFFF)
    rep, _ = exchange(ha, request(lifetime=0xFFFF))
    assert rep.lifetime == 0xFFFF
    assert drain_events(ha)[0].binding.expires_at is None
    assert ha.get_timer() is None


def test_code_1_simultaneous_bindings_unsupported_replaces():
    ha = make_ha()
    exchange(ha, request())
    drain_events(ha)
    other = IPv4Address("192.0.2.99")
    rep, _ = exchange(ha, request(T0 + 1, RegFlag.S | RegFlag.D | RegFlag.T, coa=other),
                      src=other, now=T0 + 1)
    assert rep.code == 1
    (ev,) = drain_events(ha)
    assert isinstance(ev, BindingUpdated)
    assert ev.previous.care_of_address == COA and ev.binding.care_of_address == other
    assert list(ha.bindings[HOA]) == [other]


def test_simultaneous_bindings_supported_and_code_135():
    ha = make_ha(max_bindings_per_node=2)
    flags = RegFlag.S | RegFlag.D | RegFlag.T
    coas = [IPv4Address(f"192.0.2.{i}") for i in (1, 2, 3)]
    assert code_of(ha, request(T0, flags, coa=coas[0]), src=coas[0]) == 0
    assert code_of(ha, request(T0 + 1, flags, coa=coas[1]), src=coas[1], now=T0 + 1) == 0
    assert [type(e) for e in drain_events(ha)] == [BindingAdded, BindingAdded]
    assert code_of(ha, request(T0 + 2, flags, coa=coas[2]), src=coas[2], now=T0 + 2) == 135
    # renewing an existing one is fine
    assert code_of(ha, request(T0 + 3, flags, coa=coas[1]), src=coas[1], now=T0 + 3) == 0
    assert isinstance(drain_events(ha)[0], BindingUpdated)
    # a registration without S replaces both
    assert code_of(ha, request(T0 + 4, coa=coas[2]), src=coas[2], now=T0 + 4) == 0
    evs = drain_events(ha)
    assert sorted(type(e).__name__ for e in evs) == ["BindingRemoved", "BindingUpdated"]
    assert [e.reason for e in evs if isinstance(e, BindingRemoved)] == ["replaced"]
    assert list(ha.bindings[HOA]) == [coas[2]]


def test_renewal_is_binding_updated():
    ha = make_ha()
    exchange(ha, request())
    exchange(ha, request(T0 + 100), now=T0 + 100)
    evs = drain_events(ha)
    assert isinstance(evs[1], BindingUpdated)
    assert evs[1].binding.expires_at == T0 + 1900
    assert ha.get_timer() == T0 + 1900


# ---------------------------------------------------------------- denial paths

def test_131_missing_wrong_spi_and_bad_authenticator():
    ha = make_ha()
    unsigned = RegistrationRequest(RegFlag.D, 1800, HOA, HA, COA, ntp_timestamp(T0))
    assert code_of(ha, unsigned) == 131
    assert code_of(ha, request(key_sa=SecurityAssociation(999, bytes(range(16))))) == 131
    assert code_of(ha, request(key_sa=sa(key=b"wrong key"))) == 131
    assert ha.counters["mn_auth_failed"] == 3 and ha.counters["denied_131"] == 3
    assert not ha.bindings and not drain_events(ha)


def test_131_when_the_spi_belongs_to_another_node():
    other = HaNode(HOA2, SecurityAssociation(777, b"node two key"))
    ha = make_ha(nodes=[HaNode(HOA, sa()), other])
    # node 1's home address, authenticated with node 2's SA: ownership check fails
    assert code_of(ha, request(key_sa=other.sa)) == 131


def test_unknown_home_address_and_garbage_dropped_silently():
    ha = make_ha()
    ha.receive_datagram(request(hoa=IPv4Address("10.9.9.9")).encode(), str(COA), 434,
                        str(HA), T0)
    ha.receive_datagram(b"\x01\x02garbage", str(COA), 434, str(HA), T0)
    ha.receive_datagram(b"", str(COA), 434, str(HA), T0)
    from agent.mip import RegistrationReply
    ha.receive_datagram(RegistrationReply(0, 1, HOA, HA, 1).encode(), str(COA), 434,
                        str(HA), T0)
    assert ha.datagrams_to_send() == []
    assert ha.counters["unknown_home_address"] == 1
    assert ha.counters["malformed"] == 2
    assert ha.counters["unexpected_message"] == 1


def test_132_fa_authentication():
    ha = make_ha(fa_sas={FA: FH})
    via_fa = RegFlag.T
    # no FHAE from an FA we share an SA with
    assert code_of(ha, request(flags=via_fa, coa=FA), src=FA) == 132
    # wrong FHAE key
    bad = SecurityAssociation(512, b"not the fh key")
    assert code_of(ha, request(flags=via_fa, coa=FA, fh=bad), src=FA) == 132
    # good FHAE: accepted, and the reply carries an FHAE too
    rep, _ = exchange(ha, request(T0 + 1, via_fa, coa=FA, fh=FH), src=FA, now=T0 + 1)
    assert rep.code == 0 and verify(rep, FH, 34)
    assert rep.extensions[-1].type == 34
    b = drain_events(ha)[0].binding
    assert b.foreign_agent == FA and not b.nat_detected
    # require_fa_auth: an FA without an SA is refused
    ha = make_ha(require_fa_auth=True)
    assert code_of(ha, request(flags=via_fa, coa=FA), src=FA) == 132
    assert code_of(ha, request(T0 + 1), now=T0 + 1) == 0  # co-located: no FA involved


def test_133_timestamp_outside_tolerance_and_replay():
    ha = make_ha()
    late = request(T0 - 8)
    rep, _ = exchange(ha, late)
    assert rep.code == 133
    assert low32(rep.identification) == low32(late.identification)
    assert high32(rep.identification) == high32(ntp_timestamp(T0))
    assert abs(ntp_to_unix(rep.identification & ~0xFFFFFFFF) - T0) < 1
    ok = request(T0 - 6)
    assert code_of(ha, ok) == 0
    # replaying the accepted request: not newer than the last accepted one
    assert code_of(ha, ok.encode(), now=T0 + 1) == 133
    assert code_of(ha, request(T0 + 8)) == 133  # too far in the future
    assert ha.counters["identification_mismatch"] == 3


def test_133_nonce_mode_and_resync():
    node = HaNode(HOA, sa(replay="nonce"))
    ha = make_ha(nodes=[node])
    mn_nonce = 0xCAFEBABE
    first = request(ident=(0 << 32) | mn_nonce, key_sa=node.sa)
    rep, _ = exchange(ha, first)
    assert rep.code == 133 and low32(rep.identification) == mn_nonce
    ha_nonce = high32(rep.identification)
    second = request(ident=(ha_nonce << 32) | 0x12345678, key_sa=node.sa)
    rep2, _ = exchange(ha, second)
    assert rep2.code == 0 and low32(rep2.identification) == 0x12345678
    assert high32(rep2.identification) != ha_nonce  # a fresh nonce each reply
    # the same request again is a replay
    assert code_of(ha, second) == 133


def test_136_unknown_home_agent_address():
    ha = make_ha()
    rep, _ = exchange(ha, request(ha=IPv4Address("10.1.0.254")))
    assert rep.code == 136 and rep.home_agent == HA


def test_129_node_disabled():
    ha = make_ha(nodes=[HaNode(HOA, sa(), enabled=False)])
    assert code_of(ha, request()) == 129


def test_134_poorly_formed():
    ha = make_ha()
    assert code_of(ha, request(coa=IPv4Address(0))) == 134
    assert code_of(ha, request(T0 + 1, exts=[UdpTunnelRequest(sub_type=1)]), now=T0 + 1) == 134


def test_137_and_138_reverse_tunnel():
    ha = make_ha(reverse_tunnel_supported=False)
    assert code_of(ha, request(flags=RegFlag.D | RegFlag.T)) == 137
    assert code_of(ha, request(T0 + 1, flags=RegFlag.D), now=T0 + 1) == 0
    ha = make_ha(nodes=[HaNode(HOA, sa(), reverse_tunnel_required=True)])
    assert code_of(ha, request(flags=RegFlag.D)) == 138
    assert code_of(ha, request(T0 + 1), now=T0 + 1) == 0


def test_139_encapsulation_unavailable():
    ha = make_ha()
    assert code_of(ha, request(flags=RegFlag.D | RegFlag.T | RegFlag.G)) == 139
    assert code_of(ha, request(T0 + 1, flags=RegFlag.D | RegFlag.M), now=T0 + 1) == 139
    assert code_of(ha, request(T0 + 2, exts=[UdpTunnelRequest(encapsulation=47)]),
                   now=T0 + 2) == 139
    ha = make_ha(encapsulations=frozenset({4, 47}))
    assert code_of(ha, request(flags=RegFlag.D | RegFlag.T | RegFlag.G)) == 0
    assert drain_events(ha)[0].binding.encapsulation == 47


def test_142_udp_encapsulation_not_allowed():
    ha = make_ha(nodes=[HaNode(HOA, sa(), udp_tunnel_allowed=False)])
    # behind a NAT, asking for UDP tunnelling: refused
    assert code_of(ha, request(exts=[UdpTunnelRequest()]), src=NAT_PUBLIC) == 142
    # F flag without a NAT: refused as well
    assert code_of(ha, request(T0 + 1, exts=[UdpTunnelRequest(flags=0x80)]), now=T0 + 1) == 142
    # no NAT, no F: accepted, tunnelling declined in the UDP Tunnel Reply
    rep, _ = exchange(ha, request(T0 + 2, exts=[UdpTunnelRequest()]), now=T0 + 2)
    assert rep.code == 0 and rep.covered(44) == UdpTunnelReply(64, 0, 110)


def test_130_binding_cache_full():
    node2 = HaNode(HOA2, SecurityAssociation(300, b"second"))
    ha = make_ha(nodes=[HaNode(HOA, sa()), node2], max_bindings=1)
    assert code_of(ha, request()) == 0
    rep, _ = exchange(ha, request(hoa=HOA2, key_sa=node2.sa), reply_sa=node2.sa)
    assert rep.code == 130
    # renewing the existing binding is still possible
    assert code_of(ha, request(T0 + 1), now=T0 + 1) == 0


# ---------------------------------------------------------------- NAT, UDP tunnel, TNC

def test_nat_detected_udp_tunnel_agreed_and_data_path():
    ha = make_ha(udp_keepalive=25)
    rep, dgram = exchange(ha, request(exts=[UdpTunnelRequest()]), src=NAT_PUBLIC, port=40001)
    assert rep.code == 0
    assert rep.covered(44) == UdpTunnelReply(0, 0, 25)
    assert dgram.dst == NAT_PUBLIC and dgram.port == 40001
    b = drain_events(ha)[0].binding
    assert b.nat_detected and b.udp_tunnel and b.source_address == NAT_PUBLIC
    assert b.source_port == 40001 and b.care_of_address == COA
    # tunnel data from the NAT mapping reaches the kernel layer as an event
    inner = b"\x45" + b"\x00" * 19
    ha.receive_datagram(TunnelData(4, inner).encode(), str(NAT_PUBLIC), 40001, str(HA), T0)
    assert drain_events(ha) == [TunnelPacket(HOA, COA, 4, inner)]
    ha.receive_datagram(TunnelData(4, inner).encode(), str(NAT_PUBLIC), 40002, str(HA), T0)
    assert ha.counters["tunnel_data_unknown_peer"] == 1
    # and back to the MN
    assert ha.send_tunnel_data(HOA, inner)
    (out,) = ha.datagrams_to_send()
    assert (out.dst, out.port) == (NAT_PUBLIC, 40001)
    assert decode_message(out.data) == TunnelData(4, inner)
    assert not ha.send_tunnel_data(HOA2, inner)


def test_forced_udp_tunnel_without_nat():
    ha = make_ha()
    rep, _ = exchange(ha, request(exts=[UdpTunnelRequest(flags=0x80)]))
    assert rep.covered(44) == UdpTunnelReply(0, 0x8000, 110)
    assert drain_events(ha)[0].binding.udp_tunnel


def test_nat_seen_without_udp_request_is_recorded():
    ha = make_ha()
    assert code_of(ha, request(), src=NAT_PUBLIC) == 0
    b = drain_events(ha)[0].binding
    assert b.nat_detected and not b.udp_tunnel


@pytest.mark.parametrize("src,trusted", [("10.1.2.3", True), ("10.2.0.1", True),
                                         ("192.0.2.7", False), ("203.0.113.50", False)])
def test_tnc_added_only_for_trusted_sources(src, trusted):
    ha = make_ha(trusted_prefixes=["10.1.0.0/16", "10.2.0.0/24"])
    rep, _ = exchange(ha, request(coa=IPv4Address(src)), src=src)
    assert rep.code == 0
    assert (rep.covered(149) == TrustedNetworksConfigured()) is trusted
    assert drain_events(ha)[0].binding.trusted is trusted


def test_tnc_never_on_denials():
    ha = make_ha(trusted_prefixes=["192.0.2.0/24"], reverse_tunnel_supported=False)
    rep, _ = exchange(ha, request())
    assert rep.code == 137 and rep.find(149) is None


# ---------------------------------------------------------------- NAI, dereg, expiry

def test_nai_registration_with_zero_home_address():
    ha = make_ha()
    rep, _ = exchange(ha, request(hoa=IPv4Address(0), exts=[NaiExtension("mn1@example.com")]))
    assert rep.code == 0 and rep.home_address == HOA
    assert drain_events(ha)[0].binding.nai == b"mn1@example.com"


def test_deregistration_all_and_one():
    ha = make_ha(max_bindings_per_node=3)
    flags = RegFlag.S | RegFlag.D | RegFlag.T
    c1, c2 = IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2")
    exchange(ha, request(T0, flags, coa=c1), src=c1)
    exchange(ha, request(T0 + 1, flags, coa=c2), src=c2, now=T0 + 1)
    drain_events(ha)
    rep, _ = exchange(ha, request(T0 + 2, flags, lifetime=0, coa=c1), src=c1, now=T0 + 2)
    assert (rep.code, rep.lifetime) == (0, 0)
    (ev,) = drain_events(ha)
    assert isinstance(ev, BindingRemoved) and ev.reason == "deregistered"
    assert ev.binding.care_of_address == c1 and list(ha.bindings[HOA]) == [c2]
    # at home: care-of address = home address removes everything
    rep, _ = exchange(ha, request(T0 + 3, RegFlag(0), lifetime=0, coa=HOA), src=HOA, now=T0 + 3)
    assert rep.code == 0
    assert [e.reason for e in drain_events(ha)] == ["deregistered"]
    assert not ha.bindings
    # deregistration needs authentication like anything else
    assert code_of(ha, request(T0 + 4, lifetime=0, key_sa=sa(key=b"x")), now=T0 + 4) == 131


def test_expiry_by_timer():
    ha = make_ha(max_lifetime=60)
    exchange(ha, request())
    drain_events(ha)
    assert ha.get_timer() == T0 + 60
    ha.handle_timer(T0 + 59.9)
    assert drain_events(ha) == []
    ha.handle_timer(T0 + 60)
    (ev,) = drain_events(ha)
    assert isinstance(ev, BindingRemoved) and ev.reason == "expired"
    assert ha.get_timer() is None and not ha.bindings
    assert ha.counters["expired"] == 1


def test_renewed_binding_does_not_expire_at_the_old_deadline():
    ha = make_ha(max_lifetime=60)
    exchange(ha, request())
    exchange(ha, request(T0 + 30), now=T0 + 30)
    drain_events(ha)
    assert ha.get_timer() == T0 + 90
    ha.handle_timer(T0 + 61)
    assert drain_events(ha) == [] and ha.bindings


def test_revoke_and_remove_node():
    ha = make_ha()
    exchange(ha, request())
    drain_events(ha)
    assert ha.revoke(HOA) == 1
    assert [e.reason for e in drain_events(ha)] == ["revoked"]
    exchange(ha, request(T0 + 1), now=T0 + 1)
    drain_events(ha)
    ha.remove_node(HOA)
    assert [e.reason for e in drain_events(ha)] == ["revoked"]
    ha.receive_datagram(request(T0 + 2).encode(), str(COA), 434, str(HA), T0 + 2)
    assert ha.datagrams_to_send() == []


def test_keyed_md5_node():
    legacy = SecurityAssociation(1000, b"legacy", algorithm="keyed-md5")
    ha = make_ha(nodes=[HaNode(HOA, legacy)])
    ha.receive_datagram(request(key_sa=legacy).encode(), str(COA), 434, str(HA), T0)
    (d,) = ha.datagrams_to_send()
    rep = decode_message(d.data)
    assert rep.code == 0 and verify(rep, legacy)


def test_many_bindings_heap_stays_bounded():
    ha = make_ha(max_lifetime=1000)
    for i in range(500):
        ha.receive_datagram(request(T0 + i).encode(), str(COA), 434, str(HA), T0 + i)
    assert ha.counters["accepted"] == 500
    assert len(ha._heap) <= 2 * 1 + 64 + 1
    assert ha.get_timer() == T0 + 499 + 1000
