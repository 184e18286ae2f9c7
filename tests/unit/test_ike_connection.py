"""The IkeConnection state machine with injected time, against a small
scripted responder built from the codec and crypto modules (the real peer,
strongSwan, is in tests/netns/test_ike_interop.py). Covers retransmission,
COOKIE / INVALID_KE rounds, NAT-T floating, bad input, peer requests and
deletes in both directions."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from agent.ike import (
    AuthFailed, CaTrust, CertAuth, ChildSaDeleted, ChildSaEstablished, ChildSaFailed, IkeConfig, IkeConnection,
    IkeFailed, IkeSaDeleted, IkeSaEstablished, PskAuth, State,
)
from agent.ike.auth import Identity, sign_auth
from agent.ike.const import (
    AuthMethod, CfgAttr, CfgType, ExchangeType, NotifyType, PayloadType, ProtocolId, TransformType,
)
from agent.ike.crypto import (
    DhExchange, SkCipher, derive_child_keys, derive_ike_keys, nat_hash, psk_auth, signed_octets,
)
from agent.ike.message import (
    AuthPayload, CertPayload, CPAttribute, CPPayload, DeletePayload, IDiPayload, IDrPayload, KEPayload, Message,
    NoncePayload, NotifyPayload, Proposal, SAPayload, TrafficSelector, Transform, TSiPayload, TSrPayload,
    UnknownPayload,
    decode_message,
)
from agent.ike.proposals import select_esp, select_ike

MN = ("192.0.2.50", 500)
GW = ("192.0.2.1", 500)
PSK = b"unit-test-psk-0123456789"
NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.timezone.utc)


class FakeGateway:
    """Just enough of an IKEv2 responder to drive the initiator."""

    def __init__(self, *, psk=PSK, groups=(31, 19, 14), cookie=False, fake_nat=False, nat_mn=False, mobike=True,
                 init_error=None, child_error=None, tsi=None, tsr=None, esp_pick=None, bad_auth=False,
                 tia="10.10.100.7", dns=("10.10.0.53",), cert=None, idr="gw.vpn.example"):
        self.psk, self.groups, self.cookie, self.fake_nat, self.nat_mn = psk, groups, cookie, fake_nat, nat_mn
        self.mobike, self.init_error, self.child_error = mobike, init_error, child_error
        self.tsi, self.tsr, self.esp_pick, self.bad_auth = tsi, tsr, esp_pick, bad_auth
        self.tia, self.dns, self.cert, self.idr = tia, dns, cert, Identity.parse(idr)
        self.spi_r = b"\xaa" * 8
        self.sk = None
        self.seen: list[Message] = []          # decoded requests (inner payloads for encrypted ones)
        self.inner: list[list] = []
        self.esp_spi = 0xC0000001
        self.child_keys = None
        self.last: tuple[int, bytes] | None = None
        self.next_mid = 0
        self.deleted = False
        self.drop_responses = 0

    # -- framing
    def handle(self, data: bytes, src, dst) -> list:
        natt = dst[1] == 4500
        if natt and data == b"\xff":           # NAT keepalive
            self.keepalives = getattr(self, "keepalives", 0) + 1
            return []
        if natt:
            assert data[:4] == bytes(4), "NAT-T message without non-ESP marker"
            data = data[4:]
        msg = decode_message(data)
        if msg.response:                       # answer to one of our requests
            self.seen.append(msg)
            self.inner.append(self.sk.open(msg))
            return []
        if self.last is not None and self.last[0] == msg.message_id and msg.exchange != ExchangeType.IKE_SA_INIT:
            out = self.last[1]                  # retransmitted request: cached response
        else:
            self.seen.append(msg)
            out = getattr(self, f"_{ExchangeType(msg.exchange).name.lower()}")(msg, src, dst)
            if out is None:
                return []
            if msg.exchange != ExchangeType.IKE_SA_INIT:
                self.last = (msg.message_id, out)
        if self.drop_responses:
            self.drop_responses -= 1
            return []
        return [((bytes(4) + out) if natt else out, dst, src)]

    def resp(self, req, payloads, spi_r=None, encrypt=True):
        m = Message(req.spi_i, self.spi_r if spi_r is None else spi_r, req.exchange, req.message_id,
                    initiator=False, response=True)
        if encrypt:
            return self.sk.seal(m, payloads)
        m.payloads = payloads
        return m.encode()

    def request(self, conn_path_local, payloads, exchange=ExchangeType.INFORMATIONAL, mid=None):
        m = Message(self.spi_i, self.spi_r, exchange, self.next_mid if mid is None else mid, initiator=False)
        if mid is None:
            self.next_mid += 1
        data = self.sk.seal(m, payloads)
        natt = conn_path_local[1] == 4500
        return (bytes(4) + data) if natt else data

    # -- exchanges
    def _ike_sa_init(self, msg, src, dst):
        self.spi_i = msg.spi_i
        if self.init_error:
            return self.resp(msg, [NotifyPayload(self.init_error)], spi_r=bytes(8), encrypt=False)
        if self.cookie:
            c = msg.payloads[0]
            if not (isinstance(c, NotifyPayload) and c.notify_type == NotifyType.COOKIE and c.data == b"C" * 16):
                return self.resp(msg, [NotifyPayload(NotifyType.COOKIE, b"C" * 16)], spi_r=bytes(8), encrypt=False)
        sa, ke, ni = msg.get(SAPayload), msg.get(KEPayload), msg.get(NoncePayload)
        offered = [t.id for t in sa.proposals[0].transforms if t.type == TransformType.DH]
        if ke.group not in self.groups:
            want = next((g for g in self.groups if g in offered), self.groups[0])
            return self.resp(msg, [NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, struct.pack("!H", want))],
                             spi_r=bytes(8), encrypt=False)
        prop = sa.proposals[0]
        pick, seen_types = [], set()
        for t in prop.transforms:
            if t.type == TransformType.DH and t.id != ke.group:
                continue
            if t.type not in seen_types:
                seen_types.add(t.type)
                pick.append(t)
        chosen = Proposal(prop.num, ProtocolId.IKE, b"", pick)
        self.suite = select_ike(SAPayload([chosen]), sa.proposals)
        dh = DhExchange(ke.group)
        self.ni, self.nr = ni.data, b"R" * 32
        self.keys = derive_ike_keys(self.suite, self.ni, self.nr, dh.shared_secret(ke.data), msg.spi_i, self.spi_r)
        self.sk = SkCipher.for_responder(self.keys)
        self.init_req = msg.raw
        src_hash = b"\x00" * 20 if self.fake_nat else nat_hash(msg.spi_i, self.spi_r, dst[0], dst[1])
        dst_hash = b"\x01" * 20 if self.nat_mn else nat_hash(msg.spi_i, self.spi_r, src[0], src[1])
        out = self.resp(msg, [SAPayload([chosen]), KEPayload(ke.group, dh.public), NoncePayload(self.nr),
                              NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, src_hash),
                              NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP, dst_hash),
                              NotifyPayload(NotifyType.SIGNATURE_HASH_ALGORITHMS, b"\x00\x02\x00\x03\x00\x04")],
                        encrypt=False)
        self.init_resp = out
        return out

    def _ike_auth(self, msg, src, dst):
        inner = self.sk.open(msg)
        self.inner.append(inner)
        idi = next(p for p in inner if isinstance(p, IDiPayload))
        auth = next(p for p in inner if isinstance(p, AuthPayload))
        octets = signed_octets(self.suite.prf, self.init_req, self.nr, self.keys.sk_pi,
                               bytes([idi.id_type, 0, 0, 0]) + idi.data)
        if auth.method != AuthMethod.PSK or auth.data != psk_auth(self.suite.prf, self.psk, octets):
            return self.resp(msg, [NotifyPayload(NotifyType.AUTHENTICATION_FAILED)])
        r_octets = signed_octets(self.suite.prf, self.init_resp, self.ni, self.keys.sk_pr, self.idr.body())
        if self.cert:
            method, data = sign_auth(self.cert[1], r_octets, {2, 3, 4})
            out = [IDrPayload(self.idr.id_type, self.idr.data),
                   CertPayload(4, self.cert[0].public_bytes(Encoding.DER)), AuthPayload(method, data)]
        else:
            a = psk_auth(self.suite.prf, b"wrong" if self.bad_auth else self.psk, r_octets)
            out = [IDrPayload(self.idr.id_type, self.idr.data), AuthPayload(AuthMethod.PSK, a)]
        cp = [CPAttribute(CfgAttr.INTERNAL_IP4_ADDRESS, ipaddress.IPv4Address(self.tia).packed)] if self.tia else []
        cp += [CPAttribute(CfgAttr.INTERNAL_IP4_DNS, ipaddress.IPv4Address(d).packed) for d in self.dns]
        out.append(CPPayload(CfgType.REPLY, cp))
        if self.mobike:
            out.append(NotifyPayload(NotifyType.MOBIKE_SUPPORTED))
        if self.child_error:
            out.append(NotifyPayload(self.child_error))
            return self.resp(msg, out)
        sa = next(p for p in inner if isinstance(p, SAPayload))
        prop = sa.proposals[0] if self.esp_pick is None else self.esp_pick(sa)
        types = set()
        pick = [t for t in prop.transforms if not (t.type in types or types.add(t.type))]
        chosen = Proposal(prop.num, ProtocolId.ESP, struct.pack("!I", self.esp_spi), pick)
        self.my_esp = chosen
        if self.esp_pick is None:
            suite = select_esp(SAPayload([chosen]), sa.proposals)
            self.child_keys = derive_child_keys(self.suite.prf, self.keys.sk_d, suite, self.ni, self.nr)
        self.mn_esp_spi = struct.unpack("!I", sa.proposals[0].spi)[0]
        tsi = self.tsi or [TrafficSelector.from_network(f"{self.tia}/32" if self.tia else "0.0.0.0/0")]
        tsr = self.tsr or next(p for p in inner if isinstance(p, TSrPayload)).selectors
        out += [SAPayload([chosen]), TSiPayload(tsi), TSrPayload(tsr)]
        return self.resp(msg, out)

    def _informational(self, msg, src, dst):
        inner = self.sk.open(msg)
        self.inner.append(inner)
        reply = []
        for d in inner:
            if isinstance(d, DeletePayload) and d.protocol == ProtocolId.IKE:
                self.deleted = True
            elif isinstance(d, DeletePayload):
                reply.append(DeletePayload(ProtocolId.ESP, [struct.pack("!I", self.esp_spi)]))
        return self.resp(msg, reply)


class Net:
    """Moves datagrams between the connection and the fake gateway; time is ours."""

    def __init__(self, gw: FakeGateway | None = None, **cfg):
        self.gw = gw or FakeGateway()
        self.now = 100.0
        self.conn = IkeConnection(make_config(**cfg), MN, GW, name="t")
        self.sent: list = []        # everything the connection sent
        self.lost = 0               # drop this many of our next datagrams

    def pump(self):
        for _ in range(50):
            out = self.conn.datagrams_to_send(self.now)
            if not out:
                return
            for data, local, remote in out:
                self.sent.append((data, local, remote))
                if self.lost:
                    self.lost -= 1
                    continue
                for rdata, rsrc, rdst in self.gw.handle(data, local, remote):
                    self.conn.receive_datagram(rdata, rsrc, rdst, self.now)

    def connect(self):
        self.conn.connect(self.now)
        self.pump()
        return self

    def advance(self, dt):
        self.now += dt
        t = self.conn.get_timer()
        if t is not None and t <= self.now:
            self.conn.handle_timer(self.now)
        self.pump()

    def inject(self, data, local=None, src=None):
        local = local or self.conn.path.local
        self.conn.receive_datagram(data, src or self.conn.path.remote, local, self.now)
        self.pump()

    def events(self):
        out = []
        while (e := self.conn.next_event()) is not None:
            out.append(e)
        return out


def make_config(**kw):
    args = dict(local_id="mn-psk@vpn.example", remote_id="gw.vpn.example", local_auth=PskAuth(PSK),
                remote_auth=PskAuth(PSK), remote_ts=["10.10.0.0/24"], retransmit_timeout=1.0,
                retransmit_base=2.0, retransmit_max_timeout=16.0, retransmit_tries=5, wall_clock=lambda: NOW)
    args.update(kw)
    return IkeConfig(**args)


def established(**kw) -> tuple[Net, list]:
    gwkw = {k[3:]: kw.pop(k) for k in list(kw) if k.startswith("gw_")}
    n = Net(FakeGateway(**gwkw), **kw).connect()
    evs = n.events()
    assert n.conn.state is State.ESTABLISHED, evs
    return n, evs


# ------------------------------------------------------------------------------ happy paths

def test_psk_connect_events_keys_and_port_float():
    n, evs = established()
    ike, child = evs
    assert isinstance(ike, IkeSaEstablished) and isinstance(child, ChildSaEstablished)
    assert ike.time == child.time == n.now
    assert ike.auth == "psk" and ike.mobike and not ike.nat_local and not ike.nat_remote
    assert ike.proposal == "AES_CBC-128/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/CURVE_25519"
    # MOBIKE announced: IKE_AUTH went to 4500 with the non-ESP marker although there is no NAT
    assert n.sent[0][1:] == (MN, GW) and n.sent[0][0][:4] != bytes(4)
    assert n.sent[1][1:] == ((MN[0], 4500), (GW[0], 4500)) and n.sent[1][0][:4] == bytes(4)
    assert child.tia == ipaddress.IPv4Address("10.10.100.7") and [str(d) for d in child.dns] == ["10.10.0.53"]
    assert child.proposal == "AES_GCM_16-128" and child.inbound.aead_alg == "rfc4106(gcm(aes))"
    assert not child.encap and not child.nat_detected          # no NAT: plain ESP
    assert child.inbound.spi == n.conn.children[child.child_id].spi_in == child.child_id
    assert child.outbound.spi == n.gw.esp_spi
    gk = n.gw.child_keys
    assert child.outbound.encr_key == gk.encr_i2r and child.inbound.encr_key == gk.encr_r2i
    # what we asked for in IKE_AUTH
    inner = n.gw.inner[0]
    types = [p.type for p in inner]
    assert types[0] == PayloadType.IDi and PayloadType.IDr in types and PayloadType.CP in types
    notes = {p.notify_type for p in inner if isinstance(p, NotifyPayload)}
    assert {NotifyType.INITIAL_CONTACT, NotifyType.MOBIKE_SUPPORTED} <= notes
    cp = next(p for p in inner if isinstance(p, CPPayload))
    assert cp.cfg_type == CfgType.REQUEST and [a.type for a in cp.attributes] == [1, 3]
    assert next(p for p in inner if isinstance(p, TSiPayload)).selectors == [TrafficSelector.from_network("0.0.0.0/0")]
    assert n.conn.get_timer() == n.now + 20.0                    # keepalive timer (only used behind a NAT)


def test_no_mobike_no_nat_stays_on_500():
    n, evs = established(mobike=False, gw_mobike=False)
    assert all(local == MN and remote == GW for _, local, remote in n.sent)
    assert all(d[:4] != bytes(4) for d, _, _ in n.sent)
    assert not evs[0].mobike
    assert NotifyType.MOBIKE_SUPPORTED not in {p.notify_type for p in n.gw.inner[0] if isinstance(p, NotifyPayload)}


def test_gateway_nat_moves_to_4500_and_encap():
    n, evs = established(mobike=False, gw_fake_nat=True)
    ike, child = evs
    assert ike.nat_remote and not ike.nat_local
    assert child.encap and child.local_addr == (MN[0], 4500) and child.remote_addr == (GW[0], 4500)


def test_nat_in_front_of_us_sends_keepalives():
    n, evs = established(gw_nat_mn=True, keepalive_interval=20.0)
    assert evs[0].nat_local
    n.sent.clear()
    n.advance(20.0)
    assert [d for d, _, _ in n.sent] == [b"\xff"]
    assert n.sent[0][1:] == ((MN[0], 4500), (GW[0], 4500))
    n.advance(20.0)
    assert len(n.sent) == 2 and n.conn.stats["keepalives_sent"] == 2 and n.gw.keepalives == 2


def test_gcm_ike_sa_and_cbc_child():
    n, evs = established(ike_proposals=["aes256gcm16-prfsha384-ecp256"], esp_proposals=["aes256-sha512"])
    ike, child = evs
    assert ike.proposal == "AES_GCM_16-256/PRF_HMAC_SHA2_384/ECP_256"
    assert (child.outbound.encr_alg, child.outbound.integ_alg, child.outbound.integ_trunc_bits) == \
        ("cbc(aes)", "hmac(sha512)", 256)
    assert len(child.outbound.encr_key) == 32 and len(child.outbound.integ_key) == 64


def test_cookie_round():
    n, evs = established(gw_cookie=True)
    init1, init2 = (decode_message(d) for d, _, _ in n.sent[:2])
    c = init2.payloads[0]
    assert isinstance(c, NotifyPayload) and c.notify_type == NotifyType.COOKIE and c.data == b"C" * 16
    assert init1.payloads == init2.payloads[1:]                  # same SA, KE, nonce, NAT-D
    assert n.conn.stats["cookie_rounds"] == 1


def test_invalid_ke_retry_with_requested_group():
    n, evs = established(gw_groups=(19,))
    init1, init2 = (decode_message(d) for d, _, _ in n.sent[:2])
    assert init1.get(KEPayload).group == 31 and init2.get(KEPayload).group == 19
    assert init1.get(NoncePayload) == init2.get(NoncePayload)
    assert evs[0].proposal.endswith("/ECP_256") and n.conn.stats["invalid_ke_retries"] == 1


def test_invalid_ke_for_group_we_did_not_offer():
    n = Net(FakeGateway(groups=(21,)), ike_proposals=["aes128-sha256-x25519"]).connect()
    assert n.events() == []                     # unauthenticated: not believed at once
    n.advance(1.0)
    n.advance(1.0)                              # unprotected_error_wait (2 s) is over
    evs = n.events()
    assert isinstance(evs[0], IkeFailed) and evs[0].notify == NotifyType.INVALID_KE_PAYLOAD
    assert n.conn.state is State.CLOSED


def test_init_error_notify():
    n = Net(FakeGateway(init_error=NotifyType.NO_PROPOSAL_CHOSEN)).connect()
    assert n.events() == [] and n.conn.state is State.IKE_SA_INIT      # unauthenticated: not believed at once
    n.advance(1.0)
    assert n.events() == []
    n.advance(1.0)                                                      # unprotected_error_wait (2 s) is over
    (ev,) = n.events()
    assert isinstance(ev, IkeFailed) and ev.notify == 14 and "NO_PROPOSAL_CHOSEN" in ev.reason
    assert n.conn.state is State.CLOSED and n.conn.stats["unprotected_init_errors"] >= 1


def test_forged_init_error_does_not_stop_the_connection():
    """An off-path forged NO_PROPOSAL_CHOSEN before the gateway's own answer changes nothing."""
    n = Net()
    n.lost = 1                                   # our first IKE_SA_INIT never reaches the gateway
    n.connect()
    (init, _, _), = n.sent
    spi_i = decode_message(init).spi_i
    forged = Message(spi_i, bytes(8), ExchangeType.IKE_SA_INIT, 0, [NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN)],
                     initiator=False, response=True).encode()
    n.inject(forged)
    assert n.events() == [] and n.conn.state is State.IKE_SA_INIT
    n.advance(1.0)                               # the retransmission reaches the real gateway
    evs = n.events()
    assert n.conn.state is State.ESTABLISHED, evs
    assert not any(isinstance(e, IkeFailed) for e in evs)


