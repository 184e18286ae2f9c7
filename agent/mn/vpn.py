"""The mobile node's VPN client: IKEv2 + MOBIKE to the corporate gateway.

The daemon (agent/mn/daemon.py) calls, on every link change and at the same
moment as its detection Registration Request::

    tia = await vpn.update(ifname, local_addr)

- no IKE SA: IKE starts from ``local_addr`` (IKE_SA_INIT, IKE_AUTH asking
  for the TIA); returns once the CHILD SA is installed and the TIA is on
  ``lo`` (a local address the Mobile IP tunnel can use as outer source);
- an IKE SA: MOBIKE moves it to ``local_addr`` (UPDATE_SA_ADDRESSES from the
  new address on 4500, fresh NAT detection, COOKIE2) and the kernel SAs are
  migrated in place (same SPIs); returns once the gateway answered. If the
  update fails, a new IKE SA is set up from ``local_addr`` instead.

``update`` raises :class:`VpnError` with the reason when no usable SA could
be made; it may be cancelled (a newer link event): a connection attempt is
then aborted and leaves nothing behind; a MOBIKE update already on its way
finishes by itself. A new ``update`` supersedes one still running.

``await vpn.stop()`` deletes the SAs on both sides and removes every kernel
object (idempotent). ``vpn.status()`` (not a coroutine) is the ``ike`` part
of ``mipmobike status``. ``vpn.on_event`` (optional) is called with a
:class:`VpnEvent` for what happens on its own: ``sa_lost`` (the gateway
stopped answering, deleted or lost our SA), ``reestablished`` (a new IKE SA
after a loss; ``tia`` may differ), ``tia_changed``, ``address_updated``,
``rekeyed``, ``failed`` (re-establishment keeps failing; retried with
back-off). While an SA is lost, its policies stay in the kernel without SAs
(and the TIA on ``lo``): traffic from the TIA is dropped, never sent in the
clear, until the new SA takes over.

Only the configured additional addresses are ever announced to the gateway
(NO_ADDITIONAL_ADDRESSES otherwise): the home address and tunnel devices
never appear in MOBIKE address lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from dataclasses import dataclass, field

from agent.ike import CaTrust, CertAuth, IkeConfig, IkeConnection, PskAuth, State
from agent.ike.aio import AsyncIkeDriver, IkeSessionError, InstallFailed
from agent.ike.errors import IkeError
from agent.ike.keylog import append_tshark_keys
from agent.ike.events import (
    AddressUpdated, ChildSaDeleted, ChildSaEstablished, IkeFailed, IkeSaDeleted, IkeSaEstablished, IkeSaRekeyed,
    LivenessChecked, MobikeFailed, MobikeStarted,
)

log = logging.getLogger("mipmobike.mn.vpn")

REESTABLISH_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class VpnError(RuntimeError):
    """The VPN could not be brought up or moved; the message says why."""


@dataclass
class VpnEvent:
    kind: str                        # sa_lost | reestablished | tia_changed | address_updated | rekeyed | failed
    time: float                      # wall clock (time.time())
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "time": round(self.time, 3), **self.detail}


def ike_config_from(vpn, *, overrides: dict | None = None) -> IkeConfig:
    """An IkeConfig from the [vpn] section (agent.mn.config.VpnConfig)."""
    if vpn.auth == "psk":
        local_auth = remote_auth = PskAuth(vpn.psk)
    else:
        local_auth = CertAuth.load(vpn.cert, vpn.key_file)
        remote_auth = CaTrust.load(vpn.ca)
    kw = dict(local_id=vpn.local_id, remote_id=vpn.gateway_id, local_auth=local_auth, remote_auth=remote_auth,
              remote_ts=[str(p) for p in vpn.internal_prefixes], dpd_interval=float(vpn.dpd_interval),
              child_rekey_time=2700.0, ike_rekey_time=10800.0, retransmit_timeout=1.0, retransmit_tries=4,
              retransmit_max_timeout=8.0)
    for name in ("ike_proposals", "esp_proposals", "additional_addresses"):
        value = getattr(vpn, name, None)
        if value:
            kw[name] = list(value)
    kw.update(overrides or {})
    return IkeConfig(**kw)


class Vpn:
    """IKEv2/MOBIKE client of the mobile node (see the module docstring)."""

    def __init__(self, cfg, *, installer=None, netns: str | None = None, socket_factory=None,
                 ike_overrides: dict | None = None, connect_timeout: float = 30.0,
                 update_timeout: float = 20.0) -> None:
        if cfg.vpn is None:
            raise ValueError("the configuration has no [vpn] section")
        self.cfg = cfg
        self.vcfg = cfg.vpn
        self.gateway = str(cfg.vpn.gateway)
        self.netns = netns
        self.on_event = None
        self._installer = installer
        self._socket_factory = socket_factory
        self._overrides = dict(ike_overrides or {})
        self.connect_timeout = connect_timeout
        self.update_timeout = update_timeout
        self.driver: AsyncIkeDriver | None = None
        self.ifname: str | None = None
        self.local: ipaddress.IPv4Address | None = None
        self.tia: ipaddress.IPv4Address | None = None
        self.ike: IkeSaEstablished | None = None
        self.last_mobike: float | None = None          # wall clock of the last completed update
        self.last_mobike_ms: float | None = None       # its duration (update() call -> gateway answer)
        self.established_at: float | None = None
        self.last_error: str | None = None
        self.counters: dict[str, int] = {"connects": 0, "mobike_updates": 0, "mobike_failures": 0, "sa_lost": 0,
                                         "reestablished": 0, "ike_rekeys": 0, "child_rekeys": 0, "dpd_ok": 0}
        self.history: list[VpnEvent] = []
        self.marks: dict[str, float] = {}              # the running update's steps (wall clock)
        self._op: asyncio.Task | None = None
        self._recover: asyncio.Task | None = None
        self._stopping = False

    # ------------------------------------------------------------------ the daemon's API

    async def update(self, ifname: str, local_addr) -> ipaddress.IPv4Address:
        """Bring the VPN up from ``local_addr`` or move it there; the TIA."""
        local = ipaddress.IPv4Address(str(local_addr))
        prev = self._op
        if prev is not None and not prev.done():
            prev.cancel()
            with contextlib.suppress(BaseException):
                await prev
        if self._recover is not None and not self._recover.done():
            self._recover.cancel()
        self._stopping = False
        self.marks = {"vpn_called": time.time()}
        op = asyncio.get_running_loop().create_task(self._update(ifname, local))
        self._op = op
        try:
            return await asyncio.shield(op)
        except asyncio.CancelledError:
            op.cancel()
            with contextlib.suppress(BaseException):
                await op
            raise

    async def stop(self) -> None:
        """Delete the SAs at the gateway and here, remove every kernel object."""
        self._stopping = True
        for task in (self._op, self._recover):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._op = self._recover = None
        drv = self.driver
        if drv is None:
            return
        try:
            await drv.delete(timeout=2.0)
        except Exception as e:
            log.warning("vpn: deleting the SAs: %s", e)
            with contextlib.suppress(Exception):
                drv.installer.remove_all()
        await drv.close()
        with contextlib.suppress(Exception):
            drv.installer.close()
        self.driver = None
        self.ike = None
        if self.tia is not None:
            log.info("vpn: stopped (TIA %s released)", self.tia)
        self.tia = None

    def status(self) -> dict:
        """The VPN's state for ``mipmobike status``."""
        drv = self.driver
        conn = drv.conn if drv is not None else None
        st = {
            "gateway": self.gateway, "gateway_id": self.vcfg.gateway_id,
            "state": conn.state.value if conn is not None else "down",
            "interface": self.ifname, "local_address": str(self.local) if self.local else None,
            "tia": str(self.tia) if self.tia else None,
            "established_at": self.established_at,
            "last_mobike": self.last_mobike, "last_mobike_ms": self.last_mobike_ms,
            "last_error": self.last_error,
            "counters": dict(self.counters),
            "events": [e.as_dict() for e in self.history[-10:]],
        }
        if conn is not None and conn.state is not State.IDLE:
            st.update({
                "ike_spi_i": conn.spi_i.hex(), "ike_spi_r": conn.spi_r.hex(),
                "ike_proposal": conn.suite.name if conn.suite else None,
                "path": {"local": f"{conn.path.local[0]}:{conn.path.local[1]}",
                         "remote": f"{conn.path.remote[0]}:{conn.path.remote[1]}"},
                "nat": {"local": conn.nat_local, "remote": conn.nat_remote},
                "encap": bool(conn.path.natt and (conn.nat_local or conn.nat_remote)),
                "mobike": conn.mobike, "gateway_addresses": list(conn.peer_addresses),
                "children": [{"spi_in": f"{c.spi_in:08x}", "spi_out": f"{c.spi_out:08x}",
                              "proposal": c.suite.name,
                              "local_ts": [str(t) for t in c.local_ts], "remote_ts": [str(t) for t in c.remote_ts]}
                             for c in conn.children.values()],
                "ike_counters": dict(conn.stats),
            })
        if drv is not None:
            st["kernel"] = {"installer": type(drv.installer).__name__,
                            "held_policies": len(drv.installer.held),     # fail closed while the SA is down
                            "sas": [{"spi_in": f"{c.spi_in:08x}", "spi_out": f"{c.spi_out:08x}", "local": c.local,
                                     "remote": c.remote, "encap": list(c.encap) if c.encap else None,
                                     "reqid": f"{c.reqid:#x}"} for c in drv.installer.children.values()],
                            "socket_counters": dict(drv.stats)}
        return st

    # ------------------------------------------------------------------ internals

    def _make_installer(self):
        if self._installer is not None:
            return self._installer
        from agent.ike.installer import XfrmInstaller
        return XfrmInstaller(self.netns, state_file=os.path.join(self.cfg.state_dir, "vpn-tia"))

    async def _ensure_driver(self) -> AsyncIkeDriver:
        if self.driver is None:
            kw = {}
            if self._socket_factory is not None:
                kw["socket_factory"] = self._socket_factory
            drv = AsyncIkeDriver(self._make_installer(), netns=self.netns, on_event=self._on_ike_event,
                                 name="vpn", **kw)
            await drv.open()
            self.driver = drv
        return self.driver

    async def _update(self, ifname: str, local: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
        drv = await self._ensure_driver()
        self.ifname, self.local = ifname, local
        conn = drv.conn
        if conn is not None and conn.state is State.ESTABLISHED and conn.mobike and conn.children:
            t0 = time.time()
            try:
                await drv.update(str(local), timeout=self.update_timeout)
            except (IkeSessionError, IkeError) as e:
                self.counters["mobike_failures"] += 1
                self.last_error = f"MOBIKE update from {local} failed: {e}"
                log.warning("vpn: %s; setting up a new IKE SA", self.last_error)
            else:
                self.last_mobike, self.last_mobike_ms = time.time(), round((time.time() - t0) * 1000, 1)
                return self.tia
        if drv.conn is not None and drv.conn.state is not State.CLOSED:
            drv.abort()
        return await self._establish(local)

    async def _establish(self, local: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
        drv = self.driver
        try:
            cfg = ike_config_from(self.vcfg, overrides=self._overrides)
        except IkeError as e:
            raise VpnError(f"VPN configuration: {e}") from e
        conn = IkeConnection(cfg, (str(local), 500), (self.gateway, 500), name="vpn")
        self.counters["connects"] += 1
        try:
            child = await drv.connect(conn, timeout=self.connect_timeout)
        except asyncio.TimeoutError:
            self.last_error = f"no IKE SA with {self.gateway} from {local} within {self.connect_timeout:.0f} s"
            raise VpnError(self.last_error) from None
        except IkeSessionError as e:
            self.last_error = f"IKE with {self.gateway} from {local}: {e}"
            raise VpnError(self.last_error) from None
        old = self.tia
        self.tia = child.tia
        self.established_at = time.time()
        self.last_error = None
        if old is not None and old != self.tia:
            self._emit("tia_changed", old=str(old), new=str(self.tia))
        log.info("vpn: up from %s, TIA %s, CHILD SA %08x/%08x%s", local, self.tia, child.inbound.spi,
                 child.outbound.spi, " (ESP-in-UDP)" if child.encap else "")
        return self.tia

    def _keylog(self) -> None:
        """Debug option ``vpn.debug_keylog``: this IKE SA's keys for tshark (0600, refused if readable)."""
        path = getattr(self.vcfg, "debug_keylog", None)
        conn = self.driver.conn if self.driver is not None else None
        if not path or conn is None or conn.keys is None:
            return
        try:
            append_tshark_keys(path, conn.keys)
        except (OSError, ValueError) as e:
            log.error("vpn: IKE key log %s not written: %s", path, e)

    def _emit(self, kind: str, **detail) -> None:
        ev = VpnEvent(kind, time.time(), detail)
        self.history.append(ev)
        del self.history[:-50]
        log.info("vpn: %s %s", kind, detail)
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:
                log.exception("vpn: on_event callback failed")

    def _on_ike_event(self, ev) -> None:
        if isinstance(ev, (IkeSaEstablished, IkeSaRekeyed)):
            self._keylog()                    # new IKE SA keys (debug option)
        if isinstance(ev, IkeSaEstablished):
            self.ike = ev
        elif isinstance(ev, MobikeStarted):
            self.marks["mobike_sent"] = time.time()          # request out, kernel SAs moved already
        elif isinstance(ev, AddressUpdated):
            if self.driver is not None and self.driver.last_rx is not None:
                self.marks["mobike_answer_rx"] = self.driver.last_rx
            self.marks["mobike_answered"] = time.time()
            self.counters["mobike_updates"] += 1
            self._emit("address_updated", local=ev.local_addr[0], remote=ev.remote_addr[0], nat_local=ev.nat_local,
                       nat_remote=ev.nat_remote, encap=ev.encap, probed=ev.probed)
        elif isinstance(ev, IkeSaRekeyed):
            self.counters["ike_rekeys"] += 1
            self._emit("rekeyed", what="ike", by=ev.by, spi_i=ev.spi_i.hex(), spi_r=ev.spi_r.hex())
        elif isinstance(ev, ChildSaEstablished) and ev.rekey_of is not None:
            self.counters["child_rekeys"] += 1
            self._emit("rekeyed", what="child", old=f"{ev.rekey_of:08x}", spi_in=f"{ev.inbound.spi:08x}",
                       spi_out=f"{ev.outbound.spi:08x}")
        elif isinstance(ev, LivenessChecked):
            self.counters["dpd_ok"] += 1
        elif isinstance(ev, (MobikeFailed, InstallFailed)):
            self.last_error = ev.reason
        elif isinstance(ev, IkeFailed):
            self.last_error = ev.reason
        elif isinstance(ev, IkeSaDeleted) and ev.by in ("peer", "timeout", "error") and not self._stopping:
            busy = self._op is not None and not self._op.done()
            self.counters["sa_lost"] += 1
            self._emit("sa_lost", by=ev.by, reason=ev.reason, spi_i=ev.spi_i.hex())
            if not busy and self.local is not None:
                self._recover = asyncio.get_running_loop().create_task(self._reestablish())
        elif isinstance(ev, ChildSaDeleted) and ev.by == "peer":
            conn = self.driver.conn if self.driver else None
            if conn is not None and conn.state is State.ESTABLISHED and not conn.children:
                # the gateway closed our only CHILD SA but kept the IKE SA: start over
                log.warning("vpn: the gateway deleted the CHILD SA; setting up a new IKE SA")
                self.driver.abort()

    async def _reestablish(self) -> None:
        """After a lost SA: a new IKE SA from the current address, with back-off."""
        await asyncio.sleep(0)
        for i in range(10 ** 6):
            if self._stopping or self.local is None:
                return
            try:
                old = self.tia
                tia = await self._establish(self.local)
            except (VpnError, OSError) as e:
                delay = REESTABLISH_BACKOFF[min(i, len(REESTABLISH_BACKOFF) - 1)]
                self._emit("failed", reason=str(e), retry_in=delay)
                await asyncio.sleep(delay)
                continue
            self.counters["reestablished"] += 1
            self._emit("reestablished", tia=str(tia), old_tia=str(old) if old else None,
                       tia_changed=old is not None and old != tia)
            return
