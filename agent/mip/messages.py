"""Registration Request / Reply, their extensions and the UDP tunnel data message.

Layouts (RFC 5944 §3.3-3.5, RFC 2794, RFC 3024, RFC 3519, RFC 5265), all
big-endian::

    Registration Request (24 fixed bytes)
      type=1 | flags | lifetime u16 | home address | home agent | care-of address
      | identification u64 | extensions...
    Registration Reply (20 fixed bytes)
      type=3 | code | lifetime u16 | home address | home agent | identification u64
      | extensions...
    UDP tunnel data (RFC 3519)
      type=4 | next header | reserved u16 | inner packet
    Extension
      type u8 | length u8 (of the body) | body

Extension types 0-127 must be understood (an unknown one makes the whole
message invalid); 128-255 may be skipped: unknown ones are kept as
:class:`UnknownExtension` so that a relay can pass them on byte for byte.

Decoded extensions remember their exact bytes, so re-encoding a decoded
message (or a copy with fewer extensions, as a foreign agent relays it)
reproduces the received bytes and authenticators stay valid.

Structural rules enforced by :func:`decode_message` (each violation raises
:class:`~agent.mip.errors.MipDecodeError` naming it):

* truncated fixed part, truncated extension header, extension length running
  past the end of the message;
* an unknown extension type below 128;
* a known extension with a body of the wrong size;
* a known extension present twice (in particular a duplicated
  authentication extension);
* a Mobile-Foreign / Foreign-Home authentication extension before the
  Mobile-Home one;
* an extension whose meaning the home agent relies on (NAI, UDP tunnel
  request / reply, TNC) placed after an authentication extension, where it
  would not be covered by the Mobile-Home authenticator.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import ClassVar, Union

from .constants import (
    AUTH_EXTENSIONS,
    EXT_ENCAP_DELIVERY_STYLE,
    EXT_FHAE,
    EXT_MFAE,
    EXT_MHAE,
    EXT_NAI,
    EXT_TNC,
    EXT_UDP_TUNNEL_REPLY,
    EXT_UDP_TUNNEL_REQUEST,
    MSG_REGISTRATION_REPLY,
    MSG_REGISTRATION_REQUEST,
    MSG_TUNNEL_DATA,
    UDP_TUNNEL_DEFAULT_KEEPALIVE,
    RegFlag,
)
from .errors import MipDecodeError

__all__ = [
    "AuthExtension",
    "NaiExtension",
    "UdpTunnelRequest",
    "UdpTunnelReply",
    "TrustedNetworksConfigured",
    "EncapsulatingDeliveryStyle",
    "UnknownExtension",
    "Extension",
    "RegistrationRequest",
    "RegistrationReply",
    "TunnelData",
    "decode_message",
    "decode_request",
    "decode_reply",
    "encode_extension",
    "to_ipv4",
]

_RRQ = struct.Struct("!BBHIIIQ")
_RRP = struct.Struct("!BBHIIQ")
_U32 = struct.Struct("!I")

IPv4Like = Union[IPv4Address, str, int]


_STR_CACHE: dict = {}


def to_ipv4(value: IPv4Like) -> IPv4Address:
    """Return ``value`` (an IPv4Address, dotted string or 32-bit int) as IPv4Address."""
    if type(value) is IPv4Address:
        return value
    if type(value) is str:  # daemons pass socket addresses as strings: cache the parse
        addr = _STR_CACHE.get(value)
        if addr is None:
            if len(_STR_CACHE) >= 4096:
                _STR_CACHE.clear()
            addr = _STR_CACHE[value] = IPv4Address(value)
        return addr
    return IPv4Address(value)


def _set(obj, name, value):
    object.__setattr__(obj, name, value)


# --------------------------------------------------------------------------- extensions


@dataclass(frozen=True)
class AuthExtension:
    """Mobile-Home (32), Mobile-Foreign (33) or Foreign-Home (34) authentication.

    Body: SPI (u32) then the authenticator. The authenticator covers the fixed
    part, every earlier extension and this extension's type, length and SPI.
    """

    type: int
    spi: int
    authenticator: bytes
    _raw: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self):
        if self.type not in AUTH_EXTENSIONS:
            raise ValueError(f"not an authentication extension type: {self.type}")
        if not 0 <= self.spi <= 0xFFFFFFFF:
            raise ValueError(f"SPI out of range: {self.spi}")
        if len(self.authenticator) > 251:
            raise ValueError("authenticator longer than 251 bytes")

    def body(self) -> bytes:
        return _U32.pack(self.spi) + bytes(self.authenticator)


@dataclass(frozen=True)
class NaiExtension:
    """Mobile Node NAI extension (131, RFC 2794): the NAI's bytes (UTF-8)."""

    type: ClassVar[int] = EXT_NAI
    nai: bytes
    _raw: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self):
        if isinstance(self.nai, str):
            _set(self, "nai", self.nai.encode("utf-8"))
        if not 1 <= len(self.nai) <= 255:
            raise ValueError("NAI must be 1..255 bytes")

    @property
    def text(self) -> str:
        return self.nai.decode("utf-8", "replace")

    def body(self) -> bytes:
        return bytes(self.nai)


