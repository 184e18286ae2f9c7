"""NETLINK_XFRM message classes on pyroute2's ``nlmsg`` / ``nla`` machinery.

This is the wire layer: one class per kernel structure of linux/xfrm.h, with
fields laid out exactly as on x86_64/aarch64 (the ABI the kernel expects:
u64 members are 8-aligned, padding is spelled out as ``__pad`` fields), and one
attribute table (``XFRMA_*``) shared by every message. Addresses are kept as
the raw 16-byte ``xfrm_address_t``; SPIs and ports, which are big-endian on
the wire, are decoded to host integers. The typed layer (:mod:`xfrm.model`)
converts to and from these dictionaries.

``XfrmMarshal`` maps message types to classes for a pyroute2 netlink socket.
"""

from __future__ import annotations

import struct

from pyroute2.netlink import NotInitialized, nla, nlmsg
from pyroute2.netlink.nlsocket import Marshal

from .constants import Msg

# ---------------------------------------------------------------- field sets


def selector_fields(p: str = "sel_"):
    """struct xfrm_selector, 56 bytes."""
    return (
        (p + "daddr", "16s"), (p + "saddr", "16s"),
        (p + "dport", ">H"), (p + "dport_mask", ">H"),
        (p + "sport", ">H"), (p + "sport_mask", ">H"),
        (p + "family", "H"), (p + "prefixlen_d", "B"), (p + "prefixlen_s", "B"),
        (p + "proto", "B"), ("__" + p + "pad", "3x"),
        (p + "ifindex", "i"), (p + "user", "I"),
    )


LIFETIME_CFG = (
    ("soft_byte_limit", "Q"), ("hard_byte_limit", "Q"),
    ("soft_packet_limit", "Q"), ("hard_packet_limit", "Q"),
    ("soft_add_expires_seconds", "Q"), ("hard_add_expires_seconds", "Q"),
    ("soft_use_expires_seconds", "Q"), ("hard_use_expires_seconds", "Q"),
)

LIFETIME_CUR = (
    ("cur_bytes", "Q"), ("cur_packets", "Q"),
    ("cur_add_time", "Q"), ("cur_use_time", "Q"),
)

USERSA_INFO = (
    selector_fields()
    + (("id_daddr", "16s"), ("id_spi", ">I"), ("id_proto", "B"), ("__id_pad", "3x"),
       ("saddr", "16s"))
    + LIFETIME_CFG + LIFETIME_CUR
    + (("stats_replay_window", "I"), ("stats_replay", "I"),
       ("stats_integrity_failed", "I"),
       ("seq", "I"), ("reqid", "I"), ("family", "H"), ("mode", "B"),
       ("replay_window", "B"), ("flags", "B"), ("__tail_pad", "7x"))
)                                                                # 224 bytes

USERPOLICY_INFO = (
    selector_fields() + LIFETIME_CFG + LIFETIME_CUR
    + (("priority", "I"), ("index", "I"), ("dir", "B"), ("action", "B"),
       ("flags", "B"), ("share", "B"), ("__tail_pad", "4x"))
)                                                                # 168 bytes

USERSA_ID = (
    ("daddr", "16s"), ("spi", ">I"), ("family", "H"), ("proto", "B"), ("__pad", "x"),
)                                                                # 24 bytes

USERPOLICY_ID = selector_fields() + (("index", "I"), ("dir", "B"), ("__pad", "3x"))  # 64

_ADDR_DEFAULTS = {
    name: bytes(16)
    for name in ("sel_daddr", "sel_saddr", "id_daddr", "saddr", "daddr", "local",
                 "remote", "old_saddr", "new_saddr", "old_daddr", "new_daddr",
                 "encap_oa", "pol_sel_daddr", "pol_sel_saddr")
}


def fields_size(fields) -> int:
    return struct.calcsize("=" + "".join(f.lstrip(">") for _, f in fields))


# ------------------------------------------------------------ fast codec


_COMPILED: dict = {}


def _compiled(cls):
    """One struct for all fixed fields of ``cls``: (Struct, names, big-endian)."""
    c = _COMPILED.get(cls)
    if c is None:
        fmt = "=" + "".join(f.lstrip(">") for _, f in cls.fields)
        names = tuple(n for n, f in cls.fields if not f.endswith("x"))
        big = {i: f[1:] for i, (n, f) in enumerate((n, f) for n, f in cls.fields
                                                   if not f.endswith("x"))
               if f.startswith(">")}
        c = _COMPILED[cls] = (struct.Struct(fmt), names, big)
    return c


