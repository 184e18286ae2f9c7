"""Typed description of XFRM objects, and their conversion to wire messages.

Everything here is an immutable dataclass; change a field with
:func:`dataclasses.replace`. Addresses are :mod:`ipaddress` objects (strings
are accepted and converted). Key material never appears in ``repr()``.

Conversions (``sa_to_msg``, ``sa_from_msg``, ...) are pure functions between
these objects and the pyroute2 messages of :mod:`xfrm.messages`.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .constants import (IPPROTO_ESP, UDP_ENCAP_ESPINUDP, XFRM_INF, Action, Dir, Mode,
                        PolicyType, StateFlag)
from . import messages as m

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
AddressLike = Union[IPAddress, str, bytes]
NetworkLike = Union[IPNetwork, IPAddress, str]

ALL_ALGOS = 0xFFFFFFFF


def _setattr(obj, name, value):
    object.__setattr__(obj, name, value)


def ip(value: AddressLike) -> IPAddress:
    """An address from a string or ipaddress object."""
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    return ipaddress.ip_address(value)


def net(value: NetworkLike) -> IPNetwork:
    """A network from "a.b.c.d/n", an address (host route) or a network object."""
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ipaddress.ip_network(value)
    return ipaddress.ip_network(value, strict=False)


def family_of(addr) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


def pack_addr(addr: Optional[Union[IPAddress, IPNetwork]]) -> bytes:
    """xfrm_address_t: the address in network order, zero-padded to 16 bytes."""
    if addr is None:
        return bytes(16)
    if isinstance(addr, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        addr = addr.network_address
    return addr.packed.ljust(16, b"\0")


def unpack_addr(raw: bytes, family: int) -> Optional[IPAddress]:
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(bytes(raw[:4]))
    if family == socket.AF_INET6:
        return ipaddress.IPv6Address(bytes(raw[:16]))
    return None


# ------------------------------------------------------------------ pieces


@dataclass(frozen=True)
class Mark:
    """Packet mark match (XFRMA_MARK): ``skb->mark & mask == value``."""
    value: int
    mask: int = 0xFFFFFFFF


@dataclass(frozen=True)
class Selector:
    """Traffic selector (struct xfrm_selector).

    ``src``/``dst`` are networks; ports are matched only when given (their masks
    default to all ones then). ``proto`` 0 means any protocol.
    """
    src: NetworkLike
    dst: NetworkLike
    proto: int = 0
    sport: int = 0
    dport: int = 0
    sport_mask: Optional[int] = None
    dport_mask: Optional[int] = None
    ifindex: int = 0
    user: int = 0

    def __post_init__(self):
        _setattr(self, "src", net(self.src))
        _setattr(self, "dst", net(self.dst))
        if self.src.version != self.dst.version:
            raise ValueError(f"selector mixes address families: {self.src} -> {self.dst}")
        if self.sport_mask is None:
            _setattr(self, "sport_mask", 0xFFFF if self.sport else 0)
        if self.dport_mask is None:
            _setattr(self, "dport_mask", 0xFFFF if self.dport else 0)

    @property
    def family(self) -> int:
        return family_of(self.src)

    @classmethod
    def any(cls, version: int = 4) -> "Selector":
        z = "0.0.0.0/0" if version == 4 else "::/0"
        return cls(z, z)

    @classmethod
    def host_pair(cls, src: AddressLike, dst: AddressLike, **kw) -> "Selector":
        return cls(net(ip(src)), net(ip(dst)), **kw)


@dataclass(frozen=True)
class Lifetime:
    """Soft and hard limits (struct xfrm_lifetime_cfg).

    Byte and packet limits default to unlimited; seconds 0 mean no limit.
    ``*_add_seconds`` count from installation, ``*_use_seconds`` from first use.
    """
    soft_bytes: int = XFRM_INF
    hard_bytes: int = XFRM_INF
    soft_packets: int = XFRM_INF
    hard_packets: int = XFRM_INF
    soft_add_seconds: int = 0
    hard_add_seconds: int = 0
    soft_use_seconds: int = 0
    hard_use_seconds: int = 0

    _WIRE = ("soft_byte_limit", "hard_byte_limit", "soft_packet_limit",
             "hard_packet_limit", "soft_add_expires_seconds", "hard_add_expires_seconds",
             "soft_use_expires_seconds", "hard_use_expires_seconds")

    _NAMES = ("soft_bytes", "hard_bytes", "soft_packets", "hard_packets", "soft_add_seconds",
              "hard_add_seconds", "soft_use_seconds", "hard_use_seconds")

    def to_fields(self, msg, prefix: str = "") -> None:
        for wire, name in zip(self._WIRE, self._NAMES):
            msg[prefix + wire] = getattr(self, name)

    @classmethod
    def from_fields(cls, msg, prefix: str = "") -> "Lifetime":
        return cls(*(msg[prefix + wire] for wire in cls._WIRE))


@dataclass(frozen=True)
class Counters:
    """Current use of an SA or policy (struct xfrm_lifetime_cur)."""
    bytes: int = 0
    packets: int = 0
    add_time: int = 0
    use_time: int = 0


@dataclass(frozen=True)
class Stats:
    """struct xfrm_stats: replay window drops, replayed and failed packets."""
    replay_window: int = 0
    replay: int = 0
    integrity_failed: int = 0


@dataclass(frozen=True)
class ReplayState:
    """Sequence numbers and replay bitmap of an SA.

    ``esn_format`` tells which attribute carries it: XFRMA_REPLAY_ESN_VAL
    (``bitmap`` is then a tuple of 32-bit words, ``window`` its size in
    packets) or the legacy XFRMA_REPLAY_VAL (one 32-bit ``bitmap`` word).
    """
    oseq: int = 0
    seq: int = 0
    oseq_hi: int = 0
    seq_hi: int = 0
    bitmap: tuple = ()
    window: int = 0
    esn_format: bool = True

    @property
    def outbound_count(self) -> int:
        return (self.oseq_hi << 32) | self.oseq

    @property
    def inbound_count(self) -> int:
        return (self.seq_hi << 32) | self.seq


@dataclass(frozen=True)
class Encap:
    """UDP encapsulation of ESP (XFRMA_ENCAP, RFC 3948).

    On an outbound SA ``sport`` is the local port and ``dport`` the peer's;
    on an inbound SA ``sport`` is the peer's port and ``dport`` the local one.
    ``oa`` is the original address (NAT-OA), rarely needed in tunnel mode.
    """
    sport: int
    dport: int
    oa: Optional[AddressLike] = None
    type: int = UDP_ENCAP_ESPINUDP

    def __post_init__(self):
        if self.oa is not None:
            _setattr(self, "oa", ip(self.oa))
        for name in ("sport", "dport"):
            v = getattr(self, name)
            if not 0 < v < 65536:
                raise ValueError(f"encap {name} {v} is not a UDP port")


@dataclass(frozen=True)
class Aead:
    """Combined mode cipher (XFRMA_ALG_AEAD); the key includes any salt."""
    name: str
    key: bytes = field(repr=False)
    icv_bits: int = 128


@dataclass(frozen=True)
class Crypt:
    """Encryption algorithm (XFRMA_ALG_CRYPT)."""
    name: str
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class Auth:
    """Integrity algorithm (XFRMA_ALG_AUTH_TRUNC) with its truncation."""
    name: str
    key: bytes = field(repr=False)
    trunc_bits: int = 96


_HMAC_TRUNC = {"sha1": 96, "sha256": 128, "sha384": 192, "sha512": 256}
_HMAC_KEY = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}


@dataclass(frozen=True)
class Algorithms:
    """The transforms of one SA: an AEAD, or a cipher plus an integrity check."""
    aead: Optional[Aead] = None
    crypt: Optional[Crypt] = None
    auth: Optional[Auth] = None

    def __post_init__(self):
        if self.aead is not None and (self.crypt is not None or self.auth is not None):
            raise ValueError("an AEAD SA takes no separate cipher or integrity algorithm")

    @classmethod
    def gcm(cls, key: bytes, icv: int = 16) -> "Algorithms":
        """``rfc4106(gcm(aes))``: ``key`` is the AES key plus 4 salt bytes
        (20, 28 or 36 bytes); ``icv`` is 8, 12 or 16 bytes (RFC 4106)."""
        if len(key) not in (20, 28, 36):
            raise ValueError(f"AES-GCM key with salt must be 20, 28 or 36 bytes, not {len(key)}")
        if icv not in (8, 12, 16):
            raise ValueError(f"AES-GCM ICV must be 8, 12 or 16 bytes, not {icv}")
        return cls(aead=Aead("rfc4106(gcm(aes))", bytes(key), icv * 8))

    @classmethod
    def cbc_hmac(cls, enc_key: bytes, auth_key: bytes, digest: str = "sha256") -> "Algorithms":
        """``cbc(aes)`` with ``hmac(sha256|sha384|sha512)`` truncated to half its
        length (RFC 4868)."""
        if len(enc_key) not in (16, 24, 32):
            raise ValueError(f"AES-CBC key must be 16, 24 or 32 bytes, not {len(enc_key)}")
        if digest not in _HMAC_TRUNC:
            raise ValueError(f"unsupported HMAC digest {digest!r}")
        if len(auth_key) != _HMAC_KEY[digest]:
            raise ValueError(f"hmac({digest}) key must be {_HMAC_KEY[digest]} bytes, "
                             f"not {len(auth_key)}")
        return cls(crypt=Crypt("cbc(aes)", bytes(enc_key)),
                   auth=Auth(f"hmac({digest})", bytes(auth_key), _HMAC_TRUNC[digest]))

    def names(self) -> list:
        return [a.name for a in (self.aead, self.crypt, self.auth) if a is not None]


# --------------------------------------------------------------------- SA


@dataclass(frozen=True)
class SAId:
    """What identifies an SA in the kernel: destination, SPI, protocol."""
    dst: IPAddress
    spi: int
    proto: int = IPPROTO_ESP
    mark: Optional[Mark] = None

    def __str__(self):
        return f"spi=0x{self.spi:08x} dst={self.dst} proto={self.proto}"


@dataclass(frozen=True)
class SA:
    """An IPsec SA (struct xfrm_usersa_info plus attributes).

    ``src``/``dst`` are the outer addresses. ``reqid`` ties the SA to policy
    templates. ``replay_window`` is in packets; windows above 32 or ``esn``
    use XFRMA_REPLAY_ESN_VAL. ``replay`` and ``counters``, when set on an SA
    being added, restore sequence numbers and lifetime use (how an SA is moved
    without MIGRATE); dumps fill them, and ``stats``, from the kernel.
    """
    src: AddressLike
    dst: AddressLike
    spi: int
    algorithms: Algorithms = field(default_factory=Algorithms)
    reqid: int = 0
    mode: Mode = Mode.TUNNEL
    proto: int = IPPROTO_ESP
    encap: Optional[Encap] = None
    selector: Optional[Selector] = None
    replay_window: int = 32
    esn: bool = False
    lifetime: Lifetime = field(default_factory=Lifetime)
    mark: Optional[Mark] = None
    if_id: int = 0
    output_mark: Optional[Mark] = None
    flags: int = 0
    extra_flags: int = 0
    tfcpad: int = 0
    replay: Optional[ReplayState] = None
    counters: Optional[Counters] = None
    stats: Optional[Stats] = None

    def __post_init__(self):
        _setattr(self, "src", ip(self.src))
        _setattr(self, "dst", ip(self.dst))
        _setattr(self, "mode", Mode(self.mode))
        if self.src.version != self.dst.version:
            raise ValueError(f"SA mixes address families: {self.src} -> {self.dst}")
        if not 0 <= self.spi <= 0xFFFFFFFF:
            raise ValueError(f"SPI {self.spi:#x} is out of range")
        if self.esn and self.replay_window == 0:
            raise ValueError("an ESN SA needs a replay window (>= 1)")

    @property
    def family(self) -> int:
        return family_of(self.src)

    @property
    def id(self) -> SAId:
        return SAId(self.dst, self.spi, self.proto, self.mark)

    def __str__(self):
        return f"spi=0x{self.spi:08x} {self.src}->{self.dst} reqid={self.reqid:#x}"


# ----------------------------------------------------------------- policy


@dataclass(frozen=True)
class Template:
    """One transform a policy requires (struct xfrm_user_tmpl).

    In tunnel mode ``src``/``dst`` are the outer addresses; in transport mode
    they stay None. ``optional`` is ``level use`` in ip-xfrm terms (the SA is
    used when present, not required).
    """
    src: Optional[AddressLike] = None
    dst: Optional[AddressLike] = None
    reqid: int = 0
    mode: Mode = Mode.TUNNEL
    proto: int = IPPROTO_ESP
    spi: int = 0
    optional: bool = False
    share: int = 0
    aalgos: int = ALL_ALGOS
    ealgos: int = ALL_ALGOS
    calgos: int = ALL_ALGOS
    family: Optional[int] = None

    def __post_init__(self):
        if self.src is not None:
            _setattr(self, "src", ip(self.src))
        if self.dst is not None:
            _setattr(self, "dst", ip(self.dst))
        _setattr(self, "mode", Mode(self.mode))
        if self.family is None and (self.src or self.dst) is not None:
            _setattr(self, "family", family_of(self.src or self.dst))
        if self.mode == Mode.TUNNEL and (self.src is None or self.dst is None):
            raise ValueError("a tunnel-mode template needs src and dst")


@dataclass(frozen=True)
class PolicyId:
    selector: Selector
    dir: Dir
    mark: Optional[Mark] = None
    if_id: int = 0
    index: int = 0
    ptype: PolicyType = PolicyType.MAIN

    def __str__(self):
        if self.index and self.dir <= Dir.FWD and self.selector is None:
            return f"{Dir(self.dir).name.lower()} index {self.index:#x}"
        return f"{Dir(self.dir).name.lower()} {self.selector.src} -> {self.selector.dst}"


@dataclass(frozen=True)
class Policy:
    """A security policy (struct xfrm_userpolicy_info plus templates)."""
    selector: Selector
    dir: Dir
    action: Action = Action.ALLOW
    priority: int = 0
    templates: Sequence[Template] = ()
    mark: Optional[Mark] = None
    if_id: int = 0
    index: int = 0
    lifetime: Lifetime = field(default_factory=Lifetime)
    flags: int = 0
    share: int = 0
    ptype: PolicyType = PolicyType.MAIN
    counters: Optional[Counters] = None

    def __post_init__(self):
        _setattr(self, "dir", Dir(self.dir))
        _setattr(self, "action", Action(self.action))
        _setattr(self, "templates", tuple(self.templates))
        _setattr(self, "ptype", PolicyType(self.ptype))

    @property
    def id(self) -> PolicyId:
        return PolicyId(self.selector, self.dir, self.mark, self.if_id, 0, self.ptype)

    def __str__(self):
        return str(self.id)


# ------------------------------------------------------------ ownership


@dataclass(frozen=True)
class Owner:
    """Which SAs and policies belong to us, so that a flush spares the rest.

    The marker is the reqid: every SA we add carries a reqid in
    ``[reqid_min, reqid_max]``, and so does every template of our policies.
    Reqids are invisible to traffic (they only pair SAs with templates), are
    shown by ``ip xfrm``, survive MIGRATE and updates, and other IKE daemons
    allocate theirs from 1 upwards, far from the default range ("mm" <<
    16). Template-less policies (allow/block) carry no reqid; we give every
    policy we add an ``index`` in ``[index_min, index_max]`` (the kernel
    keeps a requested index when it is free and keeps it on update), which
    marks those too.
    """
    reqid_min: int = 0x6D6D0000
    reqid_max: int = 0x6D6DFFFF
    index_min: int = 0x6D6D0000
    index_max: int = 0x6D6DFFFF

    def __post_init__(self):
        if not 0 < self.reqid_min <= self.reqid_max <= 0xFFFFFFFF:
            raise ValueError("bad reqid range")
        if not 0 < self.index_min <= self.index_max <= 0xFFFFFFFF:
            raise ValueError("bad policy index range")

    def owns_reqid(self, reqid: int) -> bool:
        return self.reqid_min <= reqid <= self.reqid_max

    def owns_sa(self, sa: "SA") -> bool:
        return self.owns_reqid(sa.reqid)

    def owns_index(self, index: int) -> bool:
        return self.index_min <= index <= self.index_max

    def owns_policy(self, pol: "Policy") -> bool:
        if pol.dir >= Dir.SOCKET_IN:
            return False
        return self.owns_index(pol.index) or any(
            self.owns_reqid(t.reqid) for t in pol.templates)


DEFAULT_OWNER = Owner()


# ----------------------------------------------------------------- bundle


@dataclass(frozen=True)
class Bundle:
    """The kernel side of one CHILD_SA: an outbound and an inbound SA and the
    policies that use them. Installed and removed as a unit."""
    outbound: SA
    inbound: SA
    policies: Sequence[Policy] = ()

    def __post_init__(self):
        _setattr(self, "policies", tuple(self.policies))

    @property
    def sas(self) -> tuple:
        return (self.outbound, self.inbound)

    @property
    def local(self) -> IPAddress:
        return self.outbound.src

    @property
    def remote(self) -> IPAddress:
        return self.outbound.dst


def tunnel_bundle(*, local: AddressLike, remote: AddressLike,
                  local_ts: Sequence[NetworkLike], remote_ts: Sequence[NetworkLike],
                  spi_in: int, spi_out: int, algs_in: Algorithms, algs_out: Algorithms,
                  reqid: int, encap_ports: Optional[tuple] = None,
                  replay_window: int = 32, esn: bool = False,
                  lifetime: Optional[Lifetime] = None, mark: Optional[Mark] = None,
                  if_id: int = 0, priority: int = 0, fwd: bool = True,
                  optional: bool = False) -> Bundle:
    """A tunnel-mode CHILD_SA between ``local`` and ``remote``.

    One policy per (local_ts, remote_ts) pair and direction: out (local ->
    remote), in and, when ``fwd``, fwd (remote -> local). ``encap_ports`` is
    ``(local_port, remote_port)`` for ESP-in-UDP, None for plain ESP. Both SAs
    carry ``reqid``; ``mark`` and ``if_id`` go on SAs and policies alike.
    """
    local, remote = ip(local), ip(remote)
    lifetime = lifetime or Lifetime()
    enc_out = enc_in = None
    if encap_ports is not None:
        lport, rport = encap_ports
        enc_out, enc_in = Encap(lport, rport), Encap(rport, lport)
    common = dict(reqid=reqid, mode=Mode.TUNNEL, replay_window=replay_window, esn=esn,
                  lifetime=lifetime, mark=mark, if_id=if_id)
    out_sa = SA(local, remote, spi_out, algs_out, encap=enc_out, **common)
    in_sa = SA(remote, local, spi_in, algs_in, encap=enc_in, **common)
    t_out = Template(local, remote, reqid=reqid, optional=optional)
    t_in = Template(remote, local, reqid=reqid, optional=optional)
    policies = []
    for lts in local_ts:
        for rts in remote_ts:
            lts_n, rts_n = net(lts), net(rts)
            if lts_n.version != rts_n.version:
                continue
            policies.append(Policy(Selector(lts_n, rts_n), Dir.OUT, priority=priority,
                                   templates=(t_out,), mark=mark, if_id=if_id))
            policies.append(Policy(Selector(rts_n, lts_n), Dir.IN, priority=priority,
                                   templates=(t_in,), mark=mark, if_id=if_id))
            if fwd:
                policies.append(Policy(Selector(rts_n, lts_n), Dir.FWD, priority=priority,
                                       templates=(t_in,), mark=mark, if_id=if_id))
    if not policies:
        raise ValueError("no traffic selector pair of the same address family")
    return Bundle(out_sa, in_sa, policies)


# ------------------------------------------------------------ conversions


def _selector_to(msg, sel: Optional[Selector], prefix: str = "sel_") -> None:
    if sel is None:
        return                          # all zero: family AF_UNSPEC, matches any
    msg[prefix + "daddr"] = pack_addr(sel.dst)
    msg[prefix + "saddr"] = pack_addr(sel.src)
    msg[prefix + "prefixlen_d"] = sel.dst.prefixlen
    msg[prefix + "prefixlen_s"] = sel.src.prefixlen
    msg[prefix + "dport"] = sel.dport
    msg[prefix + "dport_mask"] = sel.dport_mask
    msg[prefix + "sport"] = sel.sport
    msg[prefix + "sport_mask"] = sel.sport_mask
    msg[prefix + "family"] = sel.family
    msg[prefix + "proto"] = sel.proto
    msg[prefix + "ifindex"] = sel.ifindex
    msg[prefix + "user"] = sel.user


def _selector_from(msg, prefix: str = "sel_") -> Optional[Selector]:
    fam = msg[prefix + "family"]
    if fam not in (socket.AF_INET, socket.AF_INET6):
        return None
    src = unpack_addr(msg[prefix + "saddr"], fam)
    dst = unpack_addr(msg[prefix + "daddr"], fam)
    return Selector(
        ipaddress.ip_network(f"{src}/{msg[prefix + 'prefixlen_s']}", strict=False),
        ipaddress.ip_network(f"{dst}/{msg[prefix + 'prefixlen_d']}", strict=False),
        proto=msg[prefix + "proto"], sport=msg[prefix + "sport"],
        dport=msg[prefix + "dport"], sport_mask=msg[prefix + "sport_mask"],
        dport_mask=msg[prefix + "dport_mask"], ifindex=msg[prefix + "ifindex"],
        user=msg[prefix + "user"])


def _mark_attr(mark: Optional[Mark]) -> list:
    return [("XFRMA_MARK", {"v": mark.value, "m": mark.mask})] if mark else []


def _mark_from(msg) -> Optional[Mark]:
    a = msg.get_attr("XFRMA_MARK")
    return Mark(a["v"], a["m"]) if a else None


def _output_mark_from(msg) -> Optional[Mark]:
    v = msg.get_attr("XFRMA_SET_MARK")
    if v is None:
        return None
    mask = msg.get_attr("XFRMA_SET_MARK_MASK")
    return Mark(v, 0xFFFFFFFF if mask is None else mask)


def _name(raw: bytes) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode("ascii", "replace")


def algorithms_attrs(algs: Algorithms) -> list:
    attrs = []
    if algs.aead:
        a = algs.aead
        attrs.append(("XFRMA_ALG_AEAD", {"alg_name": a.name.encode(),
                                         "alg_key_len": len(a.key) * 8,
                                         "alg_icv_len": a.icv_bits, "alg_key": a.key}))
    if algs.crypt:
        c = algs.crypt
        attrs.append(("XFRMA_ALG_CRYPT", {"alg_name": c.name.encode(),
                                          "alg_key_len": len(c.key) * 8, "alg_key": c.key}))
    if algs.auth:
        a = algs.auth
        attrs.append(("XFRMA_ALG_AUTH_TRUNC", {"alg_name": a.name.encode(),
                                               "alg_key_len": len(a.key) * 8,
                                               "alg_trunc_len": a.trunc_bits,
                                               "alg_key": a.key}))
    return attrs


def _key(a) -> bytes:
    return bytes(a["alg_key"])[: (a["alg_key_len"] + 7) // 8]


def algorithms_from(msg) -> Algorithms:
    aead = crypt = auth = None
    a = msg.get_attr("XFRMA_ALG_AEAD")
    if a:
        aead = Aead(_name(a["alg_name"]), _key(a), a["alg_icv_len"])
    a = msg.get_attr("XFRMA_ALG_CRYPT")
    if a:
        crypt = Crypt(_name(a["alg_name"]), _key(a))
    a = msg.get_attr("XFRMA_ALG_AUTH_TRUNC")
    if a:
        auth = Auth(_name(a["alg_name"]), _key(a), a["alg_trunc_len"])
    else:
        a = msg.get_attr("XFRMA_ALG_AUTH")
        if a:
            auth = Auth(_name(a["alg_name"]), _key(a), 96)
    return Algorithms(aead, crypt, auth)


def encap_attr(e: Encap) -> tuple:
    return ("XFRMA_ENCAP", {"encap_type": e.type, "encap_sport": e.sport,
                            "encap_dport": e.dport, "encap_oa": pack_addr(e.oa)})


def _bitmap_words(window: int) -> int:
    return max(1, (window + 31) // 32)


def sa_to_msg(sa: SA, msg_class=m.xfrm_usersa_info):
    """NEWSA/UPDSA request for ``sa``."""
    msg = msg_class()
    _selector_to(msg, sa.selector)
    msg["id_daddr"] = pack_addr(sa.dst)
    msg["id_spi"] = sa.spi
    msg["id_proto"] = sa.proto
    msg["saddr"] = pack_addr(sa.src)
    sa.lifetime.to_fields(msg)
    msg["reqid"] = sa.reqid
    msg["family"] = sa.family
    msg["mode"] = int(sa.mode)
    flags = int(sa.flags)
    if sa.esn:
        flags |= StateFlag.ESN
    msg["flags"] = int(flags)
    attrs = algorithms_attrs(sa.algorithms)
    # the legacy replay state has a 32-bit bitmap: larger windows, and ESN,
    # need XFRMA_REPLAY_ESN_VAL (then usersa_info.replay_window must be 0)
    use_esn_attr = (sa.esn or sa.replay_window > 32
                    or (sa.replay is not None and sa.replay.esn_format))
    if use_esn_attr:
        msg["replay_window"] = 0
        r = sa.replay or ReplayState()
        words = _bitmap_words(sa.replay_window)
        bmp = list(r.bitmap[:words]) + [0] * (words - len(r.bitmap[:words]))
        attrs.append(("XFRMA_REPLAY_ESN_VAL", {
            "bmp_len": words, "oseq": r.oseq, "seq": r.seq, "oseq_hi": r.oseq_hi,
            "seq_hi": r.seq_hi, "replay_window": sa.replay_window, "bmp": bmp}))
    else:
        msg["replay_window"] = sa.replay_window
        if sa.replay is not None:
            bitmap = sa.replay.bitmap[0] if sa.replay.bitmap else 0
            attrs.append(("XFRMA_REPLAY_VAL", {"oseq": sa.replay.oseq,
                                               "seq": sa.replay.seq, "bitmap": bitmap}))
    if sa.counters is not None:
        c = sa.counters
        attrs.append(("XFRMA_LTIME_VAL", {"bytes": c.bytes, "packets": c.packets,
                                          "add_time": c.add_time, "use_time": c.use_time}))
    if sa.encap is not None:
        attrs.append(encap_attr(sa.encap))
    attrs += _mark_attr(sa.mark)
    if sa.if_id:
        attrs.append(("XFRMA_IF_ID", sa.if_id))
    if sa.output_mark is not None:
        attrs.append(("XFRMA_SET_MARK", sa.output_mark.value))
        attrs.append(("XFRMA_SET_MARK_MASK", sa.output_mark.mask))
    if sa.extra_flags:
        attrs.append(("XFRMA_SA_EXTRA_FLAGS", sa.extra_flags))
    if sa.tfcpad:
        attrs.append(("XFRMA_TFCPAD", sa.tfcpad))
    msg["attrs"] = attrs
    return msg


def sa_from_msg(msg, info=None) -> SA:
    """An SA from a NEWSA message (or, with ``info``, from XFRMA_SA)."""
    info = info if info is not None else msg
    fam = info["family"]
    flags = info["flags"]
    esn = bool(flags & StateFlag.ESN)
    window = info["replay_window"]
    replay = None
    r = msg.get_attr("XFRMA_REPLAY_ESN_VAL")
    if r:
        window = r["replay_window"]
        replay = ReplayState(r["oseq"], r["seq"], r["oseq_hi"], r["seq_hi"],
                             tuple(r["bmp"]), r["replay_window"], True)
    else:
        r = msg.get_attr("XFRMA_REPLAY_VAL")
        if r:
            replay = ReplayState(r["oseq"], r["seq"], 0, 0, (r["bitmap"],), window, False)
    counters = Counters(info["cur_bytes"], info["cur_packets"], info["cur_add_time"],
                        info["cur_use_time"])
    lt = msg.get_attr("XFRMA_LTIME_VAL")
    if lt:
        counters = Counters(lt["bytes"], lt["packets"], lt["add_time"], lt["use_time"])
    encap = None
    e = msg.get_attr("XFRMA_ENCAP")
    if e:
        oa = bytes(e["encap_oa"])
        encap = Encap(e["encap_sport"], e["encap_dport"],
                      unpack_addr(oa, fam) if any(oa) else None, e["encap_type"])
    return SA(
        src=unpack_addr(info["saddr"], fam), dst=unpack_addr(info["id_daddr"], fam),
        spi=info["id_spi"], algorithms=algorithms_from(msg), reqid=info["reqid"],
        mode=Mode(info["mode"]), proto=info["id_proto"], encap=encap,
        selector=_sa_selector(info), replay_window=window, esn=esn,
        lifetime=Lifetime.from_fields(info), mark=_mark_from(msg),
        if_id=msg.get_attr("XFRMA_IF_ID") or 0,
        output_mark=_output_mark_from(msg),
        flags=int(flags & ~StateFlag.ESN),
        extra_flags=msg.get_attr("XFRMA_SA_EXTRA_FLAGS") or 0,
        tfcpad=msg.get_attr("XFRMA_TFCPAD") or 0,
        replay=replay, counters=counters,
        stats=Stats(info["stats_replay_window"], info["stats_replay"],
                    info["stats_integrity_failed"]))


def _sa_selector(info) -> Optional[Selector]:
    """An SA's selector; None for "any" (the kernel turns an SA's AF_UNSPEC
    selector into the any-selector of the SA's family)."""
    sel = _selector_from(info)
    if sel is not None and sel.src.prefixlen == 0 and sel.dst.prefixlen == 0 and \
            not (sel.proto or sel.sport or sel.dport or sel.ifindex or sel.user):
        return None
    return sel


