"""agent.ike.auth and proposals: identities, certificate chains, RFC 7427
signatures, key file modes, proposal parsing and checking the responder's
choice."""

from __future__ import annotations

import datetime
import ipaddress
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from agent.ike.auth import (
    Identity, _alg_id, certreq_hash, identity_in_cert, parse_dn, sign_auth, verify_auth, verify_chain,
)
from agent.ike.config import CaTrust, CertAuth, IkeConfig, PskAuth
from agent.ike.const import AuthMethod, DhGroup, EncrId, IdType, IntegId, PrfId, TransformType
from agent.ike.errors import IkeAuthError, IkeConfigError, IkeProposalError
from agent.ike.keylog import append_tshark_keys, tshark_ikev2_line
from agent.ike.message import Attribute, Proposal, SAPayload, Transform
from agent.ike.proposals import EspProposal, IkeProposal, select_esp, select_ike

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "XX"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(cn, key, issuer_cert=None, issuer_key=None, ca=False, san=(), before=NOW - DAY, after=NOW + 30 * DAY,
              path_length=None, key_usage=None, eku=None, eku_critical=False):
    b = (x509.CertificateBuilder().subject_name(_name(cn))
         .issuer_name(issuer_cert.subject if issuer_cert else _name(cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(before.replace(tzinfo=None)).not_valid_after(after.replace(tzinfo=None))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True))
    if key_usage is not None:
        flags = dict(digital_signature=False, content_commitment=False, key_encipherment=False,
                     data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                     encipher_only=False, decipher_only=False)
        flags.update({k: True for k in key_usage})
        b = b.add_extension(x509.KeyUsage(**flags), critical=True)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([x509.ObjectIdentifier(o) for o in eku]), critical=eku_critical)
    if san:
        names = []
        for s in san:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                names.append(x509.RFC822Name(s) if "@" in s else x509.DNSName(s))
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki():
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = make_cert("CA", ca_key, ca=True)
    im_key = ec.generate_private_key(ec.SECP256R1())
    im = make_cert("Intermediate", im_key, ca, ca_key, ca=True)
    gw_key = ec.generate_private_key(ec.SECP256R1())
    gw = make_cert("gw.vpn.example", gw_key, ca, ca_key, san=["gw.vpn.example", "192.0.2.1", "ops@vpn.example"])
    gw2_key = ec.generate_private_key(ec.SECP384R1())
    gw2 = make_cert("gw2.vpn.example", gw2_key, im, im_key, san=["gw2.vpn.example"])
    rsa_key = rsa.generate_private_key(65537, 2048)
    rsa_ca = make_cert("RSA CA", rsa_key, ca=True)
    rsa_gw_key = rsa.generate_private_key(65537, 2048)
    rsa_gw = make_cert("rsa-gw", rsa_gw_key, rsa_ca, rsa_key, san=["gw.vpn.example"])
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = make_cert("CA", other_key, ca=True)           # same name, other key
    return dict(ca=ca, ca_key=ca_key, im=im, im_key=im_key, gw=gw, gw_key=gw_key, gw2=gw2, gw2_key=gw2_key,
                rsa_ca=rsa_ca, rsa_gw=rsa_gw, rsa_gw_key=rsa_gw_key, other_ca=other_ca)


# ------------------------------------------------------------------------- identities

@pytest.mark.parametrize("text,id_type,data", [
    ("gw.vpn.example", IdType.FQDN, b"gw.vpn.example"),
    ("@gw.vpn.example", IdType.FQDN, b"gw.vpn.example"),
    ("mn-psk@vpn.example", IdType.RFC822_ADDR, b"mn-psk@vpn.example"),
    ("192.0.2.1", IdType.IPV4_ADDR, bytes([192, 0, 2, 1])),
    ("2001:db8::1", IdType.IPV6_ADDR, ipaddress.ip_address("2001:db8::1").packed),
])
def test_identity_parse(text, id_type, data):
    i = Identity.parse(text)
    assert (i.id_type, i.data) == (id_type, data)
    assert i.body() == bytes([id_type, 0, 0, 0]) + data
    assert str(i) == text.lstrip("@")


def test_identity_dn():
    i = Identity.parse("C=XX, O=test, CN=gw.vpn.example")
    assert i.id_type == IdType.DER_ASN1_DN and i.data == _name("gw.vpn.example").public_bytes()
    assert str(i) == "C=XX, O=test, CN=gw.vpn.example"
    with pytest.raises(IkeConfigError):
        parse_dn("XX=1, CN=a")


