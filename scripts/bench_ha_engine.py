#!/usr/bin/env python3
"""Benchmark: home-agent engine registrations per second on one core (HMAC-MD5).

Pre-builds signed, timestamped Registration Requests for ``--nodes`` mobile
nodes (each node re-registering with a newer identification), then feeds them
to one HomeAgent engine, draining replies and binding events as a daemon would.
Printed side by side, on the same core and inputs:

  * HMAC-MD5 of one request alone (the cryptographic floor),
  * decoding one request alone,
  * the whole engine (decode, verify, replay check, binding cache, signed reply),

with the ratios between them. Not a test: nothing is asserted.

    .venv/bin/python scripts/bench_ha_engine.py [--requests 10000] [--nodes 1000] [--cpu N]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from ipaddress import IPv4Address

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from agent.mip import (  # noqa: E402
    HaConfig,
    HaNode,
    HomeAgent,
    NaiExtension,
    RegFlag,
    RegistrationRequest,
    SecurityAssociation,
    decode_message,
    sign,
)
from agent.mip.auth import ntp_timestamp  # noqa: E402

T0 = 1_800_000_000.0
HA = IPv4Address("10.0.0.1")


def build(n_nodes: int, n_requests: int, algorithm: str):
    nodes, reqs = [], []
    base = int(IPv4Address("10.128.0.0"))
    for i in range(n_nodes):
        nodes.append(HaNode(IPv4Address(base + i),
                            SecurityAssociation(256 + i, os.urandom(16), algorithm=algorithm)))
    for k in range(n_requests):
        node = nodes[k % n_nodes]
        now = T0 + k * 1e-4  # strictly increasing identifications per node
        coa = IPv4Address(int(IPv4Address("192.0.2.0")) + (k % 200) + 1)
        req = RegistrationRequest(RegFlag.D | RegFlag.T, 1800, node.home_address, HA, coa,
                                  ntp_timestamp(now), (NaiExtension(f"mn{k % n_nodes}@x"),))
        reqs.append((sign(req, node.sa).encode(), str(coa), now))
    return nodes, reqs


def run_engine(nodes, reqs) -> float:
    ha = HomeAgent(HaConfig(HA, nodes, trusted_prefixes=["192.0.2.0/24"]))
    t = time.perf_counter()
    for data, src, now in reqs:
        ha.receive_datagram(data, src, 434, "10.0.0.1", now)
        ha.datagrams_to_send()
        while ha.next_event() is not None:
            pass
    elapsed = time.perf_counter() - t
    accepted = ha.counters["accepted"]
    if accepted != len(reqs):
        print(f"warning: only {accepted} of {len(reqs)} accepted: {dict(ha.counters)}",
              file=sys.stderr)
    return elapsed


def run_hmac(nodes, reqs) -> float:
    n = len(nodes)
    t = time.perf_counter()
    for k, (data, _, _) in enumerate(reqs):
        nodes[k % n].sa.compute(data[:-16])
    return time.perf_counter() - t


def run_decode(reqs) -> float:
    t = time.perf_counter()
    for data, _, _ in reqs:
        decode_message(data)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5, help="best of N runs")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this CPU (default: current)")
    args = ap.parse_args()
    cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    print(f"pinned to CPU {cpu}; {args.requests} requests from {args.nodes} nodes, "
          f"best of {args.repeat}; Python {sys.version.split()[0]}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for algorithm in ("hmac-md5", "keyed-md5"):
        nodes, reqs = build(args.nodes, args.requests, algorithm)
        n = len(reqs)
        mac = dec = eng = float("inf")
        for _ in range(args.repeat):  # interleaved, so that load changes hit all three
            mac = min(mac, run_hmac(nodes, reqs))
            dec = min(dec, run_decode(reqs))
            eng = min(eng, run_engine(nodes, reqs))
        print(f"\n[{algorithm}] request size {len(reqs[0][0])} bytes")
        print(f"  authenticator only : {n / mac:>10,.0f} /s  ({mac / n * 1e6:6.2f} us)")
        print(f"  decode only        : {n / dec:>10,.0f} /s  ({dec / n * 1e6:6.2f} us)")
        print(f"  HA engine          : {n / eng:>10,.0f} requests/s  ({eng / n * 1e6:6.2f} us)")
        print(f"  engine / authenticator cost ratio: {eng / mac:5.1f}x; "
              f"engine / decode: {eng / dec:5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
