"""Handover timing on the Figure-1 testbed: the agent, then strongSwan's own client, same run.

One testbed serves every kernel-path part (``run_session``):

1. the mobile node agent (the testbed's mn.toml with the detection timeouts
   given, product defaults unless changed) is moved round the cycle
   internal-1 -> internal-2 (f) -> external-1 (mc) -> external-2 (mc behind
   the NAT, MOBIKE only) -> external-1 (mc, MOBIKE only) -> internal-1 (c),
   ``rounds`` times per added RTT (link down, attach; the agent started
   and asked through the demo's ``Roamer``). For each move the agent's own
   timeline gives trigger, lease, verdict and data path ready; the demo's
   ``Flow`` (UDP echo and a TCP stream, home address <-> correspondent) gives
   the first echo of a probe sent after the attach and the first TCP data
   the correspondent got after it; the gateway's XFRM events give the moment
   the gateway's SA points at the new address; ``ike.last_mobike`` the
   moment our MOBIKE update was answered. All in ms after the attach.
2. goodput with the agent in mode mc (``agent.bench.goodput``);
3. strongSwan as the node's VPN client (``tb.vpn_client()``, PSK) makes the
   untrusted -> untrusted moves external-1 <-> external-2 with a system DHCP
   client (busybox udhcpc started at the attach); the flow runs from its
   virtual IP;
4. goodput through that plain ESP tunnel.

Added RTT: netem on both ends of the access link, half the RTT each way
(``tb.impair(delay_ms=rtt/2)``).
"""

from __future__ import annotations

import bisect
import ipaddress
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

from agent.demo.flow import Flow, FlowError
from agent.demo.roam import FINISHED, Roamer
from agent.testbed import Testbed, TestbedError
from agent.testbed.nsenter import netns

from . import goodput as gp
from . import procstat
from .stats import summary

CYCLE = ("internal-2", "external-1", "external-2", "external-1", "internal-1")
START = "internal-1"
SWAN_CYCLE = ("external-2", "external-1")
HANDOVER_TIMEOUT = 90.0       # one move, under TCG with IKE and netem
DELIVERY_TIMEOUT = 20.0       # first packet after the data path is ready


def log_to(out):
    def log(msg: str) -> None:
        print(msg, file=out, flush=True)
    return log


