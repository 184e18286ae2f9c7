"""MOBIKE, liveness checks, rekeying (both directions, collisions) and the
IKE SA role change of IkeConnection, against a scripted responder that keeps
several IKE SAs and checks every key it derives (the real peer, strongSwan,
is in tests/netns/test_ike_mobike.py)."""

from __future__ import annotations

import os
import struct

import pytest

from agent.ike import ChildSaDeleted, ChildSaEstablished, IkeFailed, IkeSaDeleted, State
from agent.ike.const import ExchangeType, NotifyType, ProtocolId, TransformType
from agent.ike.crypto import DhExchange, SkCipher, derive_child_keys, derive_rekeyed_ike_keys, nat_hash
from agent.ike.events import (AddressUpdated, IkeSaRekeyed, LivenessChecked, MobikeFailed, MobikeStarted)
from agent.ike.message import (
    DeletePayload, KEPayload, Message, NoncePayload, NotifyPayload, Proposal, SAPayload, Transform, TSiPayload,
    TSrPayload, decode_message,
)
from agent.ike.proposals import IkeProposal, select_esp, select_ike

from .test_ike_connection import GW, MN, FakeGateway, make_config

NEW = ("198.51.100.50", 4500)
GW2 = "192.0.2.2"


def _first_of_each(prop: Proposal, dh: int | None = None) -> list[Transform]:
    seen, out = set(), []
    for t in prop.transforms:
        if t.type == TransformType.DH and dh is not None and t.id != dh:
            continue
        if t.type not in seen:
            seen.add(t.type)
            out.append(t)
    return out


