#!/usr/bin/env python3
"""Benchmark the trust gate: packets per second through a veth, gate open vs
no program vs empty programs on the same hooks, paired within each round.

    sudo .venv/bin/python scripts/bench_gate.py [--seconds 2] [--rounds 5] [--size 64] [--json PATH|-]

Two namespaces joined by a veth; iperf3 sends UDP (``-b 0``, small packets)
from A to B (egress: through A's TC egress hook) and from B to A (``-R``:
ingress, A's XDP or TC ingress hook). Client and server are pinned to
different CPUs (``-A``). Configurations of A's end of the veth:

    none       no program (no clsact qdisc, no XDP)
    none_aa    the same again: an A/A control, the method's own scatter
    empty_xdp  empty programs: TC egress (TC_ACT_UNSPEC) + XDP ingress (XDP_PASS)
    empty_tc   empty programs: TC egress + TC ingress
    gate_xdp   the gate, open: TC egress + XDP ingress (gate.ingress = xdp)
    gate_tc    the gate, open: TC egress + TC ingress (gate.ingress = tc; what "auto" picks on a veth)

and, with ``--configs``, diagnostics: ``clsact`` (the qdisc without a
filter), ``sham`` (the empty programs on an idle second veth in A: what
switching itself leaves behind, static keys and RCU included), and on
kernels with TCX (6.6+) ``empty_tcx`` / ``gate_tcx``: the same TC programs
attached to the device's TCX hooks instead of a clsact qdisc's filters.

One iperf3 test runs per direction while the configurations take turns
under it in short slices (switch, settle ``--settle``, count ``--slice``),
cycling through all of them, each cycle in a fresh random order (``--seed``)
so that whatever a switch leaves behind falls on every configuration alike,
not always on the same neighbours; this process does its switching on the
receiver's CPU, off the sender's. A round is ``--seconds`` / ``--slice``
cycles, so each configuration is counted for ``--seconds`` per round and
direction. Each configuration is judged by its PAIRED ratio: per cycle its
packets per second over those of "none" in the same cycle, a second or so
apart; per round the median over its cycles; reported: the median over the
rounds and their range (the baseline moves by tens of percent over seconds
on a shared machine, slices close in time move together). gate_x / empty_x,
paired the same way, is what the gate's logic costs on top of the hook.
Packets are counted by the receiving interface (kernel counters,
independent of how fast iperf3 reads).

Next to packets per second: the sender's CPU time per packet (its
schedstat run time plus ksoftirqd's, over the packets counted). The sender
does the whole path of a packet through the veth in its own context, so
this does not depend on how much of the CPU it got; it still moves with
cache and memory contention from other load, less than pps does.

Closed: iperf3 cannot run through a closed gate (its UDP test starts with a
UDP handshake), so one Python loop sends on a connected socket with and
without the closed gate, alternating; the gate's drop counter must match
what was sent. Finally BPF_PROG_TEST_RUN times each program path in the
kernel (ns per packet), the empty programs too: gate ns - empty ns is the
gate's logic, and ns / (1e9 / pps of "none") is what a program should cost
if the sending CPU does all the work of a packet (the cost model).

``--json PATH`` (``-``: stdout, the tables then go to stderr) writes every
number. Needs root, iperf3 and bcc. Everything it creates carries a random
token and is removed at exit.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import secrets
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyroute2 import IPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

from agent.gate import Gate, GateState  # noqa: E402
from agent.gate.allowlist import AllowEntry  # noqa: E402
from agent.gate.bpf_backend import TC_EGRESS, TC_INGRESS, ensure_bpffs, unmount_bpffs  # noqa: E402
from agent.gate import bpfsys  # noqa: E402
from agent.gate.bpfsys import prog_test_run  # noqa: E402
from agent.gate.nsutil import netns  # noqa: E402
from agent.bench.env import sigterm_exits  # noqa: E402

A_ADDR, B_ADDR = "10.211.0.1", "10.211.0.2"
PORT = 5201
DIRECTIONS = ("egress", "ingress")
CONFIGS = {
    "none": "no program",
    "none_aa": "no program, again (A/A control)",
    "empty_xdp": "empty programs, TC egress + XDP ingress",
    "empty_tc": "empty programs, TC egress + TC ingress",
    "gate_xdp": "gate open, TC egress + XDP ingress",
    "gate_tc": "gate open, TC egress + TC ingress (default on veth)",
}
EXTRA_CONFIGS = {
    "clsact": "clsact qdisc, no filter",
    "sham": "sham: empty programs on an idle veth",
    # TCX (kernel 6.6+): the same SCHED_CLS programs on the device's own hooks, no qdisc or classifier
    "empty_tcx": "empty programs, TCX egress + TCX ingress",
    "gate_tcx": "gate open, TCX egress + TCX ingress (the gate's TC programs)",
}
ALL_CONFIGS = {**CONFIGS, **EXTRA_CONFIGS}
GATE_VS_EMPTY = {"gate_xdp": "empty_xdp", "gate_tc": "empty_tc", "gate_tcx": "empty_tcx"}

# The hook's own cost: programs that do nothing, attached like the gate's.
EMPTY_C = r"""
#include <uapi/linux/pkt_cls.h>