@dataclass(frozen=True)
class UdpTunnelRequest:
    """UDP Tunnel Request extension (144, RFC 3519), body of 6 bytes.

    sub-type u8 | reserved u8 | flags u8 (F 0x80 force, R 0x40 registration
    through the FA required) | encapsulation u8 (4 IP-in-IP, 47 GRE,
    55 minimal) | reserved u16. Reserved fields are sent as zero.
    """

    type: ClassVar[int] = EXT_UDP_TUNNEL_REQUEST
    flags: int = 0
    encapsulation: int = 4
    sub_type: int = 0
    _raw: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def body(self) -> bytes:
        return struct.pack("!BBBBH", self.sub_type, 0, self.flags, self.encapsulation, 0)


@dataclass(frozen=True)
class UdpTunnelReply:
    """UDP Tunnel Reply extension (44, RFC 3519), body of 6 bytes.

    sub-type u8 | reply code u8 (0 will tunnel, 64 declined) | flags u16
    (F 0x8000) | keepalive interval u16 (seconds).
    """

    type: ClassVar[int] = EXT_UDP_TUNNEL_REPLY
    code: int = 0
    flags: int = 0
    keepalive: int = UDP_TUNNEL_DEFAULT_KEEPALIVE
    sub_type: int = 0
    _raw: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def body(self) -> bytes:
        return struct.pack("!BBHH", self.sub_type, self.code, self.flags, self.keepalive)


@dataclass(frozen=True)
class TrustedNetworksConfigured:
    """Trusted Networks Configured extension (149, RFC 5265).

    UNCONFIRMED body layout: the RFC text could not be read here (Wireshark
    only names type 149; IANA lists sub-types for it). We send sub-type u8 0
    and reserved u8 0 (length 2) and, because the extension is skippable and
    only its presence matters, accept any body on receipt, keeping it as is.
    """

    type: ClassVar[int] = EXT_TNC
    body_bytes: bytes = b"\x00\x00"
    _raw: bytes | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def sub_type(self) -> int | None:
        return self.body_bytes[0] if self.body_bytes else None

    def body(self) -> bytes:
        return bytes(self.body_bytes)


@dataclass(frozen=True)
class EncapsulatingDeliveryStyle:
    """Encapsulating Delivery Style extension (130, RFC 3024): empty body.

    Sent by the mobile node to its foreign agent, after the Mobile-Home
    authentication extension.
    """

    type: ClassVar[int] = EXT_ENCAP_DELIVERY_STYLE
    _raw: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def body(self) -> bytes:
        return b""


@dataclass(frozen=True)
class UnknownExtension:
    """A skippable extension (type >= 128) this core does not interpret."""

    type: int
    data: bytes
    _raw: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self):
        if not 0 <= self.type <= 255 or len(self.data) > 255:
            raise ValueError("extension type or length out of range")

    def body(self) -> bytes:
        return bytes(self.data)


Extension = Union[
    AuthExtension,
    NaiExtension,
    UdpTunnelRequest,
    UdpTunnelReply,
    TrustedNetworksConfigured,
    EncapsulatingDeliveryStyle,
    UnknownExtension,
]

_NAMES = {
    EXT_MHAE: "Mobile-Home Authentication",
    EXT_MFAE: "Mobile-Foreign Authentication",
    EXT_FHAE: "Foreign-Home Authentication",
    EXT_NAI: "NAI",
    EXT_UDP_TUNNEL_REQUEST: "UDP Tunnel Request",
    EXT_UDP_TUNNEL_REPLY: "UDP Tunnel Reply",
    EXT_TNC: "Trusted Networks Configured",
    EXT_ENCAP_DELIVERY_STYLE: "Encapsulating Delivery Style",
}
# extensions the home agent acts on: they must be covered by the MHAE
_MUST_PRECEDE_AUTH = frozenset({EXT_NAI, EXT_UDP_TUNNEL_REQUEST, EXT_UDP_TUNNEL_REPLY, EXT_TNC})


