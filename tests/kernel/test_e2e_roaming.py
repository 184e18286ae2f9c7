"""End to end, with the kernel data path (ipip, ESP): every RFC 5266 section 3.4 transition of the
mobile node agent in the Figure-1 testbed, with traffic between the home address and the correspondent.

One testbed and one agent for the module (a testbed and an agent start cost ~45 s under TCG); the
tests run in file order and each first puts the node where it needs it (``ensure``), so one can also
run alone. Throughout, a UDP echo (20/s) and one TCP connection run from the home address to the
correspondent (agent.demo.flow). After each move every test checks that

* the handover reached the expected verdict and mode,
* the traffic flowed again, the TCP connection never broke, and the correspondent only ever saw the
  home address (the same UDP source, the same single TCP connection),
* the node sent nothing but detection traffic on its access link until the new mode's data path was
  ready (a capture on the switch side of its link; agent.demo.capture says what counts as detection).

The mode-mc tests need the VPN client (agent/mn/vpn.py); a build without it xfails them (strictly).
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest

from agent.demo.capture import detection_kind
from agent.demo.roam import Roamer, vpn_available
from agent.testbed import Testbed
from tests.lib.names import RUN, ns_prefix

needs_vpn = pytest.mark.xfail(not vpn_available(), strict=True,
                              reason="mode mc needs the mobile node's VPN client (agent/mn/vpn.py), not in this build")

RECOVERY = 60          # s for the traffic to flow again after a handover (TCP back-off included)


@pytest.fixture(scope="module")
def roam(tmp_path_factory):
    tb = Testbed(f"e{RUN}", root=tmp_path_factory.mktemp("tbe2e"), ns_prefix=f"{ns_prefix()}e2e-",
                 agents="require")
    r = None
    try:
        tb.up(at="none")
        r = Roamer(tb)
        # TCG: registrations through the FA take longer than 0.5 s; DPD often enough to see a gateway restart
        r.start_agent(initial_timeout=1.0, retransmissions=2, max_timeout=2.0, vpn={"dpd_interval": 5})
        step = r.move("internal-1")
        assert (step.verdict, step.mode) == ("trusted", "c"), (step.handover, r.agent_log())
        r.start_flow()
        r.start_capture()
        yield r
    finally:
        try:
            if r is not None:
                r.stop()
        finally:
            tb.down()


# -- helpers ------------------------------------------------------------------------------------------
def _fail(r: Roamer, msg: str) -> str:
    return f"{msg}\n--- agent log (tail) ---\n{r.agent_log(3000)}"


def check_flow(r: Roamer, step=None) -> None:
    hoa = r.tb.addr.home_address
    if step is not None:
        assert step.t_recovered is not None, _fail(r, f"the traffic did not flow again within {RECOVERY} s of the "
                                                       f"handover to {step.dst}: {step.flow}")
    s = r.flow.summary()
    assert s["tcp_error"] is None and s["tcp_closed_by_peer"] == 0, _fail(r, f"the TCP stream broke: {s}")
    assert s["udp_sources"] == [hoa], f"the correspondent saw echo requests from {s['udp_sources']}, not only {hoa}"
    assert len(s["tcp_peers"]) == 1 and s["tcp_peers"][0].startswith(hoa + ":"), s["tcp_peers"]


def check_detection_only(r: Roamer, step) -> None:
    assert step.leaks is not None, "the access link was not checked"
    assert not step.leaks, (f"before the handover to {step.dst} was ready the node sent "
                            f"{len(step.leaks)} frames that are not detection traffic:\n" + "\n".join(step.leaks[:20]))


def go(r: Roamer, net: str, verdict: str | None = None, mode: str | None = None, count_ha: bool = False,
       outcomes: set[tuple[str, str]] | None = None):
    """Move to ``net``, wait for the handover and the traffic; check verdict and mode (or that the pair is one
    of ``outcomes``), flow and capture."""
    step = r.move(net, count_ha=count_ha)
    assert step.handover is not None, _fail(r, f"no handover to {net} seen")
    r.settle(step, timeout=RECOVERY if step.mode is not None else 0)
    assert (step.verdict, step.mode) in (outcomes or {(verdict, mode)}), \
        _fail(r, f"handover to {net}: {step.handover}")
    check_flow(r, step)
    check_detection_only(r, step)
    return step


def check_flows_before_verdict(r: Roamer, step) -> None:
    """A MOBIKE-only move is ready once the gateway took the update, long before the (untrusted) verdict
    opens the gate: the echo must come back through the still closed gate, i.e. ESP and what the SA
    decrypted pass it, in both directions."""
    h = step.handover
    echo = r.flow.first_echo(h["t_ready"])
    assert echo is not None and echo < h["t_verdict"], _fail(
        r, f"after the MOBIKE-only move to {step.dst} the first echo came back at "
           f"{None if echo is None else round((echo - h['t_ready']) * 1000)} ms after ready, the verdict "
           f"(gate open) at {round((h['t_verdict'] - h['t_ready']) * 1000)} ms: the closed gate held the traffic")


def ensure(r: Roamer, net: str, mode: str) -> None:
    """Put the node on ``net`` in ``mode`` unless it is there already (a precondition, not under test)."""
    st = r.status()
    if r.tb.attached == net and st["mode"] == mode:
        return
    step = r.move(net)
    r.settle(step, timeout=RECOVERY if step.mode is not None else 0)
    assert step.mode == mode, _fail(r, f"precondition: node on {net} in mode {mode}, got {step.handover}")
    check_flow(r, step)


def ha_binding(r: Roamer) -> dict | None:
    bs = [b for b in r.ha_status()["bindings"] if b["home_address"] == r.tb.addr.home_address]
    return bs[0] if bs else None


def gateway_sas(r: Roamer, want: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        sas = r.tb.gateway().list_sas()
        if want in sas or time.monotonic() > deadline:
            return sas
        time.sleep(0.5)


# -- trusted transitions ---------------------------------------------------------------------------------
def test_c_to_c_new_dhcp_address(roam):
    """internal-1 -> internal-1 with another lease: a new co-located care-of address, same home address."""
    r, tb = roam, roam.tb
    ensure(r, "internal-1", "c")
    old = r.status()["care_of_address"]
    # dnsmasq gives the node's MAC the same address again unless it is taken: lease it to someone else
    d = tb.daemons["dnsmasq-internal-1"]
    tb.stop("dnsmasq-internal-1")
    leases = Path(d.extra["lease_file"])
    lines = leases.read_text().splitlines() if leases.exists() else []
    kept = [line for line in lines if line.split()[2:3] != [old]]
    kept.append(f"{int(time.time()) + 3600} 02:00:00:00:0e:2e {old} other *")
    leases.write_text("\n".join(kept) + "\n")
    tb.restart("dnsmasq-internal-1")

    step = go(r, "internal-1", "trusted", "c")
    new = step.handover["coa"]
    assert new != old and ipaddress.IPv4Address(new) in ipaddress.IPv4Network(tb.nets["internal-1"].prefix)
    b = ha_binding(r)
    assert b is not None and b["care_of_address"] == new and b["foreign_agent"] is None, b


def test_c_to_f(roam):
    r = roam
    ensure(r, "internal-1", "c")
    step = go(r, "internal-2", "trusted", "f")
    b = ha_binding(r)
    assert b is not None and b["foreign_agent"] == r.tb.addr.fa and b["care_of_address"] == r.tb.addr.fa, b
    assert step.kinds.get("router-discovery", 0) >= 1, step.kinds       # the agent was discovered on the link


def test_f_to_c(roam):
    r = roam
    ensure(r, "internal-2", "f")
    step = go(r, "internal-1", "trusted", "c")
    b = ha_binding(r)
    assert b is not None and b["care_of_address"] == step.handover["coa"] and b["foreign_agent"] is None, b


# -- untrusted transitions (mode mc) -------------------------------------------------------------------------
@needs_vpn
def test_c_to_mc(roam):
    """external-1: the i-HA is unreachable from outside, the VPN comes up in parallel with the detection
    request, and the TIA is registered through it."""
    r, tb = roam, roam.tb
    ensure(r, "internal-1", "c")
    step = go(r, "external-1", "untrusted", "mc", count_ha=True)
    h = step.handover
    assert h["reason"].startswith("no reply from the i-HA"), h
    assert h["tia"] and ipaddress.IPv4Address(h["tia"]) in ipaddress.IPv4Network(tb.addr.pool), h
    # in parallel: IKE left before the verdict (the i-HA's silence takes every retransmission)
    ike = [ts for ts, fr in r.capture.frames()
           if step.t_attach <= ts < h["t_ready"] and detection_kind(fr, r.peers) == "ike"]
    assert ike and ike[0] < h["t_verdict"], f"the VPN was not set up in parallel with detection: {ike[:3]}, {h}"
    assert step.ha_requests[1] > step.ha_requests[0], "no registration reached the i-HA through the VPN"
    b = ha_binding(r)                   # registered from the TIA, i.e. through the VPN
    assert b is not None and b["care_of_address"] == h["tia"] and b["source"].startswith(h["tia"] + ":"), b
    assert not b["udp_tunnel"], b


@needs_vpn
def test_mc_to_mc_mobike_into_nat(roam):
    """external-1 -> external-2 (behind a NAT): MOBIKE moves the SAs to ESP-in-UDP; the TIA stays, so the
    i-HA sees no new registration."""
    r, tb = roam, roam.tb
    ensure(r, "external-1", "mc")
    tia = r.status()["tia"]
    step = go(r, "external-2", "untrusted", "mc", count_ha=True)
    assert step.handover["mobike_only"] and step.handover["tia"] == tia, step.handover
    check_flows_before_verdict(r, step)
    assert step.ha_requests[1] == step.ha_requests[0], f"the i-HA saw registrations: {step.ha_requests}"
    assert ha_binding(r)["care_of_address"] == tia
    sas = gateway_sas(r, f"@ {tb.addr.nat_public}[")
    assert f"@ {tb.addr.nat_public}[" in sas and "TUNNEL-in-UDP" in sas, sas


@needs_vpn
def test_mc_to_mc_mobike_out_of_nat(roam):
    """external-2 -> external-1: MOBIKE back to plain ESP from a public address, no new registration."""
    r = roam
    ensure(r, "external-2", "mc")
    tia = r.status()["tia"]
    step = go(r, "external-1", "untrusted", "mc", count_ha=True)
    assert step.handover["mobike_only"] and step.handover["tia"] == tia, step.handover
    check_flows_before_verdict(r, step)
    assert step.ha_requests[1] == step.ha_requests[0], f"the i-HA saw registrations: {step.ha_requests}"
    sas = gateway_sas(r, f"@ {step.handover['coa']}[")
    assert f"@ {step.handover['coa']}[" in sas, sas


@needs_vpn
def test_gateway_restart_mid_session(roam):
    """The gateway restarts (loses every SA) while the node is in mc: the VPN comes back and the flow with it."""
    r, tb = roam, roam.tb
    ensure(r, "external-1", "mc")
    t0 = time.time()
    tb.restart("charon-gw")
    got = r.flow.wait_recovered(time.time() + 1, 120)
    assert got is not None, _fail(r, f"no traffic within 120 s of the gateway restart: {r.status()['ike']}")
    st = r.status()
    assert st["mode"] == "mc" and st["ike"]["state"] != "down", st["ike"]
    assert st["ike"]["counters"]["sa_lost"] + st["ike"]["counters"]["reestablished"] >= 1 or \
        (st["ike"]["established_at"] or 0) > t0, st["ike"]
    b = ha_binding(r)
    assert b is not None and b["care_of_address"] == st["tia"], (b, st["tia"])
    check_flow(r)


@needs_vpn
def test_mc_to_c(roam):
    """Back inside: mode c, the VPN's tunnelling dropped (no IKE SA, no kernel SAs left)."""
    r, tb = roam, roam.tb
    ensure(r, "external-1", "mc")
    go(r, "internal-1", "trusted", "c")
    st = r.status()
    assert st["tia"] is None and (st["ike"] is None or st["ike"]["state"] in ("down", "idle", "closed")), st["ike"]
    states = tb.exec("mn", ["ip", "xfrm", "state"]).stdout.strip()
    assert states == "", f"kernel SAs left in the node after leaving mc:\n{states}"