int empty_tc(struct __sk_buff *skb)
{
    return TC_ACT_UNSPEC;
}

int empty_xdp(struct xdp_md *ctx)
{
    return XDP_PASS;
}
"""
EMPTY_TC_NAME = "mmbench-empty"


def sh(*argv, check=True, **kw):
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


class EmptyPrograms:
    """The empty TC and XDP programs, loaded with bcc in namespace ``ns``."""

    def __init__(self, ns: str) -> None:
        from bcc import BPF
        self.ns = ns
        with netns(ns):
            self.bpf = BPF(text=EMPTY_C)
            self.fds = {"tc": self.bpf.load_func("empty_tc", BPF.SCHED_CLS).fd,
                        "xdp": self.bpf.load_func("empty_xdp", BPF.XDP).fd}

    def attach(self, ifname: str, ingress: str) -> None:
        """Like the gate: clsact + direct-action bpf filter (prio 1) on egress; on ingress XDP
        (no mode flags: the kernel picks the driver mode, as for the gate) or another filter."""
        with netns(self.ns), IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.tc("add", "clsact", idx)
            parents = [TC_EGRESS] + ([TC_INGRESS] if ingress == "tc" else [])
            for parent in parents:
                ipr.tc("replace-filter", "bpf", idx, 1, fd=self.fds["tc"], name=EMPTY_TC_NAME,
                       parent=parent, classid=1, direct_action=True, prio=1)
            if ingress == "xdp":
                ipr.link("set", index=idx, xdp_fd=self.fds["xdp"])

    def detach(self, ifname: str) -> None:
        with netns(self.ns), IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=idx, xdp_fd=-1)
            try:
                ipr.tc("del", "clsact", idx)      # and its filters
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.EINVAL):
                    raise

    def close(self) -> None:
        self.bpf.cleanup()


class Counter:
    """rx_packets of one interface, over a netlink socket opened once inside its namespace."""

    def __init__(self, ns: str, ifname: str) -> None:
        with netns(ns):
            self.ipr = IPRoute()
        self.idx = self.ipr.link_lookup(ifname=ifname)[0]

    def read(self) -> int:
        return self.ipr.get_links(self.idx)[0].get_attr("IFLA_STATS64")["rx_packets"]

    def close(self) -> None:
        self.ipr.close()


def _runtime_ns(pid: int) -> int:
    """CPU time a task has run (ns, /proc/PID/schedstat: precise, includes softirq work done in its context)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def _ksoftirqd_pids() -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().startswith("ksoftirqd/"):
                        out.append(int(d))
            except OSError:
                pass
    return out


