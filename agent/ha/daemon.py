"""The i-HA daemon: the home agent engine wired to sockets, timers, the kernel and disk.

Start-up, in order: load the saved bindings; reconcile the kernel (remove
every tagged object an earlier instance left, and the proxy-ARP entries of
the configured home addresses); open the data plane; give the still-valid
saved bindings back to the engine (their kernel state is installed like any
new registration's); bind UDP 434; serve the control socket (readiness).

For each datagram: the engine decides; its binding events are applied to the
kernel first, then its replies are sent, so a node that reads an accepting
reply already has a working data path. State is written (atomically) shortly
after every change and at shutdown. SIGTERM removes every kernel object this
daemon made; the bindings stay in the state file for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from ipaddress import IPv4Address

from agent.control import ControlServer
from agent.kernel.netlink import Kernel
from agent.kernel.tunnels import make_backend
from agent.log import RateLimitedLog
from agent.mip.ha import BindingAdded, BindingRemoved, BindingUpdated, HomeAgent, TunnelPacket

from .config import HaSettings
from .dataplane import HaDataPlane
from .restore import all_bindings, identifications, restore
from .runtime import EngineTimer, UdpEndpoint
from .state import StateError, StateFile
from .udptunnel import UdpTunnelPlane

log = logging.getLogger("mipmobike.ha")

# engine counters that mean "a datagram was dropped or refused": logged once per source
DROP_COUNTERS = {
    "malformed": "malformed datagram",
    "mn_auth_failed": "mobile node failed authentication",
    "fa_auth_failed": "foreign agent failed authentication",
    "unknown_home_address": "request for an unknown home address",
    "identification_mismatch": "identification mismatch (replay or clock skew)",
    "unexpected_message": "unexpected message type",
    "tunnel_data_unknown_peer": "UDP tunnel data from an unknown peer",
}
SAVE_DELAY = 0.2


class HaDaemon:
    role = "ha"

    def __init__(self, settings: HaSettings, *, clock=time.time):
        self.s = settings
        self.clock = clock
        self.engine = HomeAgent(settings.engine)
        self.counters: Counter = Counter()
        self.replies_by_code: Counter = Counter()
        self.rl = RateLimitedLog(log)
        self.started_at = None
        self.kernel = None
        self.dp: HaDataPlane | None = None
        self.udp: UdpTunnelPlane | None = None
        self.endpoint: UdpEndpoint | None = None
        self.timer: EngineTimer | None = None
        self.control: ControlServer | None = None
        self.state = StateFile(settings.state_file)
        self._save_handle = None
        self._restored = 0
        self._state_loaded = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        s, dps = self.s, self.s.dataplane
        self.started_at = self.clock()
        try:
            saved, idents = self.state.load()
        except StateError as e:
            bad = f"{self.state.path}.bad"
            log.error("%s; starting without saved bindings (old file kept as %s)", e, bad)
            os.replace(self.state.path, bad)
            saved, idents = [], {}
        self.kernel = Kernel("ha", protocol=dps.route_protocol)
        backend = make_backend(dps.backend, self.kernel, prefix=dps.device_prefix, mtu=dps.mtu,
                               table_base=dps.table_base, rule_priority=dps.rule_priority,
                               decap_interfaces=dps.decap_interfaces, max_entries=dps.max_entries)
        udp_name = f"{dps.device_prefix}-udp"
        self.dp = HaDataPlane(self.kernel, backend, local=s.address, home_interface=s.home_interface,
                              garp_count=s.gratuitous_arp, udp_device=udp_name)
        rec = self.dp.reconcile([n.home_address for n in s.engine.nodes])
        if any(rec.values()):
            log.info("removed leftovers of an earlier run: %s", rec)
        self.dp.open()
        self.udp = UdpTunnelPlane(self.kernel, udp_name, self._to_udp_node)
        live = restore(self.engine, saved, idents, self.clock())
        self._restored = len(live)
        self._state_loaded = True  # from here on the engine holds the state worth saving
        if saved:
            log.info("restored %d of %d saved bindings", len(live), len(saved))
        self.timer = EngineTimer(self.engine, self._on_timer, self.clock)
        self._pump()
        self.endpoint = UdpEndpoint(s.listen, s.port, self._on_datagram)
        self.control = ControlServer(s.control_socket)
        self.control.register("status", self._status)
        self.control.register("bindings", lambda req: self._bindings_json())
        await self.control.start()
        log.info("home agent %s ready: UDP %d on %s, %s data plane, %d bindings",
                 s.address, s.port, ", ".join(map(str, s.listen)), backend.kind, self._nbindings())

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.close()
            self.control = None
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        if self.timer is not None:
            self.timer.cancel()
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None
        if self._state_loaded:  # never overwrite the saved bindings after a failed start
            self._save()
        if self.dp is not None:
            self.dp.close()
        if self.udp is not None:
            self.udp.close()
            self.udp = None
        if self.kernel is not None:
            self.kernel.close()
        log.info("home agent stopped; kernel state removed")

    # ------------------------------------------------------------------ input

    def _on_datagram(self, data: bytes, src: IPv4Address, sport: int, local: IPv4Address) -> None:
        if data[:1] == b"\x01":
            self.counters["requests"] += 1
        elif data[:1] == b"\x04":
            self.counters["tunnel_data_in"] += 1
        eng = self.engine.counters
        before = {k: eng[k] for k in DROP_COUNTERS}
        self.engine.receive_datagram(data, src, sport, local, self.clock())
        for k, what in DROP_COUNTERS.items():
            if eng[k] != before[k]:
                self.rl.once(k, str(src), "%s from %s:%d (counted, %s)", what, src, sport,
                             "answered" if k in ("mn_auth_failed", "fa_auth_failed",
                                                 "identification_mismatch") else "dropped")
        self._pump()

    def _on_timer(self) -> None:
        self.engine.handle_timer(self.clock())
        self._pump()

    def _to_udp_node(self, hoa: IPv4Address, packet: bytes) -> bool:
        ok = self.engine.send_tunnel_data(hoa, packet)
        if ok:
            self._flush()
        return ok

    # ------------------------------------------------------------------ output

    def _pump(self) -> None:
        changed = False
        while (ev := self.engine.next_event()) is not None:
            if isinstance(ev, BindingAdded):
                b = ev.binding
                self.dp.added(b)
                changed = True
                log.info("binding %s -> %s added (lifetime %d s%s%s%s)", b.home_address, b.care_of_address,
                         b.lifetime, ", via FA " + str(b.foreign_agent) if b.foreign_agent else "",
                         ", UDP tunnel via " + f"{b.source_address}:{b.source_port}" if b.udp_tunnel else "",
                         ", trusted" if b.trusted else "")
            elif isinstance(ev, BindingUpdated):
                self.dp.updated(ev.binding, ev.previous)
                changed = True
                if ev.binding.care_of_address != ev.previous.care_of_address:
                    log.info("binding %s moved %s -> %s", ev.binding.home_address,
                             ev.previous.care_of_address, ev.binding.care_of_address)
            elif isinstance(ev, BindingRemoved):
                b = ev.binding
                self.dp.removed(b, ev.reason)
                changed = True
                log.info("binding %s -> %s removed (%s)", b.home_address, b.care_of_address, ev.reason)
                if ev.reason == "deregistered":
                    asyncio.get_running_loop().call_later(0.5, self._announce_returned, b.home_address)
            elif isinstance(ev, TunnelPacket):
                if self.udp is not None:
                    self.udp.deliver(ev.home_address, ev.next_header, ev.payload)
        self._flush()
        if changed:
            self._schedule_save()
        if self.timer is not None:
            self.timer.rearm()

    def _announce_returned(self, hoa) -> None:
        if self.dp is None or self.control is None:  # stopping
            return
        try:
            self.dp.announce_returned(hoa)
        except Exception as e:  # best effort: a missing neighbour entry is normal
            log.debug("re-announcing %s: %s", hoa, e)

    def _flush(self) -> None:
        for d in self.engine.datagrams_to_send():
            if d.data[:1] == b"\x03" and len(d.data) > 1:
                self.replies_by_code[d.data[1]] += 1
            elif d.data[:1] == b"\x04":
                self.counters["tunnel_data_out"] += 1
            if self.endpoint is not None:
                self.endpoint.send(d)

    # ------------------------------------------------------------------ state

    def _schedule_save(self) -> None:
        if self._save_handle is None:
            self._save_handle = asyncio.get_running_loop().call_later(SAVE_DELAY, self._save)

    def _save(self) -> None:
        self._save_handle = None
        try:
            self.state.save(all_bindings(self.engine), identifications(self.engine), self.clock())
            self.counters["state_saves"] += 1
        except OSError as e:
            self.counters["state_save_errors"] += 1
            log.error("cannot write state file %s: %s", self.state.path, e)

    # ------------------------------------------------------------------ status

    def _nbindings(self) -> int:
        return sum(len(p) for p in self.engine.bindings.values())

    def _bindings_json(self) -> list[dict]:
        now = self.clock()
        out = []
        for b in sorted(all_bindings(self.engine), key=lambda b: int(b.home_address)):
            out.append({
                "home_address": str(b.home_address),
                "care_of_address": str(b.care_of_address),
                "lifetime": b.lifetime,
                "remaining": None if b.expires_at is None else round(max(0.0, b.expires_at - now), 1),
                "registered_at": b.registered_at,
                "source": f"{b.source_address}:{b.source_port}",
                "foreign_agent": str(b.foreign_agent) if b.foreign_agent else None,
                "reverse_tunnel": b.reverse_tunnel,
                "udp_tunnel": b.udp_tunnel,
                "nat_detected": b.nat_detected,
                "trusted": b.trusted,
                "nai": b.nai.decode("utf-8", "replace") if b.nai else None,
            })
        return out

    def counters_json(self) -> dict:
        eng = self.engine.counters
        return {
            "requests": self.counters["requests"],
            "replies": sum(self.replies_by_code.values()),
            "replies_by_code": {str(k): v for k, v in sorted(self.replies_by_code.items())},
            "accepted": eng["accepted"],
            "denied": eng["denied"],
            "deregistered": eng["deregistered"],
            "expired": eng["expired"],
            "auth_failures": eng["mn_auth_failed"] + eng["fa_auth_failed"],
            "mn_auth_failures": eng["mn_auth_failed"],
            "fa_auth_failures": eng["fa_auth_failed"],
            "identification_mismatches": eng["identification_mismatch"],
            "malformed": eng["malformed"],
            "unknown_home_address": eng["unknown_home_address"],
            "bindings": self._nbindings(),
            "restored": self._restored,
            "tunnel_data_in": self.counters["tunnel_data_in"],
            "tunnel_data_out": self.counters["tunnel_data_out"],
            "kernel_errors": self.dp.errors if self.dp else 0,
            "state_saves": self.counters["state_saves"],
            "engine": dict(eng),
        }

    def _status(self, req: dict) -> dict:
        s = self.s
        return {
            "role": "ha",
            "pid": os.getpid(),
            "address": str(s.address),
            "listen": [str(a) for a in s.listen],
            "port": s.port,
            "uptime": round(self.clock() - self.started_at, 1) if self.started_at else 0,
            "dataplane": self.dp.backend.kind if self.dp else None,
            "trusted_prefixes": [str(p) for p in s.engine.trusted_prefixes],
            "nodes": len(s.engine.nodes),
            "bindings": self._bindings_json(),
            "counters": self.counters_json(),
            "kernel": self.dp.snapshot() if self.dp else {},
            "udp_tunnel": dict(self.udp.counters) if self.udp else {},
            "state_file": self.state.path,
        }
