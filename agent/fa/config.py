"""Foreign agent configuration (TOML); ``parse(doc)`` / ``load(path)``.

    [fa]
    interface = "eth1"                  # the visited link (advertisements, visitors)
    address = "10.40.0.1"               # the FA's address on it
    care_of_addresses = ["10.40.0.1"]   # advertised; default [address]
    registration_lifetime = 1800        # longest lifetime relayed (69 above it)
    advertisement_interval = 5.0        # seconds between unsolicited advertisements
                                        #   (0: only answer solicitations)
    advertisement_lifetime = 15         # optional, default 3 intervals
    reverse_tunnel = true               # offer reverse tunnelling (RFC 3024)
    reverse_tunnel_required = false
    require_mn_auth = false             # every request needs a Mobile-Foreign extension
    require_ha_auth = false             # every reply needs a Foreign-Home extension
    allowed_home_agents = ["10.1.0.2"]  # optional: relay only to these
    max_visitors = 1000                 # optional
    pending_timeout = 7.0               # answer 78 when the HA stays silent this long
    control_socket = "/run/mipmobike/fa.sock"
    log_level = "INFO"

    [fa.dataplane]                      # as [ha.dataplane]; route_protocol defaults to 181
    backend = "auto"

    [[fa.home_agents]]                  # FA-HA security associations (optional)
    address = "10.1.0.2"
    spi = 300
    algorithm = "hmac-md5"
    key_file = "/etc/mipmobike/fa-ha.key"   # mode 0600

    [[fa.nodes]]                        # MN-FA security associations (optional)
    home_address = "10.1.0.100"
    spi = 400
    key_file = "/etc/mipmobike/mn1-fa.key"
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent import config as c
from agent.ha.config import LOG_LEVELS, DataplaneSettings, _sa, parse_dataplane
from agent.mip.errors import MipConfigError
from agent.mip.fa import FaConfig

FA_KEYS = {"interface", "address", "care_of_addresses", "registration_lifetime", "advertisement_interval",
           "advertisement_lifetime", "reverse_tunnel", "reverse_tunnel_required", "require_mn_auth",
           "require_ha_auth", "allowed_home_agents", "max_visitors", "pending_timeout", "port",
           "control_socket", "log_level", "dataplane", "home_agents", "nodes"}
HA_SA_KEYS = {"address", "spi", "algorithm", "key_file", "replay", "tolerance"}
NODE_SA_KEYS = {"home_address", "spi", "algorithm", "key_file", "replay", "tolerance"}


@dataclass
class FaSettings:
    engine: FaConfig
    interface: str
    control_socket: str = "/run/mipmobike/fa.sock"
    log_level: str = "INFO"
    dataplane: DataplaneSettings = field(default_factory=DataplaneSettings)

    @property
    def address(self):
        return self.engine.address

    @property
    def port(self) -> int:
        return self.engine.port


def parse(doc: dict) -> FaSettings:
    c.check_unknown(doc, {"fa"}, "")
    fa = doc.get("fa")
    if not isinstance(fa, dict):
        raise c.ConfigError("fa", "the [fa] table is required")
    c.check_unknown(fa, FA_KEYS, "fa")
    interface = c.get_str(fa, "interface", "fa")
    if not 0 < len(interface) <= 15:
        raise c.ConfigError("fa.interface", f"must be an interface name (1..15 characters), got {interface!r}")
    address = c.get_ip(fa, "address", "fa")
    coas = c.get_list(fa, "care_of_addresses", "fa", [], item=c.ip_item)
    ha_sas = {}
    for i, h in enumerate(c.get_list(fa, "home_agents", "fa", [])):
        where = f"fa.home_agents[{i}]"
        if not isinstance(h, dict):
            raise c.ConfigError(where, "must be a table")
        c.check_unknown(h, HA_SA_KEYS, where)
        ha_sas[c.get_ip(h, "address", where)] = _sa(h, where)
    mn_sas = {}
    for i, n in enumerate(c.get_list(fa, "nodes", "fa", [])):
        where = f"fa.nodes[{i}]"
        if not isinstance(n, dict):
            raise c.ConfigError(where, "must be a table")
        c.check_unknown(n, NODE_SA_KEYS, where)
        mn_sas[c.get_ip(n, "home_address", where)] = _sa(n, where)
    interval = c.get_float(fa, "advertisement_interval", "fa", 5.0, min=0.0)
    allowed = None
    if "allowed_home_agents" in fa:
        allowed = c.get_list(fa, "allowed_home_agents", "fa", item=c.ip_item)
    try:
        engine = FaConfig(
            address=address, care_of_addresses=coas,
            registration_lifetime=c.get_int(fa, "registration_lifetime", "fa", 1800, min=1, max=0xFFFF),
            advertisement_interval=interval or None,
            advertisement_lifetime=(c.get_int(fa, "advertisement_lifetime", "fa", min=1, max=0xFFFF)
                                    if "advertisement_lifetime" in fa else None),
            reverse_tunnel=c.get_bool(fa, "reverse_tunnel", "fa", True),
            reverse_tunnel_required=c.get_bool(fa, "reverse_tunnel_required", "fa", False),
            require_mn_auth=c.get_bool(fa, "require_mn_auth", "fa", False),
            require_ha_auth=c.get_bool(fa, "require_ha_auth", "fa", False),
            allowed_home_agents=allowed,
            max_visitors=c.get_int(fa, "max_visitors", "fa", min=1) if "max_visitors" in fa else None,
            pending_timeout=c.get_float(fa, "pending_timeout", "fa", 7.0, min=0.1),
            mn_sas=mn_sas, ha_sas=ha_sas,
            port=c.get_int(fa, "port", "fa", 434, min=1, max=65535),
        )
    except MipConfigError as e:
        raise c.ConfigError("fa", str(e)) from None
    return FaSettings(
        engine=engine, interface=interface,
        control_socket=c.get_str(fa, "control_socket", "fa", "/run/mipmobike/fa.sock"),
        log_level=c.get_str(fa, "log_level", "fa", "INFO", choices=LOG_LEVELS),
        dataplane=parse_dataplane(fa.get("dataplane", {}), "fa.dataplane", 181),
    )


def load(path: str) -> FaSettings:
    return parse(c.read_toml(path))
