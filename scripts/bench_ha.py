#!/usr/bin/env python3
"""Home agent registration rate and memory per binding, per data-plane backend.

    .venv/bin/python scripts/bench_ha.py                      # engine, bpf (+ ipip if the kernel has it)
    .venv/bin/python scripts/bench_ha.py --sizes 1000 10000   # fewer sizes
    scripts/vm/vmrun.sh .venv/bin/python scripts/bench_ha.py --backends ipip   # where ipip exists

What is measured, per size N (1 000, 10 000, 100 000 bindings):

* ``new``: N distinct nodes register from an empty binding cache (each a
  signed Registration Request, HMAC-MD5, decoded, authenticated, replay-checked
  and answered by the engine; then the daemon's data-plane step for the
  binding), registrations per second;
* ``renew``: the same N nodes register again with N bindings present;
* memory per binding: the daemon's Python objects (resident-set growth while
  the N bindings are made: engine state, plus the data plane's bookkeeping),
  the BPF binding maps (the kernel's own accounting of the maps, fdinfo
  memlock), and the growth of the kernel's slab caches (routes, proxy-ARP
  entries, netdevices, map elements; system-wide, so noisy for small N on a
  busy machine).

Backends: ``engine`` (signalling only, no kernel), ``bpf`` (one shared TUN
device, a map entry + a host route + a proxy-ARP entry per binding), ``ipip``
(a netdevice per care-of address + a host route + a proxy-ARP entry). With
ipip, one netdevice per binding would be 100 000 netdevices: distinct care-of
addresses are capped by ``--ipip-max-tunnels`` (default 1 000) and bindings
beyond that share tunnels, as nodes behind one foreign agent do; the output
says how many tunnels were made. Gratuitous ARP is off (it is a per-binding
packet, not state). Requests are signed up front (not timed) with a timestamp
tolerance wide enough for the whole run.

Everything kernel-side happens in a scratch network namespace that is
removed at the end. Run on an otherwise idle machine; numbers are for
comparison side by side, not absolutes.
"""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import subprocess
import sys
import time
from ipaddress import IPv4Address

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from agent.mip.auth import SecurityAssociation, ntp_timestamp, sign  # noqa: E402
from agent.mip.constants import RegFlag  # noqa: E402
from agent.mip.ha import BindingAdded, BindingRemoved, BindingUpdated, HaConfig, HaNode, HomeAgent  # noqa: E402
from agent.mip.messages import RegistrationRequest  # noqa: E402
from agent.bench.env import sigterm_exits  # noqa: E402

HA = IPv4Address("10.255.0.1")
HOME_NET = IPv4Address("10.128.0.0")  # home addresses 10.128.0.1 ... (/9 holds 8M)
COA_NET = IPv4Address("172.16.0.0")   # care-of addresses 172.16.0.1 ...
KEY = bytes(range(16))


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def kernel_slab() -> int:
    """Bytes in the kernel's slab caches (all of them: routes, neighbours, netdevices, map elements)."""
    total = 0
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                if line.startswith(("slabinfo", "#")):
                    continue
                parts = line.split()
                total += int(parts[2]) * int(parts[3])  # num_objs * objsize
    except OSError:
        return 0
    return total


def make_requests(n: int, sas, coa_of, lifetime: int, now: float) -> list[tuple[bytes, IPv4Address]]:
    """(signed co-located request, its source = the care-of address) for each node."""
    out = []
    for i in range(n):
        hoa = IPv4Address(int(HOME_NET) + 1 + i)
        coa = coa_of(i)
        req = RegistrationRequest(RegFlag.D | RegFlag.T, lifetime, hoa, HA, coa, ntp_timestamp(now) + i)
        out.append((sign(req, sas[i]).encode(), coa))
    return out


