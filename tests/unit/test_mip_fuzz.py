"""Hypothesis: random and mutated bytes into every decoder and every engine.

Only MipDecodeError may escape a decoder; engines never raise on input. What
decodes re-encodes: registration messages byte for byte, ICMP to an equal
object. Bounded (max_examples per test, no deadline) to keep the unit tier quick.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.mip import (
    AdvFlag,
    AgentAdvertisement,
    AgentSolicitation,
    AuthExtension,
    EncapsulatingDeliveryStyle,
    FaConfig,
    ForeignAgent,
    MipDecodeError,
    NaiExtension,
    RegFlag,
    RegistrationReply,
    RegistrationRequest,
    TrustedNetworksConfigured,
    TunnelData,
    UdpTunnelReply,
    UdpTunnelRequest,
    UnknownExtension,
    decode_icmp,
    decode_message,
    sign,
)
from agent.mip.icmp import decode_advertisement, decode_solicitation, icmp_checksum, split_ipv4
from agent.mip.messages import decode_reply, decode_request, decode_tunnel_data
from tests.unit.test_mip_support import COA, FA, HA, HOA, T0, make_ha, make_mn, sa

FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_REQ = sign(RegistrationRequest(RegFlag.D | RegFlag.T, 1800, HOA, HA, COA, 1 << 40,
                                (NaiExtension("mn@x"), UdpTunnelRequest(0x80, 4),
                                 UnknownExtension(200, b"skip"))), sa())
SEEDS_MIP = [
    _REQ.encode(),
    _REQ.with_extensions(EncapsulatingDeliveryStyle(),
                         AuthExtension(33, 600, b"\x01" * 16)).encode(),
    sign(RegistrationReply(0, 600, HOA, HA, 5, (UdpTunnelReply(0, 0x8000, 110),
                                                TrustedNetworksConfigured())), sa()).encode(),
    RegistrationReply(69, 60, HOA, HA, 5, (AuthExtension(33, 600, b"\x02" * 16),)).encode(),
    TunnelData(4, b"\x45" + b"\x00" * 27).encode(),
]
SEEDS_ICMP = [
    AgentAdvertisement(7, 1800, AdvFlag.F | AdvFlag.T, (FA, COA), 15, ((FA, 0),),
                       prefix_lengths=(24,), extensions=(UnknownExtension(24, b"ch"),),
                       padding=1).encode(),
    AgentSolicitation().encode(),
]


def _fix_checksum(data: bytes) -> bytes:
    if len(data) < 4:
        return data
    data = data[:2] + b"\x00\x00" + data[4:]
    return data[:2] + struct.pack("!H", icmp_checksum(data)) + data[4:]


@st.composite
def mutated(draw, seeds, fix=False):
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i: i + draw(st.integers(1, 4))]
        else:
            del data[i:]
    data = bytes(data)
    if fix and draw(st.booleans()):
        data = _fix_checksum(data)
    return data


MIP_INPUT = st.one_of(st.binary(max_size=96), mutated(SEEDS_MIP))
ICMP_INPUT = st.one_of(st.binary(max_size=64), mutated(SEEDS_ICMP, fix=True))


def _only_typed_error(fn, data):
    try:
        return fn(data)
    except MipDecodeError:
        return None


@FUZZ
@given(MIP_INPUT)
def test_decode_message(data):
    msg = _only_typed_error(decode_message, data)
    if isinstance(msg, (RegistrationRequest, RegistrationReply, TunnelData)):
        assert msg.encode() == data  # byte for byte, extensions included
        assert decode_message(msg.encode()) == msg


@FUZZ
@given(MIP_INPUT)
def test_specific_registration_decoders(data):
    for fn in (decode_request, decode_reply, decode_tunnel_data):
        _only_typed_error(fn, data)


@FUZZ
@given(ICMP_INPUT)
def test_decode_icmp(data):
    msg = _only_typed_error(decode_icmp, data)
    if msg is not None:
        assert decode_icmp(msg.encode()) == msg
    _only_typed_error(decode_advertisement, data)
    _only_typed_error(decode_solicitation, data)


@FUZZ
@given(st.binary(max_size=80))
def test_split_ipv4(data):
    _only_typed_error(split_ipv4, data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(MIP_INPUT, ICMP_INPUT), min_size=1, max_size=4))
def test_engines_never_raise_on_input(inputs):
    ha, mn = make_ha(), make_mn()
    fa = ForeignAgent(FaConfig(FA))
    mn.register(T0, COA)
    for data in inputs:
        ha.receive_datagram(data, str(COA), 434, str(HA), T0)
        mn.receive_datagram(data, str(HA), 434, str(COA), T0)
        mn.receive_icmp(data, str(FA), T0)
        fa.receive_datagram(data, str(HOA), 434, str(FA), T0)
        fa.receive_datagram(data, str(HA), 434, str(FA), T0)
        fa.receive_icmp(data, str(HOA), T0)
    for engine in (ha, mn, fa):
        engine.datagrams_to_send()
        engine.handle_timer(T0 + 10_000)
        while engine.next_event() is not None:
            pass
