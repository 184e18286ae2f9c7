"""Identities, certificate checks and signature AUTH (RFC 7296 2.15, RFC 7427).

Certificate chains are checked with cryptography's primitives (this host has
cryptography 38, before its x509 verification API): every signature up to a
configured CA, validity at the injected wall-clock time, CA basic constraints
of issuers, and the peer's identity against the end-entity certificate
(subjectAltName dNSName / iPAddress / rfc822Name, or the subject DN).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from .const import AuthMethod, HashAlgorithm, IdType
from .errors import IkeAuthError, IkeConfigError

# --------------------------------------------------------------------------- identities

_DN_KEYS = {
    "C": NameOID.COUNTRY_NAME, "ST": NameOID.STATE_OR_PROVINCE_NAME, "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME, "E": NameOID.EMAIL_ADDRESS, "EMAIL": NameOID.EMAIL_ADDRESS,
    "DC": NameOID.DOMAIN_COMPONENT, "SN": NameOID.SURNAME, "G": NameOID.GIVEN_NAME,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER, "UID": NameOID.USER_ID, "T": NameOID.TITLE,
}
_DN_NAMES = {v: k for k, v in _DN_KEYS.items() if k not in ("EMAIL",)}


def parse_dn(text: str) -> x509.Name:
    """Parse 'C=XX, O=Org, CN=name' (first RDN first, as in the DER)."""
    rdns = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if "=" not in part:
            raise IkeConfigError(f"bad DN component {part!r}")
        k, v = part.split("=", 1)
        oid = _DN_KEYS.get(k.strip().upper())
        if oid is None:
            raise IkeConfigError(f"unknown DN attribute {k!r}")
        rdns.append(x509.RelativeDistinguishedName([x509.NameAttribute(oid, v.strip())]))
    return x509.Name(rdns)


def dn_to_str(name: x509.Name) -> str:
    parts = []
    for rdn in name.rdns:
        for a in rdn:
            parts.append(f"{_DN_NAMES.get(a.oid, a.oid.dotted_string)}={a.value}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Identity:
    """An IKE identity (ID payload type and data)."""

    id_type: int
    data: bytes
    label: str = field(default="", compare=False)   # display form of a DN

    @classmethod
    def fqdn(cls, name: str) -> "Identity":
        return cls(IdType.FQDN, name.encode())

    @classmethod
    def email(cls, addr: str) -> "Identity":
        return cls(IdType.RFC822_ADDR, addr.encode())

    @classmethod
    def ip(cls, addr: str) -> "Identity":
        a = ipaddress.ip_address(addr)
        return cls(IdType.IPV4_ADDR if a.version == 4 else IdType.IPV6_ADDR, a.packed)

    @classmethod
    def dn(cls, name: x509.Name | str) -> "Identity":
        if isinstance(name, str):
            name = parse_dn(name)
        return cls(IdType.DER_ASN1_DN, name.public_bytes(), dn_to_str(name))

    @classmethod
    def key_id(cls, data: bytes) -> "Identity":
        return cls(IdType.KEY_ID, data)

    @classmethod
    def parse(cls, text: str) -> "Identity":
        """strongSwan's rules: an IP address, a DN when it has '=', an email
        when it has '@' (an FQDN when it starts with '@'), else an FQDN."""
        t = text.strip()
        try:
            return cls.ip(t)
        except ValueError:
            pass
        if "=" in t:
            return cls.dn(t)
        if t.startswith("@"):
            return cls.fqdn(t[1:])
        if "@" in t:
            return cls.email(t)
        return cls.fqdn(t)

    def __str__(self) -> str:
        if self.id_type in (IdType.FQDN, IdType.RFC822_ADDR):
            return self.data.decode(errors="replace")
        if self.id_type in (IdType.IPV4_ADDR, IdType.IPV6_ADDR) and len(self.data) in (4, 16):
            return str(ipaddress.ip_address(self.data))
        if self.id_type == IdType.DER_ASN1_DN:
            return self.label or f"DN:{self.data.hex()}"
        return f"ID{self.id_type}:{self.data.hex()}"

    def body(self) -> bytes:
        """RestOfIDPayload: ID type, three reserved bytes, data."""
        return bytes([self.id_type, 0, 0, 0]) + self.data


def identity_in_cert(ident: Identity, cert: x509.Certificate) -> bool:
    """Whether the certificate vouches for the identity."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if ident.id_type == IdType.DER_ASN1_DN:
        return cert.subject.public_bytes() == ident.data
    if san is None:
        return False
    if ident.id_type == IdType.FQDN:
        want = ident.data.decode(errors="replace").lower().rstrip(".")
        return any(n.lower().rstrip(".") == want for n in san.get_values_for_type(x509.DNSName))
    if ident.id_type == IdType.RFC822_ADDR:
        want = ident.data.decode(errors="replace").lower()
        return any(n.lower() == want for n in san.get_values_for_type(x509.RFC822Name))
    if ident.id_type in (IdType.IPV4_ADDR, IdType.IPV6_ADDR):
        try:
            want = ipaddress.ip_address(ident.data)
        except ValueError:
            return False
        return want in san.get_values_for_type(x509.IPAddress)
    return False