def test_cert_authenticated_gateway_and_expiry():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(1).not_valid_before(datetime.datetime(2026, 1, 1)).not_valid_after(datetime.datetime(2027, 1, 1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    gkey = ec.generate_private_key(ec.SECP256R1())
    gw = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw")]))
          .issuer_name(name).public_key(gkey.public_key()).serial_number(2)
          .not_valid_before(datetime.datetime(2026, 1, 1)).not_valid_after(datetime.datetime(2026, 12, 1))
          .add_extension(x509.SubjectAlternativeName([x509.DNSName("gw.vpn.example")]), critical=False)
          .sign(key, hashes.SHA256()))
    n, evs = established(remote_auth=CaTrust((ca,)), gw_cert=(gw, gkey))
    assert evs[0].auth == "RFC7427 ecdsa-sha256"
    certreq = next(p for p in n.gw.inner[0] if p.type == PayloadType.CERTREQ)
    assert len(certreq.data) == 20
    later = datetime.datetime(2026, 12, 24, tzinfo=datetime.timezone.utc)
    n = Net(FakeGateway(cert=(gw, gkey)), remote_auth=CaTrust((ca,)), wall_clock=lambda: later).connect()
    (ev,) = n.events()
    assert isinstance(ev, AuthFailed) and ev.by == "local" and "expired" in ev.reason


def test_our_certificate_signature_auth():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mn")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(datetime.datetime(2026, 1, 1))
            .not_valid_after(datetime.datetime(2027, 1, 1)).sign(key, hashes.SHA256()))
    n = Net(local_auth=CertAuth(cert, key), local_id="mn.vpn.example")
    n.gw._ike_auth = lambda msg, src, dst: (n.gw.inner.append(n.gw.sk.open(msg)), None)[1]
    n.connect()
    inner = n.gw.inner[0]
    assert next(p for p in inner if p.type == PayloadType.CERT).data == cert.public_bytes(Encoding.DER)
    auth = next(p for p in inner if isinstance(p, AuthPayload))
    assert auth.method == AuthMethod.DIGITAL_SIGNATURE     # the gateway announced SIGNATURE_HASH_ALGORITHMS
    from agent.ike.auth import verify_auth
    octets = signed_octets(n.gw.suite.prf, n.gw.init_req, n.gw.nr, n.gw.keys.sk_pi, Identity.parse("mn.vpn.example").body())
    assert verify_auth(key.public_key(), auth.method, auth.data, octets) == "RFC7427 ecdsa-sha256"


