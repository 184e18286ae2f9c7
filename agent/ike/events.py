"""Events the IKEv2 initiator hands to its driver (``conn.next_event()``).

Every event carries ``time`` (the ``now`` of the call that produced it).
Keys are in the events for the code that installs SAs; they never show in
``repr`` (and so never in logs).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .message import TrafficSelector

Address = tuple[str, int]


@dataclass(frozen=True)
class Event:
    time: float


@dataclass(frozen=True)
class IkeSaEstablished(Event):
    spi_i: bytes
    spi_r: bytes
    proposal: str                 # e.g. AES_CBC-128/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/CURVE_25519
    local_id: str
    remote_id: str
    local_addr: Address
    remote_addr: Address
    nat_local: bool               # a NAT in front of us
    nat_remote: bool              # a NAT in front of the gateway (or it fakes one)
    mobike: bool                  # both sides announced MOBIKE_SUPPORTED
    peer_addresses: tuple[str, ...] = ()   # ADDITIONAL_IP4/6_ADDRESS of the gateway
    auth: str = ""                # how the gateway authenticated ("psk", "ECDSA-256", ...)


@dataclass(frozen=True)
class EspSa:
    """One direction of an ESP SA, in Linux xfrm terms."""

    spi: int
    encr_alg: str | None          # 'cbc(aes)' (None for AEAD)
    encr_key: bytes = field(repr=False)
    integ_alg: str | None         # 'hmac(sha256)' (None for AEAD)
    integ_key: bytes = field(repr=False)
    integ_trunc_bits: int         # 128 / 192 / 256
    aead_alg: str | None          # 'rfc4106(gcm(aes))' (key includes the 4-byte salt)
    aead_icv_bits: int            # 128
    esn: bool


@dataclass(frozen=True)
class ChildSaEstablished(Event):
    child_id: int                 # our inbound SPI
    proposal: str                 # e.g. AES_GCM_16-128
    inbound: EspSa                # gateway -> us (SPI is ours)
    outbound: EspSa               # us -> gateway (SPI is the gateway's)
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    tia: ipaddress.IPv4Address | None
    dns: tuple[ipaddress.IPv4Address, ...]
    mode: str                     # 'tunnel'
    encap: bool                   # ESP-in-UDP (NAT detected)
    nat_detected: bool
    local_addr: Address           # IKE/ESP-in-UDP endpoints
    remote_addr: Address
    rekey_of: int | None = None   # the child_id this CHILD SA replaces (a rekey), else None


@dataclass(frozen=True)
class ChildSaFailed(Event):
    reason: str
    notify: int | None = None


@dataclass(frozen=True)
class ChildSaDeleted(Event):
    child_id: int
    spi_in: int
    spi_out: int
    by: str                       # 'local' | 'peer' | 'ike' | 'rekey'
    reason: str = ""


@dataclass(frozen=True)
class IkeSaDeleted(Event):
    spi_i: bytes
    spi_r: bytes
    by: str                       # 'local' | 'peer' | 'timeout' | 'error'
    reason: str = ""


@dataclass(frozen=True)
class AuthFailed(Event):
    reason: str
    by: str                       # 'peer': the gateway rejected us; 'local': we rejected the gateway


@dataclass(frozen=True)
class IkeFailed(Event):
    """The IKE SA could not be set up or was lost (not an authentication issue)."""

    reason: str
    notify: int | None = None


@dataclass(frozen=True)
class MobikeStarted(Event):
    """We sent (or are about to send) UPDATE_SA_ADDRESSES from a new local
    address: from now on IKE (and so should ESP) leave from ``new_local``."""

    old_local: Address
    new_local: Address
    remote: Address


@dataclass(frozen=True)
class AddressUpdated(Event):
    """The gateway accepted our new addresses (RFC 4555): the CHILD SAs now
    run between ``local_addr`` and ``remote_addr``, UDP-encapsulated when
    ``encap`` (a NAT on the path). Same SPIs, no rekey."""

    local_addr: Address
    remote_addr: Address
    nat_local: bool
    nat_remote: bool
    encap: bool
    probed: bool = False          # the gateway address was found by path probing
    started: float | None = None  # when the update began (MobikeStarted.time)


@dataclass(frozen=True)
class MobikeFailed(Event):
    """An address update was refused or got no answer on any path; the IKE
    SA is closed after this event (IkeSaDeleted follows)."""

    reason: str
    notify: int | None = None


@dataclass(frozen=True)
class IkeSaRekeyed(Event):
    """The IKE SA was replaced by a new one (same peer, same CHILD SAs)."""

    old_spi_i: bytes
    old_spi_r: bytes
    spi_i: bytes
    spi_r: bytes
    proposal: str
    by: str                       # 'local' (we initiated) | 'peer'


@dataclass(frozen=True)
class LivenessChecked(Event):
    """A liveness check (DPD) was answered."""

    rtt: float