# -- the gateway's view: XFRM events in its namespace --------------------------------------------
class XfrmWatch:
    """``ip xfrm monitor`` in a namespace, each line stamped with the wall clock when read."""

    LINE = re.compile(r"src (\S+) dst (\S+)")

    def __init__(self, ns: str) -> None:
        with netns(ns):
            self.p = subprocess.Popen(["ip", "xfrm", "monitor"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True, bufsize=1, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._read, daemon=True, name="xfrm-watch")
        self._t.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            with self._lock:
                self.lines.append((time.time(), line.rstrip()))

    def first(self, after: float, gw: str, match) -> float | None:
        """Wall time of the first event after ``after`` naming an SA or template between ``gw`` and an
        address ``match(addr)`` accepts (deletions excluded)."""
        with self._lock:
            lines = [x for x in self.lines if x[0] >= after]
        for t, line in lines:
            if line.lstrip().startswith("Deleted"):
                continue
            for m in self.LINE.finditer(line):
                a, b = m.group(1), m.group(2)
                if (a == gw and match(b)) or (b == gw and match(a)):
                    return t
        return None

    def wait(self, after: float, gw: str, match, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.first(after, gw, match)
            if t is not None:
                return t
            time.sleep(0.05)
        return self.first(after, gw, match)

    def close(self) -> None:
        try:
            os.killpg(self.p.pid, 15)
        except ProcessLookupError:
            pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, 9)
            self.p.wait()


def _matcher(tb: Testbed, net: str, addr: str | None = None):
    """Which outer address the gateway should see for the node on ``net`` (the NAT's, if any)."""
    n = tb.nets[net]
    if n.nat:
        return lambda a: a == n.nat
    if addr:
        return lambda a: a == addr
    prefix = ipaddress.IPv4Network(n.prefix)
    return lambda a: _in(a, prefix)


def _in(a: str, prefix) -> bool:
    try:
        return ipaddress.IPv4Address(a) in prefix
    except ValueError:
        return False


def _ms(t: float | None, t0: float) -> float | None:
    return None if t is None else round((t - t0) * 1000, 1)


def ping_rtt(tb: Testbed, dst: str, count: int = 5) -> float | None:
    """Average RTT (ms) from the node to ``dst``."""
    p = tb.exec("mn", ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2", dst], timeout=60)
    m = re.search(r"= [\d.]+/([\d.]+)/", p.stdout)
    return float(m.group(1)) if m else None


# -- traffic: the demo's Flow (UDP echo + TCP stream), read per move ------------------------------
def first_echo(flow: Flow, after: float) -> float | None:
    """Wall time the first probe sent at or after ``after`` came back (both directions work)."""
    with flow.lock:
        lo = bisect.bisect_left(flow.sent, after)
        n = len(flow.sent)
        got = [flow.answered[s] for s in range(lo, n) if s in flow.answered]
    return min(got) if got else None


def recovery(flow: Flow, t_attach: float, t_detach: float, timeout: float) -> dict:
    """After a move: first echo, first TCP data at the correspondent, outage and lost probes (ms)."""
    deadline = time.monotonic() + timeout
    echo = tcp = None
    while time.monotonic() < deadline:
        echo = first_echo(flow, t_attach)
        r = flow.recovered(t_attach)
        tcp = r[1] if r else None
        if echo is not None and (tcp is not None or flow.tcp_error is not None):
            break
        time.sleep(0.05)
    out = {"first_echo": _ms(echo, t_attach), "tcp_recovered": _ms(tcp, t_attach)}
    if echo is None:
        out["delivery_failed"] = f"no echo within {timeout:.0f} s"
    w = flow.window(t_detach, max(x for x in (echo, tcp, time.time()) if x is not None) if echo else time.time())
    out["outage"] = None if w.outage is None else round(w.outage * 1000, 1)
    out["lost"] = w.lost
    if flow.tcp_error:
        out["tcp_error"] = flow.tcp_error
    return out


def start_flow(tb: Testbed, src: str, opts) -> Flow:
    f = Flow(tb.ns("mn"), tb.ns("cn"), src, tb.addr.cn, rate=1.0 / opts.probe_interval)
    f.start_server()
    try:
        f.start_client()
    except FlowError:
        f.stop()
        raise
    return f


# -- the agent -------------------------------------------------------------------------------------
def polled_idle(roamer: Roamer, pid: int, seconds: float, poll: float) -> dict | None:
    """The agent's CPU while nothing happens but the bench asking its status every ``poll`` s
    (what the polling adds to the figures taken during the moves)."""
    a = procstat.sample(pid)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(poll)
        try:
            roamer.status()
        except Exception:
            pass
    use = procstat.usage(a, procstat.sample(pid))
    if use:
        use["poll_s"] = poll
    return use


def start_agent(roamer: Roamer, opts, signalling_only: bool) -> None:
    init, retr, mx = opts.detection
    mn = {"datapath": "none"} if signalling_only else None   # no ipip here: decide and signal only
    roamer.start_agent(wait=120, initial_timeout=init, retransmissions=retr, max_timeout=mx, mn=mn)


def attach(tb: Testbed, target: str) -> tuple[str | None, float, float]:
    """The move both clients get: link down (off every bridge), then up on ``target``.
    Returns (previous net, wall time of the detach, wall time of the attach)."""
    src = tb.attached
    tb.move("none", record=False)
    t_detach = time.time()
    t_attach = time.time()
    tb.move(target, record=False)
    return src, t_detach, t_attach


def _log_size(roamer: Roamer) -> int:
    return roamer.log_size()


def wait_handover(roamer: Roamer, after: float, timeout: float, poll: float, log_from: int = 0) -> dict | None:
    """The agent's first handover started at or after ``after``, once finished (asked when the
    agent's log says a handover ended, else every ``poll`` s; see Roamer.wait_handover)."""
    return roamer.wait_handover(after, timeout, poll=poll, log_from=log_from)


def agent_move(tb: Testbed, roamer: Roamer, flow: Flow | None, xw: XfrmWatch | None, target: str,
               prev: dict, poll: float = 5.0) -> dict:
    """Move the node to ``target`` and time the agent's handover (ms after the attach)."""
    log_from = _log_size(roamer)
    src, t_detach, t_link = attach(tb, target)
    h = wait_handover(roamer, t_link, HANDOVER_TIMEOUT, poll, log_from)
    rec: dict = {"from": src, "to": target, "mode_from": prev.get("mode"), "t_link": round(t_link, 3)}
    if h is None or (h.get("t_ready") is None and h.get("verdict") not in FINISHED):
        rec.update(ok=False, reason=f"no finished handover within {HANDOVER_TIMEOUT:.0f} s",
                   agent_last=h)
        return rec
    rec.update({
        "verdict": h.get("verdict"), "mode_to": h.get("mode"), "reason": h.get("reason"),
        "mobike_only": h.get("mobike_only"), "coa": h.get("coa"), "tia": h.get("tia"),
        "trigger": _ms(h.get("t_trigger"), t_link),
        "lease": _ms(h.get("t_lease"), t_link), "verdict_ms": _ms(h.get("t_verdict"), t_link),
        "ready": _ms(h.get("t_ready"), t_link),
        "steps": h.get("steps") or {},          # the agent's own step marks, ms after its trigger
    })
    rec["ok"] = h.get("mode") is not None and h.get("verdict") not in FINISHED
    try:
        st = roamer.status()
    except Exception:
        st = {}
    ike = st.get("ike") or {}
    lm = ike.get("last_mobike")
    if lm and lm >= t_link:
        rec["mobike_done"] = _ms(lm, t_link)
        rec["mobike_rtt_ms"] = ike.get("last_mobike_ms")
        if h.get("t_lease"):
            rec["lease_to_mobike"] = _ms(lm, h["t_lease"])
    if xw is not None and tb.nets[target].zone == "external" and rec["ok"]:
        t_gw = xw.wait(t_link, tb.addr.gw_public, _matcher(tb, target, h.get("coa")), 10)
        rec["gw_sa"] = _ms(t_gw, t_link)
        if t_gw and h.get("t_lease"):
            rec["lease_to_gw_sa"] = _ms(t_gw, h["t_lease"])
    if flow is not None and rec["ok"]:
        rec.update(recovery(flow, t_link, t_detach, DELIVERY_TIMEOUT))
    return rec


def transition_key(rec: dict) -> str:
    return f"{rec['from']} -> {rec['to']}"


FIELDS = ("trigger", "lease", "verdict_ms", "ready", "first_echo", "tcp_recovered", "outage", "mobike_done",
          "lease_to_mobike", "gw_sa", "lease_to_gw_sa")


def summarize(moves: list[dict], fields=FIELDS) -> list[dict]:
    """Per transition: modes seen, n, failures, median/p95 of each timing field."""
    order: list[str] = []
    groups: dict[str, list[dict]] = {}
    for m in moves:
        k = transition_key(m)
        if k not in groups:
            order.append(k)
            groups[k] = []
        groups[k].append(m)
    out = []
    for k in order:
        g = groups[k]
        ok = [m for m in g if m.get("ok")]
        modes = sorted({f"{m.get('mode_from') or '-'}->{m.get('mode_to') or '-'}" for m in g})
        row = {"transition": k, "modes": modes, "moves": len(g), "ok": len(ok),
               "mobike_only": sum(1 for m in g if m.get("mobike_only")),
               "failures": sorted({m.get("reason") or m.get("delivery_failed") or "?" for m in g
                                   if not m.get("ok") or m.get("delivery_failed")})}
        for f in fields:
            vals = [m.get(f) for m in ok]
            if any(v is not None for v in vals):
                row[f] = summary(vals)
        out.append(row)
    return out


# -- strongSwan's client ---------------------------------------------------------------------------
UDHCPC_SCRIPT = """#!/bin/sh
# udhcpc hook for the bench: the new lease, the default route, old addresses removed (not KEEP)
case "$1" in
  bound|renew)
    ip addr add "$ip/$mask" dev "$interface" 2>/dev/null
    set -- $router
    ip route replace default via "$1" dev "$interface"
    echo "$(date +%s.%N) $ip/$mask" >> "$LEASE_LOG"
    for a in $(ip -4 -o addr show dev "$interface" scope global | awk '{print $4}'); do
      case "$a" in
        "$ip/"*) ;;
        "$KEEP/"*) ;;
        *) ip addr del "$a" dev "$interface" ;;
      esac
    done
    ;;
esac
exit 0
"""


class SwanRun:
    """strongSwan's charon as the node's VPN client, a system DHCP client, the same moves."""

    def __init__(self, tb: Testbed, log) -> None:
        self.tb, self.log = tb, log
        self.client = None
        self.vip: str | None = None
        self.dir = tb.dir / "bench"
        self.dir.mkdir(exist_ok=True)
        self.script = self.dir / "udhcpc.sh"
        self.script.write_text(UDHCPC_SCRIPT)
        self.script.chmod(0o700)
        self.lease_log = self.dir / "udhcpc.log"

    def dhcp(self, timeout: float = 30) -> tuple[float | None, str | None]:
        """Run udhcpc once on the node's interface: (wall time the address was set, "ADDR/LEN")."""
        n0 = len(self._leases())
        env = dict(os.environ, KEEP=self.vip or "none", LEASE_LOG=str(self.lease_log))
        with netns(self.tb.ns("mn")):
            p = subprocess.run(["busybox", "udhcpc", "-i", self.tb.mn_if, "-f", "-q", "-n", "-t", "10", "-T", "1",
                                "-A", "1", "-s", str(self.script)], capture_output=True, text=True, env=env,
                               timeout=timeout)
        leases = self._leases()
        if p.returncode or len(leases) <= n0:
            return None, None
        t, addr = leases[-1]
        return t, addr

    def _leases(self) -> list[tuple[float, str]]:
        try:
            return [(float(a), b) for a, b in (line.split() for line in self.lease_log.read_text().splitlines()
                                              if line.strip())]
        except FileNotFoundError:
            return []

    def start(self, at: str = "external-1") -> None:
        tb = self.tb
        tb.move(at, record=False)
        t, addr = self.dhcp()
        if addr is None:
            raise TestbedError(f"udhcpc got no lease on {at}")
        self.client = tb.vpn_client()
        self.client.initiate("home-psk", "home-psk")
        pool = ipaddress.IPv4Network(tb.addr.pool)
        p = tb.exec("mn", ["ip", "-4", "-o", "addr", "show"], check=True)
        for a in re.findall(r"inet (\S+)/", p.stdout):
            if ipaddress.IPv4Address(a) in pool:
                self.vip = a
        if self.vip is None:
            raise TestbedError(f"strongSwan's client got no virtual IP from {tb.addr.pool}: {p.stdout}")

    def stop(self) -> None:
        if self.client is not None:
            try:
                self.client.terminate("home-psk")
            except Exception:
                pass
            self.tb.stop("charon-mn")
            self.client = None
        # what the client leaves in the node's namespace: addresses and the default route from udhcpc
        self.tb.exec("mn", ["ip", "-force", "-batch", "-"],
                     input=f"addr flush dev {self.tb.mn_if} scope global\nroute flush dev {self.tb.mn_if}\n")


def swan_move(tb: Testbed, swan: SwanRun, flow: Flow, xw: XfrmWatch | None, target: str) -> dict:
    """The same move for strongSwan's client, then udhcpc; times after the attach."""
    src, t_detach, t_link = attach(tb, target)
    rec: dict = {"from": src, "to": target, "mode_from": "vpn", "mode_to": "vpn", "t_link": round(t_link, 3)}
    t_addr, addr = swan.dhcp()
    if addr is None:
        rec.update(ok=False, reason="udhcpc got no lease")
        return rec
    rec.update(ok=True, coa=addr, lease=_ms(t_addr, t_link))
    if xw is not None:
        t_gw = xw.wait(t_link, tb.addr.gw_public, _matcher(tb, target, addr.split("/")[0]), DELIVERY_TIMEOUT)
        rec["gw_sa"] = _ms(t_gw, t_link)
        rec["lease_to_gw_sa"] = _ms(t_gw, t_addr) if t_gw else None
    rec.update(recovery(flow, t_link, t_detach, DELIVERY_TIMEOUT))
    return rec


def _guard(fn, who: str, log) -> dict:
    """One goodput round; an exception becomes a "not measured" row."""
    try:
        return fn()
    except Exception as e:
        log(f"  goodput ({who}): {type(e).__name__}: {e}")
        return {"who": who, "not_measured": f"{type(e).__name__}: {e}"}


def _goodput_swan_rounds(tb: Testbed, roamer: Roamer, swan, xw, opts, log) -> list[dict]:
    """strongSwan's goodput round, then (goodput_rounds > 1) more agent / strongSwan pairs; leaves no client."""
    rounds = []
    try:
        if swan is None or swan.client is None:
            if swan is not None:
                swan.stop()
            swan = SwanRun(tb, log)
            swan.start("external-1")
        elif tb.attached != "external-1":
            attach(tb, "external-1")
            swan.dhcp()
            time.sleep(1)
        rounds.append(_guard(lambda: gp.swan_round(tb, swan, opts, log), "strongswan", log))
        for _ in range(1, opts.goodput_rounds):     # more rounds alternate agent and strongSwan
            swan.stop()
            swan = None
            tb.start_agent("mn", wait=120)
            rounds.append(_guard(lambda: gp.agent_round(
                tb, roamer, lambda n: agent_move(tb, roamer, None, xw, n, {}, opts.poll), opts, log, fresh=True),
                "agent", log))
            tb.stop("mn-agent")
            swan = SwanRun(tb, log)
            swan.start("external-1")
            rounds.append(_guard(lambda: gp.swan_round(tb, swan, opts, log), "strongswan", log))
    except Exception as e:
        log(f"  goodput: {type(e).__name__}: {e}")
        rounds.append({"who": "strongswan", "not_measured": f"{type(e).__name__}: {e}"})
    finally:
        if swan is not None:
            swan.stop()
    return rounds


# -- the session -------------------------------------------------------------------------------------
def run_session(opts, caps: dict, log) -> dict:
    """Bring a testbed up and run the selected kernel-path parts on it; a dict for the report."""
    res: dict = {"handover": None, "goodput": None, "agent_resources": None}
    want_h = "handover" in opts.parts
    want_g = "goodput" in opts.parts
    rtts = list(opts.rtts)
    skipped_rtts = []
    if not caps.get("netem"):
        skipped_rtts = [r for r in rtts if r]
        rtts = [r for r in rtts if not r]
    signalling_only = not caps.get("ipip")
    tb = Testbed(opts.testbed_id, root=opts.state_root, ns_prefix=opts.ns_prefix, agents="require")
    t0 = time.monotonic()
    log(f"testbed {tb.id}: up ...")
    tb.up(at="none")
    log(f"testbed up in {time.monotonic() - t0:.1f} s (gateway ESP: {tb.ipsec})")
    xw = flow = swan = None
    roamer = Roamer(tb)
    try:
        xw = XfrmWatch(tb.ns(tb.layout.gw_node)) if tb.ipsec == "kernel" else None
        init, retr, mx = opts.detection
        hres = {"cycle": [START, *opts.cycle], "rounds": opts.rounds, "rtts": {}, "strongswan": {},
                "gateway_esp": tb.ipsec, "signalling_only": signalling_only, "unmeasured": [],
                "detection": {"initial_timeout": init, "retransmissions": retr, "max_timeout": mx},
                "probe_rate_hz": round(1.0 / opts.probe_interval, 1)}
        if signalling_only:
            hres["unmeasured"].append("first echo, TCP recovery, outage: this kernel has no ipip, the agent ran "
                                      "signalling only (datapath = none)")
        for r in skipped_rtts:
            hres["unmeasured"].append(f"added RTT {r} ms: no netem (sch_netem) in this kernel")
        if xw is None:
            hres["unmeasured"].append("gateway SA update time: the gateway runs kernel-libipsec (no kernel "
                                      "ESP here), its SAs are not in XFRM")
        # 1. the agent
        t0 = time.monotonic()
        start_agent(roamer, opts, signalling_only)
        pid = tb.daemons["mn-agent"].pid
        log(f"agent up in {time.monotonic() - t0:.1f} s (pid {pid}; detection {init}/{retr}/{mx} s)")
        prev = agent_move(tb, roamer, None, xw, START, {}, opts.poll)
        log(f"  warm-up move to {START}: {prev.get('verdict')} mode {prev.get('mode_to')}, ready "
            f"{prev.get('ready')} ms")
        if not prev.get("ok"):
            raise TestbedError(f"the agent did not settle on {START}: {prev.get('reason')} {prev.get('agent_last')}")
        if not signalling_only:
            flow = start_flow(tb, tb.addr.home_address, opts)
        time.sleep(1.0)
        res["agent_resources"] = {"idle": procstat.idle(pid, opts.idle_seconds), "during": {}, "i_ha_idle": None}
        res["agent_resources"]["idle_polled"] = polled_idle(roamer, pid, opts.idle_seconds, 0.5)
        ha = tb.daemons.get("i-ha")
        if ha is not None:
            res["agent_resources"]["i_ha_idle"] = procstat.idle(ha.pid, min(2.0, opts.idle_seconds))
        prev = {"mode": prev.get("mode_to")}
        if want_h:
            for rtt in rtts:
                tb.impair(delay_ms=rtt / 2) if rtt else tb.impair()
                rtt_gw = ping_rtt(tb, tb.addr.gw_public)     # the path MOBIKE takes (host route via the router)
                moves = []
                s0 = procstat.sample(pid)
                for rnd in range(opts.rounds):
                    for target in opts.cycle:
                        rec = agent_move(tb, roamer, flow, xw, target, prev, opts.poll)
                        rec["round"] = rnd
                        moves.append(rec)
                        prev = {"mode": rec.get("mode_to")}
                        log(f"  rtt+{rtt} r{rnd} {rec['from']}->{target}: {rec.get('verdict')} "
                            f"{rec.get('mode_from')}->{rec.get('mode_to')} ready {rec.get('ready')} ms, "
                            f"echo {rec.get('first_echo')} ms, tcp {rec.get('tcp_recovered')} ms"
                            + ("" if rec.get("ok") else f" ({rec.get('reason')})"))
                        time.sleep(opts.settle)
                s1 = procstat.sample(pid)
                use = procstat.usage(s0, s1)
                if use:
                    use["moves"] = len(moves)
                    use["cpu_ms_per_handover"] = round(1000 * use["cpu_s"] / max(1, len(moves)), 1)
                res["agent_resources"]["during"][str(rtt)] = use
                hres["rtts"][str(rtt)] = {"rtt_to_gateway_ms": rtt_gw, "moves": moves, "summary": summarize(moves)}
            tb.impair()
        if flow is not None:
            hres["flow"] = flow.summary()
            flow.stop()
            flow = None
        goodput_rounds: list[dict] = []
        if want_g:
            if signalling_only or not caps.get("esp"):
                res["goodput"] = {"not_measured": "this kernel has no " + ("ipip" if signalling_only else "ESP")}
            else:
                goodput_rounds.append(_guard(lambda: gp.agent_round(
                    tb, roamer, lambda n: agent_move(tb, roamer, None, xw, n, prev, opts.poll), opts, log),
                    "agent", log))
        tb.stop("mn-agent")

        # 2. strongSwan's client (a failure here keeps what the agent measured)
        if want_h and not opts.no_strongswan:
            try:
                swan = SwanRun(tb, log)
                t0 = time.monotonic()
                swan.start("external-1")
                log(f"strongSwan client up in {time.monotonic() - t0:.1f} s (virtual IP {swan.vip})")
                flow = start_flow(tb, swan.vip, opts)
                for rtt in rtts:
                    tb.impair(delay_ms=rtt / 2) if rtt else tb.impair()
                    moves = []
                    for rnd in range(opts.rounds):
                        for target in SWAN_CYCLE:
                            rec = swan_move(tb, swan, flow, xw, target)
                            rec["round"] = rnd
                            moves.append(rec)
                            log(f"  strongSwan rtt+{rtt} r{rnd} {rec['from']}->{target}: address {rec.get('lease')} "
                                f"ms, gateway SA {rec.get('gw_sa')} ms, echo {rec.get('first_echo')} ms, "
                                f"tcp {rec.get('tcp_recovered')} ms")
                            time.sleep(opts.settle)
                    hres["strongswan"][str(rtt)] = {
                        "moves": moves, "summary": summarize(moves, ("lease", "gw_sa", "lease_to_gw_sa", "first_echo",
                                                                     "tcp_recovered", "outage"))}
                tb.impair()
                hres["strongswan_flow"] = flow.summary()
            except Exception as e:
                log(f"strongSwan's client: {type(e).__name__}: {e}")
                hres["unmeasured"].append(f"strongSwan's client (from then on): {type(e).__name__}: {e}")
            finally:
                if flow is not None:
                    flow.stop()
                    flow = None
        elif want_h:
            hres["unmeasured"].append("strongSwan's client: skipped (--no-strongswan)")
        if want_g and goodput_rounds:
            goodput_rounds += _goodput_swan_rounds(tb, roamer, swan, xw, opts, log)
            swan = None
            res["goodput"] = gp.summarize(goodput_rounds)
        if swan is not None:
            swan.stop()
        if want_h:
            res["handover"] = hres
        return res
    finally:
        if flow is not None:
            flow.stop()
        if xw is not None:
            xw.close()
        keep = getattr(opts, "keep_logs", None)
        if keep:
            try:
                shutil.copytree(tb.dir / "logs", Path(keep) / "testbed-logs", dirs_exist_ok=True)
                for f in tb.dir.glob("swan/*/charon.log"):
                    shutil.copy(f, Path(keep) / "testbed-logs" / f"charon-{f.parent.name}.log")
            except Exception:
                pass
        tb.down()
        log(f"testbed {tb.id}: down")