# ------------------------------------------------------------------------------ failures

def test_gateway_rejects_our_auth():
    n = Net(FakeGateway(psk=b"other"), ).connect()
    (ev,) = n.events()
    assert isinstance(ev, AuthFailed) and ev.by == "peer"
    assert n.conn.state is State.CLOSED


def test_gateway_auth_wrong_tells_gateway():
    n = Net(FakeGateway(bad_auth=True)).connect()
    (ev,) = n.events()
    assert isinstance(ev, AuthFailed) and ev.by == "local" and "PSK" in ev.reason
    last = n.gw.inner[-1]
    assert [p.notify_type for p in last] == [NotifyType.AUTHENTICATION_FAILED]
    assert n.conn.state is State.CLOSED and n.conn.get_timer() is None


def test_wrong_gateway_identity():
    n = Net(FakeGateway(idr="evil.example"), send_idr=False).connect()
    (ev,) = n.events()
    assert isinstance(ev, AuthFailed) and "evil.example" in ev.reason and "gw.vpn.example" in ev.reason
    assert PayloadType.IDr not in [p.type for p in n.gw.inner[0]]


@pytest.mark.parametrize("gw_kw,cfg_kw,notify,words", [
    (dict(child_error=NotifyType.TS_UNACCEPTABLE), {}, 38, "TS_UNACCEPTABLE"),
    (dict(child_error=NotifyType.NO_PROPOSAL_CHOSEN), {}, 14, "NO_PROPOSAL_CHOSEN"),
    (dict(tsr=[TrafficSelector.from_network("10.0.0.0/8")]), {}, 38, "not within"),
    (dict(tsi=[TrafficSelector.from_network("10.10.100.0/24")]), dict(local_ts=["10.10.100.7/32"]), 38, "not within"),
    (dict(tia=None), {}, NotifyType.INTERNAL_ADDRESS_FAILURE, "INTERNAL_IP4_ADDRESS"),
    # the gateway "chooses" AES-CBC without a key length, which we did not offer
    (dict(esp_pick=lambda sa: Proposal(sa.proposals[0].num, 3, b"", [Transform(1, 12)])), {}, 14, "invalid"),
])
def test_child_failures_then_ike_deleted(gw_kw, cfg_kw, notify, words):
    n = Net(FakeGateway(**gw_kw), **cfg_kw).connect()
    evs = n.events()
    assert isinstance(evs[0], IkeSaEstablished)
    assert isinstance(evs[1], ChildSaFailed) and evs[1].notify == notify and words in evs[1].reason, evs[1]
    assert isinstance(evs[2], IkeSaDeleted) and evs[2].by == "local"
    assert n.gw.deleted and not n.conn.children and n.conn.state is State.CLOSED


