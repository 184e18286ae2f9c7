"""Foreign agent engine (sans-I/O).

Usage::

    fa = ForeignAgent(FaConfig(address="192.0.2.1", ha_sas={"10.1.0.1": fh_sa}))
    fa.start(now)                                  # first advertisement, periodic timer
    fa.receive_icmp(icmp_bytes, src_ip, now)       # solicitations
    fa.receive_datagram(data, src_ip, src_port, dst_ip, now)  # requests and HA replies
    outputs: fa.datagrams_to_send() -> Datagram (UDP) and IcmpPacket (advertisements)
    events:  VisitorAdded / VisitorUpdated / VisitorRemoved

Relaying (RFC 5944 §3.7):

* a request from a mobile node is checked, in order: Mobile-Foreign
  authentication when an MN-FA security association exists for its home
  address (or ``require_mn_auth``): 67; no Mobile-Home authentication
  extension: 70; Home Agent field 0.0.0.0: 90; home agent not in
  ``allowed_home_agents``: 65; busy, visitor list full or ``max_pending``
  requests already awaiting their home agents: 66; lifetime
  above ``registration_lifetime``: 69 (the reply's lifetime says the
  maximum); care-of address not one of ours (D clear): 77; reverse tunnel
  requested but unsupported: 74, or mandatory but not requested: 75;
  M/G encapsulation unsupported: 72. A denial is sent by the FA itself
  (with a Mobile-Foreign extension when it shares an SA with the MN).
  Otherwise everything after the Mobile-Home extension is removed, a
  Foreign-Home extension is appended when an FA-HA SA exists for the home
  agent, and the request goes to the home agent;
* a reply from the home agent must match a pending request (home address and
  low 32 identification bits); with an FA-HA SA its Foreign-Home extension
  must verify, else the MN gets 68; a reply without a Mobile-Home extension
  gives 71. It is relayed cut after its Mobile-Home extension, plus a
  Mobile-Foreign extension when an MN-FA SA exists. An accepted reply adds
  or refreshes the visitor entry (lifetime 0 removes it);
* a request the home agent does not answer within ``pending_timeout``
  seconds is answered with 78 (registration timeout), or with 68 when only
  replies failing the FA-HA authentication came (a forged reply never
  cancels the pending request);
"""

from __future__ import annotations

import heapq
import itertools
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Mapping, Sequence

from .auth import AuthResult, check, low32, sign
from .constants import (
    ALL_SYSTEMS_MULTICAST,
    ENCAP_GRE,
    ENCAP_IPIP,
    ENCAP_MINIMAL,
    EXT_ENCAP_DELIVERY_STYLE,
    EXT_FHAE,
    EXT_MFAE,
    EXT_MHAE,
    MIP_PORT,
    MSG_REGISTRATION_REQUEST,
    AdvFlag,
    RegFlag,
    ReplyCode,
    is_accepted,
)
from .engine import Datagram, EngineBase, IcmpPacket
from .errors import MipConfigError, MipDecodeError
from .icmp import AgentAdvertisement, AgentSolicitation, decode_icmp, next_sequence
from .messages import (
    RegistrationReply,
    RegistrationRequest,
    decode_message,
    to_ipv4,
)

__all__ = [
    "FaConfig",
    "Visitor",
    "VisitorAdded",
    "VisitorUpdated",
    "VisitorRemoved",
    "ForeignAgent",
]

_ZERO = IPv4Address(0)


