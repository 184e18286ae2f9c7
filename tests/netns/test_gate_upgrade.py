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
import os
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


# -- what a replacement or a build cut off half way must not leave open (review: trying to break it) ------
V6_MN, V6_FAR = "fd00:61::1", "fd00:61::2"


def _with_ipv6(lab) -> None:
    for ns, i in ((lab.mn, lab.mn_if), (lab.far, lab.far_if)):
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0")
        ns.sysctl(f"net.ipv6.conf.{i}.disable_ipv6", "0")
    lab.mn.ip("addr", "add", f"{V6_MN}/64", "dev", lab.mn_if, "nodad")
    lab.far.ip("addr", "add", f"{V6_FAR}/64", "dev", lab.far_if, "nodad")
    assert lab.mn.ping(V6_FAR, 1, 2, "-6")


def _older_abi(g: Gate) -> None:
    """Make the gate look like one an agent of the previous ABI left (the config's first word)."""
    from agent.gate.bpf_backend import _CONFIG
    key = struct.pack("=I", 0)
    cfg = g.backend.maps["config"]
    abi, mark, mask, pad = _CONFIG.unpack(bytes(cfg.lookup(key)))
    cfg.update(key, _CONFIG.pack(abi - 1, mark, mask, pad))


def _leave_older_gate(lab, bpffs, gate_cache, inst: str, *, state: str = "open", ingress: str = "xdp",
                      allowed: bool = True) -> None:
    """What an agent of the previous ABI leaves when it dies: its gate on the lab's link in ``state``."""
    g = Gate(inst, backend="bpf", netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache, ingress=ingress)
    if allowed:
        g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
    g.attach(lab.mn_if)
    if state == "open":
        g.open(lab.mn_if)
    _older_abi(g)
    g.release()


def _udp_arrives(src_ns, dst_ns, dst: str, port: int) -> bool:
    from tests.netns.test_gate_filter import recv_or_none, sock_in, try_send
    rx = sock_in(dst_ns, bind=(dst, port), timeout=1)
    tx = sock_in(src_ns)
    try:
        try_send(tx, b"probe", (dst, port))
        return recv_or_none(rx, 1.0) is not None
    finally:
        rx.close()
        tx.close()


def _cleanup_bpf(inst, lab, bpffs, gate_cache) -> None:
    try:
        g = Gate(inst, backend="bpf", netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache)
    except Exception:
        return
    g.destroy()
    g.release()


@pytest.mark.parametrize("old_state", ["open", "closed"])
def test_a_replacement_that_cannot_be_built_hands_the_links_to_netfilter(old_state, lab, bpffs, gate_cache,
                                                                         monkeypatch):
    """No bcc and a compile cache that misses (a new gate.c): the netfilter gate closes the old gate's
    link first, then the old programs and pins go, so netfilter alone decides (the old gate left
    closed would otherwise block what netfilter opens); backend = bpf refuses. Before: the old pins
    were removed first and the agent could not start, the link staying as the old gate left it."""
    from agent.gate import loader
    inst = _instance()
    n = n2 = None
    try:
        _leave_older_gate(lab, bpffs, gate_cache, inst, state=old_state)

        def no_bcc(*a, **k):
            raise loader.GateUnavailable("bcc is not importable (simulated)")
        monkeypatch.setattr(loader, "instantiate", no_bcc)
        with pytest.raises(GateAbiError, match="cannot be built"):
            Gate(inst, backend="bpf", netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache)
        n = Gate(inst, netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache)
        assert n.backend_name == "netfilter" and n.state(lab.mn_if) == GateState.CLOSED
        assert "bpf" not in lab.mn.run("tc", "filter", "show", "dev", lab.mn_if, "egress").stdout
        assert not os.path.exists(os.path.join(bpffs, inst))
        n.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        assert n.attach(lab.mn_if) == GateState.CLOSED
        assert not echo_ok(lab.mn, OTHER)
        n.open(lab.mn_if)
        assert echo_ok(lab.mn, OTHER, 2)
        n.release()
        monkeypatch.undo()                            # bcc back: the netfilter gate is adopted, still works
        n2 = Gate(inst, netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache)
        assert n2.backend_name == "netfilter" and n2.state(lab.mn_if) == GateState.OPEN
        n2.close(lab.mn_if)
        assert not echo_ok(lab.mn, OTHER)
    finally:
        monkeypatch.undo()
        for x in (n2, n):
            if x is not None:
                x.destroy()
                x.release()
                break
        _cleanup_bpf(inst, lab, bpffs, gate_cache)