# --------------------------------------------------------------------------- certificates

def _naive_utc(t: datetime.datetime) -> datetime.datetime:
    if t.tzinfo is not None:
        t = t.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return t


def _verify_signed_by(cert: x509.Certificate, issuer_key) -> None:
    h = cert.signature_hash_algorithm
    try:
        if isinstance(issuer_key, ec.EllipticCurvePublicKey):
            issuer_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(h))
        elif isinstance(issuer_key, rsa.RSAPublicKey):
            issuer_key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), h)
        elif isinstance(issuer_key, ed25519.Ed25519PublicKey):
            issuer_key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            raise IkeAuthError(f"unsupported issuer key type {type(issuer_key).__name__}")
    except InvalidSignature:
        raise IkeAuthError(f"signature of certificate '{dn_to_str(cert.subject)}' does not verify") from None


def _check_validity(cert: x509.Certificate, now: datetime.datetime) -> None:
    n = _naive_utc(now)
    if n < cert.not_valid_before:
        raise IkeAuthError(f"certificate '{dn_to_str(cert.subject)}' not valid before {cert.not_valid_before}Z")
    if n > cert.not_valid_after:
        raise IkeAuthError(f"certificate '{dn_to_str(cert.subject)}' expired {cert.not_valid_after}Z")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


_IKE_EKUS = {"1.3.6.1.5.5.7.3.17",       # id-kp-ipsecIKE (RFC 4945)
             "2.5.29.37.0",              # anyExtendedKeyUsage
             "1.3.6.1.5.5.7.3.1",        # serverAuth (what most gateway certificates carry)
             "1.3.6.1.5.5.8.2.2"}        # iKEIntermediate


def _check_end_entity_usage(cert: x509.Certificate) -> None:
    """The gateway's certificate must be usable for signing IKE AUTH: keyUsage (when present)
    with digitalSignature; a *critical* extendedKeyUsage must allow IKE (RFC 4945 5.1.3.12)."""
    name = dn_to_str(cert.subject)
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.digital_signature:
            raise IkeAuthError(f"certificate '{name}' keyUsage does not allow digitalSignature")
    except x509.ExtensionNotFound:
        pass
    try:
        ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        return
    if ext.critical and not {o.dotted_string for o in ext.value} & _IKE_EKUS:
        raise IkeAuthError(f"certificate '{name}' has a critical extendedKeyUsage without IKE, server "
                           "or any usage")


def _check_issuer(ca: x509.Certificate, below: int) -> None:
    """An issuing CA: keyUsage (when present) with keyCertSign, and a pathLenConstraint that
    allows the ``below`` intermediate CA certificates between it and the end entity."""
    name = dn_to_str(ca.subject)
    try:
        ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise IkeAuthError(f"issuer '{name}' keyUsage does not allow keyCertSign")
    except x509.ExtensionNotFound:
        pass
    try:
        plen = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    except x509.ExtensionNotFound:
        plen = None
    if plen is not None and below > plen:
        raise IkeAuthError(f"issuer '{name}' allows {plen} intermediate CA(s) below it (pathLenConstraint), "
                           f"the chain has {below}")


def _intermediates_below(chain: list[x509.Certificate]) -> int:
    """The intermediate CA certificates between the next issuer and the end entity (``chain[0]``)
    that count against its pathLenConstraint: self-issued ones (a CA's key rollover) do not
    (RFC 5280 6.1.4 (l))."""
    return sum(1 for c in chain[1:] if c.subject != c.issuer)


def verify_chain(ee: x509.Certificate, intermediates: list[x509.Certificate],
                 trusted: list[x509.Certificate], now: datetime.datetime, max_depth: int = 6) -> list[x509.Certificate]:
    """Build and check ee -> intermediates -> a trusted CA. Returns the chain."""
    if not trusted:
        raise IkeAuthError("no trusted CA configured")
    chain = [ee]
    cur = ee
    _check_validity(ee, now)
    _check_end_entity_usage(ee)
    for _ in range(max_depth):
        for ca in trusted:
            if ca.subject == cur.issuer:
                try:
                    _verify_signed_by(cur, ca.public_key())
                except IkeAuthError:
                    continue
                _check_validity(ca, now)
                _check_issuer(ca, _intermediates_below(chain))
                chain.append(ca)
                return chain
        nxt = next((c for c in intermediates if c.subject == cur.issuer and c is not cur), None)
        if nxt is None:
            raise IkeAuthError(f"certificate '{dn_to_str(cur.subject)}' is not issued by a trusted CA "
                               f"(issuer '{dn_to_str(cur.issuer)}')")
        if not _is_ca(nxt):
            raise IkeAuthError(f"issuer '{dn_to_str(nxt.subject)}' is not a CA")
        _verify_signed_by(cur, nxt.public_key())
        _check_validity(nxt, now)
        _check_issuer(nxt, _intermediates_below(chain))
        chain.append(nxt)
        cur = nxt
    raise IkeAuthError("certificate chain too long")