@dataclass
class FaConfig:
    """Foreign agent configuration.

    ``address``: the FA's address on the visited link (source of its
    advertisements, where mobile nodes send requests). ``care_of_addresses``
    default to ``[address]``. ``advertisement_interval`` seconds between
    unsolicited advertisements (None: only solicited ones);
    ``advertisement_lifetime`` defaults to three intervals.
    ``mn_sas`` maps home addresses to MN-FA SAs, ``ha_sas`` home agent
    addresses to FA-HA SAs.
    """

    address: IPv4Address
    care_of_addresses: Sequence = ()
    registration_lifetime: int = 1800
    advertisement_interval: float | None = 5.0
    advertisement_lifetime: int | None = None
    advertisement_destination: IPv4Address = IPv4Address(ALL_SYSTEMS_MULTICAST)
    routes_common_traffic: bool = True
    prefix_lengths: Sequence[int] | None = None
    registration_required: bool = False
    busy: bool = False
    reverse_tunnel: bool = True
    reverse_tunnel_required: bool = False
    udp_tunnel: bool = False
    encapsulations: frozenset = frozenset({ENCAP_IPIP})
    mn_sas: Mapping = field(default_factory=dict)
    ha_sas: Mapping = field(default_factory=dict)
    require_mn_auth: bool = False
    require_ha_auth: bool = False
    allowed_home_agents: Sequence | None = None
    max_visitors: int | None = None
    max_pending: int = 4096
    pending_timeout: float = 7.0
    port: int = MIP_PORT

    def __post_init__(self):
        self.address = to_ipv4(self.address)
        self.care_of_addresses = tuple(to_ipv4(a) for a in self.care_of_addresses) \
            or (self.address,)
        self.advertisement_destination = to_ipv4(self.advertisement_destination)
        self.mn_sas = {to_ipv4(k): v for k, v in dict(self.mn_sas).items()}
        self.ha_sas = {to_ipv4(k): v for k, v in dict(self.ha_sas).items()}
        if self.allowed_home_agents is not None:
            self.allowed_home_agents = frozenset(to_ipv4(a) for a in self.allowed_home_agents)
        if self.advertisement_lifetime is None:
            ival = self.advertisement_interval or 600
            self.advertisement_lifetime = min(0xFFFF, max(1, int(3 * ival + 0.999)))
        if not 0 < self.registration_lifetime <= 0xFFFF:
            raise MipConfigError("registration_lifetime must be 1..65535")
        if self.advertisement_interval is not None and self.advertisement_interval <= 0:
            raise MipConfigError("advertisement_interval must be positive")


@dataclass(frozen=True)
class Visitor:
    """A visiting mobile node with an accepted registration through this FA.

    ``mn_address``/``mn_port`` are where its request came from (normally its
    home address); ``encapsulating_delivery`` when it asked for RFC 3024
    encapsulating delivery of reverse-tunnelled traffic.
    """

    home_address: IPv4Address
    home_agent: IPv4Address
    care_of_address: IPv4Address
    mn_address: IPv4Address
    mn_port: int
    lifetime: int
    registered_at: float
    expires_at: float | None
    reverse_tunnel: bool
    encapsulating_delivery: bool
    identification: int


@dataclass(frozen=True)
class VisitorAdded:
    visitor: Visitor


@dataclass(frozen=True)
class VisitorUpdated:
    visitor: Visitor
    previous: Visitor


@dataclass(frozen=True)
class VisitorRemoved:
    """``reason``: "deregistered", "expired" or "revoked"."""

    visitor: Visitor
    reason: str


@dataclass
class _Pending:
    request: RegistrationRequest
    mn_address: IPv4Address
    mn_port: int
    deadline: float
    sent_at: float
    ha_auth_failed: bool = False     # a reply that failed the FA-HA check came meanwhile


