"""``mipmobike testbed up|down|status|move NET|exec NODE CMD|list|plan``.

    mipmobike testbed up [--id 1] [--at internal-1|none] [--ipsec auto|kernel|libipsec]
    mipmobike testbed move external-2 [--dhcp] [--gap 0.5]
    mipmobike testbed exec mn -- ping -c1 203.0.113.1
    mipmobike testbed status [--json]
    mipmobike testbed down
"""

from __future__ import annotations

import argparse
import json
import sys

from .layout import LAYOUTS
from .testbed import STATE_ROOT, Testbed, TestbedError, addresses_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Build the RFC 5266 Figure-1 network in namespaces, with real components."
    sub = parser.add_subparsers(dest="action", metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--id", default=None, help="testbed id: namespaces mmtb-ID-*, state in STATE_ROOT/ID "
                                                  "(default: 1 for up; otherwise the only testbed that is up)")
        p.add_argument("--state-root", default=STATE_ROOT, help=f"(default: {STATE_ROOT})")

    p = sub.add_parser("up", help="build everything and start DHCP servers, the VPN gateway and the agents")
    common(p)
    p.add_argument("--layout", default="figure1", choices=sorted(LAYOUTS))
    p.add_argument("--at", default="default", metavar="NET",
                   help="where the mobile node's interface starts (default: internal-1 in figure1, "
                        "op-lan in operator; 'none': detached)")
    p.add_argument("--ipsec", default="auto", choices=("auto", "kernel", "libipsec"),
                   help="gateway ESP data path (auto: kernel ESP if the kernel has it)")
    p.add_argument("--agents", default="auto", choices=("auto", "require", "none"),
                   help="start the i-HA / i-FA daemons: if present (auto), must (require), or not")
    p.add_argument("--json", action="store_true", help="print the state as JSON")

    p = sub.add_parser("down", help="stop everything and delete the namespaces (idempotent)")
    common(p)
    p.add_argument("--all", action="store_true", help="every testbed under the state root")
    p.add_argument("--keep-state", action="store_true", help="keep the state directory (logs, configs)")

    p = sub.add_parser("status", help="summary of a testbed")
    common(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("move", help="move the mobile node's interface to NET (link down, move, link up)")
    common(p)
    p.add_argument("net", metavar="NET", help="figure1: home, internal-1..3, external-1, external-2; "
                                              "operator: home, op-lan, op-wlan, cellular, internet, hotspot; or none")
    p.add_argument("--gap", type=float, default=0.0, help="seconds without link between leaving and arriving")
    p.add_argument("--dhcp", action="store_true",
                   help="then get a DHCP lease with pyroute2's client (only without an agent running)")

    p = sub.add_parser("exec", help="run a command inside a node's namespace")
    common(p)
    p.add_argument("node", help="mn, ha, cn, core, fa, inat, gw, fw, inet, nat, sw")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")

    p = sub.add_parser("list", help="testbeds that are up")
    p.add_argument("--state-root", default=STATE_ROOT)

    p = sub.add_parser("plan", help="print the address plan")
    p.add_argument("--layout", default="figure1", choices=sorted(LAYOUTS))


def format_status(st: dict) -> str:
    out = [f"testbed {st['id']} ({st['layout']}): {st['phase']}"
           f"{'' if st.get('healthy') else '  <-- NOT HEALTHY'}",
           f"  state   {st['dir']}",
           f"  IPsec   {st['ipsec'] or '?'} ESP on the gateway"
           + ("  (kernel-libipsec: userspace ESP-in-UDP, the kernel has no ESP)" if st['ipsec'] == "libipsec" else "")]
    if st.get("timings", {}).get("up") is not None:
        t = st["timings"]
        out.append(f"  up in   {t['up']:.2f} s ("
                   + ", ".join(f"{k} {v:.2f}" for k, v in t.items() if k != "up") + ")")
    if st.get("namespaces_missing"):
        out.append(f"  MISSING namespaces: {', '.join(st['namespaces_missing'])}")
    mn = st["mn"]
    out += ["", f"mobile node: namespace {mn['ns']}, interface {mn['ifname']} ({mn['mac']})",
            f"  attached to  {mn.get('attached') or '(nothing: link down)'}",
            f"  addresses    {', '.join(mn.get('addresses') or []) or '(none)'}"]
    out += ["", "access networks:"]
    for name, n in st["nets"].items():
        here = "  <-- mobile node" if name == mn.get("attached") else ""
        extra = [n["zone"]]
        if n["fa"]:
            extra.append(f"i-FA {n['fa']}")
        if n["nat"]:
            extra.append(f"NAT -> {n['nat']}")
        if n["trusted"]:
            extra.append("trusted")
        leases = st.get("leases", {}).get(name) or []
        lease_s = f"{len(leases)} lease{'s' if len(leases) != 1 else ''}" if n["dhcp"] else "no DHCP"
        out.append(f"  {name:<11} {n['prefix']:<16} router {n['router']:<14} {lease_s:<9} "
                   f"{', '.join(extra)}{here}")
    a = st["addresses"]
    out += ["", "addresses:",
            f"  i-HA {a['ha']}   correspondent {a['cn']}   home address {a['home_address']} "
            f"(home {a['home_prefix']})",
            f"  VPN gateway {a['gw_public']} ({a['gw_id']}), inside {a['gw_inside']}, TIA pool {a['pool']}",
            f"  internal {', '.join(a['internal_prefixes'])}   trusted {', '.join(a['trusted_prefixes'])}",
            "", "daemons:"]
    for name, d in st["daemons"].items():
        state = "running" if d.get("alive") else "DEAD"
        ns = d["ns"].removeprefix(st["ns_prefix"])
        out.append(f"  {name:<20} pid {d['pid']:<8} {state:<8} in {ns:<5} log {d['log']}"
                   + (f"  ({d['note']})" if d.get("note") else ""))
    for note in st.get("notes", []):
        out.append(f"  note: {note}")
    f = st.get("files", {})
    if f:
        out += ["", "files:",
                f"  mobile node config  {f.get('mn_config', '-')} (PSK), {f.get('mn_cert_config', '-')} (X.509)",
                f"  i-HA / i-FA config  {f.get('ha_config', '-')}, {f.get('fa_config', '-')}",
                f"  keys                {f.get('mip_mn_key', '-')} (MN-HA), {f.get('psk', '-')} (IKE PSK), "
                f"{f.get('ca', '-')} (CA)"]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "action", None)
    if action is None:
        print("usage: mipmobike testbed {up,down,status,move,exec,list,plan} ... (see --help)", file=sys.stderr)
        return 2
    if getattr(args, "id", "x") is None:
        ids = Testbed.list_ids(args.state_root) if action not in ("up", "plan", "list") else []
        if len(ids) > 1 and action != "down":
            print(f"mipmobike testbed {action}: several testbeds are up ({', '.join(ids)}): say which with --id",
                  file=sys.stderr)
            return 2
        args.id = ids[0] if len(ids) == 1 else "1"
    try:
        if action == "plan":
            print(addresses_plan(args.layout))
            return 0
        if action == "list":
            if not Testbed.list_ids(args.state_root):
                print("no testbed is up")
            for i in Testbed.list_ids(args.state_root):
                tb = Testbed.load(i, args.state_root)
                print(f"{i}\t{tb.phase}\t{tb.attached or '-'}\t{tb.dir}")
            return 0
        if action == "up":
            tb = Testbed(args.id, args.layout, args.state_root, ipsec=args.ipsec, agents=args.agents)
            print(f"testbed {args.id}: building {args.layout} ...", file=sys.stderr)
            tb.up(at=args.at)
            st = tb.status()
            print(json.dumps(st, indent=1) if args.json else format_status(st))
            return 0
        if action == "down":
            ids = Testbed.list_ids(args.state_root) if args.all else [args.id]
            for i in ids:
                try:
                    tb = Testbed.load(i, args.state_root)
                except TestbedError:
                    tb = Testbed(i, root=args.state_root)   # no state: remove whatever carries its names
                done = tb.down(keep_state=args.keep_state)
                print(f"testbed {i}: " + ("; ".join(done) if done else "nothing to remove"))
            return 0
        tb = Testbed.load(args.id, args.state_root)
        if action == "status":
            st = tb.status()
            print(json.dumps(st, indent=1) if args.json else format_status(st))
            return 0 if st["healthy"] else 1
        if action == "move":
            ev = tb.move(args.net, gap=args.gap)
            print(f"mobile node: {ev['from'] or '(detached)'} -> {ev['to'] or '(detached)'}")
            if args.dhcp and ev["to"]:
                print(f"DHCP lease: {tb.dhcp()}")
            return 0
        if action == "exec":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                print("mipmobike testbed exec: no command given", file=sys.stderr)
                return 2
            import os
            os.execvp("ip", ["ip", "netns", "exec", tb.ns(args.node), *cmd])
    except TestbedError as e:
        print(f"mipmobike testbed {action}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mipmobike testbed {action}: interrupted" + ("; everything made so far was removed"
                                                             if action == "up" else ""), file=sys.stderr)
        return 130
    return 2
