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

    def __init__(self, lab, config: IkeConfig, trace: list | None = None, rx_filter=None):
        self.lab = lab
        self.conn = IkeConnection(config, (lab.client_addr, 500), (lab.gw_addr, 500), name="mn")
        self.drv = BlockingDriver(self.conn, socket_factory=ns_socket_factory(lab.client.name), trace=trace,
                                  rx_filter=rx_filter)

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

    def make(config: IkeConfig, trace=None, rx_filter=None) -> Client:
        c = Client(gateway_lab, config, trace, rx_filter)
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


def test_gcm_proposals_we_choose(gateway_lab, client_factory):
    """With a single proposal of ours the gateway must take exactly it."""
    lab = gateway_lab
    c = client_factory(psk_config(lab, ike_proposals=["aes256gcm16-prfsha384-ecp256"],
                                  esp_proposals=["aes256gcm16"]))
    ev = c.connect()
    assert isinstance(ev, ChildSaEstablished), c.drv.events
    ike = c.events(IkeSaEstablished)[0]
    assert ike.proposal == "AES_GCM_16-256/PRF_HMAC_SHA2_384/ECP_256"
    assert ev.proposal == "AES_GCM_16-256"
    assert ev.inbound.aead_alg == "rfc4106(gcm(aes))" and ev.inbound.aead_icv_bits == 128
    assert len(ev.inbound.encr_key) == 36 and len(ev.outbound.encr_key) == 36   # key + 4-byte salt
    assert ev.inbound.encr_key != ev.outbound.encr_key
    assert_gateway_shows(lab, ike, ev)


def test_cbc_sha512_modp2048(gateway_lab, client_factory):
    lab = gateway_lab
    c = client_factory(psk_config(lab, ike_proposals=["aes256-sha512-modp2048"],
                                  esp_proposals=["aes256-sha384"]))
    ev = c.connect()
    assert isinstance(ev, ChildSaEstablished), c.drv.events
    ike = c.events(IkeSaEstablished)[0]
    assert ike.proposal == "AES_CBC-256/HMAC_SHA2_512_256/PRF_HMAC_SHA2_512/MODP_2048"
    assert ev.proposal == "AES_CBC-256/HMAC_SHA2_384_192"
    assert (ev.outbound.encr_alg, ev.outbound.integ_alg, ev.outbound.integ_trunc_bits) == \
        ("cbc(aes)", "hmac(sha384)", 192)
    assert len(ev.outbound.encr_key) == 32 and len(ev.outbound.integ_key) == 48
    assert_gateway_shows(lab, ike, ev)


def test_invalid_ke_retry_with_requested_group(gateway_lab, client_factory):
    """We guess Curve25519; the gateway only takes ECP-256 and answers
    INVALID_KE_PAYLOAD; we retry with group 19."""
    lab = gateway_lab
    reload_gateway(lab, proposals="aes128-sha256-ecp256")
    c = client_factory(psk_config(lab, ike_proposals=["aes128-sha256-x25519-ecp256"]))
    ev = c.connect()
    assert isinstance(ev, ChildSaEstablished), c.drv.events
    ike = c.events(IkeSaEstablished)[0]
    assert ike.proposal.endswith("/ECP_256")
    assert "DH group CURVE_25519 unacceptable, requesting ECP_256" in lab.gw.log_text()
    assert c.conn.stats["invalid_ke_retries"] == 1
    assert_gateway_shows(lab, ike, ev)


def test_delete_from_gateway_child_then_ike(gateway_lab, client_factory):
    lab = gateway_lab
    c = client_factory(psk_config(lab))
    ev = c.connect()
    assert isinstance(ev, ChildSaEstablished)
    # the gateway deletes the CHILD SA: we answer with our inbound SPI, the IKE SA stays
    term = _bg(lab, "--terminate", "--child", "lan", "--timeout", "10")
    d = c.wait(lambda e: isinstance(e, ChildSaDeleted))
    _join(term)
    assert d.by == "peer" and d.child_id == ev.child_id
    assert c.conn.state is State.ESTABLISHED and not c.conn.children
    sas = wait_gw(lab, lambda s: "ESTABLISHED" in s and "INSTALLED" not in s, what="child gone, IKE kept")
    # then the IKE SA
    term = _bg(lab, "--terminate", "--ike", "rw-psk", "--timeout", "10")
    d = c.wait(lambda e: isinstance(e, IkeSaDeleted))
    out = _join(term)
    assert d.by == "peer"
    assert "terminate completed successfully" in out, out
    assert c.conn.state is State.CLOSED
    wait_gw(lab, lambda s: "ESTABLISHED" not in s, what="gateway to drop the IKE SA")


