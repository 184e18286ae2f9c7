"""Names shared by both gate backends; numbers come from bpf/gate.h."""

from __future__ import annotations

import enum
import re

import bpf as bpf_sources


class GateError(RuntimeError):
    """The gate could not do what was asked (names the interface / object)."""


class GateAbiError(GateError):
    """A gate of another ABI (an older or newer agent's) is installed here and cannot be replaced (read-only
    use, or this agent's programs cannot be built). ``links``: (ifindex, name, xdp id) it gates."""

    def __init__(self, msg: str, links: list | None = None) -> None:
        super().__init__(msg)
        self.links = list(links or [])


class GateState(str, enum.Enum):
    OPEN = "open"        # everything passes, counted
    CLOSED = "closed"    # detecting: only detection traffic passes
    OFF = "off"          # gate attached but not enforcing, nothing counted


def _defines() -> dict[str, int]:
    text = bpf_sources.read_bytes("gate.h").decode()
    return {m.group(1): int(m.group(2), 0)
            for m in re.finditer(r"^#define\s+(GATE_\w+)\s+(\w+)\s*$", text, re.M)}


_D = _defines()
ABI = _D["GATE_ABI"]
DIR_EGRESS = _D["GATE_DIR_EGRESS"]
DIR_INGRESS = _D["GATE_DIR_INGRESS"]
MAX_SLOTS = _D["GATE_MAX_SLOTS"]
NR_REASONS = _D["GATE_NR_REASONS"]
PROTO_HOST = _D["GATE_PROTO_HOST"]
FIRST_DROP = _D["GATE_FIRST_DROP"]

STATE_VALUE = {GateState.OPEN: _D["GATE_OPEN"], GateState.CLOSED: _D["GATE_CLOSED"],
               GateState.OFF: _D["GATE_OFF"]}
STATE_BY_VALUE = {v: k for k, v in STATE_VALUE.items()}

# reason number -> ("pass" | "drop", name), e.g. GATE_R_DROP_MIP_NOMARK -> ("drop", "mip_nomark")
REASON_NAMES: dict[int, tuple[str, str]] = {}
for _name, _val in _D.items():
    if _name.startswith("GATE_R_"):
        _n = _name[len("GATE_R_"):].lower()
        REASON_NAMES[_val] = ("drop", _n[len("drop_"):]) if _n.startswith("drop_") else ("pass", _n)
assert sorted(REASON_NAMES) == list(range(NR_REASONS)), "gate.h reasons must be 0..NR-1"
assert all((k >= FIRST_DROP) == (v[0] == "drop") for k, v in REASON_NAMES.items())

PASS_REASONS = [n for k, (kind, n) in sorted(REASON_NAMES.items()) if kind == "pass"]
DROP_REASONS = [n for k, (kind, n) in sorted(REASON_NAMES.items()) if kind == "drop"]


def empty_counters() -> dict:
    return {d: {"pass": dict.fromkeys(PASS_REASONS, 0), "drop": dict.fromkeys(DROP_REASONS, 0)}
            for d in ("egress", "ingress")}
