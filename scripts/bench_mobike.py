#!/usr/bin/env python3
"""MOBIKE handover time: our VPN client next to strongSwan's own client.

On one testbed (namespaces: a strongSwan gateway, a client namespace with a
direct link to the gateway and a routed one through a router), each client
in turn connects and is then moved between the two paths ``--moves`` times.
A move removes the client's address and adds the one of the other path
(with its default route); its time is from that address change to the
gateway updating the SA (its log line "remote endpoint changed ... to
<new address>", millisecond timestamps on the same clock).

Our client is told at once, as the mobile node daemon does when its DHCP
lease arrives (``Vpn.update``); strongSwan's client finds out from the
kernel's address events (charon's kernel-netlink roam events).

Runs as root on the host (kernel-libipsec gateway and client) or, with
kernel ESP on both sides, in the VM:

    .venv/bin/python scripts/bench_mobike.py [--moves 10] [--json]
    scripts/vm/vmrun.sh .venv/bin/python scripts/bench_mobike.py

Everything it creates (namespaces, daemons, files) is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import re
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.ike.installer import RecordingInstaller, XfrmInstaller  # noqa: E402
from agent.kernel import Kernel  # noqa: E402
from agent.mn.config import MnConfig, VpnConfig  # noqa: E402
from agent.mn.vpn import Vpn  # noqa: E402
from agent.bench.env import sigterm_exits  # noqa: E402
from tests.lib.procs import Procs  # noqa: E402
from tests.lib.swan import Charon, client_swanctl, gateway_swanctl, kernel_has_esp  # noqa: E402
from tests.lib.topo import Topology  # noqa: E402

GW, INSIDE, POOL = "192.0.2.1", "10.10.0.0/24", "10.10.100.0/24"
PSK_ID, GW_ID = "mn-psk@vpn.example", "gw.vpn.example"
RESOLUTION = 0.001          # charon's log timestamps


class Bed:
    def __init__(self, base: Path, backend: str):
        self.procs = Procs(base / "logs")
        self.topo = Topology("bm")
        t = self.topo
        self.gw_ns = t.ns("gw", forward=True)
        self.cl = t.ns("cl")
        rt = t.ns("rt", forward=True)
        inside = t.ns("in")
        gw_out, self.if_a = t.link(self.gw_ns, self.cl, f"{GW}/24", None)
        t.link(self.gw_ns, rt, "198.18.0.1/30", "198.18.0.2/30")
        _, self.if_b = t.link(rt, self.cl, "198.51.100.1/24", None)
        t.link(self.gw_ns, inside, "10.10.0.1/24", "10.10.0.10/24")
        rt.route("192.0.2.0/24", "via", "198.18.0.1")
        self.gw_ns.route("198.51.100.0/24", "via", "198.18.0.2")
        inside.route("default", "via", "10.10.0.1")
        self.paths = {"direct": (self.if_a, "192.0.2.50", GW), "routed": (self.if_b, "198.51.100.50", "198.51.100.1")}
        self.psk = "bench-" + secrets.token_hex(16)
        self.backend = backend
        self.gw = Charon(base / "swan", self.gw_ns, "gw", self.procs, ipsec=backend, interfaces_use=[gw_out])
        self.gw.write_swanctl(gateway_swanctl(GW, [INSIDE], POOL, psk=self.psk))
        self.gw.start()
        self.gw.load_all()
        self.k = Kernel("test", netns=self.cl.name)
        self.at = None

    def place(self, where: str) -> tuple[str, str, float]:
        """Move the client's address to path ``where``; the wall-clock time of the change."""
        if self.at is not None:
            ifname, addr, _ = self.paths[self.at]
            self.k.del_address(ifname, addr, 24)
        ifname, addr, router = self.paths[where]
        self.k.add_address(ifname, addr, 24)
        self.k.add_route("0.0.0.0/0", gateway=router, dev=ifname)
        t = time.time()
        self.at = where
        return ifname, addr, t

    def close(self):
        try:
            self.k.close()
        finally:
            try:
                self.procs.close()
            finally:
                self.topo.close()


