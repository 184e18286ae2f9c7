"""``mipmobike doctor``: what this host offers the agent, each item tried for real.

Every kernel feature is exercised in a scratch network namespace that is
removed afterwards; nothing is inferred from configuration files. The exit
status is non-zero when the mobile node could not run at all (no XFRM, no
netlink, not root), not when optional parts are missing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

ESP_ENC_KEY = "0x" + "11" * 16
ESP_AUTH_KEY = "0x" + "22" * 32


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    extra: dict = field(default_factory=dict)


def _run(*argv: str, ns: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    if ns:
        argv = ("ip", "netns", "exec", ns) + argv
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _err(p: subprocess.CompletedProcess) -> str:
    return (p.stderr or p.stdout).strip().splitlines()[-1] if (p.stderr or p.stdout).strip() else f"exit {p.returncode}"


class Scratch:
    """A throw-away network namespace with a veth pair inside it."""

    def __init__(self) -> None:
        self.name = f"mmdoc-{secrets.token_hex(4)}"

    def __enter__(self) -> "Scratch":
        p = _run("ip", "netns", "add", self.name)
        if p.returncode:
            raise RuntimeError(f"cannot create a network namespace: {_err(p)}")
        _run("ip", "link", "set", "lo", "up", ns=self.name)
        _run("ip", "link", "add", "dva", "type", "veth", "peer", "name", "dvb", ns=self.name)
        _run("ip", "addr", "add", "10.255.0.1/30", "dev", "dva", ns=self.name)
        for dev in ("dva", "dvb"):
            _run("ip", "link", "set", dev, "up", ns=self.name)
        return self

    def __exit__(self, *exc) -> None:
        _run("ip", "netns", "del", self.name)


def check_root() -> Check:
    return Check("root", os.geteuid() == 0, "running as root" if os.geteuid() == 0 else "needs root (CAP_NET_ADMIN, CAP_BPF)")


def check_xfrm_policy(s: Scratch) -> Check:
    p = _run("ip", "xfrm", "policy", "add", "src", "10.1.0.0/24", "dst", "10.2.0.0/24", "dir", "out",
             "tmpl", "src", "10.255.0.1", "dst", "10.255.0.2", "proto", "esp", "mode", "tunnel", ns=s.name)
    return Check("xfrm_policy", p.returncode == 0, "policy added" if p.returncode == 0 else _err(p))


def check_esp(s: Scratch) -> Check:
    p = _run("ip", "xfrm", "state", "add", "src", "10.255.0.1", "dst", "10.255.0.2", "proto", "esp",
             "spi", "0x1000", "mode", "tunnel", "enc", "cbc(aes)", ESP_ENC_KEY,
             "auth-trunc", "hmac(sha256)", ESP_AUTH_KEY, "128", ns=s.name)
    if p.returncode == 0:
        return Check("esp", True, "ESP state (cbc(aes)+hmac(sha256)) added")
    return Check("esp", False, f"kernel refused an ESP state: {_err(p)} (no CONFIG_INET_ESP)")


def check_esp_gcm(s: Scratch) -> Check:
    p = _run("ip", "xfrm", "state", "add", "src", "10.255.0.1", "dst", "10.255.0.2", "proto", "esp",
             "spi", "0x1001", "mode", "tunnel", "aead", "rfc4106(gcm(aes))", "0x" + "33" * 20, "128",
             ns=s.name)
    return Check("esp_gcm", p.returncode == 0, "rfc4106(gcm(aes)) state added" if p.returncode == 0 else _err(p))


def check_migrate() -> Check:
    try:
        import xfrm
        probe = getattr(xfrm, "probe_migrate", None)
    except Exception as e:  # pragma: no cover - import problems are reported
        return Check("xfrm_migrate", False, f"xfrm package unusable: {e}")
    if probe is None:
        return Check("xfrm_migrate", False, "not probed (xfrm.probe_migrate not available yet)")
    try:
        ok, detail = probe()
    except Exception as e:
        return Check("xfrm_migrate", False, f"probe failed: {e}")
    return Check("xfrm_migrate", bool(ok), detail)


def check_ipip(s: Scratch) -> Check:
    p = _run("ip", "link", "add", "dipip", "type", "ipip", "local", "10.255.0.1", "remote", "10.255.0.2",
             ns=s.name)
    return Check("ipip", p.returncode == 0, "ipip device created" if p.returncode == 0 else f"{_err(p)} (no CONFIG_NET_IPIP)")


def check_tc_clsact(s: Scratch) -> Check:
    p = _run("tc", "qdisc", "add", "dev", "dva", "clsact", ns=s.name)
    return Check("tc_clsact", p.returncode == 0, "clsact qdisc added" if p.returncode == 0 else _err(p))


_BPF_TC = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
int doctor_tc(struct __sk_buff *skb) { return TC_ACT_OK; }
int doctor_xdp(struct xdp_md *ctx) { return XDP_PASS; }
"""


