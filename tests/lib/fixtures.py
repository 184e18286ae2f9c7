"""pytest fixtures shared by every tier (re-exported by tests/conftest.py)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import pytest

from .names import RUN
from .procs import Procs
from .swan import Charon, Pki, gateway_swanctl, kernel_has_esp
from .topo import Netns, Topology


@pytest.fixture
def topology():
    """A ``Topology``: namespaces, veths and bridges, removed after the test."""
    t = Topology("t")
    try:
        yield t
    finally:
        t.close()


@pytest.fixture
def procs(tmp_path):
    """Start processes (optionally inside a namespace); stopped by PID after the test."""
    p = Procs(tmp_path / "logs")
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def gate_cache(tmp_path_factory) -> str:
    """Compile the BPF gate once per module (and for its subprocesses, through the disk cache)."""
    from agent.gate import loader
    d = str(tmp_path_factory.mktemp("gatecache"))
    loader.compiled(d)
    return d


@pytest.fixture(scope="module")
def bpffs():
    """A bpffs mount of this run's own, for pinned gates; unmounted afterwards."""
    import os
    from agent.gate.bpf_backend import ensure_bpffs, unmount_bpffs
    root = f"/run/mipmobike/test-{RUN}-{secrets.token_hex(3)}"
    ensure_bpffs(root)
    try:
        yield root
    finally:
        unmount_bpffs(root)
        try:
            os.rmdir(root)
        except OSError:
            pass


@pytest.fixture(scope="session")
def ipsec_backend() -> str:
    """"kernel" where the kernel has ESP (the VM), else "libipsec" (strongSwan's userspace ESP)."""
    return "kernel" if kernel_has_esp() else "libipsec"


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    """An ECDSA P-256 CA with a gateway and a mobile-node certificate."""
    p = Pki(tmp_path_factory.mktemp("pki"))
    p.ca()
    p.cert("gw", ["gw.vpn.example", "192.0.2.1"])
    p.cert("mn", ["mn.vpn.example"], flag="clientAuth")
    return p


@dataclass
class GatewayLab:
    """outside (192.0.2.0/24) -- gw -- inside (10.10.0.0/24, host ``internal`` at 10.10.0.10).

    ``client`` is an empty namespace on the outside link at 192.0.2.50 for the
    initiator under test; ``gw`` is a strongSwan gateway with PSK and
    certificate connections, MOBIKE on and the pool 10.10.100.0/24.
    """
    topo: Topology
    gw: Charon
    gw_ns: Netns
    client: Netns
    internal: Netns
    client_if: str
    gw_addr: str = "192.0.2.1"
    client_addr: str = "192.0.2.50"
    internal_addr: str = "10.10.0.10"
    inside_net: str = "10.10.0.0/24"
    pool: str = "10.10.100.0/24"
    psk: str = ""
    psk_id: str = "mn-psk@vpn.example"
    gw_id: str = "gw.vpn.example"
    pki: Pki | None = None


@pytest.fixture
def gateway_lab(topology, procs, pki, ipsec_backend, tmp_path) -> GatewayLab:
    gw_ns = topology.ns("gw", forward=True)
    client = topology.ns("cl")
    internal = topology.ns("in")
    gw_out, client_if = topology.link(gw_ns, client, "192.0.2.1/24", "192.0.2.50/24")
    gw_in, int_if = topology.link(gw_ns, internal, "10.10.0.1/24", "10.10.0.10/24")
    internal.route("default", "via", "10.10.0.1")
    # the inside is reachable from outside only through the tunnel
    gw_ns.run("iptables", "-A", "FORWARD", "-i", gw_out, "-d", "10.10.0.0/24", "-j", "DROP")
    psk = "lab-" + secrets.token_hex(16)
    gw = Charon(tmp_path / "swan", gw_ns, "gw", procs, ipsec=ipsec_backend, interfaces_use=[gw_out])
    gw.add_cert(pki.path / "gw.crt", pki.path / "gw.key", ca=pki.path / "ca.crt")
    gw.write_swanctl(gateway_swanctl("192.0.2.1", ["10.10.0.0/24"], "10.10.100.0/24", psk=psk,
                                     cert="gw.crt", ca="ca.crt"))
    gw.start()
    gw.load_all()
    return GatewayLab(topology, gw, gw_ns, client, internal, client_if, psk=psk, pki=pki)


@pytest.fixture
def workdir(tmp_path) -> Path:
    return tmp_path
