"""i-HA and i-FA with kernel ipip tunnels (the VM's kernel has the module), one lean
end-to-end run: co-located registration with traffic both ways reverse tunnelled, TNC only
from trusted prefixes, deregistration and lifetime expiry removing every kernel object, the
same through the FA with its care-of address, RFC 3519 UDP tunnelling through a NAT, and a
clean shutdown."""

from __future__ import annotations

import signal
import subprocess

from agent.mip.mn import Deregistered, Registered
from tests.lib.capture import Capture
from tests.lib.procs import wait_until
from tests.netns.test_ha_support import (
    CN,
    FA_ADDR,
    HA_HOME,
    HOA,
    HOA2,
    HOA3,
    NAT_OUTSIDE,
    NAT_PRIVATE,
    TRUSTED_COA,
    UNTRUSTED_COA,
    Lab,
    MnStandIn,
    icmp_echo,
    own_links,
    own_routes,
    own_rules,
    parse_icmp,
    proxy_entries,
    start_daemon,
    status,
    wait_ready,
    write_fa_config,
    write_ha_config,
)


def _binding(sock, hoa):
    return next((b for b in status(sock)["bindings"] if b["home_address"] == hoa), None)


def test_ha_fa_ipip_end_to_end(topology, procs, tmp_path):
    subprocess.run(["modprobe", "ipip"], check=False)
    lab = Lab(topology, fa=True, nat=True)
    ha_sock, fa_sock = str(tmp_path / "ha.sock"), str(tmp_path / "fa.sock")
    ha = start_daemon(procs, "ha", write_ha_config(tmp_path, lab, backend="ipip"), lab.ha, ha_sock, wait=False)
    fa = start_daemon(procs, "fa", write_fa_config(tmp_path, lab, backend="ipip"), lab.fa, fa_sock, wait=False)
    wait_ready(ha, ha_sock, 120)
    wait_ready(fa, fa_sock, 120)
    assert status(ha_sock)["dataplane"] == "ipip" and status(fa_sock)["dataplane"] == "ipip"

    # --- co-located care-of address on a trusted network; the node's side is a manual ipip tunnel
    lab.mn.addr("lo", f"{HOA}/32")
    lab.mn.ip("link", "add", "mnt0", "type", "ipip", "local", TRUSTED_COA, "remote", HA_HOME, "ttl", "64")
    lab.mn.ip("link", "set", "mnt0", "up")
    lab.mn.ip("rule", "add", "from", HOA, "lookup", "200", "pref", "200")
    lab.mn.route("default", "dev", "mnt0", "table", "200")
    mn = MnStandIn(lab.mn.name, home_address=HOA, home_agent=HA_HOME, nai="mn1@corp.example",
                   bind=TRUSTED_COA, lifetime=300)
    ev = mn.register(TRUSTED_COA)
    assert isinstance(ev, Registered) and ev.tnc, ev
    (link,) = own_links(lab.ha)
    assert f"{HOA} dev {link}" in own_routes(lab.ha) and HOA in proxy_entries(lab.ha)
    with Capture(lab.rt, lab.rt_ha, tmp_path / "ha-uplink.pcap") as cap:
        assert lab.cn.ping(HOA, 3, 3), "CN -> home address"
        assert lab.mn.ping(CN, 3, 3, "-I", HOA), "home address -> CN"
    pkts = [p for p in cap.packets() if p.haslayer("IP")]
    assert {(p["IP"].src, p["IP"].dst) for p in pkts if p["IP"].proto == 4} == \
        {(HA_HOME, TRUSTED_COA), (TRUSTED_COA, HA_HOME)}, [p.summary() for p in pkts]
    assert not [p.summary() for p in pkts if p["IP"].proto == 1], "ICMP outside the tunnel"

    # --- TNC only when the request comes from a trusted prefix
    mn.close()
    mn = MnStandIn(lab.mn.name, home_address=HOA, home_agent=HA_HOME, bind=UNTRUSTED_COA, lifetime=300)
    ev = mn.register(UNTRUSTED_COA)
    assert isinstance(ev, Registered) and not ev.tnc, ev
    (link2,) = own_links(lab.ha)
    assert link2 != link, "the tunnel follows the new care-of address"

    # --- deregistration removes every kernel object
    assert isinstance(mn.deregister(UNTRUSTED_COA), Deregistered)
    assert own_links(lab.ha) == [] and own_routes(lab.ha) == "" and proxy_entries(lab.ha) == ""

    # --- and so does lifetime expiry
    ev = mn.register(UNTRUSTED_COA, lifetime=2)
    assert isinstance(ev, Registered) and own_links(lab.ha)
    wait_until(lambda: _binding(ha_sock, HOA) is None, 15, "binding expiry")
    assert own_links(lab.ha) == [] and own_routes(lab.ha) == "" and proxy_entries(lab.ha) == ""
    mn.close()

    # --- through the foreign agent, with its care-of address
    mnf = MnStandIn(lab.mnf.name, home_address=HOA2, home_agent=HA_HOME, spi=257, port=434)
    ev = mnf.register(FA_ADDR, foreign_agent=FA_ADDR, lifetime=300)
    assert isinstance(ev, Registered) and ev.tnc, (ev, mnf.events)
    assert _binding(ha_sock, HOA2)["foreign_agent"] == FA_ADDR
    (fa_link,) = own_links(lab.fa)
    assert own_rules(lab.fa, 181)
    with Capture(lab.rt, lab.rt_fa, tmp_path / "fa-uplink.pcap") as cap:
        assert lab.cn.ping(HOA2, 3, 3), "CN -> node at the FA"
        assert lab.mnf.ping(CN, 3, 3), "node at the FA -> CN (reverse tunnelled by the FA)"
    pkts = [p for p in cap.packets() if p.haslayer("IP")]
    assert {(p["IP"].src, p["IP"].dst) for p in pkts if p["IP"].proto == 4} == \
        {(HA_HOME, FA_ADDR), (FA_ADDR, HA_HOME)}, [p.summary() for p in pkts]
    assert not [p.summary() for p in pkts if p["IP"].proto == 1]
    assert isinstance(mnf.deregister(FA_ADDR, foreign_agent=FA_ADDR), Deregistered)
    wait_until(lambda: own_routes(lab.fa, 181) == "", 10, "FA delivery removed")
    assert own_links(lab.fa) == [] and own_rules(lab.fa, 181) == ""
    assert own_links(lab.ha) == [] and own_routes(lab.ha) == ""
    mnf.close()

    # --- behind a NAT: RFC 3519 UDP tunnelling
    mnn = MnStandIn(lab.mnn.name, home_address=HOA3, home_agent=HA_HOME, spi=258, bind=NAT_PRIVATE,
                    udp_tunnel=True)
    ev = mnn.register(NAT_PRIVATE)
    assert isinstance(ev, Registered) and ev.binding.udp_tunnel, ev
    b = _binding(ha_sock, HOA3)
    assert b["nat_detected"] and b["source"].startswith(NAT_OUTSIDE + ":")
    got = mnn.tunnel_roundtrip(icmp_echo(HOA3, CN, seq=3),
                               lambda p: (i := parse_icmp(p)) and i["type"] == 0 and i["seq"] == 3)
    assert got is not None, mnn.events
    mnn.close()

    # --- clean shutdown: nothing of ours is left in either namespace
    for p in (fa, ha):
        p.signal(signal.SIGTERM)
        assert p.popen.wait(30) == 0, p.output()[-3000:]
    for ns, proto in ((lab.ha, 180), (lab.fa, 181)):
        assert own_links(ns, exclude=()) == [] and own_routes(ns, proto) == "" and own_rules(ns, proto) == ""
    assert proxy_entries(lab.ha) == ""
