"""The mobile node agent: netlink-driven trust detection and the c / f / mc modes.

One asyncio task per access-link change runs the RFC 5266 section 3.4
procedure:

1. the gate closes on the link (only detection traffic passes);
2. DHCP gets an address while an Agent Solicitation looks for a foreign agent;
3. at the same moment: a Registration Request with the new co-located
   care-of address goes to the i-HA outside the VPN (detection socket), and
   the VPN is told about the new address (MOBIKE update, or IKE start);
4. verdict: an authenticated reply carrying TNC means trusted -> mode f (a
   foreign agent was heard and policy allows it) or mode c; anything else
   (no reply, a reply without TNC, a denial) means untrusted -> mode mc once
   the VPN is up (the TIA registered as co-located care-of address through
   the VPN, unless that binding already stands: MOBIKE-only move);
5. the new mode's data path is installed, then the gate opens.

A new link event cancels a handover in progress. Every handover is kept in
a timeline (trigger -> verdict -> data path ready, with the reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import time
from dataclasses import asdict, dataclass, field

from agent.control import ControlServer
from agent.mip.auth import SecurityAssociation
from agent.mip.constants import AdvFlag
from agent.mip.icmp import icmp_checksum
from agent.mip.mn import (AgentAdvertised, Denied, Deregistered, MnConfig as EngineConfig, MnTunnelPacket,
                          MobileNode, Registered, RegistrationExpired, TimedOut)
from agent.netlink_events import AddrEvent, LinkEvent, LinkWatcher
from agent.sdnotify import notify

from .config import MnConfig
from .dhcp import Dhcp
from .mipio import MipIo

log = logging.getLogger("mipmobike.mn")

FA_LISTEN = 0.6        # how long detection waits for an agent advertisement after the lease


@dataclass
class Handover:
    trigger: str
    ifname: str
    t_trigger: float                     # wall clock
    t_lease: float | None = None
    t_verdict: float | None = None
    t_ready: float | None = None
    t_vpn: float | None = None           # the VPN's address update (MOBIKE) or IKE set-up finished
    verdict: str | None = None           # "trusted" | "untrusted" | "home" | "failed"
    mode: str | None = None
    reason: str = ""
    coa: str | None = None
    tia: str | None = None
    mobike_only: bool = False
    steps: dict = field(default_factory=dict)   # step -> ms after the trigger (where the time went)

    def mark(self, step: str, t: float | None = None) -> None:
        self.steps[step] = round(((time.time() if t is None else t) - self.t_trigger) * 1000, 1)

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("t_lease", "t_verdict", "t_ready", "t_vpn"):
            d[k.replace("t_", "ms_")] = None if d[k] is None else round((d[k] - self.t_trigger) * 1000, 1)
        return d


def _echo_request(src, dst, seq: int) -> bytes:
    """An IPv4 ICMP echo request (the RFC 3519 keepalive through the tunnel)."""
    icmp = bytearray(b"\x08\x00\x00\x00" + (0x6d6d).to_bytes(2, "big") + seq.to_bytes(2, "big") + b"mipmobike")
    icmp[2:4] = icmp_checksum(bytes(icmp)).to_bytes(2, "big")
    hdr = bytearray(b"\x45\x00" + (20 + len(icmp)).to_bytes(2, "big") + b"\x00\x00\x40\x00\x40\x01\x00\x00"
                    + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed)
    hdr[10:12] = icmp_checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr + icmp)


class MobileNodeAgent:
    def __init__(self, cfg: MnConfig, *, gate=None, datapath=None, vpn=None, socket_factory=None) -> None:
        self.cfg = cfg
        self.gate = gate
        self.datapath = datapath
        self.vpn = vpn
        sa = SecurityAssociation(cfg.spi, cfg.key, algorithm=cfg.algorithm)
        self.engine = MobileNode(EngineConfig(
            home_address=cfg.home_address, home_agent=cfg.home_agent, sa=sa, nai=cfg.nai,
            lifetime=cfg.lifetime, reverse_tunnel=cfg.reverse_tunnel,
            udp_tunnel=cfg.udp_tunnel != "never", udp_tunnel_force=cfg.udp_tunnel == "force",
            initial_timeout=cfg.detection.initial_timeout, max_timeout=cfg.detection.max_timeout,
            max_retransmissions=cfg.detection.retransmissions, renew_fraction=cfg.renew_fraction))
        self._socket_factory = socket_factory
        self.mip: MipIo | None = None
        self.mode: str | None = None
        self.trusted: bool | None = None
        self.ifname: str | None = None
        self.lease = None
        self.fa: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None = None   # (agent, care-of address)
        self.dhcp: Dhcp | None = None      # the current link's client (keeps renewing its lease)
        self._udp_tun = None               # RFC 3519: the TUN device whose packets we tunnel
        self._keepalive: asyncio.Task | None = None
        self.timeline: list[Handover] = []
        self.counters: dict[str, int] = {"handovers": 0, "forged_or_unmatched_replies": 0}
        self._task: asyncio.Task | None = None
        self._task_if: str | None = None        # the interface the running handover is for
        self._waiter: asyncio.Future | None = None
        self._link_up: dict[str, bool] = {}
        self._carrier: dict[str, int] = {}
        self._stop = asyncio.Event()
        self.control = ControlServer(cfg.control_socket)
        self.started = time.time()

    # -- MIP engine events ---------------------------------------------------------------------
    def _on_mip(self, ev) -> None:
        if isinstance(ev, MnTunnelPacket):
            tun = self.datapath.tun if self.datapath is not None else None
            if tun is not None and ev.next_header == 4:
                with contextlib.suppress(OSError):
                    tun.write(ev.payload)
            return
        if isinstance(ev, AgentAdvertised):
            adv = ev.advertisement
            if adv.flags & AdvFlag.F and adv.care_of_addresses:
                self.fa = (ev.source, adv.care_of_addresses[0])
            return
        if isinstance(ev, RegistrationExpired):
            log.warning("binding expired; starting a new handover on %s", self.ifname)
            if self.ifname:
                self._start_handover(self.ifname, "binding-expired")
            return
        if isinstance(ev, Registered) and self._waiter is None:
            log.info("binding renewed: care-of %s, lifetime %d", ev.binding.care_of_address, ev.lifetime)
            return
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(ev)

    async def _registration(self, register) -> object:
        """Run one registration (a callable that starts it) and wait for its outcome event."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            register()
            return await self._waiter
        finally:
            self._waiter = None

    # -- link events -----------------------------------------------------------------------------
    def _on_link(self, ev) -> None:
        if isinstance(ev, LinkEvent):
            was = self._link_up.get(ev.ifname)
            self._link_up[ev.ifname] = ev.up
            # the kernel's link watcher coalesces a fast carrier down+up into one "up"
            # notification; the carrier-change counter still moved: that is a new link too
            last, self._carrier[ev.ifname] = self._carrier.get(ev.ifname), ev.carrier_changes
            bounced = (was and ev.up and last is not None and ev.carrier_changes is not None
                       and ev.carrier_changes > last)
            if bounced:
                self._link_down(ev.ifname)
            if ev.up and (not was or bounced):
                self._start_handover(ev.ifname, "link-up")
            elif not ev.up and was:
                self._link_down(ev.ifname)
        elif isinstance(ev, AddrEvent) and not ev.added and self.lease is not None \
                and ev.ifname == self.ifname and ev.address.ip == self.lease.ip and self._link_up.get(ev.ifname):
            self._start_handover(ev.ifname, "address-lost")

    def _link_down(self, ifname: str) -> None:
        if self._task is not None and not self._task.done() and ifname == self._task_if:
            self._task.cancel()
        if self.gate is not None:
            with contextlib.suppress(Exception):
                self.gate.close(ifname)
        if ifname == self.ifname:
            self.trusted = None
            self.fa = None
            asyncio.get_running_loop().create_task(self._drop_dhcp(send_release=False))
            if self.datapath is not None:
                with contextlib.suppress(Exception):
                    self.datapath.leave(ifname)
            self.lease = None
        self.timeline.append(Handover("link-down", ifname, time.time(), verdict="none", reason="link lost"))

    async def _drop_dhcp(self, send_release: bool) -> None:
        dhcp, self.dhcp = self.dhcp, None
        if dhcp is not None:
            await dhcp.release(send=send_release)

    def _start_handover(self, ifname: str, trigger: str) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = asyncio.get_running_loop().create_task(self._handover(ifname, trigger))
        self._task_if = ifname

    # -- the handover ------------------------------------------------------------------------------
    async def _handover(self, ifname: str, trigger: str) -> None:
        h = Handover(trigger, ifname, time.time())
        self.timeline.append(h)
        del self.timeline[:-50]
        self.counters["handovers"] += 1
        try:
            await self._detect_and_switch(h)
        except asyncio.CancelledError:
            h.verdict = h.verdict or "superseded"
            h.reason = h.reason or "a newer link event replaced this handover"
            raise
        except Exception as e:
            log.exception("handover on %s failed", ifname)
            h.verdict, h.reason = "failed", f"{type(e).__name__}: {e}"
        finally:
            log.info("handover %s on %s: %s mode=%s ready=%s (%s)", trigger, ifname, h.verdict, h.mode,
                     None if h.t_ready is None else f"{(h.t_ready - h.t_trigger) * 1000:.0f} ms", h.reason)

    async def _detect_and_switch(self, h: Handover) -> None:
        cfg, mip = self.cfg, self.mip
        ifname = h.ifname
        if self.gate is not None:
            self.gate.close(ifname)                    # fail closed before anything leaves
            h.mark("gate_closed")
        self.trusted = None
        previous_mode = self.mode
        self.fa = None
        self._stop_udp_tunnel()
        if previous_mode != "mc":
            # a binding through the old link (its CoA, its FA) is stale; only the TIA's survives a move
            mip.cancel()
        mip.listen_adverts(ifname)
        await self._drop_dhcp(send_release=False)
        self.dhcp = Dhcp(ifname, timeout=15)
        h.mark("dhcp_start")
        lease = await self.dhcp.acquire()
        h.t_lease = time.time()
        h.mark("lease", h.t_lease)
        h.coa = str(lease.ip)
        self.lease, self.ifname = lease, ifname
        self.engine.link_changed()
        mip.solicit(ifname)
        self.datapath.access(ifname, lease)
        h.mark("address_configured")

        if lease.ip in cfg.home_prefix:
            if await self._at_home(h, lease):
                return
            # the i-HA did not confirm: an address from "home" proves nothing (any DHCP server can
            # hand one out); treat the link as untrusted
            self.datapath.access(ifname, lease)
            vpn_task = None
            if self.vpn is not None:
                vpn_task = asyncio.get_running_loop().create_task(self.vpn.update(ifname, lease.ip))
            self.trusted = False
            await self._untrusted(h, lease, vpn_task, previous_mode)
            if h.t_ready is None:
                h.t_ready = time.time()
            if self.gate is not None and self.mode is not None:
                self.gate.open(ifname)
            return

        # (a) detection RRQ outside the VPN and (b) the VPN's address update, at the same moment
        mip.set_path(lease.ip, ifname, bypass=True)
        vpn_task = None
        if self.vpn is not None:
            vpn_task = asyncio.get_running_loop().create_task(self.vpn.update(ifname, lease.ip))

            def vpn_done(t: asyncio.Task, h=h) -> None:
                if not t.cancelled() and t.exception() is None:
                    h.t_vpn = time.time()
                    for step, at in self.vpn.marks.items():
                        h.mark(step, at)
                    h.mark("vpn_done", h.t_vpn)
            vpn_task.add_done_callback(vpn_done)
        result = await self._registration(lambda: (mip.register(lease.ip), h.mark("detection_sent")))
        h.t_verdict = time.time()
        h.mark("verdict", h.t_verdict)
        if isinstance(result, Registered) and result.tnc:
            h.verdict, h.reason = "trusted", "authenticated reply with TNC"
            self.trusted = True
            await self._trusted(h, lease, vpn_task, result)
        else:
            h.verdict = "untrusted"
            h.reason = {Registered: "authenticated reply without TNC", TimedOut: "no reply from the i-HA",
                        Denied: f"registration denied (code {getattr(result, 'code', '?')})"}.get(
                type(result), f"unexpected {type(result).__name__}")
            self.trusted = False
            await self._untrusted(h, lease, vpn_task, previous_mode)
        if h.t_ready is None:
            h.t_ready = time.time()        # stamped before the gate opens: nothing of the new mode left earlier
        if self.gate is not None and self.mode is not None:
            self.gate.open(ifname)
            h.mark("gate_open")

    async def _at_home(self, h: Handover, lease) -> bool:
        """Back on the home link? Only an authenticated deregistration reply says so (True)."""
        self.datapath.home(lease)
        self.mip.set_path(self.cfg.home_address, h.ifname, bypass=True)
        res = await self._registration(lambda: self.mip.deregister())
        h.t_verdict = time.time()
        if not isinstance(res, Deregistered):
            h.verdict = "untrusted"
            h.reason = (f"address {lease.ip} inside the home prefix {self.cfg.home_prefix}, but the i-HA did not "
                        f"confirm the deregistration ({type(res).__name__})")
            return False
        h.verdict = "home"
        h.reason = f"address {lease.ip} inside the home prefix {self.cfg.home_prefix}; deregistration accepted"
        self.trusted = True
        if self.vpn is not None and not self.cfg.vpn.keep_ike_when_trusted:
            await self.vpn.stop()
        self.mode = h.mode = "home"
        h.t_ready = time.time()
        if self.gate is not None:
            self.gate.open(h.ifname)
        return True

    async def _trusted(self, h: Handover, lease, vpn_task, detection: Registered) -> None:
        mode = "c"
        if self.cfg.use_fa:
            if self.fa is None:
                await asyncio.sleep(max(0.0, FA_LISTEN - (time.time() - h.t_lease)))
            if self.fa is not None:
                agent, coa = self.fa
                if self.gate is not None:
                    self.gate.set_allowed(home_agents=[(self.cfg.home_agent, 434), (agent, 434)],
                                          gateways=self._gateways())
                self.datapath.mode_f(agent)
                self.mip.set_path(self.cfg.home_address, h.ifname, bypass=True)
                res = await self._registration(lambda: self.mip.register(coa, foreign_agent=agent))
                if isinstance(res, Registered):
                    mode = "f"
                else:
                    h.reason += f"; registration through the FA failed ({type(res).__name__}), mode c"
                    res = await self._registration(lambda: self.mip.register(lease.ip))
                    if isinstance(res, Registered):
                        detection = res
        if mode == "c":
            if detection.binding.udp_tunnel:
                # RFC 3519: the i-HA saw a NAT between us; data rides the registration's UDP flow
                h.reason += f"; NAT detected by the i-HA: UDP tunnelling (keepalive {detection.binding.keepalive} s)"
                self._start_udp_tunnel(self.datapath.mode_c_udp(lease.ip), detection.binding.keepalive)
            else:
                self.datapath.mode_c(lease.ip)
        self.mode = h.mode = mode
        if vpn_task is not None:
            if self.cfg.vpn.keep_ike_when_trusted:
                vpn_task.add_done_callback(lambda t: t.exception())
            else:
                vpn_task.cancel()
                await self.vpn.stop()

    async def _untrusted(self, h: Handover, lease, vpn_task, previous_mode) -> None:
        if vpn_task is None:
            h.reason += ("; no VPN client in this build: the link stays closed" if self.cfg.vpn is not None
                         else "; no VPN configured: the link stays closed")
            self.mode = h.mode = None
            return
        tia = await vpn_task
        h.tia = str(tia)
        b = self.engine.binding
        if previous_mode == "mc" and b is not None and b.care_of_address == tia and b.foreign_agent is None:
            # the MIP tunnel (TIA -> i-HA) never left: the data path was usable again as soon as
            # MOBIKE moved the SAs, since ESP to the gateway passes the closed gate
            h.mobike_only = True
            h.reason += "; VPN moved by MOBIKE, TIA unchanged: no new registration"
            self.datapath.mode_mc(tia)
            self.mode = h.mode = "mc"
            h.t_ready = h.t_vpn
            return
        else:
            self.mip.set_path(tia, None, bypass=False)
            res = await self._registration(lambda: self.mip.register(tia))
            if not isinstance(res, Registered):
                h.reason += f"; registration through the VPN failed ({type(res).__name__})"
                self.mode = h.mode = None
                return
        self.datapath.mode_mc(tia)
        self.mode = h.mode = "mc"

    # -- VPN events: an SA re-established on its own (gateway restart, lost SA) ---------------------
    def _on_vpn(self, ev) -> None:
        if ev.kind == "reestablished" and self.mode == "mc" and self.ifname is not None \
                and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._vpn_recovered(ev))
            self._task_if = self.ifname

    async def _vpn_recovered(self, ev) -> None:
        """The gateway lost our SA and the VPN made a new one: the TIA may differ; register it again."""
        h = Handover("vpn-reestablished", self.ifname, ev.time, t_vpn=ev.time,
                     coa=str(self.lease.ip) if self.lease else None)
        self.timeline.append(h)
        tia = ipaddress.IPv4Address(ev.detail["tia"])
        h.tia = str(tia)
        try:
            self.mip.set_path(tia, None, bypass=False)
            res = await self._registration(lambda: self.mip.register(tia))
            h.t_verdict = time.time()
            if not isinstance(res, Registered):
                h.verdict, h.reason = "failed", f"registration of the new TIA failed ({type(res).__name__})"
                return
            self.datapath.mode_mc(tia)
            h.verdict, h.mode = "untrusted", "mc"
            h.reason = "VPN re-established" + ("; TIA changed" if ev.detail.get("tia_changed") else "")
            h.t_ready = time.time()
        except Exception as e:
            log.exception("re-registration after VPN recovery failed")
            h.verdict, h.reason = "failed", f"{type(e).__name__}: {e}"

    # -- RFC 3519 UDP tunnel (mode c behind a NAT) -----------------------------------------------
    def _start_udp_tunnel(self, tun, keepalive: int | None) -> None:
        self._stop_udp_tunnel()
        if tun is None:
            return
        loop = asyncio.get_running_loop()
        loop.add_reader(tun.fileno(), self._tun_readable, tun)
        self._udp_tun = tun
        self._keepalive = loop.create_task(self._udp_keepalive(max(5, int(keepalive or 110)) * 0.8))

    def _stop_udp_tunnel(self) -> None:
        tun, self._udp_tun = self._udp_tun, None
        if tun is not None and tun.fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(tun.fileno())
        ka, self._keepalive = self._keepalive, None
        if ka is not None:
            ka.cancel()

    def _tun_readable(self, tun) -> None:
        for _ in range(64):
            pkt = tun.read()
            if pkt is None:
                break
            self.engine.send_tunnel_data(pkt)
        self.mip.flush()

    async def _udp_keepalive(self, interval: float) -> None:
        """Keep the NAT's mapping alive: an ICMP echo to the i-HA through the UDP tunnel."""
        seq = 0
        while True:
            await asyncio.sleep(interval)
            seq = (seq + 1) & 0xFFFF
            self.engine.send_tunnel_data(_echo_request(self.cfg.home_address, self.cfg.home_agent, seq))
            self.mip.flush()

    def _gateways(self) -> list:
        return [self.cfg.vpn.gateway] if self.cfg.vpn else []

    # -- status ------------------------------------------------------------------------------------
    def status(self, req: dict | None = None) -> dict:
        b = self.engine.binding
        now = time.time()
        gate = None
        if self.gate is not None:
            try:
                gate = {"backend": self.gate.backend_name,
                        "interfaces": {k: str(getattr(v, "value", v)) for k, v in self.gate.interfaces().items()},
                        "counters": {i: self.gate.counters(i) for i in self.cfg.interfaces if self._link_known(i)}}
            except Exception as e:
                gate = {"error": str(e)}
        return {
            "role": "mn",
            "mode": self.mode,
            "trusted": self.trusted,
            "interface": self.ifname,
            "care_of_address": str(self.lease.ip) if self.lease else None,
            "home_address": str(self.cfg.home_address),
            "home_agent": str(self.cfg.home_agent),
            "tia": str(self.datapath.tia) if self.datapath and self.datapath.tia else None,
            "foreign_agent": [str(x) for x in self.fa] if self.fa else None,
            "binding": None if b is None else {
                "care_of_address": str(b.care_of_address),
                "foreign_agent": str(b.foreign_agent) if b.foreign_agent else None,
                "lifetime": b.lifetime,
                "remaining": None if b.expires_at is None else round(b.expires_at - now, 1),
                "tnc": b.tnc, "udp_tunnel": b.udp_tunnel},
            "ike": self.vpn.status() if self.vpn is not None else None,
            "gate": gate,
            "mip_counters": dict(self.engine.counters),
            "counters": dict(self.counters),
            "timeline": [h.as_dict() for h in self.timeline[-20:]],
            "uptime": round(now - self.started, 1),
        }

    def _link_known(self, ifname: str) -> bool:
        return ifname in self._link_up

    # -- lifecycle ---------------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        kw = {"socket_factory": self._socket_factory} if self._socket_factory else {}
        self.mip = MipIo(self.engine, self._on_mip, **kw)
        if self.datapath is not None:
            n = self.datapath.reconcile()
            if n:
                log.info("removed %d kernel objects left by an earlier run", n)
        if self.gate is not None:
            self.gate.set_allowed(home_agents=[(self.cfg.home_agent, 434)], gateways=self._gateways())
            for ifname in self.cfg.interfaces:
                try:
                    self.gate.attach(ifname)       # closed, or the state a predecessor left (adopted)
                except Exception as e:             # absent until it appears; every link-up closes it again
                    log.warning("gate: %s not gated yet: %s", ifname, e)
        if self.vpn is not None:
            self.vpn.on_event = self._on_vpn
        self.control.register("status", self.status)
        await self.control.start()
        watcher = LinkWatcher(self.cfg.interfaces)
        await watcher.start()
        notify("READY=1")
        log.info("mobile node agent up: home address %s, i-HA %s, interfaces %s", self.cfg.home_address,
                 self.cfg.home_agent, ", ".join(self.cfg.interfaces))
        pump = loop.create_task(self._pump(watcher))
        try:
            await self._stop.wait()
        finally:
            notify("STOPPING=1")
            pump.cancel()
            watcher.close()
            await self.shutdown()

    async def _pump(self, watcher: LinkWatcher) -> None:
        while True:
            self._on_link(await watcher.get())

    async def shutdown(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.vpn is not None:
            with contextlib.suppress(Exception):
                await self.vpn.stop()
        await self._drop_dhcp(send_release=True)
        self._stop_udp_tunnel()
        if self.mip is not None:
            self.mip.close()
        if self.datapath is not None:
            with contextlib.suppress(Exception):
                self.datapath.clear()
        if self.gate is not None:
            # a clean stop removes the gate with everything else; only a crash leaves the
            # pinned programs behind, closed (fail closed), for the next start to adopt
            with contextlib.suppress(Exception):
                self.gate.destroy()
        await self.control.close()
