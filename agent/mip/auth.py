"""Authentication extensions, security associations and replay protection.

* :class:`SecurityAssociation`: SPI (>= 256), key, algorithm (HMAC-MD5 by
  default, keyed-MD5 "prefix+suffix" MD5(key || data || key) as a legacy
  option) and the replay-protection style (timestamps or nonces).
* :func:`sign` appends an authentication extension; :func:`check` /
  :func:`verify` validate one, comparing the whole 16-byte authenticator in
  constant time (``hmac.compare_digest``).
* Identification helpers: 64-bit NTP timestamps (seconds since 1900 in the
  high 32 bits), nonces, and the home agent's acceptance test.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass, field, replace

from .constants import (
    AUTH_EXTENSIONS,
    DEFAULT_TIMESTAMP_TOLERANCE,
    EXT_MHAE,
    MIN_SPI,
    NTP_EPOCH_OFFSET,
)
from .errors import MipConfigError
from .messages import AuthExtension

__all__ = [
    "AuthAlgorithm",
    "ReplayMode",
    "AuthResult",
    "SecurityAssociation",
    "sign",
    "check",
    "verify",
    "ntp_timestamp",
    "ntp_to_unix",
    "high32",
    "low32",
    "timestamp_acceptable",
]

AUTHENTICATOR_LENGTH = 16  # both MD5 algorithms


class AuthAlgorithm(str, enum.Enum):
    HMAC_MD5 = "hmac-md5"  # RFC 2104 HMAC with MD5, the default (RFC 3344/5944)
    KEYED_MD5 = "keyed-md5"  # legacy prefix+suffix MD5(key || data || key) (RFC 2002)


class ReplayMode(str, enum.Enum):
    TIMESTAMP = "timestamp"
    NONCE = "nonce"


class AuthResult(enum.Enum):
    OK = "ok"
    MISSING = "missing"  # no such authentication extension
    BAD_SPI = "bad-spi"  # SPI differs from the security association's
    BAD_AUTHENTICATOR = "bad-authenticator"  # wrong length or value


@dataclass(frozen=True)
class SecurityAssociation:
    """A mobility security association.

    ``spi`` must be 256..2**32-1 (0-255 are reserved); ``key`` is never shown
    in ``repr``. ``replay`` and ``tolerance`` (seconds, timestamps only) set
    how identifications are produced and checked.
    """

    spi: int
    key: bytes = field(repr=False)
    algorithm: AuthAlgorithm = AuthAlgorithm.HMAC_MD5
    replay: ReplayMode = ReplayMode.TIMESTAMP
    tolerance: float = DEFAULT_TIMESTAMP_TOLERANCE
    _hmac: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.spi, int) or not MIN_SPI <= self.spi <= 0xFFFFFFFF:
            raise MipConfigError(f"SPI {self.spi!r} is reserved or out of range (256..2**32-1)")
        if isinstance(self.key, str):
            raise MipConfigError("key must be bytes")
        key = bytes(self.key)
        if not key:
            raise MipConfigError("empty key")
        object.__setattr__(self, "key", key)
        try:
            object.__setattr__(self, "algorithm", AuthAlgorithm(self.algorithm))
            object.__setattr__(self, "replay", ReplayMode(self.replay))
        except ValueError as exc:
            raise MipConfigError(str(exc)) from None
        if self.tolerance < 0:
            raise MipConfigError("negative timestamp tolerance")
        if self.algorithm is AuthAlgorithm.HMAC_MD5:
            object.__setattr__(self, "_hmac", hmac.new(key, digestmod=hashlib.md5))

    def compute(self, data: bytes) -> bytes:
        """The 16-byte authenticator of ``data``."""
        if self._hmac is not None:
            h = self._hmac.copy()
            h.update(data)
            return h.digest()
        return hashlib.md5(self.key + data + self.key).digest()

    def matches(self, data: bytes, authenticator: bytes) -> bool:
        """Constant-time comparison of the whole authenticator with ours."""
        return hmac.compare_digest(self.compute(data), bytes(authenticator))


def sign(message, sa: SecurityAssociation, ext_type: int = EXT_MHAE):
    """Return ``message`` with an authentication extension appended.

    ``ext_type`` is 32 (Mobile-Home), 33 (Mobile-Foreign) or 34
    (Foreign-Home). The authenticator covers the whole message so far plus
    the new extension's type, length and SPI.
    """
    if ext_type not in AUTH_EXTENSIONS:
        raise ValueError(f"not an authentication extension type: {ext_type}")
    head = message.encode() + struct.pack("!BBI", ext_type, 4 + AUTHENTICATOR_LENGTH, sa.spi)
    ext = AuthExtension(ext_type, sa.spi, sa.compute(head))
    return replace(message, extensions=message.extensions + (ext,))


def check(message, sa: SecurityAssociation, ext_type: int = EXT_MHAE) -> AuthResult:
    """Validate the ``ext_type`` authentication extension of ``message`` with ``sa``."""
    i = message.index(ext_type)
    if i is None:
        return AuthResult.MISSING
    ext = message.extensions[i]
    if ext.spi != sa.spi:
        return AuthResult.BAD_SPI
    if len(ext.authenticator) != AUTHENTICATOR_LENGTH:
        return AuthResult.BAD_AUTHENTICATOR
    if not sa.matches(message.authenticated_data(i), ext.authenticator):
        return AuthResult.BAD_AUTHENTICATOR
    return AuthResult.OK


def verify(message, sa: SecurityAssociation, ext_type: int = EXT_MHAE) -> bool:
    """True if the ``ext_type`` authentication extension is present and valid."""
    return check(message, sa, ext_type) is AuthResult.OK


# --------------------------------------------------------------------------- identification


def ntp_timestamp(unix_time: float) -> int:
    """A 64-bit NTP timestamp (seconds since 1900 . fraction) for a UNIX time."""
    secs = int(unix_time // 1)
    frac = int((unix_time - secs) * (1 << 32)) & 0xFFFFFFFF
    return (((secs + NTP_EPOCH_OFFSET) & 0xFFFFFFFF) << 32) | frac


def ntp_to_unix(identification: int) -> float:
    """The UNIX time of a 64-bit NTP timestamp (era 0, i.e. up to 2036)."""
    return (identification >> 32) - NTP_EPOCH_OFFSET + (identification & 0xFFFFFFFF) / (1 << 32)


def high32(identification: int) -> int:
    return identification >> 32


def low32(identification: int) -> int:
    return identification & 0xFFFFFFFF


def timestamp_acceptable(identification: int, now: float, tolerance: float,
                         last: int | None) -> bool:
    """The home agent's timestamp test (RFC 5944 §5.7.1).

    The timestamp must be within ``tolerance`` seconds of ``now`` (UNIX time)
    and, if a previous one was accepted for this mobile node, greater than it.
    """
    if abs(ntp_to_unix(identification) - now) > tolerance:
        return False
    return last is None or identification > last
