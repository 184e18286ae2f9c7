"""``mipmobike check-config FILE``: validate a mobile node, home agent or foreign agent configuration.

The kind follows the file's top-level table: [mn], [ha] or [fa]. Errors name
the key and the reason; exit status 0 when valid, 1 otherwise.
"""

from __future__ import annotations

import importlib
import sys

from agent import config as c

PARSERS = {"mn": "agent.mn.config", "ha": "agent.ha.config", "fa": "agent.fa.config"}


def add_arguments(parser) -> None:
    parser.add_argument("file", help="a TOML configuration file")


def check(path: str) -> str:
    doc = c.read_toml(path)
    kinds = [k for k in PARSERS if k in doc]
    if len(kinds) != 1:
        raise c.ConfigError(path, "expected exactly one of the tables [mn], [ha] or [fa]")
    try:
        module = importlib.import_module(PARSERS[kinds[0]])
    except ImportError:
        raise c.ConfigError(kinds[0], f"this build has no {kinds[0]} daemon") from None
    module.parse(doc)
    return kinds[0]


def run(args) -> int:
    try:
        kind = check(args.file)
    except c.ConfigError as e:
        print(f"{args.file}: {e}", file=sys.stderr)
        return 1
    print(f"{args.file}: valid {kind} configuration")
    return 0
