"""Drive the mobile node agent around the testbed and record each handover (the demo and the e2e suite).

    tb = Testbed("demo", agents="require").up(at="none")
    r = Roamer(tb)
    r.start_agent(initial_timeout=1.0, retransmissions=2)
    step = r.move("internal-1")            # detach, pause, attach; waits until the handover finished
    step.handover["verdict"], step.handover["mode"], step.ms_ready
    r.start_flow(); r.start_capture()
    step = r.move("internal-2"); r.settle(step)   # + traffic recovery, losses, capture check

``move`` detaches the node first (link down, off every bridge), waits
``gap`` seconds, then attaches it to the new net: the agent sees the carrier
go and come back, and every frame the capture records after the detach
belongs to the new attachment, so "before the handover was ready" is a
clean time window.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent import control
from agent.testbed import TestbedError

from .capture import DetectionPeers, LinkCapture, kinds, leaks
from .flow import Flow

FINISHED = ("failed", "superseded")
HANDOVER_LINE = re.compile(r"mipmobike\.mn: handover \S+ on \S+: ")     # the agent's "handover ended" line


def vpn_available() -> bool:
    """Whether this build has the mobile node's VPN client (agent/mn/vpn.py), i.e. mode mc."""
    try:
        return importlib.util.find_spec("agent.mn.vpn") is not None
    except (ImportError, ValueError):
        return False


def kernel_paths() -> dict[str, bool]:
    """Whether this kernel takes an ESP state and an ipip device (tried in a scratch namespace)."""
    from agent.doctor import Scratch, check_esp, check_ipip
    with Scratch() as s:
        return {"esp": check_esp(s).ok, "ipip": check_ipip(s).ok}


def warm_gate_cache() -> str:
    """Compile the BPF gate into the agent's disk cache unless it is there already (a VM sharing this
    root read-only then loads it instead of compiling for a minute under TCG). Returns what it did."""
    from agent.gate.loader import compiled, source_key
    from agent.mn.cli import GATE_CACHE
    path = Path(GATE_CACHE) / f"gate-{source_key()}.json"
    if path.exists():
        return f"gate program cached ({path})"
    t0 = time.monotonic()
    compiled(cache_dir=GATE_CACHE)
    return f"gate program compiled into {GATE_CACHE} in {time.monotonic() - t0:.1f} s"


def set_toml_keys(text: str, table: str, values: dict) -> str:
    """Set ``key = value`` lines in ``[table]`` of a flat TOML text (the table is added if missing)."""
    def fmt(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = text.splitlines()
    header = f"[{table}]"
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == header)
    except StopIteration:
        return text.rstrip("\n") + "\n\n" + header + "\n" + "".join(f"{k} = {fmt(v)}\n" for k, v in values.items())
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    body = [line for line in lines[start + 1:end]
            if not any(re.match(rf"\s*{re.escape(k)}\s*=", line) for k in values)]
    new = [f"{k} = {fmt(v)}" for k, v in values.items()]
    return "\n".join(lines[:start + 1] + new + body + lines[end:]) + "\n"


def agent_config(tb, name: str = "mn-e2e.toml", *, initial_timeout: float = 1.0, retransmissions: int = 2,
                 max_timeout: float = 2.0, log_level: str = "INFO", mn: dict | None = None,
                 vpn: dict | None = None) -> str:
    """The testbed's mobile node configuration with detection timeouts suited to the machine (TCG: ~1 s).

    Written next to the testbed's own and made the one ``tb.start_agent("mn")`` and ``tb.restart``
    use. Returns its path."""
    text = Path(tb.files["mn_config"]).read_text()
    text = set_toml_keys(text, "mn", {"log_level": log_level, **(mn or {})})
    if vpn:
        text = set_toml_keys(text, "vpn", vpn)
    text = set_toml_keys(text, "mn.detection", {"initial_timeout": initial_timeout,
                                                "retransmissions": retransmissions, "max_timeout": max_timeout})
    path = Path(tb.dir) / "conf" / name
    path.write_text(text)
    tb.files["mn_config"] = str(path)
    tb.save()
    return str(path)


@dataclass
class Step:
    """One move and what the agent and the traffic made of it."""

    src: str | None
    dst: str
    t_detach: float
    t_attach: float
    handover: dict | None = None                 # the agent's timeline entry
    t_recovered: float | None = None             # both echo and TCP flowing again (wall clock)
    flow: dict | None = None                     # Flow.window() from the detach to the recovery
    leaks: list[str] | None = None               # frames sent before ready that were not detection traffic
    kinds: dict[str, int] | None = None          # frames sent between the attach and ready, by kind
    frames: int | None = None                    # frames sent between the detach and ready
    ha_requests: tuple[int, int] | None = None   # i-HA's registration request counter before and after
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str | None:
        return self.handover["verdict"] if self.handover else None

    @property
    def mode(self) -> str | None:
        return self.handover["mode"] if self.handover else None

    @property
    def ms_ready(self) -> float | None:
        return self.handover["ms_ready"] if self.handover else None

    @property
    def t_ready(self) -> float | None:
        return self.handover["t_ready"] if self.handover else None

    def as_dict(self) -> dict:
        return {"from": self.src, "to": self.dst, "t_detach": self.t_detach, "t_attach": self.t_attach,
                "handover": self.handover, "t_recovered": self.t_recovered, "flow": self.flow,
                "leaks": self.leaks, "frames": self.frames, "kinds": self.kinds, "ha_requests": self.ha_requests, "notes": self.notes}


