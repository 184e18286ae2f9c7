"""Home agent engine (sans-I/O).

Usage (the daemon owns the socket on UDP 434 and the kernel tunnels)::

    ha = HomeAgent(HaConfig(address="10.1.0.1", nodes=[HaNode("10.1.0.10", sa)],
                            trusted_prefixes=["10.1.0.0/16"]))
    ha.receive_datagram(data, src_ip, src_port, dst_ip, time.time())
    for dgram in ha.datagrams_to_send(): sock.sendto(dgram.data, dgram.addr)
    while (ev := ha.next_event()) is not None: kernel.apply(ev)   # BindingAdded/...
    deadline = ha.get_timer()  ->  ha.handle_timer(now) once it has passed

Request processing, in order, and the reply code of each failed check:

1. undecodable datagram: dropped, counted (``malformed``); unknown home
   address (and no NAI naming a configured node when the home address is
   0.0.0.0): dropped (``unknown_home_address``); nothing is sent for either;
2. Mobile-Home authentication missing / wrong SPI / wrong authenticator: 131;
3. Foreign-Home authentication: if the request's IP source has an FA
   security association, a valid FHAE is required, and with
   ``require_fa_auth`` every request not co-located needs one: 132;
4. the Home Agent field is not our address: 136;
5. identification (timestamp outside the tolerance or not newer than the
   last accepted one; nonce not the one we handed out): 133, with our time
   (or a fresh nonce) in the high 32 bits and the request's low 32 bits;
6. node disabled by configuration: 129;
7. poorly formed (lifetime > 0 with a 0.0.0.0 care-of address, UDP tunnel
   request sub-type other than 0): 134;
8. reverse tunnelling (T) requested but not supported: 137; not requested
   but mandatory for the node: 138;
9. minimal (M) or GRE (G) encapsulation, or a UDP tunnel encapsulation, we
   do not offer: 139;
10. UDP tunnelling needed (NAT seen or F set) but not allowed for the node:
    142 (without NAT and F it is declined in the UDP Tunnel Reply, code 64);
11. simultaneous bindings: S set while ``max_bindings_per_node`` is 1 gives
    code 1 (accepted, binding replaced); a new binding beyond the limit: 135;
12. binding cache full (``max_bindings``): 130;
13. otherwise 0, lifetime = min(requested, the node's or global cap).

Lifetime 0 deregisters (all bindings when the care-of address is the home
address or S is clear, else that care-of address only). A reply to an
accepted request carries the Trusted Networks Configured extension when the
request's IP source lies in ``trusted_prefixes`` (RFC 5265). Every reply
carries a Mobile-Home authentication extension, and a Foreign-Home one when
the request came from an FA we share a security association with.
"""

from __future__ import annotations

import heapq
import secrets
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_network
from typing import Callable, Mapping, Sequence

from .auth import (
    AuthResult,
    ReplayMode,
    SecurityAssociation,
    check,
    high32,
    low32,
    ntp_timestamp,
    sign,
    timestamp_acceptable,
)
from .constants import (
    ENCAP_GRE,
    ENCAP_IPIP,
    ENCAP_MINIMAL,
    EXT_FHAE,
    EXT_NAI,
    EXT_UDP_TUNNEL_REQUEST,
    LIFETIME_INFINITE,
    MIP_PORT,
    UDP_TUNNEL_DECLINED,
    UDP_TUNNEL_DEFAULT_KEEPALIVE,
    UDP_TUNNEL_WILL_TUNNEL,
    RegFlag,
    ReplyCode,
    UdpTunnelReplyFlag,
    UdpTunnelRequestFlag,
)
from .engine import Datagram, EngineBase
from .errors import MipConfigError, MipDecodeError
from .messages import (
    RegistrationReply,
    RegistrationRequest,
    TrustedNetworksConfigured,
    TunnelData,
    UdpTunnelReply,
    decode_message,
    to_ipv4,
)

__all__ = [
    "HaNode",
    "HaConfig",
    "Binding",
    "BindingAdded",
    "BindingUpdated",
    "BindingRemoved",
    "TunnelPacket",
    "HomeAgent",
]

