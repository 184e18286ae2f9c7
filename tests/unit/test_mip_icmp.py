"""Agent Advertisement / Solicitation: both ways, checksum, malformations."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest

from agent.mip import AdvFlag, AgentAdvertisement, AgentSolicitation, MipDecodeError, decode_icmp
from agent.mip.icmp import (
    decode_advertisement,
    decode_solicitation,
    icmp_checksum,
    next_sequence,
    split_ipv4,
)
from agent.mip.messages import UnknownExtension

FA = IPv4Address("198.51.100.1")
COA2 = IPv4Address("203.0.113.9")


def adv(**kw):
    base = dict(sequence=7, registration_lifetime=1800, flags=AdvFlag.F | AdvFlag.T,
                care_of_addresses=(FA,), lifetime=15, router_addresses=((FA, 0),))
    base.update(kw)
    return AgentAdvertisement(**base)


def test_solicitation_exact_bytes_and_round_trip():
    data = AgentSolicitation().encode()
    assert data == bytes.fromhex("0a00f5ff00000000")
    assert decode_icmp(data) == AgentSolicitation()
    # RFC 1256: extra bytes after the 8-byte header are ignored
    longer = data + b"\x00\x00"
    assert decode_solicitation(longer) == AgentSolicitation()


def test_advertisement_layout_by_hand():
    data = adv().encode()
    assert data[0] == 9 and data[1] == 0
    num, size, life = struct.unpack_from("!BBH", data, 4)
    assert (num, size, life) == (1, 2, 15)
    assert data[8:12] == FA.packed and data[12:16] == b"\x00" * 4
    assert data[16:18] == bytes([16, 10])  # mobility extension, 6 + 4*1
    assert struct.unpack_from("!HHH", data, 18) == (7, 1800, 0x1000 | 0x0100)
    assert data[24:28] == FA.packed
    assert icmp_checksum(data) == 0


@pytest.mark.parametrize("flag", list(AdvFlag), ids=[f.name for f in AdvFlag])
def test_advertisement_every_flag(flag):
    a = adv(flags=flag)
    back = decode_advertisement(a.encode())
    assert back == a and back.flags == flag


def test_advertisement_full_round_trip():
    a = adv(care_of_addresses=(FA, COA2), router_addresses=((FA, 5), (COA2, -1)),
            prefix_lengths=(24, 16), extensions=(UnknownExtension(24, b"challenge"),
                                                 UnknownExtension(200, b"x")),
            padding=1, sequence=0xFFFF)
    back = decode_icmp(a.encode())
    assert back == a
    assert back.care_of_addresses == (FA, COA2)
    assert back.router_addresses[1] == (COA2, -1)
    assert back.is_foreign_agent and not back.is_home_agent


def test_advertisement_code_16_without_routers():
    a = adv(code=16, router_addresses=(), care_of_addresses=())
    data = a.encode()
    assert data[1] == 16 and data[4] == 0
    assert decode_advertisement(data) == a


def test_sequence_rollover_skips_0_to_255():
    assert next_sequence(0) == 1
    assert next_sequence(255) == 256
    assert next_sequence(0xFFFE) == 0xFFFF
    assert next_sequence(0xFFFF) == 256


def fix(data: bytes) -> bytes:
    """Recompute the checksum of a hand-mangled ICMP message."""
    data = data[:2] + b"\x00\x00" + data[4:]
    return data[:2] + struct.pack("!H", icmp_checksum(data)) + data[4:]


GOOD = adv().encode()

MALFORMED = {
    "empty": (b"", "empty"),
    "truncated": (GOOD[:6], "truncated ICMP header"),
    "bad checksum": (GOOD[:2] + bytes([GOOD[2] ^ 1]) + GOOD[3:], "wrong ICMP checksum"),
    "other ICMP type": (fix(b"\x08\x00\x00\x00\x00\x00\x00\x00"), "not agent discovery"),
    "bad code": (fix(GOOD[:1] + b"\x05" + GOOD[2:]), "ICMP code 5"),
    "entry size 3": (fix(GOOD[:5] + b"\x03" + GOOD[6:]), "address entry size 3"),
    "router list truncated": (fix(GOOD[:4] + b"\x09" + GOOD[5:]), "truncated router address"),
    "mobility length 7": (fix(GOOD[:17] + b"\x07" + GOOD[18:25]), "is not 6 + 4*N"),
    "mobility past end": (fix(GOOD[:17] + b"\x0e" + GOOD[18:]), "runs past the end"),
    "no mobility extension": (fix(GOOD[:16]), "not an agent advertisement"),
    "duplicated mobility": (fix(GOOD + GOOD[16:28]), "duplicated Mobility Agent"),
    "prefix lengths count": (fix(GOOD + bytes([19, 2, 24, 24])), "expected 1"),
    "prefix length 33": (fix(GOOD + bytes([19, 1, 33])), "prefix length above 32"),
    "duplicated prefix lengths": (fix(GOOD + bytes([19, 1, 24, 19, 1, 24])),
                                  "duplicated Prefix-Lengths"),
    "unknown non-skippable": (fix(GOOD + bytes([50, 0])), "unknown non-skippable extension type 50"),
    "lone extension byte": (fix(GOOD + bytes([19])), "truncated extension header"),
    "solicitation bad code": (fix(bytes([10, 1, 0, 0, 0, 0, 0, 0])), "ICMP code 1"),
    "solicitation bad checksum": (bytes([10, 0, 0, 0, 0, 0, 0, 0]), "wrong ICMP checksum"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_icmp(name):
    data, words = MALFORMED[name]
    with pytest.raises(MipDecodeError) as info:
        decode_icmp(data)
    assert words in str(info.value)


def test_decoders_refuse_wrong_type_and_non_bytes():
    with pytest.raises(MipDecodeError, match="expected 9"):
        decode_advertisement(AgentSolicitation().encode())
    with pytest.raises(MipDecodeError, match="expected 10"):
        decode_solicitation(GOOD)
    with pytest.raises(MipDecodeError, match="expected bytes"):
        decode_icmp(12)


def test_checksum_odd_length():
    assert icmp_checksum(b"\x01") == 0xFEFF
    assert icmp_checksum(b"") == 0xFFFF


def test_split_ipv4():
    payload = AgentSolicitation().encode()
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 1, 1, 0,
                      IPv4Address("10.0.0.5").packed, IPv4Address("224.0.0.2").packed)
    src, dst, ttl, proto, body = split_ipv4(hdr + payload)
    assert (str(src), str(dst), ttl, proto, body) == ("10.0.0.5", "224.0.0.2", 1, 1, payload)
    for bad in (b"", hdr[:10], b"\x65" + hdr[1:], b"\x4f" + hdr[1:]):
        with pytest.raises(MipDecodeError):
            split_ipv4(bad)
