"""The gate in BPF: TC clsact egress + XDP ingress, state in pinned maps.

Objects live on a bpffs the agent mounts itself (default /run/mipmobike/bpf;
``ip netns exec`` remounts /sys, so /sys/fs/bpf is no place for them), one
directory per agent instance:

    <root>/<instance>/prog_egress  prog_ingress  prog_ingress_tc
                     /map_ifstate  map_allow  map_config  map_counters

A TC filter and a link-less XDP program stay attached to their device after
the process that attached them is gone (the filter and the device hold the
program, the program holds its maps), so a closed link stays closed when the
agent dies. A restarted agent opens the pins (no compile) and reads the
per-interface state from ``map_ifstate`` instead of opening anything. Were
the pins lost (the bpffs mounted in a private mount namespace that ended),
``_recover()`` finds the maps again through a program attached to one of
the instance's interfaces (its TC filter carries the instance's name).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import struct
import subprocess

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import bpfsys, loader
from .allowlist import IKE_PORTS, AllowEntry
from .steer import DETECT_MARK
from .defs import (ABI, DIR_EGRESS, DIR_INGRESS, MAX_SLOTS, NR_REASONS, PROTO_HOST, REASON_NAMES,
                   STATE_BY_VALUE, STATE_VALUE, GateAbiError, GateError, GateState)

log = logging.getLogger("mipmobike.gate")

DEFAULT_BPFFS = "/run/mipmobike/bpf"
TC_EGRESS = "ffff:fff3"
TC_INGRESS = "ffff:fff2"
TC_PRIO = 1          # first on the hook: nothing may accept a packet before the gate saw it
TC_HANDLE = 1
XDP_FLAGS_UPDATE_IF_NOEXIST = 1

PINS_PROG = {"gate_egress": "prog_egress", "gate_ingress": "prog_ingress",
             "gate_ingress_tc": "prog_ingress_tc"}
PINS_MAP = {m: f"map_{m}" for m in loader.MAPS}

_IFSTATE = struct.Struct("=II")
_ALLOW_KEY = struct.Struct("=4sHBB")       # addr (network order), port (network order), proto, pad
_CONFIG = struct.Struct("=IIII")
_COUNT = struct.Struct("=QQ")


def is_bpffs(path: str) -> bool:
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "bpf" and parts[1] == path:
                    return True
    except OSError:
        pass
    return False


def ensure_bpffs(root: str) -> None:
    """Mount a bpffs on ``root`` unless one is there already."""
    if is_bpffs(root):
        return
    os.makedirs(root, mode=0o700, exist_ok=True)
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", os.fsencode(root), b"bpf", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise GateError(f"cannot mount a bpffs on {root}: {os.strerror(err)}")


def unmount_bpffs(root: str) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if is_bpffs(root):
        libc.umount2(os.fsencode(root), 2)   # MNT_DETACH


XDP_ATTACHED_SKB = 2          # IFLA_XDP_ATTACHED: generic (skb) mode, the driver has no native XDP


def choose_ingress(kind: str | None, xdp_attached: int | None) -> str:
    """The ingress hook ``gate.ingress = "auto"`` uses on a link: TC on virtual devices (veth,
    bridges, VLANs, tunnels: IFLA_INFO_KIND set), where XDP either runs in generic mode or (veth)
    copies every packet into its own receive path (~20 % fewer packets per second even with an
    empty program, measured by scripts/bench_gate.py); TC where XDP ended up in generic mode
    (most Wi-Fi drivers); native XDP otherwise (drops before an skb exists)."""
    if kind:
        return "tc"
    if xdp_attached == XDP_ATTACHED_SKB:
        return "tc"
    return "xdp"


def _link_kind(ipr, ifindex) -> str | None:
    links = ipr.get_links(ifindex)
    info = links[0].get_attr("IFLA_LINKINFO") if links else None
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def retire_foreign(instance: str, bpffs: str, links: list[tuple[int, str]], all_links: bool) -> None:
    """Take another version's gate off ``links`` (the caller has gated them otherwise first): its TC
    filters by name, its XDP program where it shares maps with the instance's egress program (not
    another instance's). With ``all_links`` its pins go too. Needs nothing of that version's layout."""
    tc_name = f"mipmobike-gate:{instance}"
    with IPRoute() as ipr:
        for idx, name in links:
            try:
                eg = _filter_prog_ids(name, "egress", tc_name)
                xid = _xdp_id(ipr, idx)
                if xid and eg and _map_ids(xid) & _map_ids(eg[0]):
                    ipr.link("set", index=idx, xdp_fd=-1)
                for parent in (TC_INGRESS, TC_EGRESS):           # egress last: it keeps the link gated
                    _del_named_filters(ipr, idx, parent, tc_name)
            except (NetlinkError, OSError) as e:
                log.error("gate: %s: the older gate stays attached: %s", name, e)
                all_links = False
    if all_links:
        shutil.rmtree(os.path.join(bpffs, instance), ignore_errors=True)


def _filter_prog_ids(ifname: str, hook: str, tc_name: str) -> list[int]:
    p = subprocess.run(["tc", "-j", "filter", "show", "dev", ifname, hook], capture_output=True, text=True,
                       timeout=10)
    try:
        return [int(f["options"]["prog"]["id"]) for f in json.loads(p.stdout or "[]")
                if (f.get("options") or {}).get("bpf_name") == tc_name and "prog" in f["options"]]
    except (ValueError, KeyError, TypeError):
        return []


def _xdp_id(ipr, ifindex: int) -> int:
    links = ipr.get_links(ifindex)
    xdp = links[0].get_attr("IFLA_XDP") if links else None
    return (xdp.get_attr("IFLA_XDP_PROG_ID") or 0) if xdp is not None else 0


def _prog_info_by_id(prog_id: int) -> dict | None:
    """bpfsys.prog_info of a loaded program by id (None: gone meanwhile)."""
    try:
        fd = bpfsys.prog_fd_by_id(prog_id)
    except OSError:
        return None
    try:
        return bpfsys.prog_info(fd)
    finally:
        os.close(fd)


def _map_ids(prog_id: int) -> set[int]:
    info = _prog_info_by_id(prog_id)
    return set(info["map_ids"]) if info else set()


def _del_named_filters(ipr, ifindex: int, parent: int, tc_name: str) -> None:
    """Delete the bpf filters named ``tc_name`` on one TC hook (NetlinkError to the caller)."""
    for f in ipr.get_filters(ifindex, parent=parent):
        opts = f.get_attr("TCA_OPTIONS")
        if opts is not None and opts.get_attr("TCA_BPF_NAME") == tc_name:
            ipr.tc("del-filter", "bpf", ifindex, f["handle"], parent=parent, prio=f["info"] >> 16)


def _abi_of(config: bytes | None) -> int | None:
    """The ABI word of a gate config map value (the first word in every version), None if unreadable."""
    return _CONFIG.unpack(config[:_CONFIG.size])[0] if config is not None and len(config) >= _CONFIG.size else None


class _ForeignAbi(Exception):
    """_recover found the attached programs' maps, written by an agent of another ABI."""

    def __init__(self, abi: int) -> None:
        super().__init__(abi)
        self.abi = abi


