"""scripts/bench_gate.py runs end to end (tiny counts) and leaves nothing behind.

Speed is not asserted: this proves every configuration is set up, measured and torn down in turn,
paired ratios and the gate/empty comparison come out for each, the closed gate drops and counts
what the sender sent, and the namespaces and the bpffs mount go. The TCX diagnostics run where the
kernel has TCX (6.6+).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]


def _has_tcx() -> bool:
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return (major, minor) >= (6, 6)


def _leftovers() -> tuple[set[str], set[str]]:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    mounts = Path("/proc/mounts").read_text()
    return ({l.split()[0] for l in ns.splitlines() if l.startswith("mmbench-")},
            {l.split()[1] for l in mounts.splitlines() if "/run/mipmobike/bench-" in l})


def test_bench_gate_runs_every_configuration_and_cleans_up(tmp_path):
    configs = ["none", "none_aa", "empty_tc", "gate_tc", "empty_xdp", "gate_xdp"]
    if _has_tcx():
        configs += ["empty_tcx", "gate_tcx"]
    before = _leftovers()
    out = tmp_path / "gate.json"
    p = subprocess.run([sys.executable, str(TOP / "scripts" / "bench_gate.py"), "--rounds", "1", "--seconds", "0.5",
                        "--repeat", "1000", "--configs", ",".join(configs), "--json", str(out)],
                       cwd=TOP, env=dict(os.environ, PYTHONPATH=str(TOP)), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]
    d = json.loads(out.read_text())
    for direction in ("egress", "ingress"):
        assert set(d["paired"][direction]) == set(configs[1:]), d["paired"][direction]
        assert all(r["median"] > 0 for r in d["paired"][direction].values())
        want = {c for c in ("gate_tc", "gate_xdp", "gate_tcx") if c in configs}
        assert set(d["gate_vs_empty"][direction]) == want
    assert d["closed"]["sent"] > 0 and d["closed"]["dropped"] == d["closed"]["sent"]
    assert _leftovers() == before, "the gate bench left namespaces or a bpffs mount behind"
