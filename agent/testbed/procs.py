"""Daemons of a testbed: started detached in a namespace, found and stopped again by PID.

A testbed outlives the command that built it, so every process is recorded
(PID, its start time from /proc, argv, log file) in the state file, and the
start time guards against signalling a recycled PID. Each daemon leads its
own session (``ip netns exec`` execs the command, so the recorded PID is the
daemon itself), and stopping signals the whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field

from .nsenter import netns


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    return s.rsplit(")", 1)[1].split()   # fields from 3 (state) on


def start_time(pid: int) -> int | None:
    st = _stat(pid)
    return int(st[19]) if st else None   # field 22, starttime in clock ticks


def running(pid: int, started: int | None) -> bool:
    st = _stat(pid)
    if not st or st[0] in ("Z", "X"):
        return False
    return started is None or int(st[19]) == started


@dataclass
class Daemon:
    name: str
    ns: str
    argv: list[str]
    pid: int
    started: int | None
    log: str
    ready: bool = False
    note: str = ""
    extra: dict = field(default_factory=dict)

    def alive(self) -> bool:
        return running(self.pid, self.started)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Daemon":
        return cls(**d)


# Popen objects of children this process started, so they are reaped (no zombies)
_children: dict[int, subprocess.Popen] = {}


def spawn(name: str, ns: str, argv: list[str], log: str, env: dict | None = None,
          cwd: str | None = None, ip_netns_exec: bool = False) -> Daemon:
    """Start ``argv`` inside namespace ``ns``, detached, output appended to ``log``.

    By default the child simply inherits the namespace (one exec); with
    ``ip_netns_exec`` it goes through ``ip netns exec``, which also gives it a
    private /sys showing the namespace's devices (for programs that read
    /sys/class/net or need bpffs handling like the agents).
    """
    e = dict(os.environ)
    e.update(env or {})
    fh = open(log, "ab")
    try:
        if ip_netns_exec:
            p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL, stdout=fh,
                                 stderr=subprocess.STDOUT, env=e, cwd=cwd, start_new_session=True)
        else:
            with netns(ns):
                p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                     env=e, cwd=cwd, start_new_session=True)
    finally:
        fh.close()
    _children[p.pid] = p
    st = None
    for _ in range(50):   # /proc entry is there at once; retry only against a transient race
        st = start_time(p.pid)
        if st is not None or p.poll() is not None:
            break
        time.sleep(0.001)
    return Daemon(name, ns, list(argv), p.pid, st, log)


def exited(d: Daemon) -> int | None:
    """The exit status of a child we started that has exited, else None."""
    p = _children.get(d.pid)
    if p is not None:
        return p.poll()
    return None if d.alive() else -1


def stop(d: Daemon, timeout: float = 5.0) -> None:
    """SIGTERM the daemon's process group, SIGKILL what is left after ``timeout``."""
    p = _children.pop(d.pid, None)
    if p is not None and p.poll() is not None:
        _killpg(d.pid, signal.SIGKILL)   # stray children of an exited leader
        return
    if not d.alive():
        return
    _killpg(d.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p is not None:
            if p.poll() is not None:
                break
        elif not d.alive():
            break
        time.sleep(0.02)
    else:
        _killpg(d.pid, signal.SIGKILL)
        if p is not None:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
    _killpg(d.pid, signal.SIGKILL)   # anything else left in its group


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def netns_pids(ns: str) -> list[int]:
    p = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []


def kill_netns(ns: str, timeout: float = 3.0) -> None:
    """Kill every process still inside namespace ``ns`` (what a daemon left, or a user started)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = netns_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = [pid for pid in pids if running(pid, None)]
            if not left:
                break
            for pid in pids:
                q = _children.get(pid)
                if q is not None:
                    q.poll()
            time.sleep(0.02)