def extension_name(ext_type: int) -> str:
    return _NAMES.get(ext_type, f"type {ext_type}")


def encode_extension(ext: Extension) -> bytes:
    """The bytes of one extension (its received bytes if it was decoded)."""
    raw = ext._raw
    if raw is not None:
        return raw
    body = ext.body()
    if len(body) > 255:
        raise ValueError(f"{extension_name(ext.type)} extension body longer than 255 bytes")
    return bytes((ext.type, len(body))) + body


def _wrong_size(what: str, name: str, n: int, expected: int) -> MipDecodeError:
    extra = f"{n - expected} trailing byte(s)" if n > expected else "truncated body"
    return MipDecodeError(f"{what}: {name} extension length {n}, expected {expected} ({extra})")


def _decode_extension(t: int, body: bytes, what: str):
    n = len(body)
    if t in AUTH_EXTENSIONS:
        if n < 4:
            raise MipDecodeError(f"{what}: {_NAMES[t]} extension length {n} is shorter than its SPI")
        return AuthExtension(t, _U32.unpack_from(body)[0], body[4:])
    if t == EXT_NAI:
        if n == 0:
            raise MipDecodeError(f"{what}: empty NAI extension")
        return NaiExtension(body)
    if t == EXT_UDP_TUNNEL_REQUEST:
        if n != 6:
            raise _wrong_size(what, "UDP Tunnel Request", n, 6)
        st, _r1, flags, encap, _r2 = struct.unpack("!BBBBH", body)
        return UdpTunnelRequest(flags=flags, encapsulation=encap, sub_type=st)
    if t == EXT_UDP_TUNNEL_REPLY:
        if n != 6:
            raise _wrong_size(what, "UDP Tunnel Reply", n, 6)
        st, code, flags, keepalive = struct.unpack("!BBHH", body)
        return UdpTunnelReply(code=code, flags=flags, keepalive=keepalive, sub_type=st)
    if t == EXT_TNC:
        return TrustedNetworksConfigured(body)
    if t == EXT_ENCAP_DELIVERY_STYLE:
        if n != 0:
            raise _wrong_size(what, "Encapsulating Delivery Style", n, 0)
        return EncapsulatingDeliveryStyle()
    if t < 128:
        raise MipDecodeError(f"{what}: unknown non-skippable extension type {t}")
    return UnknownExtension(t, body)


def _decode_extensions(data: bytes, off: int, what: str):
    exts = []
    offsets = []
    seen = set()
    first_auth = None
    n = len(data)
    while off < n:
        if n - off < 2:
            raise MipDecodeError(f"{what}: truncated extension header at offset {off}")
        t = data[off]
        length = data[off + 1]
        end = off + 2 + length
        if end > n:
            raise MipDecodeError(
                f"{what}: extension type {t} length {length} runs past the end "
                f"({n - off - 2} bytes left)")
        ext = _decode_extension(t, data[off + 2:end], what)
        if not isinstance(ext, UnknownExtension):
            if t in seen:
                raise MipDecodeError(f"{what}: duplicated {extension_name(t)} extension")
            seen.add(t)
        if t in AUTH_EXTENSIONS:
            # an MFAE/FHAE without any MHAE is fine (e.g. an FA's own denial)
            if t == EXT_MHAE and first_auth is not None:
                raise MipDecodeError(
                    f"{what}: {extension_name(first_auth)} extension before the "
                    "Mobile-Home Authentication extension")
            if first_auth is None:
                first_auth = t
        elif first_auth is not None and t in _MUST_PRECEDE_AUTH:
            raise MipDecodeError(
                f"{what}: {extension_name(t)} extension after the authentication extension")
        _set(ext, "_raw", data[off:end])
        exts.append(ext)
        offsets.append(off)
        off = end
    return tuple(exts), tuple(offsets)


# --------------------------------------------------------------------------- messages