class Gateway(FakeGateway):
    """The scripted responder of test_ike_connection, extended: it keeps IKE
    SAs by SPI pair (so rekeys and roles can be checked), answers
    UPDATE_SA_ADDRESSES and CREATE_CHILD_SA, and can start its own rekeys."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.sas: dict = {}             # (spi_i, spi_r) -> dict(sk, keys, suite, gw_init, next_mid, last)
        self.cur = None
        self.addresses = {GW[0]}        # where it answers (path probing)
        self.nat_mn = False             # a NAT in front of the MN on its current path (NAT-D)
        self.cookie2 = "echo"           # | "omit" | "wrong"
        self.update_error = None
        self.updates: list = []         # (src, dst, notify types) of UPDATE_SA_ADDRESSES
        self.infos: list = []           # inner payloads of every INFORMATIONAL request
        self.child_error = None
        self.ike_rekey_error = None
        self.nonce_byte = b"R"
        self.esp: dict = {}             # gateway inbound SPI -> dict(mn_spi, keys, initiated_by_gw)
        self.pending = None             # our own request in flight: (kind, ctx)
        self.answers: list = []         # (key, msg, inner) of responses to our requests
        self.hold = False               # keep CREATE_CHILD_SA requests unanswered (collisions)
        self.held: list = []
        self._spi_counter = 0xC0000100

    def nonce(self) -> bytes:
        return self.nonce_byte * 32

    def next_spi(self) -> int:
        self._spi_counter += 1
        return self._spi_counter

    # -- framing ------------------------------------------------------------------------------
    def handle(self, data, src, dst):
        if dst[0] not in self.addresses:
            return []
        natt = dst[1] == 4500
        raw = data[4:] if natt and data[:4] == bytes(4) else data
        if natt and data == b"\xff":
            self.keepalives = getattr(self, "keepalives", 0) + 1
            return []
        msg = decode_message(raw)
        if msg.exchange in (ExchangeType.IKE_SA_INIT, ExchangeType.IKE_AUTH) and not msg.response:
            out = super().handle(data, src, dst)
            if msg.exchange == ExchangeType.IKE_AUTH and self.sk is not None:
                self.cur = (self.spi_i, self.spi_r)
                self.sas[self.cur] = dict(sk=self.sk, keys=self.keys, suite=self.suite, gw_init=False, next_mid=0,
                                          last=None, peer_mid=2)
                if self.esp_pick is None and self.child_keys is not None:
                    self.esp[self.esp_spi] = dict(mn_spi=self.mn_esp_spi, keys=self.child_keys, gw_init=False)
            return out
        key = (msg.spi_i, msg.spi_r)
        sa = self.sas.get(key)
        if sa is None:
            self.unknown = getattr(self, "unknown", 0) + 1
            return []
        assert msg.initiator != sa["gw_init"], "wrong I flag"
        inner = sa["sk"].open(msg)
        if msg.response:
            self.answers.append((key, msg, inner))
            self.on_answer(key, msg, inner)
            return []
        if sa["last"] is not None and sa["last"][0] == msg.message_id:
            out = sa["last"][1]
        else:
            assert msg.message_id == sa["peer_mid"], (msg.message_id, sa["peer_mid"])
            self.seen.append(msg)
            self.inner.append(inner)
            if msg.exchange == ExchangeType.CREATE_CHILD_SA and self.hold:
                self.held.append((data, src, dst))
                return []
            payloads = self.dispatch(key, sa, msg, inner, src, dst)
            if payloads is None:
                return []
            m = Message(key[0], key[1], msg.exchange, msg.message_id, initiator=sa["gw_init"], response=True)
            out = sa["sk"].seal(m, payloads)
            sa["last"] = (msg.message_id, out)
            sa["peer_mid"] = msg.message_id + 1
        if self.drop_responses:
            self.drop_responses -= 1
            return []
        return [((bytes(4) + out) if natt else out, dst, src)]

    def release(self):
        """Answer the held CREATE_CHILD_SA requests now."""
        self.hold = False
        held, self.held = self.held, []
        out = []
        for data, src, dst in held:
            msg = decode_message(data[4:])
            key = (msg.spi_i, msg.spi_r)
            sa = self.sas[key]
            payloads = self.dispatch(key, sa, msg, sa["sk"].open(msg), src, dst)
            m = Message(key[0], key[1], msg.exchange, msg.message_id, initiator=sa["gw_init"], response=True)
            resp = sa["sk"].seal(m, payloads)
            sa["last"] = (msg.message_id, resp)
            sa["peer_mid"] = msg.message_id + 1
            out.append((bytes(4) + resp, dst, src))
        return out

    def send(self, payloads, exchange=ExchangeType.INFORMATIONAL, key=None):
        """A request of the gateway's on IKE SA ``key`` (default: the current one)."""
        key = key or self.cur
        sa = self.sas[key]
        m = Message(key[0], key[1], exchange, sa["next_mid"], initiator=sa["gw_init"])
        sa["next_mid"] += 1
        return bytes(4) + sa["sk"].seal(m, payloads)

    # -- exchanges ------------------------------------------------------------------------------
    def dispatch(self, key, sa, msg, inner, src, dst):
        if msg.exchange == ExchangeType.INFORMATIONAL:
            return self.informational(key, sa, inner, src, dst)
        if msg.exchange == ExchangeType.CREATE_CHILD_SA:
            sap = next(p for p in inner if isinstance(p, SAPayload))
            if sap.proposals[0].protocol == ProtocolId.IKE:
                return self.rekey_ike(key, sa, inner)
            return self.rekey_child(key, sa, inner)
        raise AssertionError(msg.exchange)

    def informational(self, key, sa, inner, src, dst):
        self.infos.append(inner)
        notes = {p.notify_type: p for p in inner if isinstance(p, NotifyPayload)}
        reply = []
        for d in (p for p in inner if isinstance(p, DeletePayload)):
            if d.protocol == ProtocolId.IKE:
                self.deleted_sas = getattr(self, "deleted_sas", []) + [key]
                self.deleted = True
            else:
                gone = []
                for spi in d.spis:
                    mn = struct.unpack("!I", spi)[0]
                    for gspi, c in list(self.esp.items()):
                        if c["mn_spi"] == mn:
                            del self.esp[gspi]
                            gone.append(struct.pack("!I", gspi))
                if gone:
                    reply.append(DeletePayload(ProtocolId.ESP, gone))
        if NotifyType.UPDATE_SA_ADDRESSES in notes:
            self.updates.append((src, dst, sorted(notes)))
            if self.update_error:
                return [NotifyPayload(self.update_error)]
            src_hash = nat_hash(key[0], key[1], dst[0], dst[1])
            dst_hash = b"\x01" * 20 if self.nat_mn else nat_hash(key[0], key[1], src[0], src[1])
            reply += [NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, src_hash),
                      NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP, dst_hash)]
        if NotifyType.COOKIE2 in notes and self.cookie2 != "omit":
            c = notes[NotifyType.COOKIE2].data
            reply.append(NotifyPayload(NotifyType.COOKIE2, c if self.cookie2 == "echo" else b"x" * len(c)))
        return reply

    def rekey_child(self, key, sa, inner):
        if self.child_error:
            return [NotifyPayload(self.child_error)]
        n = next(p for p in inner if isinstance(p, NotifyPayload) and p.notify_type == NotifyType.REKEY_SA)
        old_mn = struct.unpack("!I", n.spi)[0]
        assert any(c["mn_spi"] == old_mn for c in self.esp.values()), "REKEY_SA names no CHILD SA of ours"
        sap = next(p for p in inner if isinstance(p, SAPayload))
        ni = next(p for p in inner if isinstance(p, NoncePayload)).data
        ke = next((p for p in inner if isinstance(p, KEPayload)), None)
        prop = sap.proposals[0]
        gspi = self.next_spi()
        chosen = Proposal(prop.num, ProtocolId.ESP, struct.pack("!I", gspi),
                          _first_of_each(prop, ke.group if ke else None))
        suite = select_esp(SAPayload([chosen]), sap.proposals, dh_group=ke.group if ke else None)
        shared, out_ke = b"", []
        if ke:
            dh = DhExchange(ke.group)
            shared = dh.shared_secret(ke.data)
            out_ke = [KEPayload(ke.group, dh.public)]
        nr = self.nonce()
        keys = derive_child_keys(sa["suite"].prf, sa["keys"].sk_d, suite, ni, nr, shared)
        self.esp[gspi] = dict(mn_spi=struct.unpack("!I", prop.spi)[0], keys=keys, gw_init=False, ni=ni, nr=nr)
        tsi = next(p for p in inner if isinstance(p, TSiPayload))
        tsr = next(p for p in inner if isinstance(p, TSrPayload))
        return [SAPayload([chosen]), NoncePayload(nr), *out_ke, tsi, tsr]

    def rekey_ike(self, key, sa, inner):
        if self.ike_rekey_error:
            return [NotifyPayload(self.ike_rekey_error)]
        sap = next(p for p in inner if isinstance(p, SAPayload))
        ni = next(p for p in inner if isinstance(p, NoncePayload)).data
        ke = next(p for p in inner if isinstance(p, KEPayload))
        prop = sap.proposals[0]
        new_r = os.urandom(8)
        chosen = Proposal(prop.num, ProtocolId.IKE, new_r, _first_of_each(prop, ke.group))
        suite = select_ike(SAPayload([chosen]), sap.proposals, rekey=True)
        dh = DhExchange(ke.group)
        nr = self.nonce()
        keys = derive_rekeyed_ike_keys(suite, sa["suite"].prf, sa["keys"].sk_d, ni, nr, dh.shared_secret(ke.data),
                                       prop.spi, new_r)
        new = (prop.spi, new_r)
        self.sas[new] = dict(sk=SkCipher.for_responder(keys), keys=keys, suite=suite, gw_init=False, next_mid=0,
                             last=None, peer_mid=0, ni=ni, nr=nr)
        self.cur = new
        return [SAPayload([chosen]), NoncePayload(nr), KEPayload(ke.group, dh.public)]

    # -- the gateway's own rekeys ----------------------------------------------------------------
    def start_child_rekey(self, gspi_old: int, group: int | None = None, nonce: bytes | None = None):
        old = self.esp[gspi_old]
        gspi = self.next_spi()
        ts = [Transform(TransformType.ENCR, 20, self.my_esp.transforms[0].attributes)]
        if group:
            ts.append(Transform(TransformType.DH, group))
        prop = Proposal(1, ProtocolId.ESP, struct.pack("!I", gspi), ts)
        ni = nonce or self.nonce()
        dh = DhExchange(group) if group else None
        self.pending = ("child", dict(gspi=gspi, ni=ni, dh=dh, prop=prop, old=gspi_old))
        payloads = [NotifyPayload(NotifyType.REKEY_SA, b"", ProtocolId.ESP, struct.pack("!I", gspi_old)),
                    SAPayload([prop]), NoncePayload(ni)]
        if dh:
            payloads.append(KEPayload(group, dh.public))
        from agent.ike.message import TrafficSelector
        payloads += [TSiPayload([TrafficSelector.from_network("10.10.0.0/24")]),
                     TSrPayload([TrafficSelector.from_network(f"{self.tia}/32")])]
        assert old
        return self.send(payloads, ExchangeType.CREATE_CHILD_SA)

    def start_ike_rekey(self, nonce: bytes | None = None):
        sa = self.sas[self.cur]
        new_i = os.urandom(8)
        prop = IkeProposal.parse("aes128-sha256-x25519").to_wire(1, new_i)
        ni = nonce or self.nonce()
        dh = DhExchange(31)
        self.pending = ("ike", dict(spi=new_i, ni=ni, dh=dh, offer=[prop], old=self.cur))
        assert sa
        return self.send([SAPayload([prop]), NoncePayload(ni), KEPayload(31, dh.public)], ExchangeType.CREATE_CHILD_SA)

    def on_answer(self, key, msg, inner):
        if self.pending is None or msg.exchange != ExchangeType.CREATE_CHILD_SA:
            return
        kind, ctx = self.pending
        self.pending = None
        if any(isinstance(p, NotifyPayload) and p.notify_type < 16384 for p in inner):
            self.refused = [p.notify_type for p in inner if isinstance(p, NotifyPayload)]
            return
        sap = next(p for p in inner if isinstance(p, SAPayload))
        nr = next(p for p in inner if isinstance(p, NoncePayload)).data
        ke = next((p for p in inner if isinstance(p, KEPayload)), None)
        sa = self.sas[key]
        if kind == "child":
            dh = ctx["dh"]
            suite = select_esp(sap, [ctx["prop"]], dh_group=dh.group if dh else None)
            shared = dh.shared_secret(ke.data) if dh else b""
            keys = derive_child_keys(sa["suite"].prf, sa["keys"].sk_d, suite, ctx["ni"], nr, shared)
            self.esp[ctx["gspi"]] = dict(mn_spi=struct.unpack("!I", suite.spi)[0], keys=keys, gw_init=True,
                                         ni=ctx["ni"], nr=nr)
        else:
            suite = select_ike(sap, ctx["offer"], rekey=True)
            keys = derive_rekeyed_ike_keys(suite, sa["suite"].prf, sa["keys"].sk_d, ctx["ni"], nr,
                                           ctx["dh"].shared_secret(ke.data), ctx["spi"], suite.spi)
            new = (ctx["spi"], suite.spi)
            self.sas[new] = dict(sk=SkCipher.for_initiator(keys), keys=keys, suite=suite, gw_init=True, next_mid=0,
                                 last=None, peer_mid=0, ni=ctx["ni"], nr=nr)
            self.cur = new


