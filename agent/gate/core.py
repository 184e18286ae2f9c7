"""``Gate``: the trust-detection gate the mobile node daemon drives.

    gate = Gate("mn")                       # adopts pinned/installed state if any
    gate.set_allowed(home_agents=[("10.20.0.1", 434)], gateways=["192.0.2.1"])
    gate.attach("wlan0")                    # closed unless it was already attached
    ... detect (DHCP, agent advertisement, RRQ via open_detection_socket) ...
    gate.open("wlan0")                      # trusted, or the VPN is up
    gate.counters("wlan0")                  # {"egress": {"pass": {...}, "drop": {...}}, "ingress": ...}
    gate.release()                          # exit: the kernel keeps the gate as it is

Two backends behind this one interface: BPF (bcc-compiled TC egress + XDP
ingress programs, pinned) and netfilter (iptables + ipset), chosen by
``backend="auto"``: an instance already installed is adopted with the backend
it was installed with; otherwise BPF when it can be compiled and loaded, else
netfilter. There is never "no gate": if neither works, the constructor
raises and the caller must treat every link as untrusted.

All methods are blocking and short (netlink, bpf(2), at worst an
iptables-restore). Called from a thread that runs an asyncio loop, they do
their work on a private worker thread (pyroute2's synchronous API cannot run
inside a running loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import re
import socket

from .allowlist import IKE_PORTS, AllowEntry, AllowList, build_entries
from .defs import GateAbiError, GateError, GateState
from .nsutil import netns as _netns
from .steer import DETECT_MASK

log = logging.getLogger("mipmobike.gate")

DEFAULT_BPFFS = "/run/mipmobike/bpf"
_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_-]{1,20}$")


def _op(fn):
    """Run a Gate method in the gate's namespace, off any running asyncio loop."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        return self._call(fn, self, *args, **kwargs)
    return wrapper


