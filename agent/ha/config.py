"""Home agent configuration (TOML); ``parse(doc)`` / ``load(path)``.

    [ha]
    address = "10.1.0.2"              # the Home Agent field mobile nodes use
    listen = ["10.1.0.2"]             # UDP 434 is bound on these (default: [address])
    home_interface = "eth0"           # proxy ARP here (default: the interface
                                      #   whose subnet holds each home address)
    max_lifetime = 1800               # seconds, cap on granted lifetimes
    trusted_prefixes = ["10.0.0.0/8"] # request source inside -> TNC (RFC 5265)
    max_bindings = 100000             # optional
    max_bindings_per_node = 1         # >1 allows simultaneous bindings (S)
    reverse_tunnel = true             # offer reverse tunnelling (RFC 3024)
    require_fa_auth = false           # requests via an FA need a Foreign-Home extension
    udp_keepalive = 110               # RFC 3519 keepalive interval sent to nodes
    gratuitous_arp = 2                # announcements per registration/deregistration
    state_file = "/var/lib/mipmobike/ha-state.json"
    control_socket = "/run/mipmobike/ha.sock"
    log_level = "INFO"

    [ha.dataplane]
    backend = "auto"                  # "ipip" | "bpf" | "none" | "auto"
    mtu = 1480                        # tunnel MTU (default: 1500 - 20)
    device_prefix = "mip"             # tunnel devices: mip<CoA hex><3 hex>,
                                      #   mip-bpf, mip-udp
    decap_interfaces = ["eth1"]       # bpf: where tunnelled packets arrive
                                      #   (default: every Ethernet interface)
    route_protocol = 180              # tag on our routes and rules

    [[ha.nodes]]
    home_address = "10.1.0.100"
    nai = "mn1@corp.example"          # optional (RFC 2794)
    spi = 256                         # >= 256
    algorithm = "hmac-md5"            # or "keyed-md5"
    key_file = "/etc/mipmobike/mn1.key"   # mode 0600
    replay = "timestamp"              # or "nonce"
    tolerance = 7.0                   # seconds (timestamps)
    reverse_tunnel_required = false
    udp_tunnel_allowed = true
    max_lifetime = 600                # optional per-node cap
    enabled = true

    [[ha.foreign_agents]]             # FA-HA security associations (optional)
    address = "10.20.0.1"
    spi = 300
    algorithm = "hmac-md5"
    key_file = "/etc/mipmobike/fa1.key"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from agent import config as c
from agent.mip.auth import SecurityAssociation
from agent.mip.errors import MipConfigError
from agent.mip.ha import HaConfig, HaNode

HA_KEYS = {"address", "listen", "port", "home_interface", "max_lifetime", "trusted_prefixes", "max_bindings",
           "max_bindings_per_node", "reverse_tunnel", "require_fa_auth", "udp_keepalive", "gratuitous_arp",
           "state_file", "control_socket", "log_level", "dataplane", "nodes", "foreign_agents"}
DP_KEYS = {"backend", "mtu", "device_prefix", "decap_interfaces", "route_protocol", "table_base",
           "rule_priority", "max_entries"}
NODE_KEYS = {"home_address", "nai", "spi", "algorithm", "key_file", "replay", "tolerance",
             "reverse_tunnel_required", "udp_tunnel_allowed", "max_lifetime", "enabled"}
FA_KEYS = {"address", "spi", "algorithm", "key_file", "replay", "tolerance"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class DataplaneSettings:
    backend: str = "auto"
    mtu: int | None = None
    device_prefix: str = "mip"
    decap_interfaces: list[str] | None = None
    route_protocol: int = 180
    table_base: int | None = None
    rule_priority: int = 1000
    max_entries: int | None = None


@dataclass
class HaSettings:
    """Everything ``mipmobike ha`` needs: the engine's HaConfig plus the daemon's own settings."""

    engine: HaConfig
    listen: list[IPv4Address]
    home_interface: str | None = None
    gratuitous_arp: int = 2
    state_file: str = "/var/lib/mipmobike/ha-state.json"
    control_socket: str = "/run/mipmobike/ha.sock"
    log_level: str = "INFO"
    dataplane: DataplaneSettings = field(default_factory=DataplaneSettings)

    @property
    def address(self) -> IPv4Address:
        return self.engine.address

    @property
    def port(self) -> int:
        return self.engine.port


def _sa(d: dict, where: str) -> SecurityAssociation:
    spi = c.get_int(d, "spi", where, min=256, max=0xFFFFFFFF)
    algorithm = c.get_str(d, "algorithm", where, "hmac-md5", choices=("hmac-md5", "keyed-md5"))
    key = c.read_key_file(c.get_str(d, "key_file", where), f"{where}.key_file")
    replay = c.get_str(d, "replay", where, "timestamp", choices=("timestamp", "nonce"))
    tolerance = c.get_float(d, "tolerance", where, 7.0, min=0.0)
    try:
        return SecurityAssociation(spi, key, algorithm, replay, tolerance)
    except MipConfigError as e:
        raise c.ConfigError(where, str(e)) from None


def _ifname(d: dict, key: str, where: str, default=None):
    v = c.get_str(d, key, where, default)
    if v is not None and not 0 < len(v) <= 15:
        raise c.ConfigError(c.path_of(where, key), f"must be an interface name (1..15 characters), got {v!r}")
    return v


def parse_dataplane(d: dict, where: str, default_protocol: int) -> DataplaneSettings:
    c.check_unknown(d, DP_KEYS, where)
    dp = DataplaneSettings(
        backend=c.get_str(d, "backend", where, "auto", choices=("auto", "ipip", "bpf", "none")),
        mtu=c.get_int(d, "mtu", where, None, min=576, max=65515) if "mtu" in d else None,
        device_prefix=c.get_str(d, "device_prefix", where, "mip"),
        route_protocol=c.get_int(d, "route_protocol", where, default_protocol, min=5, max=255),
        table_base=c.get_int(d, "table_base", where, None, min=1, max=0xFFFF0000) if "table_base" in d else None,
        rule_priority=c.get_int(d, "rule_priority", where, 1000, min=1, max=32765),
        max_entries=c.get_int(d, "max_entries", where, None, min=16, max=1 << 24) if "max_entries" in d else None,
    )
    if not 1 <= len(dp.device_prefix) <= 4 or not dp.device_prefix.isascii() or "/" in dp.device_prefix:
        raise c.ConfigError(f"{where}.device_prefix", f"must be 1..4 characters, got {dp.device_prefix!r}")
    if "decap_interfaces" in d:
        names = c.get_list(d, "decap_interfaces", where)
        for i, n in enumerate(names):
            if not isinstance(n, str) or not 0 < len(n) <= 15:
                raise c.ConfigError(f"{where}.decap_interfaces[{i}]", f"must be an interface name, got {n!r}")
        dp.decap_interfaces = names
    return dp


def parse(doc: dict) -> HaSettings:
    c.check_unknown(doc, {"ha"}, "")
    ha = doc.get("ha")
    if not isinstance(ha, dict):
        raise c.ConfigError("ha", "the [ha] table is required")
    c.check_unknown(ha, HA_KEYS, "ha")
    address = c.get_ip(ha, "address", "ha")
    listen = c.get_list(ha, "listen", "ha", [], item=c.ip_item) or [address]
    nodes_raw = c.get_list(ha, "nodes", "ha")
    if not nodes_raw:
        raise c.ConfigError("ha.nodes", "at least one mobile node ([[ha.nodes]]) is required")
    nodes: list[HaNode] = []
    seen_hoa: dict = {}
    seen_nai: dict = {}
    for i, n in enumerate(nodes_raw):
        where = f"ha.nodes[{i}]"
        if not isinstance(n, dict):
            raise c.ConfigError(where, "must be a table")
        c.check_unknown(n, NODE_KEYS, where)
        hoa = c.get_ip(n, "home_address", where)
        if hoa in seen_hoa:
            raise c.ConfigError(f"{where}.home_address", f"{hoa} is already ha.nodes[{seen_hoa[hoa]}]")
        seen_hoa[hoa] = i
        nai = c.get_str(n, "nai", where, None)
        if nai is not None:
            if not 0 < len(nai.encode()) <= 255:
                raise c.ConfigError(f"{where}.nai", "must be 1..255 bytes")
            if nai in seen_nai:
                raise c.ConfigError(f"{where}.nai", f"{nai!r} is already ha.nodes[{seen_nai[nai]}]")
            seen_nai[nai] = i
        max_lt = c.get_int(n, "max_lifetime", where, None, min=1, max=0xFFFF) if "max_lifetime" in n else None
        nodes.append(HaNode(
            home_address=hoa, sa=_sa(n, where), nai=nai,
            reverse_tunnel_required=c.get_bool(n, "reverse_tunnel_required", where, False),
            udp_tunnel_allowed=c.get_bool(n, "udp_tunnel_allowed", where, True),
            max_lifetime=max_lt, enabled=c.get_bool(n, "enabled", where, True)))
    fa_sas = {}
    for i, f in enumerate(c.get_list(ha, "foreign_agents", "ha", [])):
        where = f"ha.foreign_agents[{i}]"
        if not isinstance(f, dict):
            raise c.ConfigError(where, "must be a table")
        c.check_unknown(f, FA_KEYS, where)
        fa_sas[c.get_ip(f, "address", where)] = _sa(f, where)
    trusted: list[IPv4Network] = c.get_list(ha, "trusted_prefixes", "ha", [], item=c.net_item)
    max_bindings = c.get_int(ha, "max_bindings", "ha", None, min=1) if "max_bindings" in ha else None
    try:
        engine = HaConfig(
            address=address, nodes=nodes,
            max_lifetime=c.get_int(ha, "max_lifetime", "ha", 1800, min=1, max=0xFFFF),
            trusted_prefixes=trusted, fa_sas=fa_sas,
            require_fa_auth=c.get_bool(ha, "require_fa_auth", "ha", False),
            reverse_tunnel_supported=c.get_bool(ha, "reverse_tunnel", "ha", True),
            max_bindings_per_node=c.get_int(ha, "max_bindings_per_node", "ha", 1, min=1, max=64),
            max_bindings=max_bindings,
            udp_keepalive=c.get_int(ha, "udp_keepalive", "ha", 110, min=1, max=0xFFFF),
            port=c.get_int(ha, "port", "ha", 434, min=1, max=65535),
        )
    except MipConfigError as e:
        raise c.ConfigError("ha", str(e)) from None
    dp = parse_dataplane(ha.get("dataplane", {}), "ha.dataplane", 180)
    return HaSettings(
        engine=engine, listen=listen,
        home_interface=_ifname(ha, "home_interface", "ha"),
        gratuitous_arp=c.get_int(ha, "gratuitous_arp", "ha", 2, min=0, max=10),
        state_file=c.get_str(ha, "state_file", "ha", "/var/lib/mipmobike/ha-state.json"),
        control_socket=c.get_str(ha, "control_socket", "ha", "/run/mipmobike/ha.sock"),
        log_level=c.get_str(ha, "log_level", "ha", "INFO", choices=LOG_LEVELS),
        dataplane=dp,
    )


def load(path: str) -> HaSettings:
    return parse(c.read_toml(path))
