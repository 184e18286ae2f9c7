"""``mipmobike bench``: run the kernel-path performance suite and write its report.

    mipmobike bench                      # everything: 20 rounds of moves, RTT +0/+20/+50 ms (long)
    mipmobike bench --quick              # 3 rounds, shorter goodput/gate/HA runs
    mipmobike bench --parts gate,ha      # a subset: handover, goodput, gate, ha
    mipmobike bench --quick --publish    # also write docs/bench/latest.md (commit it by hand)

Parts that need ESP, ipip or netem run where the kernel has them: here if
it does, else inside the VM (scripts/vm/vmrun.sh, QEMU TCG, one boot for all
of them); the gate and the engine/BPF i-HA backends run on this host.
``--where host|vm`` forces one place. Reports go to OUT/bench-<stamp>.md and
.json, and OUT/bench-latest.md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import env, report

PARTS = ("handover", "goodput", "mobike", "gate", "ha")
KERNEL_PARTS = ("handover", "goodput")          # need the testbed with ESP + ipip (+ netem)
VM_PARTS = KERNEL_PARTS + ("mobike",)           # run in the VM unless this kernel has it all (mobike: kernel ESP)
TOP = Path(__file__).resolve().parents[2]


def _csv(kind):
    def parse(s: str):
        try:
            return [kind(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {s!r}") from None
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Measure handovers, goodput, the BPF gate and the i-HA side by side; write a report."
    p.add_argument("--quick", action="store_true", help="few moves and short runs (minutes, not an hour)")
    p.add_argument("--parts", type=_csv(str), default=list(PARTS),
                   help=f"comma list of {', '.join(PARTS)} (default: all)")
    p.add_argument("--where", choices=("auto", "host", "vm"), default="auto",
                   help="auto: kernel-path parts in the VM unless this kernel has ESP, ipip and netem")
    p.add_argument("--rounds", type=int, help="rounds of the move cycle per added RTT (default 20, quick 3)")
    p.add_argument("--rtts", type=_csv(int), default=[0, 20, 50], help="added round-trip times, ms (default 0,20,50)")
    p.add_argument("--cycle", type=_csv(str), help="the nets the agent moves through from internal-1 "
                                                    "(default internal-2,external-1,external-2,external-1,internal-1)")
    p.add_argument("--detection", type=_csv(float), default=[1.0, 2, 4.0], metavar="INIT,RETRIES,MAX",
                   help="the agent's detection timeouts: first RRQ timeout s, retransmissions, max timeout s "
                        "(default 1.0,2,4.0: the product defaults)")
    p.add_argument("--no-strongswan", action="store_true", help="skip strongSwan's client in the handover part")
    p.add_argument("--goodput-seconds", type=float, help="per iperf3 run (default 10, quick 5)")
    p.add_argument("--goodput-rounds", type=int, help="agent/strongSwan pairs, alternating (default 3, quick 2)")
    p.add_argument("--mobike-moves", type=int, help="bench_mobike.py --moves per client (default 20, quick 6)")
    p.add_argument("--gate-seconds", type=float, help="bench_gate.py --seconds (default 2)")
    p.add_argument("--gate-rounds", type=int, help="bench_gate.py --rounds (default 5, quick 3)")
    p.add_argument("--ha-sizes", type=_csv(int), help="bindings (default 1000,10000,100000; quick 1000,10000)")
    p.add_argument("--ha-backends", type=_csv(str), help="engine,bpf,ipip (default: all that can run)")
    p.add_argument("--ipip-max-tunnels", type=int, default=1000)
    p.add_argument("--idle-seconds", type=float, help="agent idle sampling (default 10, quick 3)")
    p.add_argument("--settle", type=float, default=0.5, help="pause between moves, s")
    p.add_argument("--probe-interval", type=float, default=0.02,
                   help="UDP echo probe interval of the flow, s (default 0.02: 50 probes/s)")
    p.add_argument("--poll", type=float, default=5.0,
                   help="while a handover runs the agent's status is asked when its log says the handover "
                        "ended, else every POLL s (default 5; a status request costs the agent CPU)")
    p.add_argument("--out", default=str(TOP / "reports"), help="report directory (default reports/)")
    p.add_argument("--publish", nargs="?", const=str(TOP / "docs" / "bench"), default=None, metavar="DIR",
                   help="also write DIR/latest.md and latest.json (default DIR docs/bench)")
    p.add_argument("--keep-logs", metavar="DIR", help="copy the testbed's daemon logs to DIR before teardown")
    p.add_argument("--testbed-id", default=None, help="testbed id (default bench<random>)")
    p.add_argument("--state-root", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ns-prefix", default=None, help=argparse.SUPPRESS)
    p.add_argument("--render", metavar="JSON", help="only write the reports again from an earlier JSON report "
                                                    "(goals judged again), e.g. after a change of the format")
    p.add_argument("--merge-into", metavar="JSON", help="run --parts and put them into an earlier JSON report "
                                                        "(replacing those parts; the report says so)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result-json", default=None, help=argparse.SUPPRESS)


def _defaults(a) -> None:
    q = a.quick
    a.rounds = a.rounds or (3 if q else 20)
    a.goodput_seconds = a.goodput_seconds or (5.0 if q else 10.0)
    a.goodput_rounds = a.goodput_rounds or (2 if q else 3)
    a.mobike_moves = a.mobike_moves or (6 if q else 20)
    a.gate_seconds = a.gate_seconds or 2.0
    a.gate_rounds = a.gate_rounds or (3 if q else 5)
    a.ha_sizes = a.ha_sizes or ([1000, 10000] if q else [1000, 10000, 100000])
    a.idle_seconds = a.idle_seconds or (3.0 if q else 10.0)
    from .handover import CYCLE
    a.cycle = a.cycle or list(CYCLE)
    if len(a.detection) != 3:
        raise SystemExit("mipmobike bench: --detection wants INIT,RETRIES,MAX (e.g. 1.0,2,4.0)")
    a.detection = [float(a.detection[0]), int(a.detection[1]), float(a.detection[2])]
    if a.testbed_id is None:
        import secrets
        a.testbed_id = "bench" + secrets.token_hex(2)
    if a.state_root is None:
        from agent.testbed import STATE_ROOT
        a.state_root = STATE_ROOT
    bad = [x for x in a.parts if x not in PARTS]
    if bad:
        raise SystemExit(f"mipmobike bench: unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")


def _forward_args(a, parts: list[str], ha_backends: list[str] | None, keep_logs: str | None = None) -> list[str]:
    """The options for the same run inside the VM."""
    argv = ["--inner", "--where", "host", "--parts", ",".join(parts), "--rounds", str(a.rounds),
            "--rtts", ",".join(map(str, a.rtts)), "--cycle", ",".join(a.cycle),
            "--detection", ",".join(map(str, a.detection)),
            "--goodput-seconds", str(a.goodput_seconds), "--goodput-rounds", str(a.goodput_rounds),
            "--mobike-moves", str(a.mobike_moves), "--gate-seconds", str(a.gate_seconds), "--gate-rounds", str(a.gate_rounds),
            "--ha-sizes", ",".join(map(str, a.ha_sizes)), "--ipip-max-tunnels", str(a.ipip_max_tunnels),
            "--idle-seconds", str(a.idle_seconds), "--settle", str(a.settle),
            "--probe-interval", str(a.probe_interval), "--poll", str(a.poll), "--testbed-id", a.testbed_id]
    if keep_logs:
        argv += ["--keep-logs", keep_logs]
    if ha_backends:
        argv += ["--ha-backends", ",".join(ha_backends)]
    if a.no_strongswan:
        argv.append("--no-strongswan")
    if a.quick:
        argv.append("--quick")
    return argv


def run_here(a, parts: list[str], ha_backends: list[str] | None, log) -> dict:
    """Run ``parts`` in this kernel; {"machine", "caps", "parts": {...}}."""
    caps = env.capabilities()
    where = env.machine()
    out: dict = {"machine": where, "caps": caps, "parts": {}}
    if parts:
        from .calib import python_speed
        where["python_speed"] = python_speed()
        log(f"python speed here: {where['python_speed'].get('per_s', where['python_speed'].get('error'))} "
            "registrations/s (the emulation factor's yardstick)")
    if not caps["root"]:
        for p in parts:
            out["parts"][p] = {"not_measured": "needs root (namespaces, BPF)"}
        return out
    if any(p in parts for p in KERNEL_PARTS):
        from .handover import run_session
        try:
            res = run_session(a, caps, log)
        except Exception as e:   # the report says what went wrong; the testbed is already down
            log(f"kernel-path parts failed: {type(e).__name__}: {e}")
            res = {"handover": None, "goodput": None, "agent_resources": None, "error": f"{type(e).__name__}: {e}"}
        for p in KERNEL_PARTS:
            if p in parts:
                out["parts"][p] = res.get(p) or {"not_measured": res.get("error") or "did not run"}
        if res.get("agent_resources") or "handover" in parts:
            out["parts"]["agent_resources"] = res.get("agent_resources") or \
                {"not_measured": res.get("error") or "did not run"}
    if "mobike" in parts:
        from .hostparts import run_mobike
        out["parts"]["mobike"] = run_mobike(a.mobike_moves, log)
    if "gate" in parts:
        from .hostparts import run_gate
        out["parts"]["gate"] = run_gate(a.gate_seconds, a.gate_rounds, 100_000 if a.quick else 1_000_000, log)
    if "ha" in parts:
        from .hostparts import run_ha
        backends = ha_backends or ["engine", "bpf"] + (["ipip"] if caps["ipip"] else [])
        if "ipip" in backends and not caps["ipip"]:
            backends.remove("ipip")
        out["parts"]["ha"] = run_ha(backends, a.ha_sizes, a.ipip_max_tunnels, log)
    for p in out["parts"].values():
        if isinstance(p, dict):
            p.setdefault("ran_on", where["where"])
    return out


def warm_gate_cache(log) -> None:
    """Compile the gate on the host so the VM's agent loads it from the cache (else ~60 s under TCG)."""
    try:
        from agent.demo.roam import warm_gate_cache as warm
        log(warm())
    except Exception as e:
        log(f"gate compile cache: {e} (the VM will compile)")


