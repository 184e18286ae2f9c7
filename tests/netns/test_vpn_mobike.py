"""The mobile node's VPN client (agent.mn.vpn over agent.ike.aio) against a
strongSwan 5.9.8 gateway: moves on a routed path, into a NAT and out of it,
path probing, liveness checks, CHILD and IKE SA rekeying in both
directions, a gateway restart, failures.

The gateway is the shared ``gateway_lab`` (kernel-libipsec on this host: it
claims a NAT to every client and rekeys the CHILD SA a few ms after every
MOBIKE move, so "same SPIs" is the kernel tier's to show). Our kernel here
cannot hold ESP SAs, so the driver runs with the RecordingInstaller: every
kernel change it would make is recorded and checked. The gateway's own view
is ``swanctl --list-sas`` over its VICI socket.

Extra paths from the client namespace ``cl`` (192.0.2.50 on the gateway's
outside link at first):

    cl --198.51.100.0/24-- rt --198.18.0.0/30-- gw           (routed)
    cl --172.16.0.0/24-- nat [MASQUERADE, UDP ports 40000+] --100.64.0.0/24-- gw
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import signal
import time

import pytest

from agent.ike.aio import AsyncIkeDriver, make_udp_socket
from agent.ike.installer import RecordingInstaller
from agent.mn.config import MnConfig, VpnConfig
from agent.mn.vpn import Vpn, VpnError


@pytest.fixture
def roam(gateway_lab):
    lab = gateway_lab
    topo, cl, gw = lab.topo, lab.client, lab.gw_ns
    rt = topo.ns("rt", forward=True)
    topo.link(gw, rt, "198.18.0.1/30", "198.18.0.2/30")
    _, cl_b = topo.link(rt, cl, "198.51.100.1/24", None)
    rt.route("192.0.2.0/24", "via", "198.18.0.1")
    gw.route("198.51.100.0/24", "via", "198.18.0.2")
    nat = topo.ns("nat", forward=True)
    _, nat_gw = topo.link(gw, nat, "100.64.0.1/24", "100.64.0.2/24")
    _, cl_c = topo.link(nat, cl, "172.16.0.1/24", None)
    nat.route("192.0.2.0/24", "via", "100.64.0.1")
    nat.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", nat_gw, "-p", "udp", "-j", "MASQUERADE",
            "--to-ports", "40000-40999")
    lab.paths = {"direct": (lab.client_if, "192.0.2.50/24", None),
                 "routed": (cl_b, "198.51.100.50/24", "198.51.100.1"),
                 "nat": (cl_c, "172.16.0.50/24", "172.16.0.1")}
    lab.at = "direct"
    return lab


def move(lab, where: str) -> tuple[str, str]:
    """Take the client's address away and give it the one of ``where``."""
    old_if, old_cidr, _ = lab.paths[lab.at]
    new_if, new_cidr, router = lab.paths[where]
    lab.client.ip("addr", "del", old_cidr, "dev", old_if)
    lab.client.ip("addr", "add", new_cidr, "dev", new_if)
    if router:
        lab.client.route("default", "via", router)
    lab.at = where
    return new_if, new_cidr.split("/")[0]


def vpn_for(lab, tmp_path, installer=None, **ike) -> Vpn:
    v = VpnConfig(gateway=ipaddress.IPv4Address(lab.gw_addr), gateway_id=lab.gw_id, local_id=lab.psk_id,
                  auth="psk", psk=lab.psk.encode(), cert=None, key_file=None, ca=None,
                  internal_prefixes=[ipaddress.IPv4Network(lab.inside_net)], dpd_interval=ike.pop("dpd", 30))
    cfg = MnConfig(interfaces=[lab.client_if], home_address=ipaddress.IPv4Address("10.1.0.100"),
                   home_agent=ipaddress.IPv4Address("10.10.0.10"), home_prefix=ipaddress.IPv4Network("10.1.0.0/24"),
                   spi=256, algorithm="hmac-md5", key=b"k" * 16, state_dir=str(tmp_path), vpn=v)
    ike.setdefault("retransmit_timeout", 0.5)
    return Vpn(cfg, installer=installer or RecordingInstaller(), netns=lab.client.name, ike_overrides=ike,
               connect_timeout=15, update_timeout=10)


def gw_remote(sas: str) -> str | None:
    m = re.search(r"remote 'mn-psk@vpn.example' @ ([\d.]+\[\d+\])", sas)
    return m.group(1) if m else None


