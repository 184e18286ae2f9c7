"""agent.ike.crypto against independent computations (stdlib hmac/hashlib,
cryptography's raw primitives) and published facts (RFC 4231, RFC 3526,
the GCM specification's test case 4)."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.ike.const import EncrId, ExchangeType, IntegId, PayloadType, PrfId
from agent.ike.crypto import (
    MODP_2048_P, DhExchange, SkCipher, derive_child_keys, derive_ike_keys, nat_hash, prf, prf_plus,
    psk_auth, signed_octets,
)
from agent.ike.errors import IkeCryptoError, IkeDecodeError, IkeIntegrityError
from agent.ike.message import DeletePayload, IDiPayload, Message, NoncePayload, NotifyPayload, decode_message
from agent.ike.proposals import ENCR, INTEG, PRF, EspSuite, IkeSuite

SHA = {PrfId.HMAC_SHA2_256: hashlib.sha256, PrfId.HMAC_SHA2_384: hashlib.sha384,
       PrfId.HMAC_SHA2_512: hashlib.sha512}


def ref_prf_plus(h, key, seed, n):
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(key, t + seed + bytes([i]), h).digest()
        out += t
        i += 1
    return out[:n]


def test_prf_rfc4231_case2():
    assert prf(PRF[PrfId.HMAC_SHA2_256], b"Jefe", b"what do ya want for nothing?").hex() == \
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"


@pytest.mark.parametrize("pid", list(PRF))
def test_prf_plus_matches_reference(pid):
    key, seed = b"k" * 40, b"seed" * 10
    for n in (1, 31, 32, 64, 100, 257):
        assert prf_plus(PRF[pid], key, seed, n) == ref_prf_plus(SHA[pid], key, seed, n)
    # T1 = prf(K, S | 0x01)
    assert prf_plus(PRF[pid], key, seed, 8) == hmac.new(key, seed + b"\x01", SHA[pid]).digest()[:8]


def test_prf_plus_limit():
    with pytest.raises(IkeCryptoError):
        prf_plus(PRF[PrfId.HMAC_SHA2_256], b"k", b"s", 255 * 32 + 1)


def _suite(encr=(EncrId.AES_CBC, 128), integ=IntegId.HMAC_SHA2_256_128, prf_id=PrfId.HMAC_SHA2_256, dh=31):
    return IkeSuite(ENCR[encr], INTEG.get(integ) if integ else None, PRF[prf_id], dh)


@pytest.mark.parametrize("suite,lens", [
    (_suite(), (32, 32, 32, 16, 16, 32, 32)),
    (_suite((EncrId.AES_CBC, 256), IntegId.HMAC_SHA2_512_256, PrfId.HMAC_SHA2_384), (48, 64, 64, 32, 32, 48, 48)),
    (_suite((EncrId.AES_GCM_16, 128), None, PrfId.HMAC_SHA2_256), (32, 0, 0, 20, 20, 32, 32)),
    (_suite((EncrId.AES_GCM_16, 256), None, PrfId.HMAC_SHA2_512), (64, 0, 0, 36, 36, 64, 64)),
])
def test_ike_key_derivation_layout(suite, lens):
    ni, nr, g, si, sr = b"i" * 32, b"r" * 32, b"g" * 32, b"I" * 8, b"R" * 8
    k = derive_ike_keys(suite, ni, nr, g, si, sr)
    h = SHA[suite.prf.id]
    skeyseed = hmac.new(ni + nr, g, h).digest()
    km = ref_prf_plus(h, skeyseed, ni + nr + si + sr, sum(lens))
    parts = [k.sk_d, k.sk_ai, k.sk_ar, k.sk_ei, k.sk_er, k.sk_pi, k.sk_pr]
    assert [len(p) for p in parts] == list(lens)
    assert b"".join(parts) == km
    assert "sk_" not in repr(k) and k.sk_d.hex() not in repr(k)


def test_modp2048_prime_is_rfc3526_formula():
    # p = 2^2048 - 2^1984 - 1 + 2^64 * ( [2^1918 pi] + 124476 ), pi by Machin with integers
    guard = 64
    one = 1 << (1918 + guard)

    def arctan_inv(x):
        total, term, n, sign = 0, one // x, 1, 1
        x2 = x * x
        while term:
            total += sign * (term // n)
            term //= x2
            n += 2
            sign = -sign
        return total
    pi_scaled = (16 * arctan_inv(5) - 4 * arctan_inv(239)) >> guard     # floor(2^1918 pi), +-1
    candidates = {2 ** 2048 - 2 ** 1984 - 1 + 2 ** 64 * (pi_scaled + d + 124476) for d in (-1, 0, 1)}
    assert MODP_2048_P in candidates


@pytest.mark.parametrize("group,publen", [(31, 32), (19, 64), (14, 256)])
def test_dh_agreement(group, publen):
    a, b = DhExchange(group), DhExchange(group)
    assert len(a.public) == publen
    s1, s2 = a.shared_secret(b.public), b.shared_secret(a.public)
    assert s1 == s2 and len(s1) == {31: 32, 19: 32, 14: 256}[group]


@pytest.mark.parametrize("group,bad", [
    (31, bytes(31)), (31, bytes(32)),                # wrong length; all-zero (low order) point
    (19, bytes(63)), (19, b"\x01" * 64),             # wrong length; not on the curve
    (14, bytes(255)), (14, (1).to_bytes(256, "big")), (14, (MODP_2048_P - 1).to_bytes(256, "big")),
])
def test_dh_rejects_bad_peer_values(group, bad):
    with pytest.raises(IkeCryptoError):
        DhExchange(group).shared_secret(bad)


def test_dh_unsupported_group():
    with pytest.raises(IkeCryptoError):
        DhExchange(2)


# ------------------------------------------------------------------------- SK payload

SPI_I, SPI_R = b"\x11" * 8, b"\x22" * 8


def _pair(encr, integ):
    e = ENCR[encr]
    i = INTEG.get(integ) if integ else None
    ka, kb = bytes(range(e.keymat_len)), bytes(range(100, 100 + e.keymat_len))
    ia = bytes(range(i.key_len)) if i else b""
    ib = bytes(range(50, 50 + i.key_len)) if i else b""
    return SkCipher(e, i, ka, ia, kb, ib), SkCipher(e, i, kb, ib, ka, ia)


SUITES = [((EncrId.AES_CBC, 128), IntegId.HMAC_SHA2_256_128), ((EncrId.AES_CBC, 256), IntegId.HMAC_SHA2_384_192),
          ((EncrId.AES_CBC, 256), IntegId.HMAC_SHA2_512_256), ((EncrId.AES_GCM_16, 128), None),
          ((EncrId.AES_GCM_16, 256), None)]
INNER = [IDiPayload(3, b"mn@vpn.example"), NotifyPayload(16384), NoncePayload(b"z" * 33)]


@pytest.mark.parametrize("encr,integ", SUITES)
def test_sk_round_trip(encr, integ):
    a, b = _pair(encr, integ)
    msg = Message(SPI_I, SPI_R, ExchangeType.IKE_AUTH, 1, initiator=True)
    data = a.seal(msg, INNER)
    m = decode_message(data)
    assert m.sk.first_inner == PayloadType.IDi and len(m.payloads) == 1
    assert b.open(m) == INNER
    with pytest.raises(IkeIntegrityError):      # our own direction's keys do not open it
        a.open(m)


@pytest.mark.parametrize("encr,integ", SUITES)
def test_sk_any_flipped_bit_fails_integrity_before_parsing(encr, integ):
    a, b = _pair(encr, integ)
    data = a.seal(Message(SPI_I, SPI_R, ExchangeType.INFORMATIONAL, 5, initiator=True), [DeletePayload(1)])
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x80
        try:
            m = decode_message(bytes(bad))
        except IkeDecodeError:
            continue                   # header/SK framing broken: never reaches decryption
        with pytest.raises(IkeIntegrityError):
            b.open(m)


def test_sk_cbc_layout_independently():
    """RFC 7296 3.14: IV | AES-CBC(payloads | padding | pad length) | HMAC
    over the whole message up to the ICV, truncated."""
    a, _ = _pair((EncrId.AES_CBC, 128), IntegId.HMAC_SHA2_256_128)
    iv = bytes(range(16))
    data = a.seal(Message(SPI_I, SPI_R, ExchangeType.INFORMATIONAL, 9, initiator=True), [DeletePayload(1)], iv=iv)
    assert struct.unpack_from("!I", data, 24)[0] == len(data)
    assert data[16] == PayloadType.SK and data[28] == PayloadType.DELETE
    assert struct.unpack_from("!H", data, 30)[0] == len(data) - 28
    assert hmac.compare_digest(hmac.new(a.out_integ, data[:-16], hashlib.sha256).digest()[:16], data[-16:])
    assert data[32:48] == iv
    d = Cipher(algorithms.AES(a.out_key), modes.CBC(iv)).decryptor()
    plain = d.update(data[48:-16]) + d.finalize()
    assert len(plain) % 16 == 0
    padlen = plain[-1]
    assert plain[:-(padlen + 1)] == bytes([0, 0, 0, 8, 1, 0, 0, 0])     # Delete IKE payload


def test_sk_gcm_layout_independently_with_spec_key():
    """RFC 5282: nonce = salt (last 4 bytes of SK_e) | 8-byte explicit IV;
    AAD = IKE header + SK generic header; 16-byte ICV. Key and salt|IV are
    those of the GCM specification's test case 4; the primitive is checked
    against that test case first."""
    key = bytes.fromhex("feffe9928665731c6d6a8f9467308308")
    nonce = bytes.fromhex("cafebabefacedbaddecaf888")
    p = bytes.fromhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525"
                      "b16aedf5aa0de657ba637b39")
    aad = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    assert AESGCM(key).encrypt(nonce, p, aad).hex() == (
        "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac97"
        "3d58e091" "5bc94fbc3221a5db94fae95ae7121a47")
    e = ENCR[(EncrId.AES_GCM_16, 128)]
    c = SkCipher(e, None, key + nonce[:4], b"", key + nonce[:4], b"")
    data = c.seal(Message(SPI_I, SPI_R, ExchangeType.INFORMATIONAL, 3, initiator=True), [DeletePayload(1)],
                  iv=nonce[4:])
    assert data[32:40] == nonce[4:]
    plain = AESGCM(key).decrypt(nonce, data[40:], data[:32])
    assert plain == bytes([0, 0, 0, 8, 1, 0, 0, 0]) + b"\x00"          # payloads | pad length 0
    assert len(data) == 28 + 4 + 8 + len(plain) + 16


def test_sk_gcm_iv_never_repeats():
    a, _ = _pair((EncrId.AES_GCM_16, 128), None)
    ivs = {a.seal(Message(SPI_I, SPI_R, 37, i, initiator=True), [])[32:40] for i in range(50)}
    assert len(ivs) == 50


def test_scapy_sees_our_sk_payload():
    from scapy.contrib.ikev2 import IKEv2, IKEv2_Encrypted
    a, _ = _pair((EncrId.AES_CBC, 128), IntegId.HMAC_SHA2_256_128)
    data = a.seal(Message(SPI_I, SPI_R, ExchangeType.IKE_AUTH, 1, initiator=True), INNER)
    p = IKEv2(data)
    enc = p[IKEv2_Encrypted]
    assert enc.next_payload == PayloadType.IDi
    assert bytes(enc.load) == data[32:] and enc.length == len(data) - 28


def test_sk_truncated_payload_is_integrity_error():
    _, b = _pair((EncrId.AES_CBC, 128), IntegId.HMAC_SHA2_256_128)
    m = Message(SPI_I, SPI_R, 37, 1, [])
    from agent.ike.message import SKPayload
    m.payloads = [SKPayload(first_inner=0, body=b"\x00" * 20)]
    with pytest.raises(IkeIntegrityError):
        b.open(decode_message(m.encode()))


# ------------------------------------------------------------------------- AUTH, NAT-D, KEYMAT

def test_psk_auth_formula():
    p = PRF[PrfId.HMAC_SHA2_256]
    octets = signed_octets(p, b"MSG1", b"NONCE-R", b"skpi", b"\x03\x00\x00\x00mn@x")
    assert octets == b"MSG1" + b"NONCE-R" + hmac.new(b"skpi", b"\x03\x00\x00\x00mn@x", hashlib.sha256).digest()
    inner = hmac.new(b"secret", b"Key Pad for IKEv2", hashlib.sha256).digest()
    assert psk_auth(p, b"secret", octets) == hmac.new(inner, octets, hashlib.sha256).digest()


def test_nat_detection_hash():
    got = nat_hash(SPI_I, bytes(8), "192.0.2.50", 500)
    assert got == hashlib.sha1(SPI_I + bytes(8) + bytes([192, 0, 2, 50]) + b"\x01\xf4").digest()
    assert len(nat_hash(SPI_I, SPI_R, "2001:db8::1", 4500)) == 20


@pytest.mark.parametrize("encr,integ,lens", [
    ((EncrId.AES_GCM_16, 128), None, (20, 0)), ((EncrId.AES_GCM_16, 256), None, (36, 0)),
    ((EncrId.AES_CBC, 128), IntegId.HMAC_SHA2_256_128, (16, 32)),
    ((EncrId.AES_CBC, 256), IntegId.HMAC_SHA2_512_256, (32, 64)),
])
def test_child_keymat_order(encr, integ, lens):
    p = PRF[PrfId.HMAC_SHA2_256]
    suite = EspSuite(ENCR[encr], INTEG.get(integ) if integ else None, False, b"\x00\x00\x10\x00")
    k = derive_child_keys(p, b"D" * 32, suite, b"i" * 32, b"r" * 32)
    e, a = lens
    km = ref_prf_plus(hashlib.sha256, b"D" * 32, b"i" * 32 + b"r" * 32, 2 * (e + a))
    assert (k.encr_i2r, k.integ_i2r, k.encr_r2i, k.integ_r2i) == (km[:e], km[e:e + a], km[e + a:2 * e + a],
                                                                  km[2 * e + a:])
    assert repr(k) == "ChildKeys(...)"