def run_in_vm(a, parts: list[str], ha_backends: list[str] | None, log) -> dict:
    vmrun = TOP / "scripts" / "vm" / "vmrun.sh"
    share = Path(tempfile.mkdtemp(prefix="mipmobike-bench-"))
    try:
        result = share / "vm.json"
        keep = str(share / "logs") if a.keep_logs else None
        argv = [str(vmrun), sys.executable, "-m", "agent.cli", "bench", *_forward_args(a, parts, ha_backends, keep),
                "--result-json", str(result)]
        vm_env = dict(os.environ, VM_SHARE=str(share))
        vm_env.setdefault("VM_TIMEOUT", str(3 * 3600 if a.quick else 12 * 3600))
        log(f"VM: {' '.join(shlex.quote(x) for x in argv[1:])}")
        t0 = time.monotonic()
        p = env.run_child(argv, cwd=TOP, env=vm_env, capture=False)
        log(f"VM finished in {time.monotonic() - t0:.0f} s (exit {p.returncode})")
        if keep and Path(keep).exists():
            shutil.copytree(keep, a.keep_logs, dirs_exist_ok=True)
        try:
            return json.loads(result.read_text())
        except (OSError, ValueError):
            why = f"the VM run failed (vmrun exit {p.returncode})"
            return {"machine": None, "caps": None, "parts": {x: {"not_measured": why} for x in parts}}
    finally:
        shutil.rmtree(share, ignore_errors=True)