def test_delete_child_from_our_side(gateway_lab, client_factory):
    lab = gateway_lab
    c = client_factory(psk_config(lab))
    ev = c.connect()
    assert isinstance(ev, ChildSaEstablished)
    c.conn.delete_child(ev.child_id, time.monotonic())
    d = c.wait(lambda e: isinstance(e, ChildSaDeleted))
    assert d.by == "local" and d.spi_out == ev.outbound.spi
    wait_gw(lab, lambda s: "ESTABLISHED" in s and "INSTALLED" not in s, what="child gone, IKE kept")
    c.conn.delete(time.monotonic())
    c.wait(lambda e: isinstance(e, IkeSaDeleted))
    wait_gw(lab, lambda s: "ESTABLISHED" not in s, what="gateway to drop the IKE SA")


def test_rsa_cert_connect(gateway_lab, client_factory, tmp_path):
    """RSA on both sides: gateway and client certificates from an RSA CA."""
    lab = gateway_lab
    pki = Pki(tmp_path / "rsa-pki")
    pki.ca("rsaca", type_="rsa")
    pki.cert("gwrsa", ["gw.vpn.example", "192.0.2.1"], ca="rsaca", type_="rsa")
    pki.cert("mnrsa", ["mn.vpn.example"], ca="rsaca", type_="rsa", flag="clientAuth")
    lab.gw.add_cert(pki.path / "gwrsa.crt", pki.path / "gwrsa.key", ca=pki.path / "rsaca.crt")
    reload_gateway(lab, cert="gwrsa.crt", ca="rsaca.crt")
    c = client_factory(cert_config(lab, pki, name="mnrsa", ca="rsaca"))
    ev = c.connect()
    assert isinstance(ev, ChildSaEstablished), c.drv.events
    ike = c.events(IkeSaEstablished)[0]
    assert ike.auth == "RFC7427 rsa-sha256", ike.auth
    assert_gateway_shows(lab, ike, ev)
    assert re.search(r"authentication of 'mn.vpn.example' with RSA.* successful", lab.gw.log_text())


# ---------------------------------------------------------------------------- negatives

def _no_sa_left(lab, timeout=5.0):
    wait_gw(lab, lambda s: "ESTABLISHED" not in s and "CONNECTING" not in s, timeout,
            what="no SA left on the gateway")


def test_wrong_psk(gateway_lab, client_factory):
    lab = gateway_lab
    wrong = PskAuth("not-" + lab.psk)
    c = client_factory(psk_config(lab, local_auth=wrong, remote_auth=wrong))
    ev = c.connect()
    assert isinstance(ev, AuthFailed), c.drv.events
    assert ev.by == "peer" and "AUTHENTICATION_FAILED" in ev.reason
    assert c.conn.state is State.CLOSED and not c.conn.children
    assert not c.events(IkeSaEstablished)
    _no_sa_left(lab)


def test_gateway_psk_mismatch_detected_locally(gateway_lab, client_factory):
    """We authenticate correctly but expect another key from the gateway:
    its AUTH does not verify and we tell it so."""
    lab = gateway_lab
    c = client_factory(psk_config(lab, remote_auth=PskAuth("other-" + lab.psk)))
    ev = c.connect()
    assert isinstance(ev, AuthFailed), c.drv.events
    assert ev.by == "local" and "PSK" in ev.reason
    c.drv.run_for(0.3)                       # our AUTHENTICATION_FAILED notify goes out
    _no_sa_left(lab)


def test_untrusted_certificate(gateway_lab, client_factory, tmp_path):
    lab = gateway_lab
    other = Pki(tmp_path / "other-pki", org="not-the-lab")
    other.ca("otherca")
    c = client_factory(cert_config(lab, lab.pki, remote_auth=CaTrust.load(str(other.path / "otherca.crt"))))
    ev = c.connect()
    assert isinstance(ev, AuthFailed), c.drv.events
    assert ev.by == "local" and "not issued by a trusted CA" in ev.reason, ev.reason
    c.drv.run_for(0.3)
    _no_sa_left(lab)
    # the gateway got our AUTHENTICATION_FAILED notify and deleted its SA
    assert re.search(r"parsed INFORMATIONAL request 2 \[ N\(AUTH_FAILED\) \]", lab.gw.log_text())