_ZERO = IPv4Address(0)
# plain ints: IntFlag arithmetic is slow on the hot path
_S, _D, _M, _G, _T = (int(RegFlag.S), int(RegFlag.D), int(RegFlag.M), int(RegFlag.G),
                      int(RegFlag.T))


@dataclass
class HaNode:
    """Per-mobile-node configuration of the home agent.

    ``nai`` (optional) lets a node register with home address 0.0.0.0 and
    its NAI (RFC 2794); ``max_lifetime`` overrides the global cap.
    """

    home_address: IPv4Address
    sa: SecurityAssociation
    nai: bytes | str | None = None
    reverse_tunnel_required: bool = False
    udp_tunnel_allowed: bool = True
    max_lifetime: int | None = None
    enabled: bool = True

    def __post_init__(self):
        self.home_address = to_ipv4(self.home_address)
        if isinstance(self.nai, str):
            self.nai = self.nai.encode("utf-8")
        if not isinstance(self.sa, SecurityAssociation):
            raise MipConfigError("HaNode.sa must be a SecurityAssociation")


@dataclass
class HaConfig:
    """Home agent configuration.

    ``fa_sas`` maps a foreign agent's address (the IP source of the requests
    it relays) to the FA-HA security association. ``encapsulations`` lists
    what the kernel side can do (4 IP-in-IP, 47 GRE, 55 minimal);
    ``udp_encapsulations`` what may be carried in RFC 3519 UDP tunnels.
    """

    address: IPv4Address
    nodes: Sequence[HaNode] = ()
    max_lifetime: int = 1800
    trusted_prefixes: Sequence = ()
    fa_sas: Mapping = field(default_factory=dict)
    require_fa_auth: bool = False
    reverse_tunnel_supported: bool = True
    encapsulations: frozenset = frozenset({ENCAP_IPIP})
    udp_encapsulations: frozenset = frozenset({ENCAP_IPIP})
    max_bindings_per_node: int = 1
    max_bindings: int | None = None
    udp_keepalive: int = UDP_TUNNEL_DEFAULT_KEEPALIVE
    port: int = MIP_PORT

    def __post_init__(self):
        self.address = to_ipv4(self.address)
        self.trusted_prefixes = tuple(
            p if isinstance(p, IPv4Network) else ip_network(p, strict=False)
            for p in self.trusted_prefixes)
        self.fa_sas = {to_ipv4(k): v for k, v in dict(self.fa_sas).items()}
        if not 0 <= self.max_lifetime <= LIFETIME_INFINITE:
            raise MipConfigError("max_lifetime out of range")
        if self.max_bindings_per_node < 1:
            raise MipConfigError("max_bindings_per_node must be >= 1")


@dataclass(frozen=True)
class Binding:
    """One mobility binding: home address -> care-of address.

    ``lifetime`` is the granted lifetime (0xFFFF: infinite, ``expires_at``
    None); ``source_address``/``source_port`` are where the request came
    from (a NAT's public side, or the FA); ``nat_detected`` is True when that
    source differs from the care-of address; ``udp_tunnel`` when RFC 3519
    UDP encapsulation was agreed; ``foreign_agent`` is the relaying FA's
    address for a registration through an FA (D clear); ``trusted`` when the
    TNC extension was sent; ``encapsulation`` 4, 47 or 55.
    """

    home_address: IPv4Address
    care_of_address: IPv4Address
    lifetime: int
    registered_at: float
    expires_at: float | None
    flags: RegFlag
    source_address: IPv4Address
    source_port: int
    nat_detected: bool
    udp_tunnel: bool
    reverse_tunnel: bool
    foreign_agent: IPv4Address | None
    trusted: bool
    encapsulation: int
    identification: int
    nai: bytes | None = None


@dataclass(frozen=True)
class BindingAdded:
    binding: Binding


@dataclass(frozen=True)
class BindingUpdated:
    """A binding for the same home address replaced (new care-of address,
    renewed lifetime or changed flags). ``previous`` is the old one."""

    binding: Binding
    previous: Binding


@dataclass(frozen=True)
class BindingRemoved:
    """``reason``: "deregistered", "expired", "replaced" or "revoked"."""

    binding: Binding
    reason: str


