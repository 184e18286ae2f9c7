"""The Figure-1 testbed on the host: DHCP on every access net after a move, the VPN
gateway (PSK and X.509, MOBIKE into a NAT) as the only way in from outside, NAT,
state-file driven CLI, two testbeds side by side, cleanup after a failed ``up``."""

import importlib.util
import ipaddress
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from agent.testbed import Testbed, TestbedError, figure1
from agent.testbed import testbed as tbmod
from tests.lib.names import RUN, ns_prefix, unique


def _ns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def tb(tmp_path_factory):
    t = Testbed(f"n{RUN}", root=tmp_path_factory.mktemp("tb"), ns_prefix=f"{ns_prefix()}tb-", agents="none")
    try:
        t.up(at="none")
        yield t
    finally:
        t.down()
        assert not set(t.namespaces.values()) & _ns_list()


def test_layout_is_consistent():
    lay = figure1()
    for n in lay.nets.values():
        net = ipaddress.IPv4Network(n.prefix)
        assert ipaddress.IPv4Address(n.router) in net, n
        if n.dhcp:
            assert all(ipaddress.IPv4Address(x) in net for x in n.dhcp), n
    for name, addr in lay.reservations.items():
        assert ipaddress.IPv4Address(addr) in ipaddress.IPv4Network(lay.nets[name].prefix)
    a = lay.addr
    internal = [ipaddress.IPv4Network(p) for p in a.internal_prefixes]
    trusted = [ipaddress.IPv4Network(p) for p in a.trusted_prefixes]
    assert any(ipaddress.IPv4Address(a.ha) in p for p in internal)
    # the TIA pool and the outside are never trusted; the inside NAT's outside address is
    assert not any(ipaddress.IPv4Network(a.pool).subnet_of(p) for p in trusted)
    assert any(ipaddress.IPv4Address(a.inside_nat_public) in p for p in trusted)
    for n in lay.nets.values():
        if n.zone == "external":
            assert not n.trusted


def test_up_writes_state_keys_and_configs(tb):
    st = json.loads(tb.state_file.read_text())
    assert st["phase"] == "up" and st["namespaces"] == tb.namespaces
    assert st["ipsec"] in ("kernel", "libipsec")
    assert set(tb.namespaces.values()) <= _ns_list()
    again = Testbed.load(tb.id, tb.root)               # what status/move/down in another process see
    assert again.namespaces == tb.namespaces and set(again.daemons) == set(tb.daemons)
    status = again.status()
    assert status["healthy"], status
    assert {f"dnsmasq-{n}" for n, net in tb.nets.items() if net.dhcp} | {"charon-gw"} <= set(tb.daemons)
    assert all(d["alive"] for d in status["daemons"].values())
    for key in ("psk", "mip_mn_key", "mip_fa_key", "mn_key"):
        mode = stat.S_IMODE(os.stat(tb.files[key]).st_mode)
        assert mode == 0o600, (key, oct(mode))
    assert stat.S_IMODE(os.stat(tb.dir).st_mode) == 0o700
    # interface names fit everywhere they were made
    for ns in tb.namespaces.values():
        links = json.loads(subprocess.run(["ip", "-n", ns, "-j", "link"], capture_output=True, text=True).stdout)
        assert all(len(link["ifname"]) <= 15 for link in links)
    # the configuration files parse with the daemons' own loaders, where those exist
    if importlib.util.find_spec("agent.mn.config"):
        from agent.mn import config as mnconf
        for f in (tb.files["mn_config"], tb.files["mn_cert_config"]):
            cfg = mnconf.load(f)
            assert str(cfg.home_agent) == tb.addr.ha and str(cfg.vpn.gateway) == tb.addr.gw_public
    if importlib.util.find_spec("agent.ha.config"):
        from agent.ha import config as haconf
        haconf.load(tb.files["ha_config"])


def test_dhcp_lease_on_every_access_net_after_move(tb):
    for name, net in tb.nets.items():
        tb.move(name)
        assert tb.attachment() == name
        addr = ipaddress.IPv4Interface(tb.dhcp())
        if name in tb.layout.reservations:
            assert str(addr.ip) == tb.layout.reservations[name]          # the home address, by MAC
        else:
            lo, hi = (ipaddress.IPv4Address(x) for x in net.dhcp)
            assert lo <= addr.ip <= hi and addr.network == ipaddress.IPv4Network(net.prefix), (name, addr)
        assert tb.ping("mn", net.router)
    leases = tb.status()["leases"]
    assert all(leases[n] for n, net in tb.nets.items() if net.dhcp), leases