# -- failures mid-session --------------------------------------------------------------------------------------
def test_home_agent_restart_mid_session(roam):
    """The i-HA restarts while the node is in mode c: it restores the binding, the flow comes back."""
    r, tb = roam, roam.tb
    ensure(r, "internal-1", "c")
    coa = r.status()["care_of_address"]
    tb.restart("i-ha")
    got = r.flow.wait_recovered(time.time() + 1, RECOVERY)
    assert got is not None, _fail(r, f"no traffic within {RECOVERY} s of the i-HA restart: {r.ha_status()}")
    b = ha_binding(r)
    assert b is not None and b["care_of_address"] == coa, b
    assert r.status()["mode"] == "c"
    check_flow(r)


def test_loss_on_access_link_mid_session(roam):
    """10 % loss both ways on the access link while the node moves internal-1 -> internal-2."""
    r, tb = roam, roam.tb
    ensure(r, "internal-1", "c")
    tb.impair(loss=10)
    try:
        # Under loss the outcome may differ and still be right: the agent solicits once (RFC 3344:
        # at most one solicitation per second) and listens 0.6 s after the lease, so a lost
        # solicitation or advertisement leaves the trusted link in mode c; if every detection
        # exchange is lost the link counts as untrusted (fail closed) and the VPN carries the traffic.
        # What must hold: a mode that fits the verdict, the traffic back, nothing but detection
        # traffic before ready (go() checks the last two).
        go(r, "internal-2", outcomes={("trusted", "f"), ("trusted", "c"), ("untrusted", "mc")})
    finally:
        tb.impair()


