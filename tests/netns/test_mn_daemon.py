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
    text = text.replace("[mn]\n", '[mn]\ndatapath = "none"\nlog_level = "INFO"\n', 1)
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


INJECT = r"""
import sys
import scapy.layers.l2, scapy.layers.inet
from scapy.all import Ether, IP, UDP, sendp
iface, src, dst, dport, mac, hexes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6:]
for h in hexes:
    sendp(Ether(dst=mac) / IP(src=src, dst=dst) / UDP(sport=434, dport=dport) / bytes.fromhex(h),
          iface=iface, verbose=False)
"""


def _udp434(pkts, src=None, dst=None):
    out = []
    for p in pkts:
        if p.haslayer("UDP") and 434 in (p["UDP"].sport, p["UDP"].dport):
            if (src is None or p["IP"].src == src) and (dst is None or p["IP"].dst == dst):
                out.append(p)
    return out


def test_forged_and_replayed_tnc_replies_rejected(tb, procs, tmp_path):
    """On an untrusted link, a forged TNC reply (bad authenticator) and a replayed genuine
    one (old identification) arrive at the detection socket in time: both are counted and
    dropped; the verdict stays untrusted (no reply)."""
    from tests.lib.capture import Capture
    from tests.lib.topo import Netns
    cfg = mn_config(tb, tmp_path, vpn=False).replace("initial_timeout = 0.3", "initial_timeout = 1.5")
    text = open(cfg).read().replace("initial_timeout = 0.3", "initial_timeout = 1.5") \
        .replace("max_timeout = 0.6", "max_timeout = 3.0").replace("retransmissions = 1", "retransmissions = 2")
    open(cfg, "w").write(text)
    sock = re.search(r'control_socket = "([^"]+)"', text).group(1)
    sw = Netns(tb.access_port[0])
    mn = procs.start("mn-agent2", [sys.executable, "-m", "agent.cli", "mn", "--config", cfg], ns=tb.ns("mn"))
    wait_until(lambda: _alive(sock), 30, "the agent's control socket", proc=mn)
    n0 = len([h for h in status(sock)["timeline"] if h["trigger"] == "link-up"])

    # a genuine, authenticated TNC reply from a trusted link, recorded for the replay
    # (captured on the segments' bridges in the switch: the node's port is down while detached)
    with Capture(sw, tb.nets["internal-1"].bridge, tmp_path / "trusted.pcap", "udp port 434") as cap:
        tb.move("internal-1")
        st = wait_until(settled(sock, n0 + 1), 30, "handover to internal-1", proc=mn)
    assert last_handover(st)["verdict"] == "trusted"
    genuine = bytes(_udp434(cap.packets(), src=tb.addr.ha)[0]["UDP"].payload)
    forged = bytearray(genuine)
    forged[-1] ^= 0x01                      # the last authenticator byte

    with Capture(sw, tb.nets["external-1"].bridge, tmp_path / "untrusted.pcap", "udp dst port 434") as cap2:
        tb.move("external-1")
        rrq = wait_until(lambda: _udp434(cap2.packets()), 10, "the detection request on external-1", proc=mn)[0]
    coa, mport = rrq["IP"].src, rrq["UDP"].sport
    before = status(sock)["mip_counters"]
    tb.exec("sw", [sys.executable, "-c", INJECT, tb.nets["external-1"].bridge, tb.addr.ha, coa, str(mport),
                   tb.layout.mn_mac, bytes(forged).hex(), genuine.hex()], check=True)
    st = wait_until(settled(sock, n0 + 2), 30, "handover to external-1", proc=mn)
    h = last_handover(st)
    assert h["verdict"] == "untrusted" and "no reply" in h["reason"], h
    after = st["mip_counters"]
    assert after.get("auth_failed", 0) - before.get("auth_failed", 0) == 1, (before, after)
    assert after.get("unmatched_identification", 0) - before.get("unmatched_identification", 0) == 1, \
        (before, after)
    assert st["trusted"] is False and st["mode"] is None