def test_move_is_seen_as_carrier_loss_and_return(tb):
    tb.move("internal-1")
    mon = tb.popen("mn", ["ip", "-o", "monitor", "link", "dev", tb.mn_if], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        tb.move("external-1", gap=0.2)
        time.sleep(0.3)
    finally:
        mon.terminate()
        out = mon.communicate(timeout=5)[0]
    lines = out.splitlines()
    down = next(i for i, line in enumerate(lines) if "NO-CARRIER" in line)
    assert any("LOWER_UP" in line for line in lines[down + 1:]), out
    assert tb.attachment() == "external-1"
    tb.move("none")
    assert tb.attachment() is None


def _virtual_ip(tb) -> str:
    """The address from the gateway's TIA pool that the client installed."""
    for line in tb.exec("mn", ["ip", "-4", "-o", "addr"]).stdout.splitlines():
        addr = line.split()[3].split("/")[0]
        if ipaddress.IPv4Address(addr) in ipaddress.IPv4Network(tb.addr.pool):
            return addr
    raise AssertionError("no virtual IP from the pool on the mobile node")


def test_inside_reachable_from_outside_only_through_the_vpn(tb):
    tb.move("external-1")
    tb.dhcp()
    assert tb.ping("mn", tb.addr.inet) and tb.ping("mn", tb.addr.gw_public)
    assert not tb.ping("mn", tb.addr.cn, 1, 1), "plain path from outside to the inside must be blocked"
    assert not tb.ping("inet", tb.addr.ha, 1, 1)
    client = tb.vpn_client()
    try:
        client.initiate("home-psk", "home-psk")
        vip = _virtual_ip(tb)
        assert tb.ping("mn", tb.addr.cn, 2, 2, "-I", vip)
        assert tb.ping("mn", tb.addr.ha, 1, 2, "-I", vip)
        # MOBIKE into the NAT of external-2: same virtual IP, the gateway now sees the NAT's address
        tb.move("external-2")
        tb.dhcp()
        deadline = time.monotonic() + 15
        while f"@ {tb.addr.nat_public}[" not in tb.gateway().list_sas():
            assert time.monotonic() < deadline, tb.gateway().list_sas()
            time.sleep(0.2)
        assert tb.ping("mn", tb.addr.cn, 3, 2, "-I", vip)
        client.terminate("home-psk")
        # X.509 (ECDSA) from behind the NAT
        client.initiate("home-cert", "home-cert")
        sas = tb.gateway().list_sas()
        assert "rw-cert" in sas and "mn.vpn.example" in sas, sas
        assert tb.ping("mn", tb.addr.cn, 2, 2, "-I", _virtual_ip(tb))
    finally:
        tb.stop("charon-mn")


def test_nat_on_external_2_and_inside_the_enterprise(tb):
    tb.move("external-2")
    tb.dhcp()
    assert tb.ping("mn", tb.addr.inet)
    ct = tb.exec("nat", ["conntrack", "-L", "-p", "icmp"]).stdout
    assert f"dst={tb.addr.nat_public}" in ct, ct
    tb.move("internal-3")
    tb.dhcp()
    assert tb.ping("mn", tb.addr.cn)
    ct = tb.exec("inat", ["conntrack", "-L", "-p", "icmp"]).stdout
    assert f"dst={tb.addr.inside_nat_public}" in ct, ct


def test_two_testbeds_side_by_side_and_a_failed_up_leaves_nothing(tb, tmp_path, monkeypatch):
    other = Testbed(unique("o"), root=tmp_path, ns_prefix=f"{ns_prefix()}tb2-", agents="none")
    try:
        other.up(at="external-1")
        assert other.dhcp().startswith("198.51.100.")
        assert other.status()["healthy"] and tb.status()["healthy"]
        with pytest.raises(TestbedError, match="already up"):
            Testbed(other.id, root=tmp_path, ns_prefix=other.prefix, agents="none").up()
        assert other.status()["healthy"]                           # the refused up touched nothing
    finally:
        done = other.down()
    assert any("deleted 11 namespaces" in d for d in done), done
    assert not set(other.namespaces.values()) & _ns_list()
    assert not other.dir.exists()
    assert other.down() == []                                   # idempotent

    monkeypatch.setattr(tbmod, "gateway_swanctl", lambda *a, **k: "connections { broken {\n")
    bad = Testbed(unique("f"), root=tmp_path, ns_prefix=f"{ns_prefix()}tb3-", agents="none")
    try:
        with pytest.raises(TestbedError, match="up failed.*loaded no connection"):
            bad.up()
    finally:
        bad.down()
    assert not set(bad.namespaces.values()) & _ns_list()
    assert not bad.dir.exists()
    assert bad.daemons and not any(d.alive() for d in bad.daemons.values())
    assert tb.status()["healthy"]


def test_cli_up_status_move_exec_down_in_separate_processes(tmp_path):
    tid = unique("c")
    base = [sys.executable, "-m", "agent.cli", "testbed"]
    common = ["--id", tid, "--state-root", str(tmp_path)]

    def cli(*args, check=True):
        p = subprocess.run(base + [args[0], *common, *args[1:]], capture_output=True, text=True, timeout=120)
        assert not check or p.returncode == 0, p.stdout + p.stderr
        return p

    try:
        out = cli("up", "--at", "external-2", "--agents", "none").stdout
        assert "external-2" in out and "dnsmasq-internal-1" in out
        st = json.loads(cli("status", "--json").stdout)
        assert st["healthy"] and st["mn"]["attached"] == "external-2"
        out = cli("move", "internal-1", "--dhcp").stdout
        assert "external-2 -> internal-1" in out and "10.2.1." in out
        assert "10.2.1." in cli("exec", "mn", "--", "ip", "-4", "-o", "addr").stdout
        assert "internal-1" in cli("status").stdout
        out = cli("down").stdout
        assert "deleted 11 namespaces" in out
        assert "nothing to remove" in cli("down").stdout
        assert cli("status", check=False).returncode == 1
    finally:
        Testbed(tid, root=tmp_path).down()
    assert not {n for n in _ns_list() if n.startswith(f"mmtb-{tid}-")}


def test_operator_layout_cellular_behind_cgn_is_inside_hotspot_is_not(tmp_path):
    op = Testbed(unique("p"), layout="operator", root=tmp_path, ns_prefix=f"{ns_prefix()}tbo-", agents="none")
    try:
        op.up(at="cellular")
        assert op.dhcp().startswith("100.64.1.")
        assert op.ping("mn", op.addr.cn)
        op.move("hotspot")
        assert op.dhcp().startswith("192.168.2.")
        assert op.ping("mn", op.addr.gw_public) and not op.ping("mn", op.addr.cn, 1, 1)
        assert Testbed.load(op.id, tmp_path).layout.name == "operator"
    finally:
        op.down()
    assert not set(op.namespaces.values()) & _ns_list()


def test_restart_gateway_and_dhcp_server_and_impair_needs_netem(tb):
    old = tb.daemons["charon-gw"].pid
    tb.restart("charon-gw")
    assert tb.daemons["charon-gw"].pid != old and tb.daemons["charon-gw"].alive()
    conns = tb.gateway().swanctl("--list-conns").stdout
    assert "rw-psk" in conns and "rw-cert" in conns
    tb.restart("dnsmasq-external-1")
    tb.move("external-1")
    assert tb.dhcp().startswith("198.51.100.")
    assert Testbed.load(tb.id, tb.root).status()["healthy"]
    has_netem = subprocess.run(["ip", "netns", "exec", tb.ns("sw"), "tc", "qdisc", "replace", "dev", "lo", "root",
                                "netem", "loss", "0%"], capture_output=True).returncode == 0
    if has_netem:
        tb.impair(loss=10)
        assert "netem" in tb.exec("mn", ["tc", "qdisc", "show", "dev", tb.mn_if]).stdout
        tb.impair()
        assert "netem" not in tb.exec("mn", ["tc", "qdisc", "show", "dev", tb.mn_if]).stdout
    else:
        with pytest.raises(TestbedError, match="netem"):
            tb.impair(loss=10)
