"""Where a MOBIKE-only move's time goes, and what it would be on the host's CPU.

The agent stamps the steps of every handover (``steps`` in its status
timeline: ms after the trigger). For MOBIKE-only moves the bench reports them
relative to the DHCP lease, the moment the new address is usable:

    address set -> VPN told -> request out (our SAs already moved)
                -> answer read -> answer processed (gateway and we agree)

Under QEMU TCG each of these is mostly emulated CPU. ``calib.python_speed``
times one fixed workload on the host and in the VM; the ratio (the emulation
factor F) scales what the VM measured into an *estimate* for the host's CPU:
the added network delay stays, everything else is divided by F. The estimate
is labelled as such wherever it is shown.
"""

from __future__ import annotations

from . import calib

STEPS = (("address_configured", "address set"), ("vpn_called", "VPN told"),
         ("mobike_sent", "request out, our SAs moved"), ("mobike_answer_rx", "answer read"),
         ("mobike_answered", "answer processed"))


def _median(vals: list[float]) -> float | None:
    vals = sorted(vals)
    if not vals:
        return None
    n = len(vals)
    return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2


def mobike_steps(moves: list[dict]) -> dict:
    """{step: median ms after the lease} over the MOBIKE-only moves that carry step marks, plus n."""
    rows = [m["steps"] for m in moves if m.get("mobike_only") and (m.get("steps") or {}).get("lease") is not None]
    out: dict = {"n": len(rows)}
    for key, _ in STEPS:
        vals = [s[key] - s["lease"] for s in rows if s.get(key) is not None]
        if vals:
            out[key] = round(_median(vals), 1)
    return out


def emulation_factor(res: dict, part: str = "handover") -> tuple[float | None, dict | None, dict | None]:
    """(F, host yardstick, VM yardstick) from the machines of a merged bench result: those of the run
    that measured ``part`` (a part merged in from a later run, maybe on another machine, has its own)."""
    ms = res.get("machines") or []
    mine = [m for m in ms if part in (m.get("merged_parts") or [])] or [m for m in ms if not m.get("merged_parts")]
    host = vm = None
    for m in mine:
        ps = m.get("python_speed")
        if not ps or "per_s" not in ps:
            continue
        if m.get("vm"):
            vm = ps
        else:
            host = ps
    return calib.factor(host, vm), host, vm


def host_estimate(median_ms: float | None, added_rtt_ms: float, factor: float | None) -> float | None:
    """The VM's figure with its emulated part divided by F (the added network delay kept)."""
    if median_ms is None or not factor:
        return None
    return round(added_rtt_ms + max(0.0, median_ms - added_rtt_ms) / factor, 1)