@pytest.mark.parametrize("fail_at", ["v6", "v4-egress"])
def test_a_netfilter_build_cut_off_half_way_is_completed(fail_at, lab, monkeypatch):
    """The agent killed (or a restore failing) between the per-table commits: the next attach finds
    the chains incomplete and builds the rest instead of taking them as current."""
    _with_ipv6(lab)
    real = NetfilterBackend._restore
    armed = [True]

    def cut(self, family, text):
        if armed[0] and ((family == 6) if fail_at == "v6" else (family == 4 and text.startswith("*mangle"))):
            raise GateError("killed here (simulated)")
        return real(self, family, text)

    monkeypatch.setattr(NetfilterBackend, "_restore", cut)
    inst = _instance()
    g = Gate(inst, backend="netfilter", netns=lab.mn.name)
    try:
        g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        with pytest.raises(GateError, match="simulated"):
            g.attach(lab.mn_if)
        armed[0] = False
        g.release()
        g2 = Gate(inst, netns=lab.mn.name)
        assert g2.attach(lab.mn_if) == GateState.CLOSED
        assert not echo_ok(lab.mn, OTHER)
        assert not _udp_arrives(lab.mn, lab.far, OTHER, 9999)
        assert not lab.mn.ping(V6_FAR, 1, 1, "-6")
        for family in (4, 6):
            for direction, table in (("in", "raw"), ("out", "mangle")):
                rules, chain = chain_rules(lab, g2, family, table, direction)
                assert rules[-1].endswith(f'--comment "rules v{RULES_VERSION}"'), rules
                assert len([r for r in saved(lab, family, table) if r.endswith(f"-j {chain}")]) == 1
    finally:
        monkeypatch.undo()
        g.destroy()


@pytest.mark.parametrize("old_ingress,new_ingress", [("xdp", "xdp"), ("tc", "xdp"), ("xdp", "tc")])
def test_a_replacement_takes_over_ingress_too(old_ingress, new_ingress, lab, bpffs, gate_cache):
    """The old gate was open: after the replacement nothing comes in either (its ingress program is
    gone or judged after by ours), whichever hook each version used."""
    inst = _instance()
    g = Gate(inst, backend="bpf", netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache, ingress=old_ingress)
    try:
        g.attach(lab.mn_if)
        g.open(lab.mn_if)
        assert _udp_arrives(lab.far, lab.mn, "10.61.0.1", 9998)
        _older_abi(g)
        g.release()
        g2 = Gate(inst, backend="bpf", netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache, ingress=new_ingress)
        g2.release()
        assert not _udp_arrives(lab.far, lab.mn, "10.61.0.1", 9998)
        assert not lab.far.ping("10.61.0.1", 1, 1)
    finally:
        _cleanup_bpf(inst, lab, bpffs, gate_cache)


def test_lost_pins_of_another_abi_are_replaced_not_loaded_against(lab, bpffs, gate_cache):
    """Pins lost (a private mount namespace ended) and the attached programs are another version's:
    their maps are not loaded against (their layout may differ); the gate is replaced, closed, with no
    netfilter gate stacked on it."""
    import shutil
    inst = _instance()
    try:
        _leave_older_gate(lab, bpffs, gate_cache, inst)
        shutil.rmtree(os.path.join(bpffs, inst))
        with pytest.raises(GateAbiError):
            Gate(inst, netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache, create=False)
        assert not os.path.exists(os.path.join(bpffs, inst)), "a read-only look wrote pins"
        g2 = Gate(inst, netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache)
        assert g2.backend_name == "bpf" and g2.state(lab.mn_if) == GateState.CLOSED
        g2.release()
        assert not [r for t in ("raw", "mangle") for r in saved(lab, 4, t) if f"mipmobike-gate:{inst}" in r]
        assert not echo_ok(lab.mn, OTHER)
    finally:
        _cleanup_bpf(inst, lab, bpffs, gate_cache)