class _RegistrationMessage:
    """Shared helpers of requests and replies (extension access, auth data)."""

    extensions: tuple
    _raw: bytes | None
    _offsets: tuple | None

    def find(self, ext_type: int):
        """The first extension of ``ext_type``, or None."""
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    def index(self, ext_type: int) -> int | None:
        """Position of the first extension of ``ext_type`` in ``extensions``, or None."""
        for i, ext in enumerate(self.extensions):
            if ext.type == ext_type:
                return i
        return None

    def covered_extensions(self, ext_type: int = EXT_MHAE) -> tuple:
        """The extensions before the ``ext_type`` authentication extension.

        Those are the ones that authentication extension protects; with no
        such extension the result is empty (nothing is protected).
        """
        i = self.index(ext_type)
        return () if i is None else self.extensions[:i]

    def covered(self, find_type: int, auth_type: int = EXT_MHAE):
        """The extension ``find_type`` if it is protected by ``auth_type``, else None."""
        for ext in self.covered_extensions(auth_type):
            if ext.type == find_type:
                return ext
        return None

    def authenticated_data(self, index: int) -> bytes:
        """The bytes the authenticator of ``extensions[index]`` covers.

        That is everything before that extension plus its type, length and
        SPI (RFC 5944 §3.5.1).
        """
        raw = self._raw
        if raw is not None:
            return raw[: self._offsets[index] + 6]
        ext = self.extensions[index]
        head = self._fixed() + b"".join(encode_extension(e) for e in self.extensions[:index])
        return head + bytes((ext.type, 4 + len(ext.authenticator))) + _U32.pack(ext.spi)

    def truncated_after(self, ext_type: int = EXT_MHAE):
        """A copy keeping the extensions up to and including ``ext_type``.

        This is how a foreign agent relays a message: it removes what follows
        the Mobile-Home authentication extension before adding its own.
        Returns None if the message has no such extension.
        """
        from dataclasses import replace

        i = self.index(ext_type)
        if i is None:
            return None
        return replace(self, extensions=self.extensions[: i + 1])

    def with_extensions(self, *exts):
        """A copy with ``exts`` appended."""
        from dataclasses import replace

        return replace(self, extensions=self.extensions + tuple(exts))

    def encode(self) -> bytes:
        return self._fixed() + b"".join(encode_extension(e) for e in self.extensions)

    def _fixed(self) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError


def _check_common(msg):
    if type(msg.home_address) is not IPv4Address:
        _set(msg, "home_address", to_ipv4(msg.home_address))
    if type(msg.home_agent) is not IPv4Address:
        _set(msg, "home_agent", to_ipv4(msg.home_agent))
    if not 0 <= msg.lifetime <= 0xFFFF:
        raise ValueError(f"lifetime out of range: {msg.lifetime}")
    if not 0 <= msg.identification <= 0xFFFFFFFFFFFFFFFF:
        raise ValueError("identification out of range")
    if not isinstance(msg.extensions, tuple):
        _set(msg, "extensions", tuple(msg.extensions))


@dataclass(frozen=True)
class RegistrationRequest(_RegistrationMessage):
    """Registration Request (type 1).

    ``lifetime`` 0 deregisters, 0xFFFF is infinite. ``identification`` is the
    64-bit replay-protection value (NTP timestamp or HA/MN nonces).
    """

    type: ClassVar[int] = MSG_REGISTRATION_REQUEST
    flags: RegFlag
    lifetime: int
    home_address: IPv4Address
    home_agent: IPv4Address
    care_of_address: IPv4Address
    identification: int
    extensions: tuple = ()
    _raw: bytes | None = field(default=None, init=False, compare=False, repr=False)
    _offsets: tuple | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self):
        _check_common(self)
        if type(self.care_of_address) is not IPv4Address:
            _set(self, "care_of_address", to_ipv4(self.care_of_address))
        if type(self.flags) is not RegFlag:
            if not 0 <= int(self.flags) <= 0xFF:
                raise ValueError("flags out of range")
            _set(self, "flags", RegFlag(int(self.flags)))

    def _fixed(self) -> bytes:
        return _RRQ.pack(1, int(self.flags), self.lifetime, int(self.home_address),
                         int(self.home_agent), int(self.care_of_address), self.identification)

    @property
    def colocated(self) -> bool:
        """D flag: the mobile node decapsulates itself (co-located care-of address)."""
        return bool(self.flags & RegFlag.D)

    @property
    def deregistration(self) -> bool:
        return self.lifetime == 0


