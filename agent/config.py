"""TOML configuration with errors that name the key and the reason.

Daemons describe their configuration as a schema of ``Field``s and read it
with ``load(path, schema)``; any problem raises ``ConfigError("ha.nodes[2].spi:
must be an integer >= 256, got 12")``. Key files named in a configuration must
be regular files of mode 0600 (or stricter) owned by root, else they are
refused (``read_key_file``).
"""

from __future__ import annotations

import ipaddress
import math
import os
import stat
import tomllib
from typing import Any, Callable


class ConfigError(ValueError):
    """A configuration problem; str() starts with the dotted key path."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, f"not valid TOML: {e}") from None


# -- typed getters: each names the key on failure ----------------------------------------
_MISSING = object()


def _get(d: dict, key: str, where: str, default: Any) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(where, "must be a table")
    if key in d:
        return d[key]
    if default is _MISSING:
        raise ConfigError(f"{where}.{key}" if where else key, "is required")
    return default


def path_of(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def get_str(d: dict, key: str, where: str = "", default: Any = _MISSING, choices=None) -> str:
    v = _get(d, key, where, default)
    if v is default and default is not _MISSING:
        return v
    if not isinstance(v, str):
        raise ConfigError(path_of(where, key), f"must be a string, got {type(v).__name__}")
    if choices is not None and v not in choices:
        raise ConfigError(path_of(where, key), f"must be one of {', '.join(map(repr, choices))}, got {v!r}")
    return v


def get_bool(d: dict, key: str, where: str = "", default: Any = _MISSING) -> bool:
    v = _get(d, key, where, default)
    if not isinstance(v, bool):
        raise ConfigError(path_of(where, key), f"must be true or false, got {v!r}")
    return v


def get_int(d: dict, key: str, where: str = "", default: Any = _MISSING, min: int | None = None,
            max: int | None = None) -> int:
    v = _get(d, key, where, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(path_of(where, key), f"must be an integer, got {v!r}")
    if (min is not None and v < min) or (max is not None and v > max):
        rng = f">= {min}" if max is None else (f"<= {max}" if min is None else f"between {min} and {max}")
        raise ConfigError(path_of(where, key), f"must be {rng}, got {v}")
    return v


def get_float(d: dict, key: str, where: str = "", default: Any = _MISSING, min: float | None = None) -> float:
    v = _get(d, key, where, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(path_of(where, key), f"must be a number, got {v!r}")
    if not math.isfinite(v):
        raise ConfigError(path_of(where, key), f"must be a finite number, got {v!r}")
    if min is not None and v < min:
        raise ConfigError(path_of(where, key), f"must be >= {min}, got {v}")
    return float(v)


def get_ip(d: dict, key: str, where: str = "", default: Any = _MISSING) -> ipaddress.IPv4Address:
    v = _get(d, key, where, default)
    if v is default and default is not _MISSING:
        return v
    try:
        return ipaddress.IPv4Address(v)
    except (ValueError, TypeError):
        raise ConfigError(path_of(where, key), f"must be an IPv4 address, got {v!r}") from None


def get_net(d: dict, key: str, where: str = "", default: Any = _MISSING) -> ipaddress.IPv4Network:
    v = _get(d, key, where, default)
    if v is default and default is not _MISSING:
        return v
    try:
        return ipaddress.IPv4Network(v, strict=False)
    except (ValueError, TypeError):
        raise ConfigError(path_of(where, key), f"must be an IPv4 prefix like 10.0.0.0/8, got {v!r}") from None


def get_list(d: dict, key: str, where: str = "", default: Any = _MISSING, item: Callable | None = None) -> list:
    v = _get(d, key, where, default)
    if not isinstance(v, list):
        raise ConfigError(path_of(where, key), f"must be a list, got {type(v).__name__}")
    if item is None:
        return v
    out = []
    for i, x in enumerate(v):
        out.append(item({"_": x}, "_", f"{path_of(where, key)}[{i}]"))
    return out


def ip_item(d, k, where):
    try:
        return ipaddress.IPv4Address(d[k])
    except (ValueError, TypeError):
        raise ConfigError(where, f"must be an IPv4 address, got {d[k]!r}") from None


def net_item(d, k, where):
    try:
        return ipaddress.IPv4Network(d[k], strict=False)
    except (ValueError, TypeError):
        raise ConfigError(where, f"must be an IPv4 prefix, got {d[k]!r}") from None


def check_unknown(d: dict, known: set[str], where: str) -> None:
    """Reject keys nobody reads: a typo must not silently fall back to a default."""
    if not isinstance(d, dict):
        raise ConfigError(where or "(top level)", f"must be a table, got {type(d).__name__}")
    extra = sorted(set(d) - known)
    if extra:
        raise ConfigError(path_of(where, extra[0]), f"unknown key (known: {', '.join(sorted(known))})")


# -- secrets -------------------------------------------------------------------------------
def read_key_file(path: str, key: str, raw: bool = False) -> bytes:
    """Read a secret; refuse it unless it is a regular file of mode 0600 or stricter.

    A file holding hex digits (optionally prefixed 0x, whitespace ignored) is
    decoded; anything else is used as raw bytes. ``raw``: the bytes exactly as
    stored (PEM or DER private keys).
    """
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the daemon (it is refused below)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(key, f"key file {path} not found") from None
    except OSError as e:
        raise ConfigError(key, f"key file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(key, f"key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(key, f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                                   "it must be 0600 (chmod 600) and owned by root")
        if st.st_uid not in (0, os.geteuid()):
            raise ConfigError(key, f"key file {path} is owned by uid {st.st_uid}, not root")
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    if raw:
        if not data:
            raise ConfigError(key, f"key file {path} is empty")
        return data
    text = data.strip()
    try:
        t = text.decode()
        h = t[2:] if t.lower().startswith("0x") else t
        h = "".join(h.split())
        if h and all(c in "0123456789abcdefABCDEF" for c in h) and len(h) % 2 == 0:
            return bytes.fromhex(h)
    except UnicodeDecodeError:
        pass
    if not text:
        raise ConfigError(key, f"key file {path} is empty")
    return text
