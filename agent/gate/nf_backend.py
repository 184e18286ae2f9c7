"""The gate in netfilter, for hosts where the BPF gate cannot run.

Same states, same admitted traffic, same allow-list: the rules match the
agent's ipset directly (``-m set --match-set mipmobike-<instance>``), so the
set an operator sees with ``ipset list`` is what the kernel enforces.

Per gated interface (ifindex N) there are two chains per family, reached by a
rule inserted first in the base chain and tagged with a comment:

    raw    PREROUTING   -i IF -j mmb-<instance>-N-in     ingress
    mangle POSTROUTING  -o IF -j mmb-<instance>-N-out    egress (local and forwarded)

(an instance name longer than 10 characters is replaced by a hash in chain names)

(ip6tables gets the same chains; closed lets only neighbour discovery
through.) Each rule in those chains carries a comment "pass <reason>" or
"drop <reason>"; its packet counter is the reason's counter. The state is the
first rule: "state open" / "state off" RETURN, absent when closed. Rules are
kernel state: they outlive the agent (fail-closed) and a restarted agent reads
the state back from them.

Differences from the BPF gate, inherent to netfilter: ARP is never filtered
(iptables does not see it; it is always allowed anyway) and not counted;
packets sent on AF_PACKET sockets (a raw DHCP client, for instance) bypass
iptables entirely; non-first IPv4 fragments are dropped (the BPF gate admits
those to and from allowed peers) unless conntrack reassembles them first.
Like the BPF gate's TC ingress program, the ingress chain admits packets an
IPsec SA decrypted (``-m policy --dir in --pol ipsec``): tunnel mode brings
the inner packet through PREROUTING of the same device a second time. The
egress chain sees a packet an SA will encrypt before and after: the plain one
passes as "ipsec" (``--dir out``), the ESP it becomes is judged as ESP. Where
the kernel has no policy match (xt_policy) the rule is left out and a warning
says so. The last rule of each chain names the layout ("rules v2"). Attaching
and every state change check all chains, jumps and versions of both families
and finish or refill what is off (a build cut off between commits, another
version's chains); state rules are swapped chain by chain, so a change cut
off between families is finished by the next. netfilter matches interfaces by
name while the chains are per ifindex: every operation moves the jumps of all
of the instance's links to the names their ifindexes have now (a rename, two
links swapping names, a new link taking a gone one's name). Without IPv6
in the kernel only the IPv4 chains are made; with IPv6 but no usable ip6tables
IPv4 is gated before the error is raised.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import subprocess

from .defs import DROP_REASONS, PASS_REASONS, GateError, GateState, empty_counters
from .steer import DETECT_MARK

log = logging.getLogger("mipmobike.gate")

# The rules' layout version, written as the last rule of every chain ("rules v2"): chains an agent of
# another version left behind (a crash skips destroy) are rebuilt on adoption, keeping their state.
# 2: the "pass ipsec" rule.
RULES_VERSION = 2
TABLE_IN, BASE_IN = "raw", "PREROUTING"
TABLE_OUT, BASE_OUT = "mangle", "POSTROUTING"
_RULE_RE = re.compile(r'^\[(\d+):(\d+)\] -A (\S+) (.*)$')
_COMMENT_RE = re.compile(r'--comment (?:"([^"]*)"|(\S+))')
_VERSION_RE = re.compile(r"^rules v(\d+)")
# Linux allows nearly anything in an interface name; iptables-restore's line syntax does not: a quote
# or a backslash would end a comment early (a jump without its target), whitespace splits a word, and
# a trailing "+" is iptables' wildcard. Such names are refused (loudly) instead of written.
_UNSAFE_IFNAME = re.compile(r'["\\\'\s]|\+$')


def _check_ifname(ifname: str) -> None:
    if _UNSAFE_IFNAME.search(ifname):
        raise GateError(f"interface name {ifname!r} cannot be written into netfilter rules safely (a quote, "
                        f"backslash, space or trailing '+'): rename it, or use the BPF gate")


class NetfilterBackend:
    name = "netfilter"

    def __init__(self, instance: str, ipset_name: str, *, rrq_mark: int | None = None,
                 rrq_mask: int = 0xFFFFFFFF) -> None:
        for tool in ("iptables-restore", "iptables-save", "ip6tables-restore", "ip6tables-save"):
            if shutil.which(tool) is None:
                raise GateError(f"netfilter gate needs {tool}, which is not installed")
        self.instance = instance
        self.ipset = ipset_name
        # the mark is written into the rules of interfaces attached from now on
        self.rrq_mark = DETECT_MARK if rrq_mark is None else rrq_mark
        self.rrq_mask = rrq_mask
        self.tag = f"mipmobike-gate:{instance}"
        # chain names are limited to 28 characters: long instance names are hashed
        short = instance if len(instance) <= 10 else hashlib.sha256(instance.encode()).hexdigest()[:10]
        self.prefix = f"mmb-{short}-"
        # "-m policy" needs xt_policy in the kernel; without it the rule is left out (still fail-closed:
        # what an SA decrypted then waits for the verdict like other traffic)
        self.ipsec = True
        # IPv6 absent from the kernel (ipv6.disable=1): nothing to gate there, and ip6tables cannot work
        self.families = (4, 6) if os.path.exists("/proc/thread-self/net/if_inet6") else (4,)
        self.adopted = bool(self.states())

    # -- helpers -----------------------------------------------------------
    def _chain(self, ifindex: int, direction: str) -> str:
        return f"{self.prefix}{ifindex}-{direction}"

    @staticmethod
    def _comment(spec: str) -> str | None:
        m = _COMMENT_RE.search(spec)
        return None if m is None else (m.group(1) if m.group(1) is not None else m.group(2))

    @staticmethod
    def _run(argv: list[str], input: str | None = None) -> str:
        p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
        if p.returncode:
            raise GateError(f"{argv[0]} failed: {(p.stderr or p.stdout).strip()}")
        return p.stdout

    def _restore(self, family: int, text: str) -> None:
        tool = "iptables-restore" if family == 4 else "ip6tables-restore"
        self._run([tool, "-w", "--noflush"], input=text)

    def _save(self, family: int, table: str) -> list[tuple[int, int, str, str]]:
        tool = "iptables-save" if family == 4 else "ip6tables-save"
        out = []
        for line in self._run([tool, "-c", "-t", table]).splitlines():
            m = _RULE_RE.match(line)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)))
        return out

    # -- rule text ---------------------------------------------------------
    def _jump(self, ifname: str, ifindex: int, direction: str) -> str:
        base, opt = (BASE_IN, "-i") if direction == "in" else (BASE_OUT, "-o")
        return (f"{base} {opt} {ifname} -m comment --comment \"{self.tag}:{ifname}\" "
                f"-j {self._chain(ifindex, direction)}")

    def _insert_jump(self, ifname: str, ifindex: int, direction: str) -> str:
        """The restore line putting the jump first in its base chain."""
        b, rest = self._jump(ifname, ifindex, direction).split(" ", 1)
        return f"-I {b} 1 {rest}"

    def _rules4(self, chain: str, direction: str) -> list[str]:
        eg = direction == "out"
        peer = "dst,dst" if eg else "src,src"
        s = f"-m set --match-set {self.ipset} {peer}"
        dhcp = "--sport 68 --dport 67" if eg else "--sport 67 --dport 68"
        ike = f"-m multiport {'--dports' if eg else '--sports'} 500,4500"
        # IPsec: an SA decrypted it (tunnel mode brings the inner packet through PREROUTING of the same
        # device again), or an SA is about to encrypt it (POSTROUTING sees it before and after; the ESP
        # that results still has to pass "esp")
        r = [self._ipsec_rule(direction)] if self.ipsec else []
        r += [f"-p udp {dhcp} -m comment --comment \"pass dhcp\" -j RETURN",
             "-p icmp --icmp-type 9 -m comment --comment \"pass rdisc\" -j RETURN",
             "-p icmp --icmp-type 10 -m comment --comment \"pass rdisc\" -j RETURN",
             f"-p udp {s} {ike} -m comment --comment \"pass ike\" -j RETURN"]
        if eg and self.rrq_mark:
            r += [f"-p udp {s} -m mark --mark {self.rrq_mark:#x}/{self.rrq_mask:#x} "
                  f"-m comment --comment \"pass mip\" -j RETURN",
                  f"-p udp {s} -m comment --comment \"drop mip_nomark\" -j DROP"]
        else:
            r += [f"-p udp {s} -m comment --comment \"pass mip\" -j RETURN"]
        r += [f"-p esp {s} -m comment --comment \"pass esp\" -j RETURN",
              f"-f -m comment --comment \"drop frag\" -j DROP",
              f"{s} -m comment --comment \"pass allow\" -j RETURN",
              "-p icmp -m comment --comment \"drop icmp\" -j DROP",
              "-p tcp -m comment --comment \"drop tcp\" -j DROP",
              "-p udp -m comment --comment \"drop udp\" -j DROP",
              "-m comment --comment \"drop other_ip\" -j DROP",
              self._version_rule()]
        return [f"-A {chain} {x}" for x in r]

    def _rules6(self, chain: str, direction: str) -> list[str]:
        r = [self._ipsec_rule(direction)] if self.ipsec else []
        r += [f"-p ipv6-icmp -m icmp6 --icmpv6-type {t} -m comment --comment \"pass nd\" -j RETURN"
              for t in (133, 134, 135, 136)]
        r += ["-m comment --comment \"drop ipv6\" -j DROP", self._version_rule()]
        return [f"-A {chain} {x}" for x in r]

    @staticmethod
    def _ipsec_rule(direction: str) -> str:
        return f"-m policy --dir {direction} --pol ipsec -m comment --comment \"pass ipsec\" -j RETURN"

    def _version_rule(self) -> str:
        # no target: never reached after "drop other_ip"/"drop ipv6", only read back
        return f"-m comment --comment \"rules v{RULES_VERSION}{'' if self.ipsec else ' no-ipsec'}\""

    @staticmethod
    def _state_rule(chain: str, state: GateState) -> str | None:
        if state == GateState.CLOSED:
            return None
        return f"{chain} -m comment --comment \"state {state.value}\" -j RETURN"

    # -- state ---------------------------------------------------------------
    def _parsed(self) -> dict[int, dict]:
        """ifindex -> {"ifname", "state", "rules": [(pk, bytes, chain, spec)]} from the v4 tables."""
        out: dict[int, dict] = {}
        rules = self._save(4, TABLE_IN) + self._save(4, TABLE_OUT)
        prefix = self.prefix
        for pk, by, chain, spec in rules:
            if chain in (BASE_IN, BASE_OUT) and f"{self.tag}:" in spec:
                m = re.search(r"-j (" + re.escape(prefix) + r"(\d+)-(in|out))", spec)
                n = re.search(r'-[io] (\S+)', spec)
                if m and n:
                    out.setdefault(int(m.group(2)), {"rules": []})["ifname"] = n.group(1)
        for pk, by, chain, spec in rules:
            if chain.startswith(prefix):
                try:
                    idx = int(chain[len(prefix):].rsplit("-", 1)[0])
                except ValueError:
                    continue
                out.setdefault(idx, {"rules": []})["rules"].append((pk, by, chain, spec))
        for idx, d in out.items():
            d["state"] = GateState.CLOSED
            for _, _, chain, spec in d["rules"]:
                c = self._comment(spec) or ""
                if c.startswith("state "):
                    d["state"] = GateState(c[len("state "):])
        return out

    def states(self) -> dict[int, GateState]:
        return {i: d["state"] for i, d in self._parsed().items() if "ifname" in d}

    # One look at the tables per operation: iptables-save of each (family, table) once, parsed here.
    def _snapshot(self) -> tuple[dict, GateError | None]:
        """{(family, table): {"rules": [(chain, spec)], "chains": {names}}}; an ip6tables that cannot even
        list (no ip6 tables in this kernel) is returned as the error, after IPv4's tables, so that IPv4
        is still gated before it is raised."""
        snap: dict = {}
        for family in self.families:
            for table in (TABLE_IN, TABLE_OUT):
                try:
                    saved = self._run(["iptables-save" if family == 4 else "ip6tables-save", "-c", "-t", table])
                except GateError as e:
                    if family == 4:
                        raise
                    return snap, e
                snap[(family, table)] = {
                    "rules": [(m.group(3), m.group(4)) for m in map(_RULE_RE.match, saved.splitlines()) if m],
                    "chains": {line[1:].split()[0] for line in saved.splitlines() if line.startswith(":")}}
        return snap, None

    def _jumps(self, rules: list) -> list[tuple[str, str, str | None, int]]:
        """(base chain, spec, interface name, ifindex) of every jump into this instance's chains."""
        out = []
        pat = re.compile(r"-j " + re.escape(self.prefix) + r"(\d+)-(?:in|out)$")
        for c, spec in rules:
            m = pat.search(spec) if c in (BASE_IN, BASE_OUT) else None
            if m:
                n = re.search(r"-[io] (\S+)", spec)
                out.append((c, spec, n.group(1) if n else None, int(m.group(1))))
        return out

    def _fix_jumps(self, jumps: list, names: dict[int, str], direction: str) -> list[str]:
        """Restore lines that make every jump into this instance's chains of ``direction`` name the
        interface that now has the chain's ifindex: the right jump added first, wrong ones deleted (a
        renamed link, two links that swapped names, a link gone whose name a new one took). netfilter
        matches by name; the chains are per ifindex."""
        base = BASE_IN if direction == "in" else BASE_OUT
        jumps = [j for j in jumps if j[0] == base]
        add, delete = [], []
        for idx in sorted({j[3] for j in jumps}):
            want = names.get(idx)
            mine = [j for j in jumps if j[3] == idx]
            if want is not None and _UNSAFE_IFNAME.search(want):
                # renamed to a name the rules cannot carry: its jumps stay as they are (its own
                # operations fail loudly), the other links' fixes go ahead
                log.warning("gate: interface %r (index %d) cannot be matched by netfilter rules", want, idx)
                continue
            if want is not None and not any(j[2] == want for j in mine):
                add.append(self._insert_jump(want, idx, direction))
            delete += [f"-D {j[0]} {j[1]}" for j in mine if j[2] != want]
        return add + delete

    def _view(self, snap: dict, ifindex: int, ifname: str, names: dict[int, str]) -> dict:
        """Per (family, direction) of ``ifindex``: chain present, its rules version, its state rules,
        one jump naming ``ifname``, and whether any jump of the table needs fixing."""
        out = {}
        for (family, table), t in snap.items():
            direction = "in" if table == TABLE_IN else "out"
            chain = self._chain(ifindex, direction)
            version, states = None, []
            for c, spec in t["rules"]:
                if c != chain:
                    continue
                com = self._comment(spec) or ""
                v = _VERSION_RE.match(com)
                if v:
                    version = int(v.group(1))
                elif com.startswith("state "):
                    states.append((spec, com[len("state "):]))
            jumps = self._jumps(t["rules"])
            own = [j for j in jumps if j[3] == ifindex]
            out[(family, direction)] = {
                "table": table, "name": chain, "chain": chain in t["chains"], "version": version, "states": states,
                "jump": len(own) == 1 and own[0][2] == ifname, "any_jump": bool(own),
                "fix": self._fix_jumps(jumps, names, direction)}
        return out

    @staticmethod
    def _complete(view: dict) -> bool:
        return all(v["chain"] and v["jump"] and not v["fix"] and v["version"] == RULES_VERSION
                   for v in view.values())

    def attach(self, ifname: str, ifindex: int, state: GateState) -> None:
        self._ensure(ifname, ifindex, state, must_exist=False)

    def set_state(self, ifname: str, ifindex: int, state: GateState) -> None:
        self._ensure(ifname, ifindex, state, must_exist=True)

    def _ensure(self, ifname: str, ifindex: int, state: GateState, must_exist: bool) -> None:
        """Put ``ifindex`` in ``state``: refill what is off (a build cut off between commits, another
        version's chains, jumps naming the wrong interface) or else swap the state rules, chain by
        chain (a state change cut off between families is finished the same way)."""
        _check_ifname(ifname)
        snap, v6_error = self._snapshot()
        view = self._view(snap, ifindex, ifname, dict(socket.if_nameindex()))
        if must_exist and not any(v["any_jump"] for v in view.values()):
            raise GateError(f"gate is not attached to {ifname}")
        if self._complete(view):
            self._swap_state(view, state)
        else:
            if any(v["chain"] or v["any_jump"] for v in view.values()):
                log.warning("gate: %s: rebuilding netfilter chains (%s)", ifname, "; ".join(
                    f"v{f} {d}: chain {'yes' if v['chain'] else 'no'}, jump {'ok' if v['jump'] else 'no'}"
                    + (f", {len(v['fix'])} jump fixes" if v["fix"] else "") + f", rules v{v['version']}"
                    for (f, d), v in view.items()))
            for family in sorted({f for f, _ in view}):
                # ingress first: a new link is closed both ways before anything it sends is judged
                for direction in ("in", "out"):
                    v = view[(family, direction)]
                    self._build(family, v["table"], ifname, ifindex, direction, state, jump=not v["any_jump"],
                                fix=v["fix"])
        if v6_error is not None:
            raise GateError(f"{ifname}: IPv4 gated, IPv6 not: {v6_error}")

    def _swap_state(self, view: dict, state: GateState) -> None:
        """Every chain's state rules replaced by ``state``'s (none for closed): closing starts with
        egress, opening with ingress. A chain already right is left alone."""
        order = ("out", "in") if state == GateState.CLOSED else ("in", "out")
        for family in sorted({f for f, _ in view}):
            text = []
            for direction in order:
                v = view[(family, direction)]
                want = [] if state == GateState.CLOSED else [state.value]
                if [st for _, st in v["states"]] == want:
                    continue
                chain = v["name"]
                text.append(f"*{v['table']}")
                text += [f"-D {chain} {spec}" for spec, _ in v["states"]]
                new = self._state_rule(chain, state)
                if new:
                    c, rest = new.split(" ", 1)
                    text.append(f"-I {c} 1 {rest}")
                text.append("COMMIT")
            if text:
                self._restore(family, "\n".join(text) + "\n")

    def _policy_match(self, family: int) -> bool:
        """Can this kernel's netfilter use the IPsec policy match (xt_policy)? A scratch chain tells."""
        chain = f"{self.prefix}probe"
        try:
            self._restore(family, f"*{TABLE_IN}\n:{chain} - [0:0]\n"
                                  f"-A {chain} -m policy --dir in --pol ipsec -j RETURN\nCOMMIT\n")
            return True
        except GateError:
            return False
        finally:
            try:
                self._restore(family, f"*{TABLE_IN}\n:{chain} - [0:0]\n-X {chain}\nCOMMIT\n")
            except GateError:
                pass

    def _chain_text(self, family: int, table: str, ifname: str, ifindex: int, direction: str,
                    state: GateState, jump: bool, fix=()) -> str:
        chain = self._chain(ifindex, direction)
        text = [f"*{table}", f":{chain} - [0:0]"]        # declaring an existing chain flushes it
        sr = self._state_rule(chain, state)
        if sr:
            text.append(f"-A {sr}")
        text += self._rules4(chain, direction) if family == 4 else self._rules6(chain, direction)
        if jump:
            text.append(self._insert_jump(ifname, ifindex, direction))
        text += list(fix)                                  # jumps fixed in the same commit
        text.append("COMMIT")
        return "\n".join(text) + "\n"

    def _build(self, family: int, table: str, ifname: str, ifindex: int, direction: str,
               state: GateState, jump: bool, fix=()) -> None:
        """One table's chain in one commit; without xt_policy in the kernel, again without the ipsec rule."""
        try:
            self._restore(family, self._chain_text(family, table, ifname, ifindex, direction, state, jump, fix))
        except GateError as first:
            if not self.ipsec or self._policy_match(family):
                raise                       # not the policy match: the real error
            self.ipsec = False
            try:
                self._restore(family, self._chain_text(family, table, ifname, ifindex, direction, state, jump,
                                                       fix))
            except GateError:
                self.ipsec = True
                raise first from None
            log.warning("gate: netfilter has no IPsec policy match here (%s); the gate rules leave it out: "
                        "what an SA decrypts waits for the verdict like other traffic", first)

    def counters(self, ifname: str, ifindex: int) -> dict:
        out = empty_counters()
        out["egress"]["pass"]["arp"] = out["ingress"]["pass"]["arp"] = None   # not seen by iptables
        found = False
        for family in self.families:
            for direction, table in (("in", TABLE_IN), ("out", TABLE_OUT)):
                chain = self._chain(ifindex, direction)
                d = out["ingress" if direction == "in" else "egress"]
                for pk, _by, c, spec in self._save(family, table):
                    if c != chain:
                        continue
                    found = True
                    com = self._comment(spec)
                    if not com:
                        continue
                    kind, _, reason = com.partition(" ")
                    if kind == "state":
                        if reason == "open":
                            d["pass"]["open"] += pk
                    elif kind in ("pass", "drop") and reason in (PASS_REASONS if kind == "pass" else DROP_REASONS):
                        d[kind][reason] += pk
        if not found:
            raise GateError(f"gate is not attached to {ifname}")
        return out

    def detach(self, ifname: str, ifindex: int) -> None:
        for family in self.families:
            text = []
            for direction, table in (("in", TABLE_IN), ("out", TABLE_OUT)):
                chain = self._chain(ifindex, direction)
                rules = self._save(family, table)
                if not any(c == chain for _, _, c, _ in rules) and not any(
                        f"-j {chain}" in s for _, _, _, s in rules):
                    continue
                text.append(f"*{table}")
                for _, _, c, spec in rules:
                    if c in (BASE_IN, BASE_OUT) and spec.endswith(f"-j {chain}"):
                        text.append(f"-D {c} {spec}")
                text.append(f":{chain} - [0:0]")
                text.append(f"-X {chain}")
                text.append("COMMIT")
            if text:
                self._restore(family, "\n".join(text) + "\n")

    def forget(self, ifindex: int) -> None:
        self.detach(f"#{ifindex}", ifindex)

    def sync_allowed(self, entries) -> None:
        pass    # the rules read the ipset itself

    def release(self) -> None:
        pass

    def destroy(self) -> None:
        pass
