"""i-HA state file (atomic, round trip), restoring the engine from it, and the data-plane
bookkeeping per binding (with a recording fake kernel and the signalling-only backend)."""

from __future__ import annotations

import json
import os
from ipaddress import IPv4Address

import pytest

from agent.ha.dataplane import HaDataPlane
from agent.ha.restore import all_bindings, identifications, restore
from agent.ha.state import StateError, StateFile
from agent.kernel.tunnels import NullBackend
from agent.mip import HaConfig, HaNode, HomeAgent, MnConfig, MobileNode, SecurityAssociation
from agent.mip.constants import ReplyCode
from agent.mip.ha import BindingAdded, BindingRemoved, BindingUpdated

T0 = 1_800_000_000.0
HA = IPv4Address("10.1.0.2")
HOA = IPv4Address("10.1.0.100")
HOA2 = IPv4Address("10.1.0.101")
COA1, COA2 = IPv4Address("192.0.2.10"), IPv4Address("198.51.100.10")
KEY = bytes(range(16))


def _sa():
    return SecurityAssociation(256, KEY)


def _ha() -> HomeAgent:
    return HomeAgent(HaConfig(HA, [HaNode(HOA, _sa(), nai="mn1@x"), HaNode(HOA2, _sa())],
                              trusted_prefixes=["192.0.2.0/24"]))


def _register(ha, hoa, coa, now, lifetime=600, udp=False, src=None):
    mn = MobileNode(MnConfig(hoa, HA, _sa(), lifetime=lifetime, udp_tunnel=udp))
    mn.register(now, coa)
    (d,) = mn.datagrams_to_send()
    ha.receive_datagram(d.data, src or coa, 434, HA, now)
    out = ha.datagrams_to_send()
    mn.receive_datagram(out[0].data, HA, 434, coa, now)
    return d, mn.next_event()


def _events(engine):
    out = []
    while (ev := engine.next_event()) is not None:
        out.append(ev)
    return out


def test_state_round_trip_is_atomic(tmp_path):
    ha = _ha()
    _register(ha, HOA, COA1, T0)
    _register(ha, HOA2, COA2, T0, udp=True, src=IPv4Address("203.0.113.2"))
    st = StateFile(str(tmp_path / "sub" / "ha.json"))
    st.save(all_bindings(ha), identifications(ha), T0)
    assert oct(os.stat(st.path).st_mode & 0o777) == "0o600"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["ha.json"]  # no temporary left
    bindings, idents = st.load()
    assert sorted(bindings, key=lambda b: b.home_address) == sorted(all_bindings(ha), key=lambda b: b.home_address)
    assert idents == identifications(ha) and set(idents) == {HOA, HOA2}
    b2 = next(b for b in bindings if b.home_address == HOA2)
    assert b2.udp_tunnel and b2.nat_detected and b2.source_address == IPv4Address("203.0.113.2")


def test_state_missing_and_corrupt(tmp_path):
    assert StateFile(str(tmp_path / "none.json")).load() == ([], {})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(StateError, match="not JSON"):
        StateFile(str(bad)).load()
    bad.write_text(json.dumps({"version": 99}))
    with pytest.raises(StateError, match="version"):
        StateFile(str(bad)).load()
    bad.write_text(json.dumps({"version": 1, "bindings": [{"home_address": "x"}]}))
    with pytest.raises(StateError, match="bad binding"):
        StateFile(str(bad)).load()


def test_restore_keeps_live_bindings_and_replay_protection(tmp_path):
    ha = _ha()
    req, ev = _register(ha, HOA, COA1, T0, lifetime=600)
    _register(ha, HOA2, COA2, T0, lifetime=5)
    st = StateFile(str(tmp_path / "ha.json"))
    st.save(all_bindings(ha), identifications(ha), T0)

    ha2 = _ha()
    live = restore(ha2, *st.load(), now=T0 + 10)   # HOA2's 5 s binding has expired
    assert [b.home_address for b in live] == [HOA]
    evs = _events(ha2)
    assert len(evs) == 1 and isinstance(evs[0], BindingAdded) and evs[0].binding.care_of_address == COA1
    assert ha2.get_timer() == T0 + 600
    # the same request again (a replay inside the tolerance) is refused with 133
    ha2.receive_datagram(req.data, COA1, 434, HA, T0 + 11)
    (rep,) = ha2.datagrams_to_send()
    assert rep.data[1] == ReplyCode.HA_IDENTIFICATION_MISMATCH
    assert ha2.binding_for(HOA).registered_at == T0


def test_restore_skips_nodes_no_longer_configured(tmp_path):
    ha = _ha()
    _register(ha, HOA2, COA2, T0)
    ha2 = HomeAgent(HaConfig(HA, [HaNode(HOA, _sa())]))
    assert restore(ha2, all_bindings(ha), identifications(ha), T0 + 1) == []
    assert ha2.bindings == {}


