"""Algorithms, proposals and checking the responder's choice.

Proposal strings follow strongSwan's notation (a fact of its configuration
language, so operators can copy their gateway's settings): tokens joined by
``-``, e.g. ``aes128-sha256-x25519`` or ``aes256gcm16-prfsha384-ecp256`` for
IKE and ``aes128gcm16`` / ``aes256-sha384`` for ESP. Several tokens of one
type in one string become alternatives in one proposal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes

from .const import ATTR_KEY_LENGTH, DhGroup, EncrId, EsnId, IntegId, PrfId, ProtocolId, TransformType
from .errors import IkeProposalError
from .message import Attribute, Proposal, SAPayload, Transform


@dataclass(frozen=True)
class EncrSpec:
    id: int
    key_bits: int
    aead: bool
    key_len: int          # bytes of AES key
    salt_len: int         # bytes of salt taken from the key material (AEAD)
    iv_len: int
    block_len: int
    icv_len: int          # AEAD tag length
    name: str             # strongSwan style, e.g. AES_CBC-128
    xfrm: str             # Linux crypto API name
    wireshark: str        # name in tshark's ikev2_decryption_table

    @property
    def keymat_len(self) -> int:
        return self.key_len + self.salt_len


@dataclass(frozen=True)
class IntegSpec:
    id: int
    hash: type
    key_len: int
    trunc_len: int
    name: str
    xfrm: str
    wireshark: str


@dataclass(frozen=True)
class PrfSpec:
    id: int
    hash: type
    name: str

    @property
    def out_len(self) -> int:
        return self.hash.digest_size


ENCR: dict[tuple[int, int], EncrSpec] = {}
for _bits in (128, 192, 256):
    ENCR[(EncrId.AES_CBC, _bits)] = EncrSpec(
        EncrId.AES_CBC, _bits, False, _bits // 8, 0, 16, 16, 0, f"AES_CBC-{_bits}", "cbc(aes)",
        f"AES-CBC-{_bits} [RFC3602]")
    ENCR[(EncrId.AES_GCM_16, _bits)] = EncrSpec(
        EncrId.AES_GCM_16, _bits, True, _bits // 8, 4, 8, 1, 16, f"AES_GCM_16-{_bits}",
        "rfc4106(gcm(aes))", f"AES-GCM-{_bits} with 16 octet ICV [RFC5282]")

INTEG: dict[int, IntegSpec] = {
    IntegId.HMAC_SHA2_256_128: IntegSpec(IntegId.HMAC_SHA2_256_128, hashes.SHA256, 32, 16,
                                         "HMAC_SHA2_256_128", "hmac(sha256)", "HMAC_SHA2_256_128 [RFC4868]"),
    IntegId.HMAC_SHA2_384_192: IntegSpec(IntegId.HMAC_SHA2_384_192, hashes.SHA384, 48, 24,
                                         "HMAC_SHA2_384_192", "hmac(sha384)", "HMAC_SHA2_384_192 [RFC4868]"),
    IntegId.HMAC_SHA2_512_256: IntegSpec(IntegId.HMAC_SHA2_512_256, hashes.SHA512, 64, 32,
                                         "HMAC_SHA2_512_256", "hmac(sha512)", "HMAC_SHA2_512_256 [RFC4868]"),
}

PRF: dict[int, PrfSpec] = {
    PrfId.HMAC_SHA2_256: PrfSpec(PrfId.HMAC_SHA2_256, hashes.SHA256, "PRF_HMAC_SHA2_256"),
    PrfId.HMAC_SHA2_384: PrfSpec(PrfId.HMAC_SHA2_384, hashes.SHA384, "PRF_HMAC_SHA2_384"),
    PrfId.HMAC_SHA2_512: PrfSpec(PrfId.HMAC_SHA2_512, hashes.SHA512, "PRF_HMAC_SHA2_512"),
}

DH_NAMES = {DhGroup.CURVE_25519: "CURVE_25519", DhGroup.ECP_256: "ECP_256",
            DhGroup.MODP_2048: "MODP_2048"}

_ENCR_TOKENS = {
    "aes128": (EncrId.AES_CBC, 128), "aes192": (EncrId.AES_CBC, 192), "aes256": (EncrId.AES_CBC, 256),
    "aes128gcm16": (EncrId.AES_GCM_16, 128), "aes192gcm16": (EncrId.AES_GCM_16, 192),
    "aes256gcm16": (EncrId.AES_GCM_16, 256),
    "aes128gcm128": (EncrId.AES_GCM_16, 128), "aes256gcm128": (EncrId.AES_GCM_16, 256),
}
_INTEG_TOKENS = {"sha256": IntegId.HMAC_SHA2_256_128, "sha2_256": IntegId.HMAC_SHA2_256_128,
                 "sha384": IntegId.HMAC_SHA2_384_192, "sha2_384": IntegId.HMAC_SHA2_384_192,
                 "sha512": IntegId.HMAC_SHA2_512_256, "sha2_512": IntegId.HMAC_SHA2_512_256}
_PRF_TOKENS = {"prfsha256": PrfId.HMAC_SHA2_256, "prfsha384": PrfId.HMAC_SHA2_384,
               "prfsha512": PrfId.HMAC_SHA2_512}
_INTEG_TO_PRF = {IntegId.HMAC_SHA2_256_128: PrfId.HMAC_SHA2_256,
                 IntegId.HMAC_SHA2_384_192: PrfId.HMAC_SHA2_384,
                 IntegId.HMAC_SHA2_512_256: PrfId.HMAC_SHA2_512}
_DH_TOKENS = {"x25519": DhGroup.CURVE_25519, "curve25519": DhGroup.CURVE_25519,
              "ecp256": DhGroup.ECP_256, "modp2048": DhGroup.MODP_2048}
_ESN_TOKENS = {"esn": EsnId.ESN, "noesn": EsnId.NO_ESN}


def _uniq(seq):
    out = []
    for x in seq:
        if x not in out:
            out.append(x)
    return out


@dataclass(frozen=True)
class IkeProposal:
    encr: tuple[tuple[int, int], ...]
    integ: tuple[int, ...]
    prf: tuple[int, ...]
    dh: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> "IkeProposal":
        encr, integ, prf, dh = [], [], [], []
        for tok in text.lower().split("-"):
            if tok in _ENCR_TOKENS:
                encr.append(_ENCR_TOKENS[tok])
            elif tok in _INTEG_TOKENS:
                integ.append(_INTEG_TOKENS[tok])
            elif tok in _PRF_TOKENS:
                prf.append(_PRF_TOKENS[tok])
            elif tok in _DH_TOKENS:
                dh.append(_DH_TOKENS[tok])
            else:
                raise IkeProposalError(f"unknown or unsupported IKE algorithm {tok!r} in {text!r}")
        if not encr or not dh:
            raise IkeProposalError(f"IKE proposal {text!r} needs an encryption algorithm and a DH group")
        aead = [ENCR[e].aead for e in encr]
        if any(aead) and not all(aead):
            raise IkeProposalError(f"IKE proposal {text!r} mixes AEAD and non-AEAD ciphers")
        if all(aead):
            if integ:
                if prf:
                    raise IkeProposalError(f"AEAD IKE proposal {text!r} has an integrity algorithm")
                prf = [_INTEG_TO_PRF[i] for i in integ]   # aes128gcm16-sha256: sha256 is the PRF
                integ = []
        else:
            if not integ:
                raise IkeProposalError(f"IKE proposal {text!r} needs an integrity algorithm")
            if not prf:
                prf = [_INTEG_TO_PRF[i] for i in integ]
        if not prf:
            raise IkeProposalError(f"IKE proposal {text!r} needs a PRF")
        return cls(tuple(_uniq(encr)), tuple(_uniq(integ)), tuple(_uniq(prf)), tuple(_uniq(dh)))

    def to_wire(self, num: int, spi: bytes = b"") -> Proposal:
        ts = [_encr_transform(e) for e in self.encr]
        ts += [Transform(TransformType.PRF, p) for p in self.prf]
        ts += [Transform(TransformType.INTEG, i) for i in self.integ]
        ts += [Transform(TransformType.DH, d) for d in self.dh]
        return Proposal(num, ProtocolId.IKE, spi, ts)


@dataclass(frozen=True)
class EspProposal:
    encr: tuple[tuple[int, int], ...]
    integ: tuple[int, ...]
    esn: tuple[int, ...] = (EsnId.NO_ESN,)

    @classmethod
    def parse(cls, text: str) -> "EspProposal":
        encr, integ, esn = [], [], []
        for tok in text.lower().split("-"):
            if tok in _ENCR_TOKENS:
                encr.append(_ENCR_TOKENS[tok])
            elif tok in _INTEG_TOKENS:
                integ.append(_INTEG_TOKENS[tok])
            elif tok in _ESN_TOKENS:
                esn.append(_ESN_TOKENS[tok])
            else:
                raise IkeProposalError(f"unknown or unsupported ESP algorithm {tok!r} in {text!r}")
        if not encr:
            raise IkeProposalError(f"ESP proposal {text!r} needs an encryption algorithm")
        aead = [ENCR[e].aead for e in encr]
        if any(aead) and not all(aead):
            raise IkeProposalError(f"ESP proposal {text!r} mixes AEAD and non-AEAD ciphers")
        if all(aead) and integ:
            raise IkeProposalError(f"AEAD ESP proposal {text!r} has an integrity algorithm")
        if not all(aead) and not integ:
            raise IkeProposalError(f"ESP proposal {text!r} needs an integrity algorithm")
        return cls(tuple(_uniq(encr)), tuple(_uniq(integ)), tuple(_uniq(esn)) or (EsnId.NO_ESN,))

    def to_wire(self, num: int, spi: bytes) -> Proposal:
        ts = [_encr_transform(e) for e in self.encr]
        ts += [Transform(TransformType.INTEG, i) for i in self.integ]
        ts += [Transform(TransformType.ESN, e) for e in self.esn]
        return Proposal(num, ProtocolId.ESP, spi, ts)


def _encr_transform(e: tuple[int, int]) -> Transform:
    return Transform(TransformType.ENCR, e[0], [Attribute(ATTR_KEY_LENGTH, e[1])])


DEFAULT_IKE_PROPOSALS = (
    "aes128-aes256-sha256-sha384-sha512-x25519-ecp256-modp2048",
    "aes128gcm16-aes256gcm16-prfsha256-prfsha384-prfsha512-x25519-ecp256-modp2048",
)
DEFAULT_ESP_PROPOSALS = (
    "aes128gcm16-aes256gcm16",
    "aes128-aes256-sha256-sha384-sha512",
)


@dataclass(frozen=True)
class IkeSuite:
    """The responder's choice for the IKE SA."""

    encr: EncrSpec
    integ: IntegSpec | None
    prf: PrfSpec
    dh: int
    proposal_num: int = 0

    @property
    def name(self) -> str:
        parts = [self.encr.name] + ([self.integ.name] if self.integ else []) + [self.prf.name, DH_NAMES[self.dh]]
        return "/".join(parts)


