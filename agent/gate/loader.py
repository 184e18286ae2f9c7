"""Compile the gate once, instantiate it as often as needed.

bcc compiles C to BPF with clang: about a second on the development host,
10-14 s in the TCG VM. The agent must not pay that per interface, per
instance or per restart, so compilation is separated from loading:

* ``compiled()`` runs bcc once per process (and source text) and keeps the
  result as plain data: each program's instructions, the map definitions
  and where the instructions refer to a map (bcc emits a 64-bit immediate
  load of the map's fd there, BPF_PSEUDO_MAP_FD).
* ``CompiledGate.instantiate()`` creates fresh maps with bpf(2), patches
  their fds into the instructions and loads the programs. The kernel
  verifier checks them again each time, so a stale cache cannot load
  anything unsafe; a load failure falls back to a fresh compile.
* with ``cache_dir`` the compiled data is also stored on disk, keyed by a
  hash of the source and the kernel release; a restarted agent then starts
  without bcc's compile (and even without bcc).

An agent that finds its objects pinned on the bpffs adopts them and does not
instantiate anything at all (see bpf_backend).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass, field

import bpf as bpf_sources

from .bpfsys import BpfError, _attr, _bpf, map_info

log = logging.getLogger("mipmobike.gate")

BPF_MAP_CREATE = 0
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6
BPF_PSEUDO_MAP_FD = 1
BPF_LD_IMM64 = 0x18

# program name -> BPF program type
PROGRAMS = {
    "gate_egress": BPF_PROG_TYPE_SCHED_CLS,
    "gate_ingress_tc": BPF_PROG_TYPE_SCHED_CLS,
    "gate_ingress": BPF_PROG_TYPE_XDP,
}
MAPS = ("ifstate", "allow", "config", "counters")


class GateUnavailable(RuntimeError):
    """The BPF backend cannot be used here (no bcc, no headers, no BPF)."""


@dataclass
class CompiledGate:
    key: str
    progs: dict[str, tuple[int, bytes]]            # name -> (type, instructions)
    maps: dict[str, dict]                          # name -> type/key_size/value_size/...
    relocs: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # prog -> [(insn, map)]

    def to_json(self) -> str:
        return json.dumps({"key": self.key,
                           "progs": {n: [t, i.hex()] for n, (t, i) in self.progs.items()},
                           "maps": self.maps, "relocs": self.relocs})

    @classmethod
    def from_json(cls, text: str) -> "CompiledGate":
        d = json.loads(text)
        return cls(d["key"], {n: (t, bytes.fromhex(i)) for n, (t, i) in d["progs"].items()},
                   d["maps"], {n: [tuple(r) for r in rs] for n, rs in d["relocs"].items()})

    def instantiate(self, maps: dict[str, int] | None = None) -> tuple[dict[str, int], dict[str, int]]:
        """Create new maps (or use the fds in ``maps``) and load the programs
        against them: (prog fds, map fds). Fds in ``maps`` are not duplicated."""
        map_fds: dict[str, int] = {}
        prog_fds: dict[str, int] = {}
        given = dict(maps or {})
        try:
            for name, spec in self.maps.items():
                map_fds[name] = given[name] if name in given else _map_create(name, spec)
            for name, (ptype, insns) in self.progs.items():
                code = bytearray(insns)
                for idx, mname in self.relocs.get(name, []):
                    struct.pack_into("=i", code, idx * 8 + 4, map_fds[mname])
                prog_fds[name] = _prog_load(name, ptype, bytes(code))
        except Exception:
            for name, fd in list(map_fds.items()) + list(prog_fds.items()):
                if given.get(name) != fd:
                    os.close(fd)
            raise
        return prog_fds, map_fds


def _map_create(name: str, spec: dict) -> int:
    attr = _attr(struct.pack("=7I16s", spec["type"], spec["key_size"], spec["value_size"],
                             spec["max_entries"], spec["flags"], 0, 0, name.encode()[:15]))
    return _bpf(BPF_MAP_CREATE, attr)


def _prog_load(name: str, ptype: int, insns: bytes) -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")

    def load(log_level: int, logbuf) -> int:
        attr = _attr(struct.pack("=IIQQIIQII16s", ptype, len(insns) // 8, ctypes.addressof(code),
                                 ctypes.addressof(lic), log_level, len(logbuf) if log_level else 0,
                                 ctypes.addressof(logbuf) if log_level else 0, 0, 0,
                                 name.encode()[:15]))
        return _bpf(BPF_PROG_LOAD, attr)

    try:
        return load(0, None)
    except BpfError as e:
        # load again with the verifier's log, to say why
        logbuf = ctypes.create_string_buffer(1 << 20)
        try:
            return load(1, logbuf)
        except BpfError:
            pass
        tail = logbuf.value.decode(errors="replace").strip().splitlines()[-5:]
        raise BpfError(e.errno, f"loading {name}: {e.strerror}; verifier: {' | '.join(tail)}") from None


def source_key() -> str:
    """Cache key: the C source and the kernel headers bcc compiles against (the
    target of /lib/modules/$(uname -r)/build, else the kernel release). Not
    bcc's version: the cached instructions are plain BPF, checked again by the
    verifier on every load, so a cache written by one bcc serves a host without
    bcc, and a host and a VM compiling against the same headers share it."""
    h = hashlib.sha256()
    for f in ("gate.c", "gate.h"):
        h.update(bpf_sources.read_bytes(f))
    build = f"/lib/modules/{os.uname().release}/build"
    h.update((os.path.realpath(build) if os.path.exists(build) else os.uname().release).encode())
    return h.hexdigest()[:24]


def _compile_with_bcc(key: str) -> CompiledGate:
    try:
        from bcc import BPF, lib
    except ImportError as e:
        raise GateUnavailable(f"bcc is not importable ({e})") from None
    try:
        b = BPF(src_file=str(bpf_sources.path("gate.c")).encode(),
                cflags=[f"-I{bpf_sources.DIR}", "-Wno-unused-function"])
    except Exception as e:
        raise GateUnavailable(f"bcc could not compile gate.c ({e}); kernel headers missing?") from None
    try:
        fd2map = {}
        maps = {}
        for name in MAPS:
            fd = lib.bpf_table_fd(b.module, name.encode())
            if fd < 0:
                raise GateUnavailable(f"gate.c defines no map {name}")
            fd2map[fd] = name
            info = map_info(fd)
            maps[name] = {k: info[k] for k in ("type", "key_size", "value_size", "max_entries", "flags")}
        progs, relocs = {}, {}
        for name, ptype in PROGRAMS.items():
            insns = bytes(b.dump_func(name.encode()))
            rel = []
            for i in range(0, len(insns) // 8):
                code, regs, _off, imm = struct.unpack_from("=BBhi", insns, i * 8)
                if code == BPF_LD_IMM64 and (regs >> 4) == BPF_PSEUDO_MAP_FD:
                    if imm not in fd2map:
                        raise GateUnavailable(f"{name}: instruction {i} refers to an unknown map fd {imm}")
                    rel.append((i, fd2map[imm]))
            progs[name] = (ptype, insns)
            relocs[name] = rel
        return CompiledGate(key, progs, maps, relocs)
    finally:
        b.cleanup()


_lock = threading.Lock()
_cache: dict[str, CompiledGate] = {}


def compiled(cache_dir: str | None = None, *, force: bool = False) -> CompiledGate:
    """The gate's compiled form: from this process's cache, the disk cache, or bcc."""
    key = source_key()
    with _lock:
        path = os.path.join(cache_dir, f"gate-{key}.json") if cache_dir else None
        if not force and key in _cache:
            cg = _cache[key]
            if path and not os.path.exists(path):
                _store(cg, cache_dir, path)      # this cache_dir is new to the process: fill it too
            return cg
        cg = None
        if path and not force:
            try:
                with open(path) as f:
                    cg = CompiledGate.from_json(f.read())
                if cg.key != key:
                    cg = None
            except (OSError, ValueError, KeyError, TypeError):
                cg = None
        if cg is None:
            cg = _compile_with_bcc(key)
            if path:
                _store(cg, cache_dir, path)
        _cache[key] = cg
        return cg


def _store(cg: CompiledGate, cache_dir: str, path: str) -> None:
    try:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(cg.to_json())
        os.replace(tmp, path)
    except OSError as e:
        log.warning("gate: cannot write compile cache %s: %s", path, e)


def instantiate(cache_dir: str | None = None, maps: dict[str, int] | None = None
                ) -> tuple[dict[str, int], dict[str, int]]:
    """Fresh programs (and maps, except those given); a cached compile that no
    longer loads is redone once."""
    cg = compiled(cache_dir)
    try:
        return cg.instantiate(maps)
    except BpfError as e:
        log.warning("gate: cached compile did not load (%s); compiling again", e)
        return compiled(cache_dir, force=True).instantiate(maps)
