"""``mipmobike fa --config FILE``: the internal foreign agent (i-FA).

See agent/fa/config.py for the configuration and agent/fa/daemon.py for
what the daemon does.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--config", "-c", required=True, metavar="FILE", help="TOML configuration ([fa] table)")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="override fa.log_level")


def run(args) -> int:
    from agent.ha.runtime import run_daemon

    from .config import load
    from .daemon import FaDaemon

    return run_daemon("fa", load, FaDaemon, args.config, args.log_level)
