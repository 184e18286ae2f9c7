"""The BPF IP-in-IP data plane (bpf/tunnel.c) behind a small Python interface.

    prog = BpfTunnelProgram()                  # bcc compile + load (once)
    prog.attach_encap(kernel, "mip-bpf")        # egress of the TUN device
    prog.attach_decap(kernel, "eth0")           # ingress of each interface
    prog.set_dst(hoa, local=ha, remote=coa)     # to hoa: tunnel ha -> coa
    prog.set_src(hoa, local=coa, remote=ha)     # from hoa: tunnel coa -> ha
    prog.detach_all(); prog.close()

Only compiling needs bcc (and kernel headers); the maps are plain hash maps
allocated on demand (BPF_F_NO_PREALLOC), so memory grows with the number of
bindings, which :meth:`memory` reports from the kernel's own accounting.

Filters are added with priority :data:`FILTER_PRIO` and the names
``tun_encap``/``tun_decap``, which is how :meth:`remove_stale_filters` finds
the ones a crashed daemon left behind.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from ipaddress import IPv4Address

from pyroute2.netlink.exceptions import NetlinkError

import bpf as bpf_sources

from .netlink import Kernel, KernelError

log = logging.getLogger("mipmobike.kernel.bpf")

FILTER_PRIO = 0xC0DE  # after the trust gate (which takes the highest priority)
FILTER_HANDLE = 0x4D49
INGRESS = "ffff:fff2"
EGRESS = "ffff:fff3"
PROGRAM_NAMES = ("tun_encap", "tun_decap")
COUNTERS = ("encap_ok", "encap_no_binding", "encap_no_route", "encap_too_big", "encap_error",
            "decap_ok", "decap_not_bound", "decap_error")
DEFAULT_MAX_ENTRIES = 131072

_compile_lock = threading.Lock()


class BpfUnavailable(RuntimeError):
    """bcc, kernel headers or BPF itself are missing here."""


def _key(addr) -> int:
    """A network-byte-order IPv4 address as the host integer bcc stores."""
    return int.from_bytes(IPv4Address(str(addr)).packed, "little")


def _addr(value: int) -> IPv4Address:
    return IPv4Address(int(value).to_bytes(4, "little"))


def source_text() -> str:
    path = os.path.join(os.path.dirname(bpf_sources.__file__), "tunnel.c")
    with open(path) as f:
        return f.read()


class BpfTunnelProgram:
    """One loaded copy of the tunnel programs and their maps."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES):
        try:
            from bcc import BPF
        except ImportError as e:  # pragma: no cover - depends on the host
            raise BpfUnavailable(f"bcc (python3-bpfcc) is not installed: {e}") from None
        self._BPF = BPF
        with _compile_lock:
            try:
                self.bpf = BPF(text=source_text().encode(), cflags=[f"-DTUN_MAX_ENTRIES={max_entries}"])
                self.encap = self.bpf.load_func(b"tun_encap", BPF.SCHED_CLS)
                self.decap = self.bpf.load_func(b"tun_decap", BPF.SCHED_CLS)
            except Exception as e:
                raise BpfUnavailable(f"cannot compile/load bpf/tunnel.c: {e}") from None
        self.max_entries = max_entries
        self.tun_dst = self.bpf[b"tun_dst"]
        self.tun_src = self.bpf[b"tun_src"]
        self.counters_map = self.bpf[b"counters"]
        self._attached: list[tuple[Kernel, int, str]] = []

    # ------------------------------------------------------------------ attach

    def _attach(self, kernel: Kernel, ifname: str, fn, parent: str) -> None:
        idx = kernel.require_ifindex(ifname)
        ipr = kernel.ipr
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise KernelError(f"add clsact qdisc on {ifname}", e) from None
        self._del_filter(kernel, idx, parent)
        try:
            ipr.tc("add-filter", "bpf", idx, FILTER_HANDLE, fd=fn.fd, name=fn.name, parent=parent,
                   classid=1, direct_action=True, prio=FILTER_PRIO)
        except NetlinkError as e:
            raise KernelError(f"attach {fn.name} to {ifname}", e) from None
        self._attached.append((kernel, idx, parent))

    @staticmethod
    def _del_filter(kernel: Kernel, idx: int, parent: str) -> bool:
        try:
            kernel.ipr.tc("del-filter", "bpf", idx, FILTER_HANDLE, parent=parent, prio=FILTER_PRIO)
            return True
        except NetlinkError as e:
            if e.code in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                return False
            raise KernelError(f"remove tunnel filter from ifindex {idx}", e) from None

    def attach_encap(self, kernel: Kernel, ifname: str) -> None:
        """Encapsulate on egress of ``ifname`` (the L3 TUN device)."""
        self._attach(kernel, ifname, self.encap, EGRESS)

    def attach_decap(self, kernel: Kernel, ifname: str) -> None:
        """Decapsulate bound IPIP packets on ingress of Ethernet ``ifname``."""
        self._attach(kernel, ifname, self.decap, INGRESS)

    def detach_all(self) -> None:
        for kernel, idx, parent in self._attached:
            try:
                self._del_filter(kernel, idx, parent)
            except KernelError as e:
                log.warning("%s", e)
        self._attached.clear()

    @staticmethod
    def remove_stale_filters(kernel: Kernel) -> int:
        """Remove tunnel filters (our priority and handle) from every interface."""
        n = 0
        for link in kernel.links():
            for parent in (INGRESS, EGRESS):
                try:
                    if BpfTunnelProgram._del_filter(kernel, link["index"], parent):
                        n += 1
                except KernelError:
                    pass
        return n

    def close(self) -> None:
        self.detach_all()
        try:
            self.bpf.cleanup()
        except Exception:  # pragma: no cover
            pass

    # ------------------------------------------------------------------ maps

    def _set(self, table, addr, local, remote) -> None:
        leaf = table.Leaf()
        leaf.local = _key(local)
        leaf.remote = _key(remote)
        leaf.flags = 0
        try:
            table[table.Key(_key(addr))] = leaf
        except Exception as e:
            raise KernelError(f"bpf map {table.name if hasattr(table, 'name') else ''} "
                              f"update {addr}", str(e)) from None

    @staticmethod
    def _del(table, addr) -> bool:
        try:
            del table[table.Key(_key(addr))]
            return True
        except KeyError:
            return False

    def set_dst(self, addr, *, local, remote) -> None:
        """Packets to ``addr`` go in the tunnel local -> remote (a home agent's binding)."""
        self._set(self.tun_dst, addr, local, remote)

    def del_dst(self, addr) -> bool:
        return self._del(self.tun_dst, addr)

    def get_dst(self, addr) -> tuple[IPv4Address, IPv4Address] | None:
        """(local, remote) of the tun_dst entry for ``addr``, or None."""
        return self._get(self.tun_dst, addr)

    def get_src(self, addr) -> tuple[IPv4Address, IPv4Address] | None:
        return self._get(self.tun_src, addr)

    @staticmethod
    def _get(table, addr):
        try:
            v = table[table.Key(_key(addr))]
        except KeyError:
            return None
        return _addr(v.local), _addr(v.remote)

    def set_src(self, addr, *, local, remote) -> None:
        """Packets from ``addr`` go in the tunnel local -> remote (reverse tunnelling)."""
        self._set(self.tun_src, addr, local, remote)

    def del_src(self, addr) -> bool:
        return self._del(self.tun_src, addr)

    def entries(self) -> dict[str, dict[IPv4Address, tuple[IPv4Address, IPv4Address]]]:
        out = {}
        for name, table in (("dst", self.tun_dst), ("src", self.tun_src)):
            out[name] = {_addr(k.value): (_addr(v.local), _addr(v.remote)) for k, v in table.items()}
        return out

    def counters(self) -> dict[str, int]:
        t = self.counters_map
        return {name: int(sum(t[t.Key(i)])) for i, name in enumerate(COUNTERS)}

    def memory(self) -> int:
        """Bytes the kernel accounts to the two binding maps (fdinfo memlock)."""
        total = 0
        for table in (self.tun_dst, self.tun_src):
            try:
                with open(f"/proc/self/fdinfo/{table.map_fd}") as f:
                    for line in f:
                        if line.startswith("memlock:"):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total