def test_no_tia_accepted_when_not_required():
    n, evs = established(require_tia=False, gw_tia=None, gw_tsi=[TrafficSelector.from_network("192.0.2.50/32")],
                         local_ts=["192.0.2.50/32"])
    assert evs[1].tia is None


# ------------------------------------------------------------------------------ retransmission

def test_retransmission_backoff_then_give_up():
    n = Net(retransmit_timeout=1.0, retransmit_base=2.0, retransmit_max_timeout=5.0, retransmit_tries=4)
    n.lost = 100
    n.conn.connect(n.now)
    n.pump()
    start = n.now
    deadlines = []
    while n.conn.state is not State.CLOSED:
        t = n.conn.get_timer()
        deadlines.append(round(t - start, 3))
        n.advance(t - n.now)
    assert deadlines == [1.0, 3.0, 7.0, 12.0, 17.0]           # 1, 2, 4, capped 5, 5
    assert len(n.sent) == 5 and len({d for d, _, _ in n.sent}) == 1   # identical retransmissions
    (ev,) = n.events()
    assert isinstance(ev, IkeFailed) and "IKE_SA_INIT" in ev.reason
    assert n.conn.stats["retransmits"] == 4


def test_dropped_ike_auth_response_retransmit():
    gw = FakeGateway()
    n = Net(gw)
    n.conn.connect(n.now)
    # deliver IKE_SA_INIT normally, then lose the gateway's IKE_AUTH answer once
    data, local, remote = n.conn.datagrams_to_send(n.now)[0]
    for r in gw.handle(data, local, remote):
        n.conn.receive_datagram(r[0], r[1], r[2], n.now)
    gw.drop_responses = 1
    n.pump()
    assert n.conn.state is State.IKE_AUTH and not n.events()
    n.advance(1.0)
    assert n.conn.state is State.ESTABLISHED and n.conn.stats["retransmits"] == 1
    assert len(gw.seen) == 2                                   # the duplicate was answered from the cache