def certreq_hash(ca: x509.Certificate) -> bytes:
    """CERTREQ content: SHA-1 of the CA's SubjectPublicKeyInfo."""
    h = hashes.Hash(hashes.SHA1())
    h.update(ca.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
    return h.finalize()


# --------------------------------------------------------------------------- RFC 7427

def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _der_oid(dotted: str) -> bytes:
    arcs = [int(x) for x in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for a in arcs[2:]:
        enc = [a & 0x7F]
        a >>= 7
        while a:
            enc.append(0x80 | (a & 0x7F))
            a >>= 7
        body += bytes(reversed(enc))
    return b"\x06" + _der_len(len(body)) + bytes(body)


def _alg_id(oid: str, null_params: bool) -> bytes:
    body = _der_oid(oid) + (b"\x05\x00" if null_params else b"")
    return b"\x30" + _der_len(len(body)) + body


# signature algorithm OIDs (RFC 5758, RFC 4055, RFC 8410)
_SIG_ALGS = {
    # oid: (key kind, hash class or None, NULL params)
    "1.2.840.10045.4.3.2": ("ecdsa", hashes.SHA256, False),
    "1.2.840.10045.4.3.3": ("ecdsa", hashes.SHA384, False),
    "1.2.840.10045.4.3.4": ("ecdsa", hashes.SHA512, False),
    "1.2.840.113549.1.1.11": ("rsa", hashes.SHA256, True),
    "1.2.840.113549.1.1.12": ("rsa", hashes.SHA384, True),
    "1.2.840.113549.1.1.13": ("rsa", hashes.SHA512, True),
    "1.3.101.112": ("ed25519", None, False),
}
_HASH_IDS = {hashes.SHA256: HashAlgorithm.SHA2_256, hashes.SHA384: HashAlgorithm.SHA2_384,
             hashes.SHA512: HashAlgorithm.SHA2_512}


def _parse_alg_id(der: bytes) -> tuple[str, bytes]:
    """(dotted OID, raw parameters) of a DER AlgorithmIdentifier."""
    def tlv(buf: bytes, off: int) -> tuple[int, int, int]:
        if off + 2 > len(buf):
            raise IkeAuthError("truncated AlgorithmIdentifier")
        tag, ln = buf[off], buf[off + 1]
        off += 2
        if ln & 0x80:
            n = ln & 0x7F
            if n == 0 or n > 2 or off + n > len(buf):
                raise IkeAuthError("bad DER length in AlgorithmIdentifier")
            ln = int.from_bytes(buf[off:off + n], "big")
            off += n
        if off + ln > len(buf):
            raise IkeAuthError("truncated AlgorithmIdentifier")
        return tag, off, ln
    tag, off, ln = tlv(der, 0)
    if tag != 0x30 or off + ln != len(der):
        raise IkeAuthError("AlgorithmIdentifier is not a SEQUENCE")
    t2, o2, l2 = tlv(der, off)
    if t2 != 0x06 or l2 == 0:
        raise IkeAuthError("AlgorithmIdentifier without an OID")
    raw = der[o2:o2 + l2]
    arcs = [raw[0] // 40 if raw[0] < 80 else 2, raw[0] % 40 if raw[0] < 80 else raw[0] - 80]
    v = 0
    for b in raw[1:]:
        v = (v << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(v)
            v = 0
    return ".".join(map(str, arcs)), der[o2 + l2:off + ln]


def _hash_for_key(key) -> type:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {256: hashes.SHA256, 384: hashes.SHA384}.get(key.curve.key_size, hashes.SHA512)
    return hashes.SHA256


def sign_auth(key, octets: bytes, peer_hashes: set[int] | None) -> tuple[int, bytes]:
    """Our AUTH payload for a private key: RFC 7427 method 14 when the peer
    announced SIGNATURE_HASH_ALGORITHMS with our hash, else the classic
    method (9/10/11 for ECDSA, 1 for RSA)."""
    h = _hash_for_key(key)
    use_7427 = bool(peer_hashes) and _HASH_IDS.get(h) in peer_hashes
    if isinstance(key, ec.EllipticCurvePrivateKey):
        sig = key.sign(octets, ec.ECDSA(h()))
        oid = {hashes.SHA256: "1.2.840.10045.4.3.2", hashes.SHA384: "1.2.840.10045.4.3.3",
               hashes.SHA512: "1.2.840.10045.4.3.4"}[h]
        if use_7427:
            alg = _alg_id(oid, False)
            return AuthMethod.DIGITAL_SIGNATURE, bytes([len(alg)]) + alg + sig
        size = {256: 32, 384: 48, 521: 66}.get(key.curve.key_size)
        if size is None:
            raise IkeConfigError(f"no classic IKE AUTH method for curve {key.curve.name}")
        r, s = decode_dss_signature(sig)
        method = {256: AuthMethod.ECDSA_SHA256_P256, 384: AuthMethod.ECDSA_SHA384_P384,
                  521: AuthMethod.ECDSA_SHA512_P521}[key.curve.key_size]
        return method, r.to_bytes(size, "big") + s.to_bytes(size, "big")
    if isinstance(key, rsa.RSAPrivateKey):
        if use_7427:
            alg = _alg_id("1.2.840.113549.1.1.11", True)
            return AuthMethod.DIGITAL_SIGNATURE, bytes([len(alg)]) + alg + key.sign(
                octets, padding.PKCS1v15(), hashes.SHA256())
        return AuthMethod.RSA_SIG, key.sign(octets, padding.PKCS1v15(), hashes.SHA1())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        if not peer_hashes or HashAlgorithm.IDENTITY not in peer_hashes:
            raise IkeConfigError("Ed25519 needs RFC 7427 with the identity hash")
        alg = _alg_id("1.3.101.112", False)
        return AuthMethod.DIGITAL_SIGNATURE, bytes([len(alg)]) + alg + key.sign(octets)
    raise IkeConfigError(f"unsupported private key type {type(key).__name__}")


def verify_auth(key, method: int, data: bytes, octets: bytes) -> str:
    """Check the peer's signature AUTH against its certificate's public key.
    Returns a description of the scheme; raises IkeAuthError."""
    try:
        if method == AuthMethod.DIGITAL_SIGNATURE:
            if not data:
                raise IkeAuthError("empty AUTH data")
            n = data[0]
            if len(data) < 1 + n + 1:
                raise IkeAuthError("AUTH shorter than its AlgorithmIdentifier")
            oid, params = _parse_alg_id(data[1:1 + n])
            sig = data[1 + n:]
            alg = _SIG_ALGS.get(oid)
            if alg is None:
                raise IkeAuthError(f"unsupported RFC 7427 signature algorithm {oid}")
            kind, h, _ = alg
            if kind == "ecdsa":
                if not isinstance(key, ec.EllipticCurvePublicKey):
                    raise IkeAuthError("ECDSA AUTH but the certificate key is not EC")
                key.verify(sig, octets, ec.ECDSA(h()))
            elif kind == "rsa":
                if not isinstance(key, rsa.RSAPublicKey):
                    raise IkeAuthError("RSA AUTH but the certificate key is not RSA")
                key.verify(sig, octets, padding.PKCS1v15(), h())
            else:
                if not isinstance(key, ed25519.Ed25519PublicKey):
                    raise IkeAuthError("Ed25519 AUTH but the certificate key is not Ed25519")
                key.verify(sig, octets)
            return f"RFC7427 {kind}" + (f"-{h.name}" if h else "")
        if method in (AuthMethod.ECDSA_SHA256_P256, AuthMethod.ECDSA_SHA384_P384,
                      AuthMethod.ECDSA_SHA512_P521):
            h, size, bits = {AuthMethod.ECDSA_SHA256_P256: (hashes.SHA256, 32, 256),
                             AuthMethod.ECDSA_SHA384_P384: (hashes.SHA384, 48, 384),
                             AuthMethod.ECDSA_SHA512_P521: (hashes.SHA512, 66, 521)}[method]
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.key_size != bits:
                raise IkeAuthError(f"AUTH method {method} does not fit the certificate key")
            if len(data) != 2 * size:
                raise IkeAuthError("ECDSA AUTH of wrong length")
            sig = encode_dss_signature(int.from_bytes(data[:size], "big"), int.from_bytes(data[size:], "big"))
            key.verify(sig, octets, ec.ECDSA(h()))
            return f"ECDSA-{bits}"
        if method == AuthMethod.RSA_SIG:
            if not isinstance(key, rsa.RSAPublicKey):
                raise IkeAuthError("RSA AUTH but the certificate key is not RSA")
            key.verify(data, octets, padding.PKCS1v15(), hashes.SHA1())
            return "RSA-SHA1"
    except InvalidSignature:
        raise IkeAuthError("the gateway's AUTH signature does not verify") from None
    raise IkeAuthError(f"unsupported AUTH method {method}")
