"""Security associations, authentication extensions, identification helpers."""

from __future__ import annotations

import hashlib
import hmac as hmac_mod

import pytest

from agent.mip import (
    AuthAlgorithm,
    AuthResult,
    MipConfigError,
    NaiExtension,
    RegFlag,
    RegistrationReply,
    RegistrationRequest,
    ReplayMode,
    SecurityAssociation,
    check,
    decode_message,
    sign,
    verify,
)
from agent.mip.auth import high32, low32, ntp_timestamp, ntp_to_unix, timestamp_acceptable
from tests.unit.test_mip_support import COA, HA, HOA, T0


def rrq(exts=()):
    return RegistrationRequest(RegFlag.D, 1800, HOA, HA, COA, 42, tuple(exts))


def test_hmac_md5_rfc2104_vector():
    sa = SecurityAssociation(256, b"\x0b" * 16)
    assert sa.compute(b"Hi There").hex() == "9294727a3638bb1c13f48ef8158bfc9d"
    sa2 = SecurityAssociation(256, b"Jefe")
    assert sa2.compute(b"what do ya want for nothing?").hex() == \
        "750c783e6ab0b503eaa86e310a5db738"


def test_keyed_md5_prefix_suffix():
    sa = SecurityAssociation(300, b"secret", algorithm="keyed-md5")
    assert sa.algorithm is AuthAlgorithm.KEYED_MD5
    assert sa.compute(b"data") == hashlib.md5(b"secret" + b"data" + b"secret").digest()


@pytest.mark.parametrize("spi", [0, 1, 255, -1, 1 << 32, "256"])
def test_reserved_or_bad_spi_refused(spi):
    with pytest.raises(MipConfigError):
        SecurityAssociation(spi, b"k")


def test_config_errors():
    SecurityAssociation(256, b"k")
    SecurityAssociation(0xFFFFFFFF, b"k")
    with pytest.raises(MipConfigError):
        SecurityAssociation(256, b"")
    with pytest.raises(MipConfigError):
        SecurityAssociation(256, "text key")
    with pytest.raises(MipConfigError):
        SecurityAssociation(256, b"k", algorithm="sha1")
    with pytest.raises(MipConfigError):
        SecurityAssociation(256, b"k", replay="counter")
    with pytest.raises(MipConfigError):
        SecurityAssociation(256, b"k", tolerance=-1)


def test_key_not_in_repr():
    sa = SecurityAssociation(256, b"TOPSECRETKEY")
    assert "TOPSECRET" not in repr(sa) and "256" in repr(sa)


@pytest.mark.parametrize("algorithm", list(AuthAlgorithm))
@pytest.mark.parametrize("ext_type", [32, 33, 34])
def test_sign_and_verify(algorithm, ext_type):
    sa = SecurityAssociation(4096, b"key material", algorithm=algorithm)
    msg = sign(rrq([NaiExtension("mn@x")]), sa, ext_type)
    ext = msg.extensions[-1]
    assert ext.type == ext_type and ext.spi == 4096 and len(ext.authenticator) == 16
    # the authenticator covers the message plus type, length and SPI
    head = rrq([NaiExtension("mn@x")]).encode() + bytes([ext_type, 20, 0, 0, 0x10, 0])
    assert ext.authenticator == sa.compute(head)
    data = msg.encode()
    assert verify(decode_message(data), sa, ext_type)
    assert check(decode_message(data), sa, ext_type) is AuthResult.OK


def test_every_authenticator_byte_matters():
    sa = SecurityAssociation(256, b"k" * 16)
    data = sign(rrq(), sa).encode()
    for i in range(16):
        bad = bytearray(data)
        bad[-16 + i] ^= 0x01
        assert check(decode_message(bytes(bad)), sa) is AuthResult.BAD_AUTHENTICATOR, i


def test_every_covered_byte_matters():
    sa = SecurityAssociation(256, b"k" * 16)
    data = sign(rrq([NaiExtension("mn@x")]), sa).encode()
    for i in range(len(data) - 16):
        if i == len(data) - 20 - 2 or i == len(data) - 21:
            continue  # type/length bytes of the MHAE: changing them breaks the structure
        bad = bytearray(data)
        bad[i] ^= 0x80
        try:
            msg = decode_message(bytes(bad))
        except Exception:
            continue
        assert not verify(msg, sa), i


def test_spi_missing_and_short_authenticator():
    sa = SecurityAssociation(256, b"k")
    other = SecurityAssociation(257, b"k")
    msg = decode_message(sign(rrq(), sa).encode())
    assert check(msg, other) is AuthResult.BAD_SPI
    assert check(rrq(), sa) is AuthResult.MISSING
    assert check(msg, sa, 34) is AuthResult.MISSING
    full = sign(rrq(), sa).encode()
    short = full[:-22] + bytes([32, 19]) + full[-20:-1]  # 15-byte authenticator
    assert check(decode_message(short), sa) is AuthResult.BAD_AUTHENTICATOR


def test_comparison_is_constant_time_over_all_16_bytes(monkeypatch):
    calls = []
    real = hmac_mod.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr("agent.mip.auth.hmac.compare_digest", spy)
    sa = SecurityAssociation(256, b"k")
    assert verify(decode_message(sign(rrq(), sa).encode()), sa)
    assert calls == [(16, 16)]


def test_reply_sign_verify_and_wrong_key():
    sa = SecurityAssociation(256, b"right")
    rep = sign(RegistrationReply(0, 600, HOA, HA, 7), sa)
    assert verify(decode_message(rep.encode()), sa)
    assert not verify(decode_message(rep.encode()), SecurityAssociation(256, b"wrong"))


def test_ntp_helpers():
    assert ntp_timestamp(0.0) == 2_208_988_800 << 32
    assert ntp_timestamp(0.5) == (2_208_988_800 << 32) | (1 << 31)
    assert abs(ntp_to_unix(ntp_timestamp(T0 + 0.25)) - (T0 + 0.25)) < 1e-6
    ident = 0x1122334455667788
    assert high32(ident) == 0x11223344 and low32(ident) == 0x55667788


def test_timestamp_acceptance():
    ts = ntp_timestamp(T0)
    assert timestamp_acceptable(ts, T0, 7.0, None)
    assert timestamp_acceptable(ts, T0 + 7.0, 7.0, None)
    assert not timestamp_acceptable(ts, T0 + 7.01, 7.0, None)
    assert not timestamp_acceptable(ts, T0 - 7.01, 7.0, None)
    assert not timestamp_acceptable(ts, T0, 7.0, ts)  # replay
    assert timestamp_acceptable(ts + 1, T0, 7.0, ts)


def test_defaults():
    sa = SecurityAssociation(256, b"k")
    assert sa.algorithm is AuthAlgorithm.HMAC_MD5
    assert sa.replay is ReplayMode.TIMESTAMP
    assert sa.tolerance == 7.0