# ------------------------------------------------------------------------------ bad input

def test_bad_input_is_counted_logged_once_and_changes_nothing(caplog):
    n, _ = established()
    caplog.set_level(logging.DEBUG, logger="agent.ike")
    before = (n.conn.state, dict(n.conn.children), n.conn.spi_r, n.conn._peer_mid, n.conn._next_mid)
    good = n.gw.request(n.conn.path.local, [])                 # a DPD-like request, for mutations
    n.gw.next_mid -= 1
    raw = good[4:]
    wrong_spi_i = bytes(4) + b"\x00" * 8 + raw[8:]
    wrong_spi_r = bytes(4) + raw[:8] + b"\x00" * 8 + raw[16:]
    bad_mid = bytes(4) + raw[:20] + struct.pack("!I", 7) + raw[24:]
    tampered = bytearray(good)
    tampered[-1] ^= 1
    with_i_flag = bytes(4) + raw[:19] + bytes([raw[19] | 0x08]) + raw[20:]
    unexpected_resp = bytes(4) + raw[:19] + bytes([0x20]) + raw[20:]
    for d in [wrong_spi_i, wrong_spi_r, bad_mid, bytes(tampered), with_i_flag, unexpected_resp,
              b"\x00\x00\x00\x00garbage", b"\x01\x02\x03\x04esp-packet", bytes(tampered), bytes(tampered)]:
        n.inject(d)
    assert not n.events() and not [s for s in n.sent[3:] if s[0] != b"\xff"]    # nothing answered
    assert (n.conn.state, dict(n.conn.children), n.conn.spi_r, n.conn._peer_mid, n.conn._next_mid) == before
    st = n.conn.stats
    assert st["unknown_spi"] == 2 and st["unexpected_request_id"] == 1 and st["integrity"] == 3
    assert st["bad_flags"] == 1 and st["unexpected_response"] == 1 and st["malformed"] == 1
    assert st["esp_on_ike_socket"] == 1 and st["dropped"] == 10
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "failed integrity" in w.getMessage()]) == 1   # logged once
    # the genuine request still works afterwards
    n.inject(good)
    assert n.conn._peer_mid == 1


