"""A gate another agent version left behind, and a kernel without the IPsec policy match.

* netfilter chains of an older rules layout (no "pass ipsec", no version rule) are rebuilt when a new
  agent adopts them, in the state they were in, with one jump per direction;
* a BPF gate of another ABI is replaced in place by a starting agent, every link closed (a read-only
  look refuses it with GateAbiError), and "auto" does not put a netfilter gate on top of it;
* without xt_policy (simulated: iptables-restore refuses "-m policy") the netfilter gate is built
  without the ipsec rule, still closed, and says so in the log.
"""

from __future__ import annotations

import logging
import struct

import pytest

from agent.gate import Gate, GateAbiError, GateError, GateState
from agent.gate.nf_backend import RULES_VERSION, NetfilterBackend
from tests.netns.test_gate_filter import GW, HA, OTHER, _instance, echo_ok, lab  # noqa: F401  (fixture)


def saved(lab, family: int, table: str) -> list[str]:
    tool = "iptables-save" if family == 4 else "ip6tables-save"
    return lab.mn.run(tool, "-t", table).stdout.splitlines()


def chain_rules(lab, g: Gate, family: int, table: str, direction: str) -> list[str]:
    idx = int(lab.mn.run("cat", f"/sys/class/net/{lab.mn_if}/ifindex").stdout)
    chain = g.backend._chain(idx, direction)
    return [r for r in saved(lab, family, table) if r.startswith(f"-A {chain} ")], chain


def test_netfilter_chains_of_an_older_layout_are_rebuilt_keeping_their_state(lab):
    inst = _instance()
    g = Gate(inst, backend="netfilter", netns=lab.mn.name)
    g2 = None
    try:
        g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        g.attach(lab.mn_if)
        # what a version-1 agent left: the same chains without the ipsec and version rules
        for family in (4, 6):
            for direction, table in (("in", "raw"), ("out", "mangle")):
                rules, chain = chain_rules(lab, g, family, table, direction)
                old = [r for r in rules if "pass ipsec" not in r and "rules v" not in r]
                assert len(old) == len(rules) - 2, rules
                text = "\n".join([f"*{table}", f":{chain} - [0:0]", *old, "COMMIT"]) + "\n"
                tool = "iptables-restore" if family == 4 else "ip6tables-restore"
                p = lab.mn.run(tool, "-w", "--noflush", input=text)
                assert p.returncode == 0, p.stderr
        for family in (4, 6):
            for direction, table in (("in", "raw"), ("out", "mangle")):
                rules, _ = chain_rules(lab, g, family, table, direction)
                assert rules and not any("rules v" in r or "pass ipsec" in r for r in rules)
        g.release()
        assert not echo_ok(lab.mn, OTHER)

        g2 = Gate(inst, netns=lab.mn.name)                  # auto: adopts the netfilter gate
        assert g2.adopted and g2.backend_name == "netfilter"
        assert g2.attach(lab.mn_if) == GateState.CLOSED
        for family in (4, 6):
            for direction, table in (("in", "raw"), ("out", "mangle")):
                rules, chain = chain_rules(lab, g2, family, table, direction)
                assert any("pass ipsec" in r for r in rules), rules
                assert rules[-1].endswith(f'--comment "rules v{RULES_VERSION}"'), rules
                jumps = [r for r in saved(lab, family, table) if r.endswith(f"-j {chain}")]
                assert len(jumps) == 1, jumps
        assert not echo_ok(lab.mn, OTHER)
        c = g2.counters(lab.mn_if)
        assert c["egress"]["drop"]["icmp"] >= 1 and "ipsec" in c["ingress"]["pass"]
        g2.open(lab.mn_if)
        assert echo_ok(lab.mn, OTHER, 2)
    finally:
        last = g2 or g
        last.destroy()
        last.release()


def _egress_prog(lab) -> int:
    import json
    flts = json.loads(lab.mn.run("tc", "-j", "filter", "show", "dev", lab.mn_if, "egress").stdout or "[]")
    ids = [f["options"]["prog"]["id"] for f in flts if "prog" in (f.get("options") or {})]
    assert len(ids) == 1, flts
    return ids[0]