class _fixed_fields:
    """Encode/decode all fields with one precompiled struct.

    pyroute2's generic field codec looks every field up through the
    message's attribute-aware ``get()``; for the 60-odd fields of an SA that
    costs more than the kernel's work, hence this fast path (same layout,
    same dictionary keys).
    """
    __slots__ = ()

    def ft_encode(self, offset):
        st, names, big = _compiled(type(self))
        defaults = self.defaults
        values = []
        for i, name in enumerate(names):
            v = dict.get(self, name)
            if v is None:
                v = defaults.get(name, 0)
            if i in big:
                v = _swap(big[i], v)
            values.append(v)
        self.data.extend(bytes(st.size))
        st.pack_into(self.data, offset, *values)
        return offset + st.size, 0

    def ft_decode(self, offset):
        st, names, big = _compiled(type(self))
        values = st.unpack_from(self.data, offset)
        for i, name in enumerate(names):
            v = values[i]
            self[name] = _swap(big[i], v) if i in big else v
        offset += st.size
        if self.nla_map:
            self.decode_nlas((offset + 3) & ~3)
        else:
            del self["attrs"]
        if self["value"] is NotInitialized:
            del self["value"]


# ----------------------------------------------------------- attribute types


def _finish_decode(msg):
    # what pyroute2's generic decoder does once the fields are read
    del msg["attrs"]
    if msg["value"] is NotInitialized:
        del msg["value"]


class _struct_nla(_fixed_fields, nla):
    """A fixed C struct as attribute payload."""
    __slots__ = ()
    defaults = _ADDR_DEFAULTS


class _tail_nla(nla):
    """A C struct ending in a flexible byte array (``char x[0]``)."""
    __slots__ = ()
    defaults = _ADDR_DEFAULTS

    def ft_encode(self, offset):
        # the fixed part in one struct, then the bytes of the tail
        st, names, _ = _compiled_head(type(self))
        values = [dict.get(self, n) or 0 for n in names]
        tail = bytes(dict.get(self, self.fields[-1][0]) or b"")
        self.data.extend(bytes(st.size))
        st.pack_into(self.data, offset, *values)
        self.data.extend(tail)
        offset += st.size + len(tail)
        pad = -offset % 4
        self.data.extend(bytes(pad))
        return offset + pad, pad

    def ft_decode(self, offset):
        end = self.offset + self.length
        for name, fmt in self.fields:
            if fmt == "s":
                self[name] = bytes(self.data[offset:end])
                break
            self[name], offset = self.decode_field(fmt, self.data, offset)
        _finish_decode(self)


def _compiled_head(cls):
    """The compiled fixed fields of a struct that ends in a byte tail."""
    c = _COMPILED.get(cls)
    if c is None:
        head = cls.fields[:-1]
        assert not any(f.startswith(">") or f.endswith("x") for _, f in head)
        c = _COMPILED[cls] = (struct.Struct("=" + "".join(f for _, f in head)),
                              tuple(n for n, _ in head), {})
    return c


class _array_nla(nla):
    """An attribute holding back-to-back fixed structs (a list of dicts)."""
    __slots__ = ()
    fields = (("value", "s"),)
    # (name, fmt) fields of one element: padding is "x", big-endian is ">"
    item = ()

    @classmethod
    def _layout(cls):
        fmt = "=" + "".join(f.lstrip(">") for _, f in cls.item)
        names = [n for n, f in cls.item if not f.endswith("x")]
        big = {n: f[1:] for n, f in cls.item if f.startswith(">")}
        return struct.Struct(fmt), names, big

    def encode(self):
        value = self.get("value")
        if isinstance(value, (list, tuple)):
            layout, names, big = self._layout()
            kinds = dict(self.item)
            out = bytearray()
            for element in value:
                args = []
                for name in names:
                    v = element.get(name)
                    if v is None:
                        v = bytes(16) if kinds[name].endswith("s") else 0
                    if name in big:
                        v = _swap(big[name], v)
                    args.append(v)
                out += layout.pack(*args)
            self["value"] = bytes(out)
        nla.encode(self)

    def ft_decode(self, offset):
        layout, names, big = self._layout()
        end = self.offset + self.length
        items = []
        while offset + layout.size <= end:
            element = dict(zip(names, layout.unpack_from(self.data, offset)))
            for name, fmt in big.items():
                element[name] = _swap(fmt, element[name])
            items.append(element)
            offset += layout.size
        self.value = items
        self["value"] = items
        del self["attrs"]


