"""Registration messages and their extensions: both ways, and every malformation."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest

from agent.mip import (
    AuthExtension,
    EncapsulatingDeliveryStyle,
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
    decode_message,
)
from agent.mip.messages import decode_reply, decode_request, decode_tunnel_data
from tests.unit.test_mip_support import COA, HA, HOA

ALL_FLAGS = list(RegFlag)


def rrq(flags=RegFlag(0), exts=(), lifetime=1800, ident=0x0123456789ABCDEF):
    return RegistrationRequest(flags, lifetime, HOA, HA, COA, ident, tuple(exts))


def rrp(code=0, exts=(), lifetime=600, ident=0xFEDCBA9876543210):
    return RegistrationReply(code, lifetime, HOA, HA, ident, tuple(exts))


def test_request_fixed_layout_by_hand():
    msg = rrq(RegFlag.S | RegFlag.D | RegFlag.T, lifetime=0x1234)
    expected = struct.pack("!BBH4s4s4sQ", 1, 0x80 | 0x20 | 0x02, 0x1234, HOA.packed,
                           HA.packed, COA.packed, 0x0123456789ABCDEF)
    assert msg.encode() == expected
    assert len(expected) == 24


def test_reply_fixed_layout_by_hand():
    msg = rrp(code=133, lifetime=7)
    expected = struct.pack("!BBH4s4sQ", 3, 133, 7, HOA.packed, HA.packed, 0xFEDCBA9876543210)
    assert msg.encode() == expected
    assert len(expected) == 20


@pytest.mark.parametrize("flag", ALL_FLAGS, ids=[f.name for f in ALL_FLAGS])
def test_request_every_flag_round_trip(flag):
    msg = rrq(flag)
    data = msg.encode()
    assert data[1] == int(flag)
    back = decode_message(data)
    assert back == msg and back.flags == flag


def test_request_all_flags_and_bounds():
    every = RegFlag(0xFF)
    for lifetime in (0, 1, 0xFFFF):
        msg = rrq(every, lifetime=lifetime, ident=0xFFFFFFFFFFFFFFFF)
        assert decode_request(msg.encode()) == msg
    assert rrq(lifetime=0).deregistration
    assert rrq(RegFlag.D).colocated and not rrq().colocated


@pytest.mark.parametrize("code", [0, 1, 64, 69, 78, 127, 128, 131, 133, 136, 142, 255])
def test_reply_codes_round_trip(code):
    msg = rrp(code)
    assert decode_reply(msg.encode()) == msg


EXTENSIONS = [
    AuthExtension(32, 256, bytes(range(16))),
    AuthExtension(33, 0x01020304, b"\xaa" * 16),
    AuthExtension(34, 0xFFFFFFFF, b""),
    NaiExtension("mn1@example.com"),
    UdpTunnelRequest(flags=0x80, encapsulation=4),
    UdpTunnelRequest(flags=0x40, encapsulation=47),
    UdpTunnelRequest(flags=0, encapsulation=55),
    UdpTunnelReply(code=0, flags=0x8000, keepalive=110),
    UdpTunnelReply(code=64, flags=0, keepalive=0xFFFF),
    TrustedNetworksConfigured(),
    EncapsulatingDeliveryStyle(),
    UnknownExtension(200, b"opaque"),
    UnknownExtension(132, b"challenge!"),
    UnknownExtension(255, b""),
]


@pytest.mark.parametrize("ext", EXTENSIONS, ids=lambda e: type(e).__name__ + str(e.type))
@pytest.mark.parametrize("maker", [rrq, rrp], ids=["request", "reply"])
def test_each_extension_round_trip(maker, ext):
    msg = maker(exts=[ext])
    data = msg.encode()
    back = decode_message(data)
    assert back == msg
    assert back.extensions[0] == ext
    assert back.encode() == data


def test_extension_bodies_by_hand():
    head = rrq().encode()
    cases = {
        UdpTunnelRequest(flags=0x80, encapsulation=4): bytes([144, 6, 0, 0, 0x80, 4, 0, 0]),
        UdpTunnelReply(code=0, flags=0x8000, keepalive=110): bytes([44, 6, 0, 0, 0x80, 0, 0, 110]),
        TrustedNetworksConfigured(): bytes([149, 2, 0, 0]),
        EncapsulatingDeliveryStyle(): bytes([130, 0]),
        NaiExtension(b"a@b"): bytes([131, 3]) + b"a@b",
        AuthExtension(32, 0x100, b"\x11" * 16): bytes([32, 20, 0, 0, 1, 0]) + b"\x11" * 16,
    }
    for ext, body in cases.items():
        assert rrq(exts=[ext]).encode() == head + body


def test_all_extensions_together_in_rfc_order():
    exts = [NaiExtension("mn@x"), UdpTunnelRequest(), UnknownExtension(201, b"x"),
            AuthExtension(32, 256, b"\x01" * 16), EncapsulatingDeliveryStyle(),
            UnknownExtension(132, b"chal"), AuthExtension(33, 257, b"\x02" * 16),
            AuthExtension(34, 258, b"\x03" * 16)]
    msg = rrq(exts=exts)
    back = decode_message(msg.encode())
    assert back == msg
    assert [e.type for e in back.covered_extensions()] == [131, 144, 201]
    assert back.covered(131) == NaiExtension("mn@x")
    assert back.covered(130) is None  # after the MHAE: not protected by it
    assert back.find(130) == EncapsulatingDeliveryStyle()


def test_tnc_sub_type_and_lenient_body():
    # UNCONFIRMED layout: any body is accepted and kept byte for byte
    for body in (b"", b"\x00", b"\x00\x00", b"\x01\x00\xff"):
        data = rrp().encode() + bytes([149, len(body)]) + body
        ext = decode_reply(data).extensions[0]
        assert isinstance(ext, TrustedNetworksConfigured)
        assert ext.body_bytes == body
        assert ext.sub_type == (body[0] if body else None)
        assert decode_reply(data).encode() == data


def test_unknown_skippable_extension_kept_and_skipped():
    data = rrq().encode() + bytes([250, 3]) + b"xyz" + bytes([131, 1]) + b"n"
    msg = decode_request(data)
    assert msg.extensions == (UnknownExtension(250, b"xyz"), NaiExtension(b"n"))
    assert msg.encode() == data


def test_reserved_fields_survive_relay():
    # a UDP tunnel request with non-zero reserved bytes must be relayed unchanged
    data = rrq().encode() + bytes([144, 6, 0, 0xEE, 0x80, 4, 0xAB, 0xCD]) + \
        bytes([32, 20, 1, 0, 0, 0]) + b"\x00" * 16 + bytes([130, 0])
    msg = decode_request(data)
    assert msg.extensions[0] == UdpTunnelRequest(flags=0x80, encapsulation=4)
    cut = msg.truncated_after(32)
    assert cut.encode() == data[:-2]
    assert msg.authenticated_data(1) == data[: 24 + 8 + 6]


def test_authenticated_data_matches_for_built_and_decoded():
    msg = rrq(exts=[NaiExtension("a@b"), AuthExtension(32, 300, b"\x05" * 16)])
    decoded = decode_request(msg.encode())
    assert msg.authenticated_data(1) == decoded.authenticated_data(1)
    assert msg.authenticated_data(1) == msg.encode()[:-16]


def test_truncated_after_and_with_extensions():
    msg = rrq(exts=[AuthExtension(32, 256, b"\x00" * 16), EncapsulatingDeliveryStyle()])
    assert msg.truncated_after(32).extensions == msg.extensions[:1]
    assert rrq().truncated_after(32) is None
    more = rrq().with_extensions(NaiExtension("x"))
    assert more.extensions == (NaiExtension("x"),)


def test_tunnel_data_both_ways():
    inner = bytes.fromhex("4500001c") + b"\x00" * 24
    msg = TunnelData(4, inner)
    data = msg.encode()
    assert data[:4] == bytes([4, 4, 0, 0])
    assert decode_message(data) == msg
    assert decode_tunnel_data(bytes([4, 47, 0, 0])) == TunnelData(47, b"")


def test_addresses_accept_strings_and_ints():
    a = RegistrationRequest(0, 1, "10.1.0.10", int(HA), COA, 1)
    assert a.home_address == HOA and a.home_agent == HA


@pytest.mark.parametrize("bad", [
    dict(lifetime=-1), dict(lifetime=0x10000), dict(ident=-1), dict(ident=1 << 64),
])
def test_out_of_range_fields_refused_at_construction(bad):
    with pytest.raises(ValueError):
        rrq(**bad)


# ---------------------------------------------------------------- malformed input

MHAE = bytes([32, 20, 0, 0, 1, 0]) + b"\x00" * 16
MFAE = bytes([33, 20, 0, 0, 1, 1]) + b"\x00" * 16
FHAE = bytes([34, 20, 0, 0, 1, 2]) + b"\x00" * 16
NAI = bytes([131, 3]) + b"a@b"
REQ = rrq().encode()
REP = rrp().encode()

MALFORMED = {
    "empty": (b"", "empty datagram"),
    "unknown type": (b"\x02" + REQ[1:], "unsupported message type 2"),
    "truncated request": (REQ[:17], "truncated fixed part (17 of 24 bytes)"),
    "truncated reply": (REP[:19], "truncated fixed part (19 of 20 bytes)"),
    "truncated tunnel data": (b"\x04\x04\x00", "truncated header"),
    "lone byte after fixed part": (REQ + b"\x83", "truncated extension header"),
    "extension past the end": (REQ + bytes([131, 10]) + b"abc", "runs past the end"),
    "auth too short": (REQ + bytes([32, 3, 0, 0, 1]), "shorter than its SPI"),
    "unknown non-skippable": (REQ + bytes([99, 0]), "unknown non-skippable extension type 99"),
    "long-format non-skippable 36": (REQ + bytes([36, 0, 0, 4]) + b"abcd",
                                     "unknown non-skippable extension type 36"),
    "empty NAI": (REQ + bytes([131, 0]), "empty NAI"),
    "UDP tunnel request too long": (REQ + bytes([144, 7]) + b"\x00" * 7,
                                    "UDP Tunnel Request extension length 7, expected 6 (1 trailing byte(s))"),
    "UDP tunnel request too short": (REQ + bytes([144, 5]) + b"\x00" * 5,
                                     "expected 6 (truncated body)"),
    "UDP tunnel reply bad length": (REP + bytes([44, 8]) + b"\x00" * 8,
                                    "UDP Tunnel Reply extension length 8"),
    "delivery style with body": (REQ + MHAE + bytes([130, 1, 0]),
                                 "Encapsulating Delivery Style extension length 1"),
    "duplicated MHAE": (REQ + MHAE + MHAE, "duplicated Mobile-Home Authentication"),
    "duplicated FHAE": (REQ + MHAE + FHAE + FHAE, "duplicated Foreign-Home"),
    "duplicated NAI": (REQ + NAI + NAI, "duplicated NAI"),
    "NAI after MHAE": (REQ + MHAE + NAI, "NAI extension after the authentication extension"),
    "TNC after MHAE": (REP + MHAE + bytes([149, 2, 0, 0]),
                       "Trusted Networks Configured extension after the authentication"),
    "UDP tunnel request after MFAE": (REQ + MFAE + bytes([144, 6]) + b"\x00" * 6,
                                      "UDP Tunnel Request extension after"),
    "MHAE after MFAE": (REQ + MFAE + MHAE, "before the Mobile-Home Authentication"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_raises_typed_error_naming_the_problem(name):
    data, words = MALFORMED[name]
    with pytest.raises(MipDecodeError) as info:
        decode_message(data)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_specific_decoders_check_the_type():
    with pytest.raises(MipDecodeError, match="expected 1"):
        decode_request(REP + b"\x00" * 4)
    with pytest.raises(MipDecodeError, match="expected 3"):
        decode_reply(REQ)
    with pytest.raises(MipDecodeError, match="expected 4"):
        decode_tunnel_data(REQ)
    with pytest.raises(MipDecodeError, match="expected bytes"):
        decode_message("not bytes")


def test_bytearray_and_memoryview_accepted():
    assert decode_message(bytearray(REQ)) == rrq()
    assert decode_message(memoryview(REP)) == rrp()


def test_fa_denial_with_only_mfae_is_well_formed():
    msg = decode_reply(rrp(67).encode() + MFAE)
    assert msg.covered_extensions() == ()
    assert msg.find(33).spi == 257


def test_addresses_are_ipv4address():
    msg = decode_request(REQ)
    assert isinstance(msg.care_of_address, IPv4Address)