class Flow:
    """One iperf3 UDP test (``-b 0``) from A to B (``reverse``: B to A) running while the
    configurations change under it. ``sample()``: packets the receiving interface counted, the
    sender's CPU time (the client; with -R the server) plus ksoftirqd's, at one instant.

    The sender does the whole path of a packet through the veth in its own context (veth hands
    the packet to the other side in softirq on the sending CPU); its CPU time per packet does not
    depend on how much of the CPU it got, its packets per second do."""

    def __init__(self, a: str, counter: Counter, seconds: int, size: int, reverse: bool,
                 cpus: tuple[int, int] | None, srv_pid: int) -> None:
        self.counter = counter
        self.ksoft = _ksoftirqd_pids()
        pin = ["-A", f"{cpus[0]},{cpus[1]}"] if cpus else []
        for attempt in range(3):
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", a, "iperf3", "-c", B_ADDR, "-p", str(PORT), "-u", "-b", "0",
                 "-l", str(size), "-t", str(seconds), *pin, *(["-R"] if reverse else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
            self.sender = srv_pid if reverse else self.proc.pid
            n0, end = counter.read(), time.monotonic() + 3
            while time.monotonic() < end and self.proc.poll() is None:
                time.sleep(0.1)
                if counter.read() - n0 > 1000:
                    return
            self.stop()
            time.sleep(0.5)          # server not listening yet, or still busy with a failed test
        raise RuntimeError(f"iperf3 did not start sending: {self.err}")

    def sample(self) -> tuple[float, int, int]:
        if self.proc.poll() is not None:
            raise RuntimeError(f"iperf3 ended early: {self.proc.stderr.read().strip()[-400:]}")
        cpu = _runtime_ns(self.sender) + sum(_runtime_ns(k) for k in self.ksoft)
        return time.monotonic(), self.counter.read(), cpu

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)      # iperf3 ends the test with the server properly
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.err = self.proc.stderr.read().strip()[-400:]
        self.proc.stderr.close()


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


def spread(vals: list[float]) -> dict:
    return {"ratios": [round(v, 4) for v in vals], "median": round(statistics.median(vals), 4),
            "min": round(min(vals), 4), "max": round(max(vals), 4)}


