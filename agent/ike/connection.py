"""The IKEv2 initiator as a sans-I/O state machine (aioquic's QuicConnection
is the model): datagrams and timer ticks in, datagrams, a timer and events
out; time is always passed in.

    conn = IkeConnection(config, local_addr=("192.0.2.50", 500), remote_addr=("192.0.2.1", 500))
    conn.connect(now)
    loop:
        for data, local, remote in conn.datagrams_to_send(now): send
        wait for a datagram or conn.get_timer()
        conn.receive_datagram(data, src, dst, now) / conn.handle_timer(now)
        while (ev := conn.next_event()): ...

Structure: our requests go through a window-1 queue (`_enqueue` -> `_kick`
-> `_send_request`), each with a response handler and a timeout handler, and
are retransmitted with back-off on the current `path` (or on a request's own
path); peer requests are dispatched by exchange type (`_request_handlers`)
and their responses cached for retransmitted requests. Anything that fails a
check (SPIs, flags, message ID, integrity, syntax) is counted in `stats`,
logged once per kind and dropped without touching the state.

Beyond the initial exchanges (issue #11):
- MOBIKE (RFC 4555) as original initiator: `update_addresses(new_local)`
  moves `path` at once (MobikeStarted: the driver moves ESP with it) and sends
  UPDATE_SA_ADDRESSES from the new address on port 4500 with fresh NAT-D,
  COOKIE2 (a mismatch closes the IKE SA) and NO_ADDITIONAL_ADDRESSES or the
  configured additional addresses; the answer gives the NAT state
  (AddressUpdated: same SPIs, encapsulation on or off). Without an answer
  after `mobike_probe_after` retransmissions the same request probes the
  gateway's other known addresses (its ADDITIONAL_*_ADDRESS list and the
  original address); the first that answers becomes the path and a second
  update with NAT-D for that path follows. NO_NATS_ALLOWED is sent when
  configured and checked in the gateway's requests; UNEXPECTED_NAT_DETECTED
  or a NAT on a path where NATs are not allowed fails the update.
- Liveness: an empty INFORMATIONAL after `dpd_interval` without any message
  from the gateway; no answer closes the IKE SA (IkeFailed, IkeSaDeleted with
  by='timeout') so that the driver can set up a new one.
- Rekeying (CREATE_CHILD_SA) of CHILD SAs and of the IKE SA, ours on timers
  (`child_rekey_time`, `ike_rekey_time`) or on request, and the gateway's:
  ChildSaEstablished(rekey_of=old) then ChildSaDeleted(by='rekey'|'peer')
  for the old one; IkeSaRekeyed. Simultaneous rekeys of the same SA are
  resolved by the lowest nonce (RFC 7296 2.8.1/2.8.2); a rekey of the other
  kind while one runs is answered with TEMPORARY_FAILURE. After an IKE SA
  rekey the old SA lingers (`_retired`) only to answer the gateway's
  requests on it and to see our Delete acknowledged; the role (I flag) of
  the new IKE SA is whoever initiated the rekey.
"""

from __future__ import annotations

import enum
import hmac as _hmac
import ipaddress
import logging
import os
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from cryptography import x509

from .auth import Identity, certreq_hash, identity_in_cert, sign_auth, verify_auth, verify_chain
from .config import CaTrust, CertAuth, IkeConfig, PskAuth
from .const import (
    ERROR_NOTIFY_MAX, NAT_KEEPALIVE, NATT_PORT, NON_ESP_MARKER, AuthMethod, CertEncoding,
    CfgAttr, CfgType, ExchangeType, HashAlgorithm, NotifyType, PayloadType, ProtocolId, notify_name,
)
from .crypto import (
    ChildKeys, DhExchange, IkeKeys, SkCipher, derive_child_keys, derive_ike_keys, derive_rekeyed_ike_keys,
    nat_hash, psk_auth, signed_octets,
)
from .errors import IkeAuthError, IkeCryptoError, IkeDecodeError, IkeIntegrityError, IkeProposalError
from .events import (
    AddressUpdated, AuthFailed, ChildSaDeleted, ChildSaEstablished, ChildSaFailed, EspSa, Event, IkeFailed,
    IkeSaDeleted, IkeSaEstablished, IkeSaRekeyed, LivenessChecked, MobikeFailed, MobikeStarted,
)
from .message import (
    AuthPayload, CertPayload, CertReqPayload, CPAttribute, CPPayload, DeletePayload, IDiPayload,
    IDrPayload, KEPayload, Message, NoncePayload, NotifyPayload, Payload, SAPayload, TrafficSelector,
    TSiPayload, TSrPayload, decode_header, decode_message,
)
from .proposals import (
    EspSuite, IkeSuite, InvalidKeGroup, choose_esp, choose_ike, groups_in, select_esp, select_ike,
)

log = logging.getLogger("agent.ike")

Address = tuple[str, int]


class State(enum.Enum):
    IDLE = "idle"
    IKE_SA_INIT = "ike_sa_init"
    IKE_AUTH = "ike_auth"
    ESTABLISHED = "established"
    DELETING = "deleting"
    CLOSED = "closed"


@dataclass
class Path:
    """Where IKE messages go: our address/port, the gateway's, and whether
    they are NAT-T framed (non-ESP marker; after floating to port 4500)."""

    local: Address
    remote: Address
    natt: bool = False


@dataclass
class _Request:
    exchange: int
    message_id: int
    packet: bytes
    what: str
    on_response: Callable[[Message, list[Payload], Address, Address, float], None]
    on_timeout: Callable[[float], None]
    timeout: float
    deadline: float
    tries: int = 0
    max_tries: int | None = None        # None: config.retransmit_tries
    path: Path | None = None            # None: follow self.path
    spis: tuple[bytes, bytes] = (b"", b"")  # the IKE SA it was sent on
    probe: list | None = None           # gateway addresses still to try (MOBIKE path probing)
    probe_after: int = 0                # retransmissions on the current path before probing
    ctx: dict = field(default_factory=dict)


@dataclass
class ChildSa:
    spi_in: int
    spi_out: int
    suite: EspSuite
    keys: ChildKeys = field(repr=False)
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    tia: ipaddress.IPv4Address | None
    dns: tuple[ipaddress.IPv4Address, ...]
    initiated: bool = True              # we initiated the exchange (keys i2r are ours to send)
    created: float = 0.0
    rekey_at: float | None = None
    rekeying: bool = False              # our rekey of it is queued or running
    closing: bool = False               # our Delete of it is queued or running

    @property
    def child_id(self) -> int:
        return self.spi_in

    @property
    def keys_out(self) -> tuple[bytes, bytes]:
        k = self.keys
        return (k.encr_i2r, k.integ_i2r) if self.initiated else (k.encr_r2i, k.integ_r2i)

    @property
    def keys_in(self) -> tuple[bytes, bytes]:
        k = self.keys
        return (k.encr_r2i, k.integ_r2i) if self.initiated else (k.encr_i2r, k.integ_i2r)


@dataclass
class _OldSa:
    """An IKE SA replaced by a rekey: it only answers the gateway's requests
    (a Delete, typically) and waits for the answer to our Delete."""

    spi_i: bytes
    spi_r: bytes
    initiator: bool
    sk: SkCipher
    next_mid: int
    peer_mid: int
    last_peer_request: bytes | None
    last_response: tuple | None
    expires: float
    delete_packet: bytes | None = None
    delete_mid: int = -1
    deadline: float | None = None
    tries: int = 0


_CHILD_ERRORS = {
    NotifyType.NO_PROPOSAL_CHOSEN, NotifyType.TS_UNACCEPTABLE, NotifyType.SINGLE_PAIR_REQUIRED,
    NotifyType.INTERNAL_ADDRESS_FAILURE, NotifyType.FAILED_CP_REQUIRED, NotifyType.INVALID_SELECTORS,
    NotifyType.NO_ADDITIONAL_SAS, NotifyType.TEMPORARY_FAILURE,
}
_SIG_HASHES = (HashAlgorithm.SHA2_256, HashAlgorithm.SHA2_384, HashAlgorithm.SHA2_512)


