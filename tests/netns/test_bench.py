"""``mipmobike bench`` runs end to end with tiny counts and writes a consistent report.

Speed is not asserted (the bench prints it); this proves the harness works: a
testbed, the agent moved c -> f -> c by the demo's Roamer, strongSwan's client
moved between the external nets with the flow running through its tunnel,
the i-HA part through scripts/bench_ha.py, Markdown + JSON written, nothing
left behind. The host has no ipip, so the agent runs signalling only here and
the report must say so instead of inventing numbers.
"""

import json
import subprocess
import sys

from agent.bench.hostparts import parse_gate
from agent.bench.report import goals
from agent.bench.stats import percentile, summary
from tests.lib.names import RUN, ns_prefix

GATE_SAMPLE = """\
gate compiled and loaded in 0.01 s (bcc, once per process)

UDP 64-byte payload, iperf3 -b 0, 3 rounds x 2 s, configurations alternating; pps counted by the receiving veth
                                   no program   open, XDP in    open, TC in   ratio to none
  egress  A->B (TC egress)        200.0 kpps     196.0 kpps     195.0 kpps   0.980 / 0.975
  ingress B->A (XDP or TC)        210.0 kpps     205.8 kpps     199.5 kpps   0.980 / 0.950
  rounds (kpps): eg/none 200 201 199

closed (UDP dropped by the gate at A's TC egress), one Python sender on a connected socket:
  sender            none    300.0 kpps   closed    290.0 kpps   closed/none = 0.967
  dropped and counted by the gate: 870000 of 870000 sent

per-packet program cost (BPF_PROG_TEST_RUN, 1000000 runs each; no program = 0 ns):
  TC egress    open   any  -> pass    12 ns
  XDP ingress  closed ike  -> pass    30 ns
"""


def test_bench_harness_runs_and_reports(tmp_path):
    out = tmp_path / "reports"
    argv = [sys.executable, "-m", "agent.cli", "bench", "--where", "host", "--parts", "handover,goodput,ha",
            "--rounds", "1", "--rtts", "0,20", "--cycle", "internal-2,internal-1", "--ha-sizes", "200",
            "--ha-backends", "engine", "--idle-seconds", "0.5", "--settle", "0.2", "--out", str(out),
            "--testbed-id", f"b{RUN}", "--state-root", str(tmp_path / "tb"), "--ns-prefix", f"{ns_prefix()}bn-"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "bench-latest.json").read_text())
    md = (out / "bench-latest.md").read_text()

    h = res["parts"]["handover"]
    agent = {r["transition"]: r for r in h["rtts"]["0"]["summary"]}
    assert agent["internal-1 -> internal-2"]["modes"] == ["c->f"], agent
    assert agent["internal-2 -> internal-1"]["modes"] == ["f->c"], agent
    for r in agent.values():
        assert r["ok"] == r["moves"] == 1, r
        assert r["ready"]["median"] > 0 and r["lease"]["median"] <= r["ready"]["median"], r
    # no ipip on this host: signalling only, and the report says what was not measured
    assert h["signalling_only"] is True
    assert any("no ipip" in x for x in h["unmeasured"]), h["unmeasured"]
    assert "20" not in h["rtts"] and any("no netem" in x for x in h["unmeasured"])
    # strongSwan's client made the untrusted moves with traffic through its tunnel
    swan = {r["transition"]: r for r in h["strongswan"]["0"]["summary"]}
    assert set(swan) == {"external-1 -> external-2", "external-2 -> external-1"}, swan
    for r in swan.values():
        assert r["ok"] == 1 and r["first_echo"]["median"] > 0, r
    assert h["strongswan_flow"]["udp_answered"] > 0
    # goodput cannot run without ipip: reported, not invented
    assert "no ipip" in res["parts"]["goodput"]["not_measured"]
    ar = res["parts"]["agent_resources"]
    assert ar["idle"]["rss_mb"] > 0 and ar["during"]["0"]["moves"] == 2
    ha = res["parts"]["ha"]["rows"]
    assert [(r["backend"], r["n"]) for r in ha] == [("engine", 200)] and ha[0]["new"] > 0
    # goals: every one present, each met / not met / not measured with a reason
    assert len(res["goals"]) == 5
    for g in res["goals"]:
        assert g["status"] in ("met", "not met", "inconclusive", "not measured") and g.get("detail"), g
    assert res["goals"][2]["status"] == "not measured"
    for heading in ("## Goals", "## Handover", "## Agent CPU and memory", "## Goodput", "## BPF gate cost",
                    "## i-HA registrations"):
        assert heading in md
    assert res["meta"]["host"]["kernel"] and res["meta"]["host"]["vm"] is False
    assert "goals:" in p.stdout and "reports:" in p.stdout
    # the reports can be written again from the JSON alone (goals judged again, same Markdown)
    again = tmp_path / "again"
    r = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "--render", str(out / "bench-latest.json"),
                        "--out", str(again)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (again / "bench-latest.md").read_text() == md


def test_gate_output_parsed_and_judged():
    g = parse_gate(GATE_SAMPLE)
    assert g["rows"]["egress"]["none_kpps"] == 200.0 and g["rows"]["ingress"]["ratio_tc"] == 0.95
    assert g["worst_ratio"] == 0.98 and g["closed_sender_ratio"] == 0.967
    assert g["closed_dropped"] == 870000 and len(g["prog_ns"]) == 2 and g["rounds"] == 3
    assert g["rounds_kpps"]["eg/none"] == [200.0, 201.0, 199.0] and g["baseline_spread"] == 0.01
    res = {"parts": {"gate": g, "handover": None, "goodput": None}}
    gate_goal = goals(res)[4]
    assert gate_goal["status"] == "met" and gate_goal["value"] == 0.98
    res["parts"]["gate"] = parse_gate(GATE_SAMPLE.replace("0.980 / 0.950", "0.960 / 0.950"))
    assert goals(res)[4]["status"] == "not met"
    res["parts"]["gate"] = parse_gate(GATE_SAMPLE.replace("eg/none 200 201 199", "eg/none 200 150 199"))
    assert goals(res)[4]["status"] == "inconclusive"
    assert goals({"parts": {}})[4]["status"] == "not measured"


def test_stats():
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 95) == 10
    assert percentile(list(range(1, 101)), 95) == 95
    s = summary([3.0, None, 1.0, 2.0])
    assert (s["n"], s["missing"], s["median"], s["p95"]) == (3, 1, 2.0, 3.0)
    assert summary([None])["median"] is None
