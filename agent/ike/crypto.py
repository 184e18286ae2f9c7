"""IKEv2 cryptography on top of the ``cryptography`` package.

Key exchange (groups 31, 19, 14), PRF and prf+ (RFC 7296 2.13), SKEYSEED and
the seven IKE keys (2.14), the SK payload (3.14 for AES-CBC + HMAC-SHA2,
RFC 5282 for AES-GCM-16), PSK AUTH and the signed octets (2.15), CHILD SA
KEYMAT (2.17) and NAT detection hashes (2.23).
"""

from __future__ import annotations

import hmac as _hmac
import os
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import dh, ec, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .const import IKE_HEADER_LEN, DhGroup, PayloadType
from .errors import IkeCryptoError, IkeIntegrityError
from .message import Message, Payload, decode_payloads, encode_payloads
from .proposals import EncrSpec, EspSuite, IkeSuite, IntegSpec, PrfSpec

# RFC 3526 group 14 (2048-bit MODP), generator 2
MODP_2048_P = int(
    "ffffffffffffffffc90fdaa22168c234c4c6628b80dc1cd129024e088a67cc74"
    "020bbea63b139b22514a08798e3404ddef9519b3cd3a431b302b0a6df25f1437"
    "4fe1356d6d51c245e485b576625e7ec6f44c42e9a637ed6b0bff5cb6f406b7ed"
    "ee386bfb5a899fa5ae9f24117c4b1fe649286651ece45b3dc2007cb8a163bf05"
    "98da48361c55d39a69163fa8fd24cf5f83655d23dca3ad961c62f356208552bb"
    "9ed529077096966d670c354e4abc9804f1746c08ca18217c32905e462e36ce3b"
    "e39e772c180e86039b2783a2ec07a28fb5c55df06f4c52c9de2bcbf695581718"
    "3995497cea956ae515d2261898fa051015728e5a8aacaa68ffffffffffffffff", 16)
_MODP_2048_PARAMS = None


def _modp_params():
    global _MODP_2048_PARAMS
    if _MODP_2048_PARAMS is None:
        _MODP_2048_PARAMS = dh.DHParameterNumbers(MODP_2048_P, 2).parameters()
    return _MODP_2048_PARAMS


SUPPORTED_GROUPS = (DhGroup.CURVE_25519, DhGroup.ECP_256, DhGroup.MODP_2048)


class DhExchange:
    """One side of a Diffie-Hellman exchange in an IKE group.

    ``public`` is the KE payload's data; :meth:`shared_secret` returns g^ir
    in the encoding RFC 7296 / RFC 5903 / RFC 8031 prescribe.
    """

    def __init__(self, group: int):
        self.group = int(group)
        if group == DhGroup.CURVE_25519:
            self._priv = x25519.X25519PrivateKey.generate()
            self.public = self._priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        elif group == DhGroup.ECP_256:
            self._priv = ec.generate_private_key(ec.SECP256R1())
            pt = self._priv.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
            self.public = pt[1:]                     # x | y, no 0x04 prefix (RFC 5903)
        elif group == DhGroup.MODP_2048:
            self._priv = _modp_params().generate_private_key()
            self.public = self._priv.public_key().public_numbers().y.to_bytes(256, "big")
        else:
            raise IkeCryptoError(f"unsupported DH group {group}")

    def shared_secret(self, peer: bytes) -> bytes:
        try:
            if self.group == DhGroup.CURVE_25519:
                if len(peer) != 32:
                    raise IkeCryptoError(f"Curve25519 KE data of {len(peer)} bytes")
                out = self._priv.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
                if not any(out):
                    raise IkeCryptoError("Curve25519 shared secret is zero")
                return out
            if self.group == DhGroup.ECP_256:
                if len(peer) != 64:
                    raise IkeCryptoError(f"ECP-256 KE data of {len(peer)} bytes")
                pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + peer)
                return self._priv.exchange(ec.ECDH(), pub)
            if len(peer) != 256:
                raise IkeCryptoError(f"MODP-2048 KE data of {len(peer)} bytes")
            y = int.from_bytes(peer, "big")
            if not 1 < y < MODP_2048_P - 1:
                raise IkeCryptoError("MODP-2048 public value out of range")
            pub = dh.DHPublicNumbers(y, _modp_params().parameter_numbers()).public_key()
            return self._priv.exchange(pub).rjust(256, b"\x00")
        except IkeCryptoError:
            raise
        except ValueError as e:
            raise IkeCryptoError(f"invalid DH public value for group {self.group}: {e}") from None


# --------------------------------------------------------------------------- PRF

def prf(spec: PrfSpec, key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, spec.hash())
    h.update(data)
    return h.finalize()


