"""``mipmobike demo``: the scripted roaming run of RFC 5266 in the Figure-1 testbed.

Brings the testbed up (namespaces, i-HA, i-FA, strongSwan gateway, DHCP,
firewall, NATs), starts the mobile node agent, keeps a UDP echo (20/s) and a
TCP stream running between the home address and the correspondent, moves
the node internal-1 (c) -> internal-2 with the i-FA (f) -> external-1 (mc)
-> external-2 behind a NAT (mc, MOBIKE only) -> internal-1 (c), prints each
handover as it completes (verdict, mode, time to the verdict and until the
data path was ready, echoes lost, what crossed the access link before it was
ready) and tears everything down, also on Ctrl-C.

Where the kernel lacks ESP or ipip (like the development host) it runs
itself inside the VM runner (scripts/vm/vmrun.sh: Debian's cloud kernel
under qemu) and passes the exit status through. Exit status 0 only if every
handover reached its expected mode and the TCP stream survived with the
same home address.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# (net, expected mode, note)
PLAN = [
    ("internal-1", "c", "trusted internal subnet"),
    ("internal-2", "f", "trusted, with the i-FA"),
    ("external-1", "mc", "the Internet: only the VPN gateway leads in"),
    ("external-2", "mc", "behind a NAT: MOBIKE only"),
    ("internal-1", "c", "back inside"),
]
EXIT_INTERRUPTED = 130


def add_arguments(parser) -> None:
    parser.add_argument("--where", choices=("auto", "native", "vm"), default="auto",
                        help="run on this kernel or inside the VM runner (auto: natively when the kernel has "
                             "ESP and ipip)")
    parser.add_argument("--id", default="demo", help="testbed id (namespaces mmtb-ID-*; default demo)")
    parser.add_argument("--gap", type=float, default=0.5,
                        help="seconds the node is off every network between two attachments (default 0.5)")
    parser.add_argument("--timeout", type=float, default=1.0,
                        help="detection: first registration retransmission timeout in s (default 1.0, for TCG)")
    parser.add_argument("--no-capture", action="store_true", help="do not record the access link")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def say(msg: str = "") -> None:
    print(msg, flush=True)


def run(args) -> int:
    if os.geteuid() != 0:
        say("mipmobike demo: must run as root (namespaces, BPF, XFRM)")
        return 2
    in_vm = os.environ.get("MIPMOBIKE_IN_VM") == "1"
    from .roam import kernel_paths
    if not in_vm and args.where != "native":
        paths = kernel_paths()
        if args.where == "vm" or not all(paths.values()):
            return _in_vm(args, paths)
    return Demo(args, in_vm).run()


# -- the VM runner ---------------------------------------------------------------------------------
def _in_vm(args, paths: dict[str, bool]) -> int:
    from .roam import warm_gate_cache
    top = Path(__file__).resolve().parents[2]
    vmrun = top / "scripts" / "vm" / "vmrun.sh"
    missing = [k for k, ok in paths.items() if not ok]
    if args.where == "vm":
        say("mipmobike demo: running inside the VM runner (--where vm)")
    else:
        say(f"mipmobike demo: this kernel ({os.uname().release}) has no {' and no '.join(missing)}: "
            f"running inside the VM runner")
    if not vmrun.exists():
        say(f"mipmobike demo: {vmrun} is missing; cannot run without a kernel with ESP and ipip")
        return 2
    try:
        say(f"  {warm_gate_cache()}")
    except Exception as e:        # the agent then compiles inside the VM (slow, but works)
        say(f"  could not compile the gate program here ({e}); the VM will compile it")
    argv = [str(vmrun), sys.executable, "-m", "agent.cli", "demo", "--where", "native", "--id", args.id,
            "--gap", str(args.gap), "--timeout", str(args.timeout)]
    env = dict(os.environ)
    if args.no_capture:
        argv.append("--no-capture")
    if args.json:
        out = Path(args.json).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        argv += ["--json", str(out)]
        env["VM_SHARE"] = str(out.parent)           # the guest's root is a throw-away overlay
    env["VM_KEEPENV"] = (env.get("VM_KEEPENV", "") + " PYTHONUNBUFFERED").strip()
    env["PYTHONUNBUFFERED"] = "1"
    say("  booting Debian's cloud kernel under qemu (TCG, an emulated CPU: the agent's Python runs ~20x slower; a minute or a few in all)")
    p = subprocess.Popen(argv, cwd=str(top), env=env)
    try:
        return p.wait()
    except KeyboardInterrupt:
        say("\nmipmobike demo: interrupted; the VM runner stops the VM (everything inside goes with it)")
        try:
            p.wait(30)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            p.kill()
            p.wait()
        return EXIT_INTERRUPTED


# -- the run itself ----------------------------------------------------------------------------------
def _sigterm(signum, frame):
    raise KeyboardInterrupt


class Demo:
    def __init__(self, args, in_vm: bool) -> None:
        self.args = args
        self.in_vm = in_vm
        self.failures: list[str] = []
        self.rows: list[dict] = []

    def run(self) -> int:
        from agent.testbed import Testbed, TestbedError

        from .roam import Roamer, vpn_available
        signal.signal(signal.SIGTERM, _sigterm)
        where = ("inside the VM runner (Debian cloud kernel " + os.uname().release + " under qemu TCG)"
                 if self.in_vm else f"natively (kernel {os.uname().release} has ESP and ipip)")
        self.vpn = vpn_available()
        say("mipmobike demo: RFC 5266 roaming in the Figure-1 testbed, running " + where)
        if not self.vpn:
            say("  note: this build has no VPN client (agent/mn/vpn.py): untrusted links will stay closed")
        tb = Testbed(self.args.id, agents="require")
        if tb.existing_namespaces() or tb.state_file.exists():
            say(f"  testbed {tb.id} from an earlier run is still there: removing it first")
            Testbed.load(tb.id).down() if tb.state_file.exists() else tb.down()
        r = None
        t_start = time.monotonic()
        try:
            t0 = time.monotonic()
            tb.up(at="none")
            say(f"  testbed {tb.id} up in {time.monotonic() - t0:.1f} s: i-HA {tb.addr.ha}, i-FA {tb.addr.fa}, "
                f"VPN gateway {tb.addr.gw_public} ({tb.ipsec} IPsec), correspondent {tb.addr.cn}")
            r = Roamer(tb)
            t0 = time.monotonic()
            r.start_agent(initial_timeout=self.args.timeout, retransmissions=2, max_timeout=2 * self.args.timeout)
            say(f"  mobile node agent up in {time.monotonic() - t0:.1f} s: home address {tb.addr.home_address}, "
                f"detection timeout {self.args.timeout:g} s x 3 tries")
            self._header()
            prev_mode = None
            for i, (net, want, note) in enumerate(PLAN, 1):
                step = r.move(net, gap=self.args.gap)
                if i == 1:
                    r.settle(step)
                    self._row(i, step, want, note, prev_mode)
                    if step.mode != want:
                        raise _Abort(f"the first attachment did not reach mode {want}: cannot start traffic")
                    r.start_flow()
                    if not self.args.no_capture:      # tcpdump needs the switch port up: from now on
                        r.start_capture()
                    say(f"     traffic starts: UDP echo {r.flow.rate:g}/s and a TCP stream "
                        f"{r.flow.tcp_local[0]}:{r.flow.tcp_local[1]} -> {tb.addr.cn}:{r.flow.tcp_port}")
                else:
                    if step.mode is not None:
                        r.settle(step, timeout=60)
                    else:
                        r.settle(step, timeout=0)
                    self._row(i, step, want, note, prev_mode)
                prev_mode = step.mode
            self._finish(r, tb)
        except _Abort as e:
            self.failures.append(str(e))
            say(f"  aborted: {e}")
        except KeyboardInterrupt:
            say("\nmipmobike demo: interrupted; tearing everything down")
            self._teardown(r, tb)
            return EXIT_INTERRUPTED
        except (TestbedError, RuntimeError, OSError) as e:
            self.failures.append(f"{type(e).__name__}: {e}")
            say(f"  error: {e}")
            if r is not None and tb.daemons.get("mn-agent") is not None:
                say("  the agent's last log lines:\n" + _indent(r.agent_log(2500), 4))
        finally:
            if r is not None and self.args.json:
                self._write_json(r)
        self._teardown(r, tb)
        say(f"  total {time.monotonic() - t_start:.0f} s")
        if self.failures:
            say("RESULT: FAILED")
            for f in self.failures:
                say(f"  - {f}")
            return 1
        say("RESULT: every handover succeeded; the TCP stream and the echo survived with the same home address")
        return 0

    def _teardown(self, r, tb) -> None:
        try:
            if r is not None:
                r.stop()
        finally:
            try:
                tb.down()
                say(f"  testbed {tb.id} torn down")
            except Exception as e:
                say(f"  teardown: {e} (try: mipmobike testbed down --id {tb.id})")

    # -- output --------------------------------------------------------------------------------------
    def _header(self) -> None:
        say()
        say("  modes: c = Mobile IP with the DHCP address as co-located care-of address (trusted link);")
        say("  f = through the i-FA's care-of address (trusted link); mc = Mobile IP inside the IPsec VPN (untrusted)")
        say("  t(verdict), t(ready): from the link coming up to the trust verdict and to the new mode's data path;")
        say("  ready comes before the verdict on a MOBIKE-only move: ESP passes the closed gate while detection waits")
        say("  lost: echoes lost from the detach until echo and TCP both flow again; outage: longest time without")
        say("  an answered echo; last column: what the node sent on the access link before its data path was ready")
        say()
        say(f"  {'#':<2} {'move':<26} {'verdict':<10} {'mode':<5} {'t(verdict)':>10} {'t(ready)':>8} "
            f"{'lost':>5} {'outage':>7}  access link before ready")

    def _row(self, i: int, step, want: str, note: str, prev_mode) -> None:
        h = step.handover or {}
        src = step.src or "(detached)"
        move = f"{src} -> {step.dst}"
        verdict = h.get("verdict") or "none"
        mode = h.get("mode") or "-"
        ms_v, ms_r = h.get("ms_verdict"), h.get("ms_ready")
        fl = step.flow
        lost = "-" if not fl else str(fl["lost"])
        outage = "-" if not fl or fl["outage"] is None else f"{fl['outage']:.1f} s"
        if step.leaks is None:
            link = "-" if self.args.no_capture or i == 1 else "(not checked)"
        elif step.leaks:
            link = f"LEAKED {len(step.leaks)} of {step.frames} frames"
        else:
            link = f"detection only ({step.frames} frames)"
        say(f"  {i:<2} {move:<26} {verdict:<10} {mode:<5} {_s(ms_v):>10} {_s(ms_r):>8} {lost:>5} {outage:>7}  {link}")
        detail = h.get("reason") or "no handover seen"
        extra = []
        if h.get("coa"):
            extra.append(f"address {h['coa']}")
        if h.get("tia"):
            extra.append(f"TIA {h['tia']}")
        if h.get("mobike_only") and "MOBIKE" not in (h.get("reason") or ""):
            extra.append("MOBIKE only: no new registration")
        if step.kinds:
            extra.append("sent before ready: " + ", ".join(f"{k} {n}" for k, n in sorted(step.kinds.items())))
        say(f"     {note}: {detail}" + (f" ({', '.join(extra)})" if extra else ""))
        # judge it
        problems = []
        if not h:
            problems.append("the agent reported no handover")
        elif h.get("verdict") in ("failed", "superseded"):
            problems.append(f"handover {h['verdict']}: {h.get('reason')}")
        elif mode != want:
            if want == "mc" and not self.vpn:
                say("     untrusted - link closed (no VPN client in this build)")
                problems.append(f"{step.dst}: mode mc unavailable: this build has no VPN client (agent/mn/vpn.py)")
            else:
                problems.append(f"{step.dst}: mode {mode}, expected {want}")
        if want == "mc" and prev_mode == "mc" and h.get("mode") == "mc" and not h.get("mobike_only"):
            problems.append(f"{step.dst}: mc -> mc was not MOBIKE-only (a new registration was made)")
        if step.leaks:
            problems.append(f"{step.dst}: {len(step.leaks)} frames other than detection traffic left before the "
                            f"data path was ready: {'; '.join(step.leaks[:3])}")
        if fl is not None and step.mode is not None and step.t_recovered is None:
            problems.append(f"{step.dst}: the traffic did not flow again within 60 s of the handover")
        for p in problems:
            say(f"     !! {p}")
        self.failures += problems
        self.rows.append({"step": i, "expected_mode": want, **step.as_dict(), "problems": problems})

    def _finish(self, r, tb) -> None:
        flow = r.flow
        drained = flow.drain(30)
        alive = flow.alive() or (flow.tcp_error is None and drained)
        s = flow.summary()
        hoa = tb.addr.home_address
        say()
        in_moves = sum(row["flow"]["lost"] for row in self.rows if row.get("flow"))
        say(f"  UDP echo: {s['udp_sent']} sent, {s['udp_answered']} answered, {s['udp_lost']} lost "
            f"({in_moves} of them between a detach and the traffic flowing again); "
            f"the correspondent saw them from {', '.join(s['udp_sources']) or 'nobody'}")
        say(f"  TCP stream: {s['tcp_written']} bytes written, {s['tcp_received']} received by the correspondent, "
            f"connection from {', '.join(s['tcp_peers']) or 'nobody'}"
            + (f"; error: {s['tcp_error']}" if s["tcp_error"] else ("; never reset" if alive else "")))
        if not alive or not drained:
            self.failures.append("the TCP stream died" + (f" ({s['tcp_error']})" if s["tcp_error"] else
                                                          ": not every byte reached the correspondent"))
        if s["udp_sources"] != [hoa] or any(not p.startswith(hoa + ":") for p in s["tcp_peers"]) \
                or len(s["tcp_peers"]) != 1:
            self.failures.append(f"the correspondent saw other sources than the home address {hoa}: "
                                 f"UDP {s['udp_sources']}, TCP {s['tcp_peers']}")
        self.summary = s

    def _write_json(self, r) -> None:
        doc = {"in_vm": self.in_vm, "vpn_client": self.vpn, "rows": self.rows,
               "flow": getattr(self, "summary", None), "failures": self.failures}
        try:
            Path(self.args.json).write_text(json.dumps(doc, indent=1) + "\n")
        except OSError as e:
            say(f"  cannot write {self.args.json}: {e}")


class _Abort(Exception):
    pass


def _s(ms) -> str:
    return "-" if ms is None else f"{ms / 1000:.1f} s"


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())
