"""Configuration of one IKEv2 initiator connection."""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from dataclasses import dataclass, field
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .auth import Identity
from .errors import IkeConfigError
from .message import TrafficSelector
from .proposals import DEFAULT_ESP_PROPOSALS, DEFAULT_IKE_PROPOSALS, EspProposal, IkeProposal


@dataclass(frozen=True)
class PskAuth:
    """Pre-shared key (used for both directions when on both sides)."""

    secret: bytes = field(repr=False)

    def __post_init__(self):
        if isinstance(self.secret, str):
            object.__setattr__(self, "secret", self.secret.encode())
        if not self.secret:
            raise IkeConfigError("empty PSK")


@dataclass(frozen=True)
class CertAuth:
    """Our certificate, its private key and optional intermediates."""

    cert: x509.Certificate
    key: object = field(repr=False)
    chain: tuple[x509.Certificate, ...] = ()

    @classmethod
    def load(cls, cert_path: str, key_path: str, chain_paths: tuple[str, ...] = (),
             password: bytes | None = None) -> "CertAuth":
        """Load PEM/DER files; the key file must be a regular file (no symlink, no FIFO) of mode
        0600 or stricter owned by root or us, checked on the open descriptor (no check-then-open race)."""
        from agent.config import ConfigError, read_key_file
        try:
            kdata = read_key_file(key_path, "private key", raw=True)
        except ConfigError as e:
            raise IkeConfigError(f"private key {key_path}: {e.reason}") from None
        key = (serialization.load_pem_private_key(kdata, password) if b"-----BEGIN" in kdata
               else serialization.load_der_private_key(kdata, password))
        return cls(load_cert(cert_path), key, tuple(load_cert(p) for p in chain_paths))


@dataclass(frozen=True)
class CaTrust:
    """The gateway authenticates with a certificate issued by one of these."""

    cas: tuple[x509.Certificate, ...]

    @classmethod
    def load(cls, *paths: str) -> "CaTrust":
        return cls(tuple(load_cert(p) for p in paths))


def load_cert(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        data = f.read()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _random_spi() -> int:
    while True:
        spi = secrets.randbits(32)
        if spi >= 256:
            return spi


@dataclass
class IkeConfig:
    local_id: Identity | str
    remote_id: Identity | str | None
    local_auth: PskAuth | CertAuth
    remote_auth: PskAuth | CaTrust
    remote_ts: list = field(default_factory=list)            # internal prefixes behind the gateway
    local_ts: list = field(default_factory=lambda: ["0.0.0.0/0"])
    ike_proposals: list = field(default_factory=lambda: list(DEFAULT_IKE_PROPOSALS))
    esp_proposals: list = field(default_factory=lambda: list(DEFAULT_ESP_PROPOSALS))
    request_tia: bool = True          # CP request INTERNAL_IP4_ADDRESS
    require_tia: bool | None = None   # default: = request_tia
    request_dns: bool = True
    mobike: bool = True
    send_idr: bool = True
    initial_contact: bool = True
    send_certreq: bool = True
    nonce_len: int = 32
    retransmit_timeout: float = 1.0   # first timeout; doubles (retransmit_base) up to ..._max
    retransmit_base: float = 2.0
    retransmit_max_timeout: float = 16.0
    retransmit_tries: int = 5         # retransmissions before giving up
    keepalive_interval: float = 20.0  # NAT keepalives while a NAT is in front of us; 0: off
    dpd_interval: float = 0.0         # liveness check after this long without a message from the gateway; 0: off
    child_rekey_time: float = 0.0     # rekey each CHILD SA after this long; 0: only when the gateway does
    ike_rekey_time: float = 0.0       # rekey the IKE SA after this long; 0: only when the gateway does
    rekey_jitter: float = 0.1         # rekey times are shortened by up to this fraction, at random
    rekey_retry: float = 10.0         # after a TEMPORARY_FAILURE, try the rekey again this much later
    mobike_probe_after: int = 2       # UPDATE_SA_ADDRESSES retransmissions before probing other gateway addresses
    probe_timeout: float = 0.5        # first timeout of a path probe (one retransmission)
    additional_addresses: list = field(default_factory=list)  # ADDITIONAL_IP4/6_ADDRESS we announce (MOBIKE)
    no_nats_allowed: bool = False     # refuse paths through a NAT (sends NO_NATS_ALLOWED, RFC 4555 3.9)
    max_cookie_rounds: int = 3
    unprotected_error_wait: float = 2.0   # after an unusable (unauthenticated) IKE_SA_INIT response (error
                                          # notify, bad COOKIE/INVALID_KE, no usable SA/KE), keep listening
                                          # this long for a genuine answer
    max_ke_retries: int = 2
    close_on_child_failure: bool = True
    wall_clock: Callable[[], datetime.datetime] = _utcnow      # certificate validity
    spi_allocator: Callable[[], int] = _random_spi             # inbound ESP SPIs (kernel ALLOCSPI later)

    def __post_init__(self):
        if isinstance(self.local_id, str):
            self.local_id = Identity.parse(self.local_id)
        if isinstance(self.remote_id, str):
            self.remote_id = Identity.parse(self.remote_id)
        self.ike_proposals = [p if isinstance(p, IkeProposal) else IkeProposal.parse(p)
                              for p in self.ike_proposals]
        self.esp_proposals = [p if isinstance(p, EspProposal) else EspProposal.parse(p)
                              for p in self.esp_proposals]
        if not self.ike_proposals or not self.esp_proposals:
            raise IkeConfigError("no IKE or no ESP proposal configured")
        self.remote_ts = [_ts(t) for t in self.remote_ts]
        self.local_ts = [_ts(t) for t in self.local_ts]
        if not self.remote_ts:
            raise IkeConfigError("remote_ts (the internal prefixes) is empty")
        if self.require_tia is None:
            self.require_tia = self.request_tia
        if isinstance(self.remote_auth, CaTrust) and not self.remote_auth.cas:
            raise IkeConfigError("no CA certificate to check the gateway against")
        if self.nonce_len < 32 or self.nonce_len > 256:
            raise IkeConfigError("nonce_len must be 32..256")
        try:
            self.additional_addresses = [ipaddress.ip_address(a) for a in self.additional_addresses]
        except ValueError as e:
            raise IkeConfigError(f"additional_addresses: {e}") from None
        for name in ("dpd_interval", "child_rekey_time", "ike_rekey_time", "rekey_retry", "probe_timeout"):
            if getattr(self, name) < 0:
                raise IkeConfigError(f"{name} must not be negative")
        if not 0 <= self.rekey_jitter < 1:
            raise IkeConfigError("rekey_jitter must be in [0, 1)")


def _ts(t) -> TrafficSelector:
    if isinstance(t, TrafficSelector):
        return t
    return TrafficSelector.from_network(ipaddress.ip_network(t, strict=False))
