"""The bench's MOBIKE step breakdown and the host-CPU estimate (pure arithmetic)."""

from agent.bench import breakdown, calib


def test_mobike_steps_relative_to_the_lease():
    moves = [
        {"mobike_only": True, "steps": {"lease": 100.0, "address_configured": 130.0, "vpn_called": 132.0,
                                        "mobike_sent": 160.0, "mobike_answer_rx": 162.0, "mobike_answered": 180.0}},
        {"mobike_only": True, "steps": {"lease": 50.0, "address_configured": 70.0, "vpn_called": 71.0,
                                        "mobike_sent": 101.0, "mobike_answer_rx": 104.0, "mobike_answered": 130.0}},
        {"mobike_only": False, "steps": {"lease": 1.0, "address_configured": 999.0}},      # not MOBIKE-only
        {"mobike_only": True},                                                            # an old report
    ]
    s = breakdown.mobike_steps(moves)
    assert s["n"] == 2
    assert s["address_configured"] == 25.0 and s["mobike_sent"] == 55.5 and s["mobike_answered"] == 80.0


def test_emulation_factor_and_estimate():
    res = {"machines": [{"vm": False, "python_speed": {"per_s": 40000}},
                        {"vm": True, "python_speed": {"per_s": 1600}}]}
    f, host, vm = breakdown.emulation_factor(res)
    assert f == 25.0 and host["per_s"] == 40000 and vm["per_s"] == 1600
    assert breakdown.host_estimate(120.0, 20.0, f) == 24.0          # 20 ms of netem stay, 100 ms / 25
    assert breakdown.host_estimate(10.0, 20.0, f) == 20.0           # never below the added delay
    assert breakdown.host_estimate(None, 0.0, f) is None
    assert breakdown.emulation_factor({"machines": [{"vm": True, "python_speed": {"error": "x"}}]})[0] is None
    assert calib.factor({"per_s": 10}, {"per_s": 0}) is None


def test_merge_into_replaces_parts_and_says_so():
    from agent.bench.cli import merge_into
    earlier = {"parts": {"handover": {"x": 1}, "gate": {"old": True}}, "machines": [{"vm": True, "kernel": "6.1"}],
               "meta": {"command": "mipmobike bench", "started": "t0"}}
    new = {"parts": {"gate": {"new": True}, "ha": {"ignored": True}}, "machines": [{"vm": False, "kernel": "6.18"}],
           "meta": {"command": "mipmobike bench --parts gate", "started": "t1", "duration_s": 100}}
    out = merge_into(earlier, new, ["gate"])
    assert out["parts"] == {"handover": {"x": 1}, "gate": {"new": True}}
    assert [m["kernel"] for m in out["machines"]] == ["6.1", "6.18"]
    assert out["meta"]["command"] == "mipmobike bench"
    assert out["meta"]["merged"] == [{"parts": ["gate"], "command": "mipmobike bench --parts gate", "started": "t1",
                                      "duration_s": 100, "host": None}]
    assert earlier["parts"]["gate"] == {"old": True}          # the earlier report is not changed in place


def test_a_merged_part_keeps_the_emulation_factor_of_its_own_run():
    """Goodput merged in from a later run on another host must not change the estimate of the handover
    figures the first run measured (and a merged-in handover part uses its own run's factor)."""
    from agent.bench.cli import merge_into
    first = {"parts": {"handover": {"x": 1}}, "meta": {},
             "machines": [{"vm": False, "python_speed": {"per_s": 40000}}, {"vm": True, "python_speed": {"per_s": 2000}}]}
    later = {"parts": {"goodput": {"y": 2}}, "meta": {},
             "machines": [{"vm": False, "python_speed": {"per_s": 30000}}, {"vm": True, "python_speed": {"per_s": 1000}}]}
    out = merge_into(first, later, ["goodput"])
    assert [m.get("merged_parts") for m in out["machines"]] == [None, None, ["goodput"], ["goodput"]]
    assert breakdown.emulation_factor(out)[0] == 20.0
    assert breakdown.emulation_factor(out, "goodput")[0] == 30.0
    again = merge_into(out, {"parts": {"handover": {"z": 3}}, "meta": {}, "machines": [
        {"vm": False, "python_speed": {"per_s": 50000}}, {"vm": True, "python_speed": {"per_s": 1000}}]}, ["handover"])
    assert breakdown.emulation_factor(again)[0] == 50.0 and breakdown.emulation_factor(again, "goodput")[0] == 30.0
