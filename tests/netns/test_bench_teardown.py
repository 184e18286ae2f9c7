"""A bench killed while an i-HA row runs leaves no scratch namespace behind.

The chain under test: the bench process gets SIGTERM (sigterm_exits) -> run_child passes SIGTERM
to the row's child -> the child (sigterm_exits in _ha_child) leaves through SystemExit, so
bench_ha.py's finally deletes its namespace.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]

BENCH = textwrap.dedent("""
    from agent.bench.env import sigterm_exits
    from agent.bench.hostparts import ha_row
    sigterm_exits()
    print(ha_row("bpf", 50000, 0, timeout=600), flush=True)
""")


def scratch_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("mmbench-")}


def test_killed_ha_row_deletes_its_scratch_namespace():
    before = scratch_namespaces()
    p = subprocess.Popen([sys.executable, "-c", BENCH], cwd=TOP, env=dict(os.environ, PYTHONPATH=str(TOP)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mine: set[str] = set()
    try:
        deadline = time.monotonic() + 120
        while not mine and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            mine = scratch_namespaces() - before
        assert mine, f"the row never made its scratch namespace (exit {p.poll()})"
        time.sleep(1.0)                       # well inside the row (a 50,000-binding bpf row takes a minute)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 128 + signal.SIGTERM, (p.returncode, out, err[-2000:])
        left = mine & scratch_namespaces()
        assert not left, f"scratch namespace(s) left after the kill: {left}"
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
        for ns in mine & scratch_namespaces():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