class BpfBackend:
    name = "bpf"

    def __init__(self, instance: str, *, bpffs: str = DEFAULT_BPFFS, rrq_mark: int | None = None,
                 rrq_mask: int = 0xFFFFFFFF, cache_dir: str | None = None, create: bool = True,
                 ingress: str = "xdp") -> None:
        self.instance = instance
        self.root = bpffs
        self.dir = os.path.join(bpffs, instance)
        self.ingress_hook = ingress
        self.tc_name = f"mipmobike-gate:{instance}"
        self.maps: dict[str, bpfsys.Map] = {}
        self.prog_fds: dict[str, int] = {}
        self.adopted = False
        try:
            self._setup(bpffs, rrq_mark, rrq_mask, cache_dir, create)
        except BaseException:
            self.release()          # no fds left behind by a failed start
            raise

    def _setup(self, bpffs: str, rrq_mark: int | None, rrq_mask: int, cache_dir: str | None,
               create: bool) -> None:
        if create:
            ensure_bpffs(bpffs)
        foreign = None          # the ABI of a gate another agent version left, to be replaced
        if is_bpffs(bpffs) and self._pins_complete():
            self._open_pins()
            self.adopted = True
            abi = _abi_of(self.maps["config"].lookup(struct.pack("=I", 0)))
            if abi != ABI:
                self.release()
                foreign = abi
        else:
            try:
                self.adopted = self._recover(cache_dir)
            except _ForeignAbi as e:
                foreign = e.abi
            if not self.adopted and foreign is None:
                if not create:
                    raise GateError(f"no gate objects pinned in {self.dir}")
                self._create(cache_dir)
        relink: list[tuple[int, str, int]] = []
        if foreign is not None:
            if not create:
                raise GateAbiError(f"the gate in {self.dir} has ABI {foreign}, this agent speaks {ABI}; "
                                   f"the agent replaces it when it starts (or `mipmobike gate close`)")
            relink = self._replace(foreign, cache_dir)
            self.adopted = True
        cfg = self.maps["config"].lookup(struct.pack("=I", 0))
        abi, mark, mask, _ = _CONFIG.unpack(cfg)
        fresh = not self.adopted or foreign is not None
        # rrq_mark None: keep an adopted gate's mark (an operator's `mipmobike
        # gate status` must not change what the running agent configured)
        if rrq_mark is None and fresh:
            rrq_mark = DETECT_MARK
        if rrq_mark is not None and (fresh or (mark, mask) != (rrq_mark, rrq_mask if rrq_mark else 0)):
            self.maps["config"].update(struct.pack("=I", 0),
                                       _CONFIG.pack(ABI, rrq_mark, rrq_mask if rrq_mark else 0, 0))
        for idx, name, _xdp in relink:      # configured first: our programs judge from their first packet
            try:
                self.attach(name, idx, GateState.CLOSED)
            except Exception as e:          # gone meanwhile, a netlink error: not reported as gated, so
                # the next close() attaches again; our programs, where attached, drop all without a state
                self._unstate(idx)
                log.error("gate: %s: the ABI %d programs could not all be replaced: %s", name, foreign, e)

    def _unstate(self, ifindex: int) -> None:
        cur = self._states().get(ifindex)
        if cur is not None:
            self.maps["ifstate"].delete(struct.pack("=I", ifindex))
            self._zero_slot(cur[1])

    # -- objects ---------------------------------------------------------
    def _pins_complete(self) -> bool:
        names = list(PINS_PROG.values()) + list(PINS_MAP.values())
        return all(os.path.exists(os.path.join(self.dir, n)) for n in names)

    def _open_pins(self) -> None:
        try:
            for m, pin in PINS_MAP.items():
                self.maps[m] = bpfsys.Map.pinned(os.path.join(self.dir, pin))
            for p, pin in PINS_PROG.items():
                self.prog_fds[p] = bpfsys.obj_get(os.path.join(self.dir, pin))
        except OSError as e:
            self.release()
            raise GateError(f"cannot open pinned gate objects in {self.dir}: {e}") from None

    def _create(self, cache_dir: str | None) -> None:
        if os.path.isdir(self.dir):
            # a partial set (crash while pinning): start over; attach() will
            # replace whatever programs are still attached
            shutil.rmtree(self.dir, ignore_errors=True)
        self._pin(*loader.instantiate(cache_dir))

    def _replace(self, old_abi: int, cache_dir: str | None) -> list[tuple[int, str, int]]:
        """Replace a gate another ABI left (an agent upgrade after a crash or a reboot-less update).
        Ours are made first: if that fails the old gate is left exactly as it is (GateAbiError).
        Then the old pins go and ours replace the old programs link by link (the caller attaches,
        once the config is written: TC filters in place, XDP atomically), every link closed: the
        old maps' layout is not ours to read, and detection reopens what is trusted."""
        links = self._gated_links()
        try:
            prog_fds, map_fds = loader.instantiate(cache_dir)
        except Exception as e:
            raise GateAbiError(f"the gate in {self.dir} has ABI {old_abi}, this agent speaks {ABI}, and this "
                               f"agent's gate cannot be built to replace it: {e}", links=links) from e
        log.warning("gate: replacing the ABI %d gate in %s with ABI %d; %s closed until detection",
                    old_abi, self.dir, ABI, ", ".join(n for _, n, _ in links) or "no link")
        ensure_bpffs(self.root)
        shutil.rmtree(self.dir, ignore_errors=True)
        self._pin(prog_fds, map_fds)
        return links

    def _gated_links(self) -> list[tuple[int, str, int]]:
        """(ifindex, name, XDP prog id) of the links carrying this instance's egress filter."""
        out = []
        with IPRoute() as ipr:
            for link in ipr.get_links():
                idx = link["index"]
                try:
                    flts = ipr.get_filters(idx, parent=TC_EGRESS)
                except NetlinkError:
                    continue
                if any((f.get_attr("TCA_OPTIONS") is not None
                        and f.get_attr("TCA_OPTIONS").get_attr("TCA_BPF_NAME") == self.tc_name) for f in flts):
                    out.append((idx, link.get_attr("IFLA_IFNAME"), _xdp_id(ipr, idx)))
        return out

    def _attached_prog_id(self, ifname: str) -> int:
        """Id of the gate's egress program on ``ifname`` (the one that uses every map).
        pyroute2 does not decode TCA_BPF_ID; tc(8) does."""
        ids = _filter_prog_ids(ifname, "egress", self.tc_name)
        return ids[0] if ids else 0

    def _recover(self, cache_dir: str | None) -> bool:
        """Pins lost but programs still attached (say the bpffs was mounted in a
        mount namespace that is gone): find the maps through an attached program,
        load fresh programs against them and pin everything again."""
        links = self._gated_links()
        if not links:
            return False
        prog_id = 0
        for _idx, name, _xdp_id in links:
            prog_id = self._attached_prog_id(name)
            if prog_id:
                break
        if not prog_id:
            log.warning("gate: %s carries gate filters but their maps cannot be found",
                        ", ".join(n for _, n, _ in links))
            return False
        maps: dict[str, int] = {}
        pfd = bpfsys.prog_fd_by_id(prog_id)
        try:
            for mid in bpfsys.prog_info(pfd)["map_ids"]:
                fd = bpfsys.map_fd_by_id(mid)
                name = bpfsys.map_info(fd)["name"]
                if name in PINS_MAP and name not in maps:
                    maps[name] = fd
                else:
                    os.close(fd)
        finally:
            os.close(pfd)
        if set(maps) != set(PINS_MAP):
            for fd in maps.values():
                os.close(fd)
            return False
        abi = _abi_of(bpfsys.Map(maps["config"], owned=False).lookup(struct.pack("=I", 0)))
        if abi != ABI:          # another version's maps: not ours to load programs against
            for fd in maps.values():
                os.close(fd)
            raise _ForeignAbi(abi if abi is not None else -1)
        try:
            ensure_bpffs(self.root)
            shutil.rmtree(self.dir, ignore_errors=True)
            prog_fds, map_fds = loader.instantiate(cache_dir, maps)
        except Exception:
            for fd in maps.values():
                os.close(fd)
            raise
        self._pin(prog_fds, map_fds)
        log.warning("gate: pins of %s were lost; recovered the state of %s from the attached programs",
                    self.instance, ", ".join(n for _, n, _ in links))
        return True

    def _pin(self, prog_fds: dict[str, int], map_fds: dict[str, int]) -> None:
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            for m, fd in map_fds.items():
                bpfsys.obj_pin(fd, os.path.join(self.dir, PINS_MAP[m]))
            for p, fd in prog_fds.items():
                bpfsys.obj_pin(fd, os.path.join(self.dir, PINS_PROG[p]))
        except OSError as e:
            for fd in list(map_fds.values()) + list(prog_fds.values()):
                os.close(fd)
            shutil.rmtree(self.dir, ignore_errors=True)
            raise GateError(f"cannot pin gate objects in {self.dir}: {e}") from None
        self.maps = {m: bpfsys.Map(fd) for m, fd in map_fds.items()}
        self.prog_fds = prog_fds

    def release(self) -> None:
        """Close our fds; the kernel objects (and the gate) stay."""
        for m in self.maps.values():
            m.close()
        for fd in self.prog_fds.values():
            os.close(fd)
        self.maps, self.prog_fds = {}, {}

    # -- per-interface state ---------------------------------------------
    def _states(self) -> dict[int, tuple[int, int]]:
        out = {}
        for k, v in self.maps["ifstate"].items():
            out[struct.unpack("=I", k)[0]] = _IFSTATE.unpack(v)
        return out

    def states(self) -> dict[int, GateState]:
        return {i: STATE_BY_VALUE.get(s, GateState.CLOSED) for i, (s, _) in self._states().items()}

    def _set(self, ifindex: int, state: GateState) -> None:
        cur = self._states()
        if ifindex in cur:
            slot = cur[ifindex][1]
        else:
            used = {s for _, s in cur.values()}
            free = [s for s in range(1, MAX_SLOTS) if s not in used]
            if not free:
                raise GateError(f"the gate handles at most {MAX_SLOTS - 1} interfaces")
            slot = free[0]
            self._zero_slot(slot)
        self.maps["ifstate"].update(struct.pack("=I", ifindex), _IFSTATE.pack(STATE_VALUE[state], slot))

    def set_state(self, ifname: str, ifindex: int, state: GateState) -> None:
        if ifindex not in self._states():
            raise GateError(f"gate is not attached to {ifname}")
        self._set(ifindex, state)

    def _zero_slot(self, slot: int) -> None:
        c = self.maps["counters"]
        zero = bytes(c.buf_size)
        for d in (DIR_EGRESS, DIR_INGRESS):
            for r in range(NR_REASONS):
                c.update(struct.pack("=I", (slot * 2 + d) * NR_REASONS + r), zero)

    def counters(self, ifname: str, ifindex: int) -> dict:
        st = self._states().get(ifindex)
        if st is None:
            raise GateError(f"gate is not attached to {ifname}")
        return self._slot_counters(st[1])

    def unknown_counters(self) -> dict:
        """Packets on interfaces carrying a gate program but no state (dropped)."""
        return self._slot_counters(0)

    def _slot_counters(self, slot: int) -> dict:
        c = self.maps["counters"]
        out = {}
        for d, dname in ((DIR_EGRESS, "egress"), (DIR_INGRESS, "ingress")):
            passed, dropped = {}, {}
            for r in range(NR_REASONS):
                raw = c.lookup(struct.pack("=I", (slot * 2 + d) * NR_REASONS + r))
                pk = by = 0
                for v in c.percpu_values(raw or bytes(c.buf_size)):
                    p_, b_ = _COUNT.unpack(v)
                    pk += p_
                    by += b_
                kind, reason = REASON_NAMES[r]
                (passed if kind == "pass" else dropped)[reason] = pk
            out[dname] = {"pass": passed, "drop": dropped}
        return out

    # -- attach / detach ---------------------------------------------------
    def attach(self, ifname: str, ifindex: int, state: GateState) -> None:
        # state first: the programs find the interface in the wanted state
        # from their first packet on (and fail closed without it)
        self._set(ifindex, state)
        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise GateError(f"{ifname}: cannot add clsact qdisc: {e}") from None
            self._tc_attach(ipr, ifname, ifindex, TC_EGRESS, "gate_egress")
            hook = self.ingress_hook
            if hook == "auto":
                hook = choose_ingress(_link_kind(ipr, ifindex), None)
            if hook == "xdp":
                try:
                    xdp_ok, why = self._xdp_attach(ipr, ifname, ifindex), "taken by another program"
                except GateError as e:          # say EBUSY from the driver
                    xdp_ok, why = False, str(e)
                if not xdp_ok:
                    log.warning("gate: %s: XDP hook %s; gating ingress with TC", ifname, why)
                    # TC ingress runs after XDP: whatever XDP program stays, ours judges ingress
                    self._tc_attach(ipr, ifname, ifindex, TC_INGRESS, "gate_ingress_tc")
                    try:
                        self._drop_our_xdp(ipr, ifindex)    # an older gate's, with maps not ours
                    except NetlinkError as e:
                        log.warning("gate: %s: an older gate XDP program stays before ours: %s", ifname, e)
                elif self.ingress_hook == "auto" and choose_ingress(None, self._xdp_mode(ipr, ifindex)) == "tc":
                    # the driver runs XDP only in generic (skb) mode: TC is the cheaper hook there
                    self._tc_attach(ipr, ifname, ifindex, TC_INGRESS, "gate_ingress_tc")
                    self._drop_our_xdp(ipr, ifindex)
                else:
                    self._drop_tc_ingress(ipr, ifindex)
            else:
                self._tc_attach(ipr, ifname, ifindex, TC_INGRESS, "gate_ingress_tc")
                self._drop_our_xdp(ipr, ifindex)

    def _xdp_mode(self, ipr, ifindex) -> int | None:
        links = ipr.get_links(ifindex)
        xdp = links[0].get_attr("IFLA_XDP") if links else None
        return xdp.get_attr("IFLA_XDP_ATTACHED") if xdp is not None else None

    # an adopted gate may sit on the other ingress hook (an earlier run with another
    # gate.ingress): the new hook is attached first, then the old one goes, so the
    # link is never ungated in between
    def _drop_tc_ingress(self, ipr, ifindex) -> None:
        try:
            _del_named_filters(ipr, ifindex, TC_INGRESS, self.tc_name)
        except NetlinkError as e:
            if e.code not in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
                raise

    def _drop_our_xdp(self, ipr, ifindex) -> None:
        xid = _xdp_id(ipr, ifindex)
        if xid and self._is_our_prog(xid):
            ipr.link("set", index=ifindex, xdp_fd=-1)

    def _tc_attach(self, ipr, ifname, ifindex, parent, prog) -> None:
        try:
            ipr.tc("replace-filter", "bpf", ifindex, TC_HANDLE, fd=self.prog_fds[prog],
                   name=self.tc_name, parent=parent, classid=1, direct_action=True, prio=TC_PRIO)
        except NetlinkError as e:
            raise GateError(f"{ifname}: cannot attach {prog} (tc {parent}): {e}") from None

    def _xdp_attach(self, ipr, ifname, ifindex) -> bool:
        ours = bpfsys.prog_info(self.prog_fds["gate_ingress"])["id"]
        cur = _xdp_id(ipr, ifindex)
        if cur == ours:
            return True
        if cur and not self._is_our_prog(cur):
            return False
        try:
            # replaces an older gate program atomically (no unguarded moment)
            ipr.link("set", index=ifindex, xdp_fd=self.prog_fds["gate_ingress"])
        except NetlinkError as e:
            raise GateError(f"{ifname}: cannot attach XDP program: {e}") from None
        return True

    def _is_our_prog(self, prog_id: int) -> bool:
        """Is ``prog_id`` a gate ingress program (this one, or one whose pins were lost)?"""
        info = _prog_info_by_id(prog_id)
        return info is not None and info["name"] == "gate_ingress"

    def attached(self, ifindex: int) -> dict:
        """Which hooks carry a gate program on ``ifindex``."""
        out = {"egress": False, "ingress": None}
        with IPRoute() as ipr:
            for parent, key in ((TC_EGRESS, "egress"), (TC_INGRESS, "ingress_tc")):
                try:
                    flts = ipr.get_filters(ifindex, parent=parent)
                except NetlinkError:
                    flts = []
                for f in flts:
                    opts = f.get_attr("TCA_OPTIONS")
                    if opts is not None and opts.get_attr("TCA_BPF_NAME") == self.tc_name:
                        if key == "egress":
                            out["egress"] = True
                        else:
                            out["ingress"] = "tc"
            xid = _xdp_id(ipr, ifindex)
            if xid and xid == bpfsys.prog_info(self.prog_fds["gate_ingress"])["id"]:
                out["ingress"] = "xdp"
        return out

    def detach(self, ifname: str, ifindex: int) -> None:
        with IPRoute() as ipr:
            for parent in (TC_EGRESS, TC_INGRESS):
                try:
                    _del_named_filters(ipr, ifindex, parent, self.tc_name)
                except NetlinkError as e:
                    if e.code not in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
                        raise
            try:
                xid = _xdp_id(ipr, ifindex)
                if xid and self._is_our_prog(xid):
                    ipr.link("set", index=ifindex, xdp_fd=-1)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise
            try:
                remaining = [f for p in (TC_EGRESS, TC_INGRESS) for f in ipr.get_filters(ifindex, parent=p)
                             if f.get_attr("TCA_OPTIONS") is not None]
                if not remaining:
                    ipr.tc("del", "clsact", ifindex)
            except NetlinkError:
                pass
        self._unstate(ifindex)       # state last: until the programs are gone, the link stays gated

    def forget(self, ifindex: int) -> None:
        """Drop the state of an interface that no longer exists."""
        self.maps["ifstate"].delete(struct.pack("=I", ifindex))

    # -- allow-list mirror -----------------------------------------------
    def sync_allowed(self, entries: list[AllowEntry]) -> None:
        want = {}
        for e in entries:
            a = socket.inet_aton(e.addr)
            want[_ALLOW_KEY.pack(a, socket.htons(e.port), e.proto, 0)] = 1
            if e.proto in (socket.IPPROTO_UDP, 50):
                want[_ALLOW_KEY.pack(a, 0, PROTO_HOST, 0)] = 1
        m = self.maps["allow"]
        for k in want:
            m.update(k, struct.pack("=I", 1))
        for k in m.keys():
            if k not in want:
                m.delete(k)

    def allowed_keys(self) -> list[tuple[str, int, int]]:
        out = []
        for k in self.maps["allow"].keys():
            a, port, proto, _ = _ALLOW_KEY.unpack(k)
            if proto != PROTO_HOST:
                out.append((socket.inet_ntoa(a), proto, socket.ntohs(port)))
        return sorted(out)

    def destroy(self) -> None:
        """Remove the pins (call after detaching every interface)."""
        self.release()
        shutil.rmtree(self.dir, ignore_errors=True)


__all__ = ["BpfBackend", "DEFAULT_BPFFS", "ensure_bpffs", "unmount_bpffs", "is_bpffs", "IKE_PORTS"]