def test_engine_restore_api_caps_and_never_moves_identification_back():
    """HomeAgent.restore/identifications are the engine's public calls (no reach into internals)."""
    ha = _ha()
    _register(ha, HOA, COA1, T0)
    _register(ha, HOA2, COA2, T0)
    saved_b, saved_i = all_bindings(ha), ha.identifications()
    assert set(saved_i) == {HOA, HOA2}

    capped = HomeAgent(HaConfig(HA, [HaNode(HOA, _sa()), HaNode(HOA2, _sa())], max_bindings=1))
    assert len(capped.restore(saved_b, saved_i, now=T0 + 1)) == 1          # the cache limit holds
    fresh = _ha()
    _register(fresh, HOA, COA2, T0 + 100)                                   # newer than the saved one
    newer = fresh.identifications()[HOA]
    fresh.restore([], {HOA: saved_i[HOA]})
    assert fresh.identifications()[HOA] == newer > saved_i[HOA]


class FakeKernel:
    """Records what the data plane asks for."""

    owner = "ha"

    def __init__(self):
        self.routes: dict = {}
        self.proxies: set = set()
        self.calls: list = []

    def add_route(self, dst, dev=None, **kw):
        self.routes[IPv4Address(str(dst))] = dev
        self.calls.append(("route+", str(dst), dev))

    def del_route(self, dst, dev=None, **kw):
        dst = IPv4Address(str(dst))
        if self.routes.get(dst) == dev:
            del self.routes[dst]
            return True
        return False

    def add_proxy_arp(self, a, dev):
        self.proxies.add((IPv4Address(str(a)), dev))

    def del_proxy_arp(self, a, dev):
        self.proxies.discard((IPv4Address(str(a)), dev))
        return True

    def interface_on_link(self, a):
        return "home0"

    def mac(self, dev):
        return "02:00:00:00:00:01"

    def neighbour(self, a, dev):
        return None

    def set_sysctl(self, *a):
        pass


class RecordingBackend(NullBackend):
    """The signalling-only backend, plus routes recorded in the fake kernel."""

    def route_to(self, t, host):
        super().route_to(t, host)
        self.kernel.add_route(host, dev=t.ifname)

    def unroute_to(self, t, host):
        super().unroute_to(t, host)
        self.kernel.del_route(host, dev=t.ifname)


def _apply(dp, engine):
    for ev in _events(engine):
        if isinstance(ev, BindingAdded):
            dp.added(ev.binding)
        elif isinstance(ev, BindingUpdated):
            dp.updated(ev.binding, ev.previous)
        elif isinstance(ev, BindingRemoved):
            dp.removed(ev.binding, ev.reason)


def test_dataplane_follows_bindings():
    k = FakeKernel()
    be = RecordingBackend(k)
    dp = HaDataPlane(k, be, local=HA, garp_count=0, udp_device="mip-udp")
    ha = _ha()
    _register(ha, HOA, COA1, T0)
    _register(ha, HOA2, COA1, T0)       # two nodes behind one care-of address share a tunnel
    _apply(dp, ha)
    assert len(be.tunnels) == 1 and next(iter(be.tunnels.values())).refs == 2
    t1 = be.name_for(HA, COA1)
    assert k.routes == {HOA: t1, HOA2: t1} and k.proxies == {(HOA, "home0"), (HOA2, "home0")}

    _register(ha, HOA, COA2, T0 + 1)    # HOA moves: new tunnel, the old one stays for HOA2
    _apply(dp, ha)
    assert k.routes[HOA] == be.name_for(HA, COA2) and len(be.tunnels) == 2

    # HOA2 behind a NAT: UDP tunnel device instead of a tunnel
    _register(ha, HOA2, IPv4Address("172.16.0.10"), T0 + 2, udp=True, src=IPv4Address("203.0.113.2"))
    _apply(dp, ha)
    assert k.routes[HOA2] == "mip-udp" and len(be.tunnels) == 1   # COA1's tunnel released

    ha.revoke(HOA)
    ha.revoke(HOA2)
    _apply(dp, ha)
    assert k.routes == {} and k.proxies == set() and be.tunnels == {}


def test_dataplane_close_removes_everything():
    k = FakeKernel()
    be = RecordingBackend(k)
    dp = HaDataPlane(k, be, local=HA, garp_count=0, udp_device="mip-udp")
    ha = _ha()
    _register(ha, HOA, COA1, T0)
    _apply(dp, ha)
    dp.close()
    assert k.routes == {} and k.proxies == set() and be.tunnels == {}
