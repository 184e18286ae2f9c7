"""The parts that reuse the project's benchmark scripts: the BPF gate and the i-HA.

* gate: ``scripts/bench_gate.py`` runs as it is (its own namespaces, iperf3
  UDP through a veth, configurations alternating within the run); its
  printed table is parsed into numbers and kept verbatim in the report.
* mobike: ``scripts/bench_mobike.py --json``: our VPN client alone next to
  strongSwan's client, address change -> the gateway updated the SA.
* ha: ``run_one(backend, n, ipip_max)`` of ``scripts/bench_ha.py``, one fresh
  Python process per (backend, size) so resident-set growth per binding is
  not blurred by what an earlier size left in the heap.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
GATE_SCRIPT = TOP / "scripts" / "bench_gate.py"
HA_SCRIPT = TOP / "scripts" / "bench_ha.py"
MOBIKE_SCRIPT = TOP / "scripts" / "bench_mobike.py"


# -- gate ------------------------------------------------------------------------------------------
ROW = re.compile(r"^\s+(egress|ingress)\s.*?([\d.]+) kpps\s+([\d.]+) kpps\s+([\d.]+) kpps\s+([\d.]+) / ([\d.]+)\s*$")


def parse_gate(text: str) -> dict:
    """Numbers out of bench_gate.py's output (unknown lines are ignored, the text is kept)."""
    out: dict = {"rows": {}}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            d = m.group(1)
            out["rows"][d] = {"none_kpps": float(m.group(2)), "open_xdp_kpps": float(m.group(3)),
                              "open_tc_kpps": float(m.group(4)), "ratio_xdp": float(m.group(5)),
                              "ratio_tc": float(m.group(6))}
        if line.strip().startswith("rounds (kpps):"):
            out["rounds_kpps"] = {k: [float(x) for x in v.split()] for k, v in
                                  (part.strip().split(" ", 1) for part in line.split(":", 1)[1].split(";")
                                   if " " in part.strip())}
        m = re.search(r"closed/none = ([\d.]+)", line)
        if m:
            out["closed_sender_ratio"] = float(m.group(1))
        m = re.search(r"dropped and counted by the gate: (\d+) of (\d+)", line)
        if m:
            out["closed_dropped"], out["closed_sent"] = int(m.group(1)), int(m.group(2))
        m = re.match(r"\s+(TC egress|XDP ingress)\s+(open|closed)\s+(\S+)\s+->\s+(\S+)\s+(\d+) ns", line)
        if m:
            out.setdefault("prog_ns", []).append({"hook": m.group(1), "state": m.group(2), "packet": m.group(3),
                                                  "verdict": m.group(4), "ns": int(m.group(5))})
        m = re.match(r"UDP (\d+)-byte payload, iperf3 -b 0, (\d+) rounds x ([\d.]+) s", line)
        if m:
            out["payload"], out["rounds"], out["seconds"] = int(m.group(1)), int(m.group(2)), float(m.group(3))
    rows = out["rows"]
    if "egress" in rows and "ingress" in rows:
        # the agent's default configuration: TC on egress, XDP on ingress
        out["ratio_egress"] = rows["egress"]["ratio_xdp"]
        out["ratio_ingress_xdp"] = rows["ingress"]["ratio_xdp"]
        out["ratio_ingress_tc"] = rows["ingress"]["ratio_tc"]
        out["worst_ratio"] = min(out["ratio_egress"], out["ratio_ingress_xdp"])
        spreads = []
        for key in ("eg/none", "in/none"):
            vals = out.get("rounds_kpps", {}).get(key) or []
            if len(vals) > 1:
                mid = sorted(vals)[len(vals) // 2]
                spreads.append((max(vals) - min(vals)) / mid if mid else 0.0)
        if spreads:
            # how far the baseline itself moved between rounds: larger than the 3 % margin means the
            # ratio cannot decide the goal on this machine
            out["baseline_spread"] = round(max(spreads), 3)
    return out


def run_gate(seconds: float, rounds: int, repeat: int, log) -> dict:
    if not GATE_SCRIPT.exists():
        return {"not_measured": f"{GATE_SCRIPT} is missing"}
    argv = [sys.executable, str(GATE_SCRIPT), "--seconds", str(seconds), "--rounds", str(rounds),
            "--repeat", str(repeat)]
    log(f"gate: {' '.join(argv[1:])}")
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, cwd=TOP, timeout=3600)
    res = parse_gate(p.stdout)
    res.update(command=" ".join(["python", *argv[1:]]), output=p.stdout.strip(), elapsed_s=round(time.monotonic() - t0, 1))
    if p.returncode or "worst_ratio" not in res:
        res["not_measured"] = f"bench_gate.py exit {p.returncode}: {(p.stderr or p.stdout).strip()[-600:]}"
    for line in p.stdout.splitlines():
        log(f"  {line}")
    return res


