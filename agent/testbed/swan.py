"""strongSwan for the testbed: charon-systemd instances in namespaces, PKI, swanctl.conf.

Each ``Charon`` has its own strongswan.conf, swanctl directory, VICI socket
and log file, so several instances (the gateway, a client in the mobile
node's namespace, another testbed's) run side by side. ``ipsec`` chooses the
data path: ``"kernel"`` (kernel ESP through kernel-netlink) where the kernel
has ESP, ``"libipsec"`` (strongSwan's userspace ESP on a TUN device, which
only does ESP-in-UDP) where it does not.
"""

from __future__ import annotations

import os
import socket
import subprocess
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import procs
from .nsenter import netns

CHARON = "/usr/sbin/charon-systemd"
PKI_CONF = "pki {\n    load = random drbg nonce pem pkcs1 pkcs8 x509 pubkey sha1 sha2 openssl\n}\n"
SWANCTL_DIRS = ("x509", "x509ca", "x509aa", "x509ac", "x509crl", "x509ocsp", "private", "rsa", "ecdsa",
                "pkcs8", "pkcs12", "pubkey", "conf.d")


class SwanError(RuntimeError):
    pass


def kernel_has_esp(ns: str) -> bool:
    """Whether the kernel takes an ESP state (tried inside namespace ``ns``, then removed)."""
    rel = os.uname().release
    if any(Path(f"/lib/modules/{rel}/kernel/net/ipv4").glob("esp4.ko*")):
        subprocess.run(["modprobe", "-q", "-a", "esp4", "xfrm_user", "xfrm4_tunnel"], capture_output=True)
    sel = "src 10.255.255.1 dst 10.255.255.2 proto esp spi 0x100"
    batch = (f"xfrm state add {sel} mode tunnel enc cbc(aes) 0x{'00' * 16} auth-trunc hmac(sha256) "
             f"0x{'00' * 32} 128\nxfrm state delete {sel}\n")
    with netns(ns):
        p = subprocess.run(["ip", "-batch", "-"], input=batch, capture_output=True, text=True)
    return p.returncode == 0


