"""The bench's children get a chance to tear down: SIGTERM first, SIGKILL only after a grace period."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from agent.bench.env import run_child

CHILD = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(143))
    try:
        print("started", flush=True)
        time.sleep(60)
    finally:
        open(sys.argv[1], "w").write("torn down")
""")


def test_timeout_terminates_and_the_child_tears_down(tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(subprocess.TimeoutExpired):
        run_child([sys.executable, "-c", CHILD, str(marker)], timeout=1.0, grace=10)
    assert marker.read_text() == "torn down"


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('x', flush=True); time.sleep(60)"
    with pytest.raises(subprocess.TimeoutExpired):
        run_child([sys.executable, "-c", stubborn], timeout=1.0, grace=0.5)


def test_output_and_status_like_subprocess_run():
    p = run_child([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert (p.returncode, p.stdout, p.stderr) == (3, "out\n", "err\n")
