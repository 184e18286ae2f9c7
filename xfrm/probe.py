"""What the running kernel's XFRM can do, tested in a scratch namespace.

:func:`probe` creates a throw-away network namespace, tries to add ESP SAs
(one per algorithm the project uses) and to migrate a policy there, and
removes the namespace again. Nothing in the caller's namespaces changes.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from typing import Dict, Optional

from pyroute2 import netns as pr_netns

from .api import Xfrm
from .constants import Dir, Msg
from .errors import EspUnavailable, XfrmError
from .netlink import NLM_F_ACK, NLM_F_REQUEST
from .model import SA, Algorithms, Policy, Selector, Template

_ALGORITHMS = {
    "rfc4106(gcm(aes))": lambda: Algorithms.gcm(bytes(20), 16),
    "cbc(aes)+hmac(sha256)": lambda: Algorithms.cbc_hmac(bytes(16), bytes(32), "sha256"),
    "cbc(aes)+hmac(sha384)": lambda: Algorithms.cbc_hmac(bytes(16), bytes(48), "sha384"),
    "cbc(aes)+hmac(sha512)": lambda: Algorithms.cbc_hmac(bytes(16), bytes(64), "sha512"),
}


@dataclass(frozen=True)
class ProbeResult:
    """``esp``: ESP SAs can be added; ``migrate``: XFRM_MSG_MIGRATE works;
    ``algorithms``: which ESP transforms the kernel accepted (empty without
    ESP); ``*_error``: why not, as the kernel said it."""
    esp: bool
    migrate: bool
    algorithms: Dict[str, bool] = field(default_factory=dict)
    esp_error: Optional[str] = None
    migrate_error: Optional[str] = None
    kernel: str = ""

    def lines(self) -> list:
        out = [f"kernel {self.kernel}",
               "ESP SAs: " + ("yes" if self.esp else f"no ({self.esp_error})"),
               "XFRM migrate: " + ("yes" if self.migrate else f"no ({self.migrate_error})")]
        for name, ok in self.algorithms.items():
            out.append(f"  {name}: {'yes' if ok else 'no'}")
        return out

    def __str__(self):
        return "\n".join(self.lines())


def _probe_in(ns: str) -> ProbeResult:
    esp, esp_error, algs = False, None, {}
    migrate, migrate_error = False, None
    with Xfrm(ns, owner=None) as x:
        spi = 0x1000
        for name, make in _ALGORITHMS.items():
            spi += 1
            try:
                x.add_sa(SA("192.0.2.1", "192.0.2.2", spi, make(), reqid=1))
                algs[name] = True
                esp = True
            except EspUnavailable as e:
                algs[name] = False
                esp_error = e.strerror          # says "no ESP": the one to report
            except XfrmError as e:
                algs[name] = False
                esp_error = esp_error or e.strerror
        if esp:
            esp_error = None
        elif esp_error and "no ESP" in esp_error:
            algs = {}                           # nothing to say about algorithms
        old = Policy(Selector("10.0.0.0/24", "10.0.1.0/24"), Dir.OUT,
                     templates=[Template("192.0.2.1", "192.0.2.2", reqid=1)])
        try:
            x.add_policy(old)
            # moving the policy's template is enough: no SA has to exist
            moved = Policy(old.selector, old.dir,
                           templates=[Template("192.0.2.3", "192.0.2.2", reqid=1)])
            x._request(x._migrate_msg(old, moved, None), Msg.MIGRATE,
                             NLM_F_REQUEST | NLM_F_ACK, "migrate", str(old))
            migrate = True
        except XfrmError as e:                  # MigrateUnsupported: ENOPROTOOPT
            migrate_error = e.strerror
    return ProbeResult(esp, migrate, algs, esp_error, migrate_error, os.uname().release)


def probe() -> ProbeResult:
    """Whether ESP states can be added and XFRM_MSG_MIGRATE works here.
    Needs CAP_SYS_ADMIN (to make a namespace) and CAP_NET_ADMIN. Takes a
    few milliseconds; nothing outside the scratch namespace changes."""
    ns = f"xfrmprobe-{os.getpid()}-{secrets.token_hex(3)}"
    pr_netns.create(ns)
    try:
        return _probe_in(ns)
    finally:
        pr_netns.remove(ns)


def probe_migrate() -> tuple:
    """``(supported, detail)`` for XFRM_MSG_MIGRATE alone (what ``mipmobike
    doctor`` asks); :func:`probe` tells ESP and algorithms as well."""
    r = probe()
    if r.migrate:
        return True, f"XFRM_MSG_MIGRATE moves a policy (kernel {r.kernel})"
    return False, r.migrate_error or "XFRM_MSG_MIGRATE failed"


async def probe_async() -> ProbeResult:
    """:func:`probe` for asyncio code (it does not block for long)."""
    return probe()
