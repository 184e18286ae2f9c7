"""The few bpf(2) commands the gate needs, through ctypes.

Only compiling needs bcc; everything after that (pinning, opening pinned
objects, reading and writing maps, asking what a program is) is a plain
syscall. So ``mipmobike gate status`` and an agent that adopts pinned state
never pay for a compile, and work where bcc is absent.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_bpf = 321  # x86_64

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_TEST_RUN = 10

BPF_ANY = 0
BPF_TCX_INGRESS = 46      # enum bpf_attach_type (kernel 6.6+)
BPF_TCX_EGRESS = 47
BPF_FS_MAGIC = 0xCAFE4A11

BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_PERCPU_HASH = 5


class BpfError(OSError):
    pass


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    ret = _libc.syscall(SYS_bpf, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    return ret


def _attr(data: bytes, size: int = 128) -> ctypes.Array:
    buf = ctypes.create_string_buffer(size)
    ctypes.memmove(buf, data, len(data))
    return buf


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(BPF_OBJ_PIN, _attr(struct.pack("=QI", ctypes.addressof(p), fd)))


def obj_get(path: str) -> int:
    """Open a pinned program or map; returns a new fd (O_CLOEXEC)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(BPF_OBJ_GET, _attr(struct.pack("=QII", ctypes.addressof(p), 0, 0)))


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, _attr(struct.pack("=I", prog_id)))


def map_fd_by_id(map_id: int) -> int:
    return _bpf(BPF_MAP_GET_FD_BY_ID, _attr(struct.pack("=I", map_id)))


def _info(fd: int, size: int) -> bytes:
    info = ctypes.create_string_buffer(size)
    attr = _attr(struct.pack("=IIQ", fd, size, ctypes.addressof(info)))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return info.raw


def prog_info(fd: int) -> dict:
    """type, id, tag, name and the ids of the maps the program uses."""
    raw = _info(fd, 88)
    ptype, pid = struct.unpack_from("=II", raw, 0)
    tag = raw[8:16].hex()
    nr_map_ids = struct.unpack_from("=I", raw, 52)[0]
    name = raw[64:80].split(b"\0", 1)[0].decode()
    map_ids = []
    if nr_map_ids:
        ids = (ctypes.c_uint32 * nr_map_ids)()
        info = ctypes.create_string_buffer(88)
        struct.pack_into("=I", info, 52, nr_map_ids)
        struct.pack_into("=Q", info, 56, ctypes.addressof(ids))
        _bpf(BPF_OBJ_GET_INFO_BY_FD, _attr(struct.pack("=IIQ", fd, 88, ctypes.addressof(info))))
        map_ids = list(ids)
    return {"type": ptype, "id": pid, "tag": tag, "name": name, "map_ids": map_ids}


def map_info(fd: int) -> dict:
    raw = _info(fd, 40)
    mtype, mid, ksize, vsize, maxe, flags = struct.unpack_from("=6I", raw, 0)
    name = raw[24:40].split(b"\0", 1)[0].decode()
    return {"type": mtype, "id": mid, "key_size": ksize, "value_size": vsize,
            "max_entries": maxe, "flags": flags, "name": name}


def possible_cpus() -> int:
    """Number of possible CPUs (the stride of per-CPU map values)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


class Map:
    """A BPF map by fd, with bytes keys and values."""

    def __init__(self, fd: int, owned: bool = True) -> None:
        self.fd = fd
        self._owned = owned
        info = map_info(fd)
        self.id = info["id"]
        self.name = info["name"]
        self.key_size = info["key_size"]
        self.value_size = info["value_size"]
        self.max_entries = info["max_entries"]
        self.percpu = info["type"] in (BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PERCPU_HASH)
        self.ncpus = possible_cpus() if self.percpu else 1
        # per-CPU values are laid out with an 8-byte stride
        self.buf_size = ((self.value_size + 7) // 8 * 8) * self.ncpus if self.percpu else self.value_size

    @classmethod
    def pinned(cls, path: str) -> "Map":
        return cls(obj_get(path))

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def _kv(self, key: bytes, value: bytes | None = None):
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key is {len(key)} bytes, want {self.key_size}")
        k = ctypes.create_string_buffer(key, self.key_size)
        v = ctypes.create_string_buffer(self.buf_size)
        if value is not None:
            if len(value) != self.buf_size:
                raise ValueError(f"map {self.name}: value is {len(value)} bytes, want {self.buf_size}")
            ctypes.memmove(v, value, self.buf_size)
        return k, v

    def lookup(self, key: bytes) -> bytes | None:
        k, v = self._kv(key)
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, _attr(struct.pack("=IIQQ", self.fd, 0, ctypes.addressof(k),
                                                        ctypes.addressof(v))))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return v.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        k, v = self._kv(key, value)
        _bpf(BPF_MAP_UPDATE_ELEM, _attr(struct.pack("=IIQQQ", self.fd, 0, ctypes.addressof(k),
                                                    ctypes.addressof(v), flags)))

    def delete(self, key: bytes) -> bool:
        k, _ = self._kv(key)
        try:
            _bpf(BPF_MAP_DELETE_ELEM, _attr(struct.pack("=IIQ", self.fd, 0, ctypes.addressof(k))))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> list[bytes]:
        out = []
        nxt = ctypes.create_string_buffer(self.key_size)
        cur = None
        while True:
            kaddr = 0 if cur is None else ctypes.addressof(cur)
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, _attr(struct.pack("=IIQQ", self.fd, 0, kaddr,
                                                             ctypes.addressof(nxt))))
            except BpfError as e:
                if e.errno == errno.ENOENT:
                    return out
                raise
            out.append(nxt.raw)
            cur = ctypes.create_string_buffer(nxt.raw, self.key_size)
            if len(out) > self.max_entries + 1:   # a map changing under us
                return out

    def items(self) -> list[tuple[bytes, bytes]]:
        out = []
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                out.append((k, v))
        return out

    def percpu_values(self, raw: bytes) -> list[bytes]:
        stride = (self.value_size + 7) // 8 * 8
        return [raw[i * stride:i * stride + self.value_size] for i in range(self.ncpus)]


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1) -> tuple[int, int]:
    """Run a program on ``data`` ``repeat`` times in the kernel: (return value, ns per run)."""
    buf = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(len(data) + 256)
    # struct { u32 prog_fd, retval, data_size_in, data_size_out; u64 data_in, data_out;
    #          u32 repeat, duration; ... }
    attr = _attr(struct.pack("=IIIIQQII", prog_fd, 0, len(data), len(out), ctypes.addressof(buf),
                             ctypes.addressof(out), repeat, 0))
    _bpf(BPF_PROG_TEST_RUN, attr)
    retval, = struct.unpack_from("=I", attr, 4)
    duration, = struct.unpack_from("=I", attr, 36)
    return retval, duration


def tcx_attach(ifindex: int, prog_fd: int, attach_type: int) -> None:
    """Attach a SCHED_CLS program to a device's TCX hook (kernel 6.6+), without a link: like a tc
    filter it stays attached after this process closes its fd (ENOSYS-like errors where TCX is absent)."""
    _bpf(BPF_PROG_ATTACH, _attr(struct.pack("=IIIII", ifindex, prog_fd, attach_type, 0, 0)))


def tcx_detach(ifindex: int, prog_fd: int, attach_type: int) -> None:
    _bpf(BPF_PROG_DETACH, _attr(struct.pack("=IIIII", ifindex, prog_fd, attach_type, 0, 0)))