@dataclass(frozen=True)
class TunnelPacket:
    """An inner packet received in an RFC 3519 UDP tunnel data message."""

    home_address: IPv4Address
    care_of_address: IPv4Address
    next_header: int
    payload: bytes


class _NodeState:
    __slots__ = ("node", "last_ident", "ha_nonce")

    def __init__(self, node: HaNode):
        self.node = node
        self.last_ident: int | None = None
        self.ha_nonce: int | None = None


class HomeAgent(EngineBase):
    """The home agent state machine. See the module docstring for the rules.

    ``bindings`` maps home address -> {care-of address: Binding}. ``rng``
    returns 32 random bits (nonces); tests may inject a deterministic one.
    """

    def __init__(self, config: HaConfig, rng: Callable[[], int] | None = None):
        super().__init__()
        self.config = config
        self._rng = rng or (lambda: secrets.randbits(32))
        self._nodes: dict[IPv4Address, _NodeState] = {}
        self._by_nai: dict[bytes, _NodeState] = {}
        for node in config.nodes:
            self.add_node(node)
        self.bindings: dict[IPv4Address, dict[IPv4Address, Binding]] = {}
        self._count = 0
        self._heap: list = []
        self._udp_peers: dict[tuple, Binding] = {}
        self._trusted = [(int(p.network_address), int(p.netmask)) for p in config.trusted_prefixes]

    # ------------------------------------------------------------------ config

    def add_node(self, node: HaNode) -> None:
        """Add (or replace) a node's configuration at run time."""
        if node.home_address in self._nodes:
            self.remove_node(node.home_address)
        state = _NodeState(node)
        self._nodes[node.home_address] = state
        if node.nai:
            self._by_nai[node.nai] = state

    def remove_node(self, home_address, now: float | None = None) -> None:
        """Forget a node; its bindings are removed (reason "revoked")."""
        hoa = to_ipv4(home_address)
        state = self._nodes.pop(hoa, None)
        if state is not None and state.node.nai:
            self._by_nai.pop(state.node.nai, None)
        self.revoke(hoa)

    # ------------------------------------------------------------------ saved state

    def restore(self, bindings, identifications=None, now: float | None = None) -> list[Binding]:
        """Put saved state back after a restart: the still-valid ``bindings``
        of configured nodes (BindingAdded events follow, as for registrations)
        and each node's last accepted identification (``{home address: int}``,
        never moved backwards), so a request replayed from before the restart
        is still refused. Returns the bindings installed."""
        live = []
        multi = self.config.max_bindings_per_node > 1
        for b in bindings:
            if now is not None and b.expires_at is not None and b.expires_at <= now:
                continue
            if b.home_address not in self._nodes:
                continue                     # the node left the configuration
            if self.config.max_bindings is not None and self._count >= self.config.max_bindings:
                break
            self._install(b, multi)
            live.append(b)
        for hoa, ident in (identifications or {}).items():
            state = self._nodes.get(to_ipv4(hoa))
            if state is not None and (state.last_ident is None or int(ident) > state.last_ident):
                state.last_ident = int(ident)
        return live

    def identifications(self) -> dict[IPv4Address, int]:
        """The last accepted identification of each node (what :meth:`restore` takes back)."""
        return {hoa: st.last_ident for hoa, st in self._nodes.items() if st.last_ident is not None}

    # ------------------------------------------------------------------ input

    def receive_datagram(self, data: bytes, src, src_port: int, dst, now: float) -> None:
        """Process one UDP datagram received on port 434.

        ``src``/``src_port`` are the datagram's IP source and UDP source port
        (replies go back there), ``dst`` the local address it arrived on.
        """
        self.counters["received"] += 1
        try:
            msg = decode_message(data)
        except MipDecodeError as exc:
            self._drop("malformed", str(exc))
            return
        src = to_ipv4(src)
        if isinstance(msg, RegistrationRequest):
            self._request(msg, src, src_port, to_ipv4(dst) if dst is not None else None, now)
        elif isinstance(msg, TunnelData):
            self._tunnel_data(msg, src, src_port)
        else:
            self._drop("unexpected_message", f"type {msg.type}")

    def get_timer(self) -> float | None:
        """Deadline of the next binding expiry, or None."""
        heap = self._heap
        while heap:
            deadline, _, hoa, coa = heap[0]
            b = self.bindings.get(hoa, {}).get(coa)
            if b is not None and b.expires_at == deadline:
                return deadline
            heapq.heappop(heap)  # stale entry (renewed or removed)
        return None

    def handle_timer(self, now: float) -> None:
        """Expire every binding whose lifetime has run out by ``now``."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, hoa, coa = heapq.heappop(heap)
            b = self.bindings.get(hoa, {}).get(coa)
            if b is not None and b.expires_at == deadline:
                self._remove(b, "expired")
                self.counters["expired"] += 1

    # ------------------------------------------------------------------ API for the daemon

    def revoke(self, home_address, care_of_address=None) -> int:
        """Remove a node's bindings (all, or one care-of address) administratively.

        Emits BindingRemoved(reason="revoked"); returns how many were removed.
        """
        per = self.bindings.get(to_ipv4(home_address))
        if not per:
            return 0
        victims = list(per.values()) if care_of_address is None else \
            [b for b in per.values() if b.care_of_address == to_ipv4(care_of_address)]
        for b in victims:
            self._remove(b, "revoked")
        return len(victims)

    def send_tunnel_data(self, home_address, payload: bytes, next_header: int = 4) -> bool:
        """Queue ``payload`` to a UDP-tunnelled mobile node (RFC 3519 type 4).

        Sent to the address/port its registration came from. Returns False
        when the node has no UDP-tunnel binding.
        """
        per = self.bindings.get(to_ipv4(home_address))
        if not per:
            return False
        for b in per.values():
            if b.udp_tunnel:
                self._out.append(Datagram(b.source_address, b.source_port,
                                          TunnelData(next_header, payload).encode(),
                                          self.config.address, self.config.port))
                return True
        return False

    def binding_for(self, home_address) -> Binding | None:
        """The (first) binding of a home address, or None."""
        per = self.bindings.get(to_ipv4(home_address))
        return next(iter(per.values())) if per else None

    # ------------------------------------------------------------------ internals

    def _tunnel_data(self, msg: TunnelData, src, src_port) -> None:
        b = self._udp_peers.get((src, src_port))
        if b is None:
            self._drop("tunnel_data_unknown_peer", f"{src}:{src_port}")
            return
        self.counters["tunnel_data"] += 1
        self._event(TunnelPacket(b.home_address, b.care_of_address, msg.next_header,
                                 msg.payload))

    def _request(self, req: RegistrationRequest, src, src_port, dst, now) -> None:
        cfg = self.config
        state = self._nodes.get(req.home_address)
        if state is None and req.home_address == _ZERO:
            nai = req.covered(EXT_NAI)
            if nai is not None:
                state = self._by_nai.get(nai.nai)
        if state is None:
            self._drop("unknown_home_address", str(req.home_address))
            return
        node = state.node
        reply = _ReplyContext(self, state, req, src, src_port, dst, now)

        # 2. mobile-home authentication
        res = check(req, node.sa)
        if res is not AuthResult.OK:
            self._drop("mn_auth_failed", f"{node.home_address}: {res.value}")
            return reply.send(ReplyCode.HA_MN_FAILED_AUTH)
        # 3. foreign-home authentication
        fa_sa = cfg.fa_sas.get(src)
        if fa_sa is not None:
            if check(req, fa_sa, EXT_FHAE) is not AuthResult.OK:
                self._drop("fa_auth_failed", str(src))
                return reply.send(ReplyCode.HA_FA_FAILED_AUTH)
            reply.fa_sa = fa_sa
        elif cfg.require_fa_auth and not int(req.flags) & _D:
            self._drop("fa_auth_failed", f"{src}: no FA security association")
            return reply.send(ReplyCode.HA_FA_FAILED_AUTH)
        # 4. home agent address
        if req.home_agent != cfg.address:
            self.counters["unknown_ha_address"] += 1
            return reply.send(ReplyCode.HA_UNKNOWN_HA_ADDRESS)
        # 5. identification
        if node.sa.replay is ReplayMode.TIMESTAMP:
            if not timestamp_acceptable(req.identification, now, node.sa.tolerance,
                                        state.last_ident):
                self.counters["identification_mismatch"] += 1
                return reply.send(ReplyCode.HA_IDENTIFICATION_MISMATCH)
            state.last_ident = req.identification
        else:
            if state.ha_nonce is None or high32(req.identification) != state.ha_nonce:
                self.counters["identification_mismatch"] += 1
                return reply.send(ReplyCode.HA_IDENTIFICATION_MISMATCH)
        # from here on the request is authentic and fresh
        if req.lifetime == 0:
            return self._deregister(req, reply, node)
        # 6. administrative
        if not node.enabled:
            return reply.send(ReplyCode.HA_PROHIBITED)
        # 7. poorly formed
        utr = req.covered(EXT_UDP_TUNNEL_REQUEST)
        if req.care_of_address == _ZERO or (utr is not None and utr.sub_type != 0):
            return reply.send(ReplyCode.HA_POORLY_FORMED_REQUEST)
        # 8. reverse tunnelling
        flags = int(req.flags)
        if flags & _T and not cfg.reverse_tunnel_supported:
            return reply.send(ReplyCode.HA_REVERSE_TUNNEL_UNAVAILABLE)
        if not flags & _T and node.reverse_tunnel_required:
            return reply.send(ReplyCode.HA_REVERSE_TUNNEL_MANDATORY)
        # 9. encapsulation
        encap = ENCAP_GRE if flags & _G else ENCAP_MINIMAL if flags & _M \
            else ENCAP_IPIP
        if ((flags & _G and ENCAP_GRE not in cfg.encapsulations)
                or (flags & _M and ENCAP_MINIMAL not in cfg.encapsulations)
                or (utr is not None and utr.encapsulation not in cfg.udp_encapsulations)):
            return reply.send(ReplyCode.HA_ENCAPSULATION_UNAVAILABLE)
        # 10. UDP tunnelling (RFC 3519)
        nat = src != req.care_of_address
        udp = False
        if utr is not None:
            force = bool(utr.flags & UdpTunnelRequestFlag.F)
            if (nat or force) and not node.udp_tunnel_allowed:
                return reply.send(ReplyCode.HA_UDP_ENCAPSULATION_UNAVAILABLE)
            if nat or force:
                udp = True
                reply.extensions.append(UdpTunnelReply(
                    UDP_TUNNEL_WILL_TUNNEL, UdpTunnelReplyFlag.F if force else 0,
                    cfg.udp_keepalive))
                encap = utr.encapsulation
            else:
                reply.extensions.append(UdpTunnelReply(UDP_TUNNEL_DECLINED, 0, cfg.udp_keepalive))
        # 11. simultaneous bindings
        hoa = node.home_address
        per = self.bindings.get(hoa, {})
        code = ReplyCode.ACCEPTED
        multi = bool(flags & _S)
        if multi and cfg.max_bindings_per_node <= 1:
            code = ReplyCode.ACCEPTED_NO_SIMULTANEOUS
            multi = False
        if multi and req.care_of_address not in per and len(per) >= cfg.max_bindings_per_node:
            return reply.send(ReplyCode.HA_TOO_MANY_BINDINGS)
        # 12. resources
        new_entry = req.care_of_address not in per if multi else not per
        if new_entry and cfg.max_bindings is not None and self._count >= cfg.max_bindings:
            return reply.send(ReplyCode.HA_INSUFFICIENT_RESOURCES)
        # 13. accept
        cap = node.max_lifetime if node.max_lifetime is not None else cfg.max_lifetime
        granted = min(req.lifetime, cap)
        infinite = granted == LIFETIME_INFINITE
        isrc = int(src)
        trusted = any(isrc & mask == net for net, mask in self._trusted)
        nai = req.covered(EXT_NAI)
        binding = Binding(
            home_address=hoa, care_of_address=req.care_of_address, lifetime=granted,
            registered_at=now, expires_at=None if infinite else now + granted, flags=req.flags,
            source_address=src, source_port=src_port, nat_detected=nat, udp_tunnel=udp,
            reverse_tunnel=bool(flags & _T),
            foreign_agent=None if flags & _D else src, trusted=trusted,
            encapsulation=encap, identification=req.identification,
            nai=nai.nai if nai is not None else None)
        self._install(binding, multi)
        if trusted:
            reply.extensions.append(TrustedNetworksConfigured())
        self.counters["accepted"] += 1
        reply.send(code, granted)

    def _deregister(self, req, reply, node) -> None:
        per = self.bindings.get(node.home_address, {})
        if req.care_of_address == node.home_address or not int(req.flags) & _S:
            victims = list(per.values())
        else:
            victims = [b for b in per.values() if b.care_of_address == req.care_of_address]
        for b in victims:
            self._remove(b, "deregistered")
        self.counters["deregistered"] += 1
        reply.send(ReplyCode.ACCEPTED, 0)

    def _install(self, binding: Binding, multi: bool) -> None:
        hoa = binding.home_address
        per = self.bindings.get(hoa, {})
        previous = per.get(binding.care_of_address)
        if not multi:
            if previous is None and per:
                previous = next(iter(per.values()))
            for b in list(per.values()):
                if b is not previous:
                    self._remove(b, "replaced")
            if previous is not None:
                self._forget(previous)
        elif previous is not None:
            self._forget(previous)
        self.bindings.setdefault(hoa, {})[binding.care_of_address] = binding
        self._count += 1
        if binding.udp_tunnel:
            self._udp_peers[(binding.source_address, binding.source_port)] = binding
        if binding.expires_at is not None:
            heapq.heappush(self._heap, (binding.expires_at, id(binding), hoa,
                                        binding.care_of_address))
            if len(self._heap) > 2 * self._count + 64:
                self._compact()
        self._event(BindingAdded(binding) if previous is None
                    else BindingUpdated(binding, previous))

    def _forget(self, b: Binding) -> None:
        per = self.bindings.get(b.home_address)
        if per is not None and per.get(b.care_of_address) is b:
            del per[b.care_of_address]
            if not per:
                del self.bindings[b.home_address]
            self._count -= 1
        if b.udp_tunnel and self._udp_peers.get((b.source_address, b.source_port)) is b:
            del self._udp_peers[(b.source_address, b.source_port)]

    def _remove(self, b: Binding, reason: str) -> None:
        self._forget(b)
        self._event(BindingRemoved(b, reason))

    def _compact(self) -> None:
        self._heap = [(b.expires_at, id(b), b.home_address, b.care_of_address)
                      for per in self.bindings.values() for b in per.values()
                      if b.expires_at is not None]
        heapq.heapify(self._heap)


class _ReplyContext:
    """Builds and queues the reply to one request."""

    __slots__ = ("ha", "state", "req", "src", "src_port", "dst", "now", "fa_sa", "extensions")

    def __init__(self, ha, state, req, src, src_port, dst, now):
        self.ha = ha
        self.state = state
        self.req = req
        self.src = src
        self.src_port = src_port
        self.dst = dst
        self.now = now
        self.fa_sa = None
        self.extensions: list = []

    def send(self, code: int, lifetime: int = 0) -> None:
        ha, req, state = self.ha, self.req, self.state
        sa = state.node.sa
        if sa.replay is ReplayMode.TIMESTAMP:
            if code == ReplyCode.HA_IDENTIFICATION_MISMATCH:
                ident = (high32(ntp_timestamp(self.now)) << 32) | low32(req.identification)
            else:
                ident = req.identification
        else:
            # an unauthenticated request must not move the nonce the genuine node needs next
            if code not in (ReplyCode.HA_MN_FAILED_AUTH, ReplyCode.HA_FA_FAILED_AUTH):
                state.ha_nonce = ha._rng() & 0xFFFFFFFF
            ident = (state.ha_nonce << 32) | low32(req.identification)
        exts = tuple(self.extensions) if code in (0, 1) else ()
        rep = RegistrationReply(int(code), lifetime, state.node.home_address,
                                ha.config.address, ident, exts)
        rep = sign(rep, sa)
        if self.fa_sa is not None:
            rep = sign(rep, self.fa_sa, EXT_FHAE)
        if code not in (0, 1):
            ha.counters["denied"] += 1
            ha.counters[f"denied_{int(code)}"] += 1
        ha.counters["replies"] += 1
        ha._out.append(Datagram(self.src, self.src_port, rep.encode(),
                                self.dst or ha.config.address, ha.config.port))