class Pki:
    """An ECDSA P-256 CA and certificates made with strongSwan's ``pki`` (keys mode 0600)."""

    def __init__(self, path: Path, org: str = "mipmobike testbed") -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.org = org
        (self.path / "strongswan.conf").write_text(PKI_CONF)

    def _pki(self, *args: str) -> bytes:
        env = dict(os.environ, STRONGSWAN_CONF=str(self.path / "strongswan.conf"))
        p = subprocess.run(["pki", *args], capture_output=True, env=env, timeout=120)
        if p.returncode:
            raise SwanError(f"pki {args[0]}: {p.stderr.decode(errors='replace').strip()}")
        return p.stdout

    def _write_key(self, name: str, type_: str = "ecdsa") -> Path:
        if type_ not in ("ecdsa", "rsa"):
            raise SwanError(f"key type {type_!r}: want ecdsa or rsa")
        k = self.path / f"{name}.key"
        data = self._pki("--gen", "--type", type_, "--size", "256" if type_ == "ecdsa" else "2048",
                         "--outform", "pem")
        fd = os.open(k, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(k, 0o600)
        return k

    key = _write_key

    def _ca_dn(self, name: str) -> str:
        return f"C=XX, O={self.org}, CN={self.org} {'CA' if name == 'ca' else name}"

    def ca(self, name: str = "ca", type_: str = "ecdsa") -> Path:
        k = self._write_key(name, type_)
        c = self.path / f"{name}.crt"
        c.write_bytes(self._pki("--self", "--ca", "--lifetime", "3650", "--in", str(k), "--type", type_,
                                "--dn", self._ca_dn(name), "--outform", "pem"))
        return c

    def cert(self, name: str, san: list[str], flag: str = "serverAuth", ca: str = "ca",
             key: Path | None = None, type_: str = "ecdsa") -> Path:
        k = key or self._write_key(name, type_)
        c = self.path / f"{name}.crt"
        args = ["--issue", "--cacert", str(self.path / f"{ca}.crt"), "--cakey", str(self.path / f"{ca}.key"),
                "--type", "priv", "--in", str(k), "--dn", f"C=XX, O={self.org}, CN={san[0]}",
                "--flag", flag, "--lifetime", "825", "--outform", "pem"]
        for s in san:
            args += ["--san", s]
        c.write_bytes(self._pki(*args))
        return c

    def make(self, certs: list[tuple[str, list[str], str]]) -> None:
        """A CA ("ca") and one certificate per (name, SANs, flag), the pki runs side by side."""
        with ThreadPoolExecutor(max_workers=4) as ex:
            keys = dict(zip(["ca"] + [c[0] for c in certs],
                            ex.map(self._write_key, ["ca"] + [c[0] for c in certs])))
            self.path.joinpath("ca.crt").write_bytes(self._pki(
                "--self", "--ca", "--lifetime", "3650", "--in", str(keys["ca"]), "--type", "ecdsa",
                "--dn", self._ca_dn("ca"), "--outform", "pem"))
            list(ex.map(lambda c: self.cert(c[0], c[1], c[2], key=keys[c[0]]), certs))


def strongswan_conf(name: str, ns: str, vici: Path, log: Path, ipsec: str,
                    interfaces_use: list[str] | None = None, *, extra: str = "", log_append: bool = True,
                    detail: int = 1) -> str:
    """strongswan.conf of one private charon instance: explicit plugin list (kernel-libipsec in front
    of kernel-netlink when the kernel has no ESP), its own VICI socket and file log, roam events on.
    ``detail`` is the knl/cfg log level; ``extra`` goes inside the charon section."""
    plugins = ("random nonce openssl aes sha1 sha2 hmac gcm xcbc kdf pem pkcs1 pkcs8 x509 revocation "
               "constraints pubkey curve25519 "
               + ("kernel-libipsec kernel-netlink" if ipsec == "libipsec" else "kernel-netlink")
               + " socket-default updown vici")
    use = f"interfaces_use = {', '.join(interfaces_use)}" if interfaces_use else ""
    libipsec = ("kernel-libipsec {\n                allow_peer_ts = no\n            }"
                if ipsec == "libipsec" else "")
    return textwrap.dedent(f"""\
        # written by mipmobike: charon '{name}' in namespace {ns} ({ipsec} ESP)
        charon {{
            load = {plugins}
            {use}
            install_routes = yes
            install_virtual_ip = yes
            routing_table = 220
            routing_table_prio = 220
            retransmit_timeout = 1.0
            retransmit_base = 1.4
            retransmit_tries = 3
            plugins {{
                vici {{
                    socket = unix://{vici}
                }}
                {libipsec}
                kernel-netlink {{
                    roam_events = yes
                }}
                socket-default {{
                    use_ipv6 = no
                }}
            }}
            filelog {{
                main {{
                    path = {log}
                    time_format = %T
                    time_add_ms = yes
                    ike_name = yes
                    append = {'yes' if log_append else 'no'}
                    flush_line = yes
                    default = 1
                    ike = 2
                    knl = {detail}
                    cfg = {detail}
                }}
            }}
        {{EXTRA}}
        }}
        charon-systemd {{
            journal {{
                default = -1
            }}
        }}
        swanctl {{
            socket = unix://{vici}
            load = random nonce pem pkcs1 pkcs8 x509 pubkey openssl sha1 sha2
        }}
        """).replace("{EXTRA}", textwrap.indent(extra, "    "))


class SwanctlClient:
    """``swanctl`` against one charon's VICI socket (a Unix socket: usable from any namespace).

    The class using it has ``name``, ``vici``, ``env()`` and ``log_tail()``; ``SWANCTL_TIMEOUT`` and
    ``INITIATE_SLACK`` tune how long a call may take beyond its own ``--timeout``."""

    SWANCTL_TIMEOUT = 90.0
    INITIATE_TIMEOUT = 30
    INITIATE_SLACK = 30

    def swanctl(self, *args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ, **self.env())
        p = subprocess.run(["swanctl", *args, "--uri", f"unix://{self.vici}"],
                           capture_output=True, text=True, env=env, timeout=timeout or self.SWANCTL_TIMEOUT)
        if check and p.returncode:
            raise SwanError(f"swanctl {' '.join(args)} ({self.name}): {(p.stdout + p.stderr).strip()}\n"
                            f"--- charon log ---\n{self.log_tail()}")
        return p

    def load_all(self) -> None:
        """``swanctl --load-all``, refusing its silent success on an unparsable swanctl.conf."""
        p = self.swanctl("--load-all", "--noprompt")
        out = p.stdout + p.stderr
        if "invalid config file" in out or "loaded connection" not in out:
            raise SwanError(f"swanctl --load-all ({self.name}) loaded no connection: {out.strip()}")

    def initiate(self, child: str, ike: str | None = None, timeout: int | None = None) -> subprocess.CompletedProcess:
        timeout = timeout or self.INITIATE_TIMEOUT
        args = ["--initiate", "--child", child, "--timeout", str(timeout)]
        if ike:
            args += ["--ike", ike]
        return self.swanctl(*args, timeout=timeout + self.INITIATE_SLACK)

    def list_sas(self) -> str:
        """``swanctl --list-sas`` as the daemon reports it."""
        return self.swanctl("--list-sas").stdout


class Charon(SwanctlClient):
    """One charon-systemd in a namespace with private configuration, socket and log."""

    def __init__(self, base: Path, ns: str, name: str, ipsec: str,
                 interfaces_use: list[str] | None = None) -> None:
        if ipsec not in ("kernel", "libipsec"):
            raise ValueError(f"ipsec backend must be 'kernel' or 'libipsec', got {ipsec!r}")
        self.dir = Path(base) / name
        self.ns, self.name, self.ipsec = ns, name, ipsec
        self.interfaces_use = interfaces_use
        self.swanctl_dir = self.dir / "swanctl"
        self.conf = self.dir / "strongswan.conf"
        self.vici = self.dir / "charon.vici"
        self.log = self.dir / "charon.log"
        self.daemon: procs.Daemon | None = None

    def write_config(self) -> None:
        for d in SWANCTL_DIRS:
            (self.swanctl_dir / d).mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        self.conf.write_text(strongswan_conf(self.name, self.ns, self.vici, self.log, self.ipsec,
                                             self.interfaces_use))

    def write_swanctl(self, text: str) -> None:
        p = self.swanctl_dir / "swanctl.conf"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # holds the PSK
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def add_file(self, src: Path, kind: str) -> None:
        """Copy a certificate (kind x509 / x509ca) or private key (kind private, mode 0600)."""
        dst = self.swanctl_dir / kind / Path(src).name
        data = Path(src).read_bytes()
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if kind == "private" else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def env(self) -> dict:
        return {"STRONGSWAN_CONF": str(self.conf), "SWANCTL_DIR": str(self.swanctl_dir)}

    def spawn(self) -> procs.Daemon:
        if self.vici.exists():
            self.vici.unlink()
        self.daemon = procs.spawn(f"charon-{self.name}", self.ns, [CHARON], str(self.dir / "stdout.log"),
                                  env=self.env())
        return self.daemon

    def wait_ready(self, timeout: float = 60) -> None:
        """Until charon accepts connections on its VICI socket (no helper process polled)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.vici.exists():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(str(self.vici))
                    return
                except OSError:
                    pass
                finally:
                    s.close()
            if self.daemon and procs.exited(self.daemon) is not None:
                raise SwanError(f"charon {self.name} exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise SwanError(f"charon {self.name}: no VICI socket after {timeout}s\n{self.log_tail()}")
            time.sleep(0.02)

    def terminate(self, ike: str, timeout: int = 10) -> subprocess.CompletedProcess:
        return self.swanctl("--terminate", "--ike", ike, "--timeout", str(timeout), check=False,
                            timeout=timeout + 30)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""


def gateway_swanctl(local_addr: str, local_ts: list[str], pool: str, psk: str, psk_id: str, gw_id: str,
                    cert: str, ca: str) -> str:
    """swanctl.conf of the road-warrior gateway: PSK and X.509 connections, MOBIKE, one pool."""
    common = f"""
        version = 2
        local_addrs = {local_addr}
        mobike = yes
        pools = tia_pool
        dpd_delay = 30s"""
    child = f"""
        children {{
            inside {{
                local_ts = {', '.join(local_ts)}
                dpd_action = clear
            }}
        }}"""
    return f"""# written by mipmobike testbed: the VPN gateway (responder)
connections {{
    rw-psk {{{common}
        local {{
            auth = psk
            id = {gw_id}
        }}
        remote {{
            auth = psk
            id = {psk_id}
        }}{child}
    }}
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
    }}
}}
pools {{
    tia_pool {{
        addrs = {pool}
    }}
}}
secrets {{
    ike-psk {{
        id-gw = {gw_id}
        id-mn = {psk_id}
        secret = "{psk}"
    }}
}}
"""


def client_swanctl(gw_addr: str, remote_ts: list[str], psk: str, psk_id: str, gw_id: str,
                   cert: str, cert_id: str, ca: str) -> str:
    """swanctl.conf for strongSwan as the mobile node's VPN client: ``home-psk`` and ``home-cert``."""
    def conn(name: str, local: str, remote: str) -> str:
        return f"""
    {name} {{
        version = 2
        remote_addrs = {gw_addr}
        vips = 0.0.0.0
        mobike = yes
        keyingtries = 1
        dpd_delay = 30s
        local {{{local}
        }}
        remote {{{remote}
        }}
        children {{
            {name} {{
                remote_ts = {', '.join(remote_ts)}
                start_action = none
            }}
        }}
    }}"""
    psk_conn = conn("home-psk", f"""
            auth = psk
            id = {psk_id}""", f"""
            auth = psk
            id = {gw_id}""")
    cert_conn = conn("home-cert", f"""
            auth = pubkey
            certs = {cert}
            id = {cert_id}""", f"""
            auth = pubkey
            id = {gw_id}
            cacerts = {ca}""")
    return f"""# written by mipmobike testbed: strongSwan as the mobile node's VPN client
connections {{{psk_conn}{cert_conn}
}}
secrets {{
    ike-psk {{
        id-gw = {gw_id}
        id-mn = {psk_id}
        secret = "{psk}"
    }}
}}
"""