class Net:
    """Datagrams between the connection and the gateway, with loss and time."""

    def __init__(self, gw: Gateway | None = None, rng=None, **cfg):
        from agent.ike import IkeConnection
        self.gw = gw or Gateway()
        self.now = 100.0
        kw = {"rng": rng} if rng else {}
        self.conn = IkeConnection(make_config(**cfg), MN, GW, name="t", **kw)
        self.sent: list = []
        self.evs: list = []

    def pump(self):
        for _ in range(100):
            out = self.conn.datagrams_to_send(self.now)
            if not out:
                break
            for data, local, remote in out:
                self.sent.append((data, local, remote))
                for rdata, rsrc, rdst in self.gw.handle(data, local, remote):
                    self.conn.receive_datagram(rdata, rsrc, rdst, self.now)
        while (e := self.conn.next_event()) is not None:
            self.evs.append(e)

    def deliver(self, items):
        for rdata, rsrc, rdst in items:
            self.conn.receive_datagram(rdata, rsrc, rdst, self.now)
        self.pump()

    def inject(self, data, src=None):
        self.conn.receive_datagram(data, src or self.conn.path.remote, self.conn.path.local, self.now)
        self.pump()

    def advance(self, dt):
        end = self.now + dt
        while True:
            t = self.conn.get_timer()
            if t is None or t > end:
                break
            self.now = max(self.now, t)
            self.conn.handle_timer(self.now)
            self.pump()
        self.now = end
        self.pump()

    def move(self, addr):
        self.conn.update_addresses(addr, self.now)
        self.pump()

    def take(self, cls=None):
        out = [e for e in self.evs if cls is None or isinstance(e, cls)]
        self.evs = [e for e in self.evs if not (cls is None or isinstance(e, cls))]
        return out