class ForeignAgent(EngineBase):
    """The foreign agent state machine (see the module docstring)."""

    def __init__(self, config: FaConfig):
        super().__init__()
        self.config = config
        self.visitors: dict[IPv4Address, Visitor] = {}
        self._pending: dict[tuple, _Pending] = {}
        self._sequence = 0
        self._next_adv: float | None = None
        self._heap: list = []  # (deadline, n, kind, key)
        self._n = itertools.count()

    # ------------------------------------------------------------------ advertisements

    def start(self, now: float) -> None:
        """Send the first advertisement and arm the periodic ones."""
        self._advertise(now, self.config.advertisement_destination)

    def advertisement(self) -> AgentAdvertisement:
        """The advertisement this FA would send now (sequence not advanced)."""
        cfg = self.config
        flags = AdvFlag.F
        if cfg.registration_required:
            flags |= AdvFlag.R
        if cfg.busy:
            flags |= AdvFlag.B
        if ENCAP_MINIMAL in cfg.encapsulations:
            flags |= AdvFlag.M
        if ENCAP_GRE in cfg.encapsulations:
            flags |= AdvFlag.G
        if cfg.reverse_tunnel:
            flags |= AdvFlag.T
        if cfg.udp_tunnel:
            flags |= AdvFlag.U
        routers = ((cfg.address, 0),) if cfg.routes_common_traffic else ()
        prefixes = None
        if cfg.prefix_lengths is not None and routers:
            prefixes = tuple(cfg.prefix_lengths)[: len(routers)]
        return AgentAdvertisement(
            sequence=self._sequence, registration_lifetime=cfg.registration_lifetime,
            flags=flags, care_of_addresses=cfg.care_of_addresses,
            lifetime=cfg.advertisement_lifetime, router_addresses=routers,
            code=0 if cfg.routes_common_traffic else 16, prefix_lengths=prefixes)

    def _advertise(self, now: float, dst: IPv4Address) -> None:
        self._out.append(IcmpPacket(dst, self.advertisement().encode(), 1, self.config.address))
        self.counters["advertisements"] += 1
        self._sequence = next_sequence(self._sequence)
        if self.config.advertisement_interval is not None:
            self._next_adv = now + self.config.advertisement_interval

    def receive_icmp(self, data: bytes, src, now: float) -> None:
        """Process an ICMP message: a solicitation is answered at once.

        The answer goes to the soliciting address, or to the advertisement
        destination when the solicitation came from 0.0.0.0.
        """
        try:
            msg = decode_icmp(data)
        except MipDecodeError as exc:
            self._drop("malformed_icmp", str(exc))
            return
        if not isinstance(msg, AgentSolicitation):
            self.counters["advertisements_ignored"] += 1
            return
        src = to_ipv4(src)
        self.counters["solicitations"] += 1
        self._advertise(now, src if src != _ZERO else self.config.advertisement_destination)

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        """The next deadline: advertisement, pending-request timeout, visitor expiry."""
        t = self._next_adv
        heap = self._heap
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        if heap and (t is None or heap[0][0] < t):
            t = heap[0][0]
        return t

    def _live(self, entry) -> bool:
        deadline, _, kind, key = entry
        if kind == "pending":
            p = self._pending.get(key)
            return p is not None and p.deadline == deadline
        v = self.visitors.get(key)
        return v is not None and v.expires_at == deadline

    def handle_timer(self, now: float) -> None:
        """Advertise, time out pending requests (78) and expire visitors as due."""
        if self._next_adv is not None and now >= self._next_adv:
            self._advertise(now, self.config.advertisement_destination)
        heap = self._heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if not self._live(entry):
                continue
            _, _, kind, key = entry
            if kind == "pending":
                p = self._pending.pop(key)
                self.counters["registration_timeouts"] += 1
                self._deny(p.request, ReplyCode.FA_HA_FAILED_AUTH if p.ha_auth_failed
                           else ReplyCode.FA_REGISTRATION_TIMEOUT, p.mn_address, p.mn_port)
            else:
                v = self.visitors.pop(key)
                self.counters["visitors_expired"] += 1
                self._event(VisitorRemoved(v, "expired"))

    def revoke(self, home_address) -> bool:
        """Remove a visitor administratively (VisitorRemoved "revoked")."""
        v = self.visitors.pop(to_ipv4(home_address), None)
        if v is None:
            return False
        self._event(VisitorRemoved(v, "revoked"))
        return True

    # ------------------------------------------------------------------ registration relay

    def receive_datagram(self, data: bytes, src, src_port: int, dst, now: float) -> None:
        """Process a UDP datagram on port 434 (requests from MNs, replies from HAs)."""
        self.counters["received"] += 1
        src = to_ipv4(src)
        try:
            msg = decode_message(data)
        except MipDecodeError as exc:
            self._drop("malformed", str(exc))
            self._poorly_formed(data, src, src_port)
            return
        if isinstance(msg, RegistrationRequest):
            self._request(msg, src, src_port, now)
        elif isinstance(msg, RegistrationReply):
            self._reply(msg, src, now)
        else:
            self._drop("unexpected_message", f"type {msg.type}")

    def _poorly_formed(self, data, src, src_port) -> None:
        # a request whose fixed part is readable but whose extensions are not: answer 70
        if isinstance(data, (bytes, bytearray)) and len(data) >= 24 \
                and data[0] == MSG_REGISTRATION_REQUEST:
            _, _, _, hoa, ha, _, ident = struct.unpack_from("!BBHIIIQ", data)
            rep = RegistrationReply(ReplyCode.FA_POORLY_FORMED_REQUEST, 0, IPv4Address(hoa),
                                    IPv4Address(ha), ident)
            self._send_to_mn(rep, IPv4Address(hoa), src, src_port)

    def _deny(self, req: RegistrationRequest, code: int, mn_address, mn_port,
              lifetime: int = 0) -> None:
        rep = RegistrationReply(int(code), lifetime, req.home_address, req.home_agent,
                                req.identification)
        self.counters["denied"] += 1
        self.counters[f"denied_{int(code)}"] += 1
        self._send_to_mn(rep, req.home_address, mn_address, mn_port)

    def _send_to_mn(self, rep: RegistrationReply, hoa, mn_address, mn_port) -> None:
        sa = self.config.mn_sas.get(hoa)
        if sa is not None:
            rep = sign(rep, sa, EXT_MFAE)
        self._out.append(Datagram(mn_address, mn_port, rep.encode(), self.config.address,
                                  self.config.port))

    def _request(self, req: RegistrationRequest, src, src_port, now) -> None:
        cfg = self.config
        mn_sa = cfg.mn_sas.get(req.home_address)
        if mn_sa is not None:
            if check(req, mn_sa, EXT_MFAE) is not AuthResult.OK:
                self._drop("mn_auth_failed", str(req.home_address))
                return self._deny(req, ReplyCode.FA_MN_FAILED_AUTH, src, src_port)
        elif cfg.require_mn_auth:
            self._drop("mn_auth_failed", f"{req.home_address}: no MN-FA security association")
            return self._deny(req, ReplyCode.FA_MN_FAILED_AUTH, src, src_port)
        relayed = req.truncated_after(EXT_MHAE)
        if relayed is None:
            return self._deny(req, ReplyCode.FA_POORLY_FORMED_REQUEST, src, src_port)
        if req.home_agent == _ZERO:
            return self._deny(req, ReplyCode.FA_NONZERO_HA_REQUIRED, src, src_port)
        if cfg.allowed_home_agents is not None and req.home_agent not in cfg.allowed_home_agents:
            return self._deny(req, ReplyCode.FA_PROHIBITED, src, src_port)
        new_visitor = req.home_address not in self.visitors
        if len(self._pending) >= cfg.max_pending or cfg.busy and new_visitor or (
                new_visitor and cfg.max_visitors is not None
                and len(self.visitors) + len(self._pending) >= cfg.max_visitors):
            return self._deny(req, ReplyCode.FA_INSUFFICIENT_RESOURCES, src, src_port)
        if req.lifetime > cfg.registration_lifetime:
            return self._deny(req, ReplyCode.FA_LIFETIME_TOO_LONG, src, src_port,
                              cfg.registration_lifetime)
        flags = req.flags
        if not flags & RegFlag.D and req.care_of_address not in cfg.care_of_addresses:
            return self._deny(req, ReplyCode.FA_INVALID_COA, src, src_port)
        if flags & RegFlag.T and not cfg.reverse_tunnel:
            return self._deny(req, ReplyCode.FA_REVERSE_TUNNEL_UNAVAILABLE, src, src_port)
        if not flags & RegFlag.T and cfg.reverse_tunnel_required and req.lifetime:
            return self._deny(req, ReplyCode.FA_REVERSE_TUNNEL_MANDATORY, src, src_port)
        if (flags & RegFlag.M and ENCAP_MINIMAL not in cfg.encapsulations) or \
                (flags & RegFlag.G and ENCAP_GRE not in cfg.encapsulations):
            return self._deny(req, ReplyCode.FA_ENCAPSULATION_UNAVAILABLE, src, src_port)
        ha_sa = cfg.ha_sas.get(req.home_agent)
        if ha_sa is not None:
            relayed = sign(relayed, ha_sa, EXT_FHAE)
        key = (req.home_address, low32(req.identification))
        p = _Pending(req, src, src_port, now + cfg.pending_timeout, now)
        self._pending[key] = p
        heapq.heappush(self._heap, (p.deadline, next(self._n), "pending", key))
        self.counters["requests_relayed"] += 1
        out_src = req.care_of_address if not flags & RegFlag.D else cfg.address
        self._out.append(Datagram(req.home_agent, cfg.port, relayed.encode(), out_src, cfg.port))

    def _reply(self, rep: RegistrationReply, src, now) -> None:
        cfg = self.config
        key = (rep.home_address, low32(rep.identification))
        p = self._pending.get(key)
        if p is None:
            self._drop("unmatched_reply", str(rep.home_address))
            return
        req = p.request
        if to_ipv4(src) != req.home_agent:
            # only the home agent the request went to may answer it
            self._drop("reply_from_wrong_source", str(src))
            return
        ha_sa = cfg.ha_sas.get(req.home_agent)
        if ha_sa is not None:
            if check(rep, ha_sa, EXT_FHAE) is not AuthResult.OK:
                # counted and dropped; the pending request stays for the genuine reply, so a
                # forged one cannot cancel it. Without one, the node gets 68 when it times out.
                self._drop("ha_auth_failed", str(src))
                p.ha_auth_failed = True
                return
        elif cfg.require_ha_auth:
            self._drop("ha_auth_failed", f"{src}: no FA-HA security association")
            del self._pending[key]
            return self._deny(req, ReplyCode.FA_HA_FAILED_AUTH, p.mn_address, p.mn_port)
        del self._pending[key]
        relayed = rep.truncated_after(EXT_MHAE)
        if relayed is None:
            self.counters["poorly_formed_replies"] += 1
            return self._deny(req, ReplyCode.FA_POORLY_FORMED_REPLY, p.mn_address, p.mn_port)
        self.counters["replies_relayed"] += 1
        self._send_to_mn(relayed, req.home_address, p.mn_address, p.mn_port)
        if not is_accepted(rep.code):
            return
        hoa = req.home_address
        old = self.visitors.get(hoa)
        lifetime = min(rep.lifetime, req.lifetime)
        if lifetime == 0:
            if old is not None:
                del self.visitors[hoa]
                self._event(VisitorRemoved(old, "deregistered"))
            return
        infinite = lifetime == 0xFFFF
        v = Visitor(home_address=hoa, home_agent=req.home_agent,
                    care_of_address=req.care_of_address, mn_address=p.mn_address,
                    mn_port=p.mn_port, lifetime=lifetime, registered_at=p.sent_at,
                    expires_at=None if infinite else p.sent_at + lifetime,
                    reverse_tunnel=bool(req.flags & RegFlag.T),
                    encapsulating_delivery=req.find(EXT_ENCAP_DELIVERY_STYLE) is not None,
                    identification=req.identification)
        self.visitors[hoa] = v
        if v.expires_at is not None:
            heapq.heappush(self._heap, (v.expires_at, next(self._n), "visitor", hoa))
        self._event(VisitorAdded(v) if old is None else VisitorUpdated(v, old))