def test_identity_in_cert(pki):
    gw = pki["gw"]
    for t in ("gw.vpn.example", "GW.VPN.EXAMPLE", "192.0.2.1", "ops@vpn.example", "C=XX, O=test, CN=gw.vpn.example"):
        assert identity_in_cert(Identity.parse(t), gw), t
    for t in ("other.vpn.example", "192.0.2.2", "x@vpn.example", "C=XX, O=test, CN=other"):
        assert not identity_in_cert(Identity.parse(t), gw), t
    # the CN alone does not vouch for an FQDN (only subjectAltName does)
    assert not identity_in_cert(Identity.fqdn("CA"), pki["ca"])


# ------------------------------------------------------------------------- chains

def test_chain_direct_and_via_intermediate(pki):
    assert verify_chain(pki["gw"], [], [pki["ca"]], NOW)[-1] is pki["ca"]
    chain = verify_chain(pki["gw2"], [pki["im"]], [pki["ca"]], NOW)
    assert [c.subject for c in chain] == [pki["gw2"].subject, pki["im"].subject, pki["ca"].subject]


@pytest.mark.parametrize("case,words", [
    ("untrusted", "not issued by a trusted CA"),
    ("same_name_other_key", "not issued by a trusted CA"),
    ("expired", "expired"),
    ("not_yet", "not valid before"),
    ("missing_intermediate", "not issued by a trusted CA"),
    ("intermediate_not_ca", "is not a CA"),
    ("no_ca", "no trusted CA"),
])
def test_chain_failures(pki, case, words):
    gw, ca = pki["gw"], pki["ca"]
    if case == "untrusted":
        args = (gw, [], [pki["rsa_ca"]], NOW)
    elif case == "same_name_other_key":
        args = (gw, [], [pki["other_ca"]], NOW)
    elif case == "expired":
        args = (gw, [], [ca], NOW + 60 * DAY)
    elif case == "not_yet":
        args = (gw, [], [ca], NOW - 5 * DAY)
    elif case == "missing_intermediate":
        args = (pki["gw2"], [], [ca], NOW)
    elif case == "intermediate_not_ca":
        k = ec.generate_private_key(ec.SECP256R1())
        fake_im = make_cert("Intermediate", k, ca, pki["ca_key"], ca=False)
        leaf = make_cert("leaf", ec.generate_private_key(ec.SECP256R1()), fake_im, k, san=["leaf"])
        args = (leaf, [fake_im], [ca], NOW)
    else:
        args = (gw, [], [], NOW)
    with pytest.raises(IkeAuthError, match=words):
        verify_chain(*args)


SERVER_AUTH, CLIENT_AUTH, IPSEC_IKE = "1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2", "1.3.6.1.5.5.7.3.17"


def test_chain_path_length_and_key_usage():
    """pathLenConstraint and keyUsage of issuers, keyUsage/critical EKU of the gateway's certificate."""
    ck = ec.generate_private_key(ec.SECP256R1())
    ca0 = make_cert("CA0", ck, ca=True, path_length=0, key_usage=["key_cert_sign", "crl_sign"])
    ik = ec.generate_private_key(ec.SECP256R1())
    im = make_cert("IM", ik, ca0, ck, ca=True)
    lk = ec.generate_private_key(ec.SECP256R1())
    direct = make_cert("gw", lk, ca0, ck, san=["gw"], key_usage=["digital_signature"])
    assert verify_chain(direct, [], [ca0], NOW)[-1] is ca0                 # no intermediate: allowed
    via_im = make_cert("gw", lk, im, ik, san=["gw"])
    with pytest.raises(IkeAuthError, match="pathLenConstraint"):
        verify_chain(via_im, [im], [ca0], NOW)
    ca1 = make_cert("CA1", ck, ca=True, path_length=1)
    im1 = make_cert("IM1", ik, ca1, ck, ca=True, key_usage=["digital_signature"])      # no keyCertSign
    with pytest.raises(IkeAuthError, match="keyCertSign"):
        verify_chain(make_cert("gw", lk, im1, ik, san=["gw"]), [im1], [ca1], NOW)
    with pytest.raises(IkeAuthError, match="digitalSignature"):
        verify_chain(make_cert("gw", lk, ca1, ck, san=["gw"], key_usage=["key_encipherment"]), [], [ca1], NOW)
    with pytest.raises(IkeAuthError, match="extendedKeyUsage"):
        verify_chain(make_cert("gw", lk, ca1, ck, san=["gw"], eku=[CLIENT_AUTH], eku_critical=True), [], [ca1], NOW)
    for eku, critical in (([CLIENT_AUTH], False), ([SERVER_AUTH], True), ([IPSEC_IKE], True)):
        verify_chain(make_cert("gw", lk, ca1, ck, san=["gw"], eku=eku, eku_critical=critical), [], [ca1], NOW)


