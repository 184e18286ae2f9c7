"""Mobile IPv4 protocol core (RFC 5944 with RFC 2794, 3024, 3519, 5265), sans-I/O.

No sockets, no asyncio, no pyroute2: bytes, addresses and ``now`` (UNIX
seconds) go in; datagrams to send, timer deadlines and typed events come
out. The daemons (i-HA, i-FA, MN) own the sockets, the clock and the kernel.

Modules:
    messages   Registration Request/Reply, extensions, UDP tunnel data
    icmp       Agent Advertisement / Solicitation
    auth       security associations, authentication extensions, identification
    engine     Datagram / IcmpPacket outputs shared by the engines
    mn, ha, fa the mobile node, home agent and foreign agent engines

The only exception a decoder raises is :class:`MipDecodeError`.

Engine contract (all three engines; ``now`` is UNIX time, ``time.time()``)::

    engine.receive_datagram(data, src_ip, src_port, dst_ip, now)   # UDP 434
    engine.receive_icmp(icmp_bytes, src_ip, now)       # MN and FA (no IP header)
    engine.handle_timer(now)                           # when now >= get_timer()
    engine.get_timer() -> float | None                 # next deadline
    engine.datagrams_to_send() -> [Datagram | IcmpPacket]
    engine.next_event() -> event | None
    engine.counters                                    # dict of drop/accept counts

MobileNode(MnConfig, rng=None)
    register(now, care_of_address, foreign_agent=None, lifetime=None)
    deregister(now, care_of_address=None, foreign_agent=None)
    cancel(), solicit(now), send_tunnel_data(payload), binding, pending, clock_offset
    events: Registered(binding, lifetime, tnc, code), Denied(code, care_of_address,
            lifetime, deregistration), TimedOut, Deregistered, RegistrationExpired,
            AgentAdvertised(source, advertisement, rebooted), MnTunnelPacket
HomeAgent(HaConfig(address, nodes=[HaNode(...)], ...), rng=None)
    add_node(node), remove_node(home_address), revoke(home_address, coa=None),
    send_tunnel_data(home_address, payload), binding_for(home_address), bindings
    events: BindingAdded(binding), BindingUpdated(binding, previous),
            BindingRemoved(binding, reason), TunnelPacket
ForeignAgent(FaConfig(address, ...))
    start(now), advertisement(), revoke(home_address), visitors
    events: VisitorAdded(visitor), VisitorUpdated(visitor, previous),
            VisitorRemoved(visitor, reason)
"""

from .auth import (
    AuthAlgorithm,
    AuthResult,
    ReplayMode,
    SecurityAssociation,
    check,
    ntp_timestamp,
    ntp_to_unix,
    sign,
    verify,
)
from .constants import AdvFlag, RegFlag, ReplyCode
from .engine import Datagram, IcmpPacket
from .errors import MipConfigError, MipDecodeError
from .fa import FaConfig, ForeignAgent, Visitor, VisitorAdded, VisitorRemoved, VisitorUpdated
from .ha import (
    Binding,
    BindingAdded,
    BindingRemoved,
    BindingUpdated,
    HaConfig,
    HaNode,
    HomeAgent,
    TunnelPacket,
)
from .icmp import AgentAdvertisement, AgentSolicitation, decode_icmp
from .messages import (
    AuthExtension,
    EncapsulatingDeliveryStyle,
    NaiExtension,
    RegistrationReply,
    RegistrationRequest,
    TrustedNetworksConfigured,
    TunnelData,
    UdpTunnelReply,
    UdpTunnelRequest,
    UnknownExtension,
    decode_message,
)
from .mn import (
    AgentAdvertised,
    Denied,
    Deregistered,
    MnBinding,
    MnConfig,
    MnTunnelPacket,
    MobileNode,
    Registered,
    RegistrationExpired,
    TimedOut,
)

__all__ = [name for name in dir() if not name.startswith("_")
           and name not in ("auth", "constants", "engine", "errors", "fa", "ha", "icmp",
                            "messages", "mn")]