class Scratch:
    """A throw-away namespace with a home link (veth) for the kernel backends."""

    def __init__(self):
        self.name = f"mmbench-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self._ip("link", "set", "lo", "up")
        self._ip("link", "add", "home0", "type", "veth", "peer", "name", "home1")
        self._ip("link", "add", "up0", "type", "veth", "peer", "name", "up1")
        for dev in ("home0", "home1", "up0", "up1"):
            self._ip("link", "set", dev, "up")
        self._ip("addr", "add", "10.128.0.0/9", "dev", "home0")
        self._ip("addr", "add", f"{HA}/32", "dev", "home0")
        self._ip("addr", "add", "172.16.0.254/12", "dev", "up0")

    def _ip(self, *args):
        subprocess.run(["ip", "-n", self.name, *args], check=True)

    def close(self):
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def run_one(backend: str, n: int, ipip_max: int) -> dict:
    lifetime = 3600
    now = time.time()
    sas = [SecurityAssociation(256, KEY, tolerance=86400.0)] * n
    distinct_coas = n if backend != "ipip" else min(n, ipip_max)

    def coa_of(i):
        return IPv4Address(int(COA_NET) + 1 + (i % distinct_coas))

    nodes = [HaNode(IPv4Address(int(HOME_NET) + 1 + i), sas[i]) for i in range(n)]
    ha = HomeAgent(HaConfig(HA, nodes, max_lifetime=lifetime))
    first = make_requests(n, sas, coa_of, lifetime, now)
    second = make_requests(n, sas, coa_of, lifetime, now + 1)
    scratch = kernel = dp = None
    slab0 = None
    try:
        if backend != "engine":
            from agent.ha.dataplane import HaDataPlane
            from agent.kernel.netlink import Kernel
            from agent.kernel.tunnels import make_backend

            scratch = Scratch()
            kernel = Kernel("ha", netns=scratch.name)
            be = make_backend(backend, kernel, decap_interfaces=["up0"], max_entries=max(1024, 2 * n))
            dp = HaDataPlane(kernel, be, local=HA, home_interface="home0", garp_count=0)
            dp.open()
            kernel.set_proxy_delay("home0", 0)
            bpf_mem0 = be.memory() or 0
            gc.collect()
            slab0 = kernel_slab()

        def apply():
            while (ev := ha.next_event()) is not None:
                if dp is None:
                    continue
                if isinstance(ev, BindingAdded):
                    dp.added(ev.binding)
                elif isinstance(ev, BindingUpdated):
                    dp.updated(ev.binding, ev.previous)
                elif isinstance(ev, BindingRemoved):
                    dp.removed(ev.binding, ev.reason)
            ha.datagrams_to_send()

        rates = {}
        gc.collect()
        rss0 = rss()
        for label, batch, t_now in (("new", first, now), ("renew", second, now + 1)):
            t0 = time.perf_counter()
            for data, src in batch:
                ha.receive_datagram(data, src, 434, HA, t_now)
                apply()
            rates[label] = n / (time.perf_counter() - t0)
            if label == "new":
                gc.collect()
                py_bytes = max(0, rss() - rss0) / n
        bound = sum(len(p) for p in ha.bindings.values())
        assert bound == n, f"{bound} of {n} bindings (counters: {dict(ha.counters)})"
        out = {"backend": backend, "n": n, "new": rates["new"], "renew": rates["renew"],
               "tunnels": distinct_coas if backend == "ipip" else (1 if backend == "bpf" else 0),
               "py_bytes": py_bytes}
        if backend != "engine":
            gc.collect()
            out["kernel_bytes"] = max(0, kernel_slab() - slab0) / n
            if backend == "bpf":
                out["map_bytes"] = ((be.memory() or 0) - bpf_mem0) / n
            if dp.errors:
                out["errors"] = dp.errors
        return out
    finally:
        if dp is not None:
            t0 = time.perf_counter()
            dp.close()
            if n >= 10000:
                print(f"    ({backend}: removing {n} bindings took {time.perf_counter() - t0:.1f} s)",
                      file=sys.stderr)
        if kernel is not None:
            kernel.close()
        if scratch is not None:
            scratch.close()


def ipip_here() -> bool:
    name = f"mmbench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        p = subprocess.run(["ip", "-n", name, "link", "add", "t0", "type", "ipip", "local", "192.0.2.1",
                            "remote", "192.0.2.2"], capture_output=True)
        return p.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--backends", nargs="+", default=["engine", "bpf", "ipip"],
                    choices=["engine", "bpf", "ipip"])
    ap.add_argument("--ipip-max-tunnels", type=int, default=1000)
    args = ap.parse_args()
    sigterm_exits()            # a kill tears down too (finally blocks run)
    backends = list(args.backends)
    if "ipip" in backends and not ipip_here():
        print("ipip: this kernel has no ipip module; run the ipip case where it exists, e.g.\n"
              "  scripts/vm/vmrun.sh .venv/bin/python scripts/bench_ha.py --backends ipip\n")
        backends.remove("ipip")
    if os.geteuid() != 0 and backends != ["engine"]:
        print("kernel backends need root; measuring the engine only")
        backends = ["engine"]
    print(f"{'backend':<8} {'bindings':>9} {'tunnels':>8} {'new reg/s':>10} {'renew reg/s':>12} "
          f"{'python B/bnd':>13} {'map B/bnd':>10} {'kernel B/bnd':>13}")
    rows = []
    for n in args.sizes:
        for backend in backends:
            r = run_one(backend, n, args.ipip_max_tunnels)
            rows.append(r)

            def fmt(k):
                v = r.get(k)
                return f"{v:,.0f}" if v is not None else "-"

            print(f"{backend:<8} {n:>9,} {r['tunnels']:>8,} {r['new']:>10,.0f} {r['renew']:>12,.0f} "
                  f"{fmt('py_bytes'):>13} {fmt('map_bytes'):>10} {fmt('kernel_bytes'):>13}"
                  + (f"  ({r['errors']} kernel errors)" if r.get("errors") else ""), flush=True)
    print("\npython B/bnd: resident-set growth per binding (engine and data-plane objects); map B/bnd: BPF binding maps "
          "(kernel accounting);\nkernel B/bnd: slab growth per binding (routes, proxy-ARP "
          "entries, netdevices, map elements; system-wide, noisy for small N).")
    base = {(r["n"]): r for r in rows if r["backend"] == "engine"}
    for r in rows:
        if r["backend"] != "engine" and r["n"] in base:
            print(f"{r['backend']} at {r['n']:,}: new registrations at {r['new'] / base[r['n']]['new']:.2f}x "
                  "the engine-only rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
