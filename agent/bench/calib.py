"""How fast this machine runs the agent's own kind of work (pure Python).

Under QEMU TCG every instruction is emulated, so a time measured in the VM
says little about real hardware. The same fixed workload timed on the host
and in the VM gives the emulation factor the report uses to *estimate* what a
VM figure dominated by our processing would be on the host's CPU (labelled as
an estimate, never as a measurement).

The workload is the i-HA engine of ``scripts/bench_ha.py`` (decode a signed
Registration Request, check HMAC-MD5, bind, encode the reply) in a fresh
process: the same mix of struct packing, hashing and dataclass work as the
agent's handover code. Best of a few runs, so a busy neighbour counts least.
"""

from __future__ import annotations

import time

from .hostparts import ha_row

WORKLOAD = "i-HA engine registrations (decode, HMAC-MD5 check, bind, encode reply), renewals of 5,000 bindings"


def python_speed(n: int = 5000, runs: int = 3, timeout: float = 900) -> dict:
    """{"workload", "per_s": best renewals per second, "runs": [...]} or {"error": ...}."""
    rates, errors = [], []
    t0 = time.monotonic()
    for _ in range(runs):
        r, err = ha_row("engine", n, 0, timeout)
        if r is not None and "renew" in r:
            rates.append(float(r["renew"]))
        else:
            errors.append(err or f"no renewal rate in {r}")
    if not rates:
        return {"workload": WORKLOAD, "error": "; ".join(errors)}
    return {"workload": WORKLOAD, "per_s": round(max(rates)), "runs": [round(r) for r in rates],
            "elapsed_s": round(time.monotonic() - t0, 1)}


def factor(host: dict | None, vm: dict | None) -> float | None:
    """How many times slower the VM ran the workload (None when either side is missing)."""
    try:
        return round(host["per_s"] / vm["per_s"], 1)
    except (TypeError, KeyError, ZeroDivisionError):
        return None