def test_an_xdp_attach_that_fails_falls_back_to_tc_ingress(lab, bpffs, gate_cache, monkeypatch):
    """XDP refused (EBUSY, simulated) while replacing an open older gate: ingress is gated with TC, which
    runs after whatever XDP program stays, so nothing comes in while the state says closed."""
    from agent.gate.bpf_backend import BpfBackend
    inst = _instance()
    try:
        _leave_older_gate(lab, bpffs, gate_cache, inst, allowed=False)

        def busy(self, ipr, ifname, ifindex):
            raise GateError(f"{ifname}: cannot attach XDP program: (16, 'Device or resource busy')")
        monkeypatch.setattr(BpfBackend, "_xdp_attach", busy)
        g2 = Gate(inst, backend="bpf", netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache, ingress="xdp")
        monkeypatch.undo()
        assert g2.state(lab.mn_if) == GateState.CLOSED
        g2.release()
        assert "bpf" in lab.mn.run("tc", "filter", "show", "dev", lab.mn_if, "ingress").stdout
        assert not _udp_arrives(lab.far, lab.mn, "10.61.0.1", 9998)
    finally:
        monkeypatch.undo()
        _cleanup_bpf(inst, lab, bpffs, gate_cache)


def test_a_transient_restore_failure_is_raised_and_keeps_the_ipsec_rule(lab, monkeypatch):
    """Only a kernel without the policy match (a scratch chain tells) drops the ipsec rule; any other
    failure is the error it is, and the next attach builds the full rules."""
    real = NetfilterBackend._restore
    left = [1]

    def once(self, family, text):
        if left[0]:
            left[0] -= 1
            raise GateError("iptables-restore failed: line 3 failed: Resource temporarily unavailable")
        return real(self, family, text)

    monkeypatch.setattr(NetfilterBackend, "_restore", once)
    g = Gate(_instance(), backend="netfilter", netns=lab.mn.name)
    try:
        with pytest.raises(GateError, match="temporarily unavailable"):
            g.attach(lab.mn_if)
        assert g.backend.ipsec is True
        assert g.attach(lab.mn_if) == GateState.CLOSED
        rules, _ = chain_rules(lab, g, 4, "raw", "in")
        assert any("pass ipsec" in r for r in rules) and rules[-1].endswith(f'"rules v{RULES_VERSION}"')
    finally:
        monkeypatch.undo()
        g.destroy()
        g.release()


def test_a_renamed_link_is_gated_under_its_new_name(lab):
    """netfilter matches the interface by name: after a rename (udev, a re-plugged NIC) the chains are
    taken over with jumps for the new name, the old name's jumps removed."""
    inst = _instance()
    g = Gate(inst, backend="netfilter", netns=lab.mn.name)
    new = (lab.mn_if + "x")[:15]
    try:
        g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        g.attach(lab.mn_if)
        lab.mn.ip("link", "set", lab.mn_if, "down")
        lab.mn.ip("link", "set", lab.mn_if, "name", new)
        lab.mn.ip("link", "set", new, "up")
        g.release()
        g2 = Gate(inst, netns=lab.mn.name)
        assert g2.attach(new) == GateState.CLOSED
        assert not echo_ok(lab.mn, OTHER)
        for family in (4, 6):
            for table in ("raw", "mangle"):
                jumps = [r for r in saved(lab, family, table) if f"mipmobike-gate:{inst}:" in r]
                assert len(jumps) == 1 and f" {new} " in jumps[0], jumps
        g2.open(new)
        assert echo_ok(lab.mn, OTHER, 2)
    finally:
        lab.mn.ip("link", "set", new, "name", lab.mn_if, check=False)
        g.destroy()
        g.release()


def test_close_finishes_a_netfilter_build_cut_off_half_way(lab, monkeypatch):
    """The agent's start-up attach failed half way (logged); the link-up's close() must finish the build,
    not just find the state rule absent and return."""
    real = NetfilterBackend._restore
    armed = [True]

    def cut(self, family, text):
        if armed[0] and family == 4 and text.startswith("*mangle"):
            raise GateError("transient (simulated)")
        return real(self, family, text)

    monkeypatch.setattr(NetfilterBackend, "_restore", cut)
    g = Gate(_instance(), backend="netfilter", netns=lab.mn.name)
    try:
        g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        with pytest.raises(GateError, match="simulated"):
            g.attach(lab.mn_if)
        armed[0] = False
        g.close(lab.mn_if)
        assert g.state(lab.mn_if) == GateState.CLOSED
        assert not _udp_arrives(lab.mn, lab.far, OTHER, 9999)
    finally:
        monkeypatch.undo()
        g.destroy()
        g.release()