def merge_into(earlier: dict, new: dict, parts: list[str]) -> dict:
    """``earlier`` with ``parts`` (and their machines) taken from ``new``; meta.merged says when and how."""
    out = dict(earlier)
    out["parts"] = dict(earlier.get("parts", {}))
    for p in parts:
        if p in new.get("parts", {}):
            out["parts"][p] = new["parts"][p]
    have = {json.dumps(m, sort_keys=True, default=str) for m in out.get("machines", [])}
    out["machines"] = list(out.get("machines", [])) + [dict(m, merged_parts=list(parts)) for m in new.get("machines", [])
                                                         if json.dumps(m, sort_keys=True, default=str) not in have]
    meta = dict(earlier.get("meta", {}))
    nm = new.get("meta", {})
    meta["merged"] = list(meta.get("merged", [])) + [{"parts": parts, "command": nm.get("command"),
                                                      "started": nm.get("started"), "duration_s": nm.get("duration_s"),
                                                      "host": nm.get("host")}]
    out["meta"] = meta
    return out


def run(a) -> int:
    if a.render:
        merged = json.loads(Path(a.render).read_text())
        merged["goals"] = report.goals(merged)
        paths = report.write(merged, a.out, a.publish, stamp=False)
        print(report.summary_text(merged))
        print("\nreports: " + ", ".join(str(p) for p in paths))
        return 0
    _defaults(a)
    env.sigterm_exits()            # a killed bench still tears down its namespaces, mounts and the VM
    log = lambda m: print(m, file=sys.stderr if a.inner else sys.stdout, flush=True)   # noqa: E731
    if a.inner:
        out = run_here(a, a.parts, a.ha_backends, log)
        Path(a.result_json).write_text(json.dumps(out, indent=1, default=str))
        return 0
    if os.geteuid() != 0:
        print("mipmobike bench: needs root (namespaces, BPF, the VM)", file=sys.stderr)
        return 2
    started = time.time()
    host_caps = env.capabilities()
    kernel_ok = host_caps["esp"] and host_caps["ipip"] and host_caps["netem"]
    if a.where == "host" or env.in_vm() or (a.where == "auto" and kernel_ok):
        here_parts, vm_parts = list(a.parts), []
    elif a.where == "vm":
        here_parts, vm_parts = [], list(a.parts)
    else:
        here_parts = [p for p in a.parts if p not in VM_PARTS]
        vm_parts = [p for p in a.parts if p in VM_PARTS]
    host_ha = vm_ha = a.ha_backends
    if "ha" in a.parts and a.where == "auto" and not host_caps["ipip"] and not env.in_vm():
        wanted = a.ha_backends or ["engine", "bpf", "ipip"]
        host_ha = [b for b in wanted if b != "ipip"]
        vm_ha = [b for b in wanted if b == "ipip"]
        if vm_ha:
            vm_parts.append("ha")
        if not host_ha:
            here_parts.remove("ha")
    log(f"mipmobike bench{' --quick' if a.quick else ''}: here ({env.machine()['where']}, kernel "
        f"{os.uname().release}): {', '.join(here_parts) or '-'}; in the VM: {', '.join(vm_parts) or '-'}")
    results = []
    if here_parts:
        results.append(run_here(a, here_parts, host_ha, log))
    else:                   # the host's yardstick for the VM's figures all the same
        from .calib import python_speed
        results.append({"machine": dict(env.machine(), python_speed=python_speed()), "caps": host_caps,
                        "parts": {}})
    if vm_parts:
        warm_gate_cache(log)
        results.append(run_in_vm(a, vm_parts, vm_ha, log))
    merged = report.merge(results)
    merged["meta"] = {
        "command": "mipmobike bench " + " ".join(shlex.quote(x) for x in sys.argv[2:]) if len(sys.argv) > 1
        else "mipmobike bench",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
        "duration_s": round(time.time() - started), "quick": a.quick,
        "options": {k: v for k, v in vars(a).items() if k not in ("inner", "result_json", "func")},
        "host": env.machine(), "host_caps": host_caps,
        "vm": next((r["machine"] for r in results if r.get("machine") and r["machine"].get("vm")), None),
    }
    if a.merge_into:
        merged = merge_into(json.loads(Path(a.merge_into).read_text()), merged, a.parts)
    merged["goals"] = report.goals(merged)
    paths = report.write(merged, a.out, a.publish)
    print()
    print(report.summary_text(merged))
    print("\nreports: " + ", ".join(str(p) for p in paths))
    return 0
