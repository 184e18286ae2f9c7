"""Goodput (iperf3 TCP) node -> correspondent: the Mobile IP tunnel inside ESP against plain ESP.

Round A: the agent in mode mc on external-1 (the home address, through the
ipip tunnel whose outer packets ride the CHILD SA). Round B: strongSwan's
own client on the same access network (its virtual IP, plain ESP tunnel).
Same testbed, same kernel, one after the other; with ``goodput_rounds`` > 1
the rounds alternate A B A B so drift hits both.

During each iperf3 run tcpdump on the switch side of the node's access link
counts IP fragments (MF set or a fragment offset) and ICMP "fragmentation
needed" messages: the goal is none.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import time

from agent.testbed.nsenter import netns

from .stats import ratio

PORT = 47201
FRAG_FILTER = "(ip[6:2] & 0x3fff != 0) or (icmp and icmp[0] = 3 and icmp[1] = 4)"


class FragCapture:
    def __init__(self, tb) -> None:
        ns, ifname = tb.access_port
        with netns(ns):
            self.p = subprocess.Popen(["tcpdump", "-i", ifname, "-n", "-l", "-p", FRAG_FILTER],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True)
        time.sleep(0.5)   # tcpdump attaches

    def stop(self) -> dict:
        try:
            os.killpg(self.p.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            out, err = self.p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            out, err = self.p.communicate()
        m = re.search(r"(\d+) packets? captured", err or "")
        lines = [line for line in (out or "").splitlines() if line.strip()]
        return {"fragments_or_frag_needed": int(m.group(1)) if m else len(lines), "sample": lines[:5]}


def iperf(tb, src: str, seconds: float) -> dict:
    """One iperf3 TCP run from ``src`` in the node's namespace to the correspondent."""
    cn = tb.addr.cn
    with netns(tb.ns("cn")):
        srv = subprocess.Popen(["iperf3", "-s", "-1", "-B", cn, "-p", str(PORT)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    cap = None
    try:
        time.sleep(1.0)
        cap = FragCapture(tb)
        with netns(tb.ns("mn")):
            p = subprocess.run(["iperf3", "-c", cn, "-B", src, "-p", str(PORT), "-t", str(seconds), "-O", "1",
                                "-J"], capture_output=True, text=True, timeout=seconds + 60)
        frag = cap.stop()
        cap = None
        try:
            j = json.loads(p.stdout)
        except ValueError:
            return {"error": f"iperf3 exit {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}"}
        if "error" in j:
            return {"error": f"iperf3: {j['error']}"}
        end = j["end"]
        out = {"mbit_s": round(end["sum_received"]["bits_per_second"] / 1e6, 2),
               "sent_mbit_s": round(end["sum_sent"]["bits_per_second"] / 1e6, 2),
               "retransmits": end["sum_sent"].get("retransmits"), "seconds": seconds, **frag}
        mss = j.get("start", {}).get("tcp_mss_default") or j.get("start", {}).get("tcp_mss")
        if mss:
            out["mss"] = mss
        return out
    finally:
        if cap is not None:
            cap.stop()
        try:
            srv.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(srv.pid, signal.SIGKILL)
            srv.wait()


def esp_in_use(tb) -> dict:
    """The ESP algorithms and encapsulation of the SAs in the node's namespace (names only, never keys)."""
    p = tb.exec("mn", ["ip", "xfrm", "state"])
    algs, encap = set(), False
    for line in p.stdout.splitlines():
        w = line.split()
        if w and w[0] in ("aead", "enc", "auth", "auth-trunc"):
            algs.add(f"{w[0]} {w[1]}" + (f" {w[3]}" if w[0] in ("aead", "auth-trunc") and len(w) > 3 else ""))
        if w and w[0] == "encap":
            encap = True
    return {"esp": sorted(algs), "esp_in_udp": encap}


CONTROL_PATH = "home address -> correspondent, control: one TCP segment per skb on the tunnel device (gso_max_segs 1)"
WHY_GSO = ("Why the Mobile IP path can beat plain ESP: the home address's TCP socket routes through the agent's ipip "
           "device, whose route carries no IPsec transform, so TCP keeps segmentation offload and hands the stack "
           "64 KB skbs that are cut into MTU-sized packets only after the tunnel; the socket of strongSwan's virtual "
           "IP routes straight into an IPsec policy, and Linux turns segmentation offload off for a socket whose "
           "route has a transform without hardware offload (sk_setup_caps in net/core/sock.c), so every MSS-sized "
           "segment goes through TCP, IP and the transform on its own. Under TCG that per-packet cost dominates. "
           "The control row forces the agent's socket to one segment per skb (gso_max_segs 1 on its tunnel device) "
           "on the same path.")


def _route_dev(tb, src: str) -> str | None:
    """The device the node's route from ``src`` to the correspondent uses."""
    p = tb.exec("mn", ["ip", "-j", "route", "get", tb.addr.cn, "from", src])
    try:
        return json.loads(p.stdout)[0]["dev"]
    except (ValueError, IndexError, KeyError):
        return None


def _gso_max_segs(tb, dev: str, value: int | None = None) -> int | None:
    """Read (value None) or set a device's gso_max_segs in the node's namespace."""
    if value is not None:
        tb.exec("mn", ["ip", "link", "set", "dev", dev, "gso_max_segs", str(value)], check=True)
        return value
    p = tb.exec("mn", ["ip", "-j", "-d", "link", "show", "dev", dev])
    try:
        return int(json.loads(p.stdout)[0]["gso_max_segs"])
    except (ValueError, IndexError, KeyError):
        return None


def control_run(tb, seconds: float) -> dict:
    """iperf3 from the home address with the tunnel device limited to one segment per skb (restored after)."""
    dev = _route_dev(tb, tb.addr.home_address)
    old = _gso_max_segs(tb, dev) if dev else None
    if dev is None or old is None:
        return {"error": f"no tunnel device with gso_max_segs on the home address's route (dev {dev})"}
    try:
        _gso_max_segs(tb, dev, 1)
        r = iperf(tb, tb.addr.home_address, seconds)
    finally:
        _gso_max_segs(tb, dev, old)
    r.update(path=CONTROL_PATH, dev=dev)
    return r


def agent_round(tb, agent, move, opts, log, fresh: bool = False) -> dict:
    """The agent in mode mc on external-1, iperf3 from the home address."""
    if fresh:
        move("internal-1")
    if tb.attached != "external-1":
        rec = move("external-1")
        if not rec.get("ok") or rec.get("mode_to") != "mc":
            why = rec.get("reason") or f"mode {rec.get('mode_to')}"
            log(f"  goodput (agent, MIP in ESP): not measured: the agent did not reach mode mc: {why}")
            return {"who": "agent", "not_measured": f"the agent did not reach mode mc on external-1: {why}"}
    time.sleep(1.0)
    st = agent.status()
    r = iperf(tb, tb.addr.home_address, opts.goodput_seconds)
    r.update(who="agent", path="home address -> correspondent: ipip (TIA -> i-HA) inside ESP",
             mode=st.get("mode"), **esp_in_use(tb))
    log(f"  goodput agent (MIP in ESP): {r.get('mbit_s')} Mbit/s, {r.get('fragments_or_frag_needed')} "
        f"fragments {r.get('error', '')}")
    c = r["control"] = control_run(tb, opts.goodput_seconds)
    log(f"  goodput agent, control (one segment per skb on {c.get('dev')}): {c.get('mbit_s')} Mbit/s "
        f"{c.get('error', '')}")
    return r


def swan_round(tb, swan, opts, log) -> dict:
    """strongSwan's client on external-1, iperf3 from its virtual IP."""
    time.sleep(1.0)
    r = iperf(tb, swan.vip, opts.goodput_seconds)
    r.update(who="strongswan", path="virtual IP -> correspondent: ESP tunnel (strongSwan client)", **esp_in_use(tb))
    log(f"  goodput strongSwan (plain ESP): {r.get('mbit_s')} Mbit/s, {r.get('fragments_or_frag_needed')} "
        f"fragments {r.get('error', '')}")
    return r


def summarize(rounds: list[dict]) -> dict:
    a = [r["mbit_s"] for r in rounds if r.get("who") == "agent" and "mbit_s" in r]
    b = [r["mbit_s"] for r in rounds if r.get("who") == "strongswan" and "mbit_s" in r]
    out = {"rounds": rounds, "agent_mbit_s": round(statistics.median(a), 2) if a else None,
           "strongswan_mbit_s": round(statistics.median(b), 2) if b else None}
    out["ratio"] = ratio(out["agent_mbit_s"], out["strongswan_mbit_s"])
    c = [r["control"]["mbit_s"] for r in rounds if r.get("who") == "agent" and "mbit_s" in r.get("control", {})]
    if c:
        out["control_mbit_s"] = round(statistics.median(c), 2)
        out["control_ratio"] = ratio(out["control_mbit_s"], out["strongswan_mbit_s"])
        out["why"] = WHY_GSO
    out["fragments"] = sum(r.get("fragments_or_frag_needed", 0) for r in rounds if "mbit_s" in r)
    missing = []
    for who, vals, label in (("agent", a, "MIP inside ESP"), ("strongswan", b, "plain strongSwan ESP")):
        why = [r.get("not_measured") or r.get("error") for r in rounds if r.get("who") == who and "mbit_s" not in r]
        if not vals:
            missing.append(f"{label}: {why[0] if why else 'no run'}")
    if missing:
        out["not_measured"] = "; ".join(missing)
    return out
