"""Foreign agent engine: advertisements, relay both ways, FA reply codes, visitor list."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from agent.mip import (
    AdvFlag,
    AgentSolicitation,
    Datagram,
    Denied,
    FaConfig,
    ForeignAgent,
    IcmpPacket,
    RegFlag,
    Registered,
    RegistrationReply,
    RegistrationRequest,
    SecurityAssociation,
    VisitorAdded,
    VisitorRemoved,
    VisitorUpdated,
    decode_icmp,
    decode_message,
    sign,
    verify,
)
from agent.mip.auth import ntp_timestamp
from agent.mip.icmp import icmp_checksum
from tests.unit.test_mip_support import (
    FA,
    FH_KEY,
    HA,
    HOA,
    MF_KEY,
    T0,
    drain_events,
    make_ha,
    make_mn,
    sa,
)

FH = SecurityAssociation(512, FH_KEY)
MF = SecurityAssociation(600, MF_KEY)
MN_PORT = 5000


def make_fa(**kw):
    kw.setdefault("advertisement_interval", 5.0)
    return ForeignAgent(FaConfig(FA, **kw))


def mn_request(now=T0, flags=RegFlag.T, lifetime=600, coa=FA, ha=HA, mf=None, eds=False,
               mhae=True):
    req = RegistrationRequest(flags, lifetime, HOA, ha, coa, ntp_timestamp(now))
    if mhae:
        req = sign(req, sa())
    if eds:
        from agent.mip import EncapsulatingDeliveryStyle
        req = req.with_extensions(EncapsulatingDeliveryStyle())
    if mf is not None:
        req = sign(req, mf, 33)
    return req


def from_mn(fa, req, now=T0):
    data = req if isinstance(req, bytes) else req.encode()
    fa.receive_datagram(data, str(HOA), MN_PORT, str(FA), now)
    return fa.datagrams_to_send()


def fa_denial(fa, req, now=T0, mf=None):
    (d,) = from_mn(fa, req, now)
    assert (d.dst, d.port, d.src) == (HOA, MN_PORT, FA)
    rep = decode_message(d.data)
    if mf is not None:
        assert verify(rep, mf, 33)
    return rep


# ---------------------------------------------------------------- advertisements

def test_periodic_advertisements():
    fa = make_fa(registration_lifetime=900)
    fa.start(T0)
    (p,) = fa.datagrams_to_send()
    assert isinstance(p, IcmpPacket) and p.ttl == 1 and p.src == FA
    assert str(p.dst) == "224.0.0.1"
    adv = decode_icmp(p.data)
    assert adv.sequence == 0 and adv.registration_lifetime == 900
    assert adv.flags == AdvFlag.F | AdvFlag.T
    assert adv.care_of_addresses == (FA,) and adv.router_addresses == ((FA, 0),)
    assert adv.lifetime == 15 and adv.code == 0
    assert fa.get_timer() == T0 + 5
    fa.handle_timer(T0 + 4.9)
    assert fa.datagrams_to_send() == []
    fa.handle_timer(T0 + 5)
    (p,) = fa.datagrams_to_send()
    assert decode_icmp(p.data).sequence == 1
    assert fa.get_timer() == T0 + 10


def test_solicited_advertisement():
    fa = make_fa(advertisement_interval=None)
    sol = AgentSolicitation().encode()
    fa.receive_icmp(sol, "192.0.2.33", T0)
    (p,) = fa.datagrams_to_send()
    assert str(p.dst) == "192.0.2.33"
    fa.receive_icmp(sol, "0.0.0.0", T0)
    (p,) = fa.datagrams_to_send()
    assert str(p.dst) == "224.0.0.1" and decode_icmp(p.data).sequence == 1
    assert fa.get_timer() is None
    fa.receive_icmp(b"\x0a\x00\x00\x00", "192.0.2.33", T0)
    assert fa.counters["malformed_icmp"] == 1 and fa.datagrams_to_send() == []


def test_advertisement_flags_and_code_16():
    fa = make_fa(registration_required=True, busy=True, udp_tunnel=True,
                 encapsulations=frozenset({4, 47, 55}), routes_common_traffic=False,
                 care_of_addresses=["203.0.113.1", "203.0.113.2"])
    adv = fa.advertisement()
    assert adv.flags == AdvFlag.F | AdvFlag.R | AdvFlag.B | AdvFlag.U | AdvFlag.T | \
        AdvFlag.M | AdvFlag.G
    assert adv.code == 16 and adv.router_addresses == ()
    assert len(adv.care_of_addresses) == 2
    assert icmp_checksum(adv.encode()) == 0
    fa2 = make_fa(prefix_lengths=[24])
    assert decode_icmp(fa2.advertisement().encode()).prefix_lengths == (24,)


# ---------------------------------------------------------------- relay

def test_request_relayed_to_ha_with_fhae_and_fa_extensions_removed():
    fa = make_fa(ha_sas={HA: FH}, mn_sas={HOA: MF})
    req = mn_request(mf=MF, eds=True)
    (d,) = from_mn(fa, req)
    assert (d.dst, d.port, d.src, d.src_port) == (HA, 434, FA, 434)
    relayed = decode_message(d.data)
    assert [e.type for e in relayed.extensions] == [32, 34]
    assert verify(relayed, sa()), "MHAE must survive the relay byte for byte"
    assert verify(relayed, FH, 34)
    assert fa.counters["requests_relayed"] == 1
    assert fa.get_timer() == T0 + 7  # registration timeout (advertisements not started)


def test_reply_relayed_to_mn_with_mfae_and_visitor_added():
    fa = make_fa(ha_sas={HA: FH}, mn_sas={HOA: MF})
    (d,) = from_mn(fa, mn_request(mf=MF, eds=True))
    ha = make_ha(fa_sas={FA: FH})
    ha.receive_datagram(d.data, str(FA), 434, str(HA), T0 + 0.01)
    (r,) = ha.datagrams_to_send()
    assert r.dst == FA
    fa.receive_datagram(r.data, str(HA), 434, str(FA), T0 + 0.02)
    (m,) = fa.datagrams_to_send()
    assert (m.dst, m.port) == (HOA, MN_PORT)
    rep = decode_message(m.data)
    assert rep.code == 0 and [e.type for e in rep.extensions] == [32, 33]
    assert verify(rep, sa()) and verify(rep, MF, 33)
    (ev,) = drain_events(fa)
    assert isinstance(ev, VisitorAdded)
    v = ev.visitor
    assert (v.home_address, v.home_agent, v.care_of_address) == (HOA, HA, FA)
    assert (v.mn_address, v.mn_port, v.lifetime) == (HOA, MN_PORT, 600)
    assert v.reverse_tunnel and v.encapsulating_delivery and v.expires_at == T0 + 600
    assert fa.visitors[HOA] == v
    hb = drain_events(ha)[0].binding
    assert hb.foreign_agent == FA and hb.care_of_address == FA


def test_full_chain_mn_fa_ha():
    mn = make_mn(fa_sa=MF, lifetime=600)
    fa = make_fa(ha_sas={HA: FH}, mn_sas={HOA: MF}, registration_lifetime=300)
    ha = make_ha(fa_sas={FA: FH})
    mn.register(T0, FA, foreign_agent=FA)

    def carry(now):
        for d in mn.datagrams_to_send():
            fa.receive_datagram(d.data, str(d.src), MN_PORT, str(d.dst), now)
        for d in fa.datagrams_to_send():
            if isinstance(d, Datagram) and d.dst == HA:
                ha.receive_datagram(d.data, str(FA), 434, str(HA), now)
            elif isinstance(d, Datagram):
                mn.receive_datagram(d.data, str(FA), 434, str(d.dst), now)
        for d in ha.datagrams_to_send():
            fa.receive_datagram(d.data, str(HA), 434, str(FA), now)
        for d in fa.datagrams_to_send():
            if isinstance(d, Datagram):
                mn.receive_datagram(d.data, str(FA), 434, str(d.dst), now)

    carry(T0)
    # 600 s is more than the FA allows: 69, with the FA's maximum in the lifetime
    assert drain_events(mn) == [Denied(69, FA, 300)]
    mn.register(T0 + 1, FA, foreign_agent=FA, lifetime=300)
    carry(T0 + 1)
    (ev,) = drain_events(mn)
    assert isinstance(ev, Registered) and ev.binding.foreign_agent == FA
    assert ev.lifetime == 300
    assert isinstance(drain_events(fa)[0], VisitorAdded)
    # renewal through the FA refreshes the visitor entry
    mn.handle_timer(T0 + 1 + 225)
    carry(T0 + 1 + 225)
    assert isinstance(drain_events(mn)[0], Registered)
    assert isinstance(drain_events(fa)[0], VisitorUpdated)
    # deregistration through the FA removes it
    mn.deregister(T0 + 300, FA, foreign_agent=FA)
    carry(T0 + 300)
    assert [type(e).__name__ for e in drain_events(mn)] == ["Deregistered"]
    (ev,) = drain_events(fa)
    assert isinstance(ev, VisitorRemoved) and ev.reason == "deregistered"
    assert not fa.visitors


# ---------------------------------------------------------------- FA reply codes

def test_67_mn_failed_authentication():
    fa = make_fa(mn_sas={HOA: MF})
    assert fa_denial(fa, mn_request(), mf=MF).code == 67  # MFAE missing
    bad = SecurityAssociation(600, b"wrong")
    assert fa_denial(fa, mn_request(mf=bad), mf=MF).code == 67
    fa = make_fa(require_mn_auth=True)
    assert fa_denial(fa, mn_request()).code == 67
    assert fa.counters["denied_67"] == 1


def test_70_poorly_formed_request():
    fa = make_fa()
    assert fa_denial(fa, mn_request(mhae=False)).code == 70
    # fixed part readable, extensions broken: still answered with 70
    broken = mn_request().encode()[:24] + bytes([99, 0])
    rep = fa_denial(fa, broken)
    assert rep.code == 70 and rep.home_address == HOA
    # unreadable: dropped
    assert from_mn(fa, b"\x01\x00") == []
    assert fa.counters["malformed"] == 2


@pytest.mark.parametrize("kw,req_kw,code", [
    (dict(), dict(ha=IPv4Address(0)), 90),
    (dict(allowed_home_agents=["10.9.9.9"]), dict(), 65),
    (dict(busy=True), dict(), 66),
    (dict(max_visitors=0), dict(), 66),
    (dict(max_pending=0), dict(), 66),
    (dict(), dict(coa=IPv4Address("203.0.113.77")), 77),
    (dict(reverse_tunnel=False), dict(), 74),
    (dict(reverse_tunnel_required=True), dict(flags=RegFlag(0)), 75),
    (dict(), dict(flags=RegFlag.T | RegFlag.G), 72),
    (dict(), dict(flags=RegFlag.T | RegFlag.M), 72),
])
def test_fa_denial_codes(kw, req_kw, code):
    fa = make_fa(**kw)
    rep = fa_denial(fa, mn_request(**req_kw))
    assert rep.code == code
    assert rep.identification == mn_request(**req_kw).identification
    assert fa.counters[f"denied_{code}"] == 1 and not fa._pending


def test_69_lifetime_too_long_carries_the_maximum():
    fa = make_fa(registration_lifetime=120, mn_sas={HOA: MF})
    rep = fa_denial(fa, mn_request(lifetime=121, mf=MF), mf=MF)
    assert (rep.code, rep.lifetime) == (69, 120)


def test_colocated_request_through_fa_skips_the_coa_check():
    fa = make_fa(registration_required=True)
    out = from_mn(fa, mn_request(flags=RegFlag.D | RegFlag.T, coa=IPv4Address("192.0.2.50")))
    assert len(out) == 1 and out[0].dst == HA


def _relay_once(fa, now=T0):
    (d,) = from_mn(fa, mn_request(now=now), now)
    return decode_message(d.data)


def test_68_ha_failed_authentication():
    """A reply failing the FA-HA check is dropped without cancelling the request: the genuine
    reply still goes through, and without one the node gets 68 when the request times out."""
    fa = make_fa(ha_sas={HA: FH})
    req = _relay_once(fa)
    rep = sign(RegistrationReply(0, 600, HOA, HA, req.identification), sa())
    fa.receive_datagram(rep.encode(), str(HA), 434, str(FA), T0)  # no FHAE
    assert fa.datagrams_to_send() == [] and fa.counters["ha_auth_failed"] == 1
    fa.handle_timer(T0 + fa.config.pending_timeout + 0.1)
    (d,) = [x for x in fa.datagrams_to_send() if hasattr(x, "port")]
    assert decode_message(d.data).code == 68 and not fa.visitors
    req = _relay_once(fa, T0 + 10)
    forged = sign(sign(RegistrationReply(0, 600, HOA, HA, req.identification), sa()),
                  SecurityAssociation(512, b"wrong"), 34)
    fa.receive_datagram(forged.encode(), str(HA), 434, str(FA), T0 + 10)
    assert fa.datagrams_to_send() == []
    genuine = sign(sign(RegistrationReply(0, 600, HOA, HA, req.identification), sa()), FH, 34)
    fa.receive_datagram(genuine.encode(), str(HA), 434, str(FA), T0 + 10.1)
    (d,) = fa.datagrams_to_send()
    assert decode_message(d.data).code == 0 and HOA in fa.visitors
    fa = make_fa(require_ha_auth=True)
    req = _relay_once(fa)
    fa.receive_datagram(sign(RegistrationReply(0, 60, HOA, HA, req.identification),
                             sa()).encode(), str(HA), 434, str(FA), T0)
    assert decode_message(fa.datagrams_to_send()[0].data).code == 68


def test_71_poorly_formed_reply():
    fa = make_fa()
    req = _relay_once(fa)
    fa.receive_datagram(RegistrationReply(0, 600, HOA, HA, req.identification).encode(),
                        str(HA), 434, str(FA), T0)
    (d,) = fa.datagrams_to_send()
    assert decode_message(d.data).code == 71 and not fa.visitors


def test_78_registration_timeout():
    fa = make_fa(pending_timeout=7.0, advertisement_interval=None)
    req = _relay_once(fa)
    assert fa.get_timer() == T0 + 7
    fa.handle_timer(T0 + 7)
    (d,) = fa.datagrams_to_send()
    rep = decode_message(d.data)
    assert rep.code == 78 and rep.identification == req.identification
    assert d.dst == HOA and fa.get_timer() is None
    # the late reply no longer matches anything
    fa.receive_datagram(sign(RegistrationReply(0, 600, HOA, HA, req.identification),
                             sa()).encode(), str(HA), 434, str(FA), T0 + 8)
    assert fa.datagrams_to_send() == [] and fa.counters["unmatched_reply"] == 1


def test_ha_denial_relayed_without_visitor():
    fa = make_fa()
    req = _relay_once(fa)
    fa.receive_datagram(sign(RegistrationReply(131, 0, HOA, HA, req.identification),
                             sa()).encode(), str(HA), 434, str(FA), T0)
    (d,) = fa.datagrams_to_send()
    assert decode_message(d.data).code == 131
    assert not fa.visitors and drain_events(fa) == []


def test_visitor_expiry_and_revoke():
    fa = make_fa(advertisement_interval=None)
    req = _relay_once(fa)
    fa.receive_datagram(sign(RegistrationReply(0, 60, HOA, HA, req.identification),
                             sa()).encode(), str(HA), 434, str(FA), T0 + 0.5)
    fa.datagrams_to_send()
    assert isinstance(drain_events(fa)[0], VisitorAdded)
    assert fa.get_timer() == T0 + 60  # counted from when the request was relayed
    fa.handle_timer(T0 + 60)
    (ev,) = drain_events(fa)
    assert isinstance(ev, VisitorRemoved) and ev.reason == "expired"
    assert not fa.visitors and fa.get_timer() is None
    assert not fa.revoke(HOA)


def test_unexpected_inputs_dropped():
    fa = make_fa()
    from agent.mip import TunnelData
    fa.receive_datagram(TunnelData(4, b"x").encode(), str(HOA), 1, str(FA), T0)
    assert fa.counters["unexpected_message"] == 1
    fa.receive_icmp(make_fa().advertisement().encode(), "198.51.100.2", T0)
    assert fa.counters["advertisements_ignored"] == 1 and fa.datagrams_to_send() == []
