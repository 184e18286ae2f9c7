"""IKEv2 message codec (RFC 7296 section 3): header and payloads, both ways.

Decoding raises :class:`IkeDecodeError` only. Unknown payloads without the
critical bit are kept as :class:`UnknownPayload` (and otherwise ignored by the
state machine); unknown critical ones raise with UNSUPPORTED_CRITICAL_PAYLOAD.
The SK payload is kept opaque here (:class:`SKPayload`); ``crypto.SkCipher``
checks and opens it, then :func:`decode_payloads` parses the inner chain.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import ClassVar, Iterable

from .const import (
    ATTR_KEY_LENGTH, IKE_HEADER_LEN, IKE_VERSION, CfgAttr, Flag, IdType, NotifyType,
    PayloadType, ProtocolId, TsType,
)
from .errors import IkeDecodeError

_HDR = struct.Struct("!8s8sBBBBII")
_GEN = struct.Struct("!BBH")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise IkeDecodeError(what)


# --------------------------------------------------------------------------- SA

@dataclass
class Attribute:
    """Transform attribute; TV format when ``value`` is an int."""

    type: int
    value: int | bytes

    def encode(self) -> bytes:
        if isinstance(self.value, int):
            return struct.pack("!HH", 0x8000 | self.type, self.value)
        return struct.pack("!HH", self.type, len(self.value)) + self.value


@dataclass
class Transform:
    type: int
    id: int
    attributes: list[Attribute] = field(default_factory=list)

    @property
    def key_length(self) -> int | None:
        for a in self.attributes:
            if a.type == ATTR_KEY_LENGTH and isinstance(a.value, int):
                return a.value
        return None

    def encode(self, last: bool) -> bytes:
        attrs = b"".join(a.encode() for a in self.attributes)
        return struct.pack("!BBHBBH", 0 if last else 3, 0, 8 + len(attrs),
                           self.type, 0, self.id) + attrs


@dataclass
class Proposal:
    num: int
    protocol: int
    spi: bytes = b""
    transforms: list[Transform] = field(default_factory=list)

    def encode(self, last: bool) -> bytes:
        body = b"".join(t.encode(i == len(self.transforms) - 1)
                        for i, t in enumerate(self.transforms))
        n = 8 + len(self.spi) + len(body)
        return struct.pack("!BBHBBBB", 0 if last else 2, 0, n, self.num, self.protocol,
                           len(self.spi), len(self.transforms)) + self.spi + body


def _decode_attributes(data: bytes) -> list[Attribute]:
    out = []
    off = 0
    while off < len(data):
        _need(len(data) - off >= 4, "truncated transform attribute")
        t, v = struct.unpack_from("!HH", data, off)
        off += 4
        if t & 0x8000:
            out.append(Attribute(t & 0x7FFF, v))
        else:
            _need(len(data) - off >= v, "transform attribute longer than its transform")
            out.append(Attribute(t, data[off:off + v]))
            off += v
    return out


def _decode_proposals(data: bytes) -> list[Proposal]:
    out = []
    off = 0
    last = False
    while off < len(data):
        _need(not last, "data after the last proposal")
        _need(len(data) - off >= 8, "truncated proposal")
        more, _r, plen, num, proto, spisize, ntrans = struct.unpack_from("!BBHBBBB", data, off)
        _need(more in (0, 2), f"bad proposal last/more value {more}")
        _need(8 + spisize <= plen <= len(data) - off, "bad proposal length")
        last = more == 0
        spi = data[off + 8:off + 8 + spisize]
        toff = off + 8 + spisize
        end = off + plen
        transforms = []
        tlast = False
        while toff < end:
            _need(not tlast, "data after the last transform")
            _need(end - toff >= 8, "truncated transform")
            tmore, _r1, tlen, ttype, _r2, tid = struct.unpack_from("!BBHBBH", data, toff)
            _need(tmore in (0, 3), f"bad transform last/more value {tmore}")
            _need(8 <= tlen <= end - toff, "bad transform length")
            tlast = tmore == 0
            transforms.append(Transform(ttype, tid, _decode_attributes(data[toff + 8:toff + tlen])))
            toff += tlen
        _need(len(transforms) == ntrans,
              f"proposal {num} announces {ntrans} transforms, has {len(transforms)}")
        _need(not transforms or tlast, "last transform not marked last")
        out.append(Proposal(num, proto, spi, transforms))
        off = end
    _need(last, "last proposal not marked last")
    return out


# --------------------------------------------------------------------------- payloads

@dataclass
class Payload:
    TYPE: ClassVar[int] = 0
    critical: bool = field(default=False, kw_only=True)

    @property
    def type(self) -> int:
        return self.TYPE

    def encode_body(self) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def decode_body(cls, body: bytes) -> "Payload":  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class SAPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.SA
    proposals: list[Proposal] = field(default_factory=list)

    def encode_body(self) -> bytes:
        return b"".join(p.encode(i == len(self.proposals) - 1)
                        for i, p in enumerate(self.proposals))

    @classmethod
    def decode_body(cls, body: bytes) -> "SAPayload":
        _need(len(body) > 0, "empty SA payload")
        return cls(_decode_proposals(body))


@dataclass
class KEPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.KE
    group: int = 0
    data: bytes = b""

    def encode_body(self) -> bytes:
        return struct.pack("!HH", self.group, 0) + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> "KEPayload":
        _need(len(body) >= 4, "truncated KE payload")
        return cls(struct.unpack_from("!H", body)[0], body[4:])


@dataclass
class IDPayload(Payload):
    id_type: int = IdType.FQDN
    data: bytes = b""

    def encode_body(self) -> bytes:
        return bytes([self.id_type, 0, 0, 0]) + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> "IDPayload":
        _need(len(body) >= 4, "truncated ID payload")
        return cls(body[0], body[4:])


@dataclass
class IDiPayload(IDPayload):
    TYPE: ClassVar[int] = PayloadType.IDi


@dataclass
class IDrPayload(IDPayload):
    TYPE: ClassVar[int] = PayloadType.IDr


@dataclass
class CertPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.CERT
    encoding: int = 4
    data: bytes = b""

    def encode_body(self) -> bytes:
        return bytes([self.encoding]) + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> "CertPayload":
        _need(len(body) >= 1, "empty CERT payload")
        return cls(body[0], body[1:])


@dataclass
class CertReqPayload(CertPayload):
    TYPE: ClassVar[int] = PayloadType.CERTREQ


@dataclass
class AuthPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.AUTH
    method: int = 0
    data: bytes = b""

    def encode_body(self) -> bytes:
        return bytes([self.method, 0, 0, 0]) + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> "AuthPayload":
        _need(len(body) >= 4, "truncated AUTH payload")
        return cls(body[0], body[4:])


@dataclass
class NoncePayload(Payload):
    TYPE: ClassVar[int] = PayloadType.NONCE
    data: bytes = b""

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, body: bytes) -> "NoncePayload":
        _need(16 <= len(body) <= 256, f"nonce of {len(body)} bytes (16..256 allowed)")
        return cls(body)


@dataclass
class NotifyPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.NOTIFY
    notify_type: int = 0
    data: bytes = b""
    protocol: int = ProtocolId.NONE
    spi: bytes = b""

    def encode_body(self) -> bytes:
        return struct.pack("!BBH", self.protocol, len(self.spi), self.notify_type) + self.spi + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> "NotifyPayload":
        _need(len(body) >= 4, "truncated Notify payload")
        proto, spisize, ntype = struct.unpack_from("!BBH", body)
        _need(len(body) >= 4 + spisize, "Notify SPI longer than its payload")
        return cls(ntype, body[4 + spisize:], proto, body[4:4 + spisize])

    @property
    def is_error(self) -> bool:
        return self.notify_type < 16384


@dataclass
class DeletePayload(Payload):
    TYPE: ClassVar[int] = PayloadType.DELETE
    protocol: int = ProtocolId.IKE
    spis: list[bytes] = field(default_factory=list)

    def encode_body(self) -> bytes:
        size = len(self.spis[0]) if self.spis else 0
        if any(len(s) != size for s in self.spis):
            raise ValueError("Delete payload SPIs of different sizes")
        return struct.pack("!BBH", self.protocol, size, len(self.spis)) + b"".join(self.spis)

    @classmethod
    def decode_body(cls, body: bytes) -> "DeletePayload":
        _need(len(body) >= 4, "truncated Delete payload")
        proto, size, n = struct.unpack_from("!BBH", body)
        _need(len(body) == 4 + size * n, "Delete payload length does not match its SPI count")
        if proto == ProtocolId.IKE:
            _need(size == 0 and n == 0, "Delete of an IKE SA carries SPIs")
        return cls(proto, [body[4 + i * size:4 + (i + 1) * size] for i in range(n)])


@dataclass
class VendorIDPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.VENDOR_ID
    data: bytes = b""

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, body: bytes) -> "VendorIDPayload":
        return cls(body)


@dataclass(frozen=True)
class TrafficSelector:
    start: IPAddress
    end: IPAddress
    ip_proto: int = 0
    start_port: int = 0
    end_port: int = 65535

    @classmethod
    def from_network(cls, net: str | ipaddress.IPv4Network | ipaddress.IPv6Network,
                     ip_proto: int = 0, ports: tuple[int, int] = (0, 65535)) -> "TrafficSelector":
        n = ipaddress.ip_network(net, strict=False)
        return cls(n.network_address, n.broadcast_address, ip_proto, ports[0], ports[1])

    @property
    def ts_type(self) -> int:
        return TsType.IPV4_ADDR_RANGE if self.start.version == 4 else TsType.IPV6_ADDR_RANGE

    def networks(self) -> list:
        return list(ipaddress.summarize_address_range(self.start, self.end))

    def is_subset_of(self, other: "TrafficSelector") -> bool:
        return (self.start.version == other.start.version
                and other.start <= self.start and self.end <= other.end
                and (other.ip_proto == 0 or other.ip_proto == self.ip_proto)
                and other.start_port <= self.start_port and self.end_port <= other.end_port)

    def encode(self) -> bytes:
        a = self.start.packed + self.end.packed
        return struct.pack("!BBHHH", self.ts_type, self.ip_proto, 8 + len(a),
                           self.start_port, self.end_port) + a

    def __str__(self) -> str:
        nets = self.networks()
        s = ",".join(str(n) for n in nets) if len(nets) <= 2 else f"{self.start}-{self.end}"
        if self.ip_proto or (self.start_port, self.end_port) != (0, 65535):
            s += f"[{self.ip_proto}/{self.start_port}-{self.end_port}]"
        return s


@dataclass
class TSPayload(Payload):
    selectors: list[TrafficSelector] = field(default_factory=list)

    def encode_body(self) -> bytes:
        return bytes([len(self.selectors), 0, 0, 0]) + b"".join(s.encode() for s in self.selectors)

    @classmethod
    def decode_body(cls, body: bytes) -> "TSPayload":
        _need(len(body) >= 4, "truncated TS payload")
        n = body[0]
        off = 4
        out = []
        for _ in range(n):
            _need(len(body) - off >= 8, "truncated traffic selector")
            tstype, proto, slen, sp, ep = struct.unpack_from("!BBHHH", body, off)
            alen = {TsType.IPV4_ADDR_RANGE: 4, TsType.IPV6_ADDR_RANGE: 16}.get(tstype)
            _need(alen is not None, f"unknown traffic selector type {tstype}")
            _need(slen == 8 + 2 * alen and off + slen <= len(body), "bad traffic selector length")
            s = ipaddress.ip_address(body[off + 8:off + 8 + alen])
            e = ipaddress.ip_address(body[off + 8 + alen:off + 8 + 2 * alen])
            out.append(TrafficSelector(s, e, proto, sp, ep))
            off += slen
        _need(off == len(body), "data after the traffic selectors")
        return cls(out)


@dataclass
class TSiPayload(TSPayload):
    TYPE: ClassVar[int] = PayloadType.TSi


@dataclass
class TSrPayload(TSPayload):
    TYPE: ClassVar[int] = PayloadType.TSr


@dataclass
class CPAttribute:
    type: int
    value: bytes = b""

    def encode(self) -> bytes:
        return struct.pack("!HH", self.type & 0x7FFF, len(self.value)) + self.value


@dataclass
class CPPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.CP
    cfg_type: int = 1
    attributes: list[CPAttribute] = field(default_factory=list)

    def encode_body(self) -> bytes:
        return bytes([self.cfg_type, 0, 0, 0]) + b"".join(a.encode() for a in self.attributes)

    @classmethod
    def decode_body(cls, body: bytes) -> "CPPayload":
        _need(len(body) >= 4, "truncated CP payload")
        off = 4
        attrs = []
        while off < len(body):
            _need(len(body) - off >= 4, "truncated configuration attribute")
            t, ln = struct.unpack_from("!HH", body, off)
            _need(len(body) - off - 4 >= ln, "configuration attribute longer than its payload")
            attrs.append(CPAttribute(t & 0x7FFF, body[off + 4:off + 4 + ln]))
            off += 4 + ln
        return cls(body[0], attrs)

    def values(self, attr: int) -> list[bytes]:
        return [a.value for a in self.attributes if a.type == attr]

    def ip4_values(self, attr: int = CfgAttr.INTERNAL_IP4_ADDRESS) -> list[ipaddress.IPv4Address]:
        # INTERNAL_IP4_ADDRESS may carry 4 bytes (or 8 with a netmask in old peers)
        return [ipaddress.IPv4Address(v[:4]) for v in self.values(attr) if len(v) >= 4]


@dataclass
class SKPayload(Payload):
    """Encrypted payload, opaque: ``body`` is IV | ciphertext | ICV.

    ``first_inner`` is the type of the first payload inside.
    """

    TYPE: ClassVar[int] = PayloadType.SK
    first_inner: int = 0
    body: bytes = b""

    def encode_body(self) -> bytes:
        return self.body


@dataclass
class UnknownPayload(Payload):
    payload_type: int = 0
    data: bytes = b""

    @property
    def type(self) -> int:
        return self.payload_type

    def encode_body(self) -> bytes:
        return self.data


PAYLOAD_CLASSES: dict[int, type[Payload]] = {
    c.TYPE: c for c in (SAPayload, KEPayload, IDiPayload, IDrPayload, CertPayload,
                        CertReqPayload, AuthPayload, NoncePayload, NotifyPayload,
                        DeletePayload, VendorIDPayload, TSiPayload, TSrPayload, CPPayload)
}


# --------------------------------------------------------------------------- chains

def encode_payloads(payloads: Iterable[Payload]) -> tuple[int, bytes]:
    """Encode a payload chain; returns (type of the first payload, bytes)."""
    payloads = list(payloads)
    out = bytearray()
    for i, p in enumerate(payloads):
        body = p.encode_body()
        if isinstance(p, SKPayload):
            if i != len(payloads) - 1:
                raise ValueError("SK payload must be the last payload")
            nxt = p.first_inner
        else:
            nxt = payloads[i + 1].type if i + 1 < len(payloads) else 0
        if 4 + len(body) > 0xFFFF:
            raise ValueError(f"payload {p.type} too long")
        out += _GEN.pack(nxt, 0x80 if p.critical else 0, 4 + len(body)) + body
    return (payloads[0].type if payloads else 0), bytes(out)


def decode_payloads(first: int, data: bytes, *, allow_sk: bool = False,
                    offset: int = 0) -> tuple[list[Payload], int | None]:
    """Decode a payload chain.

    Returns (payloads, offset of the SK payload's generic header or None).
    ``offset`` is added to the returned SK offset (position of ``data`` in
    the whole message).
    """
    out: list[Payload] = []
    off = 0
    nxt = first
    while nxt != PayloadType.NONE:
        _need(len(data) - off >= 4, f"truncated payload header (type {nxt})")
        following, flags, plen = _GEN.unpack_from(data, off)
        _need(4 <= plen <= len(data) - off, f"bad length {plen} of payload type {nxt}")
        body = data[off + 4:off + plen]
        critical = bool(flags & 0x80)
        if nxt == PayloadType.SK:
            _need(allow_sk, "SK payload inside an SK payload")
            _need(off + plen == len(data), "SK payload is not the last payload")
            sk = SKPayload(first_inner=following, body=body, critical=critical)
            out.append(sk)
            return out, offset + off
        cls = PAYLOAD_CLASSES.get(nxt)
        if cls is None:
            if critical:
                raise IkeDecodeError(f"unsupported critical payload type {nxt}",
                                     NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, bytes([nxt & 0xFF]))
            p: Payload = UnknownPayload(payload_type=nxt, data=body)
        else:
            p = cls.decode_body(body)
        p.critical = critical
        out.append(p)
        off += plen
        nxt = following
    _need(off == len(data), "data after the last payload")
    return out, None


# --------------------------------------------------------------------------- message

@dataclass
class Message:
    spi_i: bytes
    spi_r: bytes
    exchange: int
    message_id: int
    payloads: list[Payload] = field(default_factory=list)
    initiator: bool = True       # I flag: sent by the original initiator
    response: bool = False       # R flag
    version: int = IKE_VERSION
    # set by decode_message
    raw: bytes = field(default=b"", repr=False, compare=False)
    sk_offset: int | None = field(default=None, repr=False, compare=False)

    @property
    def flags(self) -> int:
        return (Flag.INITIATOR if self.initiator else 0) | (Flag.RESPONSE if self.response else 0)

    def get(self, cls: type, **match) -> Payload | None:
        for p in self.payloads:
            if isinstance(p, cls) and all(getattr(p, k) == v for k, v in match.items()):
                return p
        return None

    def get_all(self, cls: type) -> list:
        return [p for p in self.payloads if isinstance(p, cls)]

    def notify(self, ntype: int) -> NotifyPayload | None:
        return self.get(NotifyPayload, notify_type=ntype)

    def notifies(self, ntype: int) -> list[NotifyPayload]:
        return [p for p in self.payloads if isinstance(p, NotifyPayload) and p.notify_type == ntype]

    @property
    def sk(self) -> SKPayload | None:
        p = self.payloads[-1] if self.payloads else None
        return p if isinstance(p, SKPayload) else None

    def header(self, first_payload: int, length: int) -> bytes:
        return _HDR.pack(self.spi_i, self.spi_r, first_payload, self.version, self.exchange,
                         self.flags, self.message_id, length)

    def encode(self) -> bytes:
        first, body = encode_payloads(self.payloads)
        return self.header(first, IKE_HEADER_LEN + len(body)) + body


@dataclass
class Header:
    spi_i: bytes
    spi_r: bytes
    next_payload: int
    version: int
    exchange: int
    flags: int
    message_id: int
    length: int

    @property
    def initiator(self) -> bool:
        return bool(self.flags & Flag.INITIATOR)

    @property
    def response(self) -> bool:
        return bool(self.flags & Flag.RESPONSE)


def decode_header(data: bytes) -> Header:
    _need(len(data) >= IKE_HEADER_LEN, f"datagram of {len(data)} bytes is shorter than an IKE header")
    h = Header(*_HDR.unpack_from(data))
    if h.version >> 4 != 2:
        raise IkeDecodeError(f"IKE major version {h.version >> 4}", NotifyType.INVALID_MAJOR_VERSION)
    _need(h.length == len(data), f"header length {h.length} but datagram of {len(data)} bytes")
    return h


def decode_message(data: bytes) -> Message:
    """Decode a whole IKE message (without non-ESP marker). The SK payload
    stays encrypted; everything before it is parsed."""
    h = decode_header(data)
    payloads, sk_off = decode_payloads(h.next_payload, data[IKE_HEADER_LEN:], allow_sk=True,
                                       offset=IKE_HEADER_LEN)
    return Message(h.spi_i, h.spi_r, h.exchange, h.message_id, payloads,
                   initiator=h.initiator, response=h.response, version=h.version,
                   raw=bytes(data), sk_offset=sk_off)
