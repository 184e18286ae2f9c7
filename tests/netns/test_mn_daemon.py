"""The mobile node daemon in the testbed (real i-HA, i-FA, dnsmasq, firewall): trust verdicts,
the gate closed during detection and open after, FA only on trusted links, status JSON.

The host has no ipip, so the agent runs with ``datapath = "none"`` (signalling only); the
kernel tier runs the same transitions with the data path and traffic.
"""

import json
import re
import sys
import time

import pytest

from agent import control
from agent.testbed import Testbed
from tests.lib.names import RUN, ns_prefix
from tests.lib.procs import wait_until


@pytest.fixture(scope="module")
def tb(tmp_path_factory):
    t = Testbed(f"m{RUN}", root=tmp_path_factory.mktemp("tbm"), ns_prefix=f"{ns_prefix()}tbm-", agents="require")
    try:
        t.up(at="none")
        yield t
    finally:
        t.down()


def mn_config(tb, tmp_path, vpn: bool) -> str:
    text = open(tb.files["mn_config"]).read()
    text = text.replace("[mn]\n", '[mn]\ndatapath = "none"\nlog_level = "DEBUG"\n', 1)
    text += "\n[mn.detection]\ninitial_timeout = 0.3\nretransmissions = 1\nmax_timeout = 0.6\n"
    if not vpn:
        text = re.sub(r"\[vpn\].*?(?=\n\[|\Z)", "", text, flags=re.S)
    p = tmp_path / "mn.toml"
    p.write_text(text)
    return str(p)


def status(sock):
    return control.request(sock, "status")


def last_handover(st, trigger="link-up"):
    hs = [h for h in st["timeline"] if h["trigger"] == trigger]
    return hs[-1] if hs else None


def settled(sock, n):
    """The n-th link-up handover has finished (ready or given up)."""
    def check():
        try:
            st = status(sock)
        except control.ControlError:
            return None
        ups = [h for h in st["timeline"] if h["trigger"] == "link-up"]
        if len(ups) >= n and ups[-1]["verdict"] not in (None,) and \
                (ups[-1]["ms_ready"] is not None or ups[-1]["verdict"] in ("untrusted", "failed")):
            return st
        return None
    return check


def test_verdicts_and_modes_without_vpn(tb, procs, tmp_path):
    cfg = mn_config(tb, tmp_path, vpn=False)
    sock = re.search(r'control_socket = "([^"]+)"', open(cfg).read()).group(1)
    mn = procs.start("mn-agent", [sys.executable, "-m", "agent.cli", "mn", "--config", cfg], ns=tb.ns("mn"))
    wait_until(lambda: status(sock) if _alive(sock) else None, 30, "the agent's control socket", proc=mn)
    # the interface is gated (closed) before any link exists for it
    st = status(sock)
    assert st["gate"]["interfaces"].get(tb.mn_if) == "closed", st["gate"]

    # internal-1: trusted, no FA -> mode c
    tb.move("internal-1")
    st = wait_until(settled(sock, 1), 30, "handover to internal-1", proc=mn)
    h = last_handover(st)
    assert (h["verdict"], h["mode"]) == ("trusted", "c"), h
    assert st["mode"] == "c" and st["trusted"] is True
    assert st["binding"]["care_of_address"] == h["coa"] and st["binding"]["tnc"] is True
    assert st["gate"]["interfaces"][tb.mn_if] == "open"
    # the closed gate passed the detection request and counted drops by reason while closed
    c = st["gate"]["counters"][tb.mn_if]
    assert c["egress"]["pass"].get("mip", 0) >= 1 and c["ingress"]["pass"].get("mip", 0) >= 1, c
    assert c["egress"]["pass"].get("dhcp", 0) >= 1, c

    # internal-2: trusted, the i-FA advertises -> mode f through the FA
    tb.move("internal-2")
    st = wait_until(settled(sock, 2), 30, "handover to internal-2", proc=mn)
    h = last_handover(st)
    assert (h["verdict"], h["mode"]) == ("trusted", "f"), h
    assert st["binding"]["foreign_agent"] is not None

    # external-1: the i-HA is unreachable -> untrusted; without a VPN the link stays closed
    tb.move("external-1")
    st = wait_until(settled(sock, 3), 30, "handover to external-1", proc=mn)
    h = last_handover(st)
    assert h["verdict"] == "untrusted" and "no reply" in h["reason"], h
    assert h["mode"] is None and st["gate"]["interfaces"][tb.mn_if] == "closed"
    # never an FA care-of address on an untrusted link
    assert st["binding"] is None or st["binding"]["foreign_agent"] is None
    # ordinary traffic does not leave the closed link, and is counted
    before = st["gate"]["counters"][tb.mn_if]["egress"]["drop"].get("icmp", 0)
    assert not tb.ping("mn", tb.nets["external-1"].router, 2, 0.5)
    after = status(sock)["gate"]["counters"][tb.mn_if]["egress"]["drop"].get("icmp", 0)
    assert after - before >= 2

    # status fields the operator relies on
    for key in ("mode", "trusted", "interface", "care_of_address", "home_address", "tia", "binding", "ike",
                "gate", "timeline"):
        assert key in st
    assert all(k in h for k in ("trigger", "verdict", "mode", "reason", "ms_verdict", "ms_ready"))

    # mipmobike status prints the same
    out = tb.exec("mn", [sys.executable, "-m", "agent.cli", "status", "--socket", sock, "--json"], check=True)
    assert json.loads(out.stdout)["mode"] is None
    mn.stop()
    assert mn.popen.returncode == 0, mn.output()[-2000:]


def _alive(sock):
    try:
        control.request(sock, "status", timeout=1)
        return True
    except control.ControlError:
        return False