# -- last: a node that cannot use this link would leave the TCP stream backed off for the next test


def test_c_behind_enterprise_nat_rfc3519(roam):
    """internal-3 is trusted but behind a NAT: the i-HA answers with TNC and RFC 3519 UDP tunnelling,
    and the home address traffic runs in UDP through the NAT."""
    r, tb = roam, roam.tb
    if r.status()["mode"] not in ("c", "f"):
        ensure(r, "internal-1", "c")
    step = r.move("internal-3")
    assert (step.verdict, step.mode) == ("trusted", "c"), _fail(r, f"{step.handover}")
    b = ha_binding(r)
    assert b is not None and b["udp_tunnel"] and b["source"].startswith(tb.addr.inside_nat_public + ":"), b
    assert r.status()["binding"]["udp_tunnel"] is True
    r.settle(step, timeout=25)
    check_detection_only(r, step)
    if step.t_recovered is None:
        ha = r.ha_status()
        pytest.fail(_fail(
            r, f"no traffic within 25 s of the handover to internal-3, though the i-HA agreed to RFC 3519 UDP "
               f"tunnelling via {b['source']}: does the node's data path send and take UDP tunnel data? {step.flow}\n"
               f"i-HA: tunnel data in {ha['counters']['tunnel_data_in']}, out {ha['counters']['tunnel_data_out']}, "
               f"udp tunnel {ha['udp_tunnel']}; node: mip counters {r.status()['mip_counters']}"))
    check_flow(r, step)
