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
from agent.bench.report import goals, markdown
from agent.bench.stats import percentile, summary
from tests.lib.names import RUN, ns_prefix

def _spread(vals):
    vals = sorted(vals)
    return {"ratios": vals, "median": vals[len(vals) // 2], "min": vals[0], "max": vals[-1]}


def gate_sample(egress=(0.98, 0.99, 0.985), ingress=(0.97, 0.975, 0.99), xdp_ingress=(0.80, 0.81, 0.82)) -> dict:
    """What bench_gate.py --json writes (the fields the report reads)."""
    cfgs = {"none": "no program", "none_aa": "no program, again (A/A control)",
            "empty_xdp": "empty programs, TC egress + XDP ingress", "empty_tc": "empty programs, TC egress + TC ingress",
            "gate_xdp": "gate open, TC egress + XDP ingress (default)", "gate_tc": "gate open, TC egress + TC ingress"}
    # gate_tc is what gate.ingress = "auto" runs on a veth (the judged default); gate_xdp the XDP hook
    paired = {d: {"none_aa": _spread([1.0, 0.99, 1.01]),
                  "empty_xdp": _spread([0.99, 1.0, 1.0] if d == "egress" else [0.81, 0.82, 0.80]),
                  "empty_tc": _spread([1.0, 1.0, 0.99]), "gate_xdp": _spread(list(x)),
                  "gate_tc": _spread(list(r))}
              for d, r, x in (("egress", egress, egress), ("ingress", ingress, xdp_ingress))}
    model = {k: {"hook": h, "packet_ns": 5000, "cpu_packet_ns": 4800, "gate_ns": 60, "empty_ns": 30, "logic_ns": 30,
                 "fraction": 0.012, "predicted_ratio": 0.988, "cpu_fraction": 0.0125, "logic_fraction": 0.006}
             for k, h in (("egress", "TC egress"), ("ingress_xdp", "XDP ingress"), ("ingress_tc", "TC ingress"))}
    return {"version": 2, "payload": 64, "rounds": 3, "seconds": 2.0, "slice": 0.25, "repeat": 1000,
            "cpus": {"client": 0, "server": 1}, "configs": cfgs,
            "median_kpps": {d: {c: 200.0 for c in cfgs} for d in ("egress", "ingress")},
            "median_cpu_ns": {d: {c: 4800.0 for c in cfgs} for d in ("egress", "ingress")},
            "paired": paired, "cpu_paired": paired,
            "gate_vs_empty": {d: {"gate_xdp": _spread([0.99, 0.99, 1.0]), "gate_tc": _spread([0.98, 0.99, 1.0])}
                              for d in ("egress", "ingress")},
            "closed": {"paired": _spread([2.0, 2.1, 2.05]), "dropped": 1000, "sent": 1000},
            "prog_ns": [{"hook": "TC egress", "prog": "gate_egress", "state": "open", "packet": "any",
                         "verdict": "pass", "ns": 60},
                        {"hook": "TC egress", "prog": "gate_egress", "state": "closed", "packet": "udp",
                         "verdict": "drop", "ns": 80}],
            "empty_ns": {"TC": 30, "XDP": 25}, "cost_model": model}


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


def test_gate_json_judged_and_rendered():
    g = parse_gate(gate_sample())
    assert (g["ratio_egress"], g["ratio_ingress_xdp"], g["ratio_ingress_tc"]) == (0.985, 0.81, 0.975)
    assert g["worst_ratio"] == 0.975 and g["default_config"] == "gate_tc"
    res = {"parts": {"gate": g}}
    gate_goal = goals(res)[4]
    assert gate_goal["status"] == "met" and gate_goal["value"] == 0.975, gate_goal
    assert "A/A control" in gate_goal["detail"] and "With XDP ingress instead" in gate_goal["detail"]
    assert "gate.ingress = auto" in gate_goal["detail"]
    # a clear shortfall on the default hook: not met, and the empty program's share is named
    res["parts"]["gate"] = parse_gate(gate_sample(ingress=(0.80, 0.82, 0.85)))
    gate_goal = goals(res)[4]
    assert gate_goal["status"] == "not met" and "an empty program on the same hook" in gate_goal["detail"], gate_goal
    # rounds on both sides of 0.97 with the median near it: cannot decide
    res["parts"]["gate"] = parse_gate(gate_sample(egress=(0.90, 0.975, 1.05)))
    assert goals(res)[4]["status"] == "inconclusive"
    # both sides of 0.97 but the median well clear of it: decided
    res["parts"]["gate"] = parse_gate(gate_sample(egress=(0.96, 1.0, 1.0)))
    assert goals(res)[4]["status"] == "met"
    md = markdown({"parts": {"gate": g}, "goals": goals({"parts": {"gate": g}})})
    sec = md[md.index("## BPF gate cost"):]
    assert "Egress A→B" in sec and "Ingress B→A" in sec and "| TC egress | 30 | 60 | 30 |" in sec
    assert goals({"parts": {}})[4]["status"] == "not measured"
    assert "not_measured" not in g


def test_gate_old_report_still_judged():
    """A report written before the paired design (ratios of medians) renders and is judged as it was."""
    old = {"rows": {"egress": {"none_kpps": 200.0, "open_xdp_kpps": 196.0, "open_tc_kpps": 195.0,
                               "ratio_xdp": 0.98, "ratio_tc": 0.975},
                    "ingress": {"none_kpps": 210.0, "open_xdp_kpps": 205.8, "open_tc_kpps": 199.5,
                                "ratio_xdp": 0.98, "ratio_tc": 0.95}},
           "rounds_kpps": {"eg/none": [200.0, 150.0, 199.0]}, "ratio_egress": 0.98, "ratio_ingress_xdp": 0.98,
           "ratio_ingress_tc": 0.95, "worst_ratio": 0.98, "baseline_spread": 0.251, "rounds": 3, "seconds": 2.0,
           "payload": 64}
    res = {"parts": {"gate": old}}
    assert goals(res)[4]["status"] == "inconclusive"
    md = markdown({**res, "goals": goals(res)})
    assert "ratios of medians, not paired" in md and "| egress | 200.0 |" in md


def test_stats():
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 95) == 10
    assert percentile(list(range(1, 101)), 95) == 95
    s = summary([3.0, None, 1.0, 2.0])
    assert (s["n"], s["missing"], s["median"], s["p95"]) == (3, 1, 2.0, 3.0)
    assert summary([None])["median"] is None
