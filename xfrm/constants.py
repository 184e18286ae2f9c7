"""Numbers of the Linux NETLINK_XFRM interface (linux/xfrm.h, linux/udp.h).

Only facts live here: message types, attribute types, multicast groups and
flag values, as the kernel defines them. Names follow the kernel's, minus the
common prefix, inside :class:`enum.IntEnum` classes so that decoded values
print readably.
"""

from __future__ import annotations

import enum

XFRM_INF = 0xFFFFFFFFFFFFFFFF        # "no limit" in struct xfrm_lifetime_cfg
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_COMP = 108
UDP_ENCAP_ESPINUDP = 2               # linux/udp.h: RFC 3948 ESP-in-UDP
XFRM_MAX_DEPTH = 6                   # templates per policy / entries per MIGRATE
REPLAY_ESN_MAX = 4096                # XFRMA_REPLAY_ESN_MAX, bytes of bitmap


class Msg(enum.IntEnum):
    """``XFRM_MSG_*`` netlink message types."""
    NEWSA = 0x10
    DELSA = 0x11
    GETSA = 0x12
    NEWPOLICY = 0x13
    DELPOLICY = 0x14
    GETPOLICY = 0x15
    ALLOCSPI = 0x16
    ACQUIRE = 0x17
    EXPIRE = 0x18
    UPDPOLICY = 0x19
    UPDSA = 0x1A
    POLEXPIRE = 0x1B
    FLUSHSA = 0x1C
    FLUSHPOLICY = 0x1D
    NEWAE = 0x1E
    GETAE = 0x1F
    REPORT = 0x20
    MIGRATE = 0x21
    NEWSADINFO = 0x22
    GETSADINFO = 0x23
    NEWSPDINFO = 0x24
    GETSPDINFO = 0x25
    MAPPING = 0x26
    SETDEFAULT = 0x27
    GETDEFAULT = 0x28


class Attr(enum.IntEnum):
    """``XFRMA_*`` attribute types."""
    UNSPEC = 0
    ALG_AUTH = 1
    ALG_CRYPT = 2
    ALG_COMP = 3
    ENCAP = 4
    TMPL = 5
    SA = 6
    POLICY = 7
    SEC_CTX = 8
    LTIME_VAL = 9
    REPLAY_VAL = 10
    REPLAY_THRESH = 11
    ETIMER_THRESH = 12
    SRCADDR = 13
    COADDR = 14
    LASTUSED = 15
    POLICY_TYPE = 16
    MIGRATE = 17
    ALG_AEAD = 18
    KMADDRESS = 19
    ALG_AUTH_TRUNC = 20
    MARK = 21
    TFCPAD = 22
    REPLAY_ESN_VAL = 23
    SA_EXTRA_FLAGS = 24
    PROTO = 25
    ADDRESS_FILTER = 26
    PAD = 27
    OFFLOAD_DEV = 28
    SET_MARK = 29
    SET_MARK_MASK = 30
    IF_ID = 31
    MTIMER_THRESH = 32
    SA_DIR = 33
    NAT_KEEPALIVE_INTERVAL = 34


class Group(enum.IntEnum):
    """``XFRMNLGRP_*`` multicast groups (numbers, not bit masks)."""
    ACQUIRE = 1
    EXPIRE = 2
    SA = 3
    POLICY = 4
    AEVENTS = 5
    REPORT = 6
    MIGRATE = 7
    MAPPING = 8


class Mode(enum.IntEnum):
    """``XFRM_MODE_*``."""
    TRANSPORT = 0
    TUNNEL = 1
    ROUTEOPTIMIZATION = 2
    IN_TRIGGER = 3
    BEET = 4


class Dir(enum.IntEnum):
    """``XFRM_POLICY_IN/OUT/FWD``: the direction of a policy.

    Dumps report per-socket policies (IP_XFRM_POLICY) with the direction
    plus XFRM_POLICY_MAX (3): those are the ``SOCKET_*`` values; they cannot
    be added, changed or deleted over netlink.
    """
    IN = 0
    OUT = 1
    FWD = 2
    SOCKET_IN = 3
    SOCKET_OUT = 4
    SOCKET_FWD = 5


class Action(enum.IntEnum):
    """``XFRM_POLICY_ALLOW/BLOCK``."""
    ALLOW = 0
    BLOCK = 1


class PolicyType(enum.IntEnum):
    MAIN = 0
    SUB = 1


class StateFlag(enum.IntFlag):
    """``XFRM_STATE_*`` flags of struct xfrm_usersa_info."""
    NOECN = 1
    DECAP_DSCP = 2
    NOPMTUDISC = 4
    WILDRECV = 8
    ICMP = 16
    AF_UNSPEC = 32
    ALIGN4 = 64
    ESN = 128


class PolicyFlag(enum.IntFlag):
    LOCALOK = 1
    ICMP = 2
