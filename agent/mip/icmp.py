"""Agent Advertisement and Agent Solicitation (RFC 5944 §2, on RFC 1256 ICMP).

Agent Advertisement = ICMP Router Advertisement (type 9, code 0, or 16 for an
agent that does not route common traffic)::

    type | code | checksum | num addrs | addr entry size (2) | lifetime u16
    (router address, preference i32) x num addrs
    extensions: 16 Mobility Agent Advertisement
                   (length 6+4N | sequence u16 | registration lifetime u16
                    | flags u16 | N care-of addresses)
                19 Prefix-Lengths (one byte per router address)
                 0 Pad (a single byte, no length)
                24 FA challenge (RFC 3012, kept opaque) and skippable unknowns

Agent Solicitation = ICMP Router Solicitation (type 10, code 0, 8 bytes).
Both are sent with IP TTL 1. The byte strings here are ICMP messages, without
the IP header; :func:`split_ipv4` takes the header off a raw-socket packet.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Union

from agent.inet import checksum

from .constants import (
    ADV_EXT_CHALLENGE,
    ADV_EXT_MOBILITY,
    ADV_EXT_PAD,
    ADV_EXT_PREFIX_LENGTHS,
    ICMP_ROUTER_ADVERTISEMENT,
    ICMP_ROUTER_SOLICITATION,
    AdvFlag,
)
from .errors import MipDecodeError
from .messages import UnknownExtension, to_ipv4

__all__ = [
    "AgentAdvertisement",
    "AgentSolicitation",
    "decode_icmp",
    "decode_advertisement",
    "decode_solicitation",
    "icmp_checksum",
    "split_ipv4",
    "next_sequence",
]


icmp_checksum = checksum          # the Internet checksum (RFC 1071), agent.inet


def _with_checksum(msg: bytes) -> bytes:
    c = icmp_checksum(msg)
    return msg[:2] + struct.pack("!H", c) + msg[4:]


def next_sequence(seq: int) -> int:
    """The advertisement sequence number after ``seq``: 0xFFFF rolls over to 256.

    Values 0-255 are only used after an agent reboot, so that a mobile node
    can tell a reboot from a rollover (RFC 5944 §2.3.1).
    """
    return 256 if seq >= 0xFFFF else seq + 1


@dataclass(frozen=True)
class AgentAdvertisement:
    """An Agent Advertisement.

    ``router_addresses`` are (address, preference) pairs of the Router
    Advertisement part (may be empty with code 16); ``lifetime`` is its
    lifetime; ``sequence``, ``registration_lifetime``, ``flags`` and
    ``care_of_addresses`` form the Mobility Agent Advertisement extension.
    ``prefix_lengths`` (one per router address) adds extension 19 when not
    None. ``extensions`` keeps extra extensions (challenge, skippable
    unknowns) and ``padding`` the number of one-byte pad extensions.
    """

    sequence: int
    registration_lifetime: int
    flags: AdvFlag
    care_of_addresses: tuple = ()
    lifetime: int = 1800
    router_addresses: tuple = ()
    code: int = 0
    prefix_lengths: tuple | None = None
    extensions: tuple = ()
    padding: int = 0
    checksum: int | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "care_of_addresses",
                           tuple(to_ipv4(a) for a in self.care_of_addresses))
        object.__setattr__(self, "router_addresses",
                           tuple((to_ipv4(a), int(p)) for a, p in self.router_addresses))
        object.__setattr__(self, "flags", AdvFlag(int(self.flags)))
        if self.prefix_lengths is not None:
            object.__setattr__(self, "prefix_lengths", tuple(self.prefix_lengths))
        object.__setattr__(self, "extensions", tuple(self.extensions))
        if len(self.care_of_addresses) > 62:
            raise ValueError("too many care-of addresses for one extension")

    def encode(self) -> bytes:
        out = [struct.pack("!BBHBBH", ICMP_ROUTER_ADVERTISEMENT, self.code, 0,
                           len(self.router_addresses), 2, self.lifetime)]
        for addr, pref in self.router_addresses:
            out.append(struct.pack("!Ii", int(addr), pref))
        n = len(self.care_of_addresses)
        out.append(struct.pack("!BBHHH", ADV_EXT_MOBILITY, 6 + 4 * n, self.sequence,
                               self.registration_lifetime, int(self.flags)))
        out.extend(struct.pack("!I", int(a)) for a in self.care_of_addresses)
        if self.prefix_lengths is not None:
            out.append(bytes((ADV_EXT_PREFIX_LENGTHS, len(self.prefix_lengths)))
                       + bytes(self.prefix_lengths))
        for ext in self.extensions:
            out.append(bytes((ext.type, len(ext.data))) + bytes(ext.data))
        out.append(b"\x00" * self.padding)
        return _with_checksum(b"".join(out))

    @property
    def is_foreign_agent(self) -> bool:
        return bool(self.flags & AdvFlag.F)

    @property
    def is_home_agent(self) -> bool:
        return bool(self.flags & AdvFlag.H)


@dataclass(frozen=True)
class AgentSolicitation:
    """An Agent Solicitation (ICMP Router Solicitation, 8 bytes)."""

    def encode(self) -> bytes:
        return _with_checksum(struct.pack("!BBHI", ICMP_ROUTER_SOLICITATION, 0, 0, 0))


def _check(data, what) -> bytes:
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise MipDecodeError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) < 8:
        raise MipDecodeError(f"{what}: truncated ICMP header ({len(data)} of 8 bytes)")
    if icmp_checksum(data) != 0:
        raise MipDecodeError(f"{what}: wrong ICMP checksum")
    return data


def decode_advertisement(data: bytes) -> AgentAdvertisement:
    """Decode an Agent Advertisement (ICMP bytes); raises MipDecodeError.

    A plain Router Advertisement without the mobility extension is refused
    ("not an agent advertisement").
    """
    what = "Agent Advertisement"
    data = _check(data, what)
    t, code, cks, num, entry, lifetime = struct.unpack_from("!BBHBBH", data)
    if t != ICMP_ROUTER_ADVERTISEMENT:
        raise MipDecodeError(f"{what}: ICMP type {t}, expected 9")
    if code not in (0, 16):
        raise MipDecodeError(f"{what}: ICMP code {code}, expected 0 or 16")
    if entry != 2:
        raise MipDecodeError(f"{what}: address entry size {entry}, expected 2")
    off = 8
    end = off + 8 * num
    if end > len(data):
        raise MipDecodeError(f"{what}: truncated router address list ({num} entries)")
    routers = tuple((IPv4Address(a), p) for a, p in struct.iter_unpack("!Ii", data[off:end]))
    off = end
    mobility = None
    prefixes = None
    extra = []
    padding = 0
    n = len(data)
    while off < n:
        et = data[off]
        if et == ADV_EXT_PAD:
            padding += 1
            off += 1
            continue
        if n - off < 2:
            raise MipDecodeError(f"{what}: truncated extension header at offset {off}")
        length = data[off + 1]
        body = data[off + 2: off + 2 + length]
        if len(body) != length:
            raise MipDecodeError(
                f"{what}: extension type {et} length {length} runs past the end "
                f"({n - off - 2} bytes left)")
        off += 2 + length
        if et == ADV_EXT_MOBILITY:
            if mobility is not None:
                raise MipDecodeError(f"{what}: duplicated Mobility Agent Advertisement extension")
            if length < 6 or (length - 6) % 4:
                raise MipDecodeError(
                    f"{what}: Mobility Agent Advertisement extension length {length} "
                    "is not 6 + 4*N")
            seq, reglife, flags = struct.unpack_from("!HHH", body)
            coas = tuple(IPv4Address(a) for (a,) in struct.iter_unpack("!I", body[6:]))
            mobility = (seq, reglife, flags, coas)
        elif et == ADV_EXT_PREFIX_LENGTHS:
            if prefixes is not None:
                raise MipDecodeError(f"{what}: duplicated Prefix-Lengths extension")
            if length != num:
                raise MipDecodeError(
                    f"{what}: Prefix-Lengths extension length {length}, expected {num} "
                    "(one per router address)")
            if any(p > 32 for p in body):
                raise MipDecodeError(f"{what}: prefix length above 32")
            prefixes = tuple(body)
        elif et == ADV_EXT_CHALLENGE or et >= 128:
            extra.append(UnknownExtension(et, body))
        else:
            raise MipDecodeError(f"{what}: unknown non-skippable extension type {et}")
    if mobility is None:
        raise MipDecodeError(
            f"{what}: not an agent advertisement (no Mobility Agent Advertisement extension)")
    seq, reglife, flags, coas = mobility
    return AgentAdvertisement(sequence=seq, registration_lifetime=reglife, flags=AdvFlag(flags),
                              care_of_addresses=coas, lifetime=lifetime,
                              router_addresses=routers, code=code, prefix_lengths=prefixes,
                              extensions=tuple(extra), padding=padding, checksum=cks)


def decode_solicitation(data: bytes) -> AgentSolicitation:
    """Decode an Agent Solicitation; raises MipDecodeError.

    As RFC 1256 asks, bytes beyond the 8-byte header are accepted and ignored.
    """
    what = "Agent Solicitation"
    data = _check(data, what)
    t, code = data[0], data[1]
    if t != ICMP_ROUTER_SOLICITATION:
        raise MipDecodeError(f"{what}: ICMP type {t}, expected 10")
    if code != 0:
        raise MipDecodeError(f"{what}: ICMP code {code}, expected 0")
    return AgentSolicitation()


def decode_icmp(data: bytes) -> Union[AgentAdvertisement, AgentSolicitation]:
    """Decode an agent-discovery ICMP message (type 9 or 10); raises MipDecodeError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MipDecodeError(f"ICMP message: expected bytes, got {type(data).__name__}")
    if len(data) < 1:
        raise MipDecodeError("ICMP message: empty")
    if data[0] == ICMP_ROUTER_ADVERTISEMENT:
        return decode_advertisement(data)
    if data[0] == ICMP_ROUTER_SOLICITATION:
        return decode_solicitation(data)
    raise MipDecodeError(f"ICMP message: type {data[0]} is not agent discovery")


def split_ipv4(packet: bytes):
    """Split a raw IPv4 packet into (src, dst, ttl, protocol, payload).

    For daemons reading agent-discovery ICMP from a raw socket (which hands
    over the IP header). Raises MipDecodeError on a malformed header.
    """
    if not isinstance(packet, (bytes, bytearray, memoryview)):
        raise MipDecodeError("IPv4 packet: expected bytes")
    packet = bytes(packet)
    if len(packet) < 20:
        raise MipDecodeError(f"IPv4 packet: truncated header ({len(packet)} of 20 bytes)")
    vihl = packet[0]
    if vihl >> 4 != 4:
        raise MipDecodeError(f"IPv4 packet: version {vihl >> 4}")
    ihl = (vihl & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    if ihl < 20 or ihl > len(packet) or total < ihl:
        raise MipDecodeError(f"IPv4 packet: bad header length {ihl}")
    end = min(total, len(packet))
    ttl, proto = packet[8], packet[9]
    src = IPv4Address(packet[12:16])
    dst = IPv4Address(packet[16:20])
    return src, dst, ttl, proto, packet[ihl:end]
