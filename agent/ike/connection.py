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

Structure (so that MOBIKE, DPD and rekeying can be added as further request
kinds): our requests go through a window-1 queue (`_enqueue` -> `_kick` ->
`_send_request`), each with a response handler and a timeout handler, and
are retransmitted with back-off on the current `path`; peer requests are
dispatched by exchange type (`_request_handlers`) and their responses cached
for retransmitted requests. Anything that fails a check (SPIs, flags,
message ID, integrity, syntax) is counted in `stats`, logged once per kind
and dropped without touching the state.

Extension points for MOBIKE / DPD / rekeying (issue #11):
- a liveness check is `_enqueue(lambda t: self._send_request(INFORMATIONAL,
  [], "DPD", t, on_response, self._on_request_timeout), now)` plus a timer
  in get_timer()/handle_timer();
- UPDATE_SA_ADDRESSES: set `self.path = Path(new_local, remote, natt=True)`
  and send INFORMATIONAL with N(UPDATE_SA_ADDRESSES), `_nat_detection_payloads
  (self.path)` and N(COOKIE2); on the response `_check_nat_detection(...)`
  gives the new NAT state (retransmissions already follow `self.path`);
- the peer's ADDITIONAL_*_ADDRESS lists land in `peer_addresses`;
- peer CREATE_CHILD_SA requests go to `_peer_create_child_sa` (answers
  NO_ADDITIONAL_SAS for now); CHILD SA key material for a rekey comes from
  `crypto.derive_child_keys(..., shared=g^ir)`.
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
    ChildKeys, DhExchange, IkeKeys, SkCipher, derive_child_keys, derive_ike_keys, nat_hash,
    psk_auth, signed_octets,
)
from .errors import IkeAuthError, IkeCryptoError, IkeDecodeError, IkeIntegrityError, IkeProposalError
from .events import (
    AuthFailed, ChildSaDeleted, ChildSaEstablished, ChildSaFailed, EspSa, Event, IkeFailed,
    IkeSaDeleted, IkeSaEstablished,
)
from .message import (
    AuthPayload, CertPayload, CertReqPayload, CPAttribute, CPPayload, DeletePayload, IDiPayload,
    IDrPayload, KEPayload, Message, NoncePayload, NotifyPayload, Payload, SAPayload, TrafficSelector,
    TSiPayload, TSrPayload, decode_header, decode_message,
)
from .proposals import EspSuite, IkeSuite, groups_in, select_esp, select_ike

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

    @property
    def child_id(self) -> int:
        return self.spi_in


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
        self.state = State.IDLE
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

    def delete_child(self, child_id: int, now: float) -> None:
        """Delete one CHILD SA (by its ``child_id``, our inbound SPI)."""
        if self.state is not State.ESTABLISHED or child_id not in self.children:
            raise KeyError(f"no CHILD SA {child_id:08x}")
        self._enqueue(lambda t: self._start_delete_child(child_id, t), now)

    def update_addresses(self, new_local: Address, now: float) -> None:
        """MOBIKE (RFC 4555) address update: issue #11."""
        raise NotImplementedError("MOBIKE address updates are not implemented yet (issue #11)")

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
        if self._next_keepalive is not None and self.state is State.ESTABLISHED:
            times.append(self._next_keepalive)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        req = self._active
        if req is not None and now >= req.deadline:
            if req.tries < self.config.retransmit_tries:
                req.tries += 1
                req.timeout = min(req.timeout * self.config.retransmit_base,
                                  self.config.retransmit_max_timeout)
                req.deadline = now + req.timeout
                self._count("retransmits")
                log.info("%s: retransmit %d of %s request %d", self.name, req.tries, req.what, req.message_id)
                self._transmit(req.packet, self.path)
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

    def _enqueue(self, starter: Callable[[float], None], now: float) -> None:
        self._pending.append(starter)
        self._kick(now)

    def _kick(self, now: float) -> None:
        while self._active is None and self._pending and self.state is not State.CLOSED:
            self._pending.popleft()(now)

    def _send_request(self, exchange: int, inner: list[Payload], what: str, now: float,
                      on_response, on_timeout) -> None:
        mid = self._next_mid
        self._next_mid += 1
        msg = Message(self.spi_i, self.spi_r, exchange, mid, initiator=True)
        packet = self._sk.seal(msg, inner)
        self._start(exchange, mid, packet, what, now, on_response, on_timeout)

    def _start(self, exchange, mid, packet, what, now, on_response, on_timeout) -> None:
        t = self.config.retransmit_timeout
        self._active = _Request(exchange, mid, packet, what, on_response, on_timeout, t, now + t)
        self._transmit(packet, self.path)

    def _send_unacknowledged(self, exchange: int, inner: list[Payload]) -> None:
        """A request we send once and do not wait for (before closing)."""
        mid = self._next_mid
        self._next_mid += 1
        self._transmit(self._sk.seal(Message(self.spi_i, self.spi_r, exchange, mid, initiator=True), inner),
                       self.path)

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
        if req is None or hdr.message_id != req.message_id or hdr.exchange != req.exchange:
            self._drop("unexpected_response",
                       f"response with message ID {hdr.message_id} (exchange {hdr.exchange}) matches no "
                       "outstanding request (late retransmission or replay)")
            return
        if hdr.initiator:
            self._drop("bad_flags", "response with the initiator flag set")
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
        self._active = None
        req.on_response(msg, inner, addr, local, now)
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
        if hdr.initiator:
            self._drop("bad_flags", "request with the initiator flag set (we are the initiator)")
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
            self._respond(msg, [NotifyPayload(e.notify, e.notify_data)], addr, local, data)
            return
        handler = self._request_handlers.get(msg.exchange)
        if handler is None:
            self._drop("unexpected_request", f"{_xname(msg.exchange)} request from the gateway")
            return
        handler(msg, inner, addr, local, data, now)

    def _respond(self, req: Message, inner: list[Payload], addr: Address, local: Address,
                 raw_request: bytes) -> None:
        resp = Message(self.spi_i, self.spi_r, req.exchange, req.message_id, initiator=True, response=True)
        packet = self._sk.seal(resp, inner)
        data = NON_ESP_MARKER + packet if local[1] == self._natt_port else packet
        self._outbox.append((data, local, addr))
        self._peer_mid = req.message_id + 1
        self._last_peer_request = raw_request
        self._last_response = (data, local, addr)

    # ------------------------------------------------------------------ IKE_SA_INIT

    def _send_init(self, now: float) -> None:
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
        self._fail(now, "no response to IKE_SA_INIT (gateway unreachable?)")

    def _on_init_response(self, msg: Message, payloads, addr: Address, local: Address, now: float) -> None:
        cookie = msg.notify(NotifyType.COOKIE)
        if cookie is not None:
            if self._cookie_rounds >= self.config.max_cookie_rounds:
                self._fail(now, "gateway keeps asking for a COOKIE", NotifyType.COOKIE)
                return
            if not 1 <= len(cookie.data) <= 64:
                self._fail(now, f"COOKIE of {len(cookie.data)} bytes", NotifyType.COOKIE)
                return
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
                self._fail(now, f"gateway wants DH group {group}, which we did not offer",
                           NotifyType.INVALID_KE_PAYLOAD)
                return
            if self._ke_retries >= self.config.max_ke_retries:
                self._fail(now, "too many INVALID_KE_PAYLOAD retries", NotifyType.INVALID_KE_PAYLOAD)
                return
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
            self._fail(now, f"gateway refused IKE_SA_INIT: {notify_name(n)}", n)
            return
        sa, ke, nr = msg.get(SAPayload), msg.get(KEPayload), msg.get(NoncePayload)
        if sa is None or ke is None or nr is None or not any(msg.spi_r):
            self._fail(now, "IKE_SA_INIT response lacks SA, KE, Nonce or responder SPI")
            return
        try:
            suite = select_ike(sa, self._ike_offer)
        except IkeProposalError as e:
            self._fail(now, f"gateway's IKE proposal choice is invalid: {e}", NotifyType.NO_PROPOSAL_CHOSEN)
            return
        if suite.dh != self._dh.group or ke.group != self._dh.group:
            self._fail(now, f"gateway chose DH group {suite.dh} with KE of group {ke.group}, "
                            f"we sent {self._dh.group}")
            return
        try:
            shared = self._dh.shared_secret(ke.data)
        except IkeCryptoError as e:
            self._fail(now, f"gateway's KE payload: {e}")
            return
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
                        tia, dns)
        self.children[child.child_id] = child
        encap = self.path.natt and (self.nat_local or self.nat_remote)
        self._emit(ChildSaEstablished(
            now, child.child_id, suite.name,
            _esp_sa(suite, child.spi_in, keys.encr_r2i, keys.integ_r2i),
            _esp_sa(suite, child.spi_out, keys.encr_i2r, keys.integ_i2r),
            child.local_ts, child.remote_ts, tia, dns, "tunnel", encap,
            self.nat_local or self.nat_remote, self.path.local, self.path.remote))

    # ------------------------------------------------------------------ INFORMATIONAL (ours)

    def _start_delete_ike(self, now: float) -> None:
        self._send_request(ExchangeType.INFORMATIONAL, [DeletePayload(ProtocolId.IKE)], "DELETE IKE", now,
                           lambda m, i, a, l, t: self._close(t, "local", "deleted"),
                           lambda t: self._close(t, "local", "deleted (gateway did not answer)"))

    def _start_delete_child(self, child_id: int, now: float) -> None:
        child = self.children.get(child_id)
        if child is None or self.state is not State.ESTABLISHED:
            return
        self._send_request(ExchangeType.INFORMATIONAL,
                           [DeletePayload(ProtocolId.ESP, [struct.pack("!I", child.spi_in)])],
                           "DELETE CHILD", now,
                           lambda m, i, a, l, t: self._on_delete_child_response(child_id, t),
                           self._on_request_timeout)

    def _on_delete_child_response(self, child_id: int, now: float) -> None:
        child = self.children.pop(child_id, None)
        if child is not None:
            self._emit(ChildSaDeleted(now, child.child_id, child.spi_in, child.spi_out, "local", "deleted"))

    def _on_request_timeout(self, now: float) -> None:
        self._emit(IkeFailed(now, "the gateway stopped answering"))
        self._close(now, "timeout", "the gateway stopped answering")

    # ------------------------------------------------------------------ peer requests

    def _peer_informational(self, msg: Message, inner: list[Payload], addr, local, raw: bytes,
                            now: float) -> None:
        reply: list[Payload] = []
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
        notifies = [p for p in inner if isinstance(p, NotifyPayload)]
        if self.mobike:
            self._note_peer_addresses(notifies)
        for n in notifies:
            if n.notify_type == NotifyType.AUTHENTICATION_FAILED:
                self._respond(msg, [], addr, local, raw)
                self._close(now, "peer", "gateway reported AUTHENTICATION_FAILED")
                return
        self._respond(msg, reply, addr, local, raw)

    def _peer_create_child_sa(self, msg: Message, inner: list[Payload], addr, local, raw: bytes,
                              now: float) -> None:
        # rekeying is issue #11; until then refuse politely
        self._respond(msg, [NotifyPayload(NotifyType.NO_ADDITIONAL_SAS)], addr, local, raw)


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


def _esp_sa(suite: EspSuite, spi: int, ekey: bytes, akey: bytes) -> EspSa:
    if suite.encr.aead:
        return EspSa(spi, None, ekey, None, b"", 0, suite.encr.xfrm, suite.encr.icv_len * 8, suite.esn)
    return EspSa(spi, suite.encr.xfrm, ekey, suite.integ.xfrm, akey, suite.integ.trunc_len * 8,
                 None, 0, suite.esn)