class Roamer:
    def __init__(self, tb, workdir: str | Path | None = None) -> None:
        self.tb = tb
        self.workdir = Path(workdir or Path(tb.dir) / "run")
        self.flow: Flow | None = None
        self.capture: LinkCapture | None = None
        self.steps: list[Step] = []
        self.peers = DetectionPeers({tb.addr.ha, *(n.fa for n in tb.nets.values() if n.fa)}, {tb.addr.gw_public})

    # -- the agent ----------------------------------------------------------------------------------
    @property
    def sock(self) -> str:
        return self.tb.daemons["mn-agent"].extra["control_socket"]

    def start_agent(self, wait: float = 120, **config) -> None:
        agent_config(self.tb, **config)
        self.tb.start_agent("mn", wait=wait)

    def status(self, timeout: float = 10) -> dict:
        return control.request(self.sock, "status", timeout=timeout)

    def ha_status(self) -> dict:
        return control.request(self.tb.daemons["i-ha"].extra["control_socket"], "status", timeout=10)

    def ha_requests(self) -> int:
        return int(self.ha_status()["counters"]["requests"])

    def agent_log(self, tail: int = 4000) -> str:
        d = self.tb.daemons.get("mn-agent")
        if d is None:
            return ""
        try:
            text = Path(d.log).read_text(errors="replace")
        except FileNotFoundError:
            return ""
        keep = [line for line in text.splitlines() if "pyroute2" not in line]
        return "\n".join(keep)[-tail:]

    def log_size(self) -> int:
        """Where the agent's log ends now (pass it to :meth:`wait_handover` as ``log_from``)."""
        try:
            return os.path.getsize(self.tb.daemons["mn-agent"].log)
        except (OSError, KeyError):
            return 0

    def wait_handover(self, after: float, timeout: float = 90, poll: float = 1.0,
                      log_from: int | None = None) -> dict | None:
        """The first link-up (or address) handover the agent started at or after ``after``, once finished.

        The agent is asked for its status when its log (read from ``log_from``) says a handover
        ended, else every ``poll`` s: the times come from the agent's own timeline, so asking
        more often only takes CPU from the handover being timed (much of it under TCG)."""
        deadline = time.monotonic() + timeout
        path = self.tb.daemons["mn-agent"].log
        offset = self.log_size() if log_from is None else log_from
        last, next_ask = None, time.monotonic() + poll
        while time.monotonic() < deadline:
            time.sleep(0.05)
            ask = time.monotonic() >= next_ask
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    new = f.read()
                cut = new.rfind(b"\n") + 1
                offset += cut
                if HANDOVER_LINE.search(new[:cut].decode(errors="replace")):
                    ask = True
            except OSError:
                ask = True
            if not ask:
                continue
            next_ask = time.monotonic() + poll
            try:
                st = self.status()
            except control.ControlError:
                d = self.tb.daemons.get("mn-agent")
                if d is not None and not d.alive():
                    raise TestbedError(f"the mobile node agent exited:\n{self.agent_log()}") from None
                continue
            hs = [h for h in st["timeline"] if h["trigger"] != "link-down" and h["t_trigger"] >= after - 0.05]
            if hs:
                last = hs[0]
                if last["t_ready"] is not None or last["verdict"] in FINISHED:
                    return last
        return last

    # -- traffic and capture ---------------------------------------------------------------------------
    def start_flow(self, **kw) -> Flow:
        tb = self.tb
        self.flow = Flow(tb.ns("mn"), tb.ns("cn"), tb.addr.home_address, tb.addr.cn, **kw)
        self.flow.start_server()
        self.flow.start_client()
        return self.flow

    def start_capture(self, name: str = "access.pcap") -> LinkCapture:
        ns, ifname = self.tb.access_port
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.capture = LinkCapture(ns, ifname, self.workdir / name).start()
        return self.capture

    # -- moves ---------------------------------------------------------------------------------------------
    def move(self, net: str, gap: float = 0.5, timeout: float = 90, count_ha: bool = False) -> Step:
        """Detach, wait ``gap`` s, attach to ``net``; returns once the agent's handover finished."""
        tb = self.tb
        src = tb.attached
        before = self.ha_requests() if count_ha else None
        log_from = self.log_size()
        if src is not None:
            tb.move("none")
        t_detach = time.time()
        time.sleep(gap)
        t_attach = time.time()
        tb.move(net)
        step = Step(src, net, t_detach, t_attach)
        step.handover = self.wait_handover(t_attach, timeout, log_from=log_from)
        if count_ha:
            step.ha_requests = (before, self.ha_requests())
        self.steps.append(step)
        return step

    def settle(self, step: Step, timeout: float = 60) -> Step:
        """After a move: wait until the flow flows again, count its losses, check the capture."""
        if self.flow is not None and step.handover is not None:
            start = step.t_ready or step.t_attach
            r = self.flow.wait_recovered(start, timeout)
            step.t_recovered = max(r) if r else None
            step.flow = self.flow.window(step.t_detach, step.t_recovered or time.time()).as_dict()
        if self.capture is not None and step.t_ready is not None:
            # the switch port is down from the detach to the attach: all of these are the new link's
            frames = [f for f in self.capture.frames() if step.t_detach <= f[0] < step.t_ready]
            step.frames = len(frames)
            step.leaks = leaks(frames, step.t_detach, step.t_ready, self.peers)
            step.kinds = kinds(frames, step.t_detach, step.t_ready, self.peers)
        return step

    def stop(self) -> None:
        if self.flow is not None:
            self.flow.stop()
        if self.capture is not None:
            self.capture.stop()
