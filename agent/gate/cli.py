"""``mipmobike gate status|open|close [IFACE]``: the operator's view of the gate.

Works on the installed gate of an agent instance (running or not): it opens
the pinned BPF objects or reads the netfilter rules, and never compiles
anything unless ``close`` has to attach the gate to a new interface.
"""

from __future__ import annotations

import argparse
import json
import sys

from .core import DEFAULT_BPFFS, Gate
from .defs import GateError, GateState


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("status", "open", "close"),
                        help="show state and counters, open a link, or close it (attaching the gate)")
    parser.add_argument("iface", nargs="?", help="interface (required for open/close)")
    parser.add_argument("--instance", default="mn", help="agent instance name (default: mn)")
    parser.add_argument("--backend", default="auto", choices=("auto", "bpf", "netfilter"),
                        help="backend for a new gate (an installed one keeps its own)")
    parser.add_argument("--bpffs", default=DEFAULT_BPFFS, help=f"bpffs of the pins (default: {DEFAULT_BPFFS})")
    parser.add_argument("--netns", default=None, help="act in this named network namespace")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _fmt_counts(d: dict) -> str:
    parts = [f"{k}={v}" for k, v in d.items() if v]
    return " ".join(parts) or "-"


def _print_status(st: dict, iface: str | None) -> None:
    print(f"gate {st['instance']} ({st['backend']} backend), allow-list ipset {st['ipset']}:")
    for e in st["allowed"] or ["(empty)"]:
        print(f"  {e}")
    ifs = st["interfaces"]
    if iface is not None:
        ifs = {k: v for k, v in ifs.items() if k == iface}
    if not ifs:
        print("no gated interface" + (f" named {iface}" if iface else ""))
    for name, d in ifs.items():
        print(f"{name}: {d['state']}")
        for direction in ("egress", "ingress"):
            c = d["counters"][direction]
            print(f"  {direction:7} pass: {_fmt_counts(c['pass'])}")
            print(f"  {'':7} drop: {_fmt_counts(c['drop'])}")


def run(args: argparse.Namespace) -> int:
    if args.action in ("open", "close") and not args.iface:
        print(f"mipmobike gate {args.action}: which interface?", file=sys.stderr)
        return 2
    try:
        gate = Gate(args.instance, backend=args.backend, bpffs=args.bpffs, netns=args.netns,
                    create=args.action == "close")
    except GateError as e:
        print(f"mipmobike gate: {e}", file=sys.stderr)
        return 1
    try:
        if args.action == "status":
            st = gate.status()
            if args.iface is not None and args.iface not in st["interfaces"]:
                print(f"mipmobike gate: {args.iface} is not gated", file=sys.stderr)
                if not args.json:
                    return 1
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                _print_status(st, args.iface)
            return 0
        if args.action == "open":
            gate.open(args.iface)
        elif gate.state(args.iface) is None:
            gate.attach(args.iface, GateState.CLOSED)
        else:
            gate.close(args.iface)
        print(f"{args.iface}: {gate.state(args.iface).value}")
        return 0
    except GateError as e:
        print(f"mipmobike gate: {e}", file=sys.stderr)
        return 1
    finally:
        gate.release()
