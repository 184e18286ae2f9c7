"""The goodput part's summary and report: the control row (one segment per skb) is summarized, rendered
under its round and explained; an older report without it renders as before."""

from __future__ import annotations

from agent.bench.goodput import CONTROL_PATH, summarize
from agent.bench.report import markdown


def _row(who, mbit, control=None):
    r = {"who": who, "mbit_s": mbit, "retransmits": 0, "fragments_or_frag_needed": 0, "mss": 1340,
         "path": f"{who} path", "esp": ["aead rfc4106(gcm(aes)) 128"], "esp_in_udp": False}
    if control is not None:
        r["control"] = {"mbit_s": control, "retransmits": 1, "fragments_or_frag_needed": 0, "path": CONTROL_PATH,
                        "dev": "mip0"}
    return r


def test_control_summarized_and_rendered():
    g = summarize([_row("agent", 40.0, 18.0), _row("strongswan", 20.0), _row("agent", 44.0, 16.0),
                   _row("strongswan", 16.0)])
    assert (g["agent_mbit_s"], g["strongswan_mbit_s"], g["control_mbit_s"]) == (42.0, 18.0, 17.0)
    assert round(g["control_ratio"], 3) == round(17.0 / 18.0, 3) and "sk_setup_caps" in g["why"]
    md = markdown({"parts": {"goodput": g}, "goals": []})
    sec = md[md.index("## Goodput"):md.index("## MOBIKE alone")]
    rows = [line for line in sec.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| agent path", f"| {CONTROL_PATH}", "| strongswan path",
                                                "| agent path", f"| {CONTROL_PATH}", "| strongswan path"]
    assert "Control, the agent's path with one segment per skb: 17.0 Mbit/s" in sec and "sk_setup_caps" in sec


def test_a_failed_control_is_a_row_with_its_reason_and_no_median():
    a = _row("agent", 40.0)
    a["control"] = {"error": "no tunnel device with gso_max_segs on the home address's route (dev None)"}
    g = summarize([a, _row("strongswan", 20.0)])
    assert "control_mbit_s" not in g and "why" not in g
    sec = markdown({"parts": {"goodput": g}, "goals": []})
    assert "no tunnel device with gso_max_segs" in sec and "Control, the agent's path" not in sec


def test_report_without_control_renders_as_before():
    g = summarize([_row("agent", 40.0), _row("strongswan", 20.0)])
    assert "control_mbit_s" not in g
    sec = markdown({"parts": {"goodput": g}, "goals": []})
    assert "Control" not in sec and "ratio 2" in sec
