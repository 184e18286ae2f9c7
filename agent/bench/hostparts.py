"""The parts that reuse the project's benchmark scripts: the BPF gate and the i-HA.

* gate: ``scripts/bench_gate.py --json`` runs as it is (its own namespaces,
  iperf3 UDP through a veth; no program, empty programs and the open gate on
  the same hooks taking turns in short slices, judged by paired ratios);
  its JSON is the part's numbers, its printed tables are kept as "output".
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
import sys
import tempfile
import time
from pathlib import Path

from .env import run_child, sigterm_exits

TOP = Path(__file__).resolve().parents[2]
GATE_SCRIPT = TOP / "scripts" / "bench_gate.py"
HA_SCRIPT = TOP / "scripts" / "bench_ha.py"
MOBIKE_SCRIPT = TOP / "scripts" / "bench_mobike.py"


# -- gate ------------------------------------------------------------------------------------------
# the agent's default (gate.ingress = "auto") on the bench's veth: TC egress + TC ingress (a virtual
# device gets TC; native XDP is for physical NICs that have it)
DEFAULT_GATE = "gate_tc"


def parse_gate(doc: dict) -> dict:
    """bench_gate.py's ``--json`` document plus the headline: the median paired ratio (gate open / no
    program, same round) of the agent's default configuration per direction, and of TC ingress."""
    out = dict(doc)
    paired = doc.get("paired") or {}
    try:
        out["ratio_egress"] = paired["egress"][DEFAULT_GATE]["median"]
        out["ratio_ingress_xdp"] = paired["ingress"]["gate_xdp"]["median"]
        out["ratio_ingress_tc"] = paired["ingress"]["gate_tc"]["median"]
    except (KeyError, TypeError):
        return out
    out["default_config"] = DEFAULT_GATE
    out["worst_ratio"] = min(out["ratio_egress"], paired["ingress"][DEFAULT_GATE]["median"])
    return out


def run_gate(seconds: float, rounds: int, repeat: int, log) -> dict:
    if not GATE_SCRIPT.exists():
        return {"not_measured": f"{GATE_SCRIPT} is missing"}
    with tempfile.TemporaryDirectory(prefix="mipmobike-gate-") as td:
        jpath = Path(td) / "gate.json"
        argv = [sys.executable, str(GATE_SCRIPT), "--seconds", str(seconds), "--rounds", str(rounds),
                "--repeat", str(repeat), "--json", str(jpath)]
        log(f"gate: {' '.join(argv[1:-2])}")
        t0 = time.monotonic()
        p = run_child(argv, cwd=TOP, timeout=3600)
        try:
            doc = json.loads(jpath.read_text())
        except (OSError, ValueError):
            doc = None
    res = parse_gate(doc) if isinstance(doc, dict) else {}
    res.update(command=" ".join(["python", *argv[1:-2]]), output=p.stdout.strip(),
               elapsed_s=round(time.monotonic() - t0, 1))
    if p.returncode or "worst_ratio" not in res:
        res["not_measured"] = f"bench_gate.py exit {p.returncode}: {(p.stderr or p.stdout).strip()[-600:]}"
    for line in p.stdout.splitlines():
        log(f"  {line}")
    return res


# -- i-HA ------------------------------------------------------------------------------------------
def _ha_child(backend: str, n: int, ipip_max: int) -> None:
    """In a fresh process: one run_one of bench_ha.py, its dict as JSON on the last line."""
    sigterm_exits()            # killed by run_ha's timeout or a killed bench: its scratch namespace goes too
    spec = importlib.util.spec_from_file_location("bench_ha", HA_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.run_one(backend, n, ipip_max)
    print(json.dumps(r, default=str))


def ha_row(backend: str, n: int, ipip_max: int, timeout: float) -> tuple[dict | None, str]:
    """One bench_ha.py row in a fresh process (run_child: a kill reaches it as SIGTERM, it tears down).
    (row, "") or (None, what went wrong)."""
    p = run_child([sys.executable, "-c", "from agent.bench.hostparts import _ha_child; "
                   f"_ha_child({backend!r}, {n}, {ipip_max})"],
                  cwd=TOP, timeout=timeout, env=dict(os.environ, PYTHONPATH=str(TOP)))
    try:
        return json.loads(p.stdout.strip().splitlines()[-1]), ""
    except (ValueError, IndexError):
        return None, f"exit {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}"


def run_ha(backends: list[str], sizes: list[int], ipip_max: int, log, timeout: float = 7200) -> dict:
    if not HA_SCRIPT.exists():
        return {"not_measured": f"{HA_SCRIPT} is missing"}
    rows, errors = [], []
    for n in sizes:
        for be in backends:
            t0 = time.monotonic()
            r, err = ha_row(be, n, ipip_max, timeout)
            if r is None:
                errors.append(f"{be} at {n}: {err}")
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
    p = run_child(argv, cwd=TOP, timeout=timeout)
    try:
        res = json.loads(p.stdout[p.stdout.index("{"):])
    except ValueError:
        return {"not_measured": f"bench_mobike.py exit {p.returncode}: {(p.stderr or p.stdout).strip()[-600:]}"}
    res.update(command=" ".join(["python", *argv[1:]]), elapsed_s=round(time.monotonic() - t0, 1))
    log(f"  mobike ({res.get('backend')} ESP): ours median {res.get('ours_median_ms')} ms, strongSwan "
        f"{res.get('strongswan_median_ms')} ms, strongSwan/ours {res.get('ratio_strongswan_over_ours')}x")
    return res
