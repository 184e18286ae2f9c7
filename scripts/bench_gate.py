#!/usr/bin/env python3
"""Benchmark the trust gate: packets per second through a veth, gate open vs
no program, measured side by side in one run, and what the gate costs closed.

    sudo .venv/bin/python scripts/bench_gate.py [--seconds 2] [--rounds 3] [--size 64] [--ingress xdp|tc]

Two namespaces joined by a veth; iperf3 sends UDP (``-b 0``, small packets)
from A to B (egress through the gate on A's end: TC) and from B to A
(``-R``: ingress, XDP or TC). Rounds alternate no program, gate open with XDP
ingress and gate open with TC ingress, so drift hits all three; packets per
second are counted by the receiving interface (kernel counters, independent
of how fast iperf3 reads). Closed: iperf3 cannot run through a closed gate
(its UDP test starts with a UDP handshake), so one Python loop sends on a
connected socket with and without the closed gate; the gate's drop counter
must match what was sent. Finally BPF_PROG_TEST_RUN times each program path
in the kernel (ns per packet): open fast path, closed drop, closed pass.

On a shared 2-core machine the pps figures move by 10-20 % between rounds;
read the ratios with the per-round numbers printed next to them.

Needs root, iperf3 and bcc. Everything it creates carries a random token and
is removed at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyroute2 import IPRoute  # noqa: E402

from agent.gate import Gate, GateState  # noqa: E402
from agent.gate.allowlist import AllowEntry, AllowList  # noqa: E402
from agent.gate.bpf_backend import ensure_bpffs, unmount_bpffs  # noqa: E402
from agent.gate.bpfsys import prog_test_run  # noqa: E402
from agent.gate.nsutil import netns  # noqa: E402

A_ADDR, B_ADDR = "10.211.0.1", "10.211.0.2"
PORT = 5201


def sh(*argv, check=True, **kw):
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


def rx_packets(ns: str, ifname: str) -> int:
    with netns(ns), IPRoute() as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
    return link.get_attr("IFLA_STATS64")["rx_packets"]


def iperf(a: str, b: str, a_if: str, b_if: str, seconds: float, size: int, reverse: bool) -> dict:
    """One iperf3 UDP run; pps seen by the receiving interface and sent by iperf3."""
    srv = subprocess.Popen(["ip", "netns", "exec", b, "iperf3", "-s", "-1", "-B", B_ADDR, "-p", str(PORT)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.3)
        rx_ns, rx_if = (a, a_if) if reverse else (b, b_if)
        before = rx_packets(rx_ns, rx_if)
        t0 = time.monotonic()
        p = sh("ip", "netns", "exec", a, "iperf3", "-c", B_ADDR, "-p", str(PORT), "-u", "-b", "0", "-l", str(size),
               "-t", str(seconds), "-J", *(["-R"] if reverse else []), check=False, timeout=seconds + 30)
        elapsed = time.monotonic() - t0
        after = rx_packets(rx_ns, rx_if)
        try:
            sent = json.loads(p.stdout)["end"]["sum_sent"]
            sent_pps = sent["packets"] / sent["seconds"]
        except (ValueError, KeyError, ZeroDivisionError):
            sent_pps = float("nan")
        # the interface also counts the control connection; a few dozen packets
        return {"rx_pps": (after - before) / max(seconds, 1e-9), "sent_pps": sent_pps, "elapsed": elapsed}
    finally:
        try:
            srv.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(srv.pid, 9)
            srv.wait()


def blast(ns: str, seconds: float, size: int) -> float:
    """Send UDP to B as fast as one Python loop can for ``seconds``: packets per second."""
    with netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.connect((B_ADDR, 9))
        data = b"\0" * size
        n = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(256):
                try:
                    s.send(data)
                except OSError:
                    pass
            n += 256
        return n / seconds


def udp_frame(dst: str, dport: int, sport: int = 40000, payload: bytes = b"x" * 32) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(A_ADDR), socket.inet_aton(dst))
    return b"\x02\0\0\0\0\2" + b"\x02\0\0\0\0\1" + b"\x08\x00" + ip + udp


def fmt(pps: float) -> str:
    return f"{pps / 1000:8.1f} kpps"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=64, help="UDP payload bytes")
    ap.add_argument("--ingress", choices=("xdp", "tc"), default="xdp",
                    help="ingress hook for the closed-gate and program-cost parts")
    ap.add_argument("--repeat", type=int, default=1_000_000, help="BPF_PROG_TEST_RUN repetitions")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_gate: needs root", file=sys.stderr)
        return 2
    tok = secrets.token_hex(3)
    a, b = f"mmbench-{tok}-a", f"mmbench-{tok}-b"
    a_if, b_if = f"bga{tok}", f"bgb{tok}"
    root = f"/run/mipmobike/bench-{tok}"
    gate = None
    sh("ip", "netns", "add", a)
    sh("ip", "netns", "add", b)
    try:
        sh("ip", "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b)
        for ns, ifn, addr in ((a, a_if, A_ADDR), (b, b_if, B_ADDR)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifn)
            sh("ip", "-n", ns, "link", "set", ifn, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        ensure_bpffs(root)
        t0 = time.monotonic()
        gate = Gate("b" + tok, backend="bpf", netns=a, bpffs=root, ingress=args.ingress)
        print(f"gate compiled and loaded in {time.monotonic() - t0:.2f} s (bcc, once per process)")
        gate.set_allowed(home_agents=[], gateways=[])

        # rounds alternate: no program, gate open with XDP ingress, gate open with TC ingress
        cfgs = ("none", "xdp", "tc")
        res = {(d, c): [] for d in ("eg", "in") for c in cfgs}
        for r in range(args.rounds):
            for cfg in cfgs:
                if cfg != "none":
                    gate.backend.ingress_hook = cfg
                    gate.attach(a_if, GateState.OPEN)
                for direction, reverse in (("eg", False), ("in", True)):
                    res[(direction, cfg)].append(
                        iperf(a, b, a_if, b_if, args.seconds, args.size, reverse)["rx_pps"])
                if cfg != "none":
                    gate.detach(a_if)
        gate.backend.ingress_hook = args.ingress
        med = {k: statistics.median(v) for k, v in res.items()}
        print(f"\nUDP {args.size}-byte payload, iperf3 -b 0, {args.rounds} rounds x {args.seconds:g} s, "
              f"configurations alternating; pps counted by the receiving veth")
        print(f"  {'':28} {'no program':>14} {'open, XDP in':>14} {'open, TC in':>14}   ratio to none")
        for d, label in (("eg", "egress  A->B (TC egress)"), ("in", "ingress B->A (XDP or TC)")):
            print(f"  {label:28} {fmt(med[(d, 'none')]):>14} {fmt(med[(d, 'xdp')]):>14} "
                  f"{fmt(med[(d, 'tc')]):>14}   {med[(d, 'xdp')] / med[(d, 'none')]:.3f} / "
                  f"{med[(d, 'tc')] / med[(d, 'none')]:.3f}")
        print("  rounds (kpps): " + "; ".join(f"{d}/{c} " + " ".join(f"{v / 1000:.0f}" for v in vs)
                                            for (d, c), vs in res.items()))

        # closed: what dropping costs the sender. iperf3 cannot run through a
        # closed gate (its UDP test starts with a UDP handshake), so one Python
        # loop sends on a connected socket, with and without the closed gate.
        none_pps, closed_pps, dropped = [], [], 0
        for r in range(args.rounds):
            none_pps.append(blast(a, args.seconds / 2, args.size))
            gate.attach(a_if, GateState.CLOSED)
            c0 = gate.counters(a_if)["egress"]["drop"]["udp"]
            closed_pps.append(blast(a, args.seconds / 2, args.size))
            dropped += gate.counters(a_if)["egress"]["drop"]["udp"] - c0
            gate.detach(a_if)
        sent_closed = sum(closed_pps) * args.seconds / 2
        n, c = statistics.median(none_pps), statistics.median(closed_pps)
        print("\nclosed (UDP dropped by the gate at A's TC egress), one Python sender on a connected socket:")
        print(f"  sender            none {fmt(n)}   closed {fmt(c)}   closed/none = {c / n:.3f}")
        print(f"  dropped and counted by the gate: {dropped} of {sent_closed:.0f} sent")

        # per-packet cost of each program path, in the kernel
        be = gate.backend
        with netns(a):
            lo = socket.if_nametoindex("lo")    # test runs see the namespace's loopback device
            be.sync_allowed([AllowEntry("10.211.0.9", 17, 500, "bench ike")])
            frames = {"udp": udp_frame(B_ADDR, 9999), "ike": udp_frame("10.211.0.9", 500)}
            rows = []
            for state in (GateState.OPEN, GateState.CLOSED):
                be._set(lo, state)
                for prog, label in (("gate_egress", "TC egress"), ("gate_ingress", "XDP ingress")):
                    kinds = ["udp"] if state == GateState.OPEN else ["udp", "ike"]
                    for kind in kinds:
                        frame = frames[kind]
                        if prog == "gate_ingress" and kind == "ike":   # the peer answering from port 500
                            frame = frame[:34] + struct.pack("!HH", 500, 40000) + frame[38:]
                            frame = frame[:26] + frame[30:34] + frame[26:30] + frame[34:]
                        ret, ns_per = prog_test_run(be.prog_fds[prog], frame, args.repeat)
                        verdict = {(1, "gate_ingress"): "drop",
                                   (2, "gate_ingress"): "pass", (2, "gate_egress"): "drop",
                                   (0xFFFFFFFF, "gate_egress"): "pass"}.get((ret, prog), f"ret {ret}")
                        what = "any" if state == GateState.OPEN else kind
                        rows.append(f"  {label:12} {state.value:6} {what:4} -> {verdict:4} {ns_per:5d} ns")
            be.forget(lo)
        print(f"\nper-packet program cost (BPF_PROG_TEST_RUN, {args.repeat} runs each; no program = 0 ns):")
        print("\n".join(rows))
        return 0
    finally:
        if gate is not None:
            try:
                gate.destroy()
            finally:
                gate.release()
        sh("ip", "netns", "del", a, check=False)
        sh("ip", "netns", "del", b, check=False)
        unmount_bpffs(root)
        try:
            os.rmdir(root)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
