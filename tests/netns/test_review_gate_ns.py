"""Review of the gate's libc interface lookups (agent/gate/core.py: socket.if_nametoindex /
if_nameindex): they run in the thread that did setns(CLONE_NEWNET) (the gate's worker thread
when an asyncio loop runs) and must see that namespace, not the process's; and they must be
back in the process's namespace afterwards. A name the kernel cannot hold is a GateError."""

from __future__ import annotations

import asyncio
import socket

import pytest

from agent.gate.core import Gate
from agent.gate.defs import GateError
from agent.gate.nsutil import netns
from tests.lib.names import unique
from tests.lib.topo import Topology


def test_libc_lookups_follow_the_threads_namespace():
    with Topology("gl") as t:
        ns = t.ns("a")
        name = unique("gld")
        ns.ip("link", "add", name, "type", "veth", "peer", "name", unique("glp"))
        want = int(ns.ip("-o", "link", "show", name).stdout.split(":")[0])
        with pytest.raises(GateError):
            Gate._ifindex(name)                                  # not in ours

        async def in_worker():
            # what Gate._call does under a running loop: a worker thread switches namespace
            loop = asyncio.get_running_loop()

            def work():
                with netns(ns.name):
                    return Gate._ifindex(name), Gate._ifnames()
            return await loop.run_in_executor(None, work)

        idx, names = asyncio.run(in_worker())
        assert idx == want and names.get(want) == name and "lo" in names.values()
        with netns(ns.name):                                     # this thread, no loop
            assert Gate._ifindex(name) == want
        with pytest.raises(GateError):
            Gate._ifindex(name)                                  # back home
        assert name not in dict(socket.if_nameindex()).values()


@pytest.mark.parametrize("bad", ["a\0b", "x" * 40, ""])
def test_bad_interface_names_are_gate_errors(bad):
    with pytest.raises(GateError):
        Gate._ifindex(bad)