@dataclass(frozen=True)
class RegistrationReply(_RegistrationMessage):
    """Registration Reply (type 3); ``code`` 0/1 accept, 64-127 FA, 128-255 HA."""

    type: ClassVar[int] = MSG_REGISTRATION_REPLY
    code: int
    lifetime: int
    home_address: IPv4Address
    home_agent: IPv4Address
    identification: int
    extensions: tuple = ()
    _raw: bytes | None = field(default=None, init=False, compare=False, repr=False)
    _offsets: tuple | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self):
        _check_common(self)
        if not 0 <= int(self.code) <= 0xFF:
            raise ValueError("code out of range")
        _set(self, "code", int(self.code))

    def _fixed(self) -> bytes:
        return _RRP.pack(3, self.code, self.lifetime, int(self.home_address),
                         int(self.home_agent), self.identification)


@dataclass(frozen=True)
class TunnelData:
    """RFC 3519 MIP UDP tunnel data message: type 4 | next header | reserved u16 | packet."""

    type: ClassVar[int] = MSG_TUNNEL_DATA
    next_header: int
    payload: bytes
    reserved: int = 0

    def encode(self) -> bytes:
        return struct.pack("!BBH", 4, self.next_header, self.reserved) + bytes(self.payload)


# --------------------------------------------------------------------------- decoding


def _as_bytes(data, what) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise MipDecodeError(f"{what}: expected bytes, got {type(data).__name__}")


def decode_request(data: bytes) -> RegistrationRequest:
    """Decode a Registration Request; raises MipDecodeError."""
    what = "Registration Request"
    data = _as_bytes(data, what)
    if len(data) < 24:
        raise MipDecodeError(f"{what}: truncated fixed part ({len(data)} of 24 bytes)")
    t, flags, lifetime, hoa, ha, coa, ident = _RRQ.unpack_from(data)
    if t != MSG_REGISTRATION_REQUEST:
        raise MipDecodeError(f"{what}: message type {t}, expected 1")
    exts, offsets = _decode_extensions(data, 24, what)
    msg = RegistrationRequest(RegFlag(flags), lifetime, IPv4Address(hoa), IPv4Address(ha),
                              IPv4Address(coa), ident, exts)
    _set(msg, "_raw", data)
    _set(msg, "_offsets", offsets)
    return msg


def decode_reply(data: bytes) -> RegistrationReply:
    """Decode a Registration Reply; raises MipDecodeError."""
    what = "Registration Reply"
    data = _as_bytes(data, what)
    if len(data) < 20:
        raise MipDecodeError(f"{what}: truncated fixed part ({len(data)} of 20 bytes)")
    t, code, lifetime, hoa, ha, ident = _RRP.unpack_from(data)
    if t != MSG_REGISTRATION_REPLY:
        raise MipDecodeError(f"{what}: message type {t}, expected 3")
    exts, offsets = _decode_extensions(data, 20, what)
    msg = RegistrationReply(code, lifetime, IPv4Address(hoa), IPv4Address(ha), ident, exts)
    _set(msg, "_raw", data)
    _set(msg, "_offsets", offsets)
    return msg


def decode_tunnel_data(data: bytes) -> TunnelData:
    """Decode an RFC 3519 tunnel data message; raises MipDecodeError."""
    what = "UDP tunnel data message"
    data = _as_bytes(data, what)
    if len(data) < 4:
        raise MipDecodeError(f"{what}: truncated header ({len(data)} of 4 bytes)")
    t, nh, reserved = struct.unpack_from("!BBH", data)
    if t != MSG_TUNNEL_DATA:
        raise MipDecodeError(f"{what}: message type {t}, expected 4")
    return TunnelData(nh, data[4:], reserved)


def decode_message(data: bytes):
    """Decode any message received on UDP port 434.

    Returns a :class:`RegistrationRequest`, :class:`RegistrationReply` or
    :class:`TunnelData`; raises :class:`MipDecodeError` for anything else.
    """
    data = _as_bytes(data, "Mobile IP message")
    if not data:
        raise MipDecodeError("Mobile IP message: empty datagram")
    t = data[0]
    if t == MSG_REGISTRATION_REQUEST:
        return decode_request(data)
    if t == MSG_REGISTRATION_REPLY:
        return decode_reply(data)
    if t == MSG_TUNNEL_DATA:
        return decode_tunnel_data(data)
    raise MipDecodeError(f"Mobile IP message: unsupported message type {t}")
