"""``mipmobike mn --config FILE``: run the mobile node agent."""

from __future__ import annotations

import asyncio
import logging
import sys

from agent import log as logsetup
from agent.config import ConfigError


# compiled gate programs, reused across restarts (and by a VM sharing this root read-only)
GATE_CACHE = "/var/cache/mipmobike/bpf"


def add_arguments(parser) -> None:
    parser.add_argument("--config", "-c", required=True, help="mobile node configuration (TOML)")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default from the file), WARNING")


def build(cfg):
    """The agent with its kernel-facing parts, as configured."""
    from agent.gate import Gate
    from agent.mn.daemon import MobileNodeAgent
    from agent.mn.datapath import Datapath

    backend = {"auto": "auto", "bpf": "bpf", "nftables": "netfilter", "iptables": "netfilter"}[cfg.gate_backend]
    gate = Gate(cfg.gate_instance, backend=backend, bpffs=cfg.gate_bpffs, cache_dir=GATE_CACHE,
                ingress=cfg.gate_ingress)
    datapath = Datapath(cfg.home_address, cfg.home_agent, cfg.vpn.gateway if cfg.vpn else None, kind=cfg.datapath)
    vpn = None
    if cfg.vpn is not None:
        try:
            from agent.mn.vpn import Vpn
        except ImportError as e:        # untrusted links then stay closed (fail closed)
            logging.getLogger("mipmobike.mn").error("no VPN client in this build (%s): untrusted links stay closed", e)
        else:
            vpn = Vpn(cfg)
    return MobileNodeAgent(cfg, gate=gate, datapath=datapath, vpn=vpn)


def run(args) -> int:
    from agent.mn import config
    try:
        cfg = config.load(args.config)
    except ConfigError as e:
        print(f"mipmobike mn: {args.config}: {e}", file=sys.stderr)
        return 2
    logsetup.setup(args.log_level or cfg.log_level)
    agent = build(cfg)
    asyncio.run(agent.run())
    return 0
