"""Where a measurement ran: kernel, CPU, VM or not, and what the kernel offers.

Absolute figures in a report are only meaningful with this next to them;
``machine()`` is recorded once per process (the host, and again inside the
VM for the parts run there).
"""

from __future__ import annotations

import os
import platform
import secrets
import signal
import subprocess
import time


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mb() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def in_vm() -> bool:
    """Inside ``scripts/vm/vmrun.sh`` (which always runs QEMU with TCG on this project's hosts)."""
    return os.environ.get("MIPMOBIKE_IN_VM") == "1"


def machine() -> dict:
    vm = in_vm()
    return {
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "mem_mb": _mem_total_mb(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "vm": vm,
        # vmrun.sh runs -machine accel=tcg: the guest's CPU is emulated
        "accel": "qemu-tcg" if vm else "none (host)",
        "vm_cpus": int(os.environ.get("VM_CPUS", "2")) if vm else None,
        "where": "VM (QEMU TCG)" if vm else "host",
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def _probe(argv_batch: list[str]) -> bool:
    """Run ``ip`` commands in a scratch namespace; True if all succeeded."""
    ns = f"mmbenv-{secrets.token_hex(3)}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode:
        return False
    try:
        for argv in argv_batch:
            if subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True).returncode:
                return False
        return True
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def capabilities() -> dict:
    """What the kernel-path parts need: ESP, ipip, netem (each tried, not guessed); root."""
    if os.geteuid() != 0:
        return {"root": False, "esp": False, "ipip": False, "netem": False}
    subprocess.run(["modprobe", "-q", "-a", "esp4", "ipip", "xfrm_user", "xfrm4_tunnel", "sch_netem"],
                   capture_output=True)
    sel = "src 10.255.255.1 dst 10.255.255.2 proto esp spi 0x100"
    esp = _probe([["ip", "xfrm", "state", "add", *sel.split(), "mode", "tunnel", "enc", "cbc(aes)", "0x" + "00" * 16,
                   "auth-trunc", "hmac(sha256)", "0x" + "00" * 32, "128"]])
    ipip = _probe([["ip", "link", "add", "t0", "type", "ipip", "local", "192.0.2.1", "remote", "192.0.2.2"]])
    netem = _probe([["ip", "link", "add", "d0", "type", "dummy"],
                    ["tc", "qdisc", "add", "dev", "d0", "root", "netem", "delay", "1ms"]])
    return {"root": True, "esp": esp, "ipip": ipip, "netem": netem}


def sigterm_exits() -> None:
    """SIGTERM ends this process through SystemExit, so ``finally`` blocks tear down what it built
    (namespaces, bpffs mounts, children) as they do on Ctrl-C.

    Only the first SIGTERM does: a kill of the whole process group reaches a bench child twice (from
    the killer and from run_child passing it on), and a second SystemExit would break off the
    teardown half way. Later ones are swallowed by a Python no-op handler, not SIG_IGN, which the
    commands the teardown runs would inherit."""
    def _exit(signum, frame):
        signal.signal(signal.SIGTERM, lambda s, f: None)
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _exit)


def run_child(argv: list[str], *, timeout: float | None = None, grace: float = 20.0,
              capture: bool = True, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` for a child that builds things (a bench script, the VM): when this process
    is interrupted or the timeout passes, the child gets SIGTERM and ``grace`` seconds to tear down
    before SIGKILL (``subprocess.run`` would SIGKILL it at once and leave its namespaces behind)."""
    if capture:
        kw.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p = subprocess.Popen(argv, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        p.terminate()
        try:
            p.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
        raise
    return subprocess.CompletedProcess(argv, p.returncode, out, err)
