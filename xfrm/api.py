"""SA and policy operations over NETLINK_XFRM.

:class:`Xfrm` does the work: each call is one or a few netlink requests that
the kernel answers inside the send (see :mod:`xfrm.netlink`), so it returns
in well under a millisecond and may be called from asyncio code as well.
:class:`AsyncXfrm` offers the same operations as coroutines, for code that
prefers ``await`` everywhere; it wraps an :class:`Xfrm`.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import random
from typing import List, Optional, Union

from . import messages as m
from .constants import IPPROTO_ESP, XFRM_MAX_DEPTH, Dir, Mode, Msg
from .errors import MigrateUnsupported, NamespaceNotFound, XfrmError, XfrmNotFound, from_kernel
from .model import (DEFAULT_OWNER, SA, AddressLike, Bundle, Encap, Owner, Policy, PolicyId,
                    SAId, Template, encap_attr, family_of, ip, pack_addr, policy_from_msg,
                    policy_id_to_msg, policy_to_msg, sa_from_msg, sa_to_msg, said_to_msg)
from .netlink import (NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
                      KernelError, XfrmChannel)

log = logging.getLogger(__name__)

_CREATE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
_ACK = NLM_F_REQUEST | NLM_F_ACK
_DUMP = NLM_F_REQUEST | NLM_F_DUMP
_KEEP = object()        # migrate(): keep the UDP encapsulation as it is


def _said(obj: Union[SA, SAId]) -> SAId:
    return obj.id if isinstance(obj, SA) else obj


def _pid(obj: Union[Policy, PolicyId]) -> PolicyId:
    return obj.id if isinstance(obj, Policy) else obj


def _same_encap(a: Optional[Encap], b: Optional[Encap]) -> bool:
    if a is None or b is None:
        return a is b
    return (a.type, a.sport, a.dport, a.oa) == (b.type, b.sport, b.dport, b.oa)


def _move_template(t: Template, old: dict) -> Template:
    if t.mode != Mode.TUNNEL:
        return t
    src, dst = old.get(t.src, t.src), old.get(t.dst, t.dst)
    if (src, dst) == (t.src, t.dst):
        return t
    return dataclasses.replace(t, src=src, dst=dst, family=family_of(src))


class Xfrm:
    """NETLINK_XFRM in one network namespace.

    ``netns`` is a namespace name (as in ``ip netns``) or a path such as
    ``/proc/<pid>/ns/net``; None is the caller's namespace. It must exist
    (:class:`NamespaceNotFound` otherwise). ``owner`` decides which
    SAs/policies :meth:`flush_owned` may remove and from which range
    :meth:`allocate_reqid` hands out reqids (see :class:`xfrm.model.Owner`);
    with ``owner=None`` there is no ownership (and no flush).

    Use as a context manager, or call :meth:`close`. Thread-safe per request.
    """

    def __init__(self, netns: Optional[str] = None, *, owner: Optional[Owner] = DEFAULT_OWNER):
        self.netns = netns
        self.owner = owner
        try:
            self._chan = XfrmChannel(netns)
        except FileNotFoundError:
            raise NamespaceNotFound(errno.ENOENT, "open NETLINK_XFRM socket",
                                    f"in netns {netns!r}",
                                    message=f"network namespace {netns!r} does not exist"
                                    ) from None
        self._larval: set = set()          # (dst, spi, proto) from allocate_spi
        self._reserved_reqids: set = set()
        self._index_next = {d: None for d in (Dir.IN, Dir.OUT, Dir.FWD)}
        # learnt on the first migrate(); set it to False to force the re-add path
        self.migrate_supported: Optional[bool] = None

    def close(self) -> None:
        self._chan.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, msg, msg_type: int, flags: int, operation: str, target: str = "",
                 **err_context) -> list:
        try:
            return self._chan.request(msg, msg_type, flags)
        except KernelError as e:
            raise from_kernel(e.code, operation, target, e.text, **err_context) from None

    # ------------------------------------------------------------------ SAs

    def add_sa(self, sa: SA) -> None:
        """Install ``sa`` (XFRM_MSG_NEWSA; XFRM_MSG_UPDSA when its SPI came
        from :meth:`allocate_spi`, which filled in the larval SA). Raises
        :class:`XfrmExists` if the SA is there already."""
        self._check_owned_reqid(sa.reqid, sa)
        key = (sa.dst, sa.spi, sa.proto)
        if key in self._larval:
            self._request(sa_to_msg(sa), Msg.UPDSA, _ACK, "add SA", str(sa),
                          proto=sa.proto, algorithms=sa.algorithms.names())
            self._larval.discard(key)
            return
        self._request(sa_to_msg(sa), Msg.NEWSA, _CREATE, "add SA", str(sa),
                      proto=sa.proto, algorithms=sa.algorithms.names())

    def update_sa(self, sa: SA) -> None:
        """XFRM_MSG_UPDSA: change an installed SA in place. The kernel takes
        the lifetimes, the UDP encapsulation ports (same encap type) and the
        selector from ``sa``; addresses and keys cannot change this way."""
        self._check_owned_reqid(sa.reqid, sa)
        self._request(sa_to_msg(sa), Msg.UPDSA, _ACK, "update SA", str(sa),
                      proto=sa.proto, algorithms=sa.algorithms.names())
        self._larval.discard((sa.dst, sa.spi, sa.proto))

    def get_sa(self, sa: Union[SA, SAId]) -> SA:
        """The SA as the kernel has it now: keys, replay state, counters."""
        said = _said(sa)
        replies = self._request(said_to_msg(said), Msg.GETSA, NLM_F_REQUEST,
                                "get SA", str(said))
        for msg in replies:
            if msg["header"]["type"] == Msg.NEWSA:
                return sa_from_msg(msg)
        raise XfrmNotFound(errno.ESRCH, "get SA", str(said))

    def delete_sa(self, sa: Union[SA, SAId], *, missing_ok: bool = False) -> bool:
        """Remove an SA. Returns False when it was not there and ``missing_ok``."""
        said = _said(sa)
        try:
            self._request(said_to_msg(said), Msg.DELSA, _ACK, "delete SA", str(said))
        except XfrmNotFound:
            if missing_ok:
                return False
            raise
        return True

    def sas(self, *, owned_only: bool = False) -> List[SA]:
        """All SAs of the namespace (a dump), or only ours."""
        replies = self._request(m.xfrm_usersa_info(), Msg.GETSA, _DUMP, "dump SAs")
        out = [sa_from_msg(x) for x in replies if x["header"]["type"] == Msg.NEWSA]
        if owned_only:
            out = [sa for sa in out if self.owner and self.owner.owns_sa(sa)]
        return out

    def allocate_spi(self, src: AddressLike, dst: AddressLike, *, reqid: int = 0,
                     proto: int = IPPROTO_ESP, mode: Mode = Mode.TUNNEL,
                     spi_min: int = 0x100, spi_max: int = 0xFFFFFFFF) -> int:
        """XFRM_MSG_ALLOCSPI: the kernel picks an unused SPI for an inbound SA
        ``src -> dst`` and holds a larval SA for it (expiring after a while);
        :meth:`add_sa` of an SA with that SPI then completes it in place."""
        src, dst = ip(src), ip(dst)
        msg = m.xfrm_userspi_info()
        for k, v in m._ADDR_DEFAULTS.items():
            msg[k] = v
        msg["id_daddr"] = pack_addr(dst)
        msg["id_proto"] = proto
        msg["saddr"] = pack_addr(src)
        msg["family"] = family_of(dst)
        msg["reqid"] = reqid
        msg["mode"] = int(mode)
        msg["min"], msg["max"] = spi_min, spi_max
        for k in ("soft_byte_limit", "hard_byte_limit", "soft_packet_limit",
                  "hard_packet_limit"):
            msg[k] = 0xFFFFFFFFFFFFFFFF
        replies = self._request(msg, Msg.ALLOCSPI, NLM_F_REQUEST, "allocate SPI",
                                f"{src}->{dst}", proto=proto)
        for r in replies:
            if r["header"]["type"] == Msg.NEWSA:
                spi = r["id_spi"]
                self._larval.add((dst, spi, proto))
                return spi
        raise XfrmError(errno.EIO, "allocate SPI", f"{src}->{dst}",
                        message="allocate SPI: the kernel sent no SA back")

    # ------------------------------------------------------------- policies

    def _policy_index(self, pol: Policy) -> Policy:
        """Give a policy without index one from the owner's range (see Owner)."""
        if pol.index or self.owner is None or pol.dir > Dir.FWD:
            return pol
        slots = (self.owner.index_max - self.owner.index_min + 1) // 8
        if slots < 1:
            return pol
        nxt = self._index_next[pol.dir]
        if nxt is None:
            nxt = random.randrange(slots)
        self._index_next[pol.dir] = (nxt + 1) % slots
        base = (self.owner.index_min + 7) & ~7
        index = base + nxt * 8 + int(pol.dir)
        if not self.owner.owns_index(index):
            return pol
        return dataclasses.replace(pol, index=index)

    def add_policy(self, pol: Policy) -> None:
        """XFRM_MSG_NEWPOLICY. Raises :class:`XfrmExists` if a policy with the
        same selector, direction, mark and if_id exists."""
        self._check_policy(pol)
        self._request(policy_to_msg(self._policy_index(pol)), Msg.NEWPOLICY, _CREATE,
                      "add policy", str(pol))

    def update_policy(self, pol: Policy) -> None:
        """XFRM_MSG_UPDPOLICY: replace the policy with the same selector,
        direction, mark and if_id (keeping its index), or add it."""
        self._check_policy(pol)
        self._request(policy_to_msg(self._policy_index(pol)), Msg.UPDPOLICY, _ACK,
                      "update policy", str(pol))

    def get_policy(self, pol: Union[Policy, PolicyId]) -> Policy:
        pid = _pid(pol)
        replies = self._request(policy_id_to_msg(pid), Msg.GETPOLICY, NLM_F_REQUEST,
                                "get policy", str(pid))
        for msg in replies:
            if msg["header"]["type"] == Msg.NEWPOLICY:
                return policy_from_msg(msg)
        raise XfrmNotFound(errno.ENOENT, "get policy", str(pid))

    def delete_policy(self, pol: Union[Policy, PolicyId], *,
                      missing_ok: bool = False) -> bool:
        pid = _pid(pol)
        try:
            self._request(policy_id_to_msg(pid), Msg.DELPOLICY, _ACK, "delete policy",
                          str(pid))
        except XfrmNotFound:
            if missing_ok:
                return False
            raise
        return True

    def policies(self, *, owned_only: bool = False,
                 include_socket: bool = True) -> List[Policy]:
        """All policies (a dump). Per-socket policies (``Dir.SOCKET_*``) are
        included unless ``include_socket`` is False."""
        replies = self._request(m.xfrm_userpolicy_info(), Msg.GETPOLICY, _DUMP,
                                "dump policies")
        out = [policy_from_msg(x) for x in replies if x["header"]["type"] == Msg.NEWPOLICY]
        if not include_socket or owned_only:
            out = [p for p in out if p.dir <= Dir.FWD]
        if owned_only:
            out = [p for p in out if self.owner and self.owner.owns_policy(p)]
        return out

    # ------------------------------------------------------------ ownership

    def _check_owned_reqid(self, reqid: int, what) -> None:
        if self.owner is not None and not self.owner.owns_reqid(reqid):
            raise ValueError(f"{what}: reqid {reqid:#x} is outside this handle's range "
                             f"[{self.owner.reqid_min:#x}, {self.owner.reqid_max:#x}]; "
                             f"use allocate_reqid() or owner=None")

    def _check_policy(self, pol: Policy) -> None:
        if pol.dir > Dir.FWD:
            raise ValueError(f"{pol}: per-socket policies are set with setsockopt, "
                             f"not over netlink")
        if len(pol.templates) > XFRM_MAX_DEPTH:
            raise ValueError(f"{pol}: at most {XFRM_MAX_DEPTH} templates")
        for t in pol.templates:
            self._check_owned_reqid(t.reqid, pol)

    def allocate_reqid(self) -> int:
        """A reqid from the owner's range that no SA or policy uses and that
        this handle has not handed out before."""
        if self.owner is None:
            raise ValueError("allocate_reqid() needs an owner range")
        used = set(self._reserved_reqids)
        used.update(sa.reqid for sa in self.sas())
        for p in self.policies(include_socket=False):
            used.update(t.reqid for t in p.templates)
        lo, hi = self.owner.reqid_min, self.owner.reqid_max
        for _ in range(64):
            r = random.randint(lo, hi)
            if r not in used:
                break
        else:
            r = next((x for x in range(lo, hi + 1) if x not in used), None)
            if r is None:
                raise XfrmError(errno.ENOSPC, "allocate reqid", "",
                                message="allocate reqid: the owner's reqid range is full")
        self._reserved_reqids.add(r)
        return r

    def flush_owned(self) -> tuple:
        """Delete every policy and SA that :attr:`owner` marks as ours (see
        :class:`xfrm.model.Owner`), and nothing else. Returns
        ``(sas_deleted, policies_deleted)``. Larval states the kernel made for
        an ACQUIRE (SPI 0) cannot be deleted one by one; they expire by
        themselves (or are replaced when the real SA is added)."""
        if self.owner is None:
            raise ValueError("flush_owned() needs an owner")
        npol = nsa = 0
        for p in self.policies(owned_only=True):
            pid = PolicyId(p.selector, p.dir, p.mark, p.if_id, p.index, p.ptype)
            if self.delete_policy(pid, missing_ok=True):
                npol += 1
        for sa in self.sas(owned_only=True):
            if sa.spi == 0:
                continue      # an ACQUIRE's larval state: not addressable, expires by itself
            if self.delete_sa(sa, missing_ok=True):
                nsa += 1
        return nsa, npol

    # -------------------------------------------------------------- bundles

    def install(self, bundle: Bundle) -> None:
        """Add both SAs, then the policies. All or nothing: if any step
        fails (or the task is cancelled), what was added is removed again
        and the error is raised."""
        added: list = []
        try:
            for sa in bundle.sas:
                self.add_sa(sa)
                added.append(sa)
            for pol in bundle.policies:
                self.add_policy(pol)
                added.append(pol)
        except BaseException:
            self._undo(added)
            raise

    def _undo(self, added: list) -> None:
        for obj in reversed(added):
            try:
                if isinstance(obj, SA):
                    self.delete_sa(obj, missing_ok=True)
                else:
                    self.delete_policy(obj, missing_ok=True)
            except Exception as e:           # keep undoing the rest
                log.warning("rollback: could not remove %s: %s", obj, e)

    def remove(self, bundle: Bundle) -> None:
        """Delete the policies, then the SAs of ``bundle``; what is already
        gone is skipped. Every item is tried; the first error is raised."""
        first = None
        for obj in list(bundle.policies) + list(bundle.sas):
            try:
                if isinstance(obj, SA):
                    self.delete_sa(obj, missing_ok=True)
                else:
                    self.delete_policy(obj, missing_ok=True)
            except XfrmError as e:
                first = first or e
        if first is not None:
            raise first

    def migrate(self, bundle: Bundle, *, local: AddressLike, remote: AddressLike,
                encap_ports=_KEEP) -> Bundle:
        """Move an installed tunnel-mode ``bundle`` to new outer addresses.

        ``encap_ports`` is ``(local_port, remote_port)`` for ESP-in-UDP after
        the move, None for plain ESP, or left out to keep what the SAs have.
        Replay state (sequence numbers, window) and lifetime counters carry
        over. Uses XFRM_MSG_MIGRATE where the kernel has it and it can express
        the change; otherwise reads, re-adds and deletes the SAs and updates
        the policies. Returns the bundle as now installed.
        """
        local, remote = ip(local), ip(remote)
        for sa in bundle.sas:
            if sa.mode != Mode.TUNNEL:
                raise ValueError(f"{sa}: only tunnel-mode SAs can change addresses")
        if local.version != remote.version:
            raise ValueError(f"new addresses of different families: {local}, {remote}")
        old_l, old_r = bundle.local, bundle.remote
        if encap_ports is _KEEP:
            enc_out, enc_in = bundle.outbound.encap, bundle.inbound.encap
        elif encap_ports is None:
            enc_out = enc_in = None
        else:
            lport, rport = encap_ports
            enc_out, enc_in = Encap(lport, rport), Encap(rport, lport)
        mapping = {old_l: local, old_r: remote}
        clean = dict(replay=None, counters=None, stats=None)
        new = Bundle(
            dataclasses.replace(bundle.outbound, src=local, dst=remote, encap=enc_out, **clean),
            dataclasses.replace(bundle.inbound, src=remote, dst=local, encap=enc_in, **clean),
            tuple(dataclasses.replace(p, templates=tuple(_move_template(t, mapping)
                                                         for t in p.templates))
                  for p in bundle.policies))
        if (local, remote) == (old_l, old_r):
            if _same_encap(enc_out, bundle.outbound.encap) and \
                    _same_encap(enc_in, bundle.inbound.encap):
                return new
            self._change_encap_in_place(bundle, new)
            return new
        if self.migrate_supported is not False:
            try:
                self._migrate_kernel(bundle, new)
                self.migrate_supported = True
                return new
            except MigrateUnsupported:
                self.migrate_supported = False
        self._migrate_readd(bundle, new)
        return new

    def _change_encap_in_place(self, old: Bundle, new: Bundle) -> None:
        for o, n in zip(old.sas, new.sas):
            if _same_encap(o.encap, n.encap):
                continue
            cur = self.get_sa(o)
            if cur.encap is not None and n.encap is not None and cur.encap.type == n.encap.type:
                # the kernel updates encap ports of a live SA in place
                self.update_sa(dataclasses.replace(cur, encap=n.encap, stats=None))
            else:
                self._readd_same_key(cur, dataclasses.replace(cur, encap=n.encap,
                                                              stats=None))

    def _migrate_msg(self, old_p: Policy, new_p: Policy, encap: Optional[Encap]):
        msg = policy_id_to_msg(PolicyId(old_p.selector, old_p.dir, None, old_p.if_id, 0,
                                        old_p.ptype))
        entries = []
        for ot, nt in zip(old_p.templates, new_p.templates):
            if ot.mode != Mode.TUNNEL or (ot.src, ot.dst) == (nt.src, nt.dst):
                continue
            entries.append({
                "old_daddr": pack_addr(ot.dst), "old_saddr": pack_addr(ot.src),
                "new_daddr": pack_addr(nt.dst), "new_saddr": pack_addr(nt.src),
                "proto": ot.proto, "mode": int(ot.mode), "reqid": ot.reqid,
                "old_family": family_of(ot.src), "new_family": family_of(nt.src)})
        if not entries:
            return None
        attrs = [a for a in msg["attrs"] if a[0] != "XFRMA_MARK"]
        attrs.append(("XFRMA_MIGRATE", entries))
        if encap is not None:
            attrs.append(encap_attr(encap))
        msg["attrs"] = attrs
        return msg

    def _migrate_kernel(self, old: Bundle, new: Bundle) -> None:
        done = []
        try:
            for op, np_ in zip(old.policies, new.policies):
                enc = new.outbound.encap if op.dir == Dir.OUT else new.inbound.encap
                msg = self._migrate_msg(op, np_, enc)
                if msg is None:
                    continue
                self._request(msg, Msg.MIGRATE, _ACK, "migrate", str(op))
                done.append((op, np_))
        except XfrmError as e:
            if done:
                log.warning("migrate failed after %d of %d policies (%s); moving back",
                            len(done), len(old.policies), e)
                for op, np_ in reversed(done):
                    back_enc = old.outbound.encap if op.dir == Dir.OUT else old.inbound.encap
                    try:
                        self._request(self._migrate_msg(np_, op, back_enc), Msg.MIGRATE,
                                      _ACK, "migrate back", str(op))
                    except XfrmError as e2:
                        log.warning("rollback of migrate %s failed: %s", op, e2)
            raise
        # The kernel moved the SAs its policies' templates reference. Check
        # both: an SA no policy covers stayed put, and a kernel that cannot
        # drop UDP encapsulation in MIGRATE (before 6.x) kept it. An SA a
        # template covers that keeps or gains its encapsulation needs no
        # look (two netlink round trips less on every MOBIKE move).
        for o, n in zip(old.sas, new.sas):
            if _covered(o, old.policies) and not (o.encap is not None and n.encap is None):
                continue
            try:
                cur = self.get_sa(n)
            except XfrmNotFound:
                cur = None
            if cur is not None and cur.src == n.src and _same_encap(cur.encap, n.encap):
                continue
            if cur is not None and cur.src == n.src:
                log.debug("MIGRATE kept the encapsulation of %s; re-adding it", cur)
                self._readd_same_key(cur, dataclasses.replace(cur, encap=n.encap,
                                                              stats=None))
            else:
                log.debug("MIGRATE did not move %s (no policy template covers it); "
                          "re-adding it", o)
                cur = self.get_sa(o)
                moved = dataclasses.replace(cur, src=n.src, dst=n.dst, encap=n.encap,
                                            stats=None)
                if (moved.dst, moved.spi) == (cur.dst, cur.spi):
                    self._readd_same_key(cur, moved)
                else:
                    self.add_sa(moved)
                    self.delete_sa(cur, missing_ok=True)

    def _readd_same_key(self, cur: SA, moved: SA) -> None:
        """Replace an SA by one with the same (dst, SPI, proto) key."""
        self.delete_sa(cur)
        try:
            self.add_sa(moved)
        except BaseException:
            try:
                self.add_sa(dataclasses.replace(cur, stats=None))
            except Exception as e:
                log.error("could not restore %s after a failed move: %s", cur, e)
            raise

    def _migrate_readd(self, old: Bundle, new: Bundle) -> None:
        """Move without MIGRATE: read each SA (with replay state and counters),
        add it at the new addresses, re-point the policies, drop the old SAs."""
        current = [self.get_sa(o) for o in old.sas]
        added, replaced, to_delete, updated = [], [], [], []
        try:
            for cur, n in zip(current, new.sas):
                moved = dataclasses.replace(cur, src=n.src, dst=n.dst, encap=n.encap,
                                            stats=None)
                if (moved.dst, moved.spi, moved.proto) == (cur.dst, cur.spi, cur.proto):
                    self._readd_same_key(cur, moved)
                    replaced.append((cur, moved))
                else:
                    self.add_sa(moved)
                    added.append(moved)
                    to_delete.append(cur)
            for op, np_ in zip(old.policies, new.policies):
                if op.templates != np_.templates:
                    self.update_policy(np_)
                    updated.append(op)
        except BaseException:
            for op in reversed(updated):
                try:
                    self.update_policy(op)
                except Exception as e:
                    log.warning("rollback: could not restore %s: %s", op, e)
            self._undo(added)
            for cur, moved in reversed(replaced):
                try:
                    self._readd_same_key(moved, dataclasses.replace(cur, stats=None))
                except Exception as e:
                    log.warning("rollback: could not restore %s: %s", cur, e)
            raise
        for cur in to_delete:
            self.delete_sa(cur, missing_ok=True)