def test_replayed_and_late_responses_are_dropped():
    n, _ = established()
    init_resp = n.gw.init_resp
    n.inject(init_resp, local=MN, src=GW)                       # replayed IKE_SA_INIT response
    auth_resp = n.gw.last[1]
    n.inject(bytes(4) + auth_resp)                              # replayed IKE_AUTH response
    assert n.conn.stats["unexpected_response"] == 2 and not n.events()
    assert n.conn.state is State.ESTABLISHED


def test_tampered_init_response_is_dropped_not_fatal():
    gw = FakeGateway()
    n = Net(gw)
    n.conn.connect(n.now)
    data, local, remote = n.conn.datagrams_to_send(n.now)[0]
    (resp, src, dst), = gw.handle(data, local, remote)
    n.conn.receive_datagram(resp[:-3], src, dst, n.now)         # truncated: header length mismatch
    n.conn.receive_datagram(resp + b"\x00", src, dst, n.now)
    assert n.conn.state is State.IKE_SA_INIT and n.conn.stats["malformed"] == 2
    n.conn.receive_datagram(resp, src, dst, n.now)
    n.pump()
    assert n.conn.state is State.ESTABLISHED


def test_request_before_established_is_dropped():
    gw = FakeGateway()
    n = Net(gw)
    n.conn.connect(n.now)
    n.conn.receive_datagram(Message(n.conn.spi_i, gw.spi_r, 37, 0, initiator=False).encode(), GW, MN, n.now)
    assert n.conn.stats["unexpected_request"] == 1


