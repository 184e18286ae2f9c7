"""Mobile node engine (sans-I/O).

Usage::

    mn = MobileNode(MnConfig(home_address="10.1.0.10", home_agent="10.1.0.1", sa=sa))
    mn.register(now, care_of_address="192.0.2.7")            # co-located CoA
    mn.register(now, care_of_address=fa_coa, foreign_agent=fa) # through an FA
    ... send mn.datagrams_to_send(); feed replies with
    mn.receive_datagram(data, src_ip, src_port, dst_ip, now)
    ... arm mn.get_timer(); call mn.handle_timer(now) when it passes
    ... read mn.next_event(): Registered / Denied / TimedOut / Deregistered /
        RegistrationExpired / AgentAdvertised / TunnelPacket

Behaviour:

* one registration attempt at a time (a new ``register``/``deregister``
  replaces a pending one). The request is retransmitted after
  ``initial_timeout`` seconds, the timeout doubling each time up to
  ``max_timeout`` (and never beyond the requested lifetime), at most
  ``max_retransmissions`` times; then :class:`TimedOut`. In timestamp mode
  every (re)transmission carries a fresh identification; in nonce mode the
  same bytes are resent;
* a reply is believed only if it authenticates (Mobile-Home extension with
  our SA; an FA's own denial 64-127 needs a valid Mobile-Foreign extension
  when ``fa_sa`` is set, else is accepted only if
  ``accept_unauthenticated_fa_denials``) and its identification's low 32
  bits match one of the transmissions of the pending attempt. Anything else
  is counted in ``counters`` and dropped, never reported;
* code 133 (identification mismatch), once authenticated and matched,
  resynchronises: timestamps take the home agent's clock offset from the
  high 32 bits, nonces take the home agent's new nonce; the request is sent
  again at once (at most ``max_resync`` times in a row, then Denied(133));
* an accepted registration schedules a renewal at ``renew_fraction`` of the
  granted lifetime (counted from when the answered request was sent) and
  reports :class:`RegistrationExpired` if the binding runs out regardless;
* :class:`Registered` says whether a Trusted Networks Configured extension
  (RFC 5265) was inside the authenticated part of the reply.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Callable

from .auth import (
    AuthResult,
    ReplayMode,
    SecurityAssociation,
    check,
    high32,
    low32,
    ntp_timestamp,
    sign,
)
from .constants import (
    ALL_ROUTERS_MULTICAST,
    EXT_MFAE,
    EXT_TNC,
    EXT_UDP_TUNNEL_REPLY,
    LIFETIME_INFINITE,
    MIP_PORT,
    NTP_EPOCH_OFFSET,
    UDP_TUNNEL_WILL_TUNNEL,
    RegFlag,
    ReplyCode,
    UdpTunnelRequestFlag,
    is_accepted,
    is_fa_code,
)
from .engine import Datagram, EngineBase, IcmpPacket
from .errors import MipConfigError, MipDecodeError
from .icmp import AgentAdvertisement, AgentSolicitation, decode_icmp
from .messages import (
    EncapsulatingDeliveryStyle,
    NaiExtension,
    RegistrationReply,
    RegistrationRequest,
    TunnelData,
    UdpTunnelRequest,
    decode_message,
    to_ipv4,
)

__all__ = [
    "MnConfig",
    "MnBinding",
    "MobileNode",
    "Registered",
    "Denied",
    "TimedOut",
    "Deregistered",
    "RegistrationExpired",
    "AgentAdvertised",
    "MnTunnelPacket",
]


@dataclass
class MnConfig:
    """Mobile node configuration.

    ``flags`` adds request flags (S, B, M, G); D and T are set by the engine
    (D for a co-located care-of address, T when ``reverse_tunnel``).
    ``udp_tunnel`` adds an RFC 3519 UDP Tunnel Request to co-located
    registrations (``udp_tunnel_force`` sets its F flag).
    ``encapsulating_delivery`` adds the RFC 3024 delivery-style extension
    to registrations through a foreign agent with reverse tunnelling.
    ``src_port`` is the UDP source port the daemon sends from (None: any).
    """

    home_address: IPv4Address
    home_agent: IPv4Address
    sa: SecurityAssociation
    nai: bytes | str | None = None
    lifetime: int = 1800
    reverse_tunnel: bool = True
    flags: RegFlag = RegFlag(0)
    udp_tunnel: bool = False
    udp_tunnel_force: bool = False
    encapsulating_delivery: bool = False
    initial_timeout: float = 1.0
    max_timeout: float = 32.0
    max_retransmissions: int = 4
    renew_fraction: float = 0.75
    max_resync: int = 3
    fa_sa: SecurityAssociation | None = None
    accept_unauthenticated_fa_denials: bool = True
    port: int = MIP_PORT
    src_port: int | None = None

    def __post_init__(self):
        self.home_address = to_ipv4(self.home_address)
        self.home_agent = to_ipv4(self.home_agent)
        if isinstance(self.nai, str):
            self.nai = self.nai.encode("utf-8")
        if not 0 < self.lifetime <= LIFETIME_INFINITE:
            raise MipConfigError("lifetime must be 1..65535")
        if self.initial_timeout <= 0 or self.max_timeout < self.initial_timeout:
            raise MipConfigError("need 0 < initial_timeout <= max_timeout")
        if self.max_retransmissions < 0 or self.max_resync < 0:
            raise MipConfigError("negative retransmission or resync count")
        if not 0 < self.renew_fraction < 1:
            raise MipConfigError("renew_fraction must be in (0, 1)")


@dataclass(frozen=True)
class MnBinding:
    """The registration the home agent accepted.

    ``registered_at`` is when the answered request was sent; ``expires_at``
    None means infinite. ``foreign_agent`` is set for a registration through
    an FA. ``udp_tunnel`` when the HA agreed to RFC 3519 UDP tunnelling
    (``keepalive`` seconds then).
    """

    home_address: IPv4Address
    home_agent: IPv4Address
    care_of_address: IPv4Address
    foreign_agent: IPv4Address | None
    lifetime: int
    registered_at: float
    expires_at: float | None
    code: int
    tnc: bool
    udp_tunnel: bool
    keepalive: int | None
    reverse_tunnel: bool


@dataclass(frozen=True)
class Registered:
    """Registration accepted (code 0 or 1). ``tnc``: a valid TNC extension
    was present, i.e. the HA considers the current network trusted."""

    binding: MnBinding
    lifetime: int
    tnc: bool
    code: int = 0


@dataclass(frozen=True)
class Denied:
    """Registration refused with ``code``; ``lifetime`` is the reply's
    (for 69 it is the longest lifetime the FA accepts)."""

    code: int
    care_of_address: IPv4Address
    lifetime: int = 0
    deregistration: bool = False


@dataclass(frozen=True)
class TimedOut:
    """No acceptable reply after every retransmission."""

    care_of_address: IPv4Address
    transmissions: int
    deregistration: bool = False


@dataclass(frozen=True)
class Deregistered:
    """The home agent accepted a deregistration (lifetime 0)."""

    care_of_address: IPv4Address


@dataclass(frozen=True)
class RegistrationExpired:
    """The granted lifetime ran out without a successful renewal."""

    binding: MnBinding


@dataclass(frozen=True)
class AgentAdvertised:
    """An agent advertisement was heard. ``rebooted``: its sequence number
    fell back below 256, so the agent restarted and bindings through it are
    lost (RFC 5944 §2.4.3)."""

    source: IPv4Address
    advertisement: AgentAdvertisement
    rebooted: bool = False


@dataclass(frozen=True)
class MnTunnelPacket:
    """An inner packet the HA sent in an RFC 3519 UDP tunnel data message."""

    next_header: int
    payload: bytes


@dataclass
class _Attempt:
    care_of_address: IPv4Address
    foreign_agent: IPv4Address | None
    lifetime: int
    renewal: bool
    timeout: float
    deadline: float = 0.0
    retransmissions: int = 0
    resyncs: int = 0
    sent: list = field(default_factory=list)  # [(identification, sent_at)]
    data: bytes = b""


class MobileNode(EngineBase):
    """The mobile node's registration state machine (see module docstring)."""

    def __init__(self, config: MnConfig, rng: Callable[[], int] | None = None):
        super().__init__()
        self.config = config
        self._rng = rng or (lambda: secrets.randbits(32))
        self._attempt: _Attempt | None = None
        self._binding: MnBinding | None = None
        self._renew_at: float | None = None
        self._renew_lifetime = config.lifetime  # lifetime asked for by the last success
        self.clock_offset = 0.0  # seconds added to now for timestamps (learnt from 133)
        self._ha_nonce = 0
        self._last_ident: int | None = None
        self._adv_seq: dict[IPv4Address, int] = {}
        self._last_solicit: float | None = None

    # ------------------------------------------------------------------ state

    @property
    def binding(self) -> MnBinding | None:
        """The current accepted registration, or None."""
        return self._binding

    @property
    def pending(self) -> bool:
        """True while a request awaits its reply."""
        return self._attempt is not None

    # ------------------------------------------------------------------ commands

    def register(self, now: float, care_of_address, *, foreign_agent=None,
                 lifetime: int | None = None) -> None:
        """Start registering ``care_of_address``.

        Without ``foreign_agent`` the address is a co-located care-of
        address: the request (D set) goes straight to the home agent. With
        ``foreign_agent`` (the FA's address from its advertisement) the
        request goes to the FA and ``care_of_address`` is the FA's CoA.
        """
        coa = to_ipv4(care_of_address)
        fa = to_ipv4(foreign_agent) if foreign_agent is not None else None
        if lifetime is not None and not 0 < lifetime <= LIFETIME_INFINITE:
            raise MipConfigError("lifetime must be 1..65535 (use deregister() for 0)")
        self._renew_at = None  # the old binding is not renewed once we move on
        self._start(now, coa, fa, self.config.lifetime if lifetime is None else lifetime,
                    renewal=False)

    def deregister(self, now: float, care_of_address=None, *, foreign_agent=None) -> None:
        """Send a deregistration (lifetime 0).

        By default the care-of address is the home address: the "returned
        home" deregistration of all bindings, sent to the home agent.
        """
        coa = to_ipv4(care_of_address) if care_of_address is not None \
            else self.config.home_address
        fa = to_ipv4(foreign_agent) if foreign_agent is not None else None
        self._renew_at = None
        self._start(now, coa, fa, 0, renewal=False)

    def cancel(self) -> None:
        """Forget the pending attempt and the binding (e.g. the link went away)."""
        self._attempt = None
        self._binding = None
        self._renew_at = None

    def link_changed(self) -> None:
        """The node is on a new link: the solicitation rate limit starts afresh
        (agents there have not heard from it)."""
        self._last_solicit = None

    def solicit(self, now: float) -> bool:
        """Queue an Agent Solicitation (to 224.0.0.2, TTL 1), at most one per second."""
        if self._last_solicit is not None and now - self._last_solicit < 1.0:
            return False
        self._last_solicit = now
        self._out.append(IcmpPacket(IPv4Address(ALL_ROUTERS_MULTICAST),
                                    AgentSolicitation().encode()))
        return True

    def send_tunnel_data(self, payload: bytes, next_header: int = 4) -> bool:
        """Queue an RFC 3519 tunnel data message to the HA (needs a UDP-tunnel binding).

        It must leave from the same source port as the registration.
        """
        b = self._binding
        if b is None or not b.udp_tunnel:
            return False
        self._out.append(Datagram(self.config.home_agent, self.config.port,
                                  TunnelData(next_header, payload).encode(),
                                  b.care_of_address, self.config.src_port))
        return True

    # ------------------------------------------------------------------ input

    def receive_datagram(self, data: bytes, src, src_port: int, dst, now: float) -> None:
        """Process a UDP datagram received on the registration socket."""
        self.counters["received"] += 1
        try:
            msg = decode_message(data)
        except MipDecodeError as exc:
            self._drop("malformed", str(exc))
            return
        if isinstance(msg, RegistrationReply):
            self._reply(msg, now)
        elif isinstance(msg, TunnelData):
            b = self._binding
            if b is None or not b.udp_tunnel or to_ipv4(src) != self.config.home_agent:
                self._drop("unexpected_tunnel_data", str(src))
                return
            self._event(MnTunnelPacket(msg.next_header, msg.payload))
        else:
            self._drop("unexpected_message", f"type {msg.type}")

    def receive_icmp(self, data: bytes, src, now: float) -> None:
        """Process an agent-discovery ICMP message (without its IP header)."""
        try:
            msg = decode_icmp(data)
        except MipDecodeError as exc:
            self._drop("malformed_icmp", str(exc))
            return
        if not isinstance(msg, AgentAdvertisement):
            self.counters["solicitation_ignored"] += 1
            return
        src = to_ipv4(src)
        last = self._adv_seq.get(src)
        rebooted = last is not None and msg.sequence < 256 and \
            (last >= 256 or msg.sequence < last)
        self._adv_seq[src] = msg.sequence
        self.counters["advertisements"] += 1
        self._event(AgentAdvertised(src, msg, rebooted))

    def get_timer(self) -> float | None:
        """The next deadline (retransmission, renewal or expiry), or None."""
        times = []
        if self._attempt is not None:
            times.append(self._attempt.deadline)
        elif self._renew_at is not None:
            times.append(self._renew_at)
        if self._binding is not None and self._binding.expires_at is not None:
            times.append(self._binding.expires_at)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now``: retransmit, give up, renew, expire."""
        b = self._binding
        if b is not None and b.expires_at is not None and now >= b.expires_at:
            self._binding = None
            self._renew_at = None
            self.counters["expired"] += 1
            self._event(RegistrationExpired(b))
        att = self._attempt
        if att is not None and now >= att.deadline:
            if att.retransmissions >= self.config.max_retransmissions:
                self._attempt = None
                self.counters["timed_out"] += 1
                self._event(TimedOut(att.care_of_address, len(att.sent), att.lifetime == 0))
            else:
                att.retransmissions += 1
                att.timeout = min(att.timeout * 2, self._cap(att.lifetime))
                self.counters["retransmissions"] += 1
                self._transmit(att, now, fresh=self.config.sa.replay is ReplayMode.TIMESTAMP)
        elif att is None and self._renew_at is not None and now >= self._renew_at:
            self._renew_at = None
            b = self._binding
            if b is not None:
                self.counters["renewals"] += 1
                self._start(now, b.care_of_address, b.foreign_agent, self._renew_lifetime,
                            renewal=True)

    # ------------------------------------------------------------------ internals

    def _cap(self, lifetime: int) -> float:
        cap = self.config.max_timeout
        if 0 < lifetime < LIFETIME_INFINITE:
            cap = min(cap, float(lifetime))
        return max(cap, self.config.initial_timeout)

    def _start(self, now, coa, fa, lifetime, renewal) -> None:
        att = _Attempt(coa, fa, lifetime, renewal,
                       timeout=min(self.config.initial_timeout, self._cap(lifetime)))
        self._attempt = att
        self._transmit(att, now, fresh=True)

    def _new_identification(self, now: float) -> int:
        if self.config.sa.replay is ReplayMode.TIMESTAMP:
            ident = ntp_timestamp(now + self.clock_offset)
            if self._last_ident is not None and ident <= self._last_ident:
                ident = (self._last_ident + 1) & 0xFFFFFFFFFFFFFFFF
        else:
            ident = (self._ha_nonce << 32) | (self._rng() & 0xFFFFFFFF)
        self._last_ident = ident
        return ident

    def _build(self, att: _Attempt, ident: int) -> bytes:
        cfg = self.config
        colocated = att.foreign_agent is None
        flags = RegFlag(cfg.flags) & ~(RegFlag.D | RegFlag.T | RegFlag.R | RegFlag.X)
        if colocated:
            flags |= RegFlag.D
        if cfg.reverse_tunnel:
            flags |= RegFlag.T
        exts = []
        if cfg.nai:
            exts.append(NaiExtension(cfg.nai))
        if cfg.udp_tunnel and colocated and att.lifetime:
            exts.append(UdpTunnelRequest(
                flags=UdpTunnelRequestFlag.F if cfg.udp_tunnel_force else 0))
        req = sign(RegistrationRequest(flags, att.lifetime, cfg.home_address, cfg.home_agent,
                                       att.care_of_address, ident, tuple(exts)), cfg.sa)
        if not colocated:
            if cfg.encapsulating_delivery and cfg.reverse_tunnel:
                req = req.with_extensions(EncapsulatingDeliveryStyle())
            if cfg.fa_sa is not None:
                req = sign(req, cfg.fa_sa, EXT_MFAE)
        return req.encode()

    def _transmit(self, att: _Attempt, now: float, fresh: bool) -> None:
        if fresh or not att.data:
            ident = self._new_identification(now)
            att.data = self._build(att, ident)
            att.sent.append((ident, now))
        att.deadline = now + att.timeout
        cfg = self.config
        if att.foreign_agent is None:
            dgram = Datagram(cfg.home_agent, cfg.port, att.data, att.care_of_address,
                             cfg.src_port)
        else:
            dgram = Datagram(att.foreign_agent, cfg.port, att.data, cfg.home_address,
                             cfg.src_port)
        self.counters["requests_sent"] += 1
        self._out.append(dgram)

    def _reply(self, rep: RegistrationReply, now: float) -> None:
        cfg = self.config
        att = self._attempt
        if att is None:
            self._drop("no_pending_request")
            return
        if rep.home_address != cfg.home_address:
            self._drop("wrong_home_address", str(rep.home_address))
            return
        code = rep.code
        if is_fa_code(code):
            if att.foreign_agent is None:
                # no foreign agent relayed this request: an FA code cannot be genuine
                self._drop("fa_code_without_fa", str(code))
                return
            if cfg.fa_sa is not None:
                if check(rep, cfg.fa_sa, EXT_MFAE) is not AuthResult.OK:
                    self._drop("fa_auth_failed")
                    return
            elif not cfg.accept_unauthenticated_fa_denials:
                self._drop("unauthenticated_fa_reply")
                return
        else:
            res = check(rep, cfg.sa)
            if res is not AuthResult.OK:
                self._drop("auth_failed", res.value)
                return
            if att.foreign_agent is not None and cfg.fa_sa is not None and \
                    check(rep, cfg.fa_sa, EXT_MFAE) is not AuthResult.OK:
                self._drop("fa_auth_failed")
                return
        lo = low32(rep.identification)
        sent_at = None
        for ident, t in att.sent:
            if low32(ident) == lo:
                sent_at = t
                break
        if sent_at is None:
            self._drop("unmatched_identification")
            return
        self.counters["replies_accepted"] += 1
        if code == ReplyCode.HA_IDENTIFICATION_MISMATCH:
            return self._resync(att, rep, now)
        if cfg.sa.replay is ReplayMode.NONCE and not is_fa_code(code):
            self._ha_nonce = high32(rep.identification)
        self._attempt = None
        if att.lifetime == 0:
            if is_accepted(code):
                self._binding = None
                self._renew_at = None
                self._event(Deregistered(att.care_of_address))
            else:
                self._event(Denied(code, att.care_of_address, rep.lifetime, True))
            return
        if not is_accepted(code):
            self.counters["denied"] += 1
            self._event(Denied(code, att.care_of_address, rep.lifetime))
            return
        granted = min(rep.lifetime, att.lifetime)
        if granted == 0:  # accepted with lifetime 0: nothing is bound
            self._binding = None
            self._event(Denied(code, att.care_of_address, 0))
            return
        infinite = granted == LIFETIME_INFINITE
        tnc = rep.covered(EXT_TNC) is not None
        utr = rep.covered(EXT_UDP_TUNNEL_REPLY)
        udp = utr is not None and utr.code == UDP_TUNNEL_WILL_TUNNEL
        self._binding = MnBinding(
            home_address=cfg.home_address, home_agent=cfg.home_agent,
            care_of_address=att.care_of_address, foreign_agent=att.foreign_agent,
            lifetime=granted, registered_at=sent_at,
            expires_at=None if infinite else sent_at + granted, code=code, tnc=tnc,
            udp_tunnel=udp, keepalive=utr.keepalive if udp else None,
            reverse_tunnel=cfg.reverse_tunnel)
        self._renew_at = None if infinite else sent_at + granted * cfg.renew_fraction
        self._renew_lifetime = att.lifetime
        self.counters["registered"] += 1
        self._event(Registered(self._binding, granted, tnc, code))

    def _resync(self, att: _Attempt, rep: RegistrationReply, now: float) -> None:
        self.counters["resync"] += 1
        if att.resyncs >= self.config.max_resync:
            self._attempt = None
            self._event(Denied(rep.code, att.care_of_address, rep.lifetime, att.lifetime == 0))
            return
        if self.config.sa.replay is ReplayMode.TIMESTAMP:
            ha_time = high32(rep.identification) - NTP_EPOCH_OFFSET
            self.clock_offset = ha_time - now
            self._last_ident = None  # the HA's clock rules from now on
        else:
            self._ha_nonce = high32(rep.identification)
        att.resyncs += 1
        att.retransmissions = 0
        att.timeout = min(self.config.initial_timeout, self._cap(att.lifetime))
        self._transmit(att, now, fresh=True)
