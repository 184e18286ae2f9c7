"""Names unique to one test run, so two runs side by side never collide.

scripts/test.sh exports MIPMOBIKE_TEST_RUN (a short hex token); a bare pytest
run makes one up. Every namespace, interface, ipset and socket path a test
creates carries it, and every process a fixture starts carries it in its
environment, which is how the final tier finds leftovers.
"""

from __future__ import annotations

import itertools
import os
import secrets

RUN = os.environ.setdefault("MIPMOBIKE_TEST_RUN", secrets.token_hex(3))[:6]
_counter = itertools.count(1)


def unique(kind: str = "x") -> str:
    """A short name (<= 15 chars, fits an interface name) unique in this run."""
    return f"{kind[:3]}{RUN}{next(_counter):x}"[:15]


def ns_prefix() -> str:
    return f"mm{RUN}-"
