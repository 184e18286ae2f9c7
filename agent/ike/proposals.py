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
    """An ESP proposal; ``dh`` (groups for PFS) goes on the wire only in
    CREATE_CHILD_SA (IKE_AUTH's CHILD SA takes its keys from the IKE SA)."""

    encr: tuple[tuple[int, int], ...]
    integ: tuple[int, ...]
    esn: tuple[int, ...] = (EsnId.NO_ESN,)
    dh: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "EspProposal":
        encr, integ, esn, dh = [], [], [], []
        for tok in text.lower().split("-"):
            if tok in _ENCR_TOKENS:
                encr.append(_ENCR_TOKENS[tok])
            elif tok in _INTEG_TOKENS:
                integ.append(_INTEG_TOKENS[tok])
            elif tok in _ESN_TOKENS:
                esn.append(_ESN_TOKENS[tok])
            elif tok in _DH_TOKENS:
                dh.append(_DH_TOKENS[tok])
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
        return cls(tuple(_uniq(encr)), tuple(_uniq(integ)), tuple(_uniq(esn)) or (EsnId.NO_ESN,),
                   tuple(_uniq(dh)))

    def to_wire(self, num: int, spi: bytes, *, with_dh: bool = False,
                dh_first: int | None = None) -> Proposal:
        """Wire form; ``with_dh`` adds the PFS groups (``dh_first`` leading)."""
        ts = [_encr_transform(e) for e in self.encr]
        ts += [Transform(TransformType.INTEG, i) for i in self.integ]
        if with_dh and self.dh:
            groups = list(self.dh)
            if dh_first in groups:
                groups.remove(dh_first)
                groups.insert(0, dh_first)
            ts += [Transform(TransformType.DH, g) for g in groups]
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
    spi: bytes = field(default=b"", compare=False)    # responder's new SPI (IKE SA rekey)

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
    dh: int = 0                                       # PFS group of a CREATE_CHILD_SA (0: none)

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


def select_ike(sa: SAPayload, offered: list[Proposal], *, rekey: bool = False) -> IkeSuite:
    """The responder's choice for an IKE SA: in IKE_SA_INIT (no SPI) or,
    with ``rekey``, in a CREATE_CHILD_SA rekeying the IKE SA (8-byte SPI)."""
    got, _ = _check_sa(sa, offered, ProtocolId.IKE)
    if rekey:
        if len(got.spi) != 8:
            raise IkeProposalError(f"responder's IKE SA rekey proposal carries a {len(got.spi)}-byte SPI")
    elif got.spi:
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
    return IkeSuite(encr, integ, prf, dh, got.num, got.spi if rekey else b"")


def select_esp(sa: SAPayload, offered: list[Proposal], *, dh_group: int | None = None) -> EspSuite:
    """The responder's ESP choice. ``dh_group``: the KE group we sent in a
    CREATE_CHILD_SA (the choice must carry exactly it); None: no DH allowed
    (IKE_AUTH, or a rekey without PFS)."""
    got, _ = _check_sa(sa, offered, ProtocolId.ESP)
    if len(got.spi) != 4:
        raise IkeProposalError(f"responder's ESP SPI has {len(got.spi)} bytes")
    ch = _one_of_each(got, {TransformType.ENCR},
                      {TransformType.ENCR, TransformType.INTEG, TransformType.ESN, TransformType.DH})
    chosen_dh = ch[TransformType.DH].id if TransformType.DH in ch else 0
    if dh_group is None and chosen_dh != 0:
        raise IkeProposalError("responder chose a DH group although we sent no KE payload")
    if dh_group is not None and chosen_dh != dh_group:
        raise IkeProposalError(f"responder chose DH group {chosen_dh}, our KE payload is of group {dh_group}")
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
    return EspSuite(encr, integ, esn, got.spi, got.num, chosen_dh)


# --------------------------------------------------------------------------- as responder
# (the gateway rekeys a CHILD SA or the IKE SA: we choose from its offer)

class InvalidKeGroup(IkeProposalError):
    """An offer is acceptable, but with another DH group than the KE payload's."""

    def __init__(self, group: int):
        super().__init__(f"acceptable with DH group {group} only")
        self.group = group


def _by_type(prop: Proposal) -> dict[int, list[Transform]]:
    out: dict[int, list[Transform]] = {}
    for t in prop.transforms:
        out.setdefault(t.type, []).append(t)
    return out


def _pick_dh(offer: list[Transform], ours: tuple[int, ...], ke_group: int | None) -> int | None:
    """The DH group to answer with (0: none); None: no match; raises
    InvalidKeGroup when a group matches but the KE payload is of another."""
    groups = [t.id for t in offer if t.id != 0]
    if ke_group is None:
        return 0 if (not groups or any(t.id == 0 for t in offer)) else None
    usable = [g for g in groups if g in ours and g in DH_NAMES]
    if ke_group in usable:
        return ke_group
    if usable:
        raise InvalidKeGroup(usable[0])
    return None