def _swap(fmt: str, value: int) -> int:
    """Host-order integer <-> the same bytes read in network order."""
    return struct.unpack("=" + fmt, struct.pack(">" + fmt, value))[0]


class xfrm_attrs:
    """Attribute classes and the XFRMA table, shared by all messages."""

    class xfrm_algo(_tail_nla):
        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_key", "s"))

    class xfrm_algo_auth(_tail_nla):
        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_trunc_len", "I"),
                  ("alg_key", "s"))

    class xfrm_algo_aead(_tail_nla):
        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I"),
                  ("alg_key", "s"))

    class xfrm_encap_tmpl(_struct_nla):
        __slots__ = ()
        fields = (("encap_type", "H"), ("encap_sport", ">H"), ("encap_dport", ">H"),
                  ("__pad", "2x"), ("encap_oa", "16s"))

    class xfrm_user_tmpl(_array_nla):
        __slots__ = ()
        item = (
            ("daddr", "16s"), ("spi", ">I"), ("proto", "B"), ("__pad0", "3x"),
            ("family", "H"), ("__pad1", "2x"), ("saddr", "16s"), ("reqid", "I"),
            ("mode", "B"), ("share", "B"), ("optional", "B"), ("__pad2", "x"),
            ("aalgos", "I"), ("ealgos", "I"), ("calgos", "I"),
        )                                                        # 64 bytes each

    class xfrm_user_migrate(_array_nla):
        __slots__ = ()
        item = (
            ("old_daddr", "16s"), ("old_saddr", "16s"),
            ("new_daddr", "16s"), ("new_saddr", "16s"),
            ("proto", "B"), ("mode", "B"), ("reserved", "H"), ("reqid", "I"),
            ("old_family", "H"), ("new_family", "H"),
        )                                                        # 76 bytes each

    class xfrm_user_kmaddress(_struct_nla):
        __slots__ = ()
        fields = (("local", "16s"), ("remote", "16s"), ("reserved", "I"),
                  ("family", "H"), ("__pad", "2x"))

    class xfrm_lifetime_cur(_struct_nla):
        __slots__ = ()
        fields = (("bytes", "Q"), ("packets", "Q"), ("add_time", "Q"), ("use_time", "Q"))

    class xfrm_replay_state(_struct_nla):
        __slots__ = ()
        fields = (("oseq", "I"), ("seq", "I"), ("bitmap", "I"))

    class xfrm_replay_state_esn(_tail_nla):
        """``bmp`` is given and returned as a list of u32 words."""
        __slots__ = ()
        fields = (("bmp_len", "I"), ("oseq", "I"), ("seq", "I"), ("oseq_hi", "I"),
                  ("seq_hi", "I"), ("replay_window", "I"), ("bmp", "s"))

        def encode(self):
            bmp = self.get("bmp")
            if isinstance(bmp, (list, tuple)):
                self["bmp"] = struct.pack("=%dI" % len(bmp), *bmp)
                if not self.get("bmp_len"):
                    self["bmp_len"] = len(bmp)
            _tail_nla.encode(self)

        def ft_decode(self, offset):
            _tail_nla.ft_decode(self, offset)
            raw = self["bmp"]
            n = len(raw) // 4
            self["bmp"] = list(struct.unpack_from("=%dI" % n, raw)) if n else []

    class xfrm_mark(_struct_nla):
        __slots__ = ()
        fields = (("v", "I"), ("m", "I"))

    class xfrm_userpolicy_type(_struct_nla):
        __slots__ = ()
        fields = (("type", "B"), ("__pad0", "x"), ("reserved1", "H"),
                  ("reserved2", "B"), ("__pad1", "x"))

    class xfrm_address_filter(_struct_nla):
        __slots__ = ()
        fields = (("saddr", "16s"), ("daddr", "16s"), ("family", "H"),
                  ("splen", "B"), ("dplen", "B"))

    class xfrm_user_offload(_struct_nla):
        __slots__ = ()
        fields = (("ifindex", "i"), ("flags", "B"), ("__pad", "3x"))

    class xfrm_address(_struct_nla):
        __slots__ = ()
        fields = (("value", "16s"),)

    class xfrm_usersa_info_nla(_struct_nla):
        __slots__ = ()
        fields = USERSA_INFO

    class xfrm_userpolicy_info_nla(_struct_nla):
        __slots__ = ()
        fields = USERPOLICY_INFO

    nla_map = (
        (0, "XFRMA_UNSPEC", "none"),
        (1, "XFRMA_ALG_AUTH", "xfrm_algo"),
        (2, "XFRMA_ALG_CRYPT", "xfrm_algo"),
        (3, "XFRMA_ALG_COMP", "xfrm_algo"),
        (4, "XFRMA_ENCAP", "xfrm_encap_tmpl"),
        (5, "XFRMA_TMPL", "xfrm_user_tmpl"),
        (6, "XFRMA_SA", "xfrm_usersa_info_nla"),
        (7, "XFRMA_POLICY", "xfrm_userpolicy_info_nla"),
        (8, "XFRMA_SEC_CTX", "hex"),
        (9, "XFRMA_LTIME_VAL", "xfrm_lifetime_cur"),
        (10, "XFRMA_REPLAY_VAL", "xfrm_replay_state"),
        (11, "XFRMA_REPLAY_THRESH", "uint32"),
        (12, "XFRMA_ETIMER_THRESH", "uint32"),
        (13, "XFRMA_SRCADDR", "xfrm_address"),
        (14, "XFRMA_COADDR", "xfrm_address"),
        (15, "XFRMA_LASTUSED", "uint64"),
        (16, "XFRMA_POLICY_TYPE", "xfrm_userpolicy_type"),
        (17, "XFRMA_MIGRATE", "xfrm_user_migrate"),
        (18, "XFRMA_ALG_AEAD", "xfrm_algo_aead"),
        (19, "XFRMA_KMADDRESS", "xfrm_user_kmaddress"),
        (20, "XFRMA_ALG_AUTH_TRUNC", "xfrm_algo_auth"),
        (21, "XFRMA_MARK", "xfrm_mark"),
        (22, "XFRMA_TFCPAD", "uint32"),
        (23, "XFRMA_REPLAY_ESN_VAL", "xfrm_replay_state_esn"),
        (24, "XFRMA_SA_EXTRA_FLAGS", "uint32"),
        (25, "XFRMA_PROTO", "uint8"),
        (26, "XFRMA_ADDRESS_FILTER", "xfrm_address_filter"),
        (27, "XFRMA_PAD", "hex"),
        (28, "XFRMA_OFFLOAD_DEV", "xfrm_user_offload"),
        (29, "XFRMA_SET_MARK", "uint32"),
        (30, "XFRMA_SET_MARK_MASK", "uint32"),
        (31, "XFRMA_IF_ID", "uint32"),
        (32, "XFRMA_MTIMER_THRESH", "uint32"),
        (33, "XFRMA_SA_DIR", "uint8"),
        (34, "XFRMA_NAT_KEEPALIVE_INTERVAL", "uint32"),
    )


