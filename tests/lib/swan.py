"""strongSwan (charon-systemd + swanctl) instances in namespaces.

A ``Charon`` is one daemon with its own strongswan.conf, swanctl directory,
VICI socket and log, so several run side by side. ``ipsec`` picks the data
path: "kernel" (kernel ESP through kernel-netlink) where the kernel has ESP,
"libipsec" (userspace ESP on a TUN device; it only does ESP-in-UDP) where it
does not, as on the development host. ``Pki`` makes a CA and certificates
with strongSwan's ``pki`` tool.

    pki = Pki(dir); pki.ca(); pki.cert("gw", san=["gw.vpn.example", "192.0.2.1"])
    gw = Charon(dir, ns, "gw", procs, ipsec="libipsec", interfaces_use=["eth0"])
    gw.write_swanctl(gateway_conf(...)); gw.start(); gw.load_all()
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from agent.testbed.swan import Pki as _ProductPki
from agent.testbed.swan import SwanctlClient
from agent.testbed.swan import strongswan_conf

from .procs import Procs, wait_until
from .topo import Netns

CHARON = "/usr/sbin/charon-systemd"
SWANCTL_DIRS = ("x509", "x509ca", "x509aa", "x509ac", "x509crl", "x509ocsp", "private", "rsa", "ecdsa",
                "pkcs8", "pkcs12", "pubkey", "conf.d")


def kernel_has_esp() -> bool:
    """Whether the running kernel takes an ESP state (tried in a scratch namespace)."""
    from .names import unique
    ns = f"mmesp-{unique('e')}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        p = subprocess.run(["ip", "-n", ns, "xfrm", "state", "add", "src", "10.0.0.1", "dst", "10.0.0.2",
                            "proto", "esp", "spi", "0x100", "mode", "tunnel", "enc", "cbc(aes)", "0x" + "00" * 16,
                            "auth-trunc", "hmac(sha256)", "0x" + "00" * 32, "128"], capture_output=True)
        return p.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns])


class Pki(_ProductPki):
    """The testbed's pki wrapper (ECDSA P-256 or RSA CA and certificates, keys 0600), test org name."""

    def __init__(self, path: Path, org: str = "mipmobike-test") -> None:
        super().__init__(path, org)


class Charon(SwanctlClient):
    SWANCTL_TIMEOUT, INITIATE_TIMEOUT, INITIATE_SLACK = 60.0, 20, 10

    def __init__(self, base: Path, ns: Netns, name: str, procs: Procs, ipsec: str = "libipsec",
                 interfaces_use: list[str] | None = None, extra_conf: str = "") -> None:
        assert ipsec in ("libipsec", "kernel")
        self.dir = Path(base) / name
        self.ns, self.name, self.procs, self.ipsec = ns, name, procs, ipsec
        self.swanctl_dir = self.dir / "swanctl"
        self.conf = self.dir / "strongswan.conf"
        self.vici = self.dir / "charon.vici"
        self.log = self.dir / "charon.log"
        self.proc = None
        for d in SWANCTL_DIRS:
            (self.swanctl_dir / d).mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        self.conf.write_text(strongswan_conf(name, ns.name, self.vici, self.log, ipsec, interfaces_use,
                                             extra=extra_conf, log_append=False, detail=2))

    # -- configuration --------------------------------------------------------------
    def write_swanctl(self, text: str) -> None:
        (self.swanctl_dir / "swanctl.conf").write_text(text)

    def add_cert(self, cert: Path, key: Path | None = None, ca: Path | None = None) -> None:
        shutil.copy(cert, self.swanctl_dir / "x509" / Path(cert).name)
        if key:
            dst = self.swanctl_dir / "private" / Path(key).name
            shutil.copy(key, dst)
            dst.chmod(0o600)
        if ca:
            shutil.copy(ca, self.swanctl_dir / "x509ca" / Path(ca).name)

    def add_ca(self, ca: Path) -> None:
        shutil.copy(ca, self.swanctl_dir / "x509ca" / Path(ca).name)

    # -- process ----------------------------------------------------------------------
    def env(self) -> dict:
        return {"STRONGSWAN_CONF": str(self.conf), "SWANCTL_DIR": str(self.swanctl_dir)}

    def start(self, timeout: float = 30) -> None:
        if self.vici.exists():
            self.vici.unlink()
        self.proc = self.procs.start(f"charon-{self.name}", [CHARON], ns=self.ns.name, env=self.env())
        wait_until(lambda: self.vici.exists(), timeout, f"charon {self.name} VICI socket", proc=self.proc)
        wait_until(lambda: self.swanctl("--stats", check=False).returncode == 0, timeout,
                   f"charon {self.name} answering VICI", proc=self.proc)

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]


def gateway_swanctl(local_addr: str, local_ts: list[str], pool: str, psk: str | None = None,
                    psk_remote_id: str = "mn-psk@vpn.example", gw_id: str = "gw.vpn.example",
                    cert: str | None = None, ca: str | None = None, mobike: bool = True,
                    proposals: str = "default", esp_proposals: str = "default", dpd: str = "30s") -> str:
    """swanctl.conf for a road-warrior gateway: a PSK connection, a certificate one, or both."""
    conns = []
    common = f"""
            version = 2
            local_addrs = {local_addr}
            mobike = {'yes' if mobike else 'no'}
            pools = rw_pool
            proposals = {proposals}
            dpd_delay = {dpd}"""
    child = f"""
            children {{
                lan {{
                    local_ts = {', '.join(local_ts)}
                    esp_proposals = {esp_proposals}
                    dpd_action = clear
                }}
            }}"""
    if psk:
        conns.append(f"""
        rw-psk {{{common}
            local {{
                auth = psk
                id = {gw_id}
            }}
            remote {{
                auth = psk
                id = {psk_remote_id}
            }}{child}
        }}""")
    if cert:
        conns.append(f"""
        rw-cert {{{common}
            send_certreq = yes
            local {{
                auth = pubkey
                certs = {cert}
                id = {gw_id}
            }}
            remote {{
                auth = pubkey
                cacerts = {ca}
                id = %any
            }}{child}
        }}""")
    secrets = f"""
secrets {{
    ike-rw {{
        id-gw = {gw_id}
        id-mn = {psk_remote_id}
        secret = "{psk}"
    }}
}}
""" if psk else ""
    return f"connections {{{''.join(conns)}\n}}\npools {{\n    rw_pool {{\n        addrs = {pool}\n    }}\n}}\n{secrets}"


def client_swanctl(remote_addr: str, remote_ts: list[str], psk: str, local_id: str = "mn-psk@vpn.example",
                   gw_id: str = "gw.vpn.example") -> str:
    """swanctl.conf for strongSwan as the road-warrior client (PSK, virtual IP)."""
    return f"""connections {{
    home {{
        version = 2
        remote_addrs = {remote_addr}
        vips = 0.0.0.0
        mobike = yes
        keyingtries = 1
        local {{
            auth = psk
            id = {local_id}
        }}
        remote {{
            auth = psk
            id = {gw_id}
        }}
        children {{
            home {{
                remote_ts = {', '.join(remote_ts)}
                start_action = none
            }}
        }}
    }}
}}
secrets {{
    ike-home {{
        id-gw = {gw_id}
        id-mn = {local_id}
        secret = "{psk}"
    }}
}}
"""