def up(gw_kw=None, rng=None, **cfg) -> tuple[Net, ChildSaEstablished]:
    n = Net(Gateway(**(gw_kw or {})), rng=rng, **cfg)
    n.conn.connect(n.now)
    n.pump()
    assert n.conn.state is State.ESTABLISHED, n.evs
    child = n.take(ChildSaEstablished)[0]
    n.take()
    return n, child


def check_child_keys(n: Net, ev: ChildSaEstablished):
    """The gateway derived the same ESP keys for the SA pair we report."""
    g = next(c for s, c in n.gw.esp.items() if s == ev.outbound.spi)
    assert g["mn_spi"] == ev.inbound.spi
    k = g["keys"]
    gw_out = (k.encr_i2r if g["gw_init"] else k.encr_r2i)      # gateway -> MN
    mn_out = (k.encr_r2i if g["gw_init"] else k.encr_i2r)
    assert ev.inbound.encr_key == gw_out and ev.outbound.encr_key == mn_out


# ------------------------------------------------------------------------------ MOBIKE

def test_mobike_update_same_spis_no_nat():
    n, child = up()
    n.move(NEW)
    started = n.take(MobikeStarted)
    assert started and started[0].new_local == NEW and started[0].old_local == (MN[0], 4500)
    (upd,) = n.take(AddressUpdated)
    assert upd.local_addr == NEW and upd.remote_addr == (GW[0], 4500)
    assert not upd.encap and not upd.nat_local and not upd.probed and upd.started == started[0].time
    src, dst, notes = n.gw.updates[0]
    assert src == NEW and dst == (GW[0], 4500)
    assert {NotifyType.UPDATE_SA_ADDRESSES, NotifyType.COOKIE2, NotifyType.NO_ADDITIONAL_ADDRESSES,
            NotifyType.NAT_DETECTION_SOURCE_IP, NotifyType.NAT_DETECTION_DESTINATION_IP} == set(notes)
    # no rekey: the CHILD SA is the same
    assert list(n.conn.children) == [child.child_id] and n.conn.last_update == n.now
    assert n.conn.path.local == NEW and n.conn.stats["mobike_updates"] == 1
    # everything afterwards leaves from the new address
    n.conn.liveness_check(n.now)
    n.pump()
    assert n.sent[-1][1:] == (NEW, (GW[0], 4500)) and n.take(LivenessChecked)


