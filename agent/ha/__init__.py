"""``mipmobike ha --config FILE``: the internal home agent (i-HA).

See agent/ha/config.py for the configuration, agent/ha/daemon.py for what
the daemon does, agent/ha/dataplane.py for the kernel state per binding.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--config", "-c", required=True, metavar="FILE", help="TOML configuration ([ha] table)")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="override ha.log_level")


def run(args) -> int:
    from .config import load
    from .daemon import HaDaemon
    from .runtime import run_daemon

    return run_daemon("ha", load, HaDaemon, args.config, args.log_level)
