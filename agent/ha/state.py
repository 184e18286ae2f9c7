"""The home agent's binding state on disk, written atomically.

The file is JSON: ``{"version": 1, "saved_at": UNIX time, "bindings": [...],
"identifications": {home address: last accepted identification}}``. It is
written to a temporary file in the same directory, flushed, fsync'ed and
renamed over the old one, so a crash leaves either the old or the new
state, never a torn one. The last accepted identification of each node is
kept too: without it a restarted home agent would accept a replayed
request that is still inside the timestamp tolerance.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict
from ipaddress import IPv4Address

from agent.mip.constants import RegFlag
from agent.mip.ha import Binding

log = logging.getLogger("mipmobike.ha.state")

VERSION = 1
_ADDR_FIELDS = ("home_address", "care_of_address", "source_address", "foreign_agent")


class StateError(ValueError):
    """The state file exists but cannot be used (named in the message)."""


def binding_to_json(b: Binding) -> dict:
    d = asdict(b)
    for k in _ADDR_FIELDS:
        if d[k] is not None:
            d[k] = str(d[k])
    d["flags"] = int(b.flags)
    d["nai"] = b.nai.decode("utf-8", "surrogateescape") if b.nai is not None else None
    return d


def binding_from_json(d: dict) -> Binding:
    try:
        kw = dict(d)
        for k in _ADDR_FIELDS:
            if kw.get(k) is not None:
                kw[k] = IPv4Address(kw[k])
        kw["flags"] = RegFlag(int(kw["flags"]))
        if kw.get("nai") is not None:
            kw["nai"] = kw["nai"].encode("utf-8", "surrogateescape")
        return Binding(**kw)
    except (KeyError, TypeError, ValueError) as e:
        raise StateError(f"bad binding record {d!r}: {e}") from None


class StateFile:
    def __init__(self, path: str):
        self.path = path

    def save(self, bindings: list[Binding], identifications: dict, now: float) -> None:
        doc = {
            "version": VERSION,
            "saved_at": now,
            "bindings": [binding_to_json(b) for b in bindings],
            "identifications": {str(k): int(v) for k, v in identifications.items()},
        }
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ha-state.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        try:
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

    def load(self) -> tuple[list[Binding], dict[IPv4Address, int]]:
        """(bindings, identifications); empty when there is no file yet."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return [], {}
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise StateError(f"{self.path}: not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            raise StateError(f"{self.path}: unknown state version {doc.get('version') if isinstance(doc, dict) else doc!r}")
        bindings = [binding_from_json(b) for b in doc.get("bindings", [])]
        idents = {}
        for k, v in (doc.get("identifications") or {}).items():
            try:
                idents[IPv4Address(k)] = int(v)
            except (ValueError, TypeError):
                raise StateError(f"{self.path}: bad identification entry {k!r}: {v!r}") from None
        return bindings, idents