def time_prog(fd: int, frame: bytes, repeat: int) -> tuple[int, int]:
    """(return value, ns per run): the median of three BPF_PROG_TEST_RUN calls."""
    runs = [prog_test_run(fd, frame, repeat) for _ in range(3)]
    return runs[0][0], int(statistics.median(ns for _, ns in runs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0,
                    help="per round, configuration and direction: counted time, in slices")
    ap.add_argument("--slice", type=float, default=0.25, help="seconds counted per turn of a configuration")
    ap.add_argument("--settle", type=float, default=0.05, help="seconds after each switch before counting")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each measures every configuration both ways")
    ap.add_argument("--size", type=int, default=64, help="UDP payload bytes")
    ap.add_argument("--cpus", default="0,1" if (os.cpu_count() or 1) >= 2 else "none",
                    help="iperf3 client,server CPUs (-A), or 'none'")
    ap.add_argument("--repeat", type=int, default=1_000_000, help="BPF_PROG_TEST_RUN repetitions")
    ap.add_argument("--seed", type=int, help="of the configurations' order in each cycle (default: random)")
    ap.add_argument("--configs", type=lambda v: v.split(","), default=list(CONFIGS),
                    help=f"comma list, first 'none'; known: {', '.join(list(CONFIGS) + list(EXTRA_CONFIGS))}")
    ap.add_argument("--json", metavar="PATH", help="write every number as JSON to PATH ('-': stdout)")
    args = ap.parse_args()
    sigterm_exits()            # a kill tears down too (finally blocks run)
    if os.geteuid() != 0:
        print("bench_gate: needs root", file=sys.stderr)
        return 2
    if args.configs[0] != "none" or not set(args.configs) <= set(ALL_CONFIGS) or len(set(args.configs)) < len(args.configs):
        ap.error(f"--configs: 'none' first, then some of {', '.join(list(ALL_CONFIGS)[1:])}, each once")
    if min(args.seconds, args.slice) <= 0 or args.settle < 0:
        ap.error("--seconds and --slice must be positive, --settle not negative")
    cpus = None if args.cpus == "none" else tuple(int(x) for x in args.cpus.split(","))
    if cpus is not None and len(cpus) != 2:
        ap.error("--cpus: client,server")
    human = sys.stderr if args.json == "-" else sys.stdout

    def say(*a) -> None:
        print(*a, file=human, flush=True)

    tok = secrets.token_hex(3)
    a, b = f"mmbench-{tok}-a", f"mmbench-{tok}-b"
    a_if, b_if = f"bga{tok}", f"bgb{tok}"
    root = f"/run/mipmobike/bench-{tok}"
    gate = empty = srv = None
    counters: dict[str, Counter] = {}
    doc: dict = {"version": 2, "payload": args.size, "rounds": args.rounds, "seconds": args.seconds,
                 "repeat": args.repeat, "cpus": {"client": cpus[0], "server": cpus[1]} if cpus else None,
                 "configs": {c: ALL_CONFIGS[c] for c in args.configs}, "loadavg_start": os.getloadavg()}
    sh("ip", "netns", "add", a)
    sh("ip", "netns", "add", b)
    try:
        sh("ip", "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b)
        for ns, ifn, addr in ((a, a_if, A_ADDR), (b, b_if, B_ADDR)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifn)
            sh("ip", "-n", ns, "link", "set", ifn, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sham_if = f"bgs{tok}"
        if "sham" in args.configs:
            # the same switching as empty_xdp (static keys, RCU, NAPI), away from the measured path
            sh("ip", "-n", a, "link", "add", sham_if, "type", "veth", "peer", "name", f"bgt{tok}")
            sh("ip", "-n", a, "link", "set", sham_if, "up")
            sh("ip", "-n", a, "link", "set", f"bgt{tok}", "up")
        ensure_bpffs(root)
        t0 = time.monotonic()
        gate = Gate("b" + tok, backend="bpf", netns=a, bpffs=root)
        gate.set_allowed(home_agents=[], gateways=[])
        empty = EmptyPrograms(a)
        say(f"gate and empty programs compiled and loaded in {time.monotonic() - t0:.2f} s (bcc)")
        srv = subprocess.Popen(["ip", "netns", "exec", b, "iperf3", "-s", "-B", B_ADDR, "-p", str(PORT),
                                *(["-A", str(cpus[1])] if cpus else [])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(0.3)
        counters = {"egress": Counter(b, b_if), "ingress": Counter(a, a_if)}

        a_idx = int(sh("ip", "netns", "exec", a, "cat", f"/sys/class/net/{a_if}/ifindex").stdout)
        tcx_fds = {"empty_tcx": (empty.fds["tc"], empty.fds["tc"]),
                   "gate_tcx": (gate.backend.prog_fds["gate_egress"], gate.backend.prog_fds["gate_ingress_tc"])}

        def tcx(cfg: str, attach: bool) -> None:
            fn = bpfsys.tcx_attach if attach else bpfsys.tcx_detach
            if cfg == "gate_tcx" and attach:
                gate.backend._set(a_idx, GateState.OPEN)
            with netns(a):                        # the ifindex is resolved in the caller's namespace
                for fd, hook in zip(tcx_fds[cfg], (bpfsys.BPF_TCX_EGRESS, bpfsys.BPF_TCX_INGRESS)):
                    fn(a_idx, fd, hook)

        def setup(cfg: str) -> None:
            if cfg in tcx_fds:
                tcx(cfg, True)
            elif cfg == "clsact":
                with netns(a), IPRoute() as ipr:
                    ipr.tc("add", "clsact", ipr.link_lookup(ifname=a_if)[0])
            elif cfg.startswith("gate_"):
                gate.backend.ingress_hook = cfg.split("_")[1]
                gate.attach(a_if, GateState.OPEN)
            elif cfg.startswith("empty_"):
                empty.attach(a_if, cfg.split("_")[1])
            elif cfg == "sham":
                empty.attach(sham_if, "xdp")

        def teardown(cfg: str) -> None:
            if cfg in tcx_fds:
                tcx(cfg, False)
            elif cfg.startswith("gate_"):
                gate.detach(a_if)
            elif cfg.startswith("empty_") or cfg == "clsact":
                empty.detach(a_if)
            elif cfg == "sham":
                empty.detach(sham_if)

        # Per direction one iperf3 test runs throughout; the configurations take turns under it in
        # slices (switch, settle, count for --slice s), each cycle in a random order. A round
        # is seconds/slice cycles: per round each configuration is counted for --seconds in all.
        order = args.configs
        cycles = max(1, round(args.seconds / args.slice))
        per_dir = args.rounds * cycles * len(order) * (args.slice + args.settle + 0.15)
        kpps = {d: {c: [] for c in order} for d in DIRECTIONS}
        cpu_ns = {d: {c: [] for c in order} for d in DIRECTIONS}
        slices = {d: [] for d in DIRECTIONS}          # [round, cycle, config, packets, seconds, CPU ns]
        home_cpus = os.sched_getaffinity(0)
        seed = args.seed if args.seed is not None else secrets.randbits(32)
        shuffle = random.Random(seed)
        for d in DIRECTIONS:
            rx = counters[d]
            if cpus:
                # switching configurations costs this process CPU: keep it off the sender's CPU
                os.sched_setaffinity(0, {cpus[1] if d == "egress" else cpus[0]})
            flow = Flow(a, rx, int(per_dir * 2) + 30, args.size, d == "ingress", cpus, srv.pid)
            try:
                for r in range(args.rounds):
                    for k in range(cycles):
                        for cfg in shuffle.sample(order, len(order)):
                            setup(cfg)
                            try:
                                time.sleep(args.settle)
                                t0, n0, c0 = flow.sample()
                                time.sleep(args.slice)
                                t1, n1, c1 = flow.sample()
                            finally:
                                teardown(cfg)
                            slices[d].append([r, k, cfg, n1 - n0, round(t1 - t0, 4), c1 - c0])
                    mine = [x for x in slices[d] if x[0] == r]
                    for c in order:
                        n = sum(x[3] for x in mine if x[2] == c)
                        kpps[d][c].append(round(n / sum(x[4] for x in mine if x[2] == c) / 1000, 2))
                        cpu_ns[d][c].append(round(sum(x[5] for x in mine if x[2] == c) / n, 1) if n else float("nan"))
                    say(f"  {d} round {r + 1}/{args.rounds}: kpps " + " ".join(f"{kpps[d][c][-1]:.0f}" for c in order)
                        + "; sender CPU ns/packet " + " ".join(f"{cpu_ns[d][c][-1]:.0f}" for c in order))
            finally:
                flow.stop()
                os.sched_setaffinity(0, home_cpus)

        def round_ratios(d: str, x: str, base: str, cpu: bool) -> list[float]:
            """Per round: the median over its cycles of X's slice against base's slice of the same cycle.
            pps: X / base. CPU: base's CPU ns per packet / X's (the pps ratio the sender would show had
            it a CPU of its own). Above 1 is faster in both. A slice disturbed by a burst of other
            load spoils one pair, not the round."""
            out = []
            for r in range(args.rounds):
                cyc = {}
                for rr, k, c, n, t, ns in slices[d]:
                    if rr == r and c in (x, base) and n:
                        cyc.setdefault(k, {})[c] = (ns / n) if cpu else (n / t)
                vals = [(v[base] / v[x]) if cpu else (v[x] / v[base]) for v in cyc.values() if len(v) == 2]
                out.append(statistics.median(vals))
            return out

        paired = {d: {c: spread(round_ratios(d, c, "none", False)) for c in order if c != "none"} for d in DIRECTIONS}
        cpu_paired = {d: {c: spread(round_ratios(d, c, "none", True)) for c in order if c != "none"} for d in DIRECTIONS}
        pairs = [(g, e_) for g, e_ in GATE_VS_EMPTY.items() if g in order and e_ in order]
        vs_empty = {d: {g: spread(round_ratios(d, g, e_, False)) for g, e_ in pairs} for d in DIRECTIONS}
        cpu_vs_empty = {d: {g: spread(round_ratios(d, g, e_, True)) for g, e_ in pairs} for d in DIRECTIONS}
        doc.update(order=f"one iperf3 test per direction; configurations take turns in {args.slice:g} s slices "
                         f"({args.settle:g} s settling after each switch), {cycles} cycles per round, "
                         f"each cycle in a random order", seed=seed, slice=args.slice, settle=args.settle,
                   kpps=kpps, median_kpps={d: {c: round(statistics.median(v), 2) for c, v in kpps[d].items()}
                                                for d in DIRECTIONS},
                   paired=paired, gate_vs_empty=vs_empty,
                   cpu_ns_per_packet=cpu_ns,
                   median_cpu_ns={d: {c: round(statistics.median(v), 1) for c, v in cpu_ns[d].items()}
                                  for d in DIRECTIONS},
                   cpu_paired=cpu_paired, cpu_gate_vs_empty=cpu_vs_empty,
                   slices_columns=["round", "cycle", "config", "packets", "seconds", "sender_cpu_ns"], slices=slices)

        def rng(x: dict) -> str:
            return f"{x['median']:.3f} [{x['min']:.3f}-{x['max']:.3f}]"

        say(f"\nUDP {args.size}-byte payload, iperf3 -b 0 "
            f"({f'client CPU {cpus[0]}, server CPU {cpus[1]}' if cpus else 'not pinned'}), "
            f"{args.rounds} rounds x {cycles} cycles x {args.slice:g} s slices, configurations taking turns; "
            f"pps counted by the receiving veth; ratio: X's slice / the 'none' slice of the same cycle (random "
            f"order per cycle), median per round, then median [min-max] over the rounds; cpu: the sender's CPU ns per "
            f"packet, ratio none/X")
        for d, label in (("egress", "egress  A->B (A's TC egress)"), ("ingress", "ingress B->A (A's XDP or TC ingress)")):
            say(f"  {label:46} {'kpps':>7}  {'pps ratio':21}  {'cpu ns':>6}  {'cpu ratio':21}  gate/empty pps, cpu")
            for c in order:
                line = f"    {ALL_CONFIGS[c]:44} {doc['median_kpps'][d][c]:7.1f}  "
                line += f"{rng(paired[d][c]) if c != 'none' else '':21}  {doc['median_cpu_ns'][d][c]:6.0f}  "
                line += f"{rng(cpu_paired[d][c]) if c != 'none' else '':21}"
                if c in vs_empty[d]:
                    line += f"  {rng(vs_empty[d][c])}, {rng(cpu_vs_empty[d][c])}"
                say(line.rstrip())
            say("    per round (kpps): " + "; ".join(f"{c} " + " ".join(f"{v:.0f}" for v in kpps[d][c])
                                                   for c in order))
            say("    per round (cpu ns/packet): " + "; ".join(f"{c} " + " ".join(f"{v:.0f}" for v in cpu_ns[d][c])
                                                            for c in order))

        # closed: what dropping costs the sender. iperf3 cannot run through a
        # closed gate (its UDP test starts with a UDP handshake), so one Python
        # loop sends on a connected socket, with and without the closed gate.
        srv_stop(srv)
        srv = None
        none_pps, closed_pps, dropped = [], [], 0
        gate.backend.ingress_hook = "xdp"
        for r in range(args.rounds):
            none_pps.append(blast(a, args.seconds / 2, args.size))
            gate.attach(a_if, GateState.CLOSED)
            c0 = gate.counters(a_if)["egress"]["drop"]["udp"]
            closed_pps.append(blast(a, args.seconds / 2, args.size))
            dropped += gate.counters(a_if)["egress"]["drop"]["udp"] - c0
            gate.detach(a_if)
        sent_closed = round(sum(closed_pps) * args.seconds / 2)
        closed = spread([c / n for c, n in zip(closed_pps, none_pps)])
        doc["closed"] = {"none_kpps": [round(x / 1000, 2) for x in none_pps],
                         "closed_kpps": [round(x / 1000, 2) for x in closed_pps],
                         "paired": closed, "dropped": dropped, "sent": sent_closed}
        say("\nclosed (UDP dropped by the gate at A's TC egress), one Python sender on a connected socket:")
        say(f"  sender  none {statistics.median(none_pps) / 1000:.1f} kpps, closed "
            f"{statistics.median(closed_pps) / 1000:.1f} kpps; closed/none paired {closed['median']:.3f} "
            f"[{closed['min']:.3f} - {closed['max']:.3f}]")
        say(f"  dropped and counted by the gate: {dropped} of {sent_closed} sent")

        # per-packet cost of each program path, in the kernel
        be = gate.backend
        rows = []
        with netns(a):
            lo = socket.if_nametoindex("lo")    # test runs see the namespace's loopback device
            be.sync_allowed([AllowEntry("10.211.0.9", 17, 500, "bench ike")])
            frames = {"udp": udp_frame(B_ADDR, 9999), "ike": udp_frame("10.211.0.9", 500)}
            progs = (("gate_egress", "TC egress"), ("gate_ingress", "XDP ingress"), ("gate_ingress_tc", "TC ingress"))
            for state in (GateState.OPEN, GateState.CLOSED):
                be._set(lo, state)
                for prog, hook in progs:
                    for kind in (["udp"] if state == GateState.OPEN else ["udp", "ike"]):
                        frame = frames[kind]
                        if prog != "gate_egress" and kind == "ike":   # the peer answering from port 500
                            frame = frame[:34] + struct.pack("!HH", 500, 40000) + frame[38:]
                            frame = frame[:26] + frame[30:34] + frame[26:30] + frame[34:]
                        ret, ns_per = time_prog(be.prog_fds[prog], frame, args.repeat)
                        xdp = prog == "gate_ingress"
                        verdict = ({1: "drop", 2: "pass"} if xdp else {2: "drop", 0xFFFFFFFF: "pass"}).get(ret, f"ret {ret}")
                        rows.append({"hook": hook, "prog": prog, "state": state.value,
                                     "packet": "any" if state == GateState.OPEN else kind, "verdict": verdict,
                                     "ns": ns_per})
            be.forget(lo)
            empty_ns = {"TC": time_prog(empty.fds["tc"], frames["udp"], args.repeat)[1],
                        "XDP": time_prog(empty.fds["xdp"], frames["udp"], args.repeat)[1]}
        open_ns = {r["hook"]: r["ns"] for r in rows if r["state"] == "open"}
        logic_ns = {h: open_ns[h] - empty_ns[h.split()[0]] for h in open_ns}
        # cost model: a program's ns over the time one packet takes with no program, 1e9 / pps (the
        # sender's CPU does the whole path of a packet through a veth); predicted ratio = 1 / (1 +
        # that fraction). cpu_fraction: over the sender's measured CPU ns per packet instead, which
        # 1e9 / pps overstates when the sender did not have its CPU to itself.
        model = {}
        for key, d, hook in (("egress", "egress", "TC egress"), ("ingress_xdp", "ingress", "XDP ingress"),
                             ("ingress_tc", "ingress", "TC ingress")):
            packet_ns = 1e9 / (doc["median_kpps"][d]["none"] * 1000)
            cpu_packet_ns = doc["median_cpu_ns"][d]["none"]
            ns_empty = empty_ns[hook.split()[0]]
            model[key] = {"hook": hook, "packet_ns": round(packet_ns), "cpu_packet_ns": round(cpu_packet_ns),
                          "gate_ns": open_ns[hook], "empty_ns": ns_empty, "logic_ns": logic_ns[hook],
                          "fraction": round(open_ns[hook] / packet_ns, 4),
                          "predicted_ratio": round(1 / (1 + open_ns[hook] / packet_ns), 4),
                          "cpu_fraction": round(open_ns[hook] / cpu_packet_ns, 4),
                          "logic_fraction": round(logic_ns[hook] / packet_ns, 4)}
        doc.update(prog_ns=rows, empty_ns=empty_ns, logic_ns=logic_ns, cost_model=model,
                   loadavg_end=os.getloadavg())
        say(f"\nper-packet program cost (BPF_PROG_TEST_RUN, median of 3 x {args.repeat} runs; no program = 0 ns):")
        for r in rows:
            say(f"  {r['hook']:12} {r['state']:6} {r['packet']:4} -> {r['verdict']:4} {r['ns']:5d} ns")
        say(f"  empty programs: TC {empty_ns['TC']} ns, XDP {empty_ns['XDP']} ns -> the gate's logic (open): "
            + ", ".join(f"{h} {v} ns" for h, v in logic_ns.items()))
        say("cost model (gate ns / ns per packet with no program, 1e9/pps -> predicted ratio; over the sender's CPU ns):")
        for key, m in model.items():
            say(f"  {key:12} {m['gate_ns']:4d} ns / {m['packet_ns']} ns = {m['fraction'] * 100:.2f} % -> "
                f"{m['predicted_ratio']:.3f}; / {m['cpu_packet_ns']} CPU ns = {m['cpu_fraction'] * 100:.2f} %; "
                f"logic alone {m['logic_ns']} ns = {m['logic_fraction'] * 100:.2f} %")
        if args.json:
            text = json.dumps(doc, indent=1) + "\n"
            if args.json == "-":
                sys.stdout.write(text)
            else:
                with open(args.json, "w") as f:
                    f.write(text)
        return 0
    finally:
        for c in counters.values():
            c.close()
        if srv is not None:
            srv_stop(srv)
        if empty is not None:
            empty.close()
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


def srv_stop(srv: subprocess.Popen) -> None:
    try:
        os.killpg(srv.pid, 15)
        srv.wait(5)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(srv.pid, 9)
        srv.wait()


if __name__ == "__main__":
    sys.exit(main())