def test_certreq_hash_is_sha1_of_spki(pki):
    import hashlib
    spki = pki["ca"].public_key().public_bytes(Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert certreq_hash(pki["ca"]) == hashlib.sha1(spki).digest()


# ------------------------------------------------------------------------- RFC 7427

def _sig_alg_of(cert) -> bytes:
    """The signatureAlgorithm AlgorithmIdentifier DER of a certificate."""
    der = cert.public_bytes(Encoding.DER)

    def tlv(off):
        ln = der[off + 1]
        hdr = 2
        if ln & 0x80:
            n = ln & 0x7F
            ln = int.from_bytes(der[off + 2:off + 2 + n], "big")
            hdr += n
        return off + hdr, ln
    body, _ = tlv(0)                    # Certificate SEQUENCE
    tbs_body, tbs_len = tlv(body)       # tbsCertificate
    alg = tbs_body + tbs_len
    a_body, a_len = tlv(alg)
    return der[alg:a_body + a_len]


def test_algorithm_identifiers_match_certificates(pki):
    assert _alg_id("1.2.840.10045.4.3.2", False) == _sig_alg_of(pki["gw"])
    assert _alg_id("1.2.840.113549.1.1.11", True) == _sig_alg_of(pki["rsa_gw"])
    assert _alg_id("1.2.840.10045.4.3.2", False).hex() == "300a06082a8648ce3d040302"


@pytest.mark.parametrize("which,peer_hashes,method,desc", [
    ("gw_key", {2, 3, 4}, AuthMethod.DIGITAL_SIGNATURE, "RFC7427 ecdsa-sha256"),
    ("gw_key", set(), AuthMethod.ECDSA_SHA256_P256, "ECDSA-256"),
    ("gw2_key", {2, 3, 4}, AuthMethod.DIGITAL_SIGNATURE, "RFC7427 ecdsa-sha384"),
    ("gw2_key", set(), AuthMethod.ECDSA_SHA384_P384, "ECDSA-384"),
    ("rsa_gw_key", {2}, AuthMethod.DIGITAL_SIGNATURE, "RFC7427 rsa-sha256"),
    ("rsa_gw_key", set(), AuthMethod.RSA_SIG, "RSA-SHA1"),
])
def test_sign_and_verify(pki, which, peer_hashes, method, desc):
    key = pki[which]
    octets = b"RealMessage2|NonceI|MACedID" * 3
    m, data = sign_auth(key, octets, peer_hashes)
    assert m == method
    assert verify_auth(key.public_key(), m, data, octets) == desc
    with pytest.raises(IkeAuthError):
        verify_auth(key.public_key(), m, data, octets + b"x")
    wrong = pki["gw_key"] if which != "gw_key" else pki["gw2_key"]
    with pytest.raises(IkeAuthError):
        verify_auth(wrong.public_key(), m, data, octets)


@pytest.mark.parametrize("data", [b"", b"\x05", b"\x0c" + bytes(12) + b"s", b"\x0a\x30\x08\x06\x06\x2a\x03\x04\x05\x06\x07sig"])
def test_verify_rejects_malformed_7427(pki, data):
    with pytest.raises(IkeAuthError):
        verify_auth(pki["gw_key"].public_key(), AuthMethod.DIGITAL_SIGNATURE, data, b"octets")


def test_verify_unknown_method(pki):
    with pytest.raises(IkeAuthError, match="unsupported AUTH method"):
        verify_auth(pki["gw_key"].public_key(), 99, b"x", b"o")


# ------------------------------------------------------------------------- config, key files

def test_cert_auth_key_file_mode(tmp_path, pki):
    cert = tmp_path / "mn.crt"
    cert.write_bytes(pki["gw"].public_bytes(Encoding.PEM))
    key = tmp_path / "mn.key"
    key.write_bytes(pki["gw_key"].private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    os.chmod(key, 0o644)
    with pytest.raises(IkeConfigError, match="0600"):
        CertAuth.load(str(cert), str(key))
    os.chmod(key, 0o600)
    ca = CertAuth.load(str(cert), str(key))
    assert ca.cert == pki["gw"] and "PrivateKey" not in repr(ca)


def test_config_validation():
    base = dict(local_id="a@b.example", remote_id="gw.example", local_auth=PskAuth("k"), remote_auth=PskAuth("k"),
                remote_ts=["10.0.0.0/8"])
    c = IkeConfig(**base)
    assert c.require_tia and c.local_ts[0].networks()[0] == ipaddress.ip_network("0.0.0.0/0")
    assert "topsecret" not in repr(PskAuth("topsecret"))
    with pytest.raises(IkeConfigError):
        IkeConfig(**dict(base, remote_ts=[]))
    with pytest.raises(IkeConfigError):
        IkeConfig(**dict(base, remote_auth=CaTrust(())))
    with pytest.raises(IkeConfigError):
        PskAuth("")
    with pytest.raises(IkeProposalError):
        IkeConfig(**dict(base, ike_proposals=["3des-sha1-modp1024"]))


def test_tshark_line_and_file_mode(tmp_path):
    from agent.ike.crypto import derive_ike_keys
    from agent.ike.proposals import ENCR, INTEG, PRF, IkeSuite
    cbc = IkeSuite(ENCR[(EncrId.AES_CBC, 256)], INTEG[IntegId.HMAC_SHA2_256_128], PRF[PrfId.HMAC_SHA2_256], 31)
    k = derive_ike_keys(cbc, b"i" * 32, b"r" * 32, b"g" * 32, b"\x01" * 8, b"\x02" * 8)
    line = tshark_ikev2_line(k)
    f = line.split(",")
    assert f[0] == "01" * 8 and f[1] == "02" * 8 and f[2] == k.sk_ei.hex() and f[3] == k.sk_er.hex()
    assert f[4] == '"AES-CBC-256 [RFC3602]"' and f[5] == k.sk_ai.hex() and f[6] == k.sk_ar.hex()
    assert f[7] == '"HMAC_SHA2_256_128 [RFC4868]"'
    gcm = IkeSuite(ENCR[(EncrId.AES_GCM_16, 128)], None, PRF[PrfId.HMAC_SHA2_256], 31)
    k2 = derive_ike_keys(gcm, b"i" * 32, b"r" * 32, b"g" * 32, b"\x01" * 8, b"\x02" * 8)
    f = tshark_ikev2_line(k2).split(",")
    assert len(f[2]) == 40 and f[4] == '"AES-GCM-128 with 16 octet ICV [RFC5282]"'
    assert f[5] == f[6] == "" and f[7] == '"NONE [RFC4306]"'
    path = tmp_path / "ikev2_decryption_table"
    append_tshark_keys(str(path), k)
    append_tshark_keys(str(path), k2)
    assert (os.stat(path).st_mode & 0o777) == 0o600 and len(path.read_text().splitlines()) == 2
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError):
        append_tshark_keys(str(path), k)


# ------------------------------------------------------------------------- proposals

def test_parse_ike_proposals():
    p = IkeProposal.parse("aes128-aes256-sha256-sha384-x25519-ecp256-modp2048")
    assert p.encr == ((EncrId.AES_CBC, 128), (EncrId.AES_CBC, 256))
    assert p.integ == (IntegId.HMAC_SHA2_256_128, IntegId.HMAC_SHA2_384_192)
    assert p.prf == (PrfId.HMAC_SHA2_256, PrfId.HMAC_SHA2_384)
    assert p.dh == (DhGroup.CURVE_25519, DhGroup.ECP_256, DhGroup.MODP_2048)
    g = IkeProposal.parse("aes256gcm16-prfsha384-ecp256")
    assert g.integ == () and g.prf == (PrfId.HMAC_SHA2_384,)
    assert IkeProposal.parse("aes128gcm16-sha256-x25519").prf == (PrfId.HMAC_SHA2_256,)
    w = p.to_wire(1)
    assert [t.type for t in w.transforms].count(TransformType.DH) == 3
    assert w.transforms[0].key_length == 128


@pytest.mark.parametrize("bad", ["aes128-sha256", "3des-sha1-modp1024", "aes128-x25519", "aes128gcm16-aes128-sha256-x25519",
                                 "aes128gcm16-sha256-prfsha256-x25519", ""])
def test_parse_ike_proposal_errors(bad):
    with pytest.raises(IkeProposalError):
        IkeProposal.parse(bad)


def test_parse_esp_proposals():
    e = EspProposal.parse("aes128gcm16")
    assert e.encr == ((EncrId.AES_GCM_16, 128),) and e.integ == () and e.esn == (0,)
    e = EspProposal.parse("aes256-sha512-esn-noesn")
    assert e.integ == (IntegId.HMAC_SHA2_512_256,) and e.esn == (1, 0)
    for bad in ("aes128", "aes128gcm16-sha256", "chacha20poly1305"):
        with pytest.raises(IkeProposalError):
            EspProposal.parse(bad)


def _t(tt, tid, kl=None):
    return Transform(tt, tid, [Attribute(14, kl)] if kl else [])


OFFER = [IkeProposal.parse("aes128-aes256-sha256-x25519-ecp256").to_wire(1),
         IkeProposal.parse("aes128gcm16-prfsha256-x25519").to_wire(2)]


def test_select_ike_valid():
    s = select_ike(SAPayload([Proposal(1, 1, b"", [_t(1, 12, 256), _t(2, 5), _t(3, 12), _t(4, 19)])]), OFFER)
    assert s.name == "AES_CBC-256/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/ECP_256"
    s = select_ike(SAPayload([Proposal(2, 1, b"", [_t(1, 20, 128), _t(2, 5), _t(4, 31)])]), OFFER)
    assert s.name == "AES_GCM_16-128/PRF_HMAC_SHA2_256/CURVE_25519" and s.integ is None


@pytest.mark.parametrize("sa,words", [
    (SAPayload([Proposal(1, 1, b"", [_t(1, 12, 192), _t(2, 5), _t(3, 12), _t(4, 31)])]), "not in our proposal"),
    (SAPayload([Proposal(1, 1, b"", [_t(1, 12, 128), _t(2, 5), _t(3, 12), _t(4, 14)])]), "not in our proposal"),
    (SAPayload([Proposal(3, 1, b"", [_t(1, 12, 128), _t(2, 5), _t(3, 12), _t(4, 31)])]), "number 3"),
    (SAPayload([Proposal(1, 1, b"", [_t(1, 12, 128), _t(1, 12, 256), _t(2, 5), _t(3, 12), _t(4, 31)])]), "two"),
    (SAPayload([Proposal(1, 1, b"", [_t(1, 12, 128), _t(2, 5), _t(4, 31)])]), "integrity"),
    (SAPayload([Proposal(1, 1, b"", [_t(1, 12, 128), _t(3, 12), _t(4, 31)])]), "lacks"),
    (SAPayload([Proposal(1, 1, b"", [_t(1, 12, 128), _t(2, 5), _t(3, 12), _t(4, 31)]),
                Proposal(2, 1, b"", [_t(1, 20, 128), _t(2, 5), _t(4, 31)])]), "2 proposals"),
    (SAPayload([Proposal(1, 3, b"", [_t(1, 12, 128), _t(2, 5), _t(3, 12), _t(4, 31)])]), "protocol"),
    (SAPayload([Proposal(1, 1, b"\x01" * 8, [_t(1, 12, 128), _t(2, 5), _t(3, 12), _t(4, 31)])]), "SPI"),
])
def test_select_ike_rejects(sa, words):
    with pytest.raises(IkeProposalError, match=words):
        select_ike(sa, OFFER)


def test_select_esp():
    spi = b"\x00\x00\x20\x00"
    offer = [EspProposal.parse("aes128gcm16-aes256gcm16").to_wire(1, spi),
             EspProposal.parse("aes128-sha256-sha384").to_wire(2, spi)]
    s = select_esp(SAPayload([Proposal(1, 3, b"\xc0\x00\x00\x01", [_t(1, 20, 256), _t(5, 0)])]), offer)
    assert s.name == "AES_GCM_16-256" and s.spi == b"\xc0\x00\x00\x01" and not s.esn
    s = select_esp(SAPayload([Proposal(2, 3, b"\xc0\x00\x00\x02", [_t(1, 12, 128), _t(3, 13), _t(5, 0)])]), offer)
    assert s.name == "AES_CBC-128/HMAC_SHA2_384_192"
    with pytest.raises(IkeProposalError, match="SPI"):
        select_esp(SAPayload([Proposal(1, 3, b"", [_t(1, 20, 256), _t(5, 0)])]), offer)
    with pytest.raises(IkeProposalError):
        select_esp(SAPayload([Proposal(2, 3, b"\x01\x02\x03\x04", [_t(1, 12, 128), _t(5, 0)])]), offer)
    with pytest.raises(IkeProposalError):    # ESN=1 not offered
        select_esp(SAPayload([Proposal(1, 3, b"\x01\x02\x03\x04", [_t(1, 20, 128), _t(5, 1)])]), offer)
