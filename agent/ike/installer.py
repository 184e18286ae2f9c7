"""Where the CHILD SAs of an IKE SA go: the kernel (XFRM), or a record.

The asyncio driver (:mod:`agent.ike.aio`) calls an installer for every
kernel-side change the IKE state machine decides; an installer is
synchronous (NETLINK_XFRM answers inside the request) and raises
:class:`InstallError` when the kernel refuses.

- :class:`XfrmInstaller`: the real thing, through ``xfrm/``. Each CHILD SA
  is an outbound/inbound SA pair in tunnel mode (outer: our physical address
  <-> the gateway, ESP-in-UDP when a NAT was detected) plus policies TIA/32
  <-> the internal prefixes, installed as one all-or-nothing bundle; a
  rekeyed CHILD SA gets its SA pair next to the old one under the same reqid
  (the policies stay); a MOBIKE move migrates SAs and policies in place (same
  SPIs); inbound SPIs come from the kernel (XFRM_MSG_ALLOCSPI). The TIA is put
  on ``lo`` as /32. When an SA is lost (not deleted by us), its policies are
  *held* without SAs: traffic from the TIA is then dropped by the kernel
  instead of leaving in the clear, until a new CHILD SA takes the policies
  over (``install``) or everything is removed (``remove_all``). Everything carries reqids from :func:`vpn_owner`, so a
  start after a crash removes what a predecessor left (``reconcile``).
- :class:`RecordingInstaller`: keeps the same model in memory and a log of
  the calls, for hosts whose kernel cannot hold ESP SAs (the netns tier).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import time
from dataclasses import dataclass, field

from .events import ChildSaEstablished, EspSa

log = logging.getLogger("agent.ike.installer")


class InstallError(RuntimeError):
    """The kernel refused a change; nothing of that change is left behind."""


@dataclass
class InstalledChild:
    child_id: int
    spi_in: int
    spi_out: int
    reqid: int
    local: str
    remote: str
    encap: tuple[int, int] | None          # (local port, remote port) of ESP-in-UDP
    local_nets: tuple[str, ...]
    remote_nets: tuple[str, ...]
    bundle: object = field(default=None, repr=False)    # xfrm.Bundle as installed (XfrmInstaller)


def _nets(tss) -> tuple[str, ...]:
    out = []
    for ts in tss:
        out += [str(n) for n in ts.networks()]
    return tuple(out)


class BaseInstaller:
    """Bookkeeping shared by both installers: children by id, grouped by reqid."""

    def __init__(self) -> None:
        self.children: dict[int, InstalledChild] = {}
        self.tia: ipaddress.IPv4Address | None = None
        self._lineage: dict[int, int] = {}         # child_id -> reqid
        self.held: list = []                       # policies kept without SAs after a loss (fail closed)
        self.ops: list[tuple] = []                 # (time, operation, detail) of every change

    def _op(self, what: str, **detail) -> None:
        self.ops.append((time.time(), what, detail))
        del self.ops[:-200]

    def _describe(self, ev: ChildSaEstablished, reqid: int) -> InstalledChild:
        encap = (ev.local_addr[1], ev.remote_addr[1]) if ev.encap else None
        return InstalledChild(ev.child_id, ev.inbound.spi, ev.outbound.spi, reqid, ev.local_addr[0],
                              ev.remote_addr[0], encap, _nets(ev.local_ts), _nets(ev.remote_ts))

    def reqid_for(self, ev: ChildSaEstablished) -> tuple[int, bool]:
        """(reqid, first of its lineage): a rekey keeps the reqid of the SA it replaces."""
        if ev.rekey_of is not None and ev.rekey_of in self._lineage:
            return self._lineage[ev.rekey_of], False
        return self._new_reqid(), True

    def _new_reqid(self) -> int:
        raise NotImplementedError

    # interface (see XfrmInstaller)
    def open(self) -> None:
        pass

    def close(self) -> None:
        pass


class RecordingInstaller(BaseInstaller):
    """Keeps the model and a log, touches no kernel (hosts without ESP)."""

    def __init__(self) -> None:
        super().__init__()
        self._reqid = 0x6D6D5600

    def _new_reqid(self) -> int:
        self._reqid += 1
        return self._reqid

    def allocate_spi(self, local: str, remote: str) -> int | None:
        spi = 0
        while spi < 0x100:
            spi = secrets.randbits(32)
        self._op("allocate_spi", local=local, remote=remote, spi=spi)
        return spi

    def install(self, ev: ChildSaEstablished) -> InstalledChild:
        reqid, first = self.reqid_for(ev)
        c = self._describe(ev, reqid)
        self.children[c.child_id] = c
        self._lineage[c.child_id] = reqid
        self._op("install" if first else "install_rekeyed", child=c, over_held=bool(first and self.held))
        if first:
            self.held = []
        return c

    def remove(self, child_id: int, hold: bool = False) -> None:
        c = self.children.pop(child_id, None)
        self._lineage.pop(child_id, None)
        if c is not None:
            last = not any(o.reqid == c.reqid for o in self.children.values())
            if hold and last:
                self.held.append((c.local_nets, c.remote_nets))
            self._op("remove", child=c, held=hold and last)

    def release_held(self) -> None:
        if self.held:
            self._op("release_held", policies=list(self.held))
            self.held = []

    def move(self, local: str, remote: str, encap: tuple[int, int] | None) -> None:
        for c in self.children.values():
            c.local, c.remote, c.encap = local, remote, encap
        self._op("move", local=local, remote=remote, encap=encap)

    def set_tia(self, tia) -> None:
        tia = ipaddress.IPv4Address(tia) if tia is not None else None
        if tia != self.tia:
            self._op("tia", old=self.tia, new=tia)
            self.tia = tia

    def remove_all(self) -> None:
        for cid in list(self.children):
            self.remove(cid)
        self.release_held()
        self.set_tia(None)


class XfrmInstaller(BaseInstaller):
    """CHILD SAs in the kernel through ``xfrm/`` (one network namespace)."""

    def __init__(self, netns: str | None = None, *, state_file: str | None = None,
                 replay_window: int = 64) -> None:
        super().__init__()
        self.netns = netns
        self.state_file = state_file
        self.replay_window = replay_window
        self._x = None
        self._kernel = None
        self.allocspi = True                       # XFRM_MSG_ALLOCSPI works (set False on first failure)

    # -- lifecycle --------------------------------------------------------------------------
    def open(self) -> None:
        if self._x is not None:
            return
        import xfrm
        self._xfrm = xfrm
        self._x = xfrm.Xfrm(self.netns, owner=vpn_owner())
        self.reconcile()

    def close(self) -> None:
        if self._x is not None:
            self._x.close()
            self._x = None
        if self._kernel is not None:
            self._kernel.close()
            self._kernel = None

    def reconcile(self) -> int:
        """Remove SAs, policies and a TIA a crashed predecessor left."""
        n_sa, n_pol = self._x.flush_owned()
        n = n_sa + n_pol
        if self.state_file and os.path.exists(self.state_file):
            try:
                with open(self.state_file) as f:
                    old = ipaddress.IPv4Address(f.read().strip())
                if self._k().del_address("lo", old, 32):
                    n += 1
            except (OSError, ValueError) as e:
                log.warning("could not remove the TIA an earlier run left: %s", e)
            self._forget_tia()
        if n:
            log.info("removed %d XFRM objects / addresses an earlier run left", n)
        return n

    def _k(self):
        if self._kernel is None:
            from agent.kernel import Kernel
            self._kernel = Kernel("mn", netns=self.netns)
        return self._kernel

    def _new_reqid(self) -> int:
        return self._x.allocate_reqid()

    # -- SPIs ---------------------------------------------------------------------------------
    def allocate_spi(self, local: str, remote: str) -> int | None:
        """An inbound SPI from the kernel (a larval SA remote -> local); None
        when the kernel cannot (the caller then picks one at random)."""
        if not self.allocspi:
            return None
        try:
            spi = self._x.allocate_spi(remote, local)
        except self._xfrm.XfrmError as e:
            log.warning("XFRM_MSG_ALLOCSPI failed (%s); choosing inbound SPIs at random", e)
            self.allocspi = False
            return None
        self._op("allocate_spi", local=local, remote=remote, spi=spi)
        return spi

    # -- CHILD SAs ---------------------------------------------------------------------------
    def _algs(self, sa: EspSa):
        x = self._xfrm
        if sa.aead_alg:
            return x.Algorithms(aead=x.Aead(sa.aead_alg, sa.encr_key, sa.aead_icv_bits))
        return x.Algorithms(crypt=x.Crypt(sa.encr_alg, sa.encr_key),
                            auth=x.Auth(sa.integ_alg, sa.integ_key, sa.integ_trunc_bits))

    def _bundle(self, ev: ChildSaEstablished, c: InstalledChild):
        return self._xfrm.tunnel_bundle(
            local=c.local, remote=c.remote, local_ts=list(c.local_nets), remote_ts=list(c.remote_nets),
            spi_in=c.spi_in, spi_out=c.spi_out, algs_in=self._algs(ev.inbound), algs_out=self._algs(ev.outbound),
            reqid=c.reqid, encap_ports=c.encap, replay_window=self.replay_window,
            esn=ev.inbound.esn, fwd=False)

    def install(self, ev: ChildSaEstablished) -> InstalledChild:
        """Install a CHILD SA: SA pair and policies all or nothing; for a
        rekey, the new SA pair next to the old one (the policies stay)."""
        reqid, first = self.reqid_for(ev)
        c = self._describe(ev, reqid)
        bundle = self._bundle(ev, c)
        try:
            if first and self.held:
                self._install_over_held(bundle)
            elif first:
                self._x.install(bundle)
            else:
                added = []
                try:
                    for sa in bundle.sas:
                        self._x.add_sa(sa)
                        added.append(sa)
                except BaseException:
                    for sa in added:
                        self._x.delete_sa(sa, missing_ok=True)
                    raise
                bundle = self._xfrm.Bundle(bundle.outbound, bundle.inbound, ())
        except self._xfrm.XfrmError as e:
            raise InstallError(f"installing CHILD SA {c.spi_in:08x}/{c.spi_out:08x}: {e}") from e
        c.bundle = bundle
        self.children[c.child_id] = c
        self._lineage[c.child_id] = reqid
        self._op("install" if first else "install_rekeyed", child=c)
        return c

    def _install_over_held(self, bundle) -> None:
        """A new CHILD SA takes over the policies a lost one left: SAs first,
        then each policy replaced in place (no moment without a policy)."""
        added = []
        try:
            for sa in bundle.sas:
                self._x.add_sa(sa)
                added.append(sa)
            held = {(p.selector, p.dir): p for p in self.held}
            for pol in bundle.policies:
                if held.pop((pol.selector, pol.dir), None) is not None:
                    self._x.update_policy(pol)
                else:
                    self._x.add_policy(pol)
        except BaseException:
            for sa in added:
                self._x.delete_sa(sa, missing_ok=True)
            raise
        for pol in held.values():           # selectors of the old TIA
            self._x.delete_policy(pol, missing_ok=True)
        self.held = []

    def remove(self, child_id: int, hold: bool = False) -> None:
        """Remove a CHILD SA's SAs; its policies go with the last SA pair of its
        reqid, or stay (``hold``: the SA was lost, traffic must not leak)."""
        c = self.children.pop(child_id, None)
        self._lineage.pop(child_id, None)
        if c is None:
            return
        heir = next((o for o in self.children.values() if o.reqid == c.reqid), None)
        b = c.bundle
        held = False
        try:
            if heir is not None and b.policies:
                heir.bundle = self._xfrm.Bundle(heir.bundle.outbound, heir.bundle.inbound, b.policies)
                self._x.remove(self._xfrm.Bundle(b.outbound, b.inbound, ()))
            elif hold and b.policies:
                self._x.remove(self._xfrm.Bundle(b.outbound, b.inbound, ()))
                self.held.extend(b.policies)
                held = True
            else:
                self._x.remove(b)
        except self._xfrm.XfrmError as e:
            log.warning("removing CHILD SA %08x: %s", c.spi_in, e)
        self._op("remove", child=c, held=held)

    def release_held(self) -> None:
        """Remove the policies a lost SA left."""
        for pol in self.held:
            try:
                self._x.delete_policy(pol, missing_ok=True)
            except self._xfrm.XfrmError as e:
                log.warning("removing held policy %s: %s", pol, e)
        if self.held:
            self._op("release_held", policies=len(self.held))
        self.held = []

    def move(self, local: str, remote: str, encap: tuple[int, int] | None) -> None:
        """MOBIKE: migrate every CHILD SA (same SPIs) to new outer addresses /
        encapsulation. Raises InstallError when the kernel refuses."""
        for c in self.children.values():
            if (c.local, c.remote, c.encap) == (local, remote, encap):
                continue
            try:
                c.bundle = self._x.migrate(c.bundle, local=local, remote=remote, encap_ports=encap)
            except self._xfrm.XfrmError as e:
                raise InstallError(f"migrating CHILD SA {c.spi_in:08x} to {local} <-> {remote}: {e}") from e
            c.local, c.remote, c.encap = local, remote, encap
        self._op("move", local=local, remote=remote, encap=encap)

    def set_tia(self, tia) -> None:
        """Put the TIA on lo as /32 (None: remove it)."""
        tia = ipaddress.IPv4Address(tia) if tia is not None else None
        if tia == self.tia:
            return
        k = self._k()
        if self.tia is not None:
            k.del_address("lo", self.tia, 32)
            self._forget_tia()
        if tia is not None:
            try:
                k.add_address("lo", tia, 32)
            except Exception as e:
                raise InstallError(f"adding the TIA {tia}/32 on lo: {e}") from e
            self._remember_tia(tia)
        self._op("tia", old=self.tia, new=tia)
        self.tia = tia

    def _remember_tia(self, tia) -> None:
        if not self.state_file:
            return
        try:
            os.makedirs(os.path.dirname(self.state_file) or ".", exist_ok=True)
            tmp = self.state_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{tia}\n")
            os.replace(tmp, self.state_file)
        except OSError as e:
            log.warning("could not record the TIA in %s: %s", self.state_file, e)

    def _forget_tia(self) -> None:
        if self.state_file:
            try:
                os.unlink(self.state_file)
            except FileNotFoundError:
                pass

    def remove_all(self) -> None:
        for cid in list(self.children):
            self.remove(cid)
        if self._x is not None:
            self.release_held()
            self._x.flush_owned()
        self.set_tia(None)


def vpn_owner():
    """The reqid/policy-index range of the VPN's XFRM objects: a slice of the
    project's range ("mm" << 16) kept for the VPN, so a flush of ours spares
    every other component's."""
    from xfrm import Owner
    return Owner(reqid_min=0x6D6D5600, reqid_max=0x6D6D56FF, index_min=0x6D6D5600, index_max=0x6D6D56FF)