def test_mobike_into_and_out_of_a_nat_switches_encapsulation_and_keepalives():
    n, child = up(keepalive_interval=20.0)
    assert not child.encap
    n.gw.nat_mn = True
    n.move(("172.16.9.2", 4500))
    (upd,) = n.take(AddressUpdated)
    assert upd.nat_local and upd.encap
    n.sent.clear()
    n.advance(20.0)
    assert [d for d, _, _ in n.sent] == [b"\xff"] and n.sent[0][1] == ("172.16.9.2", 4500)
    n.gw.nat_mn = False
    n.move(NEW)
    (upd,) = n.take(AddressUpdated)
    assert not upd.nat_local and not upd.encap
    n.sent.clear()
    n.advance(40.0)
    assert b"\xff" not in [d for d, _, _ in n.sent]


def test_mobike_announces_only_configured_additional_addresses():
    n, _ = up(additional_addresses=["203.0.113.7"])
    auth_notes = {p.notify_type: p.data for p in n.gw.inner[0] if isinstance(p, NotifyPayload)}
    assert auth_notes[NotifyType.ADDITIONAL_IP4_ADDRESS] == bytes([203, 0, 113, 7])
    assert NotifyType.NO_ADDITIONAL_ADDRESSES not in auth_notes
    n.move(NEW)
    notes = n.gw.infos[-1]
    assert [p.data for p in notes if isinstance(p, NotifyPayload)
            and p.notify_type == NotifyType.ADDITIONAL_IP4_ADDRESS] == [bytes([203, 0, 113, 7])]


def test_mobike_cookie2_not_echoed_closes_the_ike_sa():
    n, _ = up()
    n.gw.cookie2 = "wrong"
    n.move(NEW)
    (f,) = n.take(MobikeFailed)
    assert "COOKIE2" in f.reason and n.conn.state is State.CLOSED
    assert n.take(IkeSaDeleted)[0].by == "error" and n.conn.stats["cookie2_mismatch"] == 1


def test_mobike_refused_unexpected_nat():
    n, _ = up(no_nats_allowed=True)
    n.gw.update_error = NotifyType.UNEXPECTED_NAT_DETECTED
    n.move(NEW)
    (f,) = n.take(MobikeFailed)
    assert f.notify == NotifyType.UNEXPECTED_NAT_DETECTED and "UNEXPECTED_NAT_DETECTED" in f.reason
    req = n.gw.infos[-1]
    nn = next(p for p in req if isinstance(p, NotifyPayload) and p.notify_type == NotifyType.NO_NATS_ALLOWED)
    assert nn.data == bytes([198, 51, 100, 50, 192, 0, 2, 1]) + struct.pack("!HH", 4500, 4500)


def test_no_nats_allowed_refuses_a_nat_on_the_new_path():
    n, _ = up(no_nats_allowed=True)
    n.gw.nat_mn = True
    n.move(NEW)
    (f,) = n.take(MobikeFailed)
    assert "NAT" in f.reason and n.conn.state is State.CLOSED


def test_peer_no_nats_allowed_checked():
    n, _ = up()
    ok = NotifyPayload(NotifyType.NO_NATS_ALLOWED, bytes([192, 0, 2, 1, 192, 0, 2, 50]) + struct.pack("!HH", 4500, 4500))
    n.sent.clear()
    n.inject(n.gw.send([ok]))
    key = n.gw.cur
    reply = n.gw.sas[key]["sk"].open(decode_message(n.sent[-1][0][4:]))
    assert reply == []
    bad = NotifyPayload(NotifyType.NO_NATS_ALLOWED, bytes([192, 0, 2, 1, 10, 0, 0, 1]) + struct.pack("!HH", 4500, 4500))
    n.inject(n.gw.send([bad]))
    reply = n.gw.sas[key]["sk"].open(decode_message(n.sent[-1][0][4:]))
    assert reply == [NotifyPayload(NotifyType.UNEXPECTED_NAT_DETECTED)]
    assert n.conn.state is State.ESTABLISHED and n.conn.stats["unexpected_nat"] == 1


def test_mobike_path_probing_finds_the_gateways_other_address():
    n, _ = up(retransmit_timeout=1.0, mobike_probe_after=2, probe_timeout=0.3)
    n.inject(n.gw.send([NotifyPayload(NotifyType.ADDITIONAL_IP4_ADDRESS, bytes([192, 0, 2, 2]))]))
    assert n.conn.peer_addresses == [GW2]
    n.gw.addresses = {GW2}                  # the old gateway address is gone from the new path
    n.move(NEW)
    n.advance(1.0)
    n.advance(2.0)                           # second retransmission, still to 192.0.2.1
    assert not n.take(AddressUpdated)
    n.advance(4.0)                           # now probing
    ups = n.take(AddressUpdated)
    assert ups[0].probed and ups[0].remote_addr == (GW2, 4500)
    assert n.conn.path.remote == (GW2, 4500) and n.conn.stats["path_probes"] >= 1
    # a second update with NAT-D for the path that works
    assert len(n.gw.updates) == 2 and n.gw.updates[1][1] == (GW2, 4500)
    assert not ups[-1].nat_remote and not ups[-1].encap