@dataclass(frozen=True)
class EspSuite:
    """The responder's choice for a CHILD SA (ESP)."""

    encr: EncrSpec
    integ: IntegSpec | None
    esn: bool
    spi: bytes = field(default=b"", compare=False)   # responder's SPI
    proposal_num: int = 0

    @property
    def name(self) -> str:
        parts = [self.encr.name] + ([self.integ.name] if self.integ else [])
        if self.esn:
            parts.append("ESN")
        return "/".join(parts)


def _one_of_each(prop: Proposal, required: set[int], allowed: set[int]) -> dict[int, Transform]:
    chosen: dict[int, Transform] = {}
    for t in prop.transforms:
        if t.type not in allowed:
            raise IkeProposalError(f"responder chose a transform of type {t.type} we did not offer")
        if t.type in chosen:
            raise IkeProposalError(f"responder chose two transforms of type {t.type}")
        chosen[t.type] = t
    missing = required - set(chosen)
    if missing:
        raise IkeProposalError(f"responder's choice lacks transform types {sorted(missing)}")
    return chosen


def _offered(offer: Proposal, t: Transform) -> bool:
    for o in offer.transforms:
        if o.type == t.type and o.id == t.id and o.key_length == t.key_length:
            return True
    return False


def _check_sa(sa: SAPayload, offered: list[Proposal], protocol: int) -> tuple[Proposal, Proposal]:
    if len(sa.proposals) != 1:
        raise IkeProposalError(f"responder returned {len(sa.proposals)} proposals instead of one")
    got = sa.proposals[0]
    if got.protocol != protocol:
        raise IkeProposalError(f"responder chose protocol {got.protocol}, expected {protocol}")
    offer = next((p for p in offered if p.num == got.num), None)
    if offer is None:
        raise IkeProposalError(f"responder chose proposal number {got.num} we did not offer")
    for t in got.transforms:
        if not _offered(offer, t):
            raise IkeProposalError(
                f"responder chose transform type {t.type} id {t.id} (key length {t.key_length}) "
                f"not in our proposal {got.num}")
    return got, offer


