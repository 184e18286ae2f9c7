#!/usr/bin/env python3
"""SA add+delete per second: the xfrm API next to `ip xfrm` run once per SA.

Needs a kernel with ESP; on a host without it run it in the VM:

    scripts/vm/vmrun.sh .venv/bin/python scripts/bench_xfrm.py [-n 300] [--ip-n 60]

Everything happens in a scratch network namespace that is removed at the end.
Each round adds an ESP tunnel SA (cbc(aes) + hmac(sha256)) and deletes it
again; the rate is rounds per second. `ip -batch` (one process for all SAs)
is shown as a third reference.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import xfrm  # noqa: E402
from agent.bench.env import sigterm_exits  # noqa: E402
from xfrm import SA, Algorithms  # noqa: E402

ENC, AUTH = bytes(range(16)), bytes(range(32))
OWNER = xfrm.DEFAULT_OWNER


def sa(i: int) -> SA:
    return SA("192.0.2.1", "192.0.2.2", 0x10000 + i, Algorithms.cbc_hmac(ENC, AUTH),
              reqid=OWNER.reqid_min + 1)


def ip_args(i: int) -> tuple:
    spi = hex(0x20000 + i)
    add = ("xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp",
           "spi", spi, "reqid", str(OWNER.reqid_min + 1), "mode", "tunnel",
           "enc", "cbc(aes)", "0x" + ENC.hex(), "auth-trunc", "hmac(sha256)",
           "0x" + AUTH.hex(), "128")
    delete = ("xfrm", "state", "delete", "src", "192.0.2.1", "dst", "192.0.2.2",
              "proto", "esp", "spi", spi)
    return add, delete


def bench_sync(ns: str, n: int) -> float:
    with xfrm.Xfrm(ns) as x:
        x.add_sa(sa(n + 1))                   # warm up (module load, caches)
        x.delete_sa(sa(n + 1))
        t = time.perf_counter()
        for i in range(n):
            x.add_sa(sa(i))
            x.delete_sa(sa(i))
        return n / (time.perf_counter() - t)


def bench_async(ns: str, n: int) -> float:
    async def main():
        async with xfrm.AsyncXfrm(ns) as x:
            t = time.perf_counter()
            for i in range(n):
                await x.add_sa(sa(i))
                await x.delete_sa(sa(i))
            return n / (time.perf_counter() - t)
    return asyncio.run(main())


def bench_ip(ns: str, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        add, delete = ip_args(i)
        subprocess.run(["ip", "-n", ns, *add], check=True)
        subprocess.run(["ip", "-n", ns, *delete], check=True)
    return n / (time.perf_counter() - t)


def bench_ip_batch(ns: str, n: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".ip", delete=False) as f:
        for i in range(n):
            add, delete = ip_args(i)
            f.write(" ".join(add) + "\n" + " ".join(delete) + "\n")
    try:
        t = time.perf_counter()
        subprocess.run(["ip", "-n", ns, "-batch", f.name], check=True)
        return n / (time.perf_counter() - t)
    finally:
        os.unlink(f.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=300, help="SAs through the API (default 300)")
    ap.add_argument("--ip-n", type=int, default=60,
                    help="SAs through `ip xfrm`, two processes each (default 60)")
    args = ap.parse_args()
    sigterm_exits()            # a kill tears down too (finally blocks run)
    subprocess.run(["modprobe", "-a", "esp4", "xfrm_user"], check=False,
                   stderr=subprocess.DEVNULL)
    ns = f"mmbench-{os.getpid()}-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        try:
            with xfrm.Xfrm(ns) as x:
                x.add_sa(sa(0))
                x.delete_sa(sa(0))
        except xfrm.EspUnavailable as e:
            print(f"bench_xfrm: {e.strerror}\nrun it in the VM: "
                  f"scripts/vm/vmrun.sh .venv/bin/python scripts/bench_xfrm.py", file=sys.stderr)
            return 2
        rows = [
            (f"xfrm.Xfrm (sync), {args.n} SAs", bench_sync(ns, args.n)),
            (f"xfrm.AsyncXfrm, {args.n} SAs", bench_async(ns, args.n)),
            (f"ip xfrm, one process per add/delete, {args.ip_n} SAs", bench_ip(ns, args.ip_n)),
            (f"ip -batch, one process for {args.ip_n} SAs", bench_ip_batch(ns, args.ip_n)),
        ]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    ref = rows[2][1]
    print(f"SA add+delete per second (kernel {os.uname().release}):")
    for name, rate in rows:
        print(f"  {name:<48} {rate:10.1f}/s   x{rate / ref:6.1f} vs ip xfrm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