def check_bcc(s: Scratch) -> list[Check]:
    """Compile with bcc, attach with cls_bpf (TC) and XDP to a veth in the scratch namespace."""
    build = f"/lib/modules/{os.uname().release}/build"
    headers = os.path.realpath(build) if os.path.exists(build) else None
    code = f"""
import os, sys, json, time
t = time.monotonic()
from bcc import BPF, lib
b = BPF(text={_BPF_TC!r})
tc = b.load_func("doctor_tc", BPF.SCHED_CLS)
res = {{"compile_s": round(time.monotonic() - t, 2)}}
pin = "/run/mipmobike-doctor-{secrets.token_hex(3)}"
os.makedirs(pin, exist_ok=True)
import subprocess
subprocess.run(["mount", "-t", "bpf", "bpf", pin], check=True)
try:
    assert lib.bpf_obj_pin(tc.fd, (pin + "/tc").encode()) == 0
    p = subprocess.run(["tc", "filter", "add", "dev", "dva", "egress", "bpf", "direct-action",
                        "object-pinned", pin + "/tc"], capture_output=True, text=True)
    res["cls_bpf"] = [p.returncode == 0, p.stderr.strip()]
    try:
        xdp = b.load_func("doctor_xdp", BPF.XDP)
        b.attach_xdp("dvb", xdp, BPF.XDP_FLAGS_SKB_MODE)
        b.remove_xdp("dvb", BPF.XDP_FLAGS_SKB_MODE)
        res["xdp"] = [True, "generic XDP attached to veth"]
    except Exception as e:
        res["xdp"] = [False, str(e)]
finally:
    subprocess.run(["umount", pin]); os.rmdir(pin)
print(json.dumps(res))
"""
    if headers is None:
        return [Check("bcc", False, f"no kernel headers at {build} (run scripts/setup.sh to link Debian's)"),
                Check("cls_bpf", False, "needs bcc"), Check("xdp_veth", False, "needs bcc")]
    p = _run(sys.executable, "-c", code, ns=s.name, timeout=180)
    if p.returncode:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-3:])
        return [Check("bcc", False, f"bcc compile failed with headers {headers}: {tail}"),
                Check("cls_bpf", False, "needs bcc"), Check("xdp_veth", False, "needs bcc")]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    return [
        Check("bcc", True, f"compiled in {res['compile_s']} s with headers {headers}", {"headers": headers}),
        Check("cls_bpf", res["cls_bpf"][0], "TC egress program attached" if res["cls_bpf"][0] else res["cls_bpf"][1]),
        Check("xdp_veth", res["xdp"][0], res["xdp"][1]),
    ]


TOOLS = {
    "strongswan": ["/usr/sbin/charon-systemd", "swanctl", "pki"],
    "dnsmasq": ["dnsmasq"],
    "tshark": ["tshark"],
    "qemu": ["qemu-system-x86_64", "/usr/lib/qemu/virtiofsd"],
    "ipset": ["ipset"],
    "nft": ["nft"],
    "iptables": ["iptables"],
    "iperf3": ["iperf3"],
}


def check_tools() -> list[Check]:
    out = []
    for name, exes in TOOLS.items():
        missing = [e for e in exes if not (shutil.which(e) or (os.path.isabs(e) and os.access(e, os.X_OK)))]
        out.append(Check(f"tool:{name}", not missing, "present" if not missing else f"missing {', '.join(missing)}"))
    kernels = sorted(p for p in os.listdir("/boot") if p.startswith("vmlinuz-") and p.endswith("-cloud-amd64")) if os.path.isdir("/boot") else []
    out.append(Check("vm_kernel", bool(kernels), kernels[-1] if kernels else "no linux-image-cloud-amd64 in /boot"))
    return out


def collect() -> list[Check]:
    checks = [check_root()]
    if not checks[0].ok:
        return checks + check_tools()
    with Scratch() as s:
        checks += [check_xfrm_policy(s), check_esp(s), check_esp_gcm(s), check_ipip(s), check_tc_clsact(s)]
        checks += check_bcc(s)
    checks.append(check_migrate())
    checks += check_tools()
    return checks


def tiers(checks: dict[str, Check]) -> dict[str, str]:
    def ok(*names):
        return all(checks.get(n) and checks[n].ok for n in names)
    vm_ok = ok("tool:qemu", "vm_kernel")
    kernel = "native" if ok("esp", "ipip", "xfrm_policy") else ("vm" if vm_ok else "unavailable")
    return {
        "unit": "native",
        "netns": "native" if ok("root", "xfrm_policy", "bcc", "cls_bpf", "tool:strongswan") else "unavailable",
        "kernel": kernel,
    }


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    t0 = time.monotonic()
    checks = collect()
    by = {c.name: c for c in checks}
    tier = tiers(by)
    # the mobile node needs root, XFRM policies and a gate (BPF or netfilter)
    fatal = [n for n in ("root", "xfrm_policy") if not (by.get(n) and by[n].ok)]
    if not (by.get("bcc") and by["bcc"].ok) and not (by.get("tool:nft") and by["tool:nft"].ok) \
            and not (by.get("tool:iptables") and by["tool:iptables"].ok):
        fatal.append("gate")
    # not blocking, but what the node can then do is less than the product promises
    limits = []
    if not (by.get("esp") and by["esp"].ok):
        limits.append("no ESP: no VPN, so untrusted links stay closed (no mode mc)")
    if not (by.get("ipip") and by["ipip"].ok):
        limits.append("no ipip: no Mobile IP tunnel for modes c and mc (only datapath = \"none\", signalling)")
    report = {
        "kernel": os.uname().release,
        "in_vm": os.environ.get("MIPMOBIKE_IN_VM") == "1",
        "checks": {c.name: {"ok": c.ok, "detail": c.detail, **c.extra} for c in checks},
        "tiers": tier,
        "mobile_node_can_run": not fatal,
        "blocking": fatal,
        "limits": limits,
        "seconds": round(time.monotonic() - t0, 2),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"mipmobike doctor on kernel {report['kernel']}")
        for c in checks:
            print(f"  {'ok  ' if c.ok else 'NO  '} {c.name:<16} {c.detail}")
        print("  test tiers: " + ", ".join(f"{k}={v}" for k, v in tier.items()))
        print("  mobile node: " + ("can run" if not fatal else "cannot run: missing " + ", ".join(fatal)))
        for lim in limits:
            print(f"    but {lim}")
    return 0 if not fatal else 1