def select_ike(sa: SAPayload, offered: list[Proposal]) -> IkeSuite:
    got, _ = _check_sa(sa, offered, ProtocolId.IKE)
    if got.spi:
        raise IkeProposalError("responder's IKE proposal carries an SPI in IKE_SA_INIT")
    ch = _one_of_each(got, {TransformType.ENCR, TransformType.PRF, TransformType.DH},
                      {TransformType.ENCR, TransformType.PRF, TransformType.INTEG, TransformType.DH})
    e = ch[TransformType.ENCR]
    encr = ENCR.get((e.id, e.key_length))
    if encr is None:
        raise IkeProposalError(f"unsupported encryption {e.id}/{e.key_length}")
    integ = None
    it = ch.get(TransformType.INTEG)
    if encr.aead:
        if it is not None and it.id != IntegId.NONE:
            raise IkeProposalError("responder chose an integrity algorithm with an AEAD cipher")
    else:
        if it is None or it.id not in INTEG:
            raise IkeProposalError("responder chose no (supported) integrity algorithm")
        integ = INTEG[it.id]
    prf = PRF.get(ch[TransformType.PRF].id)
    dh = ch[TransformType.DH].id
    if prf is None or dh not in DH_NAMES:
        raise IkeProposalError("responder chose an unsupported PRF or DH group")
    return IkeSuite(encr, integ, prf, dh, got.num)