class xfrm_msg(_fixed_fields, xfrm_attrs, nlmsg):
    """Base of every NETLINK_XFRM message: the XFRMA attribute table."""
    __slots__ = ()
    prefix = "XFRMA_"
    defaults = _ADDR_DEFAULTS


# ------------------------------------------------------------------ messages


class xfrm_usersa_info(xfrm_msg):
    """NEWSA / UPDSA requests, GETSA replies and dumps, SA notifications."""
    __slots__ = ()
    fields = USERSA_INFO


class xfrm_usersa_id(xfrm_msg):
    """GETSA / DELSA requests; DELSA notifications carry XFRMA_SA as well."""
    __slots__ = ()
    fields = USERSA_ID


class xfrm_userspi_info(xfrm_msg):
    """ALLOCSPI request: a larval SA and the SPI range to pick from."""
    __slots__ = ()
    fields = USERSA_INFO + (("min", "I"), ("max", "I"))


class xfrm_userpolicy_info(xfrm_msg):
    """NEWPOLICY / UPDPOLICY requests, GETPOLICY replies and dumps."""
    __slots__ = ()
    fields = USERPOLICY_INFO


class xfrm_userpolicy_id(xfrm_msg):
    """GETPOLICY / DELPOLICY / MIGRATE requests, DELPOLICY notifications."""
    __slots__ = ()
    fields = USERPOLICY_ID


class xfrm_user_expire(xfrm_msg):
    __slots__ = ()
    fields = USERSA_INFO + (("hard", "B"), ("__pad", "7x"))