class AsyncXfrm:
    """The :class:`Xfrm` operations as coroutines (``async with
    AsyncXfrm(netns) as x: await x.install(bundle)``). Requests complete
    inside the call, so the coroutines never suspend; the underlying
    :class:`Xfrm` is :attr:`sync`."""

    def __init__(self, netns: Optional[str] = None, *, owner: Optional[Owner] = DEFAULT_OWNER):
        self._netns, self._owner = netns, owner
        self.sync: Optional[Xfrm] = None

    async def open(self) -> "AsyncXfrm":
        if self.sync is None:
            self.sync = Xfrm(self._netns, owner=self._owner)
        return self

    async def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
            self.sync = None

    async def __aenter__(self):
        return await self.open()

    async def __aexit__(self, *exc):
        await self.close()

    @property
    def netns(self):
        return self._netns

    @property
    def owner(self):
        return self._owner

    @property
    def migrate_supported(self):
        return self.sync.migrate_supported if self.sync else None

    @migrate_supported.setter
    def migrate_supported(self, value):
        self.sync.migrate_supported = value


def _covered(sa, policies) -> bool:
    """Does a tunnel template of ``policies`` name ``sa`` (MIGRATE moves it then)?"""
    return any(t.mode == Mode.TUNNEL and t.proto == sa.proto and t.reqid in (0, sa.reqid)
               and (ip(t.src), ip(t.dst)) == (ip(sa.src), ip(sa.dst))
               for p in policies for t in p.templates)


def _async(name):
    fn = getattr(Xfrm, name)

    @functools.wraps(fn)
    async def method(self, *args, **kwargs):
        if self.sync is None:
            await self.open()
        return getattr(self.sync, name)(*args, **kwargs)
    return method


for _name in ("add_sa", "update_sa", "get_sa", "delete_sa", "sas", "allocate_spi",
              "add_policy", "update_policy", "get_policy", "delete_policy", "policies",
              "allocate_reqid", "flush_owned", "install", "remove", "migrate"):
    setattr(AsyncXfrm, _name, _async(_name))
del _name
