"""After every tier: nothing the suite started is left behind.

Runs last (scripts/test.sh calls it after the kernel tier). Namespaces are
found by this run's prefix, processes (charon, dnsmasq, qemu, agents, captures)
by the MIPMOBIKE_TEST_RUN value every process the suite starts inherits, so a
second run side by side, or anything else on the machine, is not mistaken for
ours.
"""

import os
import subprocess

from tests.lib.names import RUN, ns_prefix

def _procs():
    me, pid = set(), os.getpid()
    while pid > 1:                      # this test process and its ancestors (the runner)
        me.add(pid)
        pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in me:
            continue
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            comm = open(f"/proc/{pid}/comm").read().strip()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        yield int(pid), comm, cmd, f"MIPMOBIKE_TEST_RUN={RUN}".encode() in env


def test_no_namespace_left():
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    ours = [n.split()[0] for n in names if n.startswith(ns_prefix()) or n.startswith("mmdoc-") or n.startswith("mmesp-")]
    assert not ours, f"namespaces left behind: {ours}"


def test_no_process_left():
    left = []
    for pid, comm, cmd, tagged in _procs():
        if tagged:
            left.append(f"{pid} {comm}: {cmd[:120]}")
    assert not left, "processes left behind:\n" + "\n".join(left)
