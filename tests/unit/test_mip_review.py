"""Regression tests for the security review: forged input must not steer the engines."""

from agent.mip.auth import SecurityAssociation, sign
from agent.mip.ha import HaNode
from agent.mip.messages import RegistrationReply, RegistrationRequest, decode_message
from agent.mip.mn import Denied, Registered
from tests.unit.test_mip_support import COA, HA, HOA, drain_events, make_ha, make_mn, sa

T0 = 1_800_000_000.0


def _exchange(mn, ha, now):
    for d in mn.datagrams_to_send():
        ha.receive_datagram(d.data, str(COA), 434, str(HA), now)
    codes = []
    for d in ha.datagrams_to_send():
        codes.append(decode_message(d.data).code)
        mn.receive_datagram(d.data, str(HA), 434, str(COA), now)
    return codes


def test_forged_request_does_not_move_the_ha_nonce():
    """Nonce mode: a forged request gets 131 but must not change the nonce the genuine node
    learnt, or every genuine registration after a forged one would need a 133 round."""
    ha = make_ha(nodes=[HaNode(HOA, sa(replay="nonce"))])
    mn = make_mn(sa=sa(replay="nonce"))
    mn.register(T0, COA)
    codes = _exchange(mn, ha, T0)
    if codes == [133]:                       # first contact: learn the HA's nonce
        codes = _exchange(mn, ha, T0)
    assert codes == [0] and any(isinstance(e, Registered) for e in drain_events(mn))
    forged = sign(RegistrationRequest(0x22, 600, HOA, HA, COA, 0x1234, ()), SecurityAssociation(256, b"x" * 16))
    ha.receive_datagram(forged.encode(), "203.0.113.9", 434, str(HA), T0 + 5)
    assert [decode_message(d.data).code for d in ha.datagrams_to_send()] == [131]
    mn.register(T0 + 6, COA)
    assert _exchange(mn, ha, T0 + 6) == [0]


def test_fa_code_without_a_foreign_agent_is_dropped():
    mn = make_mn()
    mn.register(T0, COA)                       # co-located: no FA involved
    (req,) = mn.datagrams_to_send()
    ident = decode_message(req.data).identification
    mn.receive_datagram(RegistrationReply(65, 0, HOA, HA, ident).encode(), "198.51.100.66", 434, str(COA), T0)
    assert mn.counters["fa_code_without_fa"] == 1 and mn.pending
    assert not any(isinstance(e, Denied) for e in drain_events(mn))