def said_to_msg(said: SAId, family: Optional[int] = None):
    msg = m.xfrm_usersa_id()
    msg["daddr"] = pack_addr(said.dst)
    msg["spi"] = said.spi
    msg["family"] = family or family_of(said.dst)
    msg["proto"] = said.proto
    msg["attrs"] = _mark_attr(said.mark)
    return msg


def template_to_dict(t: Template, default_family: int) -> dict:
    return {"daddr": pack_addr(t.dst), "spi": t.spi, "proto": t.proto,
            "family": t.family or default_family, "saddr": pack_addr(t.src),
            "reqid": t.reqid, "mode": int(t.mode), "share": t.share,
            "optional": int(bool(t.optional)), "aalgos": t.aalgos, "ealgos": t.ealgos,
            "calgos": t.calgos}


def template_from_dict(d: dict) -> Template:
    fam = d["family"]
    mode = Mode(d["mode"])
    src = unpack_addr(d["saddr"], fam) if any(bytes(d["saddr"])) or mode == Mode.TUNNEL else None
    dst = unpack_addr(d["daddr"], fam) if any(bytes(d["daddr"])) or mode == Mode.TUNNEL else None
    return Template(src, dst, reqid=d["reqid"], mode=mode, proto=d["proto"], spi=d["spi"],
                    optional=bool(d["optional"]), share=d["share"], aalgos=d["aalgos"],
                    ealgos=d["ealgos"], calgos=d["calgos"], family=fam)