class xfrm_user_polexpire(xfrm_msg):
    __slots__ = ()
    fields = USERPOLICY_INFO + (("hard", "B"), ("__pad", "7x"))


class xfrm_user_acquire(xfrm_msg):
    __slots__ = ()
    fields = (
        (("id_daddr", "16s"), ("id_spi", ">I"), ("id_proto", "B"), ("__id_pad", "3x"),
         ("saddr", "16s"))
        + selector_fields()
        + tuple(("pol_" + n if not n.startswith("__") else "__pol" + n, f)
                for n, f in USERPOLICY_INFO)
        + (("aalgos", "I"), ("ealgos", "I"), ("calgos", "I"), ("seq", "I"))
    )


class xfrm_user_mapping(xfrm_msg):
    __slots__ = ()
    fields = (
        ("daddr", "16s"), ("spi", ">I"), ("family", "H"), ("proto", "B"), ("__pad", "x"),
        ("reqid", "I"), ("old_saddr", "16s"), ("new_saddr", "16s"),
        ("old_sport", ">H"), ("new_sport", ">H"),
    )


class xfrm_usersa_flush(xfrm_msg):
    __slots__ = ()
    fields = (("proto", "B"), ("__pad", "3x"))


class xfrm_aevent_id(xfrm_msg):
    __slots__ = ()
    fields = USERSA_ID + (("saddr", "16s"), ("flags", "I"), ("reqid", "I"))


class xfrm_user_report(xfrm_msg):
    __slots__ = ()
    fields = (("proto", "B"), ("__pad", "3x")) + selector_fields()


class xfrm_empty(xfrm_msg):
    """FLUSHPOLICY: no fixed header, attributes only."""
    __slots__ = ()
    fields = ()


class xfrm_userpolicy_default(xfrm_msg):
    __slots__ = ()
    fields = (("in", "B"), ("fwd", "B"), ("out", "B"), ("__pad", "x"))


MESSAGE_CLASSES = {
    Msg.NEWSA: xfrm_usersa_info,
    Msg.UPDSA: xfrm_usersa_info,
    Msg.DELSA: xfrm_usersa_id,
    Msg.GETSA: xfrm_usersa_id,
    Msg.NEWPOLICY: xfrm_userpolicy_info,
    Msg.UPDPOLICY: xfrm_userpolicy_info,
    Msg.DELPOLICY: xfrm_userpolicy_id,
    Msg.GETPOLICY: xfrm_userpolicy_id,
    Msg.ALLOCSPI: xfrm_userspi_info,
    Msg.ACQUIRE: xfrm_user_acquire,
    Msg.EXPIRE: xfrm_user_expire,
    Msg.POLEXPIRE: xfrm_user_polexpire,
    Msg.FLUSHSA: xfrm_usersa_flush,
    Msg.FLUSHPOLICY: xfrm_empty,
    Msg.NEWAE: xfrm_aevent_id,
    Msg.GETAE: xfrm_aevent_id,
    Msg.REPORT: xfrm_user_report,
    Msg.MIGRATE: xfrm_userpolicy_id,
    Msg.MAPPING: xfrm_user_mapping,
    Msg.SETDEFAULT: xfrm_userpolicy_default,
    Msg.GETDEFAULT: xfrm_userpolicy_default,
}

# Replies the kernel sends: GETSA answers with NEWSA, GETPOLICY with NEWPOLICY,
# ALLOCSPI with NEWSA; notifications reuse the request types.


class XfrmMarshal(Marshal):
    msg_map = {int(k): v for k, v in MESSAGE_CLASSES.items()}


# sizes the kernel checks; verified against linux/xfrm.h with a C compiler
assert fields_size(USERSA_INFO) == 224
assert fields_size(USERPOLICY_INFO) == 168
assert fields_size(USERSA_ID) == 24
assert fields_size(USERPOLICY_ID) == 64
assert fields_size(xfrm_user_expire.fields) == 232
assert fields_size(xfrm_user_polexpire.fields) == 176
assert fields_size(xfrm_user_acquire.fields) == 280
assert fields_size(xfrm_user_mapping.fields) == 64
assert fields_size(xfrm_userspi_info.fields) == 232
assert fields_size(xfrm_aevent_id.fields) == 48
assert xfrm_attrs.xfrm_user_tmpl._layout()[0].size == 64
assert xfrm_attrs.xfrm_user_migrate._layout()[0].size == 76
