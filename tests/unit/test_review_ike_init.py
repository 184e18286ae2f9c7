"""Review of the unprotected IKE_SA_INIT refusal handling (connection.py, unprotected_error_wait):
what a forged, unauthenticated IKE_SA_INIT response can still do, and how the refusal wait
interacts with COOKIE / INVALID_KE rounds, the timers, a genuine answer and an abort."""

from __future__ import annotations

import struct

import pytest

from agent.ike import IkeFailed, State
from agent.ike.const import ExchangeType, NotifyType, ProtocolId, TransformType
from agent.ike.message import KEPayload, Message, NoncePayload, NotifyPayload, Proposal, SAPayload, Transform, \
    decode_message
from tests.unit.test_ike_connection import FakeGateway, Net


def _lost_first() -> tuple[Net, bytes]:
    """A connection whose first IKE_SA_INIT never reached the gateway; its SPI_i."""
    n = Net()
    n.lost = 1
    n.connect()
    (init, _, _), = n.sent
    return n, decode_message(init).spi_i


def _forged(spi_i: bytes, payloads, spi_r: bytes = bytes(8)) -> bytes:
    return Message(spi_i, spi_r, ExchangeType.IKE_SA_INIT, 0, payloads, initiator=False, response=True).encode()


def _bad_proposal():
    # a "choice" we never offered (DES / MD5 ids that our offer does not contain)
    return SAPayload([Proposal(1, ProtocolId.IKE, b"", [Transform(TransformType.ENCR, 2),
                                                          Transform(TransformType.PRF, 1),
                                                          Transform(TransformType.INTEG, 1),
                                                          Transform(TransformType.DH, 2)])])


# Forged answers an off-path attacker who saw our SPI_i can send just as easily as a forged
# NO_PROPOSAL_CHOSEN: each must not stop the connection when the gateway's real answer follows.
FORGED = {
    "bare response": lambda spi: _forged(spi, []),
    "INVALID_KE for a group we did not offer": lambda spi: _forged(
        spi, [NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, struct.pack("!H", 2))]),
    "empty COOKIE": lambda spi: _forged(spi, [NotifyPayload(NotifyType.COOKIE, b"")]),
    "proposal we did not offer": lambda spi: _forged(
        spi, [_bad_proposal(), KEPayload(2, b"\x01" * 128), NoncePayload(b"N" * 32)], spi_r=b"\x01" * 8),
}


@pytest.mark.parametrize("kind", list(FORGED))
def test_forged_unusable_init_response_does_not_stop_the_connection(kind):
    n, spi_i = _lost_first()
    n.inject(FORGED[kind](spi_i))
    evs = n.events()
    assert not any(isinstance(e, IkeFailed) for e in evs), f"{kind}: failed at once: {evs}"
    n.advance(1.0)                              # our retransmission reaches the real gateway
    evs = n.events()
    assert n.conn.state is State.ESTABLISHED, (kind, evs)


def test_genuine_unusable_init_response_still_fails_after_the_wait():
    """A gateway that really answers with something unusable: the failure comes, with its reason."""
    class Broken(FakeGateway):
        def _ike_sa_init(self, msg, src, dst):
            self.spi_i = msg.spi_i
            return self.resp(msg, [], spi_r=bytes(8), encrypt=False)
    n = Net(Broken()).connect()
    assert n.events() == []
    for _ in range(3):
        n.advance(1.0)
    (ev,) = n.events()
    assert isinstance(ev, IkeFailed) and "lacks SA" in ev.reason
    assert n.conn.state is State.CLOSED


def test_refusal_then_genuine_cookie_then_success():
    """A forged refusal, then the gateway (under load) asks for a COOKIE: the refusal is
    forgotten with the new request and the connection comes up."""
    n = Net(FakeGateway(cookie=True))
    n.lost = 1
    n.connect()
    spi_i = decode_message(n.sent[0][0]).spi_i
    n.inject(_forged(spi_i, [NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN)]))
    n.advance(1.0)                              # retransmission -> COOKIE -> new request -> success
    assert n.conn.state is State.ESTABLISHED, n.events()


def test_refusal_timer_and_abort():
    n, spi_i = _lost_first()
    n.gw.init_error = NotifyType.NO_PROPOSAL_CHOSEN
    n.inject(_forged(spi_i, [NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN)]))
    t_refused = n.now
    assert n.conn.get_timer() <= t_refused + 2.0
    n.conn.abort(n.now)
    assert n.conn.state is State.CLOSED and n.conn.get_timer() is None
    n.conn.handle_timer(n.now + 5)              # a late timer changes nothing
    assert not any(isinstance(e, IkeFailed) for e in n.events())


def test_repeated_forged_refusals_do_not_extend_the_wait():
    n, spi_i = _lost_first()
    n.lost = 100                                # the gateway is unreachable from now on
    for _ in range(5):
        n.inject(_forged(spi_i, [NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN)]))
        n.now += 0.3
    n.now = 100.0 + 2.0
    n.conn.handle_timer(n.now)
    (ev,) = n.events()
    assert isinstance(ev, IkeFailed) and ev.notify == NotifyType.NO_PROPOSAL_CHOSEN
