"""The testbed with its agents (i-HA, i-FA daemons): RFC 5266 trust detection works
in it. A registration from inside is answered with TNC, from outside it goes
unanswered (the firewall), through the VPN it is answered without TNC (the TIA
is not a trusted prefix). The mobile node is a stand-in driving the MIPv4 engine."""

import socket
import time

import pytest

from agent.config import read_key_file
from agent.mip.auth import SecurityAssociation
from agent.mip.mn import Denied, MnConfig, MobileNode, Registered, TimedOut
from agent.testbed import Testbed
from agent.testbed.nsenter import netns
from agent.testbed.testbed import MN_NAI, MN_SPI
from tests.lib.names import RUN, ns_prefix


@pytest.fixture(scope="module")
def tba(tmp_path_factory):
    t = Testbed(f"a{RUN}", root=tmp_path_factory.mktemp("tba"), ns_prefix=f"{ns_prefix()}tba-", agents="auto")
    try:
        t.up(at="none")
        yield t
    finally:
        t.down()


def register(tb: Testbed, coa: str, src: str, wait: float = 0.4):
    """One registration of ``coa`` sent from ``src`` in the node's namespace; the engine's verdict."""
    with netns(tb.ns("mn")):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((src, 0))
        sock.settimeout(0.05)
        sa = SecurityAssociation(MN_SPI, read_key_file(tb.files["mip_mn_key"], "mn key"))
        mn = MobileNode(MnConfig(home_address=tb.addr.home_address, home_agent=tb.addr.ha, sa=sa, nai=MN_NAI,
                                 lifetime=60, initial_timeout=wait, max_timeout=wait, max_retransmissions=1))
        mn.register(time.time(), coa)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for d in mn.datagrams_to_send():
                sock.sendto(d.data, d.addr)
            while (ev := mn.next_event()) is not None:
                if isinstance(ev, (Registered, Denied, TimedOut)):
                    return ev
            try:
                data, (host, port) = sock.recvfrom(4096)
                mn.receive_datagram(data, host, port, src, time.time())
            except socket.timeout:
                pass
            t = mn.get_timer()
            if t is not None and time.time() >= t:
                mn.handle_timer(time.time())
        raise AssertionError("the engine reached no verdict")
    finally:
        sock.close()


def test_agents_run_and_trust_detection_works_in_the_testbed(tba):
    st = tba.status()
    agents = ["i-ha"] + (["i-fa"] if Testbed.agent_available("fa") else [])
    for name in agents:
        assert name in st["daemons"] and st["daemons"][name]["alive"] and st["daemons"][name]["ready"], st["notes"]
    # inside: answered, with TNC
    tba.move("internal-1")
    coa = tba.static_address(60).split("/")[0]
    ev = register(tba, coa, coa)
    assert isinstance(ev, Registered) and ev.tnc, ev
    # outside: the firewall keeps the i-HA out of reach, no answer at all
    tba.move("external-1")
    coa = tba.static_address(60).split("/")[0]
    ev = register(tba, coa, coa)
    assert isinstance(ev, TimedOut), ev
    # through the VPN with the TIA as care-of address: answered, without TNC
    client = tba.vpn_client()
    try:
        client.initiate("home-psk", "home-psk")
        addrs = tba.exec("mn", ["ip", "-4", "-o", "addr"]).stdout
        tia = next(line.split()[3].split("/")[0] for line in addrs.splitlines() if " 10.3.0." in line)
        ev = register(tba, tia, tia, wait=1.0)
        assert isinstance(ev, Registered) and not ev.tnc, ev
    finally:
        tba.stop("charon-mn")
    # the i-HA restarting keeps answering (its bindings survive in its state file)
    tba.restart("i-ha")
    tba.move("internal-1")
    coa = tba.static_address(61).split("/")[0]
    ev = register(tba, coa, coa)
    assert isinstance(ev, Registered) and ev.tnc, ev