def choose_esp(sa: SAPayload, ours: list[EspProposal], ke_group: int | None) -> tuple[Proposal, EspSuite]:
    """Pick the first of the peer's ESP proposals our configuration accepts.
    Returns the chosen proposal (SPI left empty for ours) and the suite (its
    ``spi`` is the peer's). Raises IkeProposalError (NO_PROPOSAL_CHOSEN) or
    InvalidKeGroup."""
    wrong_ke = None
    for prop in sa.proposals:
        if prop.protocol != ProtocolId.ESP or len(prop.spi) != 4:
            continue
        tt = _by_type(prop)
        for mine in ours:
            encr_t = next((t for t in tt.get(TransformType.ENCR, [])
                           if (t.id, t.key_length) in mine.encr and (t.id, t.key_length) in ENCR), None)
            if encr_t is None:
                continue
            encr = ENCR[(encr_t.id, encr_t.key_length)]
            integ_t = None
            if encr.aead:
                if any(t.id != IntegId.NONE for t in tt.get(TransformType.INTEG, [])) and \
                        not any(t.id == IntegId.NONE for t in tt.get(TransformType.INTEG, [])):
                    continue
            else:
                integ_t = next((t for t in tt.get(TransformType.INTEG, []) if t.id in mine.integ and t.id in INTEG),
                               None)
                if integ_t is None:
                    continue
            esn_offer = tt.get(TransformType.ESN, [Transform(TransformType.ESN, EsnId.NO_ESN)])
            esn_t = next((t for t in esn_offer if t.id in mine.esn), None)
            if esn_t is None:
                continue
            try:
                dh = _pick_dh(tt.get(TransformType.DH, []), mine.dh or tuple(DH_NAMES), ke_group)
            except InvalidKeGroup as e:
                wrong_ke = wrong_ke or e
                continue
            if dh is None:
                continue
            chosen = [encr_t] + ([integ_t] if integ_t else [])
            if dh:
                chosen.append(Transform(TransformType.DH, dh))
            if TransformType.ESN in tt:
                chosen.append(esn_t)
            return (Proposal(prop.num, ProtocolId.ESP, b"", chosen),
                    EspSuite(encr, INTEG[integ_t.id] if integ_t else None, esn_t.id == EsnId.ESN, prop.spi,
                             prop.num, dh))
    if wrong_ke is not None:
        raise wrong_ke
    raise IkeProposalError("none of the peer's ESP proposals is acceptable")


def choose_ike(sa: SAPayload, ours: list[IkeProposal], ke_group: int | None) -> tuple[Proposal, IkeSuite]:
    """Pick from the peer's offer to rekey the IKE SA (its SPI is the new
    SPIi). Raises IkeProposalError or InvalidKeGroup."""
    wrong_ke = None
    for prop in sa.proposals:
        if prop.protocol != ProtocolId.IKE or len(prop.spi) != 8:
            continue
        tt = _by_type(prop)
        for mine in ours:
            encr_t = next((t for t in tt.get(TransformType.ENCR, [])
                           if (t.id, t.key_length) in mine.encr and (t.id, t.key_length) in ENCR), None)
            prf_t = next((t for t in tt.get(TransformType.PRF, []) if t.id in mine.prf and t.id in PRF), None)
            if encr_t is None or prf_t is None:
                continue
            encr = ENCR[(encr_t.id, encr_t.key_length)]
            integ_t = None
            if not encr.aead:
                integ_t = next((t for t in tt.get(TransformType.INTEG, []) if t.id in mine.integ and t.id in INTEG),
                               None)
                if integ_t is None:
                    continue
            groups = [t.id for t in tt.get(TransformType.DH, []) if t.id in mine.dh and t.id in DH_NAMES]
            if not groups:
                continue
            if ke_group not in groups:
                wrong_ke = wrong_ke or InvalidKeGroup(groups[0])
                continue
            chosen = [encr_t, prf_t] + ([integ_t] if integ_t else []) + [Transform(TransformType.DH, ke_group)]
            return (Proposal(prop.num, ProtocolId.IKE, b"", chosen),
                    IkeSuite(encr, INTEG[integ_t.id] if integ_t else None, PRF[prf_t.id], ke_group, prop.num,
                             prop.spi))
    if wrong_ke is not None:
        raise wrong_ke
    raise IkeProposalError("none of the peer's IKE proposals is acceptable")


def groups_in(proposals: list[IkeProposal]) -> list[int]:
    return _uniq(d for p in proposals for d in p.dh)