def test_ip6tables_that_cannot_work_still_leaves_ipv4_gated(lab, monkeypatch):
    """ip6tables failing outright (no ip6 tables in this kernel): IPv4 is gated before the error is raised
    (before: the layout check listed IPv6 first and nothing was built)."""
    real = NetfilterBackend._run

    def run(argv, input=None):
        if argv[0].startswith("ip6tables"):
            raise GateError(f"{argv[0]} failed: Address family not supported by protocol (simulated)")
        return real(argv, input)

    monkeypatch.setattr(NetfilterBackend, "_run", staticmethod(run))
    g = Gate(_instance(), backend="netfilter", netns=lab.mn.name)
    try:
        g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        with pytest.raises(GateError, match="IPv4 gated, IPv6 not"):
            g.attach(lab.mn_if)
        assert not echo_ok(lab.mn, OTHER)
        assert not _udp_arrives(lab.mn, lab.far, OTHER, 9999)
    finally:
        monkeypatch.undo()
        g.destroy()
        g.release()


def test_a_link_the_replacement_could_not_take_over_is_not_reported_closed(lab, bpffs, gate_cache, monkeypatch):
    """Replacing an open older gate, attaching our egress program fails on the link (ENOMEM, simulated):
    the link is not reported as gated, so the next close() attaches again and closes it for real."""
    from agent.gate.bpf_backend import TC_EGRESS, BpfBackend
    inst = _instance()
    try:
        _leave_older_gate(lab, bpffs, gate_cache, inst)
        real = BpfBackend._tc_attach

        def no_egress(self, ipr, ifname, ifindex, parent, prog):
            if parent == TC_EGRESS:
                raise GateError(f"{ifname}: cannot attach {prog}: ENOMEM (simulated)")
            return real(self, ipr, ifname, ifindex, parent, prog)

        monkeypatch.setattr(BpfBackend, "_tc_attach", no_egress)
        g2 = Gate(inst, backend="bpf", netns=lab.mn.name, bpffs=bpffs, cache_dir=gate_cache)
        monkeypatch.undo()
        assert g2.state(lab.mn_if) is None
        g2.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        g2.close(lab.mn_if)
        assert g2.state(lab.mn_if) == GateState.CLOSED
        assert not _udp_arrives(lab.mn, lab.far, OTHER, 9997)
        g2.release()
    finally:
        monkeypatch.undo()
        _cleanup_bpf(inst, lab, bpffs, gate_cache)


def test_a_close_cut_off_between_families_is_finished_by_the_next_one(lab, monkeypatch):
    """close() whose ip6tables-restore fails after IPv4 closed: the next close() closes IPv6 too (the
    state is read per chain, not from IPv4 alone), and open/close cycles keep one state rule per chain."""
    _with_ipv6(lab)
    g = Gate(_instance(), backend="netfilter", netns=lab.mn.name)
    try:
        g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        g.attach(lab.mn_if)
        g.open(lab.mn_if)
        assert lab.mn.ping(V6_FAR, 1, 2, "-6")
        real = NetfilterBackend._restore
        armed = [True]

        def cut(self, family, text):
            if armed[0] and family == 6:
                armed[0] = False
                raise GateError("ip6tables-restore: transient (simulated)")
            return real(self, family, text)

        monkeypatch.setattr(NetfilterBackend, "_restore", cut)
        with pytest.raises(GateError, match="simulated"):
            g.close(lab.mn_if)
        monkeypatch.undo()
        g.close(lab.mn_if)
        assert not lab.mn.ping(V6_FAR, 1, 2, "-6") and not echo_ok(lab.mn, OTHER)
        g.open(lab.mn_if)
        g.close(lab.mn_if)
        assert not lab.mn.ping(V6_FAR, 1, 2, "-6")
        g.open(lab.mn_if)
        for family in (4, 6):
            for direction, table in (("in", "raw"), ("out", "mangle")):
                rules, _ = chain_rules(lab, g, family, table, direction)
                assert sum("state open" in r for r in rules) == 1, rules
    finally:
        monkeypatch.undo()
        g.destroy()
        g.release()