@pytest.mark.parametrize("backend", ["auto", "bpf"])
def test_a_bpf_gate_of_another_abi_is_replaced_closed(backend, lab, bpffs, gate_cache, caplog):
    """An agent upgraded over a gate another ABI left (a crash skipped destroy): the operator's read-only
    view refuses it; the agent replaces it in place, every link closed, and does not put a netfilter gate
    on top (the old programs would still judge the traffic)."""
    from agent.gate.bpf_backend import _CONFIG
    from agent.gate.defs import ABI
    inst = _instance()
    g = Gate(inst, backend="bpf", netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache)
    g2 = None
    key = struct.pack("=I", 0)
    try:
        g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        g.attach(lab.mn_if)
        g.open(lab.mn_if)                                   # the old agent had opened it
        assert echo_ok(lab.mn, OTHER, 2)
        cfg = g.backend.maps["config"]
        abi, mark, mask, pad = _CONFIG.unpack(bytes(cfg.lookup(key)))
        cfg.update(key, _CONFIG.pack(abi - 1, mark, mask, pad))      # as an older agent left it
        old_prog = _egress_prog(lab)
        g.release()

        with pytest.raises(GateAbiError, match="ABI"):
            Gate(inst, backend=backend, netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache, create=False)
        assert echo_ok(lab.mn, OTHER, 2), "a read-only look changed the old gate"

        with caplog.at_level(logging.WARNING, logger="mipmobike.gate"):
            g2 = Gate(inst, backend=backend, netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache)
        assert g2.backend_name == "bpf" and g2.adopted
        assert any("replacing the ABI" in r.getMessage() for r in caplog.records)
        assert g2.state(lab.mn_if) == GateState.CLOSED
        assert _egress_prog(lab) != old_prog
        assert _CONFIG.unpack(bytes(g2.backend.maps["config"].lookup(key)))[0] == ABI
        assert not [r for t in ("raw", "mangle") for r in saved(lab, 4, t) if f"mipmobike-gate:{inst}" in r]
        assert not echo_ok(lab.mn, OTHER)
        g2.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        assert g2.attach(lab.mn_if) == GateState.CLOSED
        g2.open(lab.mn_if)
        assert echo_ok(lab.mn, OTHER, 2)
    finally:
        last = g2
        if last is None:
            try:
                last = Gate(inst, backend="bpf", netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache)
            except Exception:
                last = None
        if last is not None:
            last.destroy()
            last.release()


def test_without_the_policy_match_the_rules_leave_ipsec_out(lab, monkeypatch, caplog):
    real = NetfilterBackend._restore

    def no_xt_policy(self, family, text):
        if "-m policy" in text:
            raise GateError("iptables-restore failed: Couldn't load match `policy':No such file or directory")
        return real(self, family, text)

    monkeypatch.setattr(NetfilterBackend, "_restore", no_xt_policy)
    g = Gate(_instance(), backend="netfilter", netns=lab.mn.name)
    try:
        g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        with caplog.at_level(logging.WARNING, logger="mipmobike.gate"):
            assert g.attach(lab.mn_if) == GateState.CLOSED
        warned = [r for r in caplog.records if "no IPsec policy match" in r.getMessage()]
        assert len(warned) == 1, [r.getMessage() for r in caplog.records]
        for family in (4, 6):
            for direction, table in (("in", "raw"), ("out", "mangle")):
                rules, _ = chain_rules(lab, g, family, table, direction)
                assert rules and not any("pass ipsec" in r for r in rules), rules
                assert rules[-1].endswith(f'--comment "rules v{RULES_VERSION} no-ipsec"'), rules
        assert not echo_ok(lab.mn, OTHER)
        g.open(lab.mn_if)
        assert echo_ok(lab.mn, OTHER, 2)
        # a later attach of the same backend finds the chains current: no rebuild, no second warning
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mipmobike.gate"):
            assert g.attach(lab.mn_if) == GateState.OPEN
        assert not caplog.records
    finally:
        g.destroy()
        g.release()


def test_a_restore_failure_that_is_not_the_policy_match_is_raised(lab, monkeypatch):
    def broken(self, family, text):
        raise GateError("iptables-restore failed: line 2 failed")

    monkeypatch.setattr(NetfilterBackend, "_restore", broken)
    g = Gate(_instance(), backend="netfilter", netns=lab.mn.name)
    try:
        with pytest.raises(GateError, match="line 2 failed"):
            g.attach(lab.mn_if)
        assert g.backend.ipsec is True
    finally:
        monkeypatch.undo()
        g.destroy()
        g.release()