def _policy_type_attr(ptype: PolicyType) -> list:
    if ptype == PolicyType.MAIN:
        return []
    return [("XFRMA_POLICY_TYPE", {"type": int(ptype)})]


def policy_to_msg(pol: Policy, msg_class=m.xfrm_userpolicy_info):
    msg = msg_class()
    _selector_to(msg, pol.selector)
    pol.lifetime.to_fields(msg)
    msg["priority"] = pol.priority
    msg["index"] = pol.index
    msg["dir"] = int(pol.dir)
    msg["action"] = int(pol.action)
    msg["flags"] = pol.flags
    msg["share"] = pol.share
    attrs = []
    if pol.templates:
        attrs.append(("XFRMA_TMPL", [template_to_dict(t, pol.selector.family)
                                     for t in pol.templates]))
    attrs += _mark_attr(pol.mark)
    if pol.if_id:
        attrs.append(("XFRMA_IF_ID", pol.if_id))
    attrs += _policy_type_attr(pol.ptype)
    msg["attrs"] = attrs
    return msg


def policy_from_msg(msg, info=None) -> Policy:
    info = info if info is not None else msg
    tmpls = msg.get_attr("XFRMA_TMPL") or []
    ptype = msg.get_attr("XFRMA_POLICY_TYPE")
    sel = _selector_from(info)
    if sel is None:                      # a socket policy or an AF_UNSPEC selector
        sel = Selector.any(4)
    return Policy(
        selector=sel, dir=Dir(info["dir"]),
        action=Action(info["action"]), priority=info["priority"],
        templates=tuple(template_from_dict(t) for t in tmpls), mark=_mark_from(msg),
        if_id=msg.get_attr("XFRMA_IF_ID") or 0, index=info["index"],
        lifetime=Lifetime.from_fields(info), flags=info["flags"], share=info["share"],
        ptype=PolicyType(ptype["type"]) if ptype else PolicyType.MAIN,
        counters=Counters(info["cur_bytes"], info["cur_packets"], info["cur_add_time"],
                          info["cur_use_time"]))


def policy_id_to_msg(pid: PolicyId):
    msg = m.xfrm_userpolicy_id()
    if pid.index:
        msg["index"] = pid.index
    else:
        _selector_to(msg, pid.selector)
    msg["dir"] = int(pid.dir)
    attrs = _mark_attr(pid.mark)
    if pid.if_id:
        attrs.append(("XFRMA_IF_ID", pid.if_id))
    attrs += _policy_type_attr(pid.ptype)
    msg["attrs"] = attrs
    return msg
