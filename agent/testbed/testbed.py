"""Build, inspect, re-wire and tear down a testbed (see ``layout.py`` for the networks).

    tb = Testbed("t1")            # id: namespaces mmtb-t1-<role>, state in /run/mipmobike/testbed/t1
    tb.up()                       # namespaces, veths, bridges, firewall, dnsmasq, strongSwan gateway, agents
    tb.move("external-1")         # re-attach the mobile node's one interface (link down, move, link up)
    tb.dhcp()                     # a DHCP lease on it (pyroute2's client), returns "198.51.100.1xx/24"
    tb.exec("mn", ["ping", "-c1", tb.addr.inet])
    tb.down()                     # idempotent; also Testbed.load("t1").down() from another process

More: ``tb.ns(node)`` (namespace name), ``tb.mn_if``, ``tb.access_port`` (where to
capture the node's access link), ``tb.files`` (configs, keys, certificates),
``tb.static_address()``, ``tb.vpn_client()`` (strongSwan as the node's VPN client),
``tb.start_agent("mn")``, ``tb.restart("charon-gw" | "i-ha" | ...)``, ``tb.stop(name)``,
``tb.impair(loss=10)`` (netem), ``tb.gateway()`` (the gateway's Charon), ``tb.status()``.

Every step of ``up`` is recorded in ``state.json`` in the state directory as it
happens, so ``Testbed.load(id)`` (``mipmobike testbed status|move|down``)
works from another process, and a failed or interrupted ``up`` is undone.
Nothing is created in the root namespace: every interface is made directly
inside its namespace, so testbeds with different ids never collide.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import procs
from .nsenter import netns, sysctl
from .layout import LAYOUTS, Layout, Net
from .swan import Charon, Pki, SwanError, client_swanctl, gateway_swanctl, kernel_has_esp

STATE_ROOT = "/run/mipmobike/testbed"
ID_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,15}$")
TOOLS = ("ip", "dnsmasq", "swanctl", "pki", "iptables-restore", "/usr/sbin/charon-systemd")

PSK_ID = "mn-psk@vpn.example"
CERT_ID = "mn.vpn.example"
MN_NAI = "mn@mipmobike.example"
MN_SPI = 0x1000
FA_SPI = 0x2000


class TestbedError(RuntimeError):
    """Something about the testbed is wrong; the message says what."""

    __test__ = False   # not a pytest test class


def _run(argv: list[str], input: str | None = None, timeout: float = 120, ns: str | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    """Run a command (inside namespace ``ns`` if given, inherited: no ``ip netns exec``)."""
    if ns is None:
        p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    else:
        with netns(ns):
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(input, timeout=timeout)
        p = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and p.returncode:
        where = f" (in {ns})" if ns else ""
        raise TestbedError(f"{' '.join(argv)}{where} -> exit {p.returncode}: {(p.stderr or p.stdout).strip()}")
    return p


def _run_all(jobs: list[tuple[str | None, list[str], str | None]], timeout: float = 120) -> None:
    """Run (namespace, argv, stdin) commands side by side; raise naming every one that failed."""
    running = []
    for ns, argv, inp in jobs:
        kw = dict(stdin=subprocess.PIPE if inp is not None else subprocess.DEVNULL, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
        if ns is None:
            running.append((ns, argv, subprocess.Popen(argv, **kw), inp))
        else:
            with netns(ns):
                running.append((ns, argv, subprocess.Popen(argv, **kw), inp))
    errors = []
    for ns, argv, p, inp in running:
        out, err = p.communicate(inp, timeout=timeout)
        if p.returncode:
            errors.append(f"{' '.join(argv)}{f' (in {ns})' if ns else ''} -> exit {p.returncode}: "
                          f"{(err or out).strip()}")
    if errors:
        raise TestbedError("; ".join(errors))


def _write_secret(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def _toml(tables: dict[str, dict], header: str = "") -> str:
    """A small TOML writer for flat tables (and arrays of tables given as lists of dicts)."""
    out = [header] if header else []
    for name, table in tables.items():
        if isinstance(table, list):
            for t in table:
                out.append(f"[[{name}]]")
                out += [f"{k} = {_toml_value(v)}" for k, v in t.items()]
                out.append("")
            continue
        out.append(f"[{name}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
        out.append("")
    return "\n".join(out)


class Testbed:
    """One testbed instance; addresses as attributes (``tb.addr.ha``, ``tb.nets["external-2"].prefix``)."""

    __test__ = False

    def __init__(self, id: str = "1", layout: str = "figure1", root: str | Path = STATE_ROOT,
                 ns_prefix: str | None = None, ipsec: str = "auto", agents: str = "auto") -> None:
        if not ID_RE.match(id):
            raise TestbedError(f"testbed id {id!r}: use 1-16 of a-z, 0-9, _ (starting with a letter or digit)")
        if layout not in LAYOUTS:
            raise TestbedError(f"layout {layout!r}: known layouts are {', '.join(LAYOUTS)}")
        if ipsec not in ("auto", "kernel", "libipsec"):
            raise TestbedError(f"ipsec {ipsec!r}: must be auto, kernel or libipsec")
        if agents not in ("auto", "require", "none"):
            raise TestbedError(f"agents {agents!r}: must be auto, require or none")
        self.id = id
        self.layout_name = layout
        self.layout: Layout = LAYOUTS[layout]()
        self.addr = self.layout.addr
        self.nets: dict[str, Net] = self.layout.nets
        self.root = Path(root)
        self.dir = self.root / id
        self.prefix = ns_prefix or f"mmtb-{id}-"
        self.ipsec_request = ipsec
        self.ipsec: str | None = None
        self.agents = agents
        self.daemons: dict[str, procs.Daemon] = {}
        self.files: dict[str, str] = {}
        self.attached: str | None = None
        self.moves: list[dict] = []
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.phase = "new"

    # -- names ------------------------------------------------------------------------------
    def ns(self, role: str) -> str:
        """The namespace name of a node (``tb.ns("mn")``)."""
        if role not in self.layout.nodes:
            raise TestbedError(f"no node {role!r} in layout {self.layout_name}: {', '.join(self.layout.nodes)}")
        return self.prefix + role

    @property
    def namespaces(self) -> dict[str, str]:
        return {r: self.prefix + r for r in self.layout.nodes}

    @property
    def mn_if(self) -> str:
        return self.layout.mn_if

    @property
    def access_port(self) -> tuple[str, str]:
        """(namespace, interface) of the switch side of the node's access link: capture here."""
        return self.ns(self.layout.switch), self.layout.switch_mn_port

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    # -- state ------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "id": self.id, "layout": self.layout_name, "phase": self.phase, "dir": str(self.dir),
            "ns_prefix": self.prefix, "namespaces": self.namespaces, "ipsec": self.ipsec,
            "ipsec_request": self.ipsec_request, "agents": self.agents,
            "daemons": {k: d.to_json() for k, d in self.daemons.items()},
            "files": self.files,
            "mn": {"ns": self.prefix + self.layout.mn_node, "ifname": self.layout.mn_if,
                   "mac": self.layout.mn_mac, "attached": self.attached},
            "moves": self.moves[-50:], "notes": self.notes, "timings": self.timings,
            "addresses": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.addr).items()},
            "nets": {n.name: {"prefix": n.prefix, "router": n.router, "zone": n.zone, "dhcp": n.dhcp,
                              "nat": n.nat, "fa": n.fa, "trusted": n.trusted, "bridge": n.bridge,
                              "router_ns": self.prefix + n.router_node, "note": n.note}
                     for n in self.nets.values()},
        }

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, self.state_file)

    @classmethod
    def load(cls, id: str = "1", root: str | Path = STATE_ROOT) -> "Testbed":
        path = Path(root) / id / "state.json"
        try:
            st = json.loads(path.read_text())
        except FileNotFoundError:
            raise TestbedError(f"testbed {id!r} is not up (no {path})") from None
        except (OSError, ValueError) as e:
            raise TestbedError(f"testbed {id!r}: unreadable state file {path}: {e}") from None
        tb = cls(st["id"], st["layout"], root, st["ns_prefix"], st.get("ipsec_request", "auto"),
                 st.get("agents", "auto"))
        tb.ipsec = st.get("ipsec")
        tb.phase = st.get("phase", "?")
        tb.daemons = {k: procs.Daemon.from_json(d) for k, d in st.get("daemons", {}).items()}
        tb.files = st.get("files", {})
        tb.attached = st.get("mn", {}).get("attached")
        tb.moves = st.get("moves", [])
        tb.notes = st.get("notes", [])
        tb.timings = st.get("timings", {})
        return tb

    @classmethod
    def list_ids(cls, root: str | Path = STATE_ROOT) -> list[str]:
        try:
            return sorted(p.name for p in Path(root).iterdir() if (p / "state.json").exists())
        except FileNotFoundError:
            return []

    def existing_namespaces(self) -> list[str]:
        p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        have = {line.split()[0] for line in p.stdout.splitlines() if line.strip()}
        return [n for n in self.namespaces.values() if n in have]

    # -- up ---------------------------------------------------------------------------------
    def up(self, at: str | None = "default") -> "Testbed":
        """Build everything; on any failure (or Ctrl-C) tear down what was made and raise.

        ``at``: the NET the node starts on ("default": the layout's first
        trusted access net, internal-1 in Figure 1; None or "none": detached).
        """
        if at == "default":
            at = self.layout.default_at
        if at is not None and at != "none" and at not in self.nets:
            raise TestbedError(f"unknown NET {at!r}: one of {', '.join(self.nets)} or none")
        self._preflight()
        t0 = time.monotonic()
        self.phase = "building"
        try:
            self._build(at)
        except BaseException as e:
            self.notes.append(f"up failed: {e}")
            try:
                self.down()
            except Exception as e2:   # report both
                raise TestbedError(f"testbed {self.id}: up failed ({e}); teardown also failed: {e2}") from e
            if isinstance(e, (TestbedError, SwanError)):
                raise TestbedError(f"testbed {self.id}: up failed, everything removed again: {e}") from e
            raise
        self.timings["up"] = round(time.monotonic() - t0, 3)
        self.phase = "up"
        self.save()
        return self

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise TestbedError("the testbed needs root (namespaces, veths, iptables)")
        missing = [t for t in TOOLS if not (shutil.which(t) or os.access(t, os.X_OK))]
        if missing:
            raise TestbedError(f"missing tools: {', '.join(missing)} (run scripts/setup.sh)")
        if self.state_file.exists() or self.existing_namespaces():
            if self.existing_namespaces():
                raise TestbedError(f"testbed {self.id!r} is already up (mipmobike testbed down --id {self.id})")
            # a stale state file without namespaces (machine rebooted, /run kept): clear it
            Testbed.load(self.id, self.root).down()

    def _mark(self, what: str, t0: float) -> float:
        now = time.monotonic()
        self.timings[what] = round(now - t0, 3)
        return now

    def _build(self, at: str | None) -> None:
        lay = self.layout
        t = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        for sub in ("keys", "pki", "conf", "logs", "dhcp", "swan", "run"):
            (self.dir / sub).mkdir(exist_ok=True, mode=0o700)
        self.save()   # before anything exists: a crash from here on leaves enough for down()

        # secrets and certificates in the background while the network is built
        pki_err: list[BaseException] = []
        pki_thread = threading.Thread(target=self._make_credentials, args=(pki_err,), daemon=True)
        pki_thread.start()

        # 1. namespaces, then their sysctls (before interfaces exist, so "default" applies to them)
        _run(["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in self.namespaces.values()))
        for role, ns in self.namespaces.items():
            values = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1",
                      "net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.default.rp_filter": "0"}
            if role in lay.routers:
                values["net.ipv4.ip_forward"] = "1"
            sysctl(ns, values)
        t = self._mark("namespaces", t)

        # 2. every veth, made directly inside its two namespaces (one ip process)
        sw = self.ns(lay.switch)
        cmds = [f"link add {l.a_if} netns {self.ns(l.a)} type veth peer name {l.b_if} netns {self.ns(l.b)}"
                for l in lay.links]
        cmds += [f"link add {p.ifname} netns {self.ns(p.node)} type veth peer name {lay.port_name(p)} netns {sw}"
                 for p in lay.ports]
        cmds.append(f"link add {lay.mn_if} netns {self.ns(lay.mn_node)} address {lay.mn_mac} type veth "
                    f"peer name {lay.switch_mn_port} netns {sw}")
        _run(["ip", "-batch", "-"], input="\n".join(cmds) + "\n")

        # 3. per namespace: bridges, addresses, links up, routes (one ip process each, side by side),
        #    and the firewall and NAT rules
        per: dict[str, list[str]] = {r: ["link set lo up"] for r in lay.nodes}
        for n in lay.nets.values():
            per[lay.switch] += [f"link add {n.bridge} type bridge stp_state 0 mcast_snooping 0",
                                f"link set {n.bridge} up"]
        for p in lay.ports:
            per[lay.switch].append(f"link set {lay.port_name(p)} master {self.nets[p.net].bridge} up")
            if p.cidr:
                per[p.node].append(f"addr add {p.cidr} dev {p.ifname}")
            per[p.node].append(f"link set {p.ifname} up")
        for l in lay.links:
            for role, ifn, cidr in ((l.a, l.a_if, l.a_cidr), (l.b, l.b_if, l.b_cidr)):
                if cidr:
                    per[role].append(f"addr add {cidr} dev {ifn}")
                per[role].append(f"link set {ifn} up")
        per[lay.mn_node].append(f"link set {lay.mn_if} up")   # no carrier until attached
        for role, rts in lay.routes.items():
            per[role] += [f"route add {r}" for r in rts]
        jobs = [(self.ns(r), ["ip", "-batch", "-"], "\n".join(c) + "\n") for r, c in per.items()]
        jobs += [(self.ns(r), ["iptables-restore"], rules) for r, rules in lay.firewall.items()]
        _run_all(jobs)
        t = self._mark("network", t)

        # 4. IPsec backend: kernel ESP where the kernel takes an ESP state, else kernel-libipsec
        if self.ipsec_request == "auto":
            self.ipsec = "kernel" if kernel_has_esp(self.ns(lay.gw_node)) else "libipsec"
        else:
            self.ipsec = self.ipsec_request
        self.save()

        # 5. daemons: the gateway and DHCP servers start while the keys are still being made
        gw = self.gateway()
        gw.write_config()
        self.daemons["charon-gw"] = gw.spawn()
        for n in lay.nets.values():
            if n.dhcp:
                self._start_dnsmasq(n)
        self.save()
        t_wait = time.monotonic()
        pki_thread.join()
        self.timings["waited for pki"] = round(time.monotonic() - t_wait, 3)
        if pki_err:
            raise TestbedError(f"making keys and certificates: {pki_err[0]}")
        self._write_agent_configs()
        self._start_agents()
        gw.add_file(self.dir / "pki" / "gw.crt", "x509")
        gw.add_file(self.dir / "pki" / "gw.key", "private")
        gw.add_file(self.dir / "pki" / "ca.crt", "x509ca")
        gw.write_swanctl(gateway_swanctl(self.addr.gw_public, list(self.addr.internal_prefixes), self.addr.pool,
                                         self._psk(), PSK_ID, self.addr.gw_id, "gw.crt", "ca.crt"))
        t_wait = time.monotonic()
        gw.wait_ready()
        self.timings["waited for charon"] = round(time.monotonic() - t_wait, 3)
        gw.load_all()
        self.daemons["charon-gw"].ready = True
        for name, d in self.daemons.items():
            if name.startswith("dnsmasq-"):
                self._wait_dnsmasq(d)
        t = self._mark("daemons", t)

        # 6. the mobile node's link
        self.move(at if at is not None else "none", record=False)
        self._wait_agents()
        self._mark("agents", t)

    # -- credentials and configuration files --------------------------------------------------
    def _psk(self) -> str:
        return (self.dir / "keys" / "vpn.psk").read_text().strip()

    def _make_credentials(self, err: list) -> None:
        t0 = time.monotonic()
        try:
            keys = self.dir / "keys"
            _write_secret(keys / "vpn.psk", "tb-" + secrets.token_urlsafe(24) + "\n")
            _write_secret(keys / "mip-mn.key", secrets.token_hex(16) + "\n")
            _write_secret(keys / "mip-fa.key", secrets.token_hex(16) + "\n")
            pki = Pki(self.dir / "pki")
            pki.make([("gw", [self.addr.gw_id, self.addr.gw_public], "serverAuth"),
                      ("mn", [CERT_ID], "clientAuth")])
            self.files.update({
                "psk": str(keys / "vpn.psk"), "mip_mn_key": str(keys / "mip-mn.key"),
                "mip_fa_key": str(keys / "mip-fa.key"), "ca": str(pki.path / "ca.crt"),
                "gw_cert": str(pki.path / "gw.crt"), "mn_cert": str(pki.path / "mn.crt"),
                "mn_key": str(pki.path / "mn.key"),
            })
            self.timings["pki (background)"] = round(time.monotonic() - t0, 3)
        except BaseException as e:   # reported by the builder thread
            err.append(e)

    def _write_agent_configs(self) -> None:
        a, conf, run = self.addr, self.dir / "conf", self.dir / "run"
        mn = {
            "interfaces": [self.layout.mn_if], "home_address": a.home_address, "home_agent": a.ha,
            "home_prefix": a.home_prefix, "nai": MN_NAI, "spi": MN_SPI, "algorithm": "hmac-md5",
            "key_file": self.files["mip_mn_key"], "lifetime": 600, "reverse_tunnel": True, "use_fa": True,
            "udp_tunnel": "auto", "control_socket": str(run / "mn.sock"), "state_dir": str(run / "mn"),
        }
        vpn_common = {"gateway": a.gw_public, "gateway_id": a.gw_id,
                      "internal_prefixes": list(a.internal_prefixes)}
        gate = {"backend": "auto", "bpffs": str(run / "bpf")}
        header = (f"# mobile node configuration written by `mipmobike testbed up` (testbed {self.id}).\n"
                  f"# Run it in the node's namespace: ip netns exec {self.ns(self.layout.mn_node)} "
                  f"{os.path.join(os.path.dirname(sys.executable), 'mipmobike')} mn --config THIS_FILE\n"
                  f"# (it needs ipip, and ESP for the VPN: on a kernel without them, use the demo's VM runner)\n")
        for name, vpn in (("mn.toml", {"local_id": PSK_ID, "auth": "psk", "psk_file": self.files["psk"]}),
                          ("mn-cert.toml", {"local_id": CERT_ID, "auth": "cert", "cert": self.files["mn_cert"],
                                            "key_file": self.files["mn_key"], "ca": self.files["ca"]})):
            (conf / name).write_text(_toml({"mn": mn, "vpn": {**vpn_common, **vpn}, "gate": gate}, header))
        self.files["mn_config"] = str(conf / "mn.toml")
        self.files["mn_cert_config"] = str(conf / "mn-cert.toml")
        # i-HA and i-FA: written for the daemons of agent/ha and agent/fa (their format may still move)
        ha = {"address": a.ha, "listen": [a.ha], "home_interface": self.layout.ha_if,
              "trusted_prefixes": list(a.trusted_prefixes), "max_lifetime": 1800,
              "control_socket": str(run / "ha.sock"), "state_file": str(run / "ha-state.json")}
        ha_nodes = [{"home_address": a.home_address, "nai": MN_NAI, "spi": MN_SPI, "algorithm": "hmac-md5",
                     "key_file": self.files["mip_mn_key"], "reverse_tunnel_required": False,
                     "udp_tunnel_allowed": True}]
        ha_fas = [{"address": n.fa, "spi": FA_SPI, "algorithm": "hmac-md5", "key_file": self.files["mip_fa_key"]}
                  for n in self.nets.values() if n.fa]
        (conf / "ha.toml").write_text(_toml({"ha": ha, "ha.dataplane": {"backend": "auto"}, "ha.nodes": ha_nodes,
                                             "ha.foreign_agents": ha_fas},
                                            f"# i-HA configuration written by mipmobike testbed {self.id}\n"))
        self.files["ha_config"] = str(conf / "ha.toml")
        fa_net = next((n for n in self.nets.values() if n.fa), None)
        if fa_net:
            fa = {"interface": self.layout.fa_if, "address": fa_net.fa, "care_of_addresses": [fa_net.fa],
                  "registration_lifetime": 1800, "advertisement_interval": 1.0, "reverse_tunnel": True,
                  "allowed_home_agents": [a.ha], "control_socket": str(run / "fa.sock")}
            fa_has = [{"address": a.ha, "spi": FA_SPI, "algorithm": "hmac-md5",
                       "key_file": self.files["mip_fa_key"]}]
            (conf / "fa.toml").write_text(_toml({"fa": fa, "fa.dataplane": {"backend": "auto"},
                                                 "fa.home_agents": fa_has},
                                                f"# i-FA configuration written by mipmobike testbed {self.id}\n"))
            self.files["fa_config"] = str(conf / "fa.toml")
        self.save()

    # -- daemons ------------------------------------------------------------------------------
    def gateway(self) -> Charon:
        """The gateway's charon (paths are fixed, so this works on a loaded testbed too)."""
        return Charon(self.dir / "swan", self.ns(self.layout.gw_node), "gw", self.ipsec or "libipsec",
                      interfaces_use=[self.layout.gw_outside_if])

    def _start_dnsmasq(self, n: Net) -> None:
        d = self.dir / "dhcp"
        argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                "--port=0", "--no-ping", "--bind-interfaces", f"--interface={n.router_if}",
                f"--dhcp-range={n.dhcp[0]},{n.dhcp[1]},{n.netmask},{self.layout.dhcp_lease}",
                f"--dhcp-option=option:router,{n.router}", "--dhcp-authoritative",
                f"--dhcp-leasefile={d / (n.name + '.leases')}", f"--pid-file={d / (n.name + '.pid')}",
                "--log-facility=-", "--log-dhcp"]
        if n.name in self.layout.reservations:
            argv.append(f"--dhcp-host={self.layout.mn_mac},{self.layout.reservations[n.name]}")
        pidfile = d / (n.name + ".pid")
        if pidfile.exists():
            pidfile.unlink()
        dm = procs.spawn(f"dnsmasq-{n.name}", self.ns(n.router_node), argv,
                         str(self.dir / "logs" / f"dnsmasq-{n.name}.log"))
        dm.extra = {"net": n.name, "pid_file": str(pidfile), "lease_file": str(d / (n.name + ".leases"))}
        old = self.daemons.get(dm.name)
        if old is not None and old.alive():
            procs.stop(old)
        self.daemons[dm.name] = dm
        self.save()

    def _wait_dnsmasq(self, d: procs.Daemon, timeout: float = 30) -> None:
        pidfile = Path(d.extra["pid_file"])
        deadline = time.monotonic() + timeout
        while True:
            try:
                if pidfile.read_text().strip() == str(d.pid):
                    d.ready = True
                    return
            except FileNotFoundError:
                pass
            if procs.exited(d) is not None:
                raise TestbedError(f"{d.name} exited at start: {self._tail(d.log)}")
            if time.monotonic() > deadline:
                raise TestbedError(f"{d.name}: not ready after {timeout}s: {self._tail(d.log)}")
            time.sleep(0.02)

    @staticmethod
    def _tail(path: str, n: int = 1500) -> str:
        try:
            return Path(path).read_text(errors="replace")[-n:].strip()
        except FileNotFoundError:
            return "(no log)"

    @staticmethod
    def agent_available(role: str) -> bool:
        """Whether ``mipmobike ROLE`` ("ha" / "fa") is implemented in this checkout."""
        from agent.cli import SUBCOMMANDS
        return bool(SUBCOMMANDS.get(role, (None,))[0])

    def _agent_argv(self, role: str) -> list[str]:
        return [sys.executable, "-m", "agent.cli", role, "--config", self.files[f"{role}_config"]]

    def _agent_env(self) -> tuple[str, dict]:
        pkg_root = str(Path(__file__).resolve().parents[2])
        env = {"PYTHONPATH": pkg_root + (os.pathsep + os.environ["PYTHONPATH"] if "PYTHONPATH" in os.environ
                                         else "")}
        return pkg_root, env

    def start_agent(self, role: str, extra_args: list[str] | None = None, wait: float | None = 60) -> procs.Daemon:
        """Start ``mipmobike ROLE --config <the testbed's config>`` in its node's namespace.

        ``role``: "ha", "fa" or "mn" (the mobile node agent, with mn.toml;
        "mn-cert" uses the X.509 configuration). Recorded like every daemon,
        so ``down`` stops it; with ``wait`` the call returns once its control
        socket exists (TestbedError if it exits or the time runs out).
        """
        cmd = "mn" if role == "mn-cert" else role
        node = {"ha": self.layout.ha_node, "fa": self.layout.fa_node, "mn": self.layout.mn_node}.get(cmd)
        conf = self.files.get({"mn": "mn_config", "mn-cert": "mn_cert_config"}.get(role, f"{role}_config"))
        if node is None or conf is None:
            raise TestbedError(f"no agent {role!r} in this testbed (ha, fa, mn, mn-cert)")
        if not self.agent_available(cmd):
            raise TestbedError(f"`mipmobike {cmd}` is not implemented in this checkout")
        name = "mn-agent" if cmd == "mn" else f"i-{cmd}"
        if name in self.daemons and self.daemons[name].alive():
            raise TestbedError(f"{name} already runs (pid {self.daemons[name].pid})")
        pkg_root, env = self._agent_env()
        argv = [sys.executable, "-m", "agent.cli", cmd, "--config", conf, *(extra_args or [])]
        d = procs.spawn(name, self.ns(node), argv, str(self.dir / "logs" / f"{name}.log"), env=env, cwd=pkg_root,
                        ip_netns_exec=True)
        d.extra = {"control_socket": str(self.dir / "run" / f"{cmd}.sock"), "env": env, "cwd": pkg_root,
                   "ip_netns_exec": True}
        self.daemons[name] = d
        self.save()
        if wait:
            self._wait_socket(d, wait)
        return d

    def _wait_socket(self, d: procs.Daemon, timeout: float) -> None:
        sock = Path(d.extra["control_socket"])
        deadline = time.monotonic() + timeout
        while not sock.exists():
            rc = procs.exited(d)
            if rc is not None or time.monotonic() > deadline:
                why = f"exited ({rc})" if rc is not None else f"no control socket after {timeout}s"
                d.note = why
                self.save()
                raise TestbedError(f"{d.name} {why}: {self._tail(d.log, 800)}")
            time.sleep(0.05)
        d.ready = True
        d.note = ""
        self.save()

    def _start_agents(self) -> None:
        if self.agents == "none":
            self.notes.append("agents not started (agents=none)")
            return
        for role, node in (("ha", self.layout.ha_node), ("fa", self.layout.fa_node)):
            if f"{role}_config" not in self.files:
                continue
            if not self.agent_available(role):
                msg = (f"i-{role.upper()} not started: `mipmobike {role}` is not implemented yet; its config is "
                       f"{self.files[role + '_config']} (start it with: ip netns exec {self.ns(node)} "
                       f"{' '.join(self._agent_argv(role))})")
                if self.agents == "require":
                    raise TestbedError(msg)
                self.notes.append(msg)
                continue
            self.start_agent(role, wait=None)

    def _wait_agents(self, timeout: float = 60) -> None:
        """Wait for each started agent's control socket; a dead agent fails ``up`` only with agents=require."""
        deadline = time.monotonic() + timeout
        for name in ("i-ha", "i-fa"):
            d = self.daemons.get(name)
            if d is None:
                continue
            try:
                self._wait_socket(d, max(0.1, deadline - time.monotonic()))
            except TestbedError as e:
                if self.agents == "require":
                    raise
                self.notes.append(str(e))
        self.save()

    # -- the mobile node's link ---------------------------------------------------------------
    def attachment(self) -> str | None:
        """The NET the node's interface is attached to now, read from the switch (None: detached)."""
        p = _run(["ip", "-j", "link", "show", self.layout.switch_mn_port], ns=self.ns(self.layout.switch),
                 check=False)
        if p.returncode:
            return None
        info = json.loads(p.stdout or "[]")
        if not info or "UP" not in info[0].get("flags", []):
            return None
        return self.layout.net_of_bridge(info[0].get("master", ""))

    def move(self, net: str, gap: float = 0.0, record: bool = True) -> dict:
        """Re-attach the node's interface to ``net`` ("none": detach): link down, new bridge, link up.

        The node sees its carrier go away and come back (real netlink events);
        nothing inside the node's namespace is touched (addresses, routes and
        DHCP are the agent's business). ``gap`` seconds pass between down and up.
        """
        if net != "none" and net not in self.nets:
            raise TestbedError(f"unknown NET {net!r}: one of {', '.join(self.nets)} or none")
        port, sw = self.layout.switch_mn_port, self.ns(self.layout.switch)
        t0 = time.time()
        if net == "none":
            _run(["ip", "-batch", "-"], input=f"link set {port} down\nlink set {port} nomaster\n", ns=sw)
        elif gap > 0:
            _run(["ip", "-batch", "-"], input=f"link set {port} down\nlink set {port} master "
                                              f"{self.nets[net].bridge}\n", ns=sw)
            time.sleep(gap)
            _run(["ip", "link", "set", port, "up"], ns=sw)
        else:
            _run(["ip", "-batch", "-"], input=f"link set {port} down\nlink set {port} master "
                                              f"{self.nets[net].bridge}\nlink set {port} up\n", ns=sw)
        prev, self.attached = self.attached, (None if net == "none" else net)
        ev = {"t": round(t0, 3), "from": prev, "to": self.attached}
        self.moves.append(ev)
        if record:
            self.save()
        return ev

    def dhcp(self, timeout: float = 20) -> str:
        """Get a lease on the node's interface with pyroute2's DHCP client; returns "ADDR/LEN".

        For tests and manual use without the agent: old global addresses and
        the default route on the interface are flushed first; the client
        configures the address and default route and exits (no release).
        """
        mn, ifn = self.ns(self.layout.mn_node), self.layout.mn_if
        _run(["ip", "-force", "-batch", "-"], input=f"addr flush dev {ifn} scope global\n"
                                                    f"route flush dev {ifn}\n", ns=mn)
        cwd = self.dir / "run" / "dhcp-client"
        cwd.mkdir(parents=True, exist_ok=True)
        for f in cwd.glob("*.lease.json"):
            f.unlink()
        p = subprocess.run(["ip", "netns", "exec", mn, sys.executable, "-m", "pyroute2.dhcp.cli", ifn,
                            "-x", str(timeout), "-R", "--log-level", "WARNING"],
                           capture_output=True, text=True, cwd=cwd, timeout=timeout + 60)
        addrs = self.mn_addresses()
        if p.returncode or not addrs:
            raise TestbedError(f"no DHCP lease on {self.attached or 'a detached link'} within {timeout}s: "
                               f"{(p.stderr or p.stdout).strip()[-800:]}")
        return addrs[0]

    def static_address(self, host: int = 50) -> str:
        """Without DHCP: give the node address ``host`` of the attached net and its default route.

        Cheaper than ``dhcp()`` where a Python start is expensive (the VM);
        returns "ADDR/LEN". Old global addresses and routes are flushed first.
        """
        if not self.attached:
            raise TestbedError("the mobile node is not attached to any net")
        net = self.nets[self.attached]
        iface = ipaddress.IPv4Interface(f"{ipaddress.IPv4Network(net.prefix)[host]}/{net.prefixlen}")
        ifn = self.layout.mn_if
        _run(["ip", "-force", "-batch", "-"], input=f"addr flush dev {ifn} scope global\nroute flush dev {ifn}\n"
                                                    f"addr add {iface} dev {ifn}\n"
                                                    f"route add default via {net.router} dev {ifn}\n",
             ns=self.ns(self.layout.mn_node))
        return str(iface)

    def mn_addresses(self) -> list[str]:
        p = _run(["ip", "-j", "-4", "addr", "show", "dev", self.layout.mn_if], ns=self.ns(self.layout.mn_node),
                 check=False)
        if p.returncode:
            return []
        out = []
        for link in json.loads(p.stdout or "[]"):
            for a in link.get("addr_info", []):
                if a.get("scope") == "global":
                    out.append(f"{a['local']}/{a['prefixlen']}")
        return out

    # -- running things inside --------------------------------------------------------------------
    def exec(self, node: str, argv: list[str], check: bool = False, timeout: float = 60,
             input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` in a node's namespace; output captured as text."""
        p = subprocess.run(["ip", "netns", "exec", self.ns(node), *argv], capture_output=True, text=True,
                           timeout=timeout, input=input)
        if check and p.returncode:
            raise TestbedError(f"{node}: {' '.join(argv)} -> exit {p.returncode}: {(p.stderr or p.stdout).strip()}")
        return p

    def popen(self, node: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` in a node's namespace (the caller owns and stops it)."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns(node), *argv], **kw)

    def ping(self, node: str, dst: str, count: int = 1, wait: float = 2, *extra: str) -> bool:
        p = self.exec(node, ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(wait), *extra, dst],
                      timeout=count * (wait + 1) + 10)
        return p.returncode == 0

    def vpn_client(self, ipsec: str | None = None) -> Charon:
        """strongSwan as a VPN client in the node's namespace (connections home-psk and home-cert).

        Recorded like every other daemon, so ``down`` stops it. Not part of
        ``up``: the mobile node agent brings its own IKEv2 initiator.
        """
        if "charon-mn" in self.daemons and self.daemons["charon-mn"].alive():
            raise TestbedError("a VPN client already runs in the node's namespace")
        c = Charon(self.dir / "swan", self.ns(self.layout.mn_node), "mn", ipsec or self.ipsec or "libipsec")
        c.write_config()
        c.add_file(Path(self.files["mn_cert"]), "x509")
        c.add_file(Path(self.files["mn_key"]), "private")
        c.add_file(Path(self.files["ca"]), "x509ca")
        c.write_swanctl(client_swanctl(self.addr.gw_public, list(self.addr.internal_prefixes), self._psk(),
                                       PSK_ID, self.addr.gw_id, "mn.crt", CERT_ID, "ca.crt"))
        self.daemons["charon-mn"] = c.spawn()
        self.save()
        c.wait_ready()
        c.load_all()
        self.daemons["charon-mn"].ready = True
        self.save()
        return c

    def stop(self, name: str) -> bool:
        """Stop one recorded daemon (``"charon-mn"``, ``"i-ha"``, ``"dnsmasq-external-1"``...)."""
        d = self.daemons.get(name)
        if d is None:
            raise TestbedError(f"no daemon {name!r}: {', '.join(self.daemons)}")
        was = d.alive()
        procs.stop(d)
        d.ready = False
        d.note = "stopped"
        self.save()
        return was

    def restart(self, name: str, wait: float = 60) -> procs.Daemon:
        """Stop a daemon and start it again as it was (the gateway reloads its configuration).

        For the "gateway restarts" / "i-HA restarts" cases of the end-to-end suite.
        """
        d = self.daemons.get(name)
        if d is None:
            raise TestbedError(f"no daemon {name!r}: {', '.join(self.daemons)}")
        procs.stop(d)
        if name == "charon-gw":
            gw = self.gateway()
            self.daemons[name] = gw.spawn()
            self.save()
            gw.wait_ready(wait)
            gw.load_all()
            self.daemons[name].ready = True
        elif name.startswith("dnsmasq-"):
            self._start_dnsmasq(self.nets[d.extra["net"]])
            self._wait_dnsmasq(self.daemons[name], wait)
        elif name in ("i-ha", "i-fa", "mn-agent"):
            del self.daemons[name]
            role = "mn" if name == "mn-agent" else name[2:]
            if name == "mn-agent" and "--config" in d.argv and d.argv[d.argv.index("--config") + 1] == \
                    self.files.get("mn_cert_config"):
                role = "mn-cert"
            extra = d.argv[d.argv.index("--config") + 2:] if "--config" in d.argv else []
            self.start_agent(role, extra, wait=wait)
        else:
            raise TestbedError(f"{name} cannot be restarted by the testbed (start it again yourself)")
        self.save()
        return self.daemons[name]

    def impair(self, loss: float = 0.0, delay_ms: float = 0.0) -> None:
        """Packet loss (percent) and delay on the node's access link, both directions (netem).

        ``impair()`` with no arguments removes it. Needs sch_netem (the VM has it, this host does not).
        """
        for node, ifn in ((self.layout.switch, self.layout.switch_mn_port), (self.layout.mn_node, self.mn_if)):
            if loss or delay_ms:
                p = _run(["tc", "qdisc", "replace", "dev", ifn, "root", "netem", "loss", f"{loss}%",
                          "delay", f"{delay_ms}ms"], ns=self.ns(node), check=False)
                if p.returncode:
                    raise TestbedError(f"impairing the access link needs netem (sch_netem): {p.stderr.strip()}")
            else:
                _run(["tc", "qdisc", "del", "dev", ifn, "root"], ns=self.ns(node), check=False)   # none is fine

    # -- status -------------------------------------------------------------------------------------
    def status(self) -> dict:
        st = self.to_json()
        have = set(self.existing_namespaces())
        st["namespaces_present"] = sorted(have)
        st["namespaces_missing"] = sorted(set(self.namespaces.values()) - have)
        for name, d in self.daemons.items():
            st["daemons"][name]["alive"] = d.alive()
        if self.ns(self.layout.switch) in have:
            st["mn"]["attached"] = self.attachment()
            st["mn"]["addresses"] = self.mn_addresses()
        leases = {}
        for d in self.daemons.values():
            lf = d.extra.get("lease_file")
            if lf:
                try:
                    leases[d.extra["net"]] = [line.split()[1:4] for line in Path(lf).read_text().splitlines()
                                              if line.strip()]
                except (FileNotFoundError, IndexError):
                    leases[d.extra["net"]] = []
        st["leases"] = leases
        st["healthy"] = (not st["namespaces_missing"] and self.phase == "up"
                         and all(d.alive() for n, d in self.daemons.items() if d.ready))
        return st

    # -- down -----------------------------------------------------------------------------------
    def down(self, keep_state: bool = False) -> list[str]:
        """Stop every daemon by PID, kill what else runs inside, delete the namespaces, remove the state.

        Idempotent: a testbed that is not (or only partly) up is cleaned of
        whatever is left. Returns what it removed.
        """
        done = []
        for name, d in reversed(list(self.daemons.items())):
            if d.alive():
                procs.stop(d)
                done.append(f"stopped {name} (pid {d.pid})")
        present = self.existing_namespaces()
        for ns in present:
            procs.kill_netns(ns)
        if present:
            subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {n}\n" for n in present),
                           capture_output=True, text=True)
            done.append(f"deleted {len(present)} namespaces")
        left = self.existing_namespaces()
        self.phase = "down"
        if not keep_state and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
            done.append(f"removed {self.dir}")
            try:
                self.root.rmdir()   # only when no other testbed is left in it
            except OSError:
                pass
        elif keep_state and self.dir.exists():
            self.save()
        if left:
            raise TestbedError(f"could not delete namespaces: {', '.join(left)}")
        return done

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *exc) -> None:
        self.down()


def addresses_plan(layout: str = "figure1") -> str:
    """A human-readable address plan (used by ``mipmobike testbed plan``)."""
    lay = LAYOUTS[layout]()
    out = [f"layout {lay.name}", "", "access networks (NET for move):"]
    for n in lay.nets.values():
        extra = []
        if n.fa:
            extra.append(f"i-FA {n.fa}")
        if n.nat:
            extra.append(f"NAT to {n.nat}")
        if n.trusted:
            extra.append("trusted")
        out.append(f"  {n.name:<11} {n.prefix:<16} router {n.router:<14} DHCP "
                   f"{n.dhcp[0] + '-' + n.dhcp[1].split('.')[-1] if n.dhcp else '-':<20} "
                   f"{n.zone:<8} {', '.join(extra)}")
    a = lay.addr
    out += ["", "addresses:"]
    for k, v in vars(a).items():
        out.append(f"  {k:<18} {', '.join(v) if isinstance(v, tuple) else v}")
    out += ["", "nodes (namespace mmtb-<id>-<node>):"]
    for r, desc in lay.nodes.items():
        out.append(f"  {r:<5} {desc}")
    return "\n".join(out)