class Gate:
    """The per-host trust gate of one agent instance.

    instance   name (1-20 of [A-Za-z0-9_-]); names the ipset (``mipmobike-<instance>``),
               the pin directory, the TC filters and the netfilter chains
    backend    "auto" | "bpf" | "netfilter"
    rrq_mark   fwmark the closed gate requires on outgoing registration
               requests (0: do not require one; None: keep an installed gate's,
               DETECT_MARK for a new one); the detection socket sets DETECT_MARK
    netns      work in this named network namespace (default: the current one)
    cache_dir  where the compiled BPF may be cached across restarts (None: per process)
    ingress    "xdp" (default), "tc", or "auto" (per link: native XDP on physical NICs whose driver
               has it, TC on virtual devices and where XDP would run in generic mode)
    create     False: only adopt an installed gate (``mipmobike gate`` uses this)
    """

    def __init__(self, instance: str = "mn", *, backend: str = "auto", bpffs: str = DEFAULT_BPFFS,
                 rrq_mark: int | None = None, rrq_mask: int = DETECT_MASK, netns: str | None = None,
                 cache_dir: str | None = None, ingress: str = "xdp", create: bool = True) -> None:
        if not _INSTANCE_RE.match(instance or ""):
            raise GateError(f"gate instance name {instance!r}: want 1-20 letters, digits, '-' or '_'")
        if backend not in ("auto", "bpf", "netfilter"):
            raise GateError(f"gate backend {backend!r}: want auto, bpf or netfilter")
        if ingress not in ("xdp", "tc", "auto"):
            raise GateError(f"gate ingress hook {ingress!r}: want xdp, tc or auto")
        self.instance = instance
        self.netns = netns
        self.ipset_name = f"mipmobike-{instance}"
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._opts = dict(bpffs=bpffs, rrq_mark=rrq_mark, rrq_mask=rrq_mask, cache_dir=cache_dir,
                          ingress=ingress)
        self.backend = self._choose(backend, create)
        self.adopted = self.backend.adopted

    def _call(self, fn, *args, **kwargs):
        def work():
            with _netns(self.netns):
                return fn(*args, **kwargs)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return work()
        # pyroute2's synchronous sockets cannot run inside a running loop
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gate")
        return self._pool.submit(work).result()

    # -- backend choice ------------------------------------------------------
    def _choose(self, want: str, create: bool):
        return self._call(self._choose_here, want, create)

    def _choose_here(self, want: str, create: bool):
        from .bpf_backend import BpfBackend
        from .nf_backend import NetfilterBackend
        o = self._opts
        allow = AllowList(self.ipset_name)

        def bpf(create_: bool):
            return BpfBackend(self.instance, bpffs=o["bpffs"], rrq_mark=o["rrq_mark"],
                              rrq_mask=o["rrq_mask"], cache_dir=o["cache_dir"], create=create_,
                              ingress=o["ingress"])

        def nf():
            if create:
                allow.ensure()
            elif not allow.exists():
                raise GateError(f"no gate instance {self.instance!r} here (no ipset {self.ipset_name})")
            return NetfilterBackend(self.instance, self.ipset_name, rrq_mark=o["rrq_mark"],
                                    rrq_mask=o["rrq_mask"])

        if want == "netfilter":
            return nf()
        if want == "auto":
            # an installed gate is adopted with the backend that installed it
            try:
                b = bpf(False)
                if create:
                    allow.ensure()
                return b
            except GateAbiError as e:
                if not create:
                    raise
                # bpf(create) below replaces the other version's gate (links gated throughout, closed),
                # unless a netfilter gate already stands on it (an earlier replacement failed): adopted
                log.warning("gate: %s", e)
            except GateError:
                pass
            except OSError:
                pass
            if allow.exists():
                n = nf()
                if n.adopted:
                    return n
            if not create:
                raise GateError(f"no gate instance {self.instance!r} is installed here")
        try:
            b = bpf(create)
        except GateAbiError as e:
            if want == "bpf" or not create:
                raise
            # this agent cannot build its BPF gate: the netfilter gate closes the old gate's links first,
            # then the old programs come off them (left on, a closed one would block what netfilter opens)
            from .bpf_backend import retire_foreign
            log.error("gate: %s; gating with netfilter instead", e)
            n = nf()
            done = []
            for idx, name, _x in e.links:
                try:
                    n.attach(name, idx, GateState.CLOSED)
                    done.append((idx, name))
                except GateError as err:
                    log.error("gate: %s: netfilter cannot gate it (%s); the older gate stays on it", name, err)
            retire_foreign(self.instance, o["bpffs"], done, all_links=len(done) == len(e.links))
            return n
        except Exception as e:
            if want == "bpf":
                raise GateError(f"BPF gate unavailable: {e}") from e
            log.warning("gate: BPF backend unavailable (%s); using the netfilter gate", e)
            return nf()
        if create:
            allow.ensure()
        return b

    @property
    def backend_name(self) -> str:
        return self.backend.name

    # -- interfaces ----------------------------------------------------------
    # libc's if_nametoindex/if_nameindex (an ioctl and one small netlink dump in the
    # calling thread's namespace) instead of a pyroute2 socket per call: the gate sits
    # on every handover's path and in every status request
    @staticmethod
    def _ifindex(ifname: str) -> int:
        try:
            return socket.if_nametoindex(ifname)
        except (OSError, ValueError):           # ValueError: a NUL in the name
            raise GateError(f"no interface {ifname!r}") from None

    @staticmethod
    def _ifnames() -> dict[int, str]:
        return dict(socket.if_nameindex())

    @_op
    def attach(self, ifname: str, state: GateState | str | None = None) -> GateState:
        """Gate ``ifname``. A new interface starts closed unless ``state`` says
        otherwise; one already gated (adopted) keeps its state unless given."""
        idx = self._ifindex(ifname)
        cur = self.backend.states().get(idx)
        st = GateState(state) if state is not None else (cur or GateState.CLOSED)
        self.backend.attach(ifname, idx, st)
        log.info("gate: %s attached (%s backend), %s", ifname, self.backend.name, st.value)
        return st

    @_op
    def set_state(self, ifname: str, state: GateState | str) -> None:
        """Put ``ifname`` in ``state``, attaching the gate to it first if needed."""
        st = GateState(state)
        idx = self._ifindex(ifname)
        if idx not in self.backend.states():
            self.backend.attach(ifname, idx, st)
            log.info("gate: %s attached (%s backend), %s", ifname, self.backend.name, st.value)
            return
        self.backend.set_state(ifname, idx, st)
        log.info("gate: %s %s", ifname, st.value)

    def close(self, ifname: str) -> None:
        """Only detection traffic passes ``ifname`` from now on (attaches if needed)."""
        self.set_state(ifname, GateState.CLOSED)

    def open(self, ifname: str) -> None:
        """Everything passes ``ifname`` (counted)."""
        self.set_state(ifname, GateState.OPEN)

    def off(self, ifname: str) -> None:
        """The gate stays attached to ``ifname`` but neither filters nor counts."""
        self.set_state(ifname, GateState.OFF)

    @_op
    def state(self, ifname: str) -> GateState | None:
        """The state of ``ifname``, None when the gate is not attached to it."""
        try:
            idx = self._ifindex(ifname)
        except GateError:
            return None
        return self.backend.states().get(idx)

    @_op
    def interfaces(self) -> dict[str, GateState]:
        names = self._ifnames()
        out = {}
        for idx, st in self.backend.states().items():
            if idx in names:
                out[names[idx]] = st
            else:
                self.backend.forget(idx)   # the interface went away
        return out

    @_op
    def counters(self, ifname: str) -> dict:
        """{"egress"|"ingress": {"pass"|"drop": {reason: packets}}} since attach."""
        return self.backend.counters(ifname, self._ifindex(ifname))

    @_op
    def detach(self, ifname: str | None = None) -> None:
        """Remove the gate from ``ifname`` (None: every interface). The
        interface is then ungated: call this only when leaving it alone is safe."""
        if ifname is not None:
            self.backend.detach(ifname, self._ifindex(ifname))
            return
        names = self._ifnames()
        for idx in list(self.backend.states()):
            if idx in names:
                self.backend.detach(names[idx], idx)
            else:
                self.backend.forget(idx)

    # -- allow-list ------------------------------------------------------------
    @_op
    def set_allowed(self, home_agents=(), gateways=(), ike_ports=IKE_PORTS) -> list[AllowEntry]:
        """Home agents [(ip, port)] and VPN gateways [ip] the closed gate admits
        (replaces the previous list; written to the ipset, mirrored to BPF)."""
        entries = build_entries(home_agents, gateways, ike_ports)
        AllowList(self.ipset_name).replace(entries)
        self.backend.sync_allowed(entries)
        return entries

    @_op
    def allowed(self) -> list[AllowEntry]:
        return AllowList(self.ipset_name).entries()

    @_op
    def sync(self) -> list[AllowEntry]:
        """Mirror the ipset again (after an operator edited it with ``ipset``)."""
        entries = AllowList(self.ipset_name).entries()
        self.backend.sync_allowed(entries)
        return entries

    # -- reporting ---------------------------------------------------------------
    def status(self) -> dict:
        """Everything ``mipmobike status`` / ``mipmobike gate status`` show."""
        ifs = self.interfaces()
        return {
            "instance": self.instance,
            "backend": self.backend.name,
            "ipset": self.ipset_name,
            "allowed": [str(e) + (f" ({e.comment})" if e.comment else "") for e in self.allowed()],
            "interfaces": {n: {"state": st.value, "counters": self.counters(n)} for n, st in ifs.items()},
        }

    # -- lifetime ---------------------------------------------------------------
    def release(self) -> None:
        """Let go of our handles; the kernel keeps gating as configured."""
        self.backend.release()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    @_op
    def destroy(self) -> None:
        """Detach from every interface, delete the ipset and the pinned objects."""
        names = self._ifnames()
        for idx in list(self.backend.states()):
            if idx in names:
                self.backend.detach(names[idx], idx)
            else:
                self.backend.forget(idx)
        self.backend.destroy()
        AllowList(self.ipset_name).destroy()

    def __enter__(self) -> "Gate":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
