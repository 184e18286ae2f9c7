"""Start daemons inside a namespace, stop them by PID, always.

``Procs.start`` returns a handle with the Popen object and its log file; the
process runs in its own session (so its children go with it) and carries
MIPMOBIKE_TEST_RUN in its environment. ``Procs.close`` sends SIGTERM to each
process group, then SIGKILL to whatever is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 5) -> int | None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        else:
            self.signal(signal.SIGKILL)   # stray children of an exited leader
        return self.popen.returncode


def wait_until(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.05,
               proc: Proc | None = None):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if proc is not None and not proc.alive():
            raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}) while waiting for {what}:\n"
                                 + proc.output()[-3000:])
        if time.monotonic() > deadline:
            tail = ("\n" + proc.output()[-3000:]) if proc else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{tail}")
        time.sleep(interval)


class Procs:
    def __init__(self, logdir: Path) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], ns: str | None = None, env: dict | None = None,
              cwd: str | None = None) -> Proc:
        full = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
        log = self.logdir / f"{name}.log"
        e = dict(os.environ)
        e.update(env or {})
        fh = open(log, "ab")
        try:
            p = subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=e,
                                 cwd=cwd, start_new_session=True)
        finally:
            fh.close()
        proc = Proc(name, p, log)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()