def test_mobike_no_answer_anywhere_loses_the_sa():
    n, _ = up(retransmit_timeout=0.5, retransmit_tries=2)
    n.gw.addresses = set()
    n.move(NEW)
    n.advance(10)
    (f,) = n.take(MobikeFailed)
    assert "no answer" in f.reason
    d = n.take(IkeSaDeleted)
    assert d and d[0].by == "timeout" and n.conn.state is State.CLOSED


def test_second_move_while_updating_sends_another_update():
    n, _ = up()
    n.gw.addresses = set()                  # the first update goes unanswered for now
    n.move(NEW)
    n.move(("203.0.113.9", 4500))
    n.gw.addresses = {GW[0]}
    n.advance(1.0)
    ups = n.take(AddressUpdated)
    assert [u.local_addr for u in ups][-1] == ("203.0.113.9", 4500)
    assert n.gw.updates[-1][0] == ("203.0.113.9", 4500)
    # the NAT-D of the last update matches its path: no NAT
    assert not ups[-1].nat_local and not ups[-1].nat_remote


def test_update_needs_mobike():
    n, _ = up(mobike=False, gw_kw=dict(mobike=False))
    with pytest.raises(RuntimeError):
        n.conn.update_addresses(NEW, n.now)


# ------------------------------------------------------------------------------ liveness

def test_dpd_after_idle_interval_and_timeout():
    n, _ = up(dpd_interval=10.0, retransmit_timeout=1.0, retransmit_tries=2)
    assert n.conn.get_timer() == n.now + 10.0
    n.advance(10.0)
    (ok,) = n.take(LivenessChecked)
    assert n.gw.infos[-1] == [] and n.conn.stats["dpd_sent"] == 1
    # the gateway restarts: nothing answers any more
    n.gw.sas.clear()
    n.advance(10.0 + 1 + 2 + 4 + 0.1)
    evs = n.take()
    assert isinstance(evs[0], IkeFailed) and "stopped answering" in evs[0].reason
    assert isinstance(evs[-1], IkeSaDeleted) and evs[-1].by == "timeout"
    assert any(isinstance(e, ChildSaDeleted) for e in evs) and n.conn.state is State.CLOSED


def test_traffic_and_peer_requests_count_as_liveness():
    n, _ = up(dpd_interval=10.0)
    n.advance(6.0)
    n.conn.note_traffic(n.now)
    n.advance(6.0)
    assert not n.take(LivenessChecked)
    n.inject(n.gw.send([]))
    n.advance(9.0)
    assert not n.take(LivenessChecked)
    n.advance(1.5)
    assert n.take(LivenessChecked)


# ------------------------------------------------------------------------------ CHILD SA rekey

def test_our_child_rekey_then_delete_old():
    n, child = up()
    n.conn.rekey_child(child.child_id, n.now)
    n.pump()
    (new,) = n.take(ChildSaEstablished)
    assert new.rekey_of == child.child_id and new.child_id != child.child_id
    assert new.tia == child.tia and new.local_ts == child.local_ts and new.remote_ts == child.remote_ts
    check_child_keys(n, new)
    req = n.gw.inner[-2]
    rk = next(p for p in req if isinstance(p, NotifyPayload) and p.notify_type == NotifyType.REKEY_SA)
    assert rk.protocol == ProtocolId.ESP and rk.spi == struct.pack("!I", child.child_id)
    (gone,) = n.take(ChildSaDeleted)
    assert gone.child_id == child.child_id and gone.by == "rekey"
    assert list(n.conn.children) == [new.child_id] and list(n.gw.esp) == [new.outbound.spi]


def test_child_rekey_timer_and_pfs():
    n, child = up(child_rekey_time=100.0, rekey_jitter=0.0, esp_proposals=["aes128gcm16-x25519"])
    n.advance(99.0)
    assert not n.take(ChildSaEstablished)
    n.advance(1.0)
    (new,) = n.take(ChildSaEstablished)
    assert new.rekey_of == child.child_id
    assert any(isinstance(p, KEPayload) and p.group == 31 for p in n.gw.inner[-2])
    check_child_keys(n, new)
    n.advance(100.0)
    assert n.take(ChildSaEstablished)[0].rekey_of == new.child_id