def select_esp(sa: SAPayload, offered: list[Proposal]) -> EspSuite:
    got, _ = _check_sa(sa, offered, ProtocolId.ESP)
    if len(got.spi) != 4:
        raise IkeProposalError(f"responder's ESP SPI has {len(got.spi)} bytes")
    ch = _one_of_each(got, {TransformType.ENCR},
                      {TransformType.ENCR, TransformType.INTEG, TransformType.ESN, TransformType.DH})
    if TransformType.DH in ch and ch[TransformType.DH].id != 0:
        raise IkeProposalError("responder chose a DH group for the CHILD SA of IKE_AUTH")
    e = ch[TransformType.ENCR]
    encr = ENCR.get((e.id, e.key_length))
    if encr is None:
        raise IkeProposalError(f"unsupported encryption {e.id}/{e.key_length}")
    it = ch.get(TransformType.INTEG)
    integ = None
    if encr.aead:
        if it is not None and it.id != IntegId.NONE:
            raise IkeProposalError("responder chose an integrity algorithm with an AEAD cipher")
    else:
        if it is None or it.id not in INTEG:
            raise IkeProposalError("responder chose no (supported) integrity algorithm")
        integ = INTEG[it.id]
    esn_t = ch.get(TransformType.ESN)
    esn = bool(esn_t and esn_t.id == EsnId.ESN)
    return EspSuite(encr, integ, esn, got.spi, got.num)


def groups_in(proposals: list[IkeProposal]) -> list[int]:
    return _uniq(d for p in proposals for d in p.dh)
