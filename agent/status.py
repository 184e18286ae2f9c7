"""``mipmobike status [--socket PATH] [--json]``: a running daemon's state.

Works with any of the daemons (mn, ha, fa): it sends ``{"cmd": "status"}``
to the control socket and prints the result, as JSON with ``--json`` or as
indented text otherwise (lists of records become tables). Without
``--socket`` it uses the default socket of the one daemon running here
(/run/mipmobike/{mn,ha,fa}.sock), or of ``--role``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from agent.control import ControlError, default_socket, request

ROLES = ("mn", "ha", "fa")


def add_arguments(parser) -> None:
    parser.add_argument("--socket", "-s", metavar="PATH", help="the daemon's control socket")
    parser.add_argument("--role", choices=ROLES, help="use this daemon's default socket")
    parser.add_argument("--json", action="store_true", help="print the raw JSON")
    parser.add_argument("--command", default="status", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")


def find_socket(role: str | None) -> str:
    if role:
        return default_socket(role)
    found = [default_socket(r) for r in ROLES if os.path.exists(default_socket(r))]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ControlError("no daemon control socket found under /run/mipmobike; use --socket PATH")
    raise ControlError(f"several daemons are running ({', '.join(found)}); choose one with --socket or --role")


# keys whose numbers are wall-clock times (seconds since the epoch) in the daemons' status
_WALLCLOCK_KEY = re.compile(r"^(t_.*|.*_at|time|last_mobike|started)$")


def _clock(v: float, now: float | None = None) -> str:
    """A wall-clock time for people: 14:03:07.250 today, else with the date."""
    now = time.time() if now is None else now
    lt = time.localtime(v)
    ms = f"{int((v % 1) * 1000):03d}"
    if time.localtime(now)[:3] == lt[:3]:
        return time.strftime("%H:%M:%S", lt) + "." + ms
    return time.strftime("%Y-%m-%d %H:%M:%S", lt) + "." + ms


def _scalar(v, key: str | None = None) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if key is not None and isinstance(v, (int, float)) and _WALLCLOCK_KEY.match(key) and 1e9 < v < 1e11:
        return _clock(float(v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _is_table(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _table(rows: list[dict], indent: str) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in cols and not isinstance(v, (dict, list)):
                cols.append(k)
    cells = [[_scalar(r.get(c), c) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    out = [indent + "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    for row in cells:
        out.append(indent + "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip())
    return out


def render(obj, indent: str = "") -> list[str]:
    """Indented text for a JSON value (dicts as "key: value", record lists as tables)."""
    lines: list[str] = []
    if isinstance(obj, dict):
        width = max((len(str(k)) for k in obj), default=0)
        for k, v in obj.items():
            if isinstance(v, dict):
                if not v:
                    lines.append(f"{indent}{k}: -")
                    continue
                lines.append(f"{indent}{k}:")
                lines.extend(render(v, indent + "  "))
            elif _is_table(v):
                lines.append(f"{indent}{k}: ({len(v)})")
                lines.extend(_table(v, indent + "  "))
            elif isinstance(v, list):
                lines.append(f"{indent}{str(k) + ':':<{width + 1}} "
                             + (", ".join(_scalar(x) for x in v) if v else "-"))
            else:
                lines.append(f"{indent}{str(k) + ':':<{width + 1}} {_scalar(v, str(k))}")
    elif _is_table(obj):
        lines.extend(_table(obj, indent))
    elif isinstance(obj, list):
        lines.extend(indent + _scalar(x) for x in obj)
    else:
        lines.append(indent + _scalar(obj))
    return lines


def run(args) -> int:
    try:
        path = args.socket or find_socket(args.role)
        result = request(path, args.command, timeout=args.timeout)
    except ControlError as e:
        print(f"mipmobike status: {e}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(result, sys.stdout, indent=2, sort_keys=False, default=str)
        print()
    else:
        print("\n".join(render(result)))
    return 0