def test_child_rekey_temporary_failure_retried_later():
    n, child = up(rekey_retry=5.0)
    n.gw.child_error = NotifyType.TEMPORARY_FAILURE
    n.conn.rekey_child(child.child_id, n.now)
    n.pump()
    assert not n.take(ChildSaEstablished) and n.conn.stats["child_rekey_refused"] == 1
    n.gw.child_error = None
    n.advance(5.0)
    assert n.take(ChildSaEstablished)[0].rekey_of == child.child_id


@pytest.mark.parametrize("group", [None, 19])
def test_gateway_child_rekey_answered(group):
    n, child = up()
    gspi_old = child.outbound.spi
    n.sent.clear()
    n.inject(n.gw.start_child_rekey(gspi_old, group))
    (new,) = n.take(ChildSaEstablished)
    assert new.rekey_of == child.child_id and new.outbound.spi != gspi_old
    check_child_keys(n, new)
    ans = n.gw.answers[-1][2]
    assert any(isinstance(p, TSiPayload) for p in ans) and (group is None) == (not any(isinstance(p, KEPayload) for p in ans))
    # the gateway deletes the old SA
    n.inject(n.gw.send([DeletePayload(ProtocolId.ESP, [struct.pack("!I", gspi_old)])]))
    (gone,) = n.take(ChildSaDeleted)
    assert gone.child_id == child.child_id and gone.by == "peer"
    assert list(n.conn.children) == [new.child_id]


def test_gateway_child_rekey_of_unknown_sa_and_bad_proposal():
    n, child = up()
    n.inject(n.gw.send([NotifyPayload(NotifyType.REKEY_SA, b"", ProtocolId.ESP, b"\x00\x00\x00\x09"),
                        SAPayload([Proposal(1, 3, b"\x01\x02\x03\x04", [Transform(1, 20, n.gw.my_esp.transforms[0].attributes)])]),
                        NoncePayload(b"n" * 32), TSiPayload([]), TSrPayload([])], ExchangeType.CREATE_CHILD_SA))
    key = n.gw.cur
    reply = n.gw.sas[key]["sk"].open(decode_message(n.sent[-1][0][4:]))
    assert reply[0].notify_type == NotifyType.CHILD_SA_NOT_FOUND
    # 3DES is not something we accept
    n.inject(n.gw.send([NotifyPayload(NotifyType.REKEY_SA, b"", ProtocolId.ESP, struct.pack("!I", child.outbound.spi)),
                        SAPayload([Proposal(1, 3, b"\x01\x02\x03\x04", [Transform(1, 3), Transform(3, 2)])]),
                        NoncePayload(b"n" * 32), TSiPayload([]), TSrPayload([])], ExchangeType.CREATE_CHILD_SA))
    reply = n.gw.sas[key]["sk"].open(decode_message(n.sent[-1][0][4:]))
    assert reply == [NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN)]
    assert list(n.conn.children) == [child.child_id]


class Nonces:
    """Our randomness, with nonces we can rank: 0x80... unless ``low`` is
    set, then the next nonce is 0x01... (once)."""

    def __init__(self):
        self.low = False

    def __call__(self, k: int) -> bytes:
        b = os.urandom(k)
        if k != 32:
            return b
        first, self.low = (0x01 if self.low else 0x80), False
        return bytes([first]) + b[1:]


@pytest.mark.parametrize("ours_lowest", [True, False])
def test_child_rekey_collision_lowest_nonce(ours_lowest):
    """Both rekey the same CHILD SA at once (RFC 7296 2.8.1): the SA made with
    the lowest of the four nonces is deleted by whoever made it."""
    rng = Nonces()
    n, child = up(rng=rng)
    n.gw.nonce_byte = b"\x90"
    rng.low = ours_lowest
    n.gw.hold = True                          # our rekey request waits at the gateway
    n.conn.rekey_child(child.child_id, n.now)
    n.pump()
    theirs_ni = b"\x90" * 32 if ours_lowest else b"\x00" * 32
    n.inject(n.gw.start_child_rekey(child.outbound.spi, nonce=theirs_ni))   # the gateway's rekey of the same SA
    (theirs,) = n.take(ChildSaEstablished)
    assert theirs.rekey_of == child.child_id
    n.deliver(n.gw.release())                   # now our answer arrives
    evs = n.take()
    if ours_lowest:
        # ours is redundant: not installed, deleted at the gateway; the old one is the gateway's to delete
        assert not [e for e in evs if isinstance(e, ChildSaEstablished)]
        assert n.conn.stats["rekey_collisions_lost"] == 1
        dels = [p for p in n.gw.infos[-1] if isinstance(p, DeletePayload)]
        assert dels and dels[0].spis != [struct.pack("!I", child.child_id)]
        assert set(n.conn.children) == {child.child_id, theirs.child_id}
    else:
        (ours,) = [e for e in evs if isinstance(e, ChildSaEstablished)]
        assert n.conn.stats["rekey_collisions_won"] == 1
        gone = [e for e in evs if isinstance(e, ChildSaDeleted)]
        assert [g.child_id for g in gone] == [child.child_id]      # we delete the old one
        assert set(n.conn.children) == {theirs.child_id, ours.child_id}   # the gateway deletes its redundant one