async def wait_gw(lab, cond, timeout=8.0, what="gateway state") -> str:
    deadline = time.monotonic() + timeout
    while True:
        sas = await asyncio.to_thread(lab.gw.list_sas)
        if cond(sas):
            return sas
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{sas}\n--- log ---\n{lab.gw.log_text()[-3000:]}")
        await asyncio.sleep(0.1)


async def until(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def kinds(vpn: Vpn) -> list[str]:
    return [e.kind for e in vpn.history]


# ---------------------------------------------------------------------------- moves

def test_moves_routed_into_nat_and_out(roam, tmp_path):
    lab = roam
    ins = RecordingInstaller()

    async def main():
        vpn = vpn_for(lab, tmp_path, ins)
        try:
            tia = await vpn.update(lab.client_if, lab.client_addr)
            assert str(tia).startswith("10.10.100.")
            sas = await wait_gw(lab, lambda s: "INSTALLED" in s)
            assert gw_remote(sas) == "192.0.2.50[4500]" and f"[{tia}]" in sas
            ike_spis = (vpn.driver.conn.spi_i, vpn.driver.conn.spi_r)
            st = vpn.status()
            assert st["state"] == "established" and st["tia"] == str(tia) and st["encap"]
            assert ins.tia == tia and len(ins.children) == 1

            # 1. a routed path: MOBIKE from 198.51.100.50
            ifname, addr = move(lab, "routed")
            n_ops = len(ins.ops)
            t0 = time.monotonic()
            assert await vpn.update(ifname, addr) == tia
            took = time.monotonic() - t0
            sas = await wait_gw(lab, lambda s: gw_remote(s) == "198.51.100.50[4500]", what="the routed endpoint")
            assert f"[{tia}]" in sas
            moved = [op for op in ins.ops[n_ops:] if op[1] == "move"]
            assert moved and moved[0][2]["local"] == addr           # ESP follows IKE at once, then confirmed
            assert (vpn.driver.conn.spi_i, vpn.driver.conn.spi_r) == ike_spis          # same IKE SA
            assert vpn.status()["last_mobike_ms"] is not None and took < 2.0
            # the gateway (kernel-libipsec) rekeys the CHILD SA right after the move: we answer it
            await until(lambda: vpn.counters["child_rekeys"] >= 1 and len(ins.children) == 1, what="gateway rekey")
            sas = await wait_gw(lab, lambda s: s.count("INSTALLED") == 1)
            c = next(iter(ins.children.values()))
            assert re.search(rf"in\s+{c.spi_out:08x}", sas) and re.search(rf"out\s+{c.spi_in:08x}", sas), sas
            assert c.local == addr

            # 2. into a NAT that rewrites ports
            ifname, addr = move(lab, "nat")
            await vpn.update(ifname, addr)
            sas = await wait_gw(lab, lambda s: (gw_remote(s) or "").startswith("100.64.0.2["), what="the NAT")
            port = int(gw_remote(sas).split("[")[1][:-1])
            assert 40000 <= port <= 40999, sas
            conn = vpn.driver.conn
            assert conn.nat_local and vpn.status()["nat"]["local"]
            assert all(ch.encap == (4500, 4500) and ch.local == addr for ch in ins.children.values())

            # 3. out of the NAT, back onto the gateway's link
            ifname, addr = move(lab, "direct")
            await vpn.update(ifname, addr)
            await wait_gw(lab, lambda s: gw_remote(s) == "192.0.2.50[4500]", what="the direct endpoint")
            assert not conn.nat_local
            assert (conn.spi_i, conn.spi_r) == ike_spis and vpn.tia == tia
            assert vpn.counters["mobike_updates"] == 3 and vpn.counters["mobike_failures"] == 0
            assert kinds(vpn).count("address_updated") == 3 and "sa_lost" not in kinds(vpn)
            # the gateway saw UPDATE_SA_ADDRESSES with NO_ADDITIONAL_ADDRESSES and COOKIE2 each time
            log = lab.gw.log_text()
            assert log.count("N(UPD_SA_ADDR) N(NO_ADD_ADDR) N(NATD_S_IP) N(NATD_D_IP) N(COOKIE2)") >= 3 or \
                len(re.findall(r"parsed INFORMATIONAL request \d+ \[ N\(UPD_SA_ADDR\)", log)) >= 3, log[-3000:]
        finally:
            await vpn.stop()
        await wait_gw(lab, lambda s: "ESTABLISHED" not in s, what="the SA to go")
        assert not ins.children and ins.tia is None

    asyncio.run(main())


def test_path_probing_to_the_gateways_other_address(roam, tmp_path):
    """The gateway announces a second address; the old one becomes
    unreachable from the new path; the update finds the other one."""
    lab = roam
    lab.gw_ns.ip("addr", "add", "192.0.2.2/24", "dev", lab.gw_ns.ifaces[0])
    lab.gw_ns.route("198.51.100.0/24", "via", "198.18.0.2")

    async def main():
        vpn = vpn_for(lab, tmp_path, mobike_probe_after=1, probe_timeout=0.3)
        try:
            await vpn.update(lab.client_if, lab.client_addr)
            assert vpn.driver.conn.peer_addresses == ["192.0.2.2"], vpn.driver.conn.peer_addresses
            lab.client.run("iptables", "-A", "OUTPUT", "-d", lab.gw_addr, "-j", "DROP")
            ifname, addr = move(lab, "routed")
            await vpn.update(ifname, addr)
            ev = next(e for e in vpn.history if e.kind == "address_updated" and e.detail["probed"])
            assert ev.detail["remote"] == "192.0.2.2"
            sas = await wait_gw(lab, lambda s: "192.0.2.2[4500]" in s and gw_remote(s) == "198.51.100.50[4500]",
                                what="the SA on the gateway's other address")
            assert "ESTABLISHED" in sas
            assert vpn.driver.conn.path.remote == ("192.0.2.2", 4500)
        finally:
            await vpn.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------------- liveness, rekeying, restart

def test_dpd_rekeys_both_ways_and_gateway_restart(gateway_lab, tmp_path):
    lab = gateway_lab
    ins = RecordingInstaller()
    lost = []

    async def main():
        vpn = vpn_for(lab, tmp_path, ins, dpd=1, retransmit_tries=2, retransmit_base=1.5)
        vpn.on_event = lost.append
        try:
            tia = await vpn.update(lab.client_if, lab.client_addr)
            # liveness checks while idle
            await until(lambda: vpn.counters["dpd_ok"] >= 2, timeout=5, what="two DPD answers")
            conn = vpn.driver.conn

            # our CHILD SA rekey: the gateway shows the new SPIs, the old pair is gone
            old = next(iter(conn.children.values()))
            conn.rekey_child(old.child_id, vpn.driver.now())
            vpn.driver._service()
            await until(lambda: vpn.counters["child_rekeys"] == 1 and len(ins.children) == 1, what="our child rekey")
            new = next(iter(ins.children.values()))
            assert new.spi_in != old.spi_in and new.reqid == ins.ops[1][2]["child"].reqid
            await wait_gw(lab, lambda s: f"out {new.spi_in:08x}" in re.sub(r"\s+", " ", s)
                          and f"{old.spi_in:08x}" not in s, what="the new CHILD SA only")

            # our IKE SA rekey
            spis = (conn.spi_i, conn.spi_r)
            conn.rekey_ike(vpn.driver.now())
            vpn.driver._service()
            await until(lambda: vpn.counters["ike_rekeys"] == 1, what="our IKE rekey")
            assert (conn.spi_i, conn.spi_r) != spis and conn.initiator
            await wait_gw(lab, lambda s: f"{conn.spi_i.hex()}_i" in s and s.count("ESTABLISHED") == 1,
                          what="the gateway on the new IKE SA only")

            # the gateway rekeys the CHILD SA, then the IKE SA
            await asyncio.to_thread(lab.gw.swanctl, "--rekey", "--child", "lan")
            await until(lambda: vpn.counters["child_rekeys"] == 2 and len(ins.children) == 1, what="gateway child rekey")
            await asyncio.to_thread(lab.gw.swanctl, "--rekey", "--ike", "rw-psk")
            await until(lambda: vpn.counters["ike_rekeys"] == 2, what="gateway IKE rekey")
            assert not conn.initiator                              # the gateway initiated the new IKE SA
            sas = await wait_gw(lab, lambda s: f"{conn.spi_r.hex()}_r" in s and s.count("ESTABLISHED") == 1)
            assert f"[{tia}]" in sas
            # and the moved roles still work: a liveness check, answered
            n = vpn.counters["dpd_ok"]
            await until(lambda: vpn.counters["dpd_ok"] > n, timeout=5, what="DPD on the gateway's IKE SA")

            # the gateway crashes and restarts with no memory of us: the liveness check notices, we start over
            lab.gw.proc.signal(signal.SIGKILL)
            await asyncio.to_thread(lab.gw.proc.popen.wait, 10)
            await asyncio.to_thread(lab.gw.start)
            await asyncio.to_thread(lab.gw.load_all)
            await until(lambda: "reestablished" in kinds(vpn), timeout=20, what="re-establishment")
            ev = next(e for e in vpn.history if e.kind == "sa_lost")
            assert ev.detail["by"] == "timeout"
            re_ev = next(e for e in vpn.history if e.kind == "reestablished")
            assert re_ev.time >= ev.time and re_ev.detail["tia"] == str(vpn.tia)
            sas = await wait_gw(lab, lambda s: "INSTALLED" in s)
            assert f"{vpn.driver.conn.spi_i.hex()}_i" in sas
            assert len(ins.children) == 1 and ins.tia == vpn.tia
            # while the SA was lost its policies were held (fail closed); the new SA took them over
            held = [op for op in ins.ops if op[1] == "remove" and op[2]["held"]]
            over = [op for op in ins.ops if op[1] == "install" and op[2]["over_held"]]
            assert held and over and held[-1][0] <= over[-1][0] and not ins.held
            assert [e.kind for e in lost] == kinds(vpn)[:len(lost)]
        finally:
            await vpn.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------------- failures, cancellation, stop

def test_wrong_psk_clear_error_nothing_left(gateway_lab, tmp_path):
    lab = gateway_lab
    ins = RecordingInstaller()

    async def main():
        vpn = vpn_for(lab, tmp_path, ins)
        vpn.vcfg.psk = b"not-the-key"
        with pytest.raises(VpnError, match="AUTHENTICATION_FAILED"):
            await vpn.update(lab.client_if, lab.client_addr)
        assert not ins.children and ins.tia is None and vpn.status()["last_error"]
        await vpn.stop()
        await vpn.stop()                                 # idempotent

    asyncio.run(main())


def test_cancelled_connect_leaves_nothing_and_stop_is_idempotent(gateway_lab, tmp_path):
    lab = gateway_lab
    ins = RecordingInstaller()
    # a gateway that never answers: our IKE_SA_INIT goes nowhere
    lab.client.run("iptables", "-A", "OUTPUT", "-p", "udp", "--dport", "500", "-j", "DROP")

    async def main():
        vpn = vpn_for(lab, tmp_path, ins)
        task = asyncio.get_running_loop().create_task(vpn.update(lab.client_if, lab.client_addr))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert vpn.driver.conn.state.value == "closed" and not ins.children
        lab.client.run("iptables", "-F", "OUTPUT")
        tia = await vpn.update(lab.client_if, lab.client_addr)     # and it still works afterwards
        assert tia is not None and len(ins.children) == 1
        await vpn.stop()
        await vpn.stop()
        assert not ins.children and ins.tia is None and vpn.status()["state"] == "down"
        await wait_gw(lab, lambda s: "ESTABLISHED" not in s)

    asyncio.run(main())


def test_driver_sockets_choose_the_source_address(gateway_lab):
    """Wildcard sockets with IP_PKTINFO: a datagram leaves from the address we
    name and the receiver learns which of our addresses it came to."""
    lab = gateway_lab
    lab.client.ip("addr", "add", "192.0.2.51/24", "dev", lab.client_if)

    async def main():
        a = make_udp_socket(4501, "0.0.0.0", lab.client.name)
        b = make_udp_socket(4502, "0.0.0.0", lab.client.name)
        drv = AsyncIkeDriver(RecordingInstaller(), netns=lab.client.name, ports=(4501, 4502),
                             socket_factory=lambda p: {4501: a, 4502: b}[p])
        await drv.open()
        try:
            got = []

            class Sink:
                state = None

                def receive_datagram(self, data, src, local, now):
                    got.append((data, src, local))

            drv.conn = Sink()
            x, y = bytes(4) + b"x" * 20, bytes(4) + b"y" * 20      # non-ESP marker: 4502 decapsulates ESP
            drv._send(x, ("192.0.2.51", 4501), ("192.0.2.50", 4502))
            drv._send(y, ("192.0.2.50", 4501), ("192.0.2.51", 4502))
            await until(lambda: len(got) == 2, timeout=2, what="two datagrams")
            assert got[0] == (x, ("192.0.2.51", 4501), ("192.0.2.50", 4502))
            assert got[1] == (y, ("192.0.2.50", 4501), ("192.0.2.51", 4502))
        finally:
            drv.conn = None
            await drv.close()

    asyncio.run(main())