def _sod(hms: str) -> float:
    h, m, s = hms.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def gateway_update_time(bed: Bed, since: int, addr: str, t_change: float, timeout: float = 10.0) -> float:
    """Seconds from ``t_change`` to the gateway's 'remote endpoint changed ... to addr' line."""
    pat = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) .*remote endpoint changed from \S+ to " + re.escape(addr) + r"\[",
                     re.M)
    deadline = time.monotonic() + timeout
    while True:
        text = bed.gw.log_text()[since:]
        m = pat.search(text)
        if m:
            # charon's log has whole milliseconds (truncated): compare at that resolution
            dt = datetime.datetime.fromtimestamp(t_change)
            change = dt.hour * 3600 + dt.minute * 60 + dt.second + (dt.microsecond // 1000) / 1e3
            return round(_sod(m.group(1)) - change, 3)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not update the SA to {addr} within {timeout} s")
        time.sleep(0.02)


def vpn_config(bed: Bed, state_dir: str) -> MnConfig:
    v = VpnConfig(gateway=ipaddress.IPv4Address(GW), gateway_id=GW_ID, local_id=PSK_ID, auth="psk",
                  psk=bed.psk.encode(), cert=None, key_file=None, ca=None,
                  internal_prefixes=[ipaddress.IPv4Network(INSIDE)], dpd_interval=30)
    return MnConfig(interfaces=[bed.if_a, bed.if_b], home_address=ipaddress.IPv4Address("10.1.0.100"),
                    home_agent=ipaddress.IPv4Address("10.10.0.10"), home_prefix=ipaddress.IPv4Network("10.1.0.0/24"),
                    spi=256, algorithm="hmac-md5", key=b"k" * 16, state_dir=state_dir, vpn=v)


def run_ours(bed: Bed, moves: int, base: Path) -> list[float]:
    async def main() -> list[float]:
        installer = XfrmInstaller(bed.cl.name, state_file=str(base / "vpn-tia")) if bed.backend == "kernel" \
            else RecordingInstaller()
        vpn = Vpn(vpn_config(bed, str(base)), installer=installer, netns=bed.cl.name)
        out = []
        try:
            ifname, addr, _ = bed.place("direct")
            await vpn.update(ifname, addr)
            await asyncio.sleep(1.0)
            for i in range(moves):
                since = len(bed.gw.log_text())
                ifname, addr, t = bed.place("routed" if i % 2 == 0 else "direct")
                await vpn.update(ifname, addr)
                out.append(await asyncio.to_thread(gateway_update_time, bed, since, addr, t))
                await asyncio.sleep(1.0)           # the gateway's CHILD SA rekey after a move settles
        finally:
            await vpn.stop()
        return out
    return asyncio.run(main())


def run_strongswan(bed: Bed, moves: int, base: Path) -> list[float]:
    ifname, addr, _ = bed.place("direct")
    client = Charon(base / "swan", bed.cl, "mn", bed.procs, ipsec=bed.backend)
    client.write_swanctl(client_swanctl(GW, [INSIDE], bed.psk, local_id=PSK_ID, gw_id=GW_ID))
    client.start()
    out = []
    try:
        client.load_all()
        client.initiate("home", "home")
        time.sleep(1.0)
        for i in range(moves):
            since = len(bed.gw.log_text())
            ifname, addr, t = bed.place("routed" if i % 2 == 0 else "direct")
            out.append(gateway_update_time(bed, since, addr, t))
            time.sleep(1.0)
    finally:
        client.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moves", type=int, default=10, help="moves per client (default 10)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    sigterm_exits()            # a kill tears down too (finally blocks run)
    backend = "kernel" if kernel_has_esp() else "libipsec"
    with tempfile.TemporaryDirectory(prefix="bench-mobike-") as tmp:
        base = Path(tmp)
        bed = Bed(base, backend)
        try:
            ours = run_ours(bed, args.moves, base)
            theirs = run_strongswan(bed, args.moves, base)
        finally:
            bed.close()
    med_o, med_t = statistics.median(ours), statistics.median(theirs)
    floor = med_o < RESOLUTION
    ratio = med_t / max(med_o, RESOLUTION)
    result = {"backend": backend, "moves": args.moves, "resolution_ms": RESOLUTION * 1000,
              "ours_ms": [round(x * 1000, 1) for x in ours], "strongswan_ms": [round(x * 1000, 1) for x in theirs],
              "ours_median_ms": round(med_o * 1000, 1), "strongswan_median_ms": round(med_t * 1000, 1),
              "ratio_strongswan_over_ours": round(ratio, 1), "ratio_is_lower_bound": floor}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"MOBIKE: address change -> gateway updated the SA ({backend} ESP, {args.moves} moves each, "
          "direct <-> routed path)")
    print(f"{'move':>4}  {'mipmobike':>10}  {'strongSwan':>10}")
    for i, (a, b) in enumerate(zip(ours, theirs), 1):
        print(f"{i:>4}  {a * 1000:>8.1f} ms  {b * 1000:>8.1f} ms")
    print(f"{'median':>6}{med_o * 1000:>8.1f} ms  {med_t * 1000:>8.1f} ms")
    print(f"{'mean':>6}{statistics.mean(ours) * 1000:>8.1f} ms  {statistics.mean(theirs) * 1000:>8.1f} ms")
    print(f"ratio (strongSwan / mipmobike, medians): {'>= ' if floor else ''}{ratio:.1f}x"
          + (f"  (our median is below the {RESOLUTION * 1000:.0f} ms log resolution; counted as "
             f"{RESOLUTION * 1000:.0f} ms)" if floor else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