def prf_plus(spec: PrfSpec, key: bytes, seed: bytes, length: int) -> bytes:
    """prf+ of RFC 7296 2.13: T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n)."""
    if length > 255 * spec.out_len:
        raise IkeCryptoError("prf+ asked for more than 255 blocks")
    out = bytearray()
    t = b""
    n = 1
    while len(out) < length:
        t = prf(spec, key, t + seed + bytes([n]))
        out += t
        n += 1
    return bytes(out[:length])


@dataclass(repr=False)
class IkeKeys:
    """The seven IKE SA keys and what they belong to (never logged)."""

    suite: IkeSuite
    spi_i: bytes
    spi_r: bytes
    sk_d: bytes
    sk_ai: bytes
    sk_ar: bytes
    sk_ei: bytes
    sk_er: bytes
    sk_pi: bytes
    sk_pr: bytes

    def __repr__(self) -> str:
        return f"IkeKeys({self.suite.name}, {self.spi_i.hex()}_i {self.spi_r.hex()}_r)"


def derive_ike_keys(suite: IkeSuite, ni: bytes, nr: bytes, shared: bytes,
                    spi_i: bytes, spi_r: bytes) -> IkeKeys:
    """SKEYSEED = prf(Ni | Nr, g^ir); keys = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr)."""
    return _split_ike_keys(suite, prf(suite.prf, ni + nr, shared), ni, nr, spi_i, spi_r)


def derive_rekeyed_ike_keys(suite: IkeSuite, old_prf: PrfSpec, old_sk_d: bytes, ni: bytes, nr: bytes,
                            shared: bytes, spi_i: bytes, spi_r: bytes) -> IkeKeys:
    """Keys of an IKE SA made by rekeying (RFC 7296 2.18): SKEYSEED =
    prf(SK_d (old), g^ir (new) | Ni | Nr) with the old SA's PRF, then prf+
    of the new SA's PRF over Ni | Nr | SPIi | SPIr (the new SPIs)."""
    return _split_ike_keys(suite, prf(old_prf, old_sk_d, shared + ni + nr), ni, nr, spi_i, spi_r)


def _split_ike_keys(suite: IkeSuite, skeyseed: bytes, ni: bytes, nr: bytes, spi_i: bytes,
                    spi_r: bytes) -> IkeKeys:
    p = suite.prf.out_len
    a = suite.integ.key_len if suite.integ else 0
    e = suite.encr.keymat_len
    km = prf_plus(suite.prf, skeyseed, ni + nr + spi_i + spi_r, 3 * p + 2 * a + 2 * e)
    parts = []
    off = 0
    for n in (p, a, a, e, e, p, p):
        parts.append(km[off:off + n])
        off += n
    return IkeKeys(suite, spi_i, spi_r, *parts)


# --------------------------------------------------------------------------- SK payload

