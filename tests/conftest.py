"""Test tiers and shared fixtures.

Tiers follow the directory: tests/unit -> ``unit``, tests/netns -> ``netns``,
tests/kernel -> ``kernel``, tests/final -> ``final`` (run last by
scripts/test.sh). With ``MIPMOBIKE_STRICT=1`` (set by scripts/test.sh) a
skipped test fails the run: a missing dependency must be installed, not
silently skipped.
"""

from __future__ import annotations

import os
import pathlib

import pytest

TIERS = ("unit", "netns", "kernel", "final")
_HERE = pathlib.Path(__file__).parent


def pytest_configure(config):
    config.addinivalue_line("markers", "final: runs after every other tier (leftover checks)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        rel = pathlib.Path(str(item.fspath)).relative_to(_HERE)
        tier = rel.parts[0] if len(rel.parts) > 1 else None
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (os.environ.get("MIPMOBIKE_STRICT") == "1" and report.skipped
            and not hasattr(report, "wasxfail")):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under MIPMOBIKE_STRICT=1 (install what it needs): {reason}"


from tests.lib.fixtures import *  # noqa: E402,F401,F403  (shared fixtures)