def test_two_gated_links_that_swap_names_stay_gated_each_in_its_own_state(lab, topology):
    """A <-> B renamed: opening the link now named B must not ungate the other (closed) one, which the
    old jumps judged by name: the jumps are moved to the names the links have now, in one commit."""
    mn2, _far2 = topology.link(lab.mn, lab.far, "10.62.0.1/24", "10.62.0.2/24")
    g = Gate(_instance(), backend="netfilter", netns=lab.mn.name)
    A, B = lab.mn_if, mn2
    try:
        g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        g.attach(A)
        g.attach(B)
        assert not echo_ok(lab.mn, "10.62.0.2") and not echo_ok(lab.mn, OTHER)
        for n in (A, B):
            lab.mn.ip("link", "set", n, "down")
        lab.mn.ip("link", "set", A, "name", "mmswaptmp")
        lab.mn.ip("link", "set", B, "name", A)
        lab.mn.ip("link", "set", "mmswaptmp", "name", B)
        for n in (A, B):
            lab.mn.ip("link", "set", n, "up")
        g.open(B)                                   # the 10.61 link, now named B
        assert echo_ok(lab.mn, OTHER, 2)
        assert not echo_ok(lab.mn, "10.62.0.2", 1), "the closed link (now named A) was ungated"
        assert g.state(A) == GateState.CLOSED and g.state(B) == GateState.OPEN
    finally:
        g.destroy()
        g.release()


def test_a_replugged_link_with_the_same_name_can_be_opened(lab):
    """The link is unplugged while closed and a new one with the same name appears: the old chain's
    jump (by name) must not keep judging the new link after it is opened."""
    import subprocess
    g = Gate(_instance(), backend="netfilter", netns=lab.mn.name)
    A = lab.mn_if
    try:
        g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        g.attach(A)
        lab.mn.ip("link", "del", A)
        with pytest.raises(GateError):
            g.close(A)                              # the agent's link-down: no such interface
        subprocess.run(["ip", "link", "add", A, "netns", lab.mn.name, "type", "veth", "peer", "name",
                        A + "p", "netns", lab.far.name], check=True)
        lab.mn.ip("link", "set", A, "up")
        lab.far.ip("link", "set", A + "p", "up")
        lab.mn.ip("addr", "add", "10.61.0.1/24", "dev", A)
        lab.far.ip("addr", "add", "10.61.0.4/24", "dev", A + "p")
        g.close(A)
        assert not echo_ok(lab.mn, "10.61.0.4", 1)
        g.open(A)
        assert echo_ok(lab.mn, "10.61.0.4", 2)
    finally:
        g.destroy()
        g.release()


def test_interface_names_netfilter_rules_cannot_carry(lab, topology):
    """A name with a quote, backslash, space or a trailing '+' is refused with a reason (written, a
    backslash ended the comment early: a jump without target, 'closed' with nothing filtered); a gated
    link renamed to such a name does not stop the other links' operations."""
    mn2, _far2 = topology.link(lab.mn, lab.far, "10.62.0.1/24", "10.62.0.2/24")
    g = Gate(_instance(), backend="netfilter", netns=lab.mn.name)
    A, B = lab.mn_if, mn2
    try:
        g.set_allowed(home_agents=[(HA, 434)], gateways=[GW])
        bad = "mmx\\\\"
        lab.mn.ip("link", "set", B, "down")
        lab.mn.ip("link", "set", B, "name", bad)
        with pytest.raises(GateError, match="cannot be written into netfilter rules"):
            g.attach(bad)
        lab.mn.ip("link", "set", bad, "name", B)
        lab.mn.ip("link", "set", B, "up")
        g.attach(A)
        g.attach(B)
        g.open(A)
        lab.mn.ip("link", "set", B, "down")
        lab.mn.ip("link", "set", B, "name", 'q"q')
        g.close(A)                                   # not blocked by the other link's name
        assert not echo_ok(lab.mn, OTHER)
        g.open(A)
        assert echo_ok(lab.mn, OTHER, 2)
    finally:
        g.destroy()
        g.release()
