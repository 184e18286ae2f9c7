"""Our IKEv2 initiator (agent.ike) against a strongSwan 5.9.8 gateway.

The gateway is the shared ``gateway_lab`` fixture (kernel-libipsec on this
host, which tells every client it is behind a NAT, so NAT-T and port 4500 are
exercised on every connect). Our initiator runs in the lab's client
namespace, driven by agent.ike.driver's blocking loop; it installs no kernel
SAs here (that is the xfrm step). The gateway's own view comes from
``swanctl --list-sas`` over its VICI socket.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import subprocess
import time
from contextlib import contextmanager

import pytest

from agent.ike import (
    AuthFailed, CaTrust, CertAuth, ChildSaDeleted, ChildSaEstablished, ChildSaFailed, IkeConfig,
    IkeConnection, IkeFailed, IkeSaDeleted, IkeSaEstablished, PskAuth, State,
)
from agent.ike.driver import BlockingDriver, udp_socket, write_pcap
from tests.lib.swan import Pki, gateway_swanctl

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def in_netns(name: str):
    """Run the block with this thread in network namespace ``name`` (sockets
    created inside stay in it)."""
    new = os.open(f"/run/netns/{name}", os.O_RDONLY)
    old = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(new, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if _libc.setns(old, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(new)
        os.close(old)


def ns_socket_factory(ns: str):
    def make(ip: str, port: int) -> socket.socket:
        with in_netns(ns):
            return udp_socket(ip, port)
    return make


class Client:
    """Our initiator in the lab's client namespace."""

    def __init__(self, lab, config: IkeConfig, trace: list | None = None):
        self.lab = lab
        self.conn = IkeConnection(config, (lab.client_addr, 500), (lab.gw_addr, 500), name="mn")
        self.drv = BlockingDriver(self.conn, socket_factory=ns_socket_factory(lab.client.name), trace=trace)

    def close(self):
        self.drv.close()

    def connect(self, timeout: float = 15):
        self.conn.connect(time.monotonic())
        return self.wait(lambda e: isinstance(e, (ChildSaEstablished, ChildSaFailed, AuthFailed, IkeFailed)),
                         timeout)

    def wait(self, pred, timeout: float = 10):
        ev = self.drv.run_until(pred, timeout)
        assert ev is not None, f"timed out; events so far: {self.drv.events}\n--- gateway log ---\n" \
                               + self.lab.gw.log_text()[-4000:]
        return ev

    def events(self, cls):
        return [e for e in self.drv.events if isinstance(e, cls)]


@pytest.fixture
def client_factory(gateway_lab):
    made = []

    def make(config: IkeConfig, trace=None) -> Client:
        c = Client(gateway_lab, config, trace)
        made.append(c)
        return c
    try:
        yield make
    finally:
        for c in made:
            c.close()


def psk_config(lab, **kw) -> IkeConfig:
    args = dict(local_id=lab.psk_id, remote_id=lab.gw_id, local_auth=PskAuth(lab.psk),
                remote_auth=PskAuth(lab.psk), remote_ts=[lab.inside_net],
                retransmit_timeout=0.5, retransmit_tries=3)
    args.update(kw)
    return IkeConfig(**args)


def cert_config(lab, pki: Pki, name="mn", ca="ca", **kw) -> IkeConfig:
    args = dict(local_id="mn.vpn.example", remote_id=lab.gw_id,
                local_auth=CertAuth.load(str(pki.path / f"{name}.crt"), str(pki.path / f"{name}.key")),
                remote_auth=CaTrust.load(str(pki.path / f"{ca}.crt")), remote_ts=[lab.inside_net],
                retransmit_timeout=0.5, retransmit_tries=3)
    args.update(kw)
    return IkeConfig(**args)


def reload_gateway(lab, **kw):
    conf = dict(psk=lab.psk, cert="gw.crt", ca="ca.crt")
    conf.update(kw)
    lab.gw.write_swanctl(gateway_swanctl(lab.gw_addr, [lab.inside_net], lab.pool, **conf))
    lab.gw.load_all()


def gw_sas(lab) -> str:
    return lab.gw.list_sas()


def wait_gw(lab, cond, timeout=5.0, what="gateway state"):
    deadline = time.monotonic() + timeout
    while True:
        sas = gw_sas(lab)
        if cond(sas):
            return sas
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{sas}\n--- log ---\n{lab.gw.log_text()[-3000:]}")
        time.sleep(0.1)


def spis_of(child: ChildSaEstablished) -> tuple[str, str]:
    return f"{child.inbound.spi:08x}", f"{child.outbound.spi:08x}"


