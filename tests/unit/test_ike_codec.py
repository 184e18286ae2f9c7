"""agent.ike.message: every payload both ways, typed decode errors, scapy as
an independent parser (and builder) of the same wire format."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ike.const import (
    CfgAttr, CfgType, ExchangeType, IdType, NotifyType, PayloadType, ProtocolId, TransformType,
)
from agent.ike.errors import IkeDecodeError
from agent.ike.message import (
    Attribute, AuthPayload, CertPayload, CertReqPayload, CPAttribute, CPPayload, DeletePayload,
    IDiPayload, IDrPayload, KEPayload, Message, NoncePayload, NotifyPayload, Proposal, SAPayload,
    SKPayload, TrafficSelector, Transform, TSiPayload, TSrPayload, UnknownPayload, VendorIDPayload,
    decode_header, decode_message, decode_payloads, encode_payloads,
)

SPI_I = bytes.fromhex("0102030405060708")
SPI_R = bytes.fromhex("a1a2a3a4a5a6a7a8")


def sample_sa() -> SAPayload:
    return SAPayload([
        Proposal(1, ProtocolId.IKE, b"", [
            Transform(TransformType.ENCR, 12, [Attribute(14, 128)]),
            Transform(TransformType.ENCR, 12, [Attribute(14, 256)]),
            Transform(TransformType.PRF, 5),
            Transform(TransformType.INTEG, 12),
            Transform(TransformType.DH, 31),
            Transform(TransformType.DH, 19, [Attribute(7, b"tlv-value")]),   # a TLV attribute
        ]),
        Proposal(2, ProtocolId.ESP, b"\x11\x22\x33\x44", [
            Transform(TransformType.ENCR, 20, [Attribute(14, 256)]),
            Transform(TransformType.ESN, 0),
        ]),
    ])


ALL_PAYLOADS = [
    sample_sa(),
    KEPayload(31, bytes(range(32))),
    IDiPayload(IdType.RFC822_ADDR, b"mn@vpn.example"),
    IDrPayload(IdType.FQDN, b"gw.vpn.example"),
    CertPayload(4, b"\x30\x82" + bytes(50)),
    CertReqPayload(4, bytes(40)),
    AuthPayload(2, bytes(32)),
    NoncePayload(bytes(range(32))),
    NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, bytes(20)),
    NotifyPayload(NotifyType.REKEY_SA, b"", ProtocolId.ESP, b"\xde\xad\xbe\xef"),
    DeletePayload(ProtocolId.IKE),
    DeletePayload(ProtocolId.ESP, [b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"]),
    VendorIDPayload(b"mipmobike"),
    TSiPayload([TrafficSelector.from_network("0.0.0.0/0")]),
    TSrPayload([TrafficSelector.from_network("10.10.0.0/24"),
                TrafficSelector(ipaddress.ip_address("10.1.0.1"), ipaddress.ip_address("10.1.0.9"), 17, 500, 4500),
                TrafficSelector.from_network("2001:db8::/64")]),
    CPPayload(CfgType.REQUEST, [CPAttribute(CfgAttr.INTERNAL_IP4_ADDRESS), CPAttribute(CfgAttr.INTERNAL_IP4_DNS)]),
    CPPayload(CfgType.REPLY, [CPAttribute(CfgAttr.INTERNAL_IP4_ADDRESS, bytes([10, 10, 100, 7])),
                              CPAttribute(CfgAttr.INTERNAL_IP4_DNS, bytes([10, 10, 0, 53]))]),
]


@pytest.mark.parametrize("payload", ALL_PAYLOADS, ids=lambda p: type(p).__name__)
def test_payload_round_trip(payload):
    first, data = encode_payloads([payload])
    assert first == payload.type
    got, sk = decode_payloads(first, data)
    assert sk is None and got == [payload]


def test_message_round_trip_with_all_payloads():
    msg = Message(SPI_I, SPI_R, ExchangeType.IKE_AUTH, 7, list(ALL_PAYLOADS), initiator=True, response=True)
    data = msg.encode()
    assert struct.unpack_from("!I", data, 24)[0] == len(data)
    assert data[17] == 0x20 and data[18] == 35 and data[19] == 0x28     # version, exchange, flags I|R
    back = decode_message(data)
    assert back == msg
    assert back.raw == data and back.sk_offset is None
    assert back.initiator and back.response and back.message_id == 7


def test_transform_key_length_and_last_flags():
    data = sample_sa().encode_body()
    # first proposal: "more" (2); last proposal: 0; transform "more" is 3, last 0
    assert data[0] == 2
    p1_len = struct.unpack_from("!H", data, 2)[0]
    assert data[p1_len] == 0
    assert data[8] == 3                                  # first transform of proposal 1
    sa = SAPayload.decode_body(data)
    assert [t.key_length for t in sa.proposals[0].transforms][:2] == [128, 256]
    assert sa.proposals[1].spi == b"\x11\x22\x33\x44"


def test_sk_payload_is_last_and_kept_opaque():
    msg = Message(SPI_I, SPI_R, ExchangeType.INFORMATIONAL, 2,
                  [SKPayload(first_inner=PayloadType.DELETE, body=b"\x00" * 48)])
    data = msg.encode()
    back = decode_message(data)
    assert back.sk is not None and back.sk.first_inner == PayloadType.DELETE
    assert back.sk_offset == 28 and back.sk.body == b"\x00" * 48
    with pytest.raises(ValueError):
        encode_payloads([SKPayload(first_inner=0, body=b""), NoncePayload(bytes(16))])


def test_unknown_non_critical_payload_is_skipped_kept_opaque():
    chain = [NoncePayload(bytes(16)), UnknownPayload(payload_type=200, data=b"whatever"), VendorIDPayload(b"v")]
    first, data = encode_payloads(chain)
    got, _ = decode_payloads(first, data)
    assert [p.type for p in got] == [PayloadType.NONCE, 200, PayloadType.VENDOR_ID]
    assert isinstance(got[1], UnknownPayload) and not got[1].critical


def test_unknown_critical_payload_raises_unsupported_critical():
    chain = [NoncePayload(bytes(16)), UnknownPayload(payload_type=201, data=b"x", critical=True)]
    first, data = encode_payloads(chain)
    with pytest.raises(IkeDecodeError) as e:
        decode_payloads(first, data)
    assert e.value.notify == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD and e.value.notify_data == bytes([201])


def test_known_payload_with_critical_bit_is_accepted():
    first, data = encode_payloads([NoncePayload(bytes(16), critical=True)])
    got, _ = decode_payloads(first, data)
    assert got[0].critical


def _valid() -> bytes:
    return Message(SPI_I, SPI_R, ExchangeType.IKE_SA_INIT, 0, [sample_sa(), NoncePayload(bytes(32))]).encode()


@pytest.mark.parametrize("mutate,words", [
    (lambda d: d[:20], "shorter than an IKE header"),
    (lambda d: d[:17] + b"\x10" + d[18:], "version"),                        # IKEv1 major version
    (lambda d: d + b"\x00", "header length"),                                 # trailing byte
    (lambda d: d[:24] + struct.pack("!I", len(d) + 4) + d[28:], "header length"),
    (lambda d: d[:30] + struct.pack("!H", 3) + d[32:], "bad length"),          # payload length < 4
    (lambda d: d[:30] + struct.pack("!H", 5000) + d[32:], "bad length"),
    (lambda d: d[:28 + 4] + b"\x07" + d[33:], "last/more"),                     # proposal last/more
])
def test_malformed_messages_raise_typed_error(mutate, words):
    with pytest.raises(IkeDecodeError) as e:
        decode_message(mutate(_valid()))
    assert words in str(e.value)
    if words == "version":
        assert e.value.notify == NotifyType.INVALID_MAJOR_VERSION


@pytest.mark.parametrize("cls,body", [
    (KEPayload, b"\x00\x1f"), (IDiPayload, b"\x02"), (AuthPayload, b""), (NoncePayload, bytes(8)),
    (NotifyPayload, b"\x03\x04\x40\x00\x00"), (DeletePayload, b"\x03\x04\x00\x02\x00\x00\x00\x01"),
    (DeletePayload, b"\x01\x08\x00\x01" + bytes(8)), (TSiPayload, b"\x01\x00\x00\x00\x07\x00\x00\x10"),
    (TSiPayload, b"\x01\x00\x00\x00\x09\x00\x00\x10\x00\x00\xff\xff" + bytes(8)),
    (CPPayload, b"\x01\x00\x00\x00\x00\x01\x00\x08\x01"), (SAPayload, b""), (CertPayload, b""),
])
def test_truncated_or_inconsistent_payload_bodies(cls, body):
    with pytest.raises(IkeDecodeError):
        cls.decode_body(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_only_typed_errors(data):
    try:
        decode_message(data)
    except IkeDecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_fuzz_single_byte_mutations_only_typed_errors(pos, val):
    d = bytearray(Message(SPI_I, SPI_R, ExchangeType.IKE_AUTH, 1, list(ALL_PAYLOADS)).encode())
    d[pos % len(d)] = val
    try:
        decode_message(bytes(d))
    except IkeDecodeError:
        pass


def test_decode_header_fields():
    d = Message(SPI_I, SPI_R, ExchangeType.INFORMATIONAL, 0x01020304, [], initiator=False, response=True).encode()
    h = decode_header(d)
    assert (h.spi_i, h.spi_r, h.exchange, h.message_id, h.length) == (SPI_I, SPI_R, 37, 0x01020304, 28)
    assert h.response and not h.initiator and h.next_payload == 0


def test_traffic_selector_helpers():
    wide = TrafficSelector.from_network("10.10.0.0/16")
    narrow = TrafficSelector.from_network("10.10.3.0/24")
    host = TrafficSelector.from_network("10.10.3.7/32", ip_proto=6, ports=(443, 443))
    assert narrow.is_subset_of(wide) and host.is_subset_of(wide) and not wide.is_subset_of(narrow)
    assert not TrafficSelector.from_network("2001:db8::/64").is_subset_of(wide)
    assert [str(n) for n in wide.networks()] == ["10.10.0.0/16"]
    assert str(host) == "10.10.3.7/32[6/443-443]"


# ----------------------------------------------------------------------------- scapy

def test_scapy_parses_our_ike_sa_init():
    from scapy.contrib.ikev2 import IKEv2, IKEv2_KE, IKEv2_Nonce, IKEv2_Notify, IKEv2_SA
    ke = KEPayload(19, bytes(range(64)))
    msg = Message(SPI_I, bytes(8), ExchangeType.IKE_SA_INIT, 0,
                  [sample_sa(), ke, NoncePayload(b"N" * 32),
                   NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, b"\x01" * 20)], initiator=True)
    p = IKEv2(msg.encode())
    assert p.init_SPI == SPI_I and p.exch_type == 34 and p.id == 0
    assert p.flags == 0x08 or "Initiator" in str(p.flags)
    sa = p[IKEv2_SA]
    prop = sa.prop
    assert prop.proposal == 1 and prop.trans_nb == 6
    assert prop.trans.transform_type == 1 and prop.trans.key_length == 128
    assert p[IKEv2_KE].group == 19 and bytes(p[IKEv2_KE].ke) == bytes(range(64))
    assert bytes(p[IKEv2_Nonce].nonce) == b"N" * 32
    assert p[IKEv2_Notify].type == NotifyType.NAT_DETECTION_SOURCE_IP
    assert bytes(p[IKEv2_Notify].notify) == b"\x01" * 20
    assert p.length == len(msg.encode())


def test_we_parse_what_scapy_builds():
    from scapy.contrib.ikev2 import (
        IKEv2, IKEv2_Delete, IKEv2_Encrypted, IKEv2_KE, IKEv2_Nonce, IKEv2_Notify, IKEv2_Proposal, IKEv2_SA,
        IKEv2_Transform,
    )
    trans = (IKEv2_Transform(transform_type="Encryption", transform_id=12, length=12, key_length=256)
             / IKEv2_Transform(transform_type="PRF", transform_id=5)
             / IKEv2_Transform(transform_type="Integrity", transform_id=12)
             / IKEv2_Transform(transform_type="GroupDesc", transform_id=31))
    pkt = (IKEv2(init_SPI=SPI_I, resp_SPI=SPI_R, exch_type=34, flags="Response")
           / IKEv2_SA(prop=IKEv2_Proposal(proposal=1, proto=1, trans_nb=4, trans=trans))
           / IKEv2_KE(group=31, ke=b"K" * 32) / IKEv2_Nonce(nonce=b"n" * 32)
           / IKEv2_Notify(type=16396) / IKEv2_Delete(proto=3, SPIsize=4, SPInum=1, SPI=[b"\x00\x00\x10\x00"]))
    m = decode_message(bytes(pkt))
    assert m.response and not m.initiator and m.spi_r == SPI_R
    sa = m.get(SAPayload)
    assert [(t.type, t.id, t.key_length) for t in sa.proposals[0].transforms] == \
        [(1, 12, 256), (2, 5, None), (3, 12, None), (4, 31, None)]
    assert m.get(KEPayload).data == b"K" * 32 and m.get(NoncePayload).data == b"n" * 32
    assert m.notify(NotifyType.MOBIKE_SUPPORTED) is not None
    assert m.get(DeletePayload).spis == [b"\x00\x00\x10\x00"]
    enc = IKEv2(init_SPI=SPI_I, resp_SPI=SPI_R, exch_type=37) / IKEv2_Encrypted(next_payload=42, load=b"x" * 40)
    m = decode_message(bytes(enc))
    assert m.sk.first_inner == 42 and m.sk.body == b"x" * 40
