"""i-FA daemon with the i-HA on the host (BPF tunnels, no ipip here): agent
advertisements (periodic and solicited), relay both ways, visitor delivery,
reverse tunnelling through the FA, deregistration, clean shutdown."""

from __future__ import annotations

import signal

from agent.mip.icmp import AgentSolicitation
from agent.mip.mn import Deregistered, Registered
from tests.lib.capture import Capture
from tests.lib.procs import wait_until
from tests.netns.test_ha_support import (
    CN,
    FA_ADDR,
    HA_HOME,
    HOA2,
    Lab,
    MnStandIn,
    icmp_socket,
    own_links,
    own_routes,
    own_rules,
    start_daemon,
    status,
    wait_ready,
    wait_advertisement,
    write_fa_config,
    write_ha_config,
)


def test_fa_advertises_relays_and_tunnels(topology, procs, tmp_path):
    lab = Lab(topology, fa=True, mn=False)
    ha_sock, fa_sock = str(tmp_path / "ha.sock"), str(tmp_path / "fa.sock")
    ha = start_daemon(procs, "ha", write_ha_config(tmp_path, lab), lab.ha, ha_sock, wait=False)
    fa = start_daemon(procs, "fa", write_fa_config(tmp_path, lab), lab.fa, fa_sock, wait=False)
    wait_ready(ha, ha_sock)
    wait_ready(fa, fa_sock)

    # periodic advertisements reach the link; a solicitation is answered at once
    icmp = icmp_socket(lab.mnf.name, lab.mnf_if)
    try:
        got = wait_advertisement(icmp, 5)
        assert got is not None, f"no periodic advertisement: {status(fa_sock)}"
        src, adv, pkt = got
        assert str(src) == FA_ADDR and adv.is_foreign_agent and [str(a) for a in adv.care_of_addresses] == [FA_ADDR]
        assert pkt[8] == 1, "advertisements go out with TTL 1"
        before = status(fa_sock)["counters"]["solicitations"]
        icmp.sendto(AgentSolicitation().encode(), ("224.0.0.2", 0))
        got = wait_advertisement(icmp, 0.9)  # sooner than the next periodic one
        assert got is not None
        wait_until(lambda: status(fa_sock)["counters"]["solicitations"] == before + 1, 5, "solicitation counted")
    finally:
        icmp.close()

    # registration through the FA: relayed both ways, TNC (the FA's care-of address is trusted)
    mn = MnStandIn(lab.mnf.name, home_address=HOA2, home_agent=HA_HOME, spi=257, port=434)
    try:
        ev = mn.register(FA_ADDR, foreign_agent=FA_ADDR, lifetime=300)
        assert isinstance(ev, Registered), (ev, mn.events)
        assert ev.tnc and ev.binding.foreign_agent is not None
        fst = status(fa_sock)
        (v,) = fst["visitors"]
        assert v["home_address"] == HOA2 and v["home_agent"] == HA_HOME and v["lladdr"]
        assert fst["counters"]["requests_relayed"] == 1 and fst["counters"]["replies_relayed"] == 1
        (b,) = status(ha_sock)["bindings"]
        assert b["care_of_address"] == FA_ADDR and b["foreign_agent"] == FA_ADDR and b["trusted"]
        # the FA-HA security association was used both ways (Foreign-Home extensions verified)
        assert status(ha_sock)["counters"]["fa_auth_failures"] == 0 and fst["counters"]["auth_failures"] == 0

        # data both ways: HA -> FA tunnel -> link, and reverse tunnelled through the FA
        with Capture(lab.rt, lab.rt_fa, tmp_path / "fa-uplink.pcap") as cap:
            assert lab.cn.ping(HOA2, 3, 2), "CN -> visiting node"
            assert lab.mnf.ping(CN, 3, 2), "visiting node -> CN"
        pkts = [p for p in cap.packets() if p.haslayer("IP")]
        ipip = {(p["IP"].src, p["IP"].dst) for p in pkts if p["IP"].proto == 4}
        assert ipip == {(HA_HOME, FA_ADDR), (FA_ADDR, HA_HOME)}, [p.summary() for p in pkts]
        assert not [p.summary() for p in pkts if p["IP"].proto == 1], "ICMP outside the tunnel"
        assert own_rules(lab.fa, 181), "reverse-tunnel rule"

        # deregistration through the FA removes the visitor, the binding and their kernel state
        ev = mn.deregister(FA_ADDR, foreign_agent=FA_ADDR)
        assert isinstance(ev, Deregistered), (ev, mn.events)
        assert status(fa_sock)["visitors"] == [] and status(ha_sock)["bindings"] == []
        wait_until(lambda: HOA2 not in own_routes(lab.fa, 181), 5, "FA delivery route removed")
        assert own_rules(lab.fa, 181) == ""
        assert lab.fa.ip("neigh", "show", HOA2).stdout.strip() == ""
        assert HOA2 not in own_routes(lab.ha)
    finally:
        mn.close()

    # a malformed request is answered 70 only when its fixed part is readable; garbage is counted
    c0 = status(fa_sock)["counters"]["malformed"]
    mn2 = MnStandIn(lab.mnf.name, home_address=HOA2, home_agent=HA_HOME, spi=257)
    mn2.sock.sendto(b"\x01" + b"\x00" * 10, (FA_ADDR, 434))
    wait_until(lambda: status(fa_sock)["counters"]["malformed"] == c0 + 1, 5, "malformed counted")
    mn2.close()

    fa.signal(signal.SIGTERM)
    assert fa.popen.wait(15) == 0, fa.output()[-3000:]
    assert own_routes(lab.fa, 181) == "" and own_rules(lab.fa, 181) == "" and own_links(lab.fa, exclude=()) == []
    assert "mip-bpf" not in lab.fa.ip("link").stdout