def test_no_secrets_in_logs(caplog):
    caplog.set_level(logging.DEBUG, logger="agent.ike")
    n, evs = established()
    n.inject(b"\x00\x00\x00\x00" + b"\x00" * 40)
    n.conn.delete(n.now)
    n.pump()
    text = caplog.text + "".join(repr(e) for e in evs)
    k = n.conn.keys
    secrets_ = [PSK.hex(), PSK.decode(), k.sk_d.hex(), k.sk_ei.hex(), k.sk_ai.hex(), k.sk_pi.hex(),
                evs[1].inbound.encr_key.hex(), evs[1].outbound.encr_key.hex()]
    for s in secrets_:
        assert s not in text
    assert "IKE_SA_INIT done" in caplog.text


# ------------------------------------------------------------------------------ peer requests

def test_peer_dpd_duplicate_and_window():
    n, _ = established()
    req0 = n.gw.request(n.conn.path.local, [])
    n.sent.clear()
    n.inject(req0)
    (resp, local, remote), = n.sent
    m = decode_message(resp[4:])
    assert m.response and m.initiator and m.message_id == 0 and m.exchange == ExchangeType.INFORMATIONAL
    assert n.gw.sk.open(m) == []
    n.inject(req0)                                              # retransmitted request
    assert n.sent[1][0] == resp and n.conn.stats["retransmitted_requests"] == 1
    n.inject(n.gw.request(n.conn.path.local, [], mid=5))        # out of window
    assert n.conn.stats["unexpected_request_id"] == 1 and len(n.sent) == 2
    n.inject(n.gw.request(n.conn.path.local, []))               # mid 1
    assert len(n.sent) == 3 and decode_message(n.sent[2][0][4:]).message_id == 1


def test_peer_deletes_child_then_ike():
    n, evs = established()
    child = evs[1]
    n.sent.clear()
    n.inject(n.gw.request(n.conn.path.local, [DeletePayload(ProtocolId.ESP, [struct.pack("!I", n.gw.esp_spi)])]))
    (ev,) = n.events()
    assert isinstance(ev, ChildSaDeleted) and ev.by == "peer" and ev.child_id == child.child_id
    reply = n.gw.sk.open(decode_message(n.sent[0][0][4:]))
    assert reply == [DeletePayload(ProtocolId.ESP, [struct.pack("!I", child.child_id)])]
    assert n.conn.state is State.ESTABLISHED and not n.conn.children
    n.inject(n.gw.request(n.conn.path.local, [DeletePayload(ProtocolId.IKE)]))
    (ev,) = n.events()
    assert isinstance(ev, IkeSaDeleted) and ev.by == "peer"
    assert n.gw.sk.open(decode_message(n.sent[1][0][4:])) == [] and n.conn.state is State.CLOSED
    n.inject(n.gw.request(n.conn.path.local, []))
    assert n.conn.stats["closed"] == 1 and len(n.sent) == 2


def test_peer_delete_ike_takes_children_with_it():
    n, evs = established()
    n.inject(n.gw.request(n.conn.path.local, [DeletePayload(ProtocolId.IKE)]))
    a, b = n.events()
    assert isinstance(a, ChildSaDeleted) and a.by == "ike" and isinstance(b, IkeSaDeleted) and b.by == "peer"


def test_peer_request_with_unknown_critical_payload():
    n, _ = established()
    n.sent.clear()
    n.inject(n.gw.request(n.conn.path.local, [UnknownPayload(payload_type=222, data=b"?", critical=True)]))
    reply = n.gw.sk.open(decode_message(n.sent[0][0][4:]))
    assert reply == [NotifyPayload(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, bytes([222]))]
    assert n.conn.state is State.ESTABLISHED


