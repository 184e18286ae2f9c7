"""Mobile node engine with a fake clock: back-off, 133 resync, renewal, deregistration."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from agent.mip import (
    AdvFlag,
    AgentAdvertised,
    AgentAdvertisement,
    Datagram,
    Denied,
    Deregistered,
    HaNode,
    IcmpPacket,
    MipConfigError,
    MnConfig,
    MnTunnelPacket,
    RegFlag,
    Registered,
    RegistrationExpired,
    RegistrationReply,
    SecurityAssociation,
    TimedOut,
    TrustedNetworksConfigured,
    TunnelData,
    decode_message,
    sign,
    verify,
)
from agent.mip.auth import high32, low32, ntp_to_unix
from agent.mip.icmp import decode_solicitation
from tests.unit.test_mip_support import (
    COA,
    FA,
    HA,
    HOA,
    MF_KEY,
    T0,
    drain_events,
    make_ha,
    make_mn,
    sa,
)

MF = SecurityAssociation(600, MF_KEY)


def sent(mn) -> list[Datagram]:
    return [d for d in mn.datagrams_to_send() if isinstance(d, Datagram)]


def pump(mn, ha, mn_now, ha_now=None, src=None, port=434, rounds=5):
    """Carry datagrams MN -> HA -> MN until quiet. ``src`` overrides the source the HA sees."""
    ha_now = mn_now if ha_now is None else ha_now
    for _ in range(rounds):
        out = sent(mn)
        if not out:
            return
        for d in out:
            assert d.dst == HA and d.port == 434
            ha.receive_datagram(d.data, str(src or d.src), port, str(HA), ha_now)
        for r in ha.datagrams_to_send():
            mn.receive_datagram(r.data, str(HA), 434, str(r.dst), mn_now)


def reply_for(request_bytes, code=0, lifetime=1800, key_sa=None, exts=(), ident=None):
    req = decode_message(request_bytes)
    rep = RegistrationReply(code, lifetime, req.home_address, req.home_agent,
                            req.identification if ident is None else ident, tuple(exts))
    return sign(rep, key_sa or sa()).encode()


# ---------------------------------------------------------------- basic registration

def test_colocated_request_contents():
    mn = make_mn(nai="mn1@example.com", lifetime=600)
    mn.register(T0, COA)
    (d,) = sent(mn)
    assert (d.dst, d.port, d.src) == (HA, 434, COA)
    req = decode_message(d.data)
    assert req.flags == RegFlag.D | RegFlag.T
    assert (req.lifetime, req.home_address, req.home_agent, req.care_of_address) == \
        (600, HOA, HA, COA)
    assert abs(ntp_to_unix(req.identification) - T0) < 1e-6
    assert req.covered(131).nai == b"mn1@example.com"
    assert verify(req, sa())
    assert mn.pending and mn.get_timer() == T0 + 1.0


def test_register_with_home_agent_engine():
    mn, ha = make_mn(), make_ha()
    mn.register(T0, COA)
    pump(mn, ha, T0 + 0.05)
    (ev,) = drain_events(mn)
    assert isinstance(ev, Registered)
    assert ev.lifetime == 1800 and ev.tnc is False and ev.code == 0
    b = ev.binding
    assert (b.care_of_address, b.home_agent, b.foreign_agent) == (COA, HA, None)
    assert b.registered_at == T0 and b.expires_at == T0 + 1800
    assert mn.binding == b and not mn.pending
    assert mn.get_timer() == T0 + 1800 * 0.75


def test_granted_lifetime_is_the_shorter_one():
    mn = make_mn(lifetime=100)
    mn.register(T0, COA)
    (d,) = sent(mn)
    mn.receive_datagram(reply_for(d.data, lifetime=60), str(HA), 434, str(COA), T0 + 0.1)
    (ev,) = drain_events(mn)
    assert ev.lifetime == 60 and ev.binding.expires_at == T0 + 60
    mn2 = make_mn(lifetime=100)
    mn2.register(T0, COA)
    (d,) = sent(mn2)
    mn2.receive_datagram(reply_for(d.data, lifetime=500), str(HA), 434, str(COA), T0 + 0.1)
    assert drain_events(mn2)[0].lifetime == 100


# ---------------------------------------------------------------- retransmission

def test_exponential_backoff_new_identification_each_time_then_timeout():
    mn = make_mn(initial_timeout=1.0, max_timeout=4.0, max_retransmissions=4)
    mn.register(T0, COA)
    idents = [decode_message(sent(mn)[0].data).identification]
    deadlines = []
    now = T0
    while True:
        t = mn.get_timer()
        deadlines.append(t - now)
        now = t
        mn.handle_timer(now)
        out = sent(mn)
        if not out:
            break
        idents.append(decode_message(out[0].data).identification)
    assert deadlines == [1.0, 2.0, 4.0, 4.0, 4.0]  # doubling, capped at 4 s
    assert len(idents) == 5  # first + 4 retransmissions
    assert len(set(idents)) == 5 and idents == sorted(idents)
    for i, ident in enumerate(idents):  # each carries the time it was sent
        assert abs(ntp_to_unix(ident) - (T0 + sum(deadlines[:i]))) < 1e-6
    (ev,) = drain_events(mn)
    assert ev == TimedOut(COA, 5, False)
    assert not mn.pending and mn.get_timer() is None
    assert mn.counters["retransmissions"] == 4 and mn.counters["timed_out"] == 1


def test_backoff_never_exceeds_the_requested_lifetime():
    mn = make_mn(lifetime=3, initial_timeout=1.0, max_timeout=60.0, max_retransmissions=3)
    mn.register(T0, COA)
    sent(mn)
    gaps, now = [], T0
    for _ in range(4):
        t = mn.get_timer()
        gaps.append(t - now)
        now = t
        mn.handle_timer(now)
        sent(mn)
    assert gaps == [1.0, 2.0, 3.0, 3.0]


def test_nonce_mode_retransmits_the_same_bytes():
    mn = make_mn(sa=sa(replay="nonce"))
    mn.register(T0, COA)
    first = sent(mn)[0].data
    mn.handle_timer(T0 + 1)
    assert sent(mn)[0].data == first


def test_late_reply_to_an_earlier_transmission_is_accepted():
    mn = make_mn()
    mn.register(T0, COA)
    first = sent(mn)[0].data
    mn.handle_timer(T0 + 1)
    second = sent(mn)[0].data
    assert first != second
    mn.receive_datagram(reply_for(first), str(HA), 434, str(COA), T0 + 1.5)
    (ev,) = drain_events(mn)
    assert isinstance(ev, Registered) and ev.binding.registered_at == T0


# ---------------------------------------------------------------- 133 resynchronisation

def test_133_resync_with_a_home_agent_whose_clock_is_ahead():
    mn, ha = make_mn(), make_ha()
    mn.register(T0, COA)
    pump(mn, ha, T0, ha_now=T0 + 100)  # HA's clock is 100 s ahead
    (ev,) = drain_events(mn)
    assert isinstance(ev, Registered)
    assert mn.counters["resync"] == 1
    assert 99 <= mn.clock_offset <= 100.01
    assert ha.counters["identification_mismatch"] == 1 and ha.counters["accepted"] == 1


def test_133_resync_with_a_home_agent_whose_clock_is_behind():
    mn, ha = make_mn(), make_ha()
    mn.register(T0, COA)
    pump(mn, ha, T0, ha_now=T0 - 3600)
    assert isinstance(drain_events(mn)[0], Registered)
    assert -3601 <= mn.clock_offset <= -3599


def test_133_not_believed_without_authentication():
    mn = make_mn()
    mn.register(T0, COA)
    data = sent(mn)[0].data
    req = decode_message(data)
    forged_ident = ((high32(req.identification) + 5000) << 32) | low32(req.identification)
    forged = reply_for(data, code=133, ident=forged_ident, key_sa=sa(key=b"attacker key"))
    mn.receive_datagram(forged, str(HA), 434, str(COA), T0 + 0.1)
    assert mn.clock_offset == 0.0 and sent(mn) == [] and drain_events(mn) == []
    assert mn.counters["auth_failed"] == 1 and mn.counters["resync"] == 0
    # unsigned, too
    unsigned = RegistrationReply(133, 0, HOA, HA, forged_ident).encode()
    mn.receive_datagram(unsigned, str(HA), 434, str(COA), T0 + 0.1)
    assert mn.counters["auth_failed"] == 2 and mn.clock_offset == 0.0


def test_133_not_believed_when_low_bits_do_not_match():
    mn = make_mn()
    mn.register(T0, COA)
    data = sent(mn)[0].data
    req = decode_message(data)
    other_low = (low32(req.identification) + 1) & 0xFFFFFFFF
    ident = ((high32(req.identification) + 5000) << 32) | other_low
    mn.receive_datagram(reply_for(data, code=133, ident=ident), str(HA), 434, str(COA), T0 + 0.1)
    assert mn.clock_offset == 0.0 and sent(mn) == [] and drain_events(mn) == []
    assert mn.counters["unmatched_identification"] == 1


def test_resync_gives_up_after_max_resync():
    mn = make_mn(max_resync=2)
    mn.register(T0, COA)
    for i in range(3):
        data = sent(mn)[0].data
        req = decode_message(data)
        ident = ((high32(req.identification) + 1000) << 32) | low32(req.identification)
        mn.receive_datagram(reply_for(data, code=133, ident=ident), str(HA), 434, str(COA), T0)
    assert drain_events(mn) == [Denied(133, COA, 1800)]
    assert not mn.pending


def test_nonce_mode_full_flow():
    node_sa = sa(replay="nonce")
    mn = make_mn(sa=node_sa)
    ha = make_ha(nodes=[HaNode(HOA, node_sa)])
    mn.register(T0, COA)
    pump(mn, ha, T0)
    assert isinstance(drain_events(mn)[0], Registered)
    assert mn.counters["resync"] == 1  # the first request cannot know the HA's nonce
    # the renewal uses the nonce from the last reply: no further resync
    mn.handle_timer(T0 + 1350)
    pump(mn, ha, T0 + 1350)
    assert isinstance(drain_events(mn)[0], Registered)
    assert mn.counters["resync"] == 1


# ---------------------------------------------------------------- renewal, expiry

def test_lifetime_renewal_at_configured_fraction():
    mn, ha = make_mn(lifetime=100, renew_fraction=0.5), make_ha()
    mn.register(T0, COA)
    pump(mn, ha, T0)
    drain_events(mn)
    assert mn.get_timer() == T0 + 50
    mn.handle_timer(T0 + 49)
    assert sent(mn) == []
    mn.handle_timer(T0 + 50)
    pump(mn, ha, T0 + 50)
    (ev,) = drain_events(mn)
    assert isinstance(ev, Registered) and ev.binding.expires_at == T0 + 150
    assert mn.counters["renewals"] == 1
    assert mn.get_timer() == T0 + 100


def test_failed_renewal_times_out_then_binding_expires():
    mn, ha = make_mn(lifetime=100, renew_fraction=0.8, max_retransmissions=2,
                     max_timeout=8), make_ha()
    mn.register(T0, COA)
    pump(mn, ha, T0)
    drain_events(mn)
    now = T0 + 80
    events = []
    while (t := mn.get_timer()) is not None:
        now = t
        mn.handle_timer(now)
        sent(mn)  # the HA is unreachable now
        events += drain_events(mn)
    assert [type(e) for e in events] == [TimedOut, RegistrationExpired]
    assert events[1].binding.expires_at == T0 + 100 == now
    assert mn.binding is None


def test_infinite_lifetime_has_no_renewal():
    mn = make_mn(lifetime=0xFFFF)
    mn.register(T0, COA)
    (d,) = sent(mn)
    mn.receive_datagram(reply_for(d.data, lifetime=0xFFFF), str(HA), 434, str(COA), T0)
    assert drain_events(mn)[0].binding.expires_at is None
    assert mn.get_timer() is None


# ---------------------------------------------------------------- deregistration, denial

def test_deregistration_at_home():
    mn, ha = make_mn(), make_ha()
    mn.register(T0, COA)
    pump(mn, ha, T0)
    drain_events(mn)
    mn.deregister(T0 + 10)
    (d,) = mn.datagrams_to_send()
    req = decode_message(d.data)
    assert req.lifetime == 0 and req.care_of_address == HOA and d.dst == HA
    ha.receive_datagram(d.data, str(HOA), 434, str(HA), T0 + 10)
    for r in ha.datagrams_to_send():
        mn.receive_datagram(r.data, str(HA), 434, str(HOA), T0 + 10)
    assert drain_events(mn) == [Deregistered(HOA)]
    assert mn.binding is None and mn.get_timer() is None
    assert not ha.bindings


def test_denied_event_and_dereg_timeout():
    mn, ha = make_mn(reverse_tunnel=False), make_ha(nodes=[HaNode(HOA, sa(),
                                                                 reverse_tunnel_required=True)])
    mn.register(T0, COA)
    pump(mn, ha, T0)
    assert drain_events(mn) == [Denied(138, COA, 0)]
    mn.deregister(T0, COA)
    sent(mn)
    for _ in range(5):
        mn.handle_timer(mn.get_timer())
        sent(mn)
    assert drain_events(mn) == [TimedOut(COA, 5, True)]


# ---------------------------------------------------------------- what is dropped

def test_unauthenticated_or_unmatched_replies_are_counted_never_events():
    mn = make_mn()
    reply = RegistrationReply(0, 1800, HOA, HA, 1)
    mn.receive_datagram(sign(reply, sa()).encode(), str(HA), 434, str(COA), T0)
    assert mn.counters["no_pending_request"] == 1
    mn.register(T0, COA)
    data = sent(mn)[0].data
    cases = {
        "auth_failed": reply_for(data, key_sa=sa(key=b"bad")),
        "malformed": reply_for(data)[:-3],
        "wrong_home_address": sign(RegistrationReply(0, 9, "10.9.9.9", HA,
                                                     decode_message(data).identification),
                                   sa()).encode(),
        "unmatched_identification": reply_for(data, ident=12345),
        "unexpected_message": data,  # a request
    }
    for counter, bad in cases.items():
        mn.receive_datagram(bad, str(HA), 434, str(COA), T0 + 0.1)
        assert mn.counters[counter] >= 1, counter
    assert drain_events(mn) == [] and mn.pending


def test_tnc_reported_only_inside_the_authenticated_reply():
    mn = make_mn()
    mn.register(T0, COA)
    data = sent(mn)[0].data
    # TNC appended after the MHAE: structurally invalid, dropped
    rep = reply_for(data) + bytes([149, 2, 0, 0])
    mn.receive_datagram(rep, str(HA), 434, str(COA), T0)
    assert mn.counters["malformed"] == 1 and drain_events(mn) == []
    # TNC in an unauthenticated reply: dropped
    rep = reply_for(data, exts=[TrustedNetworksConfigured()], key_sa=sa(key=b"evil"))
    mn.receive_datagram(rep, str(HA), 434, str(COA), T0)
    assert mn.counters["auth_failed"] == 1 and drain_events(mn) == []
    # TNC covered by a valid MHAE: trusted
    rep = reply_for(data, exts=[TrustedNetworksConfigured()])
    mn.receive_datagram(rep, str(HA), 434, str(COA), T0)
    (ev,) = drain_events(mn)
    assert ev.tnc is True and ev.binding.tnc is True


def test_tnc_from_home_agent_on_trusted_network():
    mn, ha = make_mn(), make_ha(trusted_prefixes=["192.0.2.0/24"])
    mn.register(T0, COA)
    pump(mn, ha, T0)
    assert drain_events(mn)[0].tnc is True


# ---------------------------------------------------------------- via a foreign agent

def test_registration_through_fa_request_shape():
    mn = make_mn(encapsulating_delivery=True, fa_sa=MF)
    mn.register(T0, FA, foreign_agent=FA)
    (d,) = sent(mn)
    assert (d.dst, d.src) == (FA, HOA)
    req = decode_message(d.data)
    assert not req.colocated and req.flags & RegFlag.T
    assert [e.type for e in req.extensions] == [32, 130, 33]
    assert verify(req, sa()) and verify(req, MF, 33)


def test_fa_denial_handling():
    mn = make_mn()
    mn.register(T0, FA, foreign_agent=FA)
    data = sent(mn)[0].data
    req = decode_message(data)
    denial = RegistrationReply(69, 300, HOA, HA, req.identification).encode()
    mn.receive_datagram(denial, str(FA), 434, str(HOA), T0)
    assert drain_events(mn) == [Denied(69, FA, 300)]
    # with an MN-FA SA, unauthenticated FA denials are dropped
    mn = make_mn(fa_sa=MF)
    mn.register(T0, FA, foreign_agent=FA)
    req = decode_message(sent(mn)[0].data)
    denial = RegistrationReply(65, 0, HOA, HA, req.identification)
    mn.receive_datagram(denial.encode(), str(FA), 434, str(HOA), T0)
    assert mn.counters["fa_auth_failed"] == 1 and drain_events(mn) == []
    mn.receive_datagram(sign(denial, MF, 33).encode(), str(FA), 434, str(HOA), T0)
    assert drain_events(mn) == [Denied(65, FA, 0)]
    # and an HA reply relayed by that FA must carry a valid MFAE too
    mn = make_mn(fa_sa=MF)
    mn.register(T0, FA, foreign_agent=FA)
    data = sent(mn)[0].data
    mn.receive_datagram(reply_for(data), str(FA), 434, str(HOA), T0)
    assert mn.counters["fa_auth_failed"] == 1
    good = sign(decode_message(reply_for(data)), MF, 33).encode()
    mn.receive_datagram(good, str(FA), 434, str(HOA), T0)
    assert drain_events(mn)[0].binding.foreign_agent == FA


def test_strict_mode_drops_unauthenticated_fa_denials():
    mn = make_mn(accept_unauthenticated_fa_denials=False)
    mn.register(T0, FA, foreign_agent=FA)
    req = decode_message(sent(mn)[0].data)
    mn.receive_datagram(RegistrationReply(66, 0, HOA, HA, req.identification).encode(),
                        str(FA), 434, str(HOA), T0)
    assert drain_events(mn) == [] and mn.counters["unauthenticated_fa_reply"] == 1


# ---------------------------------------------------------------- UDP tunnelling

def test_udp_tunnel_behind_nat():
    mn, ha = make_mn(udp_tunnel=True, src_port=4343), make_ha()
    mn.register(T0, COA)
    req = decode_message(mn._attempt.data)
    assert req.covered(144) is not None
    pump(mn, ha, T0, src=IPv4Address("203.0.113.50"), port=61000)
    (ev,) = drain_events(mn)
    assert ev.binding.udp_tunnel and ev.binding.keepalive == 110
    inner = b"\x45" + b"\x00" * 19
    assert mn.send_tunnel_data(inner)
    (d,) = mn.datagrams_to_send()
    assert (d.dst, d.port, d.src, d.src_port) == (HA, 434, COA, 4343)
    assert decode_message(d.data) == TunnelData(4, inner)
    mn.receive_datagram(TunnelData(4, inner).encode(), str(HA), 434, str(COA), T0)
    assert drain_events(mn) == [MnTunnelPacket(4, inner)]
    mn.receive_datagram(TunnelData(4, inner).encode(), "192.0.2.200", 434, str(COA), T0)
    assert mn.counters["unexpected_tunnel_data"] == 1


def test_no_udp_tunnel_without_nat():
    mn, ha = make_mn(udp_tunnel=True), make_ha()
    mn.register(T0, COA)
    pump(mn, ha, T0)
    b = drain_events(mn)[0].binding
    assert not b.udp_tunnel and b.keepalive is None
    assert not mn.send_tunnel_data(b"x")


# ---------------------------------------------------------------- agent discovery

def test_advertisements_and_reboot_detection():
    mn = make_mn()

    def adv(seq):
        return AgentAdvertisement(seq, 1800, AdvFlag.F, (FA,), 15, ((FA, 0),)).encode()

    mn.receive_icmp(adv(300), str(FA), T0)
    mn.receive_icmp(adv(301), str(FA), T0 + 1)
    mn.receive_icmp(adv(2), str(FA), T0 + 2)  # fell below 256: the agent rebooted
    evs = drain_events(mn)
    assert [e.rebooted for e in evs] == [False, False, True]
    assert isinstance(evs[0], AgentAdvertised) and evs[0].advertisement.care_of_addresses == (FA,)
    mn.receive_icmp(b"\x09garbage", str(FA), T0)
    assert mn.counters["malformed_icmp"] == 1


def test_solicitation_rate_limited():
    mn = make_mn()
    assert mn.solicit(T0)
    assert not mn.solicit(T0 + 0.5)
    assert mn.solicit(T0 + 1.0)
    out = mn.datagrams_to_send()
    assert len(out) == 2 and all(isinstance(p, IcmpPacket) for p in out)
    assert out[0].ttl == 1 and str(out[0].dst) == "224.0.0.2"
    decode_solicitation(out[0].data)


def test_config_validation():
    for bad in (dict(lifetime=0), dict(initial_timeout=0), dict(max_timeout=0.5),
                dict(renew_fraction=1.0), dict(max_retransmissions=-1)):
        with pytest.raises(MipConfigError):
            MnConfig(HOA, HA, sa(), **bad)


def test_moving_to_a_new_care_of_address():
    mn, ha = make_mn(lifetime=100), make_ha()
    mn.register(T0, COA)
    pump(mn, ha, T0)
    drain_events(mn)
    new_coa = IPv4Address("198.18.0.5")
    mn.register(T0 + 10, new_coa)
    assert mn.binding.care_of_address == COA  # until the HA says otherwise
    assert mn.get_timer() == T0 + 11  # retransmission, not the old renewal
    pump(mn, ha, T0 + 10)
    (ev,) = drain_events(mn)
    assert ev.binding.care_of_address == new_coa and mn.binding == ev.binding
    assert ha.binding_for(HOA).care_of_address == new_coa
    assert mn.get_timer() == T0 + 10 + 75


def test_reply_for_a_superseded_attempt_is_dropped():
    mn = make_mn()
    mn.register(T0, COA)
    old = sent(mn)[0].data
    mn.register(T0 + 0.5, IPv4Address("198.18.0.5"))
    sent(mn)
    mn.receive_datagram(reply_for(old), str(HA), 434, str(COA), T0 + 0.6)
    assert drain_events(mn) == [] and mn.counters["unmatched_identification"] == 1
    with pytest.raises(MipConfigError):
        mn.register(T0, COA, lifetime=0)