class IkeConnection:
    """One IKE SA (and its CHILD SAs) as the original initiator."""

    def __init__(self, config: IkeConfig, local_addr: Address, remote_addr: Address, *,
                 natt_port: int = NATT_PORT, rng: Callable[[int], bytes] = os.urandom,
                 name: str = "ike"):
        if ipaddress.ip_address(local_addr[0]).is_unspecified:
            raise ValueError("local_addr must be a concrete address (it goes into NAT detection)")
        self.config = config
        self.name = name
        self._rng = rng
        self._natt_port = natt_port
        self.path = Path(tuple(local_addr), tuple(remote_addr))
        self.original_remote = tuple(remote_addr)
        self.state = State.IDLE
        self.initiator = True          # our role in the current IKE SA (the I flag we set)
        self.spi_i = self._new_spi()
        self.spi_r = bytes(8)
        self.keys: IkeKeys | None = None
        self.suite: IkeSuite | None = None
        self.nat_local = False
        self.nat_remote = False
        self.mobike = False
        self.peer_addresses: list[str] = []
        self.children: dict[int, ChildSa] = {}
        self.stats: dict[str, int] = {}
        self._logged: set[str] = set()
        self._events: deque[Event] = deque()
        self._outbox: list[tuple[bytes, Address, Address]] = []
        self._sk: SkCipher | None = None
        # our requests
        self._next_mid = 0
        self._active: _Request | None = None
        self._pending: deque[Callable[[float], None]] = deque()
        # peer requests: next expected message ID, cached last (request, response)
        self._peer_mid = 0
        self._last_peer_request: bytes | None = None
        self._last_response: tuple[bytes, Address, Address] | None = None
        self._request_handlers = {
            ExchangeType.INFORMATIONAL: self._peer_informational,
            ExchangeType.CREATE_CHILD_SA: self._peer_create_child_sa,
        }
        # IKE_SA_INIT state
        self._ike_offer = [p.to_wire(i + 1) for i, p in enumerate(config.ike_proposals)]
        self._groups = groups_in(config.ike_proposals)
        self._dh: DhExchange | None = None
        self._ni = b""
        self._nr = b""
        self._cookie: bytes | None = None
        self._init_refusal: tuple[str, int | None, float] | None = None   # (reason, notify, give up at) of
                                                                          # an unusable unprotected answer
        self._cookie_rounds = 0
        self._ke_retries = 0
        self._init_request = b""
        self._init_response = b""
        self._peer_hashes: set[int] = set()
        self._natd_supported = False
        # IKE_AUTH state
        self._child_spi = 0
        self._esp_offer: list = []
        self._auth_desc = ""
        self._last_sent = 0.0
        self._next_keepalive: float | None = None
        # liveness, rekeying, MOBIKE
        self.established_at: float | None = None
        self.last_received: float | None = None     # last authenticated message from the gateway
        self.last_update: float | None = None       # last completed MOBIKE update
        self._ike_rekey_at: float | None = None
        self._ike_rekeying = False
        self._peer_ike_rekey: dict | None = None    # the gateway's IKE rekey answered during ours
        self._retired: dict[tuple[bytes, bytes], _OldSa] = {}
        self._mobike_state = "idle"                 # idle | queued | active
        self._mobike_again = False
        self._mobike_started: float | None = None
        self._cookie2 = b""
        self._peer_no_nats = False

    # ------------------------------------------------------------------ public API

    def connect(self, now: float) -> None:
        """Start IKE_SA_INIT."""
        if self.state is not State.IDLE:
            raise RuntimeError(f"connect() in state {self.state.value}")
        self.state = State.IKE_SA_INIT
        self._dh = DhExchange(self._groups[0])
        self._ni = self._rng(self.config.nonce_len)
        log.info("%s: initiating IKE_SA %s_i to %s:%d (KE group %d)", self.name, self.spi_i.hex(),
                 self.path.remote[0], self.path.remote[1], self._dh.group)
        self._send_init(now)

    def delete(self, now: float) -> None:
        """Delete the IKE SA (and with it every CHILD SA)."""
        if self.state in (State.CLOSED, State.DELETING):
            return
        if self.state in (State.IDLE, State.IKE_SA_INIT, State.IKE_AUTH):
            if self.state is State.IKE_AUTH:
                # the gateway may already hold the IKE SA: tell it, without waiting
                self._send_unacknowledged(ExchangeType.INFORMATIONAL, [DeletePayload(ProtocolId.IKE)])
            self._close(now, "local", "connection attempt aborted")
            return
        self.state = State.DELETING
        self._pending.clear()
        self._enqueue(self._start_delete_ike, now)

    def abort(self, now: float, notify: bool = True) -> None:
        """Forget the IKE SA at once: a Delete goes out unacknowledged (when
        ``notify`` and the gateway may hold the SA), then everything closes
        locally (ChildSaDeleted / IkeSaDeleted events, by='local')."""
        if self.state is State.CLOSED:
            return
        if self.state in (State.IDLE, State.IKE_SA_INIT, State.IKE_AUTH):
            self.delete(now)
            return
        if notify:
            self._send_unacknowledged(ExchangeType.INFORMATIONAL, [DeletePayload(ProtocolId.IKE)])
        self._close(now, "local", "aborted")

    def delete_child(self, child_id: int, now: float) -> None:
        """Delete one CHILD SA (by its ``child_id``, our inbound SPI)."""
        if self.state is not State.ESTABLISHED or child_id not in self.children:
            raise KeyError(f"no CHILD SA {child_id:08x}")
        self.children[child_id].closing = True
        self._enqueue(lambda t: self._start_delete_child(child_id, t), now)

    def update_addresses(self, new_local: Address, now: float) -> None:
        """MOBIKE (RFC 4555): our address changed to ``new_local`` (the port
        is ignored: MOBIKE runs on the NAT-T port). IKE leaves from there at
        once (MobikeStarted); UPDATE_SA_ADDRESSES follows ahead of any other
        queued request; AddressUpdated or MobikeFailed tells the outcome."""
        if self.state is not State.ESTABLISHED:
            raise RuntimeError(f"update_addresses() in state {self.state.value}")
        if not self.mobike:
            raise RuntimeError("MOBIKE was not negotiated with the gateway")
        ip = ipaddress.ip_address(new_local[0])
        if ip.is_unspecified:
            raise ValueError("new_local must be a concrete address")
        old = self.path.local
        self.path = Path((str(ip), self._natt_port), (self.path.remote[0], NATT_PORT), True)
        self._mobike_started = now
        self._emit(MobikeStarted(now, old, self.path.local, self.path.remote))
        log.info("%s: local address %s -> %s, updating the gateway (MOBIKE)", self.name, old[0], ip)
        req = self._active
        if req is not None and req.path is None:
            # whatever is in flight leaves from the new address now, not at its next timeout
            req.tries, req.timeout = 0, self.config.retransmit_timeout
            req.deadline = now + req.timeout
            self._transmit(req.packet, self.path)
        if self._mobike_state == "idle":
            self._mobike_state = "queued"
            self._pending.appendleft(self._start_update)
            self._kick(now)
        elif self._mobike_state == "active":
            self._mobike_again = True

    def liveness_check(self, now: float) -> None:
        """Send a liveness check (DPD) now, unless a request is in flight anyway."""
        if self.state is State.ESTABLISHED and self._active is None and not self._pending:
            self._enqueue(self._start_dpd, now)

    def rekey_child(self, child_id: int, now: float) -> None:
        """Rekey one CHILD SA now (CREATE_CHILD_SA with REKEY_SA)."""
        child = self.children.get(child_id)
        if self.state is not State.ESTABLISHED or child is None:
            raise KeyError(f"no CHILD SA {child_id:08x}")
        if not child.rekeying and not child.closing:
            child.rekeying = True
            self._enqueue(lambda t: self._start_rekey_child(child_id, t), now)

    def rekey_ike(self, now: float) -> None:
        """Rekey the IKE SA now."""
        if self.state is not State.ESTABLISHED:
            raise RuntimeError(f"rekey_ike() in state {self.state.value}")
        if not self._ike_rekeying:
            self._ike_rekeying = True
            self._enqueue(self._start_rekey_ike, now)

    def note_traffic(self, now: float) -> None:
        """The driver saw protected traffic from the gateway: counts as liveness."""
        if self.state is State.ESTABLISHED:
            self.last_received = max(self.last_received or now, now)

    def receive_datagram(self, data: bytes, addr: Address, local: Address, now: float) -> None:
        """A UDP datagram arrived from ``addr`` on our ``local`` address."""
        if self.state is State.CLOSED:
            self._drop("closed", "datagram after the IKE SA was closed")
            return
        data = bytes(data)
        if local[1] == self._natt_port:
            if data == NAT_KEEPALIVE:
                self._count("keepalives_received")
                return
            if len(data) < 4 or data[:4] != NON_ESP_MARKER:
                self._drop("esp_on_ike_socket", "ESP packet (no non-ESP marker) on the IKE socket")
                return
            data = data[4:]
        try:
            hdr = decode_header(data)
        except IkeDecodeError as e:
            self._drop("malformed", f"undecodable header from {addr[0]}:{addr[1]}: {e}")
            return
        if not _hmac.compare_digest(hdr.spi_i, self.spi_i):
            old = self._retired.get((hdr.spi_i, hdr.spi_r))
            if old is not None:
                self._handle_retired(old, hdr, data, tuple(addr), tuple(local), now)
                return
            self._drop("unknown_spi", f"message for unknown initiator SPI {hdr.spi_i.hex()}")
            return
        if hdr.response:
            self._handle_response(hdr, data, tuple(addr), tuple(local), now)
        else:
            self._handle_request(hdr, data, tuple(addr), tuple(local), now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address, Address]]:
        """(data, local address, remote address) to send; clears the queue."""
        out, self._outbox = self._outbox, []
        if out:
            self._last_sent = now
        return out

    def get_timer(self) -> float | None:
        """When handle_timer() must be called next (None: no timer)."""
        times = []
        if self._active is not None:
            times.append(self._active.deadline)
        if self._init_refusal is not None and self.state is State.IKE_SA_INIT:
            times.append(self._init_refusal[2])
        if self.state is State.ESTABLISHED:
            if self._next_keepalive is not None:
                times.append(self._next_keepalive)
            for t in (self._dpd_due(), self._ike_rekey_due()):
                if t is not None:
                    times.append(t)
            times += [c.rekey_at for c in self.children.values()
                      if c.rekey_at is not None and not c.rekeying and not c.closing]
        for old in self._retired.values():
            times.append(old.deadline if old.deadline is not None else old.expires)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self._init_refusal is not None and self.state is State.IKE_SA_INIT and now >= self._init_refusal[2]:
            self._active = None
            self._fail_refused(now)
            return
        req = self._active
        if req is not None and now >= req.deadline:
            max_tries = self.config.retransmit_tries if req.max_tries is None else req.max_tries
            if req.tries < max_tries:
                req.tries += 1
                req.timeout = min(req.timeout * self.config.retransmit_base,
                                  self.config.retransmit_max_timeout)
                req.deadline = now + req.timeout
                self._count("retransmits")
                path = req.path
                if req.probe is not None and req.tries > req.probe_after and req.probe:
                    # MOBIKE path probing: the same request to the gateway's other addresses
                    cand = req.probe.pop(0)
                    req.probe.append(cand)
                    path = Path(self.path.local, (cand, NATT_PORT), True)
                    req.timeout = min(req.timeout, max(self.config.probe_timeout, 0.05))
                    req.deadline = now + req.timeout
                    self._count("path_probes")
                    log.info("%s: no answer on %s, probing gateway address %s", self.name,
                             self.path.remote[0], cand)
                else:
                    log.info("%s: retransmit %d of %s request %d", self.name, req.tries, req.what,
                             req.message_id)
                self._transmit(req.packet, path or self.path)
            else:
                self._active = None
                log.warning("%s: no response to %s request %d after %d retransmits", self.name,
                            req.what, req.message_id, req.tries)
                req.on_timeout(now)
                self._kick(now)
        if (self._next_keepalive is not None and now >= self._next_keepalive
                and self.state is State.ESTABLISHED):
            if self.path.natt and self.nat_local:
                self._outbox.append((NAT_KEEPALIVE, self.path.local, self.path.remote))
                self._count("keepalives_sent")
            self._next_keepalive = now + self.config.keepalive_interval
        if self.state is State.ESTABLISHED:
            due = self._ike_rekey_due()
            if due is not None and now >= due:
                self._ike_rekeying = True
                self._enqueue(self._start_rekey_ike, now)
            for child in list(self.children.values()):
                if (child.rekey_at is not None and now >= child.rekey_at and not child.rekeying
                        and not child.closing and self.state is State.ESTABLISHED):
                    child.rekeying = True
                    cid = child.child_id
                    self._enqueue(lambda t, cid=cid: self._start_rekey_child(cid, t), now)
            due = self._dpd_due()
            if due is not None and now >= due:
                self._enqueue(self._start_dpd, now)
        for key, old in list(self._retired.items()):
            if old.deadline is not None and now >= old.deadline:
                if old.tries < 2:
                    old.tries += 1
                    old.deadline = now + self.config.retransmit_timeout * (2 ** old.tries)
                    self._outbox.append((self._frame(old.delete_packet), self.path.local, self.path.remote))
                else:
                    old.deadline = None
            if old.deadline is None and now >= old.expires:
                del self._retired[key]

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def established(self) -> bool:
        return self.state is State.ESTABLISHED

    def tshark_decryption_entry(self) -> str | None:
        """This IKE SA's line for tshark's ikev2_decryption_table (secret!)."""
        from .keylog import tshark_ikev2_line
        return tshark_ikev2_line(self.keys) if self.keys is not None else None

    # ------------------------------------------------------------------ helpers

    def _new_spi(self) -> bytes:
        while True:
            s = self._rng(8)
            if any(s):
                return s

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def _drop(self, key: str, detail: str) -> None:
        self._count(key)
        self._count("dropped")
        if key not in self._logged:
            self._logged.add(key)
            log.warning("%s: dropped: %s (further drops of this kind are only counted)", self.name, detail)
        else:
            log.debug("%s: dropped: %s", self.name, detail)

    def _emit(self, ev: Event) -> None:
        log.info("%s: event %s", self.name, ev)
        self._events.append(ev)

    def _transmit(self, packet: bytes, path: Path, remote: Address | None = None) -> None:
        data = NON_ESP_MARKER + packet if path.natt else packet
        self._outbox.append((data, path.local, remote or path.remote))

    def _frame(self, packet: bytes) -> bytes:
        return NON_ESP_MARKER + packet if self.path.natt else packet

    def _enqueue(self, starter: Callable[[float], None], now: float) -> None:
        self._pending.append(starter)
        self._kick(now)

    def _kick(self, now: float) -> None:
        while self._active is None and self._pending and self.state is not State.CLOSED:
            self._pending.popleft()(now)

    def _send_request(self, exchange: int, inner: list[Payload], what: str, now: float,
                      on_response, on_timeout, **kw) -> _Request:
        """Seal and send a request on the current IKE SA. ``on_response``
        may return False to reject an (authenticated) answer: the request
        then stays outstanding."""
        mid = self._next_mid
        self._next_mid += 1
        msg = Message(self.spi_i, self.spi_r, exchange, mid, initiator=self.initiator)
        packet = self._sk.seal(msg, inner)
        return self._start(exchange, mid, packet, what, now, on_response, on_timeout, **kw)

    def _start(self, exchange, mid, packet, what, now, on_response, on_timeout, *, path: Path | None = None,
               **kw) -> _Request:
        t = self.config.retransmit_timeout
        self._active = _Request(exchange, mid, packet, what, on_response, on_timeout, t, now + t, path=path,
                                spis=(self.spi_i, self.spi_r), **kw)
        self._transmit(packet, path or self.path)
        return self._active

    def _send_unacknowledged(self, exchange: int, inner: list[Payload]) -> None:
        """A request we send once and do not wait for (before closing)."""
        mid = self._next_mid
        self._next_mid += 1
        self._transmit(self._sk.seal(Message(self.spi_i, self.spi_r, exchange, mid, initiator=self.initiator),
                                     inner), self.path)

    def _close(self, now: float, by: str, reason: str) -> None:
        """Tear down locally: every child and the IKE SA (events), no messages."""
        if self.state is State.CLOSED:
            return
        was_established = self.state in (State.ESTABLISHED, State.DELETING)
        for child in list(self.children.values()):
            self._emit(ChildSaDeleted(now, child.child_id, child.spi_in, child.spi_out, "ike", reason))
        self.children.clear()
        self._active = None
        self._pending.clear()
        self._next_keepalive = None
        self._ike_rekey_at = None
        self._mobike_state = "idle"
        self._retired.clear()
        self.state = State.CLOSED
        if was_established:
            self._emit(IkeSaDeleted(now, self.spi_i, self.spi_r, by, reason))
        log.info("%s: IKE SA %s_i %s_r closed (%s: %s)", self.name, self.spi_i.hex(), self.spi_r.hex(), by, reason)

    def _fail(self, now: float, reason: str, notify: int | None = None) -> None:
        self._emit(IkeFailed(now, reason, notify))
        self._close(now, "error", reason)

    # ------------------------------------------------------------------ receiving

    def _handle_response(self, hdr, data: bytes, addr: Address, local: Address, now: float) -> None:
        req = self._active
        if req is not None and req.exchange != ExchangeType.IKE_SA_INIT and req.spis != (self.spi_i, self.spi_r):
            req = None          # sent on an IKE SA since replaced: its answer comes on the old SA
        if req is None or hdr.message_id != req.message_id or hdr.exchange != req.exchange:
            self._drop("unexpected_response",
                       f"response with message ID {hdr.message_id} (exchange {hdr.exchange}) matches no "
                       "outstanding request (late retransmission or replay)")
            return
        if hdr.initiator == self.initiator:
            self._drop("bad_flags", "response with our own initiator flag")
            return
        if req.exchange != ExchangeType.IKE_SA_INIT and not _hmac.compare_digest(hdr.spi_r, self.spi_r):
            self._drop("unknown_spi", f"response for unknown responder SPI {hdr.spi_r.hex()}")
            return
        try:
            msg = decode_message(data)
        except IkeDecodeError as e:
            self._drop("malformed", f"undecodable {ExchangeType(hdr.exchange).name} response: {e}")
            return
        if req.exchange == ExchangeType.IKE_SA_INIT:
            inner = msg.payloads
        else:
            inner = self._open(msg)
            if inner is None:
                return
            self.last_received = now
        self._active = None
        if req.on_response(msg, inner, addr, local, now) is False:
            if self._active is None and self.state is not State.CLOSED:
                self._active = req          # rejected: keep waiting (and retransmitting)
            return
        self._kick(now)

    def _open(self, msg: Message) -> list[Payload] | None:
        if msg.sk is None:
            self._drop("unprotected", f"{_xname(msg.exchange)} message without SK payload")
            return None
        try:
            return self._sk.open(msg)
        except IkeIntegrityError as e:
            self._drop("integrity", f"{_xname(msg.exchange)} message {msg.message_id} failed integrity: {e}")
        except IkeDecodeError as e:
            self._drop("malformed", f"authenticated {_xname(msg.exchange)} message {msg.message_id} "
                                    f"does not parse: {e}")
        return None

    def _handle_request(self, hdr, data: bytes, addr: Address, local: Address, now: float) -> None:
        if self.state not in (State.ESTABLISHED, State.DELETING) or self._sk is None:
            self._drop("unexpected_request", "request from the gateway before the IKE SA is up")
            return
        if hdr.initiator == self.initiator:
            self._drop("bad_flags", "request with our own initiator flag")
            return
        if not _hmac.compare_digest(hdr.spi_r, self.spi_r):
            self._drop("unknown_spi", f"request for unknown responder SPI {hdr.spi_r.hex()}")
            return
        if hdr.message_id != self._peer_mid:
            if (hdr.message_id == self._peer_mid - 1 and self._last_response is not None
                    and self._last_peer_request == data):
                self._count("retransmitted_requests")
                resp, lcl, _ = self._last_response
                self._outbox.append((resp, lcl, addr))
                return
            self._drop("unexpected_request_id",
                       f"request with message ID {hdr.message_id}, expected {self._peer_mid}")
            return
        try:
            msg = decode_message(data)
        except IkeDecodeError as e:
            self._drop("malformed", f"undecodable request: {e}")
            return
        if msg.sk is None:
            self._drop("unprotected", f"{_xname(msg.exchange)} request without SK payload")
            return
        try:
            inner = self._sk.open(msg)
        except IkeIntegrityError as e:
            self._drop("integrity", f"request {msg.message_id} failed integrity: {e}")
            return
        except IkeDecodeError as e:
            # authenticated but unparsable: answer with the error (RFC 7296 2.21.2)
            self.last_received = now
            self._respond(msg, [NotifyPayload(e.notify, e.notify_data)], addr, local, data)
            return
        self.last_received = now
        handler = self._request_handlers.get(msg.exchange)
        if handler is None:
            self._drop("unexpected_request", f"{_xname(msg.exchange)} request from the gateway")
            return
        handler(msg, inner, addr, local, data, now)

    def _respond(self, req: Message, inner: list[Payload], addr: Address, local: Address,
                 raw_request: bytes) -> None:
        resp = Message(self.spi_i, self.spi_r, req.exchange, req.message_id, initiator=self.initiator,
                       response=True)
        packet = self._sk.seal(resp, inner)
        data = NON_ESP_MARKER + packet if local[1] == self._natt_port else packet
        self._outbox.append((data, local, addr))
        self._peer_mid = req.message_id + 1
        self._last_peer_request = raw_request
        self._last_response = (data, local, addr)

    # ------------------------------------------------------------------ IKE_SA_INIT

    def _send_init(self, now: float) -> None:
        self._init_refusal = None
        zero = bytes(8)
        payloads: list[Payload] = []
        if self._cookie is not None:
            payloads.append(NotifyPayload(NotifyType.COOKIE, self._cookie))
        payloads += [
            SAPayload(self._ike_offer),
            KEPayload(self._dh.group, self._dh.public),
            NoncePayload(self._ni),
            *self._nat_detection_payloads(self.path, zero),
            NotifyPayload(NotifyType.SIGNATURE_HASH_ALGORITHMS,
                          b"".join(struct.pack("!H", h) for h in _SIG_HASHES)),
        ]
        packet = Message(self.spi_i, zero, ExchangeType.IKE_SA_INIT, 0, payloads, initiator=True).encode()
        self._init_request = packet
        self._next_mid = 1
        self._start(ExchangeType.IKE_SA_INIT, 0, packet, "IKE_SA_INIT", now,
                    self._on_init_response, self._on_init_timeout)

    def _on_init_timeout(self, now: float) -> None:
        if self._init_refusal is not None:
            self._fail_refused(now)
            return
        self._fail(now, "no response to IKE_SA_INIT (gateway unreachable?)")

    def _fail_refused(self, now: float) -> None:
        reason, notify, _ = self._init_refusal
        self._fail(now, reason, notify)

    def _refuse_init(self, now: float, reason: str, notify: int | None = None) -> bool:
        """An IKE_SA_INIT answer we cannot use (an error notify, a bad COOKIE or INVALID_KE, no
        usable SA/KE/Nonce). Nothing protects it: anyone who saw our request can forge one to
        stop us. The request stays alive (retransmitting) for ``unprotected_error_wait``; a usable
        answer from the gateway still wins, else the first unusable one is the outcome (RFC 7296
        2.21.1 spirit). Returns False (the request stays outstanding)."""
        self._count("unprotected_init_errors")
        if self._init_refusal is None:
            wait = max(0.0, self.config.unprotected_error_wait)
            self._init_refusal = (reason, notify, now + wait)
            log.info("%s: IKE_SA_INIT answer not usable (%s; unauthenticated); waiting %.1f s for another answer",
                     self.name, reason, wait)
        if now >= self._init_refusal[2]:
            self._fail_refused(now)
        return False

    def _on_init_response(self, msg: Message, payloads, addr: Address, local: Address, now: float) -> bool | None:
        cookie = msg.notify(NotifyType.COOKIE)
        if cookie is not None:
            if self._cookie_rounds >= self.config.max_cookie_rounds:
                return self._refuse_init(now, "gateway keeps asking for a COOKIE", NotifyType.COOKIE)
            if not 1 <= len(cookie.data) <= 64:
                return self._refuse_init(now, f"COOKIE of {len(cookie.data)} bytes", NotifyType.COOKIE)
            self._cookie_rounds += 1
            self._count("cookie_rounds")
            self._cookie = cookie.data
            log.info("%s: gateway requested a COOKIE, retrying IKE_SA_INIT", self.name)
            self._send_init(now)
            return
        invke = msg.notify(NotifyType.INVALID_KE_PAYLOAD)
        if invke is not None:
            group = struct.unpack("!H", invke.data[:2])[0] if len(invke.data) >= 2 else None
            if group is None or group not in self._groups or group == self._dh.group:
                return self._refuse_init(now, f"gateway wants DH group {group}, which we did not offer",
                                         NotifyType.INVALID_KE_PAYLOAD)
            if self._ke_retries >= self.config.max_ke_retries:
                return self._refuse_init(now, "too many INVALID_KE_PAYLOAD retries", NotifyType.INVALID_KE_PAYLOAD)
            self._ke_retries += 1
            self._count("invalid_ke_retries")
            log.info("%s: gateway wants DH group %d instead of %d, retrying", self.name, group, self._dh.group)
            self._dh = DhExchange(group)
            self._cookie = None
            self._send_init(now)
            return
        errors = [n for n in msg.get_all(NotifyPayload) if n.notify_type <= ERROR_NOTIFY_MAX]
        if errors:
            n = errors[0].notify_type
            return self._refuse_init(now, f"gateway refused IKE_SA_INIT: {notify_name(n)}", n)
        sa, ke, nr = msg.get(SAPayload), msg.get(KEPayload), msg.get(NoncePayload)
        if sa is None or ke is None or nr is None or not any(msg.spi_r):
            return self._refuse_init(now, "IKE_SA_INIT response lacks SA, KE, Nonce or responder SPI")
        try:
            suite = select_ike(sa, self._ike_offer)
        except IkeProposalError as e:
            return self._refuse_init(now, f"gateway's IKE proposal choice is invalid: {e}",
                                     NotifyType.NO_PROPOSAL_CHOSEN)
        if suite.dh != self._dh.group or ke.group != self._dh.group:
            return self._refuse_init(now, f"gateway chose DH group {suite.dh} with KE of group {ke.group}, "
                                          f"we sent {self._dh.group}")
        try:
            shared = self._dh.shared_secret(ke.data)
        except IkeCryptoError as e:
            return self._refuse_init(now, f"gateway's KE payload: {e}")
        self.spi_r = msg.spi_r
        self._nr = nr.data
        self._init_response = msg.raw
        self.suite = suite
        self.keys = derive_ike_keys(suite, self._ni, self._nr, shared, self.spi_i, self.spi_r)
        self._sk = SkCipher.for_initiator(self.keys)
        self._sk.rng = self._rng
        sh = msg.notify(NotifyType.SIGNATURE_HASH_ALGORITHMS)
        if sh is not None:
            self._peer_hashes = {struct.unpack_from("!H", sh.data, i)[0] for i in range(0, len(sh.data) - 1, 2)}
        nat = self._check_nat_detection(msg.payloads, addr, local)
        if nat is not None:
            self._natd_supported = True
            self.nat_local, self.nat_remote = nat
        if self.config.no_nats_allowed and (self.nat_local or self.nat_remote):
            self._fail(now, "a NAT is on the path to the gateway and no_nats_allowed is set")
            return
        log.info("%s: IKE_SA_INIT done: %s, SPIs %s_i %s_r, NAT here: %s, NAT at gateway: %s",
                 self.name, suite.name, self.spi_i.hex(), self.spi_r.hex(), self.nat_local, self.nat_remote)
        # RFC 7296 2.23 / RFC 4555 3.1: float to 4500 after NAT detection,
        # or right away when we will announce MOBIKE
        if self._natd_supported and (self.nat_local or self.nat_remote or self.config.mobike):
            self.path = Path((self.path.local[0], self._natt_port), (self.path.remote[0], NATT_PORT), True)
        self.state = State.IKE_AUTH
        self._send_auth(now)

    # ------------------------------------------------------------------ NAT detection

    def _nat_detection_payloads(self, path: Path, spi_r: bytes | None = None) -> list[NotifyPayload]:
        """NAT_DETECTION_SOURCE/DESTINATION_IP for a message sent on ``path``
        (also what a MOBIKE UPDATE_SA_ADDRESSES request carries)."""
        spi_r = self.spi_r if spi_r is None else spi_r
        return [NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP,
                              nat_hash(self.spi_i, spi_r, path.local[0], path.local[1])),
                NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP,
                              nat_hash(self.spi_i, spi_r, path.remote[0], path.remote[1]))]

    def _check_nat_detection(self, payloads: list[Payload], addr: Address,
                             local: Address) -> tuple[bool, bool] | None:
        """(NAT in front of us, NAT in front of the peer) from the NAT-D
        payloads of a message received from ``addr`` on ``local``; None when
        the message has none."""
        src = [n.data for n in payloads
               if isinstance(n, NotifyPayload) and n.notify_type == NotifyType.NAT_DETECTION_SOURCE_IP]
        dst = [n.data for n in payloads
               if isinstance(n, NotifyPayload) and n.notify_type == NotifyType.NAT_DETECTION_DESTINATION_IP]
        if not src or not dst:
            return None
        mine = nat_hash(self.spi_i, self.spi_r, local[0], local[1])
        theirs = nat_hash(self.spi_i, self.spi_r, addr[0], addr[1])
        return (not any(_hmac.compare_digest(mine, d) for d in dst),
                not any(_hmac.compare_digest(theirs, x) for x in src))

    # ------------------------------------------------------------------ IKE_AUTH

    def _send_auth(self, now: float) -> None:
        cfg = self.config
        ident: Identity = cfg.local_id
        octets = signed_octets(self.suite.prf, self._init_request, self._nr, self.keys.sk_pi, ident.body())
        inner: list[Payload] = [IDiPayload(ident.id_type, ident.data)]
        if isinstance(cfg.local_auth, CertAuth):
            inner.append(CertPayload(CertEncoding.X509_SIGNATURE, _der(cfg.local_auth.cert)))
            inner += [CertPayload(CertEncoding.X509_SIGNATURE, _der(c)) for c in cfg.local_auth.chain]
        if cfg.initial_contact:
            inner.append(NotifyPayload(NotifyType.INITIAL_CONTACT))
        if isinstance(cfg.remote_auth, CaTrust) and cfg.send_certreq:
            inner.append(CertReqPayload(CertEncoding.X509_SIGNATURE,
                                        b"".join(certreq_hash(c) for c in cfg.remote_auth.cas)))
        if cfg.send_idr and cfg.remote_id is not None:
            inner.append(IDrPayload(cfg.remote_id.id_type, cfg.remote_id.data))
        if isinstance(cfg.local_auth, PskAuth):
            inner.append(AuthPayload(AuthMethod.PSK, psk_auth(self.suite.prf, cfg.local_auth.secret, octets)))
        else:
            method, data = sign_auth(cfg.local_auth.key, octets, self._peer_hashes)
            inner.append(AuthPayload(method, data))
        attrs = []
        if cfg.request_tia:
            attrs.append(CPAttribute(CfgAttr.INTERNAL_IP4_ADDRESS))
        if cfg.request_dns:
            attrs.append(CPAttribute(CfgAttr.INTERNAL_IP4_DNS))
        if attrs:
            inner.append(CPPayload(CfgType.REQUEST, attrs))
        self._child_spi = cfg.spi_allocator()
        spi = struct.pack("!I", self._child_spi)
        self._esp_offer = [p.to_wire(i + 1, spi) for i, p in enumerate(cfg.esp_proposals)]
        inner += [SAPayload(self._esp_offer), TSiPayload(list(cfg.local_ts)), TSrPayload(list(cfg.remote_ts))]
        if cfg.mobike:
            inner.append(NotifyPayload(NotifyType.MOBIKE_SUPPORTED))
            inner += [n for n in self._address_notifies() if n.notify_type != NotifyType.NO_ADDITIONAL_ADDRESSES]
        if cfg.no_nats_allowed:
            inner.append(self._no_nats_notify(self.path))
        self._send_request(ExchangeType.IKE_AUTH, inner, "IKE_AUTH", now,
                           self._on_auth_response, self._on_auth_timeout)

    def _on_auth_timeout(self, now: float) -> None:
        self._fail(now, "no response to IKE_AUTH")

    def _on_auth_response(self, msg: Message, inner: list[Payload], addr, local, now: float) -> None:
        notifies = [p for p in inner if isinstance(p, NotifyPayload)]
        errors = {n.notify_type for n in notifies if n.notify_type <= ERROR_NOTIFY_MAX}
        if NotifyType.AUTHENTICATION_FAILED in errors:
            self._emit(AuthFailed(now, "the gateway rejected our authentication (AUTHENTICATION_FAILED)", "peer"))
            self._close(now, "peer", "authentication failed")
            return
        idr = next((p for p in inner if isinstance(p, IDrPayload)), None)
        auth = next((p for p in inner if isinstance(p, AuthPayload)), None)
        if idr is None or auth is None:
            if any(p.type == PayloadType.EAP for p in inner):
                self._fail(now, "gateway requested EAP authentication, which is not supported")
            elif errors:
                n = min(errors)
                self._fail(now, f"gateway refused IKE_AUTH: {notify_name(n)}", n)
            else:
                self._fail(now, "IKE_AUTH response lacks IDr or AUTH")
            return
        try:
            self._auth_desc = self._verify_gateway(idr, auth, inner)
        except IkeAuthError as e:
            self._emit(AuthFailed(now, f"gateway authentication failed: {e}", "local"))
            # tell the gateway (RFC 7296 2.21.2), then forget the SA
            self._send_unacknowledged(ExchangeType.INFORMATIONAL,
                                      [NotifyPayload(NotifyType.AUTHENTICATION_FAILED)])
            self._close(now, "local", "gateway authentication failed")
            return
        self.state = State.ESTABLISHED
        self.established_at = self.last_received = now
        if self.config.ike_rekey_time > 0:
            self._ike_rekey_at = now + self._jittered(self.config.ike_rekey_time)
        self.mobike = self.config.mobike and any(n.notify_type == NotifyType.MOBIKE_SUPPORTED for n in notifies)
        self._note_peer_addresses(notifies)
        peer_id = Identity(idr.id_type, idr.data,
                           self.config.remote_id.label if self.config.remote_id is not None else "")
        self._emit(IkeSaEstablished(
            now, self.spi_i, self.spi_r, self.suite.name, str(self.config.local_id), str(peer_id),
            self.path.local, self.path.remote, self.nat_local, self.nat_remote, self.mobike,
            tuple(self.peer_addresses), self._auth_desc))
        if self.config.keepalive_interval > 0:
            self._next_keepalive = now + self.config.keepalive_interval
        self._establish_child(inner, errors, now)

    def _verify_gateway(self, idr: IDrPayload, auth: AuthPayload, inner: list[Payload]) -> str:
        cfg = self.config
        peer = Identity(idr.id_type, idr.data)
        if cfg.remote_id is not None and peer != cfg.remote_id:
            raise IkeAuthError(f"gateway identified itself as '{peer}', expected '{cfg.remote_id}'")
        octets = signed_octets(self.suite.prf, self._init_response, self._ni, self.keys.sk_pr, peer.body())
        if isinstance(cfg.remote_auth, PskAuth):
            if auth.method != AuthMethod.PSK:
                raise IkeAuthError(f"gateway used AUTH method {auth.method}, expected a PSK")
            want = psk_auth(self.suite.prf, cfg.remote_auth.secret, octets)
            if not _hmac.compare_digest(want, auth.data):
                raise IkeAuthError("the gateway's PSK AUTH does not match (wrong pre-shared key?)")
            return "psk"
        certs = []
        for p in inner:
            if isinstance(p, CertPayload) and not isinstance(p, CertReqPayload):
                if p.encoding != CertEncoding.X509_SIGNATURE:
                    continue
                try:
                    certs.append(x509.load_der_x509_certificate(p.data))
                except ValueError:
                    raise IkeAuthError("gateway sent an unparsable certificate") from None
        if not certs:
            raise IkeAuthError("gateway sent no certificate")
        ee = certs[0]
        verify_chain(ee, certs[1:], list(cfg.remote_auth.cas), cfg.wall_clock())
        if not identity_in_cert(peer, ee):
            raise IkeAuthError(f"the gateway's certificate does not contain its identity '{peer}'")
        return verify_auth(ee.public_key(), auth.method, auth.data, octets)

    def _note_peer_addresses(self, notifies: list[NotifyPayload]) -> None:
        addrs = []
        for n in notifies:
            if n.notify_type == NotifyType.ADDITIONAL_IP4_ADDRESS and len(n.data) == 4:
                addrs.append(str(ipaddress.IPv4Address(n.data)))
            elif n.notify_type == NotifyType.ADDITIONAL_IP6_ADDRESS and len(n.data) == 16:
                addrs.append(str(ipaddress.IPv6Address(n.data)))
        if addrs or any(n.notify_type == NotifyType.NO_ADDITIONAL_ADDRESSES for n in notifies):
            self.peer_addresses = addrs

    def _establish_child(self, inner: list[Payload], errors: set[int], now: float) -> None:
        cfg = self.config
        child_err = sorted(errors & _CHILD_ERRORS)
        sa = next((p for p in inner if isinstance(p, SAPayload)), None)
        tsi = next((p for p in inner if isinstance(p, TSiPayload)), None)
        tsr = next((p for p in inner if isinstance(p, TSrPayload)), None)
        reason = None
        notify = None
        if child_err or sa is None or tsi is None or tsr is None:
            notify = child_err[0] if child_err else (min(errors) if errors else None)
            reason = (f"gateway did not create the CHILD SA: {notify_name(notify)}" if notify is not None
                      else "IKE_AUTH response lacks SA/TSi/TSr")
        else:
            try:
                suite = select_esp(sa, self._esp_offer)
            except IkeProposalError as e:
                suite, reason, notify = None, f"gateway's ESP proposal choice is invalid: {e}", \
                    NotifyType.NO_PROPOSAL_CHOSEN
        if reason is None:
            reason = (_narrowing_error(tsi.selectors, cfg.local_ts, "TSi")
                      or _narrowing_error(tsr.selectors, cfg.remote_ts, "TSr"))
            notify = NotifyType.TS_UNACCEPTABLE if reason else None
        tia, dns = None, ()
        cp = next((p for p in inner if isinstance(p, CPPayload) and p.cfg_type == CfgType.REPLY), None)
        if cp is not None:
            tias = cp.ip4_values(CfgAttr.INTERNAL_IP4_ADDRESS)
            tia = tias[0] if tias else None
            dns = tuple(cp.ip4_values(CfgAttr.INTERNAL_IP4_DNS))
        if reason is None and cfg.require_tia and tia is None:
            reason, notify = "gateway assigned no INTERNAL_IP4_ADDRESS (TIA)", NotifyType.INTERNAL_ADDRESS_FAILURE
        if reason is not None:
            self._emit(ChildSaFailed(now, reason, notify))
            if cfg.close_on_child_failure:
                self.delete(now)
            return
        spi_out = struct.unpack("!I", suite.spi)[0]
        keys = derive_child_keys(self.suite.prf, self.keys.sk_d, suite, self._ni, self._nr)
        child = ChildSa(self._child_spi, spi_out, suite, keys, tuple(tsi.selectors), tuple(tsr.selectors),
                        tia, dns, initiated=True)
        self._add_child(child, now)

    def _add_child(self, child: ChildSa, now: float, rekey_of: int | None = None) -> None:
        child.created = now
        if self.config.child_rekey_time > 0:
            child.rekey_at = now + self._jittered(self.config.child_rekey_time)
        self.children[child.child_id] = child
        self._emit(self._child_event(child, now, rekey_of))

    def _child_event(self, child: ChildSa, now: float, rekey_of: int | None = None) -> ChildSaEstablished:
        encap = self.path.natt and (self.nat_local or self.nat_remote)
        return ChildSaEstablished(
            now, child.child_id, child.suite.name,
            _esp_sa(child.suite, child.spi_in, *child.keys_in),
            _esp_sa(child.suite, child.spi_out, *child.keys_out),
            child.local_ts, child.remote_ts, child.tia, child.dns, "tunnel", encap,
            self.nat_local or self.nat_remote, self.path.local, self.path.remote, rekey_of)

    def _jittered(self, t: float) -> float:
        r = int.from_bytes(self._rng(2), "big") / 65535.0
        return t * (1.0 - self.config.rekey_jitter * r)

    # ------------------------------------------------------------------ INFORMATIONAL (ours)

    def _start_delete_ike(self, now: float) -> None:
        self._send_request(ExchangeType.INFORMATIONAL, [DeletePayload(ProtocolId.IKE)], "DELETE IKE", now,
                           lambda m, i, a, l, t: self._close(t, "local", "deleted"),
                           lambda t: self._close(t, "local", "deleted (gateway did not answer)"))

    def _start_delete_child(self, child_id: int, now: float, by: str = "local", reason: str = "deleted") -> None:
        child = self.children.get(child_id)
        if child is None or self.state is not State.ESTABLISHED:
            return
        child.closing = True
        self._send_request(ExchangeType.INFORMATIONAL,
                           [DeletePayload(ProtocolId.ESP, [struct.pack("!I", child.spi_in)])],
                           "DELETE CHILD", now,
                           lambda m, i, a, l, t: self._on_delete_child_response(child_id, t, by, reason),
                           self._on_request_timeout)

    def _on_delete_child_response(self, child_id: int, now: float, by: str = "local",
                                  reason: str = "deleted") -> None:
        child = self.children.pop(child_id, None)
        if child is not None:
            self._emit(ChildSaDeleted(now, child.child_id, child.spi_in, child.spi_out, by, reason))

    def _on_request_timeout(self, now: float) -> None:
        self._emit(IkeFailed(now, "the gateway stopped answering"))
        self._close(now, "timeout", "the gateway stopped answering")

    # ------------------------------------------------------------------ peer requests

    def _peer_informational(self, msg: Message, inner: list[Payload], addr, local, raw: bytes,
                            now: float) -> None:
        reply: list[Payload] = []
        notifies = [p for p in inner if isinstance(p, NotifyPayload)]
        no_nats = next((n for n in notifies if n.notify_type == NotifyType.NO_NATS_ALLOWED), None)
        if no_nats is not None:
            self._peer_no_nats = True
            if not _hmac.compare_digest(no_nats.data, _no_nats_data(addr, local)):
                # RFC 4555 3.9: the addresses the peer saw are not the ones we see
                self._count("unexpected_nat")
                self._respond(msg, [NotifyPayload(NotifyType.UNEXPECTED_NAT_DETECTED)], addr, local, raw)
                return
        deletes = [p for p in inner if isinstance(p, DeletePayload)]
        if any(d.protocol == ProtocolId.IKE for d in deletes):
            self._respond(msg, [], addr, local, raw)
            log.info("%s: gateway deleted the IKE SA", self.name)
            self._close(now, "peer", "deleted by the gateway")
            return
        gone_in = []
        for d in deletes:
            if d.protocol != ProtocolId.ESP:
                continue
            for spi in d.spis:
                if len(spi) != 4:
                    continue
                out_spi = struct.unpack("!I", spi)[0]
                child = next((c for c in self.children.values() if c.spi_out == out_spi), None)
                if child is None:
                    continue
                del self.children[child.child_id]
                gone_in.append(struct.pack("!I", child.spi_in))
                self._emit(ChildSaDeleted(now, child.child_id, child.spi_in, child.spi_out, "peer",
                                          "deleted by the gateway"))
        if gone_in:
            reply.append(DeletePayload(ProtocolId.ESP, gone_in))
        if self.mobike:
            self._note_peer_addresses(notifies)
        for n in notifies:
            if n.notify_type == NotifyType.AUTHENTICATION_FAILED:
                self._respond(msg, [], addr, local, raw)
                self._close(now, "peer", "gateway reported AUTHENTICATION_FAILED")
                return
        if any(n.notify_type in (NotifyType.NAT_DETECTION_SOURCE_IP, NotifyType.NAT_DETECTION_DESTINATION_IP)
               for n in notifies):
            # the gateway checks the path (RFC 4555 3.8): NAT-D for the way its request came
            reply += self._nat_detection_payloads(Path(tuple(local), tuple(addr), True))
        cookie2 = next((n for n in notifies if n.notify_type == NotifyType.COOKIE2), None)
        if cookie2 is not None:
            reply.append(NotifyPayload(NotifyType.COOKIE2, cookie2.data))
        if any(n.notify_type == NotifyType.UPDATE_SA_ADDRESSES for n in notifies):
            self._drop("peer_update", "UPDATE_SA_ADDRESSES from the gateway (only we, the original initiator, "
                                      "may move the SA); answered, ignored")
        self._respond(msg, reply, addr, local, raw)

    def _peer_create_child_sa(self, msg: Message, inner: list[Payload], addr, local, raw: bytes,
                              now: float) -> None:
        sa = next((p for p in inner if isinstance(p, SAPayload)), None)
        nonce = next((p for p in inner if isinstance(p, NoncePayload)), None)
        ke = next((p for p in inner if isinstance(p, KEPayload)), None)
        if sa is None or nonce is None or not sa.proposals:
            self._respond(msg, [NotifyPayload(NotifyType.INVALID_SYNTAX)], addr, local, raw)
            return
        if sa.proposals[0].protocol == ProtocolId.IKE:
            self._peer_rekey_ike(msg, sa, nonce, ke, addr, local, raw, now)
            return
        rekey = next((p for p in inner if isinstance(p, NotifyPayload) and p.notify_type == NotifyType.REKEY_SA), None)
        if rekey is None:
            # a new CHILD SA the gateway wants: we only run the ones we asked for
            self._respond(msg, [NotifyPayload(NotifyType.NO_ADDITIONAL_SAS)], addr, local, raw)
            return
        old = None
        if rekey.protocol == ProtocolId.ESP and len(rekey.spi) == 4:
            spi = struct.unpack("!I", rekey.spi)[0]
            old = next((c for c in self.children.values() if c.spi_out == spi), None)
        if old is None:
            self._respond(msg, [NotifyPayload(NotifyType.CHILD_SA_NOT_FOUND, b"", rekey.protocol, rekey.spi)],
                          addr, local, raw)
            return
        active = self._active
        if old.closing or (active is not None and active.what == "REKEY IKE"):
            self._respond(msg, [NotifyPayload(NotifyType.TEMPORARY_FAILURE)], addr, local, raw)
            return
        tsi = next((p for p in inner if isinstance(p, TSiPayload)), None)
        tsr = next((p for p in inner if isinstance(p, TSrPayload)), None)
        if tsi is None or tsr is None:
            self._respond(msg, [NotifyPayload(NotifyType.INVALID_SYNTAX)], addr, local, raw)
            return
        try:
            chosen, suite = choose_esp(sa, self.config.esp_proposals, ke.group if ke else None)
        except InvalidKeGroup as e:
            self._respond(msg, [NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, struct.pack("!H", e.group))],
                          addr, local, raw)
            return
        except IkeProposalError as e:
            log.warning("%s: gateway's CHILD SA rekey proposals: %s", self.name, e)
            self._respond(msg, [NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN)], addr, local, raw)
            return
        shared = b""
        reply_ke: list[Payload] = []
        if suite.dh:
            dh = DhExchange(suite.dh)
            try:
                shared = dh.shared_secret(ke.data)
            except IkeCryptoError as e:
                log.warning("%s: gateway's KE in a CHILD SA rekey: %s", self.name, e)
                self._respond(msg, [NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN)], addr, local, raw)
                return
            reply_ke = [KEPayload(suite.dh, dh.public)]
        spi_in = self.config.spi_allocator()
        chosen.spi = struct.pack("!I", spi_in)
        nr = self._rng(self.config.nonce_len)
        keys = derive_child_keys(self.suite.prf, self.keys.sk_d, suite, nonce.data, nr, shared)
        child = ChildSa(spi_in, struct.unpack("!I", suite.spi)[0], suite, keys, old.local_ts, old.remote_ts,
                        old.tia, old.dns, initiated=False)
        # TSi is the gateway's side, TSr ours: we keep the selectors the SA had
        self._respond(msg, [SAPayload([chosen]), NoncePayload(nr), *reply_ke, TSiPayload(list(old.remote_ts)),
                            TSrPayload(list(old.local_ts))], addr, local, raw)
        self._count("peer_child_rekeys")
        log.info("%s: gateway rekeyed CHILD SA %08x_i -> %08x_i", self.name, old.spi_in, spi_in)
        if active is not None and active.what == "REKEY CHILD" and active.ctx.get("old") == old.child_id:
            active.ctx["peer"] = (nonce.data, nr, child.child_id)     # a collision, settled on our answer
        self._add_child(child, now, rekey_of=old.child_id)

    # ------------------------------------------------------------------ MOBIKE

    def _address_notifies(self) -> list[NotifyPayload]:
        """What we tell the gateway about our other addresses: only the
        configured ones (never the home address or tunnel devices)."""
        out = []
        for a in self.config.additional_addresses:
            if str(a) == self.path.local[0]:
                continue
            t = NotifyType.ADDITIONAL_IP4_ADDRESS if a.version == 4 else NotifyType.ADDITIONAL_IP6_ADDRESS
            out.append(NotifyPayload(t, a.packed))
        return out or [NotifyPayload(NotifyType.NO_ADDITIONAL_ADDRESSES)]

    def _no_nats_notify(self, path: Path) -> NotifyPayload:
        return NotifyPayload(NotifyType.NO_NATS_ALLOWED, _no_nats_data(path.local, path.remote))

    def _probe_candidates(self) -> list[str]:
        cur = self.path.remote[0]
        out = []
        for a in [self.original_remote[0], *self.peer_addresses]:
            if a != cur and a not in out and ipaddress.ip_address(a).version == ipaddress.ip_address(cur).version:
                out.append(a)
        return out

    def _start_update(self, now: float) -> None:
        if self.state is not State.ESTABLISHED:
            self._mobike_state = "idle"
            return
        self._mobike_state = "active"
        self._mobike_again = False
        self._cookie2 = self._rng(16)
        inner: list[Payload] = [NotifyPayload(NotifyType.UPDATE_SA_ADDRESSES), *self._address_notifies(),
                                *self._nat_detection_payloads(self.path),
                                NotifyPayload(NotifyType.COOKIE2, self._cookie2)]
        if self.config.no_nats_allowed:
            inner.append(self._no_nats_notify(self.path))
        cands = self._probe_candidates()
        probe = (cands + [self.path.remote[0]]) if cands else None
        after = self.config.mobike_probe_after
        self._send_request(ExchangeType.INFORMATIONAL, inner, "UPDATE_SA_ADDRESSES", now,
                           self._on_update_response, self._on_update_timeout, probe=probe, probe_after=after,
                           max_tries=max(self.config.retransmit_tries, after + 2 * len(probe)) if probe else None)

    def _on_update_response(self, msg: Message, inner: list[Payload], addr, local, now: float) -> None:
        notifies = [p for p in inner if isinstance(p, NotifyPayload)]
        errors = sorted(n.notify_type for n in notifies if n.notify_type <= ERROR_NOTIFY_MAX)
        if errors:
            self._mobike_fail(now, f"gateway refused the address update: {notify_name(errors[0])}", errors[0])
            return
        cookie2 = next((n for n in notifies if n.notify_type == NotifyType.COOKIE2), None)
        if cookie2 is None or not _hmac.compare_digest(cookie2.data, self._cookie2):
            # RFC 4555 3.7: a response without our COOKIE2 closes the IKE SA
            self._count("cookie2_mismatch")
            self._mobike_fail(now, "the gateway's answer to UPDATE_SA_ADDRESSES does not echo our COOKIE2")
            return
        probed = tuple(addr)[0] != self.path.remote[0]
        if probed:
            log.info("%s: gateway answered on %s (path probing)", self.name, addr[0])
            self.path = Path(self.path.local, (addr[0], NATT_PORT), True)
            self._mobike_again = True          # NAT-D for the path that works
        nat = self._check_nat_detection(inner, addr, local)
        if nat is not None:
            self.nat_local, self.nat_remote = nat
        if (self.config.no_nats_allowed or self._peer_no_nats) and (self.nat_local or self.nat_remote):
            self._mobike_fail(now, "a NAT is on the new path and NATs are not allowed (NO_NATS_ALLOWED)")
            return
        self._note_peer_addresses(notifies)
        self._mobike_state = "idle"
        self.last_update = now
        self._count("mobike_updates")
        encap = self.nat_local or self.nat_remote
        if self.nat_local and self.config.keepalive_interval > 0:
            self._next_keepalive = now + self.config.keepalive_interval
        log.info("%s: gateway updated the SAs to %s:%d <-> %s:%d (NAT here: %s, at gateway: %s)", self.name,
                 *self.path.local, *self.path.remote, self.nat_local, self.nat_remote)
        self._emit(AddressUpdated(now, self.path.local, self.path.remote, self.nat_local, self.nat_remote,
                                  encap, probed, self._mobike_started))
        if self._mobike_again:
            self._mobike_state = "queued"
            self._pending.appendleft(self._start_update)

    def _on_update_timeout(self, now: float) -> None:
        self._mobike_fail(now, f"no answer to UPDATE_SA_ADDRESSES from {self.path.local[0]} on any known "
                               "gateway address", timeout=True)

    def _mobike_fail(self, now: float, reason: str, notify: int | None = None, timeout: bool = False) -> None:
        self._mobike_state = "idle"
        self._emit(MobikeFailed(now, reason, notify))
        self._emit(IkeFailed(now, reason, notify))
        self._close(now, "timeout" if timeout else "error", reason)

    # ------------------------------------------------------------------ liveness

    def _dpd_due(self) -> float | None:
        if (self.config.dpd_interval <= 0 or self.state is not State.ESTABLISHED or self._active is not None
                or self._pending):
            return None
        return (self.last_received or 0.0) + self.config.dpd_interval

    def _start_dpd(self, now: float) -> None:
        if self.state is not State.ESTABLISHED:
            return
        self._count("dpd_sent")
        self._send_request(ExchangeType.INFORMATIONAL, [], "DPD", now,
                           lambda m, i, a, l, t: self._emit(LivenessChecked(t, t - now)),
                           self._on_request_timeout)

    # ------------------------------------------------------------------ rekeying (ours)

    def _ike_rekey_due(self) -> float | None:
        return None if self._ike_rekeying else self._ike_rekey_at

    def _esp_offer_for(self, spi: bytes, group: int | None) -> list:
        return [p.to_wire(i + 1, spi, with_dh=group is not None, dh_first=group)
                for i, p in enumerate(self.config.esp_proposals)]

    def _start_rekey_child(self, child_id: int, now: float, group: int | None = None) -> None:
        child = self.children.get(child_id)
        if child is None or child.closing or self.state is not State.ESTABLISHED:
            if child is not None:
                child.rekeying = False
            return
        if group is None:
            pfs = [g for p in self.config.esp_proposals for g in p.dh]
            group = pfs[0] if pfs else None
        spi_in = self.config.spi_allocator()
        offer = self._esp_offer_for(struct.pack("!I", spi_in), group)
        ni = self._rng(self.config.nonce_len)
        dh = DhExchange(group) if group is not None else None
        inner: list[Payload] = [NotifyPayload(NotifyType.REKEY_SA, b"", ProtocolId.ESP, struct.pack("!I", child.spi_in)),
                                SAPayload(offer), NoncePayload(ni)]
        if dh is not None:
            inner.append(KEPayload(dh.group, dh.public))
        inner += [TSiPayload(list(child.local_ts)), TSrPayload(list(child.remote_ts))]
        ctx = dict(old=child_id, spi_in=spi_in, offer=offer, ni=ni, dh=dh)
        self._send_request(ExchangeType.CREATE_CHILD_SA, inner, "REKEY CHILD", now,
                           lambda m, i, a, l, t: self._on_rekey_child_response(ctx, m, i, a, l, t),
                           self._on_request_timeout, ctx=ctx)

    def _on_rekey_child_response(self, ctx: dict, msg: Message, inner: list[Payload], addr, local,
                                 now: float) -> None:
        old = self.children.get(ctx["old"])
        notifies = [p for p in inner if isinstance(p, NotifyPayload)]
        errors = sorted(n.notify_type for n in notifies if n.notify_type <= ERROR_NOTIFY_MAX)
        if errors:
            err = errors[0]
            if old is not None:
                old.rekeying = False
            if err == NotifyType.INVALID_KE_PAYLOAD and old is not None and ctx.get("ke_retry", 0) == 0:
                n = next(n for n in notifies if n.notify_type == err)
                group = struct.unpack("!H", n.data[:2])[0] if len(n.data) >= 2 else None
                if group in {g for p in self.config.esp_proposals for g in p.dh}:
                    old.rekeying = True
                    self._pending.appendleft(lambda t: self._start_rekey_child(old.child_id, t, group))
                    return
            if old is not None:
                old.rekey_at = now + self.config.rekey_retry
            log.info("%s: gateway refused to rekey CHILD SA %08x: %s", self.name, ctx["old"], notify_name(err))
            self._count("child_rekey_refused")
            return
        sa = next((p for p in inner if isinstance(p, SAPayload)), None)
        nonce = next((p for p in inner if isinstance(p, NoncePayload)), None)
        ke = next((p for p in inner if isinstance(p, KEPayload)), None)
        dh: DhExchange | None = ctx["dh"]
        try:
            if sa is None or nonce is None:
                raise IkeProposalError("CREATE_CHILD_SA response lacks SA or Nonce")
            suite = select_esp(sa, ctx["offer"], dh_group=dh.group if dh is not None else None)
            shared = b""
            if dh is not None:
                if ke is None or ke.group != dh.group:
                    raise IkeProposalError("CREATE_CHILD_SA response lacks our group's KE")
                shared = dh.shared_secret(ke.data)
        except (IkeProposalError, IkeCryptoError) as e:
            # the gateway holds an SA we cannot use: tell it to delete it (RFC 7296 2.21.3)
            log.warning("%s: unusable CHILD SA rekey answer: %s", self.name, e)
            if sa is not None and sa.proposals and len(sa.proposals[0].spi) == 4:
                spi = ctx["spi_in"]
                self._pending.appendleft(lambda t: self._send_request(
                    ExchangeType.INFORMATIONAL, [DeletePayload(ProtocolId.ESP, [struct.pack("!I", spi)])],
                    "DELETE CHILD", t, lambda *a: None, self._on_request_timeout))
            if old is not None:
                old.rekeying = False
                old.rekey_at = now + self.config.rekey_retry
            return
        ni, nr = ctx["ni"], nonce.data
        keys = derive_child_keys(self.suite.prf, self.keys.sk_d, suite, ni, nr, shared)
        peer = ctx.get("peer")
        if peer is not None and min(ni, nr, peer[0], peer[1]) in (ni, nr):
            # RFC 7296 2.8.1: both sides rekeyed it; ours holds the lowest nonce, so we delete ours
            self._count("rekey_collisions_lost")
            log.info("%s: CHILD SA rekey collision: ours (%08x) is redundant, deleting it", self.name,
                     ctx["spi_in"])
            spi = ctx["spi_in"]
            self._pending.appendleft(lambda t: self._send_request(
                ExchangeType.INFORMATIONAL, [DeletePayload(ProtocolId.ESP, [struct.pack("!I", spi)])],
                "DELETE CHILD", t, lambda *a: None, self._on_request_timeout))
            if old is not None:          # the gateway's new SA replaces it; the gateway deletes it
                old.rekeying = False
                old.rekey_at = None
            return
        if peer is not None:
            self._count("rekey_collisions_won")
        base = old
        if base is None:
            base = next(iter(self.children.values()), None)
        tss = (base.local_ts, base.remote_ts, base.tia, base.dns) if base is not None else ((), (), None, ())
        tsi = next((p for p in inner if isinstance(p, TSiPayload)), None)
        tsr = next((p for p in inner if isinstance(p, TSrPayload)), None)
        local_ts = tuple(tsi.selectors) if tsi else tss[0]
        remote_ts = tuple(tsr.selectors) if tsr else tss[1]
        child = ChildSa(ctx["spi_in"], struct.unpack("!I", suite.spi)[0], suite, keys, local_ts, remote_ts,
                        tss[2], tss[3], initiated=True)
        log.info("%s: CHILD SA rekeyed %08x_i -> %08x_i", self.name, ctx["old"], child.spi_in)
        self._count("child_rekeys")
        self._add_child(child, now, rekey_of=ctx["old"])
        if old is not None:
            old.rekeying = False
            old.closing = True
            oid = old.child_id
            self._pending.appendleft(lambda t: self._start_delete_child(oid, t, "rekey", "rekeyed"))

    def _start_rekey_ike(self, now: float, group: int | None = None) -> None:
        if self.state is not State.ESTABLISHED:
            self._ike_rekeying = False
            return
        group = group or self.suite.dh
        new_spi = self._new_spi()
        offer = [p.to_wire(i + 1, new_spi) for i, p in enumerate(self.config.ike_proposals)]
        ni = self._rng(self.config.nonce_len)
        dh = DhExchange(group)
        ctx = dict(spi=new_spi, offer=offer, ni=ni, dh=dh)
        self._send_request(ExchangeType.CREATE_CHILD_SA,
                           [SAPayload(offer), NoncePayload(ni), KEPayload(group, dh.public)], "REKEY IKE", now,
                           lambda m, i, a, l, t: self._on_rekey_ike_response(ctx, m, i, a, l, t),
                           self._on_request_timeout, ctx=ctx)

    def _on_rekey_ike_response(self, ctx: dict, msg: Message, inner: list[Payload], addr, local,
                               now: float) -> None:
        notifies = [p for p in inner if isinstance(p, NotifyPayload)]
        errors = sorted(n.notify_type for n in notifies if n.notify_type <= ERROR_NOTIFY_MAX)
        peer = self._peer_ike_rekey
        self._peer_ike_rekey = None
        if errors:
            err = errors[0]
            self._ike_rekeying = False
            if err == NotifyType.INVALID_KE_PAYLOAD and not ctx.get("ke_retry"):
                n = next(n for n in notifies if n.notify_type == err)
                group = struct.unpack("!H", n.data[:2])[0] if len(n.data) >= 2 else None
                if group in self._groups:
                    self._ike_rekeying = True
                    self._pending.appendleft(lambda t: self._start_rekey_ike(t, group))
                    return
            self._ike_rekey_at = now + self.config.rekey_retry
            self._count("ike_rekey_refused")
            log.info("%s: gateway refused to rekey the IKE SA: %s", self.name, notify_name(err))
            if peer is not None:
                self._switch_ike_sa(peer, now, "peer", delete_old=False)
            return
        sa = next((p for p in inner if isinstance(p, SAPayload)), None)
        nonce = next((p for p in inner if isinstance(p, NoncePayload)), None)
        ke = next((p for p in inner if isinstance(p, KEPayload)), None)
        dh: DhExchange = ctx["dh"]
        try:
            if sa is None or nonce is None or ke is None:
                raise IkeProposalError("IKE SA rekey response lacks SA, Nonce or KE")
            suite = select_ike(sa, ctx["offer"], rekey=True)
            if suite.dh != dh.group or ke.group != dh.group:
                raise IkeProposalError(f"gateway chose DH group {suite.dh} (KE {ke.group}), we sent {dh.group}")
            shared = dh.shared_secret(ke.data)
        except (IkeProposalError, IkeCryptoError) as e:
            log.warning("%s: unusable IKE SA rekey answer: %s", self.name, e)
            self._ike_rekeying = False
            self._ike_rekey_at = now + self.config.rekey_retry
            if peer is not None:
                self._switch_ike_sa(peer, now, "peer", delete_old=False)
            return
        ni, nr = ctx["ni"], nonce.data
        keys = derive_rekeyed_ike_keys(suite, self.suite.prf, self.keys.sk_d, ni, nr, shared, ctx["spi"], suite.spi)
        ours = dict(spi_i=ctx["spi"], spi_r=suite.spi, initiator=True, keys=keys, suite=suite, ni=ni, nr=nr)
        if peer is not None and min(ni, nr, peer["ni"], peer["nr"]) in (ni, nr):
            # RFC 7296 2.8.2: the gateway's new IKE SA wins; we delete ours, it deletes the old one
            self._count("rekey_collisions_lost")
            self._switch_ike_sa(peer, now, "peer", delete_old=False)
            self._retire(ours, now, delete=True)
            return
        if peer is not None:
            self._count("rekey_collisions_won")
            self._retire(peer, now, delete=False)         # the gateway deletes its redundant SA
        self._switch_ike_sa(ours, now, "local", delete_old=True)

    def _retire(self, sa: dict, now: float, delete: bool) -> None:
        """Keep an IKE SA we will not use (only to answer on it / delete it)."""
        sk = SkCipher.for_initiator(sa["keys"]) if sa["initiator"] else SkCipher.for_responder(sa["keys"])
        sk.rng = self._rng
        old = _OldSa(sa["spi_i"], sa["spi_r"], sa["initiator"], sk, sa.get("next_mid", 0), sa.get("peer_mid", 0),
                     sa.get("last_peer_request"), sa.get("last_response"), now + 30.0)
        if delete:
            old.delete_mid = old.next_mid
            old.next_mid += 1
            old.delete_packet = sk.seal(Message(old.spi_i, old.spi_r, ExchangeType.INFORMATIONAL, old.delete_mid,
                                                initiator=old.initiator), [DeletePayload(ProtocolId.IKE)])
            old.deadline = now + self.config.retransmit_timeout
            self._outbox.append((self._frame(old.delete_packet), self.path.local, self.path.remote))
        self._retired[(old.spi_i, old.spi_r)] = old

    def _switch_ike_sa(self, new: dict, now: float, by: str, delete_old: bool) -> None:
        """Make ``new`` the current IKE SA; the current one is retired."""
        cur = dict(spi_i=self.spi_i, spi_r=self.spi_r, initiator=self.initiator, keys=self.keys, suite=self.suite,
                   next_mid=self._next_mid, peer_mid=self._peer_mid, last_peer_request=self._last_peer_request,
                   last_response=self._last_response)
        self._retire(cur, now, delete=delete_old)
        old_i, old_r = self.spi_i, self.spi_r
        self.spi_i, self.spi_r, self.initiator = new["spi_i"], new["spi_r"], new["initiator"]
        self.keys, self.suite = new["keys"], new["suite"]
        self._sk = SkCipher.for_initiator(self.keys) if self.initiator else SkCipher.for_responder(self.keys)
        self._sk.rng = self._rng
        self._next_mid = self._peer_mid = 0
        self._last_peer_request = self._last_response = None
        self._ike_rekeying = False
        self._ike_rekey_at = (now + self._jittered(self.config.ike_rekey_time)
                              if self.config.ike_rekey_time > 0 else None)
        self._count("ike_rekeys")
        log.info("%s: IKE SA rekeyed (%s): %s_i %s_r -> %s_i %s_r, %s", self.name, by, old_i.hex(), old_r.hex(),
                 self.spi_i.hex(), self.spi_r.hex(), self.suite.name)
        self._emit(IkeSaRekeyed(now, old_i, old_r, self.spi_i, self.spi_r, self.suite.name, by))

    # ------------------------------------------------------------------ rekeying (the gateway's IKE SA rekey)

    def _peer_rekey_ike(self, msg: Message, sa: SAPayload, nonce: NoncePayload, ke: KEPayload | None, addr,
                        local, raw: bytes, now: float) -> None:
        active = self._active
        if active is not None and active.what == "REKEY CHILD":
            # RFC 7296 2.25.2: an IKE SA rekey while we rekey a CHILD SA
            self._respond(msg, [NotifyPayload(NotifyType.TEMPORARY_FAILURE)], addr, local, raw)
            return
        try:
            chosen, suite = choose_ike(sa, self.config.ike_proposals, ke.group if ke else None)
        except InvalidKeGroup as e:
            self._respond(msg, [NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, struct.pack("!H", e.group))],
                          addr, local, raw)
            return
        except IkeProposalError as e:
            log.warning("%s: gateway's IKE SA rekey proposals: %s", self.name, e)
            self._respond(msg, [NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN)], addr, local, raw)
            return
        dh = DhExchange(suite.dh)
        try:
            shared = dh.shared_secret(ke.data)
        except IkeCryptoError as e:
            log.warning("%s: gateway's KE in an IKE SA rekey: %s", self.name, e)
            self._respond(msg, [NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN)], addr, local, raw)
            return
        spi_r = self._new_spi()
        chosen.spi = spi_r
        nr = self._rng(self.config.nonce_len)
        keys = derive_rekeyed_ike_keys(suite, self.suite.prf, self.keys.sk_d, nonce.data, nr, shared, suite.spi,
                                       spi_r)
        self._respond(msg, [SAPayload([chosen]), NoncePayload(nr), KEPayload(suite.dh, dh.public)], addr, local, raw)
        new = dict(spi_i=suite.spi, spi_r=spi_r, initiator=False, keys=keys, suite=suite, ni=nonce.data, nr=nr)
        if active is not None and active.what == "REKEY IKE":
            self._peer_ike_rekey = new        # a collision: settled when our answer arrives
            return
        # the gateway deletes the old IKE SA itself; a request of ours still on it finishes there
        self._switch_ike_sa(new, now, "peer", delete_old=False)

    # ------------------------------------------------------------------ retired IKE SAs

    def _handle_retired(self, old: _OldSa, hdr, data: bytes, addr: Address, local: Address, now: float) -> None:
        try:
            msg = decode_message(data)
            if msg.sk is None:
                raise IkeDecodeError("no SK payload")
            inner = old.sk.open(msg)
        except (IkeDecodeError, IkeIntegrityError) as e:
            self._drop("retired_sa", f"bad message on a rekeyed IKE SA: {e}")
            return
        if hdr.response:
            req = self._active
            if req is not None and req.spis == (old.spi_i, old.spi_r) and req.message_id == hdr.message_id:
                # our request sent before the gateway rekeyed: it finishes on the old SA
                self.last_received = now
                self._active = None
                if req.on_response(msg, inner, addr, local, now) is False and self._active is None:
                    self._active = req
                    return
                self._kick(now)
            elif hdr.message_id == old.delete_mid:
                old.deadline = None
                del self._retired[(old.spi_i, old.spi_r)]
            else:
                self._count("retired_sa_responses")
            return
        if hdr.message_id == old.peer_mid - 1 and old.last_response is not None and old.last_peer_request == data:
            self._outbox.append((old.last_response[0], old.last_response[1], addr))
            return
        if hdr.message_id != old.peer_mid:
            self._drop("unexpected_request_id", f"request {hdr.message_id} on a rekeyed IKE SA")
            return
        self.last_received = now
        resp = old.sk.seal(Message(old.spi_i, old.spi_r, msg.exchange, msg.message_id, initiator=old.initiator,
                                   response=True), [])
        framed = NON_ESP_MARKER + resp if local[1] == self._natt_port else resp
        self._outbox.append((framed, local, addr))
        old.peer_mid += 1
        old.last_peer_request, old.last_response = data, (framed, local, addr)
        if any(isinstance(p, DeletePayload) and p.protocol == ProtocolId.IKE for p in inner):
            log.info("%s: gateway deleted the rekeyed IKE SA %s_i", self.name, old.spi_i.hex())
            old.expires = min(old.expires, now + 5.0)       # answer retransmissions for a while