def test_peer_create_child_sa_without_rekey_refused():
    """A new CHILD SA the gateway wants (no REKEY_SA): we only run the ones we asked for;
    one without an SA payload is a syntax error."""
    n, _ = established()
    n.sent.clear()
    n.inject(n.gw.request(n.conn.path.local, [NoncePayload(b"n" * 32)], exchange=ExchangeType.CREATE_CHILD_SA))
    reply = n.gw.sk.open(decode_message(n.sent[0][0][4:]))
    assert reply == [NotifyPayload(NotifyType.INVALID_SYNTAX)]
    offer = Proposal(1, ProtocolId.ESP, b"\x01\x02\x03\x04", [Transform(1, 20, n.gw.my_esp.transforms[0].attributes)])
    n.inject(n.gw.request(n.conn.path.local, [SAPayload([offer]), NoncePayload(b"n" * 32),
                                              TSiPayload([TrafficSelector.from_network("10.10.0.0/24")]),
                                              TSrPayload([TrafficSelector.from_network("10.10.100.7/32")])],
                          exchange=ExchangeType.CREATE_CHILD_SA))
    reply = n.gw.sk.open(decode_message(n.sent[1][0][4:]))
    assert reply == [NotifyPayload(NotifyType.NO_ADDITIONAL_SAS)]


def test_peer_additional_addresses_recorded():
    n, _ = established()
    n.inject(n.gw.request(n.conn.path.local, [NotifyPayload(NotifyType.ADDITIONAL_IP4_ADDRESS, bytes([198, 51, 100, 1]))]))
    assert n.conn.peer_addresses == ["198.51.100.1"]
    n.inject(n.gw.request(n.conn.path.local, [NotifyPayload(NotifyType.NO_ADDITIONAL_ADDRESSES)]))
    assert n.conn.peer_addresses == []


# ------------------------------------------------------------------------------ our deletes

def test_our_delete_child_and_ike():
    n, evs = established()
    n.conn.delete_child(evs[1].child_id, n.now)
    n.pump()
    (ev,) = n.events()
    assert isinstance(ev, ChildSaDeleted) and ev.by == "local" and ev.spi_out == n.gw.esp_spi
    assert n.gw.inner[-1] == [DeletePayload(ProtocolId.ESP, [struct.pack("!I", evs[1].child_id)])]
    with pytest.raises(KeyError):
        n.conn.delete_child(evs[1].child_id, n.now)
    n.conn.delete(n.now)
    n.pump()
    (ev,) = n.events()
    assert isinstance(ev, IkeSaDeleted) and ev.by == "local" and n.gw.deleted
    assert n.conn.datagrams_to_send(n.now) == [] and n.conn.get_timer() is None


def test_delete_without_answer_still_closes():
    n, evs = established(retransmit_tries=2)
    n.lost = 100
    n.conn.delete(n.now)
    n.pump()
    while n.conn.state is not State.CLOSED:
        n.advance(n.conn.get_timer() - n.now)
    evs = n.events()
    assert isinstance(evs[-1], IkeSaDeleted) and "did not answer" in evs[-1].reason
    assert isinstance(evs[0], ChildSaDeleted)


def test_delete_during_connect_aborts_quietly():
    n = Net()
    n.lost = 100
    n.conn.connect(n.now)
    n.conn.delete(n.now)
    assert n.conn.state is State.CLOSED and n.events() == [] and n.conn.get_timer() is None


def test_delete_during_ike_auth_tells_the_gateway():
    gw = FakeGateway()
    n = Net(gw)
    gw._ike_auth = lambda msg, src, dst: None          # the gateway keeps us waiting
    n.connect()
    assert n.conn.state is State.IKE_AUTH
    n.conn.delete(n.now)
    n.pump()
    assert n.conn.state is State.CLOSED and gw.deleted and n.events() == []


def test_gateway_asking_for_eap():
    gw = FakeGateway()
    n = Net(gw)
    gw._ike_auth = lambda msg, src, dst: gw.resp(msg, [IDrPayload(2, b"gw.vpn.example"),
                                                       UnknownPayload(payload_type=PayloadType.EAP, data=b"\x01\x00\x00\x05\x01")])
    n.connect()
    (ev,) = n.events()
    assert isinstance(ev, IkeFailed) and "EAP" in ev.reason


def test_api_misuse():
    n, _ = established()
    with pytest.raises(RuntimeError):
        n.conn.connect(n.now)
    with pytest.raises(ValueError):
        n.conn.update_addresses(("0.0.0.0", 4500), n.now)
    with pytest.raises(KeyError):
        n.conn.rekey_child(12345, n.now)
    with pytest.raises(ValueError):
        IkeConnection(make_config(), ("0.0.0.0", 500), GW)
    line = n.conn.tshark_decryption_entry()
    assert line.startswith(n.conn.spi_i.hex() + "," + n.conn.spi_r.hex() + ",")