# ------------------------------------------------------------------------------ IKE SA rekey

def test_our_ike_rekey_moves_everything_to_the_new_sa():
    n, child = up()
    old = (n.conn.spi_i, n.conn.spi_r)
    n.conn.rekey_ike(n.now)
    n.pump()
    (rk,) = n.take(IkeSaRekeyed)
    assert rk.by == "local" and (rk.old_spi_i, rk.old_spi_r) == old
    assert n.conn.spi_i == rk.spi_i != old[0] and n.conn.initiator
    assert n.gw.cur == (rk.spi_i, rk.spi_r)
    # the old SA was deleted on the old SA, and the delete was acknowledged
    assert n.gw.deleted_sas == [old] and not n.conn._retired
    assert list(n.conn.children) == [child.child_id]
    # the new SA works: a liveness check (message ID 0) and a CHILD SA rekey with the new SK_d
    n.conn.liveness_check(n.now)
    n.pump()
    assert n.take(LivenessChecked) and n.gw.seen[-1].message_id == 0
    n.conn.rekey_child(child.child_id, n.now)
    n.pump()
    check_child_keys(n, n.take(ChildSaEstablished)[0])


def test_ike_rekey_timer():
    n, _ = up(ike_rekey_time=1000.0, rekey_jitter=0.0)
    n.advance(999.0)
    assert not n.take(IkeSaRekeyed)
    n.advance(1.0)
    assert n.take(IkeSaRekeyed)
    n.advance(1000.0)
    assert len(n.take(IkeSaRekeyed)) == 1


def test_gateway_ike_rekey_we_become_responder():
    n, child = up()
    old = n.gw.cur
    n.inject(n.gw.start_ike_rekey())
    (rk,) = n.take(IkeSaRekeyed)
    assert rk.by == "peer" and (n.conn.spi_i, n.conn.spi_r) == n.gw.cur != old
    assert not n.conn.initiator                   # the gateway initiated the new IKE SA
    # the gateway deletes the old IKE SA on it: we answer there
    n.sent.clear()
    n.inject(n.gw.send([DeletePayload(ProtocolId.IKE)], key=old))
    m = decode_message(n.sent[-1][0][4:])
    assert (m.spi_i, m.spi_r) == old and m.response and n.conn.state is State.ESTABLISHED
    # our requests now carry no I flag, and MOBIKE still works
    n.move(NEW)
    (upd,) = n.take(AddressUpdated)
    assert upd.local_addr == NEW and n.gw.updates[-1][0] == NEW
    n.conn.rekey_child(child.child_id, n.now)
    n.pump()
    check_child_keys(n, n.take(ChildSaEstablished)[0])


def test_request_in_flight_during_gateway_ike_rekey_finishes_on_the_old_sa():
    n, _ = up()
    old = n.gw.cur
    n.gw.addresses = set()
    n.conn.liveness_check(n.now)
    n.pump()                                      # our DPD (old SA) is lost for now
    n.gw.addresses = {GW[0]}
    n.inject(n.gw.start_ike_rekey())
    assert n.take(IkeSaRekeyed)
    n.advance(1.0)                                # retransmission on the old SA gets its answer there
    assert n.take(LivenessChecked) and n.conn.state is State.ESTABLISHED
    assert n.gw.seen[-1].spi_i == old[0]


def test_ike_rekey_collision_lowest_nonce_wins():
    n, child = up(rng=Nonces())
    n.gw.nonce_byte = b"\x90"                      # its answer to ours: not low; its own request: lowest
    n.gw.hold = True
    n.conn.rekey_ike(n.now)
    n.pump()
    old = n.gw.cur
    n.inject(n.gw.start_ike_rekey(nonce=b"\x00" * 32))
    theirs = n.gw.cur
    assert not n.take(IkeSaRekeyed)               # settled when our answer arrives
    n.deliver(n.gw.release())
    (rk,) = n.take(IkeSaRekeyed)
    assert rk.by == "local" and n.conn.stats["rekey_collisions_won"] == 1
    assert (n.conn.spi_i, n.conn.spi_r) not in (old, theirs) and n.conn.initiator
    assert old in n.gw.deleted_sas                # we delete the old SA; the gateway deletes its own new one
    n.inject(n.gw.send([DeletePayload(ProtocolId.IKE)], key=theirs))
    assert n.conn.state is State.ESTABLISHED


def test_ike_rekey_refused_while_we_rekey_a_child():
    n, child = up()
    n.gw.hold = True
    n.conn.rekey_child(child.child_id, n.now)
    n.pump()
    n.inject(n.gw.start_ike_rekey())
    assert n.gw.refused == [NotifyType.TEMPORARY_FAILURE]
    assert not n.take(IkeSaRekeyed)
