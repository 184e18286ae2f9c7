"""Review of verify_chain's pathLenConstraint / keyUsage / extendedKeyUsage checks (auth.py):
RFC 5280 6.1.4 (l)/(m) counting (self-issued intermediates do not count) and certificates made by
strongSwan's ``pki`` the way the testbed makes them."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.ike.auth import verify_chain
from agent.ike.config import load_cert
from agent.ike.errors import IkeAuthError

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, key, issuer_name, issuer_key, ca=False, path_length=None):
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer_name))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before((NOW - DAY).replace(tzinfo=None)).not_valid_after((NOW + DAY).replace(tzinfo=None))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    return b.sign(issuer_key, hashes.SHA256())


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def test_self_issued_intermediate_does_not_count_against_path_length():
    """CA key rollover (RFC 4210 4.4): the anchor "CA" (old key, pathLenConstraint 0) signed a
    self-issued certificate for its new key; the gateway's certificate is signed with the new key.
    RFC 5280 6.1.4 (l): self-issued certificates are not counted, so the path is valid (OpenSSL
    agrees: it skips self-issued certificates when counting)."""
    old, new, gw = _key(), _key(), _key()
    anchor = _cert("CA", old, "CA", old, ca=True, path_length=0)
    new_with_old = _cert("CA", new, "CA", old, ca=True)
    ee = _cert("gw", gw, "CA", new)
    chain = verify_chain(ee, [new_with_old], [anchor], NOW)
    assert chain[-1] is anchor


def test_path_length_counts_non_self_issued_intermediates():
    root, im1, im2, gw = _key(), _key(), _key(), _key()
    anchor = _cert("root", root, "root", root, ca=True, path_length=1)
    a = _cert("im1", im1, "root", root, ca=True)
    b = _cert("im2", im2, "im1", im1, ca=True)
    with pytest.raises(IkeAuthError, match="pathLenConstraint"):
        verify_chain(_cert("gw", gw, "im2", im2), [a, b], [anchor], NOW)
    assert verify_chain(_cert("gw", gw, "im1", im1), [a], [anchor], NOW)[-1] is anchor
    # an intermediate's own constraint: im1 with pathLen 0 cannot have im2 below it
    a0 = _cert("im1", im1, "root", root, ca=True, path_length=0)
    anchor5 = _cert("root", root, "root", root, ca=True, path_length=5)
    with pytest.raises(IkeAuthError, match="pathLenConstraint"):
        verify_chain(_cert("gw", gw, "im2", im2), [a0, b], [anchor5], NOW)


def test_pki_made_chain_passes(tmp_path):
    """The testbed's Pki (strongSwan pki: CA with keyUsage, end entity with a non-critical EKU, no
    keyUsage) and an intermediate with pathlen 0 made the same way."""
    from agent.testbed.swan import Pki
    pki = Pki(tmp_path / "pki")
    pki.ca()
    pki.cert("gw", ["gw.vpn.example", "192.0.2.1"], "serverAuth")
    pki.cert("mn", ["mn@vpn.example"], "clientAuth")
    ca = load_cert(str(pki.path / "ca.crt"))
    now = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=1)   # pki: whole seconds
    for name in ("gw", "mn"):                 # no keyUsage, non-critical EKU: both usable
        assert verify_chain(load_cert(str(pki.path / f"{name}.crt")), [], [ca], now)[-1] == ca
    k = pki.key("im")
    (pki.path / "im.crt").write_bytes(pki._pki(
        "--issue", "--cacert", str(pki.path / "ca.crt"), "--cakey", str(pki.path / "ca.key"), "--type", "priv",
        "--in", str(k), "--dn", "C=XX, O=t, CN=im", "--ca", "--pathlen", "0", "--lifetime", "30", "--outform", "pem"))
    pki.cert("gw2", ["gw2.vpn.example"], "ikeIntermediate", ca="im")
    im = load_cert(str(pki.path / "im.crt"))
    chain = verify_chain(load_cert(str(pki.path / "gw2.crt")), [im], [ca], now)
    assert chain[1] == im and chain[-1] == ca