# -- i-HA ------------------------------------------------------------------------------------------
def _ha_child(backend: str, n: int, ipip_max: int) -> None:
    """In a fresh process: one run_one of bench_ha.py, its dict as JSON on the last line."""
    spec = importlib.util.spec_from_file_location("bench_ha", HA_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.run_one(backend, n, ipip_max)
    print(json.dumps(r, default=str))


def run_ha(backends: list[str], sizes: list[int], ipip_max: int, log, timeout: float = 7200) -> dict:
    if not HA_SCRIPT.exists():
        return {"not_measured": f"{HA_SCRIPT} is missing"}
    rows, errors = [], []
    for n in sizes:
        for be in backends:
            t0 = time.monotonic()
            p = subprocess.run([sys.executable, "-c", "import sys; from agent.bench.hostparts import _ha_child; "
                                f"_ha_child({be!r}, {n}, {ipip_max})"],
                               capture_output=True, text=True, cwd=TOP, timeout=timeout,
                               env=dict(os.environ, PYTHONPATH=str(TOP)))
            try:
                r = json.loads(p.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                errors.append(f"{be} at {n}: exit {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}")
                log(f"  ha {be} {n}: failed: {errors[-1]}")
                continue
            r["elapsed_s"] = round(time.monotonic() - t0, 1)
            rows.append(r)
            log(f"  ha {be:<6} {n:>7,} bindings: new {r['new']:,.0f}/s renew {r['renew']:,.0f}/s, "
                f"python {r.get('py_bytes', 0):,.0f} B/binding"
                + (f", map {r['map_bytes']:,.0f} B" if r.get("map_bytes") is not None else "")
                + (f", kernel {r['kernel_bytes']:,.0f} B" if r.get("kernel_bytes") is not None else ""))
    out: dict = {"rows": rows, "ipip_max_tunnels": ipip_max}
    if errors:
        out["errors"] = errors
    return out


# -- MOBIKE alone ----------------------------------------------------------------------------------
def run_mobike(moves: int, log, timeout: float = 3600) -> dict:
    if not MOBIKE_SCRIPT.exists():
        return {"not_measured": f"{MOBIKE_SCRIPT} is missing"}
    argv = [sys.executable, str(MOBIKE_SCRIPT), "--moves", str(moves), "--json"]
    log(f"mobike: {' '.join(argv[1:])}")
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, cwd=TOP, timeout=timeout)
    try:
        res = json.loads(p.stdout[p.stdout.index("{"):])
    except ValueError:
        return {"not_measured": f"bench_mobike.py exit {p.returncode}: {(p.stderr or p.stdout).strip()[-600:]}"}
    res.update(command=" ".join(["python", *argv[1:]]), elapsed_s=round(time.monotonic() - t0, 1))
    log(f"  mobike ({res.get('backend')} ESP): ours median {res.get('ours_median_ms')} ms, strongSwan "
        f"{res.get('strongswan_median_ms')} ms, strongSwan/ours {res.get('ratio_strongswan_over_ours')}x")
    return res
