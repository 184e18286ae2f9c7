"""CPU time and resident memory of a running process, from /proc/PID/stat and status."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    t: float             # monotonic seconds
    cpu: float           # user + system seconds of the process (all its threads)
    children: float      # user + system seconds of its reaped children (iptables, tc ... it ran)
    rss_kb: int
    hwm_kb: int          # peak resident set so far (VmHWM)


def sample(pid: int) -> Sample | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
        status = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                status[k] = v.strip()
    except OSError:
        return None
    # fields from 3 (state): utime=14, stime=15, cutime=16, cstime=17 -> indexes 11..14 here
    cpu = (int(st[11]) + int(st[12])) / TICK
    children = (int(st[13]) + int(st[14])) / TICK
    kb = lambda k: int(status.get(k, "0 kB").split()[0])   # noqa: E731
    return Sample(time.monotonic(), cpu, children, kb("VmRSS"), kb("VmHWM"))


def usage(a: Sample | None, b: Sample | None) -> dict | None:
    """CPU share (percent of one CPU) and resident memory between two samples."""
    if a is None or b is None or b.t <= a.t:
        return None
    wall = b.t - a.t
    return {"seconds": round(wall, 2), "cpu_s": round(b.cpu - a.cpu, 3),
            "cpu_pct": round(100 * (b.cpu - a.cpu) / wall, 2),
            "children_cpu_s": round(b.children - a.children, 3),
            "rss_mb": round(b.rss_kb / 1024, 1), "peak_rss_mb": round(b.hwm_kb / 1024, 1)}


def idle(pid: int, seconds: float) -> dict | None:
    """Watch a process doing nothing in particular for ``seconds``."""
    a = sample(pid)
    time.sleep(seconds)
    return usage(a, sample(pid))