# ---------------------------------------------------------------------- module helpers

def _xname(exchange: int) -> str:
    try:
        return ExchangeType(exchange).name
    except ValueError:
        return f"exchange {exchange}"


def _der(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding
    return cert.public_bytes(Encoding.DER)


def _narrowing_error(got: list[TrafficSelector], offered: list[TrafficSelector], what: str) -> str | None:
    if not got:
        return f"gateway returned an empty {what}"
    for ts in got:
        if not any(ts.is_subset_of(o) for o in offered):
            return f"gateway's {what} {ts} is not within what we proposed"
    return None


def _no_nats_data(src: Address, dst: Address) -> bytes:
    """NO_NATS_ALLOWED data (RFC 4555 4.2.6): source and destination address, then both ports."""
    return (ipaddress.ip_address(src[0]).packed + ipaddress.ip_address(dst[0]).packed
            + struct.pack("!HH", src[1], dst[1]))


def _esp_sa(suite: EspSuite, spi: int, ekey: bytes, akey: bytes) -> EspSa:
    if suite.encr.aead:
        return EspSa(spi, None, ekey, None, b"", 0, suite.encr.xfrm, suite.encr.icv_len * 8, suite.esn)
    return EspSa(spi, suite.encr.xfrm, ekey, suite.integ.xfrm, akey, suite.integ.trunc_len * 8,
                 None, 0, suite.esn)
