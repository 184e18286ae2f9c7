"""The ``mipmobike`` command: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; the table below maps names to modules so that a
subcommand's imports (bcc, pyroute2, ...) are paid only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module or None while unimplemented, one-line help)
SUBCOMMANDS: dict[str, tuple[str | None, str]] = {
    "mn": ("agent.mn.cli", "run the mobile node agent"),
    "ha": ("agent.ha", "run the internal home agent (i-HA)"),
    "fa": ("agent.fa", "run the internal foreign agent (i-FA)"),
    "status": ("agent.status", "show a running daemon's state"),
    "check-config": ("agent.check_config", "validate a configuration file"),
    "gate": ("agent.gate.cli", "inspect, open or close the trust-detection gate"),
    "testbed": ("agent.testbed.cli", "build the RFC 5266 Figure-1 testbed in namespaces"),
    "demo": ("agent.demo.cli", "run the scripted roaming demo"),
    "bench": ("agent.bench.cli", "run the kernel-path performance suite"),
    "doctor": ("agent.doctor", "report what this host offers the agent"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="mipmobike",
        description="Secure roaming for Linux endpoints (RFC 5266): Mobile IPv4 with the internal home agent "
                    "on trusted links, Mobile IPv4 inside an IKEv2/MOBIKE VPN on untrusted ones, trust detected "
                    "on every link change behind a fail-closed gate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for name, (module, help_) in SUBCOMMANDS.items():
        subparsers[name] = sub.add_parser(name, help=help_ + ("" if module else " (not implemented yet)"))
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, subparsers = build_parser()
    # only the chosen subcommand's module is imported, and only it adds arguments
    name = next((a for a in argv if not a.startswith("-")), None)
    module = None
    if name in SUBCOMMANDS and SUBCOMMANDS[name][0]:
        module = importlib.import_module(SUBCOMMANDS[name][0])
        module.add_arguments(subparsers[name])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if module is None:
        print(f"mipmobike {args.command}: not implemented yet", file=sys.stderr)
        return 3
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