@dataclass(repr=False)
class SkCipher:
    """Seals and opens SK payloads for one direction pair.

    ``out_*`` keys protect what we send, ``in_*`` what we receive.
    """

    encr: EncrSpec
    integ: IntegSpec | None
    out_key: bytes
    out_integ: bytes
    in_key: bytes
    in_integ: bytes
    _iv_counter: int = field(default=0)
    rng: object = field(default=os.urandom)

    @classmethod
    def for_initiator(cls, keys: IkeKeys) -> "SkCipher":
        return cls(keys.suite.encr, keys.suite.integ, keys.sk_ei, keys.sk_ai, keys.sk_er, keys.sk_ar)

    @classmethod
    def for_responder(cls, keys: IkeKeys) -> "SkCipher":
        return cls(keys.suite.encr, keys.suite.integ, keys.sk_er, keys.sk_ar, keys.sk_ei, keys.sk_ai)

    @property
    def overhead(self) -> int:
        return self.encr.iv_len + (self.encr.icv_len if self.encr.aead else self.integ.trunc_len)

    def seal(self, msg: Message, inner: list[Payload] | None = None, iv: bytes | None = None) -> bytes:
        """Encode ``msg`` with ``inner`` (default: msg.payloads) inside an SK payload."""
        inner = msg.payloads if inner is None else inner
        first, body = encode_payloads(inner)
        enc = self.encr
        if enc.aead:
            padlen = 0
        else:
            padlen = (-(len(body) + 1)) % enc.block_len
        plain = body + b"\x00" * padlen + bytes([padlen])
        if iv is None:
            if enc.aead:        # unique per key: a counter (never repeats within an SA)
                self._iv_counter += 1
                iv = self._iv_counter.to_bytes(enc.iv_len, "big")
            else:               # CBC: unpredictable
                iv = self.rng(enc.iv_len)
        if len(iv) != enc.iv_len:
            raise ValueError("wrong IV length")
        tail = enc.icv_len if enc.aead else self.integ.trunc_len
        sk_len = 4 + len(iv) + len(plain) + tail
        header = msg.header(PayloadType.SK, IKE_HEADER_LEN + sk_len)
        sk_hdr = struct.pack("!BBH", first, 0, sk_len)
        if enc.aead:
            key, salt = self.out_key[:enc.key_len], self.out_key[enc.key_len:]
            ct = AESGCM(key).encrypt(salt + iv, plain, header + sk_hdr)
            return header + sk_hdr + iv + ct
        c = Cipher(algorithms.AES(self.out_key), modes.CBC(iv)).encryptor()
        ct = c.update(plain) + c.finalize()
        out = header + sk_hdr + iv + ct
        return out + _mac(self.integ, self.out_integ, out)

    def open(self, msg: Message) -> list[Payload]:
        """Check and decrypt the SK payload of a decoded message, then parse
        the inner payloads. Integrity is verified before anything inside is
        looked at; raises IkeIntegrityError, then IkeDecodeError."""
        sk = msg.sk
        if sk is None or msg.sk_offset is None:
            raise IkeIntegrityError("message has no SK payload")
        return decode_payloads(sk.first_inner, self.decrypt(msg.raw, msg.sk_offset))[0]

    def decrypt(self, raw: bytes, sk_offset: int) -> bytes:
        enc = self.encr
        body_off = sk_offset + 4
        if enc.aead:
            body = raw[body_off:]
            if len(body) < enc.iv_len + enc.icv_len + 1:
                raise IkeIntegrityError("SK payload too short")
            iv, ct = body[:enc.iv_len], body[enc.iv_len:]
            key, salt = self.in_key[:enc.key_len], self.in_key[enc.key_len:]
            try:
                plain = AESGCM(key).decrypt(salt + iv, ct, raw[:body_off])
            except InvalidTag:
                raise IkeIntegrityError("AES-GCM ICV check failed") from None
        else:
            t = self.integ.trunc_len
            if len(raw) - body_off < enc.iv_len + enc.block_len + t:
                raise IkeIntegrityError("SK payload too short")
            if not _hmac.compare_digest(_mac(self.integ, self.in_integ, raw[:-t]), raw[-t:]):
                raise IkeIntegrityError(f"{self.integ.name} checksum mismatch")
            body = raw[body_off:-t]
            iv, ct = body[:enc.iv_len], body[enc.iv_len:]
            if len(ct) % enc.block_len:
                raise IkeIntegrityError("SK ciphertext not a multiple of the block size")
            c = Cipher(algorithms.AES(self.in_key), modes.CBC(iv)).decryptor()
            plain = c.update(ct) + c.finalize()
        padlen = plain[-1]
        if padlen + 1 > len(plain):
            raise IkeIntegrityError("SK pad length larger than the plaintext")
        return plain[:-(padlen + 1)]


def _mac(integ: IntegSpec, key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, integ.hash())
    h.update(data)
    return h.finalize()[:integ.trunc_len]


# --------------------------------------------------------------------------- AUTH

KEY_PAD = b"Key Pad for IKEv2"


def signed_octets(prf_spec: PrfSpec, real_message: bytes, peer_nonce: bytes,
                  sk_p: bytes, id_body: bytes) -> bytes:
    """<Initiator|Responder>SignedOctets = RealMessage | Nonce | prf(SK_p, ID body)."""
    return real_message + peer_nonce + prf(prf_spec, sk_p, id_body)


def psk_auth(prf_spec: PrfSpec, psk: bytes, octets: bytes) -> bytes:
    """AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>)."""
    return prf(prf_spec, prf(prf_spec, psk, KEY_PAD), octets)


# --------------------------------------------------------------------------- NAT-D

def nat_hash(spi_i: bytes, spi_r: bytes, ip: str, port: int) -> bytes:
    """SHA-1(SPIi | SPIr | IP | Port) for NAT_DETECTION_*_IP (RFC 7296 2.23)."""
    import ipaddress
    h = hashes.Hash(hashes.SHA1())
    h.update(spi_i + spi_r + ipaddress.ip_address(ip).packed + struct.pack("!H", port))
    return h.finalize()


# --------------------------------------------------------------------------- CHILD SA

@dataclass(frozen=True, repr=False)
class ChildKeys:
    """ESP keys of a CHILD SA pair (i2r = initiator to responder)."""

    encr_i2r: bytes
    integ_i2r: bytes
    encr_r2i: bytes
    integ_r2i: bytes

    def __repr__(self) -> str:
        return "ChildKeys(...)"


def derive_child_keys(ike_prf: PrfSpec, sk_d: bytes, suite: EspSuite, ni: bytes, nr: bytes,
                      shared: bytes = b"") -> ChildKeys:
    """KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr); encryption keys before
    integrity keys, initiator-to-responder first (RFC 7296 2.17). AES-GCM
    keys carry their 4-byte salt at the end (RFC 4106)."""
    e = suite.encr.keymat_len
    a = suite.integ.key_len if suite.integ else 0
    km = prf_plus(ike_prf, sk_d, shared + ni + nr, 2 * (e + a))
    return ChildKeys(km[:e], km[e:e + a], km[e + a:2 * e + a], km[2 * e + a:])