def test_reply_without_tnc_means_untrusted(tb, procs, tmp_path):
    """An i-HA that does not list internal-1 among its trusted prefixes answers without TNC:
    the link is untrusted although the reply authenticates (and without a VPN it stays closed)."""
    ha_conf = tb.files["ha_config"]
    original = open(ha_conf).read()
    m = re.search(r"trusted_prefixes = \[[^\]]*\]", original)
    assert m, original
    narrowed = original.replace(m.group(0), 'trusted_prefixes = ["10.1.0.0/16", "10.2.2.0/24"]')
    try:
        open(ha_conf, "w").write(narrowed)
        tb.restart("i-ha")
        cfg = mn_config(tb, tmp_path, vpn=False)
        sock = re.search(r'control_socket = "([^"]+)"', open(cfg).read()).group(1)
        mn = procs.start("mn-agent3", [sys.executable, "-m", "agent.cli", "mn", "--config", cfg], ns=tb.ns("mn"))
        wait_until(lambda: _alive(sock), 30, "the agent's control socket", proc=mn)
        n0 = len([h for h in status(sock)["timeline"] if h["trigger"] == "link-up"])
        tb.move("internal-1")
        st = wait_until(settled(sock, n0 + 1), 30, "handover to internal-1", proc=mn)
        h = last_handover(st)
        assert h["verdict"] == "untrusted" and "without TNC" in h["reason"], h
        assert st["gate"]["interfaces"][tb.mn_if] == "closed"
        mn.stop()
    finally:
        open(ha_conf, "w").write(original)
        tb.restart("i-ha")


def test_crash_keeps_the_link_closed_and_a_clean_stop_removes_everything(tb, procs, tmp_path):
    """SIGKILL mid-life: the gate stays closed and a restarted agent adopts it (fail closed);
    SIGTERM: the agent removes its gate programs, ipset, addresses and routes."""
    import signal
    cfg = mn_config(tb, tmp_path, vpn=False)
    sock = re.search(r'control_socket = "([^"]+)"', open(cfg).read()).group(1)
    argv = [sys.executable, "-m", "agent.cli", "mn", "--config", cfg]
    mn = procs.start("mn-crash", argv, ns=tb.ns("mn"))
    wait_until(lambda: _alive(sock), 30, "the agent's control socket", proc=mn)
    n0 = len([h for h in status(sock)["timeline"] if h["trigger"] == "link-up"])
    tb.move("internal-1")
    wait_until(settled(sock, n0 + 1), 30, "handover to internal-1", proc=mn)
    tb.move("external-1")                      # untrusted, no VPN: closed
    st = wait_until(settled(sock, n0 + 2), 30, "handover to external-1", proc=mn)
    assert st["gate"]["interfaces"][tb.mn_if] == "closed"
    mn.signal(signal.SIGKILL)
    mn.popen.wait(10)
    # nobody decides now, and still nothing leaves: the pinned programs stay attached and closed
    assert not tb.ping("mn", tb.nets["external-1"].router, 1, 0.5)
    out = tb.exec("mn", [sys.executable, "-m", "agent.cli", "gate", "--instance", "mn", "--bpffs",
                         re.search(r'bpffs = "([^"]+)"', open(cfg).read()).group(1), "--json", "status"])
    assert out.returncode == 0 and '"closed"' in out.stdout, out.stdout + out.stderr
    # a restart adopts the closed link instead of opening it, then detects again
    mn2 = procs.start("mn-restart", argv, ns=tb.ns("mn"))
    wait_until(lambda: _alive(sock), 30, "the restarted agent", proc=mn2)
    assert status(sock)["gate"]["interfaces"][tb.mn_if] == "closed"
    # (the restarted agent first detects on the link it finds up: external-1, untrusted)
    wait_until(settled(sock, 1), 30, "the first handover after the restart", proc=mn2)
    assert status(sock)["gate"]["interfaces"][tb.mn_if] == "closed"
    tb.move("internal-1")
    st = wait_until(settled(sock, 2), 30, "handover after the restart", proc=mn2)
    assert last_handover(st)["verdict"] == "trusted"
    mn2.stop()
    assert mn2.popen.returncode == 0, mn2.output()[-2000:]
    # a clean stop leaves no gate, ipset, address of ours or route of ours behind
    assert "mipmobike-mn" not in tb.exec("mn", ["ipset", "list", "-n"]).stdout
    link = tb.exec("mn", ["ip", "-d", "link", "show", tb.mn_if]).stdout
    assert "xdp" not in link, link
    assert "filter" not in tb.exec("mn", ["tc", "filter", "show", "dev", tb.mn_if, "egress"]).stdout
    assert "10.2.1." not in tb.exec("mn", ["ip", "-4", "addr", "show", tb.mn_if]).stdout
    assert "proto 182" not in tb.exec("mn", ["ip", "route", "show", "table", "all"]).stdout