def assert_gateway_shows(lab, ike: IkeSaEstablished, child: ChildSaEstablished):
    sas = gw_sas(lab)
    assert "ESTABLISHED" in sas, sas
    # IKE SA: our SPIs (the gateway prints its own as _r with '*'), our proposal, our TIA
    assert f"{ike.spi_i.hex()}_i" in sas and f"{ike.spi_r.hex()}_r" in sas, sas
    assert ike.proposal in sas, f"gateway does not show proposal {ike.proposal}:\n{sas}"
    assert f"[{child.tia}]" in sas, sas
    # CHILD SA: its proposal and both SPIs (gateway 'in' = our outbound)
    assert f"ESP:{child.proposal}" in sas, f"gateway does not show ESP:{child.proposal}:\n{sas}"
    sin, sout = spis_of(child)
    assert re.search(rf"in\s+{sout}", sas) and re.search(rf"out\s+{sin}", sas), sas
    # the gateway sees us on 4500 (NAT-T; kernel-libipsec forces it)
    assert f"{lab.client_addr}[4500]" in sas, sas
    return sas


# ---------------------------------------------------------------------------- connects

def test_psk_connect_tia_and_gateway_view(gateway_lab, client_factory, tmp_path):
    lab = gateway_lab
    trace: list = []
    c = client_factory(psk_config(lab), trace)
    ev = c.connect()
    assert isinstance(ev, ChildSaEstablished), c.drv.events
    ike = c.events(IkeSaEstablished)[0]
    assert ike.auth == "psk" and ike.remote_id == lab.gw_id
    assert ike.nat_remote or ike.nat_local          # kernel-libipsec fakes a NAT
    assert ike.mobike
    assert ike.local_addr == (lab.client_addr, 4500) and ike.remote_addr == (lab.gw_addr, 4500)
    assert ev.tia is not None and str(ev.tia).startswith("10.10.100.")
    assert [str(n) for t in ev.remote_ts for n in t.networks()] == [lab.inside_net]
    assert [str(n) for t in ev.local_ts for n in t.networks()] == [f"{ev.tia}/32"]   # narrowed
    assert ev.encap and ev.mode == "tunnel"
    assert_gateway_shows(lab, ike, ev)

    # tshark decodes our messages and, with the exported keys, decrypts them
    c.drv.run_for(0.2)
    pcap = tmp_path / "ike.pcap"
    write_pcap(str(pcap), trace)
    wsdir = tmp_path / "ws"
    wsdir.mkdir(mode=0o700)
    from agent.ike import append_tshark_keys
    append_tshark_keys(str(wsdir / "ikev2_decryption_table"), c.conn.keys)
    assert (os.stat(wsdir / "ikev2_decryption_table").st_mode & 0o777) == 0o600
    out = subprocess.run(["tshark", "-r", str(pcap), "-V", "-Y", "isakmp"], capture_output=True, text=True,
                         env=dict(os.environ, WIRESHARK_CONFIG_DIR=str(wsdir)), timeout=120).stdout
    assert out.count("Exchange type: IKE_SA_INIT (34)") == 2, out[:3000]
    assert "Decrypted Data" in out, out[-3000:]
    assert "Identification - Initiator" in out and "Configuration" in out
    assert lab.psk_id in out                       # IDi from inside our encrypted IKE_AUTH

    # delete from our side
    c.conn.delete(time.monotonic())
    d = c.wait(lambda e: isinstance(e, IkeSaDeleted))
    assert d.by == "local" and d.reason == "deleted"
    assert c.events(ChildSaDeleted)
    wait_gw(lab, lambda s: "ESTABLISHED" not in s, what="gateway to drop the IKE SA")


def test_ecdsa_cert_connect(gateway_lab, client_factory):
    lab = gateway_lab
    c = client_factory(cert_config(lab, lab.pki))
    ev = c.connect()
    assert isinstance(ev, ChildSaEstablished), c.drv.events
    ike = c.events(IkeSaEstablished)[0]
    assert ike.auth.startswith("RFC7427 ecdsa"), ike.auth
    assert ev.tia is not None
    sas = assert_gateway_shows(lab, ike, ev)
    assert "rw-cert" in sas and "mn.vpn.example" in sas
    # the gateway checked our certificate (RFC 7427 signature)
    assert re.search(r"authentication of 'mn.vpn.example' with .*ECDSA.* successful", lab.gw.log_text()), \
        lab.gw.log_text()[-3000:]
