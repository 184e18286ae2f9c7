"""The bench's children get a chance to tear down: SIGTERM first, SIGKILL only after a grace period."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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


TORN_DOWN_SLOWLY = textwrap.dedent("""
    import sys, time
    from agent.bench.env import sigterm_exits
    sigterm_exits()
    try:
        print("started", flush=True)
        time.sleep(60)
    finally:
        time.sleep(0.5)              # a teardown that takes a moment (ip netns del, ...)
        open(sys.argv[1], "w").write("torn down")
""")

BENCH = textwrap.dedent("""
    import sys
    from agent.bench.env import run_child, sigterm_exits
    sigterm_exits()
    print("bench", flush=True)
    run_child([sys.executable, "-c", sys.argv[1], sys.argv[2]], grace=10)
""")


def test_a_kill_of_the_whole_group_lets_the_child_finish_its_teardown(tmp_path):
    """The child gets SIGTERM twice (the group kill and run_child passing it on): the second one must
    not break off its finally block, and the bench still exits through its own teardown."""
    marker = tmp_path / "marker"
    top = str(Path(__file__).resolve().parents[2])
    p = subprocess.Popen([sys.executable, "-c", BENCH, TORN_DOWN_SLOWLY, str(marker)], start_new_session=True,
                         stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=top))
    try:
        assert p.stdout.readline().strip() == "bench"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:          # the child is up once it is in the group with its parent
            kids = subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True, text=True).stdout.split()
            if len(kids) >= 2:
                break
            time.sleep(0.05)
        time.sleep(0.5)                              # past the child's sigterm_exits()
        os.killpg(p.pid, signal.SIGTERM)
        assert p.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert marker.read_text() == "torn down"