def test_wrong_gateway_identity_not_sent(gateway_lab, client_factory):
    """We do not send IDr; the gateway identifies as gw.vpn.example, we expect another name."""
    lab = gateway_lab
    c = client_factory(cert_config(lab, lab.pki, remote_id="other.vpn.example", send_idr=False))
    ev = c.connect()
    assert isinstance(ev, AuthFailed), c.drv.events
    assert ev.by == "local" and "expected 'other.vpn.example'" in ev.reason, ev.reason
    c.drv.run_for(0.3)
    _no_sa_left(lab)


def test_wrong_gateway_identity_sent(gateway_lab, client_factory):
    """We send IDr=other.vpn.example: the gateway has no such identity and refuses."""
    lab = gateway_lab
    c = client_factory(psk_config(lab, remote_id="other.vpn.example"))
    ev = c.connect()
    assert isinstance(ev, AuthFailed), c.drv.events
    assert ev.by == "peer"
    _no_sa_left(lab)


def test_no_proposal_chosen_ike(gateway_lab, client_factory):
    lab = gateway_lab
    reload_gateway(lab, proposals="aes128-sha256-x25519")
    c = client_factory(psk_config(lab, ike_proposals=["aes256gcm16-prfsha512-modp2048"]))
    ev = c.connect()
    assert isinstance(ev, IkeFailed), c.drv.events
    assert ev.notify == 14 and "NO_PROPOSAL_CHOSEN" in ev.reason
    assert c.conn.state is State.CLOSED
    _no_sa_left(lab)


def test_no_proposal_chosen_esp(gateway_lab, client_factory):
    lab = gateway_lab
    reload_gateway(lab, esp_proposals="aes128-sha256")
    c = client_factory(psk_config(lab, esp_proposals=["aes256gcm16"]))
    ev = c.connect()
    assert isinstance(ev, ChildSaFailed), c.drv.events
    assert ev.notify == 14 and "NO_PROPOSAL_CHOSEN" in ev.reason
    # the IKE SA came up without a child; we delete it (close_on_child_failure)
    d = c.wait(lambda e: isinstance(e, IkeSaDeleted))
    assert d.by == "local"
    _no_sa_left(lab)


def test_ts_unacceptable(gateway_lab, client_factory):
    lab = gateway_lab
    c = client_factory(psk_config(lab, remote_ts=["10.99.0.0/24"]))
    ev = c.connect()
    assert isinstance(ev, ChildSaFailed), c.drv.events
    assert ev.notify == 38 and "TS_UNACCEPTABLE" in ev.reason
    c.wait(lambda e: isinstance(e, IkeSaDeleted))
    _no_sa_left(lab)


def test_tampered_and_replayed_responses(gateway_lab, client_factory):
    """The first IKE_AUTH response arrives with a flipped bit, followed by a
    replay of the IKE_SA_INIT response: both are counted and dropped, the
    state is untouched, and our retransmission gets the genuine response."""
    lab = gateway_lab
    seen: list[bytes] = []

    def rx(data, src, dst):
        seen.append(data)
        if src[1] == 4500 and len([d for d in seen if len(d) > 4 and d[:4] == bytes(4)]) == 1:
            bad = bytearray(data)
            bad[-5] ^= 0x01                  # inside the ICV / ciphertext
            return [bytes(bad), bytes(4) + seen[0]]   # tampered IKE_AUTH response + replayed IKE_SA_INIT response
        return [data]

    c = client_factory(psk_config(lab), rx_filter=rx)
    ev = c.connect()
    assert isinstance(ev, ChildSaEstablished), c.drv.events
    st = c.conn.stats
    assert st.get("integrity") == 1, st
    assert st.get("unexpected_response", 0) >= 1, st
    assert st.get("retransmits", 0) >= 1, st
    assert_gateway_shows(lab, c.events(IkeSaEstablished)[0], ev)
    # a replay of the IKE_AUTH response after establishment changes nothing
    auth_resp = next(d for d in seen if d[:4] == bytes(4))
    c.conn.receive_datagram(auth_resp, (lab.gw_addr, 4500), (lab.client_addr, 4500), time.monotonic())
    assert c.conn.state is State.ESTABLISHED and c.conn.stats["unexpected_response"] >= 2
    assert c.conn.next_event() is None


