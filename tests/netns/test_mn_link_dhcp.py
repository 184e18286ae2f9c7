"""The mobile node's inputs: rtnetlink link/address events and a DHCP lease from dnsmasq."""

import json
import sys
import textwrap

from tests.lib.procs import wait_until

SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from agent.netlink_events import LinkWatcher, LinkEvent, AddrEvent
    from agent.mn.dhcp import Dhcp

    async def main(ifname):
        w = LinkWatcher([ifname])
        await w.start()
        leases = 0
        while True:
            ev = await w.get()
            if isinstance(ev, LinkEvent):
                print(json.dumps({"link": ev.ifname, "up": ev.up}), flush=True)
                if ev.up and leases == 0:
                    leases += 1
                    lease = await Dhcp(ifname, timeout=15).acquire()
                    print(json.dumps({"lease": str(lease.address), "router": str(lease.router)}), flush=True)
            else:
                print(json.dumps({"addr": str(ev.address), "added": ev.added}), flush=True)

    asyncio.run(main(sys.argv[1]))
""")


def test_link_events_and_dhcp_lease(topology, procs, tmp_path):
    srv, mn = topology.ns("dhcp"), topology.ns("mn")
    s_if, m_if = topology.link(srv, mn, "10.77.0.1/24")
    mn.ip("link", "set", m_if, "down")
    procs.start("dnsmasq", ["dnsmasq", "-k", "--no-ping", "--port=0", f"--interface={s_if}", "--bind-interfaces",
                            "--dhcp-range=10.77.0.50,10.77.0.99,255.255.255.0,120",
                            "--dhcp-option=option:router,10.77.0.1",
                            f"--dhcp-leasefile={tmp_path / 'leases'}", f"--pid-file={tmp_path / 'dnsmasq.pid'}"],
                ns=srv.name)
    agent = procs.start("watch", [sys.executable, "-c", SCRIPT, m_if], ns=mn.name)

    def events():
        return [json.loads(line) for line in agent.output().splitlines() if line.startswith("{")]

    wait_until(lambda: any(e.get("link") == m_if and e["up"] is False for e in events()), 20,
               "the initial snapshot (link down)", proc=agent)
    mn.ip("link", "set", m_if, "up")
    wait_until(lambda: any("lease" in e for e in events()), 30, "a DHCP lease", proc=agent)
    lease = next(e for e in events() if "lease" in e)
    assert lease["lease"].startswith("10.77.0.") and lease["lease"].endswith("/24")
    assert lease["router"] == "10.77.0.1"
    # the agent configures addresses itself; adding one produces an address event
    mn.ip("addr", "add", lease["lease"], "dev", m_if)
    wait_until(lambda: any(e.get("addr") == lease["lease"] and e["added"] for e in events()), 10,
               "the address event", proc=agent)
    mn.ip("link", "set", m_if, "down")
    wait_until(lambda: sum(1 for e in events() if e.get("link") == m_if and e["up"] is False) >= 2, 10,
               "the link-down event", proc=agent)
