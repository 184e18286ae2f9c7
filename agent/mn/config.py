"""Mobile node configuration (TOML).

    [mn]
    interfaces = ["eth0"]                 # access interfaces the agent manages
    home_address = "10.1.0.100"
    home_agent = "10.1.0.1"
    home_prefix = "10.1.0.0/24"           # an address inside it means "at home"
    nai = "mn1@corp.example"              # optional (RFC 2794)
    spi = 256
    algorithm = "hmac-md5"                # or "keyed-md5" (legacy prefix+suffix)
    key_file = "/etc/mipmobike/mn.key"    # mode 0600
    lifetime = 600
    renew_fraction = 0.8
    reverse_tunnel = true
    use_fa = true                         # mode f when a foreign agent is found on a trusted link
    udp_tunnel = "auto"                   # RFC 3519: "auto" | "force" | "never"
    control_socket = "/run/mipmobike/mn.sock"
    state_dir = "/run/mipmobike/mn"
    datapath = "ipip"                     # "none": signalling only (hosts without ipip; tests)

    [mn.detection]
    initial_timeout = 1.0                 # RRQ retransmission (RFC 5266 3.4)
    retransmissions = 2
    max_timeout = 4.0

    [vpn]
    gateway = "198.51.100.1"
    gateway_id = "gw.vpn.example"
    local_id = "mn1@vpn.example"
    auth = "psk"                          # or "cert"
    psk_file = "/etc/mipmobike/vpn.psk"   # mode 0600
    # cert = "...", key_file = "...", ca = "..."
    # ike_proposals = ["aes256gcm16-prfsha384-ecp256"], esp_proposals = ["aes256gcm16"]
    # additional_addresses = []          # MOBIKE: announced besides the current one (never the HoA)
    # debug_keylog = "/root/ike-keys"    # DEBUG ONLY, off by default: IKE SA keys in tshark's
    #                                    # ikev2_decryption_table format, file created 0600
    internal_prefixes = ["10.0.0.0/8"]
    keep_ike_when_trusted = false
    dpd_interval = 30

    [gate]
    backend = "auto"                      # "bpf" | "nftables" | "iptables" | "auto"
    bpffs = "/run/mipmobike/bpf"          # where the gate's programs and maps are pinned
    instance = "mn"                       # names the pins and the ipset (two agents on one host)
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from agent import config as c

MN_KEYS = {"interfaces", "home_address", "home_agent", "home_prefix", "nai", "spi", "algorithm", "key_file",
           "lifetime", "renew_fraction", "reverse_tunnel", "use_fa", "udp_tunnel", "control_socket", "state_dir",
           "detection", "log_level", "datapath"}
DET_KEYS = {"initial_timeout", "retransmissions", "max_timeout"}
VPN_KEYS = {"gateway", "gateway_id", "local_id", "auth", "psk_file", "cert", "key_file", "ca", "internal_prefixes",
            "keep_ike_when_trusted", "dpd_interval", "ike_proposals", "esp_proposals", "additional_addresses",
            "debug_keylog"}
GATE_KEYS = {"backend", "bpffs", "instance", "ingress"}


@dataclass
class Detection:
    initial_timeout: float = 1.0
    retransmissions: int = 2
    max_timeout: float = 4.0


@dataclass
class VpnConfig:
    gateway: ipaddress.IPv4Address
    gateway_id: str
    local_id: str
    auth: str
    psk: bytes | None = field(repr=False)
    cert: str | None
    key_file: str | None
    ca: str | None
    internal_prefixes: list[ipaddress.IPv4Network]
    keep_ike_when_trusted: bool = False
    dpd_interval: int = 30
    ike_proposals: list[str] = field(default_factory=list)     # strongSwan notation; empty: our defaults
    esp_proposals: list[str] = field(default_factory=list)
    additional_addresses: list[ipaddress.IPv4Address] = field(default_factory=list)   # announced by MOBIKE
    debug_keylog: str | None = None      # debug only: IKE keys appended for tshark (file mode 0600)


@dataclass
class MnConfig:
    interfaces: list[str]
    home_address: ipaddress.IPv4Address
    home_agent: ipaddress.IPv4Address
    home_prefix: ipaddress.IPv4Network
    spi: int
    algorithm: str
    key: bytes = field(repr=False)
    nai: str | None = None
    lifetime: int = 600
    renew_fraction: float = 0.8
    reverse_tunnel: bool = True
    use_fa: bool = True
    udp_tunnel: str = "auto"
    control_socket: str = "/run/mipmobike/mn.sock"
    state_dir: str = "/run/mipmobike/mn"
    log_level: str = "INFO"
    datapath: str = "ipip"
    detection: Detection = field(default_factory=Detection)
    vpn: VpnConfig | None = None
    gate_backend: str = "auto"
    gate_bpffs: str = "/run/mipmobike/bpf"
    gate_instance: str = "mn"
    gate_ingress: str = "auto"            # the BPF gate's ingress hook: "auto", "xdp" or "tc"


def _str_item(d, k, where):
    if not isinstance(d[k], str) or not d[k]:
        raise c.ConfigError(where, f"must be a non-empty string, got {d[k]!r}")
    return d[k]


def parse(doc: dict) -> MnConfig:
    c.check_unknown(doc, {"mn", "vpn", "gate"}, "")
    mn = doc.get("mn")
    if not isinstance(mn, dict):
        raise c.ConfigError("mn", "the [mn] table is required")
    c.check_unknown(mn, MN_KEYS, "mn")
    ifaces = c.get_list(mn, "interfaces", "mn")
    if not ifaces or not all(isinstance(i, str) and 0 < len(i) <= 15 for i in ifaces):
        raise c.ConfigError("mn.interfaces", "must be a non-empty list of interface names (<= 15 characters)")
    det = mn.get("detection", {})
    c.check_unknown(det, DET_KEYS, "mn.detection")
    cfg = MnConfig(
        interfaces=ifaces,
        home_address=c.get_ip(mn, "home_address", "mn"),
        home_agent=c.get_ip(mn, "home_agent", "mn"),
        home_prefix=c.get_net(mn, "home_prefix", "mn"),
        spi=c.get_int(mn, "spi", "mn", min=256, max=0xFFFFFFFF),
        algorithm=c.get_str(mn, "algorithm", "mn", "hmac-md5", choices=("hmac-md5", "keyed-md5")),
        key=c.read_key_file(c.get_str(mn, "key_file", "mn"), "mn.key_file"),
        nai=c.get_str(mn, "nai", "mn", None),
        lifetime=c.get_int(mn, "lifetime", "mn", 600, min=1, max=65534),
        renew_fraction=c.get_float(mn, "renew_fraction", "mn", 0.8, min=0.1),
        reverse_tunnel=c.get_bool(mn, "reverse_tunnel", "mn", True),
        use_fa=c.get_bool(mn, "use_fa", "mn", True),
        udp_tunnel=c.get_str(mn, "udp_tunnel", "mn", "auto", choices=("auto", "force", "never")),
        control_socket=c.get_str(mn, "control_socket", "mn", "/run/mipmobike/mn.sock"),
        state_dir=c.get_str(mn, "state_dir", "mn", "/run/mipmobike/mn"),
        log_level=c.get_str(mn, "log_level", "mn", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
        datapath=c.get_str(mn, "datapath", "mn", "ipip", choices=("ipip", "none")),
        detection=Detection(
            initial_timeout=c.get_float(det, "initial_timeout", "mn.detection", 1.0, min=0.05),
            retransmissions=c.get_int(det, "retransmissions", "mn.detection", 2, min=0, max=10),
            max_timeout=c.get_float(det, "max_timeout", "mn.detection", 4.0, min=0.05),
        ),
    )
    if cfg.detection.initial_timeout > cfg.detection.max_timeout:
        raise c.ConfigError("mn.detection.max_timeout",
                            f"must be >= mn.detection.initial_timeout ({cfg.detection.initial_timeout})")
    if cfg.nai is not None and not 0 < len(cfg.nai.encode()) <= 255:
        raise c.ConfigError("mn.nai", "must be 1 to 255 bytes")
    if cfg.renew_fraction >= 1:
        raise c.ConfigError("mn.renew_fraction", f"must be below 1, got {cfg.renew_fraction}")
    if cfg.home_address not in cfg.home_prefix:
        raise c.ConfigError("mn.home_address", f"{cfg.home_address} is not inside mn.home_prefix {cfg.home_prefix}")
    if "vpn" in doc:
        v = doc["vpn"]
        c.check_unknown(v, VPN_KEYS, "vpn")
        auth = c.get_str(v, "auth", "vpn", "psk", choices=("psk", "cert"))
        psk = cert = key_file = ca = None
        if auth == "psk":
            psk = c.read_key_file(c.get_str(v, "psk_file", "vpn"), "vpn.psk_file")
        else:
            cert = c.get_str(v, "cert", "vpn")
            key_file = c.get_str(v, "key_file", "vpn")
            c.read_key_file(key_file, "vpn.key_file")      # refuse a readable private key now
            ca = c.get_str(v, "ca", "vpn")
        cfg.vpn = VpnConfig(
            gateway=c.get_ip(v, "gateway", "vpn"),
            gateway_id=c.get_str(v, "gateway_id", "vpn"),
            local_id=c.get_str(v, "local_id", "vpn"),
            auth=auth, psk=psk, cert=cert, key_file=key_file, ca=ca,
            internal_prefixes=c.get_list(v, "internal_prefixes", "vpn", item=c.net_item),
            keep_ike_when_trusted=c.get_bool(v, "keep_ike_when_trusted", "vpn", False),
            dpd_interval=c.get_int(v, "dpd_interval", "vpn", 30, min=0),
            ike_proposals=c.get_list(v, "ike_proposals", "vpn", [], item=_str_item),
            esp_proposals=c.get_list(v, "esp_proposals", "vpn", [], item=_str_item),
            additional_addresses=c.get_list(v, "additional_addresses", "vpn", [], item=c.ip_item),
            debug_keylog=c.get_str(v, "debug_keylog", "vpn", None),
        )
        _check_vpn_material(cfg.vpn)
        if not cfg.vpn.internal_prefixes:
            raise c.ConfigError("vpn.internal_prefixes", "must name at least one prefix")
        if not any(cfg.home_agent in p for p in cfg.vpn.internal_prefixes):
            raise c.ConfigError("vpn.internal_prefixes",
                                f"must contain the home agent {cfg.home_agent}: mode mc registers through the VPN")
    g = doc.get("gate", {})
    c.check_unknown(g, GATE_KEYS, "gate")
    cfg.gate_backend = c.get_str(g, "backend", "gate", "auto", choices=("auto", "bpf", "nftables", "iptables"))
    cfg.gate_bpffs = c.get_str(g, "bpffs", "gate", "/run/mipmobike/bpf")
    cfg.gate_instance = c.get_str(g, "instance", "gate", "mn")
    cfg.gate_ingress = c.get_str(g, "ingress", "gate", "auto", choices=("auto", "xdp", "tc"))
    if not cfg.gate_instance.replace("-", "").replace("_", "").isalnum() or len(cfg.gate_instance) > 20:
        raise c.ConfigError("gate.instance", "letters, digits, '-' and '_' only, at most 20 characters")
    return cfg


def _check_vpn_material(v: VpnConfig) -> None:
    """What the VPN would only find out at its first IKE start: proposal strings it cannot
    parse, certificates or keys it cannot load. Checked here so that ``check-config`` and the
    daemon's start refuse them with the key's name."""
    from agent.ike.errors import IkeError
    from agent.ike.proposals import EspProposal, IkeProposal
    for key, kind in (("ike_proposals", IkeProposal), ("esp_proposals", EspProposal)):
        for i, text in enumerate(getattr(v, key)):
            try:
                kind.parse(text)
            except (IkeError, ValueError) as e:
                raise c.ConfigError(f"vpn.{key}[{i}]", f"{text!r}: {e}") from None
    if v.auth != "cert":
        return
    from agent.ike.config import CaTrust, CertAuth
    try:
        CertAuth.load(v.cert, v.key_file)
    except (IkeError, ValueError, TypeError, OSError) as e:
        what = "vpn.key_file" if "private key" in str(e) else "vpn.cert"
        raise c.ConfigError(what, f"cannot be loaded: {getattr(e, 'strerror', None) or e}") from None
    try:
        CaTrust.load(v.ca)
    except (ValueError, OSError) as e:
        raise c.ConfigError("vpn.ca", f"cannot be loaded: {getattr(e, 'strerror', None) or e}") from None


def load(path: str) -> MnConfig:
    return parse(c.read_toml(path))
