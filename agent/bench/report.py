"""The bench report: merge host and VM results, judge the goals, write Markdown and JSON."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from . import breakdown
from .stats import ratio

MOBIKE_MOVES = ("external-1 -> external-2", "external-2 -> external-1")


def merge(results: list[dict]) -> dict:
    """One {"parts": ...} from the host's and the VM's results; the i-HA rows of both are joined."""
    parts: dict = {}
    machines = []
    for r in results:
        if r.get("machine"):
            machines.append({**r["machine"], "caps": r.get("caps")})
        for name, part in r.get("parts", {}).items():
            if name == "ha" and name in parts and "rows" in parts[name] and "rows" in (part or {}):
                for row in part["rows"]:
                    row["ran_on"] = part.get("ran_on")
                parts[name]["rows"] += part["rows"]
                parts[name].setdefault("errors", []).extend(part.get("errors", []))
                continue
            if name == "ha" and part and "rows" in part:
                for row in part["rows"]:
                    row["ran_on"] = part.get("ran_on")
            parts[name] = part
    return {"parts": parts, "machines": machines}


def _med(row: dict | None, field: str):
    if not row or field not in row:
        return None
    return row[field].get("median")


def _p95(row: dict | None, field: str):
    if not row or field not in row:
        return None
    return row[field].get("p95")


def _median(vals: list[float]) -> float:
    v = sorted(vals)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _row(summary: list[dict], transition: str) -> dict | None:
    return next((r for r in summary if r["transition"] == transition), None)


def _nm(reason: str) -> dict:
    return {"status": "not measured", "detail": reason}


def goals(res: dict) -> list[dict]:
    parts = res["parts"]
    out = []
    h = parts.get("handover") or {}

    # 1. handover time <= half of strongSwan's on the same untrusted -> untrusted moves
    g = {"goal": "Handover at most half of strongSwan's time (untrusted -> untrusted moves external-1 <-> "
                 "external-2, attach -> first echo of a probe sent after it, median)", "target": "<= 0.50"}
    if "not_measured" in h or not h.get("rtts"):
        g.update(_nm(h.get("not_measured") or "the handover part did not run"))
    elif not h.get("strongswan"):
        g.update(_nm("; ".join(x for x in h.get("unmeasured", []) if "strongSwan" in x)
                     or "strongSwan's client did not run"))
    else:
        per, missing = {}, []
        for rtt, a in h["rtts"].items():
            s = h["strongswan"].get(rtt)
            if not s:
                continue
            for tr in MOBIKE_MOVES:
                am, sm = _med(_row(a["summary"], tr), "first_echo"), _med(_row(s["summary"], tr), "first_echo")
                r = ratio(am, sm)
                if r is None:
                    missing.append(f"+{rtt} ms {tr}: agent {am} / strongSwan {sm}")
                else:
                    per[f"+{rtt} ms {tr}"] = {"agent_ms": am, "strongswan_ms": sm, "ratio": round(r, 2)}
        if per:
            worst = max(v["ratio"] for v in per.values())
            each = "; ".join(f"{k}: {_f(v['agent_ms'])} / {_f(v['strongswan_ms'])} ms = {v['ratio']:.2f}"
                             for k, v in per.items())
            g.update(status="met" if worst <= 0.5 else "not met", value=worst, per=per,
                     detail=f"worst ratio {worst:.2f} ({each})" + (f"; missing: {'; '.join(missing)}" if missing else ""))
        else:
            g.update(_nm("no first echo measured on both sides: " + "; ".join(missing)))
    out.append(g)

    # 2. MOBIKE-only moves within 1 RTT + 20 ms of the address becoming usable: the agent in the testbed
    #    (lease -> its update answered, per added RTT); the VPN client alone (bench_mobike) as a second view
    g = {"goal": "MOBIKE-only moves: the MOBIKE update done within 1 RTT + 20 ms of the new address being usable "
                 "(agent: lease -> update answered, median)", "target": "<= RTT + 20 ms"}
    per, missing = {}, []
    factor, _, _ = breakdown.emulation_factor(res)
    for rtt, a in (h.get("rtts") or {}).items():
        rtt_ms = a.get("rtt_to_gateway_ms")
        moves = [m for m in a["moves"] if m.get("mobike_only") and m.get("lease_to_mobike") is not None]
        if not moves:
            missing.append(f"+{rtt} ms: no MOBIKE-only move completed")
            continue
        vals = sorted(m["lease_to_mobike"] for m in moves)
        bound = (rtt_ms if rtt_ms is not None else float(rtt)) + 20
        exch = sorted(m["mobike_rtt_ms"] for m in moves if m.get("mobike_rtt_ms") is not None)
        med = round(_median(vals), 1)
        est = breakdown.host_estimate(med, float(rtt), factor)
        per[f"+{rtt} ms"] = {"median_ms": med, "max_ms": vals[-1], "n": len(vals),
                             "exchange_median_ms": round(_median(exch), 1) if exch else None,
                             "rtt_ms": rtt_ms, "bound_ms": round(bound, 1), "ok": med <= bound,
                             "steps": breakdown.mobike_steps(moves),
                             "host_cpu_estimate_ms": est,
                             "host_cpu_estimate_ok": None if est is None else est <= float(rtt) + 20}
    details = [f"{k}: {v['median_ms']} ms vs {v['bound_ms']} ms (the exchange itself {v['exchange_median_ms']} ms, "
               f"n={v['n']})" for k, v in per.items()] + missing
    ests = {k: v["host_cpu_estimate_ms"] for k, v in per.items() if v.get("host_cpu_estimate_ms") is not None}
    if ests and factor:
        within = all(per[k]["host_cpu_estimate_ok"] for k in ests)
        details.append(f"estimate on the host's CPU (the VM's emulated part divided by the measured emulation "
                       f"factor {factor}×; not a measurement): "
                       + ", ".join(f"{k} {v} ms" for k, v in ests.items())
                       + (" — within RTT + 20 ms" if within else " — still above RTT + 20 ms"))
    mb = parts.get("mobike") or {}
    if mb.get("ours_median_ms") is not None:
        details.append(f"VPN client alone (bench_mobike, {mb.get('backend')} ESP, veth RTT): address change -> "
                       f"gateway SA updated {mb['ours_median_ms']} ms median vs strongSwan's client "
                       f"{mb.get('strongswan_median_ms')} ms")
    if per:
        g.update(status="met" if all(v["ok"] for v in per.values()) else "not met", per=per,
                 detail="; ".join(details), emulation_factor=factor)
    elif mb.get("ours_median_ms") is not None:
        g.update(status="met" if mb["ours_median_ms"] <= 20 else "not met",
                 detail="judged on the VPN client alone (the agent's moves were not measured): " + "; ".join(details))
    else:
        g.update(_nm("; ".join(details) or h.get("not_measured") or "the handover part did not run"))
    out.append(g)

    # 3. goodput
    gp = parts.get("goodput") or {}
    g = {"goal": "Goodput through the Mobile IP tunnel inside ESP at least 95 % of plain strongSwan ESP "
                 "(iperf3 TCP, median)", "target": ">= 0.95"}
    if gp.get("ratio") is not None:
        g.update(status="met" if gp["ratio"] >= 0.95 else "not met", value=round(gp["ratio"], 3),
                 detail=f"{gp['agent_mbit_s']} / {gp['strongswan_mbit_s']} Mbit/s")
    else:
        g.update(_nm(gp.get("not_measured") or "the goodput part did not run"))
    out.append(g)
    g = {"goal": "No IP fragmentation on the access link during the goodput runs (capture)", "target": "0"}
    measured = [r for r in gp.get("rounds", []) if "mbit_s" in r]
    if measured:
        g.update(status="met" if gp["fragments"] == 0 else "not met", value=gp["fragments"],
                 detail=f"{gp['fragments']} fragments / ICMP frag-needed in {len(measured)} captured runs")
    else:
        g.update(_nm(gp.get("not_measured") or "the goodput part did not run"))
    out.append(g)

    # 4. gate
    gt = parts.get("gate") or {}
    g = {"goal": "BPF gate open costs at most 3 % of packets per second (veth, against no program)",
         "target": ">= 0.97"}
    pr = gt.get("paired")
    if pr and gt.get("worst_ratio") is not None:
        # Each configuration is judged by the median over the rounds of its paired ratios (per round:
        # the median over its cycles of the configuration's pps / the pps of the no-program slice of the
        # same cycle, a fraction of a second apart, same direction). A direction is decided by which side of
        # 0.97 that median falls on, unless the rounds scatter so widely around 0.97 that the side is
        # chance: "inconclusive" when 0.97 lies strictly inside [min, max] of the paired ratios AND the
        # median is nearer 0.97 than a quarter of that range ((max - min) / 4), i.e. the rounds spread
        # on both sides of the target by more than twice the distance the median keeps from it.
        def judge(s: dict) -> str:
            if s["min"] < 0.97 < s["max"] and abs(s["median"] - 0.97) < (s["max"] - s["min"]) / 4:
                return "inconclusive"
            return "met" if s["median"] >= 0.97 else "not met"

        def rng(s: dict) -> str:
            return f"{s['median']:.3f} [{s['min']:.3f}–{s['max']:.3f}]"

        # the agent's default on this veth: gate.ingress = "auto" puts ingress on TC for virtual devices
        # (reports written before that judged TC egress + XDP ingress)
        dflt = gt.get("default_config", "gate_xdp")
        empty = "empty_tc" if dflt == "gate_tc" else "empty_xdp"
        in_hook = "TC" if dflt == "gate_tc" else "XDP"
        verdicts = {d: judge(pr[d][dflt]) for d in ("egress", "ingress")}
        status = ("not met" if "not met" in verdicts.values()
                  else "inconclusive" if "inconclusive" in verdicts.values() else "met")
        n = len(pr["egress"][dflt]["ratios"])
        parts_ = []
        for d, hook in (("egress", "TC"), ("ingress", in_hook)):
            gs, es = pr[d][dflt], pr[d].get(empty)
            ve = (gt.get("gate_vs_empty") or {}).get(d, {}).get(dflt)
            txt = f"{d} ({hook}) {rng(gs)} {verdicts[d]}"
            if es and gs["median"] < 0.97:
                # which part of the shortfall the empty program on the same hook already shows
                txt += (f": of the {(1 - gs['median']) * 100:.1f} % shortfall, an empty program on the same hook "
                        f"already costs {(1 - es['median']) * 100:.1f} % (the hook on veth)")
                if ve:
                    txt += f"; the gate's logic on top: gate / empty {rng(ve)}"
            elif es:
                txt += f" (empty program on the hook {es['median']:.3f})"
            cg = (gt.get("cpu_paired") or {}).get(d, {}).get(dflt)
            cv = (gt.get("cpu_gate_vs_empty") or {}).get(d, {}).get(dflt)
            if cg:
                txt += f"; by the sender's CPU time per packet {cg['median']:.3f}"
                txt += f", gate / empty {cv['median']:.3f}" if cv else ""
            parts_.append(txt)
        detail = (f"median paired ratio [range] over {n} rounds, agent default on a veth (TC egress + "
                  f"{in_hook} ingress{', gate.ingress = auto' if dflt == 'gate_tc' else ''}): "
                  + "; ".join(parts_) + ".")
        other, oe = ("gate_xdp", "empty_xdp") if dflt == "gate_tc" else ("gate_tc", "empty_tc")
        os_, oes = pr["ingress"].get(other), pr["ingress"].get(oe)
        if os_:
            detail += (f" With {'XDP' if other == 'gate_xdp' else 'TC'} ingress instead: ingress {rng(os_)} "
                       f"{judge(os_)}")
            detail += f" (empty program on that hook {oes['median']:.3f})." if oes else "."
        aa = [f"{d} {rng(pr[d]['none_aa'])}" for d in ("egress", "ingress") if pr[d].get("none_aa")]
        if aa:
            detail += " A/A control (no program against itself, the method's scatter): " + ", ".join(aa) + "."
        if n < 3:
            detail += f" Only {n} round(s): the spread says little."
        g.update(status=status, value=gt["worst_ratio"], detail=detail)
    elif gt.get("worst_ratio") is not None:
        # a report from before the paired design: ratios of medians, judged against the baseline's drift
        spread = gt.get("baseline_spread")
        status = "met" if gt["worst_ratio"] >= 0.97 else "not met"
        detail = f"egress (TC) {gt['ratio_egress']:.3f}, ingress (XDP) {gt['ratio_ingress_xdp']:.3f}"
        if spread is not None:
            detail += f"; the no-program baseline moved {spread * 100:.0f} % between rounds"
            if spread > 0.10:
                status = "inconclusive"
                detail += " (more than the 3 % margin: this machine is too noisy to decide)"
        g.update(status=status, value=gt["worst_ratio"], detail=detail)
    else:
        g.update(_nm(gt.get("not_measured") or "the gate part did not run"))
    out.append(g)
    return out


# -- Markdown -----------------------------------------------------------------------------------------
def _f(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:,.1f}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{v}{unit}"


def _mp(row: dict, field: str) -> str:
    s = row.get(field)
    if not s or s.get("median") is None:
        return "-"
    return f"{_f(s['median'])} / {_f(s['p95'])}"


def _machine_line(m: dict | None) -> str:
    if not m:
        return "-"
    s = f"Linux {m['kernel']}, {m['cpu']}, {m['cpus']} CPU"
    if m.get("vm"):
        s += f" — VM under QEMU **TCG** (emulated CPU, {m.get('vm_cpus')} vCPU, {m.get('mem_mb')} MB)"
    else:
        s += f", {m.get('mem_mb')} MB, load {m.get('loadavg')}"
    return s


def markdown(res: dict) -> str:
    meta = res.get("meta", {})
    parts = res["parts"]
    L: list[str] = []
    A = L.append
    A(f"# mipmobike bench — {meta.get('started', '')}")
    A("")
    A(f"`{meta.get('command', 'mipmobike bench')}`{' (quick mode)' if meta.get('quick') else ''}, "
      f"{_f(meta.get('duration_s'))} s.")
    for mg in meta.get("merged") or []:
        A(f"Part(s) {', '.join(mg.get('parts') or [])} from a later run merged in: `{mg.get('command')}`, "
          f"{mg.get('started')}, {_f(mg.get('duration_s'))} s"
          + (f", host: {_machine_line(mg['host'])}." if mg.get("host") else "."))
    A("")
    A(f"- host: {_machine_line(meta.get('host'))}")
    if meta.get("vm"):
        A(f"- VM: {_machine_line(meta.get('vm'))}")
    factor, hps, vps = breakdown.emulation_factor(res)
    if factor:
        A(f"- emulation factor: {factor}× — the same Python workload ({hps.get('workload')}) ran "
          f"{hps['per_s']:,}/s on the host and {vps['per_s']:,}/s in the VM (best of {len(vps.get('runs', []))}); "
          "figures marked *estimate* divide the VM's emulated time by it")
    A("")
    A("Ratios measured side by side in one run are the headline; absolute figures depend on the machine "
      "(a loaded 2-core host; under TCG every instruction is emulated, so absolute times there are many "
      "times what real hardware shows).")
    A("")
    A("## Goals")
    A("")
    A("| goal | target | result | status |")
    A("|---|---|---|---|")
    for g in res.get("goals", []):
        A(f"| {g['goal']} | {g['target']} | {g.get('detail', '')} | **{g['status']}** |")
    A("")

    h = parts.get("handover")
    A("## Handover")
    A("")
    if not h or "not_measured" in h:
        A(f"Not measured: {(h or {}).get('not_measured', 'the part did not run')}.")
    else:
        det = h.get("detection") or {}
        A(f"Ran on: {h.get('ran_on')}. Gateway ESP: {h.get('gateway_esp')}. Cycle from {h['cycle'][0]}: "
          f"{' → '.join(h['cycle'][1:])}; {h['rounds']} round(s) per added RTT. Agent detection: first "
          f"registration timeout {det.get('initial_timeout')} s, {det.get('retransmissions')} retransmissions, "
          f"at most {det.get('max_timeout')} s (an untrusted verdict waits for all of them). Times in ms after "
          "the move's attach (link down, then up on the new net), **median / p95** over the moves that "
          "completed. *lease*: DHCP address; *verdict*: trust decision; *ready*: data path installed and gate "
          "open; *first echo*: the first UDP probe sent after the attach that came back from the correspondent "
          f"(home address ↔ CN, {h.get('probe_rate_hz')} probes/s; both directions work); *TCP*: the "
          "correspondent receives data of the running TCP stream again; *outage*: between the last echoed probe "
          "before the move and the first after; *MOBIKE*: our UPDATE_SA_ADDRESSES answered; *gw SA*: the "
          "gateway's XFRM state points at the new address. In a MOBIKE-only move the data path is ready "
          "once the VPN update completes; the verdict (no reply from the i-HA) may come later. Under TCG the "
          "agent's own processing (Python, netlink, an emulated CPU) is most of every figure.")
        A("")
        for rtt, a in h["rtts"].items():
            A(f"### Agent, added RTT {rtt} ms (measured RTT to the gateway {_f(a.get('rtt_to_gateway_ms'))} ms)")
            A("")
            A("| transition | modes | ok/n | lease | verdict | ready | first echo | TCP | outage | MOBIKE | gw SA |")
            A("|---|---|---|---|---|---|---|---|---|---|---|")
            for r in a["summary"]:
                A(f"| {r['transition']} | {', '.join(r['modes'])}{' (MOBIKE only)' if r.get('mobike_only') else ''} "
                  f"| {r['ok']}/{r['moves']} | {_mp(r, 'lease')} | {_mp(r, 'verdict_ms')} | {_mp(r, 'ready')} "
                  f"| {_mp(r, 'first_echo')} | {_mp(r, 'tcp_recovered')} | {_mp(r, 'outage')} | {_mp(r, 'mobike_done')} "
                  f"| {_mp(r, 'gw_sa')} |")
            fails = [f"{r['transition']}: {'; '.join(r['failures'])}" for r in a["summary"] if r.get("failures")]
            if fails:
                A("")
                A("Failures: " + " — ".join(fails))
            A("")
            st = breakdown.mobike_steps(a["moves"])
            if st.get("n"):
                A(f"Where a MOBIKE-only move's time goes (the agent's own step marks, ms after the lease, "
                  f"median of {st['n']}): " + " → ".join(f"{label} {_f(st.get(key))}"
                                                         for key, label in breakdown.STEPS) + ".")
                A("")
        if h.get("strongswan"):
            for rtt, s in h["strongswan"].items():
                A(f"### strongSwan's client, added RTT {rtt} ms")
                A("")
                A(f"Same testbed, {h.get('gateway_esp')} ESP; a system DHCP client (busybox udhcpc) started at link-up; the "
                  "flow runs from the client's virtual IP. *address*: lease configured; *gw SA*: the "
                  "gateway's SA moved (MOBIKE); *addr → gw SA*: from the address to that.")
                A("")
                A("| transition | ok/n | address | gw SA | addr → gw SA | first echo | TCP | outage |")
                A("|---|---|---|---|---|---|---|---|")
                for r in s["summary"]:
                    A(f"| {r['transition']} | {r['ok']}/{r['moves']} | {_mp(r, 'lease')} | {_mp(r, 'gw_sa')} "
                      f"| {_mp(r, 'lease_to_gw_sa')} | {_mp(r, 'first_echo')} | {_mp(r, 'tcp_recovered')} "
                      f"| {_mp(r, 'outage')} |")
                A("")
        for x in h.get("unmeasured", []):
            A(f"- not measured: {x}")
        A("")

    ar = parts.get("agent_resources")
    A("## Agent CPU and memory")
    A("")
    if not ar or "not_measured" in ar:
        A(f"Not measured: {(ar or {}).get('not_measured', 'the part did not run')}.")
    else:
        A("The mobile node agent's process (/proc/PID/stat utime+stime, status VmRSS/VmHWM); CPU in percent "
          "of one CPU; during the moves it includes answering the bench's status requests (about one per move, "
          f"asked once the agent's log says the handover ended). Ran on: {ar.get('ran_on')}.")
        A("")
        A("| phase | seconds | CPU % | CPU ms per handover | RSS MB | peak RSS MB |")
        A("|---|---|---|---|---|---|")
        i = ar.get("idle") or {}
        A(f"| idle (mode c) | {_f(i.get('seconds'))} | {_f(i.get('cpu_pct'))} | - | {_f(i.get('rss_mb'))} "
          f"| {_f(i.get('peak_rss_mb'))} |")
        for rtt, d in (ar.get("during") or {}).items():
            if d:
                A(f"| handovers, +{rtt} ms ({d.get('moves')} moves) | {_f(d.get('seconds'))} | {_f(d.get('cpu_pct'))} "
                  f"| {_f(d.get('cpu_ms_per_handover'))} | {_f(d.get('rss_mb'))} | {_f(d.get('peak_rss_mb'))} |")
        ip = ar.get("idle_polled")
        if ip:
            A(f"| idle, status asked every {_f(ip.get('poll_s'))} s (what a status request costs) "
              f"| {_f(ip.get('seconds'))} "
              f"| {_f(ip.get('cpu_pct'))} | - | {_f(ip.get('rss_mb'))} | {_f(ip.get('peak_rss_mb'))} |")
        ih = ar.get("i_ha_idle")
        if ih:
            A(f"| i-HA idle (for comparison) | {_f(ih.get('seconds'))} | {_f(ih.get('cpu_pct'))} | - "
              f"| {_f(ih.get('rss_mb'))} | {_f(ih.get('peak_rss_mb'))} |")
    A("")

    gp = parts.get("goodput")
    A("## Goodput")
    A("")
    if not gp or (gp.get("not_measured") and not gp.get("rounds")):
        A(f"Not measured: {(gp or {}).get('not_measured', 'the part did not run')}.")
    else:
        A(f"iperf3 TCP to the correspondent from external-1, one run per row, alternating. Ran on: {gp.get('ran_on')}. "
          "Fragments: IP fragments or ICMP fragmentation-needed seen by tcpdump on the access link during the run.")
        A("")
        A("| path | Mbit/s | retransmits | fragments | ESP | note |")
        A("|---|---|---|---|---|---|")
        for r in gp.get("rounds", []):
            esp = ", ".join(r.get("esp", [])) + (" in UDP" if r.get("esp_in_udp") else "")   # the control's too
            for row in (r, r.get("control")):
                if row is None:
                    continue
                note = row.get("not_measured") or row.get("error") or (f"MSS {row['mss']}" if row.get("mss") else "")
                A(f"| {row.get('path', r.get('who'))} | {_f(row.get('mbit_s'))} | {_f(row.get('retransmits'))} "
                  f"| {_f(row.get('fragments_or_frag_needed'))} | {esp or '-'} | {note} |")
        A("")
        A(f"Median agent / strongSwan: {_f(gp.get('agent_mbit_s'))} / {_f(gp.get('strongswan_mbit_s'))} Mbit/s, "
          f"ratio {_f(round(gp['ratio'], 3) if gp.get('ratio') is not None else None)}.")
        if gp.get("control_mbit_s") is not None:
            A(f"Control, the agent's path with one segment per skb: {_f(gp['control_mbit_s'])} Mbit/s, "
              f"{_f(round(gp['control_ratio'], 3) if gp.get('control_ratio') is not None else None)} of strongSwan's.")
            if gp.get("why"):
                A("")
                A(gp["why"])
        if gp.get("not_measured"):
            A(f"Not measured: {gp['not_measured']}.")
    A("")

    mb = parts.get("mobike")
    A("## MOBIKE alone: our VPN client next to strongSwan's")
    A("")
    if not mb or mb.get("ours_median_ms") is None:
        A(f"Not measured: {(mb or {}).get('not_measured', 'the part did not run')}.")
    else:
        A(f"`scripts/bench_mobike.py` ({mb.get('backend')} ESP, {mb.get('moves')} moves per client between a direct "
          "and a routed path, no DHCP, no detection): from the address change to the gateway's log saying it "
          f"updated the SA ({mb.get('resolution_ms')} ms resolution). Ran on: {mb.get('ran_on')}.")
        A("")
        A("| client | median ms | moves (ms) |")
        A("|---|---|---|")
        A(f"| mipmobike (agent.mn.vpn, told at once) | {mb['ours_median_ms']} | {', '.join(map(str, mb.get('ours_ms', [])))} |")
        A(f"| strongSwan's client (kernel address events) | {mb['strongswan_median_ms']} "
          f"| {', '.join(map(str, mb.get('strongswan_ms', [])))} |")
        A("")
        A(f"strongSwan / mipmobike: {'≥ ' if mb.get('ratio_is_lower_bound') else ''}"
          f"{mb.get('ratio_strongswan_over_ours')}×.")
    A("")

    gt = parts.get("gate")
    A("## BPF gate cost")
    A("")
    if not gt or gt.get("worst_ratio") is None:
        A(f"Not measured: {(gt or {}).get('not_measured', 'the part did not run')}.")
    elif gt.get("paired"):
        cpus = gt.get("cpus")
        pin = f"pinned: client CPU {cpus['client']}, server CPU {cpus['server']}" if cpus else "not pinned"

        def cell(x: dict | None) -> str:
            return f"{x['median']:.3f} [{x['min']:.3f}–{x['max']:.3f}]" if x else "-"

        A(f"`scripts/bench_gate.py` ({gt.get('rounds')} rounds, UDP {gt.get('payload')}-byte payload, iperf3 -b 0 "
          f"{pin}; one iperf3 test per direction, the configurations taking turns under it in "
          f"{gt.get('slice')} s slices, a random order per cycle, each counted {gt.get('seconds')} s per round). *pps ratio*: a configuration's "
          f"slice / the no-program slice of the same cycle, median per round; shown: median [min–max] over the "
          f"rounds. *CPU ratio*: the same with the sender's CPU time per packet (independent of the CPU share the "
          f"sender got). *gate / empty*: the gate against the empty programs on the same hooks (its logic alone). "
          f"Ran on: {gt.get('ran_on')}.")
        for d, title in (("egress", "Egress A→B (A's TC egress hook)"), ("ingress", "Ingress B→A (A's XDP or TC ingress hook)")):
            A("")
            A(f"{title}:")
            A("")
            A("| configuration | median kpps | pps ratio to none | sender CPU ns/packet | CPU ratio none / X "
              "| gate / empty (pps) |")
            A("|---|---|---|---|---|---|")
            for c, label in gt["configs"].items():
                kp = (gt.get("median_kpps") or {}).get(d, {}).get(c)
                cn = (gt.get("median_cpu_ns") or {}).get(d, {}).get(c)
                ps = gt["paired"][d].get(c)
                cp = (gt.get("cpu_paired") or {}).get(d, {}).get(c)
                ve = (gt.get("gate_vs_empty") or {}).get(d, {}).get(c)
                one = c == "none"
                A(f"| {label} | {_f(kp)} | {'1' if one else cell(ps)} | {_f(cn)} | {'1' if one else cell(cp)} "
                  f"| {cell(ve)} |")
        cm = gt.get("cost_model") or {}
        if cm:
            A("")
            A(f"Program cost per packet (BPF_PROG_TEST_RUN, median of 3 × {gt.get('repeat')} runs, open gate) and the "
              "cost model: gate ns / ns per packet with no program (the sending CPU does the whole path through the veth) "
              "→ predicted ratio 1 / (1 + fraction).")
            A("")
            A("| hook | empty program ns | gate ns | gate logic ns | ns per packet (none, 1e9 / pps) | gate fraction "
              "| predicted ratio | sender CPU ns per packet (none) |")
            A("|---|---|---|---|---|---|---|---|")
            for m in cm.values():
                A(f"| {m['hook']} | {m['empty_ns']} | {m['gate_ns']} | {m['logic_ns']} | {m['packet_ns']} "
                  f"| {m['fraction'] * 100:.2f} % | {m['predicted_ratio']:.3f} | {_f(m.get('cpu_packet_ns'))} |")
        closed = [r for r in gt.get("prog_ns", []) if r.get("state") == "closed"]
        if closed:
            A("")
            A("Closed gate paths: " + "; ".join(f"{x['hook']} {x['packet']} → {x['verdict']} {x['ns']} ns" for x in closed) + ".")
        cl = gt.get("closed")
        if cl:
            A("")
            A(f"Closed gate, one Python sender: closed/none paired {cl['paired']['median']:.3f} "
              f"[{cl['paired']['min']:.3f}–{cl['paired']['max']:.3f}] (dropping at TC egress spares the rest of the "
              f"path); dropped and counted {cl.get('dropped')} of {cl.get('sent')}.")
        A("")
        A("Per-round kpps of every configuration: the JSON report.")
    else:
        # a report from before the paired design
        A(f"`scripts/bench_gate.py` ({gt.get('rounds')} rounds × {gt.get('seconds')} s, UDP {gt.get('payload')}-byte "
          f"payload, configurations alternating within the run; ratios of medians, not paired). Ran on: {gt.get('ran_on')}.")
        A("")
        A("| direction | no program kpps | gate open (XDP ingress) kpps | gate open (TC ingress) kpps | ratio XDP / TC |")
        A("|---|---|---|---|---|")
        for d, r in gt["rows"].items():
            A(f"| {d} | {r['none_kpps']} | {r['open_xdp_kpps']} | {r['open_tc_kpps']} | {r['ratio_xdp']} / {r['ratio_tc']} |")
        if gt.get("prog_ns"):
            A("")
            A("Per-packet program cost (BPF_PROG_TEST_RUN): " + "; ".join(
                f"{x['hook']} {x['state']} {x['packet']} → {x['verdict']} {x['ns']} ns" for x in gt["prog_ns"]))
        if gt.get("rounds_kpps"):
            A("")
            A("Per round (kpps): " + "; ".join(f"{k} {' '.join(f'{v:g}' for v in vs)}"
                                               for k, vs in gt["rounds_kpps"].items()))
        if gt.get("closed_sender_ratio") is not None:
            A("")
            A(f"Closed gate, one Python sender: closed/none = {gt['closed_sender_ratio']}; dropped and counted "
              f"{gt.get('closed_dropped')} of {gt.get('closed_sent')}.")
    A("")

    ha = parts.get("ha")
    A("## i-HA registrations and memory per binding")
    A("")
    if not ha or not ha.get("rows"):
        A(f"Not measured: {(ha or {}).get('not_measured', 'the part did not run')}.")
    else:
        A("`scripts/bench_ha.py` `run_one` (HMAC-MD5 signed requests, a fresh process per row). *python*: "
          "resident-set growth per binding; *map*: BPF maps; *kernel*: slab growth (system-wide, noisy). "
          f"ipip: at most {ha.get('ipip_max_tunnels')} tunnels, more bindings share them.")
        A("")
        A("| backend | bindings | ran on | new reg/s | renew reg/s | python B/binding | map B/binding | kernel B/binding |")
        A("|---|---|---|---|---|---|---|---|")
        for r in ha["rows"]:
            A(f"| {r['backend']} | {r['n']:,} | {r.get('ran_on', '-')} | {r['new']:,.0f} | {r['renew']:,.0f} "
              f"| {_f(r.get('py_bytes'))} | {_f(r.get('map_bytes'))} | {_f(r.get('kernel_bytes'))} |")
        for e in ha.get("errors", []):
            A(f"- failed: {e}")
    A("")
    A("## Where it ran")
    A("")
    for m in res.get("machines", []):
        caps = m.get("caps") or {}
        A(f"- {m.get('where')}: {_machine_line(m)}; ESP {caps.get('esp')}, ipip {caps.get('ipip')}, "
          f"netem {caps.get('netem')}"
          + (f" (the later run of part(s) {', '.join(m['merged_parts'])})" if m.get("merged_parts") else ""))
    A("")
    A("Raw numbers (every move, every run): the JSON report next to this file.")
    return "\n".join(L) + "\n"


def summary_text(res: dict) -> str:
    lines = ["goals:"]
    for g in res.get("goals", []):
        lines.append(f"  [{g['status']:>12}] {g['goal']}: {g.get('detail', '')}")
    h = res["parts"].get("handover")
    if h and h.get("rtts"):
        lines.append("handover (ms after link-up, median/p95):")
        for rtt, a in h["rtts"].items():
            for r in a["summary"]:
                lines.append(f"  +{rtt:>2} ms agent  {r['transition']:<26} {','.join(r['modes']):<10} "
                             f"{r['ok']}/{r['moves']}  ready {_mp(r, 'ready'):<16} first echo {_mp(r, 'first_echo')}")
            for r in (h.get("strongswan", {}).get(rtt) or {}).get("summary", []):
                lines.append(f"  +{rtt:>2} ms swan   {r['transition']:<26} {'vpn':<10} "
                             f"{r['ok']}/{r['moves']}  gw SA {_mp(r, 'gw_sa'):<16} first echo {_mp(r, 'first_echo')}")
    return "\n".join(lines)


def write(res: dict, out_dir: str, publish: str | None, stamp: bool = True) -> list[Path]:
    """bench-<stamp>.md/.json (unless ``stamp`` is False) and bench-latest.md/.json in ``out_dir``;
    latest.md/.json in ``publish`` if given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = markdown(res), json.dumps(res, indent=1, default=str) + "\n"
    paths = []
    files = [("bench-latest.md", md), ("bench-latest.json", js)]
    if stamp:
        st = time.strftime("%Y%m%d-%H%M%S")
        files = [(f"bench-{st}.md", md), (f"bench-{st}.json", js)] + files
    for name, text in files:
        p = out / name
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
        paths.append(p)
    if publish:
        pub = Path(publish)
        pub.mkdir(parents=True, exist_ok=True)
        (pub / "latest.md").write_text(md)
        (pub / "latest.json").write_text(js)
        paths += [pub / "latest.md", pub / "latest.json"]
    return paths