def test_cookie_challenge(gateway_lab, client_factory, procs, tmp_path):
    """A gateway under (simulated) load answers with a COOKIE; we retry with it."""
    from tests.lib.swan import Charon
    lab = gateway_lab
    lab.gw.stop()
    gw = Charon(tmp_path / "swan-cookie", lab.gw_ns, "gwc", procs, ipsec="libipsec",
                interfaces_use=[lab.gw_ns.ifaces[0]], extra_conf="cookie_threshold = 1\ncookie_threshold_ip = 1\n")
    gw.add_cert(lab.pki.path / "gw.crt", lab.pki.path / "gw.key", ca=lab.pki.path / "ca.crt")
    gw.write_swanctl(gateway_swanctl(lab.gw_addr, [lab.inside_net], lab.pool, psk=lab.psk))
    gw.start()
    gw.load_all()
    lab.gw = gw
    # one half-open IKE SA from another port of the client: the next IKE_SA_INIT needs a cookie
    half = IkeConnection(psk_config(lab), (lab.client_addr, 5500), (lab.gw_addr, 500))
    half.connect(time.monotonic())
    sock = ns_socket_factory(lab.client.name)(lab.client_addr, 5500)
    try:
        for data, _, remote in half.datagrams_to_send(time.monotonic()):
            sock.sendto(data, remote)
        sock.settimeout(5)
        sock.recvfrom(4096)                 # the gateway answered: the SA is half-open now
    finally:
        sock.close()
    c = client_factory(psk_config(lab))
    ev = c.connect()
    assert isinstance(ev, ChildSaEstablished), c.drv.events
    assert c.conn.stats.get("cookie_rounds") == 1, c.conn.stats
    log = gw.log_text()
    assert "generating IKE_SA_INIT response 0 [ N(COOKIE) ]" in log
    assert "parsed IKE_SA_INIT request 0 [ N(COOKIE) SA KE No N(NATD_S_IP) N(NATD_D_IP) N(HASH_ALG) ]" in log
    assert_gateway_shows(lab, c.events(IkeSaEstablished)[0], ev)


def test_behind_a_real_nat_with_port_rewriting(gateway_lab, tmp_path):
    """Our initiator behind MASQUERADE that also rewrites UDP source ports:
    we detect the NAT in front of us, float to 4500, send keepalives, and
    the gateway sees the NAT's address and port."""
    lab = gateway_lab
    nat = lab.client                                 # the client namespace becomes the NAT router
    inner = lab.topo.ns("mnin")
    lab.topo.link(nat, inner, "172.16.9.1/24", "172.16.9.2/24")
    inner.route("default", "via", "172.16.9.1")
    nat.sysctl("net.ipv4.ip_forward", "1")
    nat.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", lab.client_if, "-p", "udp", "-j", "MASQUERADE",
            "--to-ports", "40000-40999")
    conn = IkeConnection(psk_config(lab, keepalive_interval=0.3), ("172.16.9.2", 500), (lab.gw_addr, 500), name="mn")
    drv = BlockingDriver(conn, socket_factory=ns_socket_factory(inner.name))
    try:
        conn.connect(time.monotonic())
        ev = drv.run_until(lambda e: isinstance(e, (ChildSaEstablished, ChildSaFailed, AuthFailed, IkeFailed)), 15)
        assert isinstance(ev, ChildSaEstablished), drv.events
        ike = next(e for e in drv.events if isinstance(e, IkeSaEstablished))
        assert ike.nat_local and ev.encap and ev.local_addr == ("172.16.9.2", 4500)
        sas = gw_sas(lab)
        m = re.search(r"remote 'mn-psk@vpn.example' @ ([\d.]+)\[(\d+)\]", sas)
        assert m and m.group(1) == lab.client_addr and 40000 <= int(m.group(2)) <= 40999, sas
        assert ike.proposal in sas and f"ESP:{ev.proposal}" in sas
        drv.run_for(1.0)
        assert conn.stats.get("keepalives_sent", 0) >= 2, conn.stats
        conn.delete(time.monotonic())
        assert drv.run_until(lambda e: isinstance(e, IkeSaDeleted), 10) is not None
        wait_gw(lab, lambda s: "ESTABLISHED" not in s, what="gateway to drop the IKE SA")
    finally:
        drv.close()


# ---------------------------------------------------------------------------- helpers

def _bg(lab, *args):
    env = dict(os.environ, **lab.gw.env())
    return subprocess.Popen(["ip", "netns", "exec", lab.gw_ns.name, "swanctl", *args, "--uri",
                             f"unix://{lab.gw.vici}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def _join(p, timeout=20) -> str:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
    return out
