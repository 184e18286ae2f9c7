"""Independent oracles: tshark decodes what we encode; scapy and we agree both ways.

The pcap holds messages produced by the engines themselves (MN, FA, HA), with
IPv4/UDP headers built here, written with link type RAW IPv4 (228).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from ipaddress import IPv4Address

import pytest

from agent.mip import (
    AdvFlag,
    AgentAdvertisement,
    AgentSolicitation,
    FaConfig,
    ForeignAgent,
    NaiExtension,
    RegFlag,
    RegistrationReply,
    RegistrationRequest,
    SecurityAssociation,
    TunnelData,
    decode_icmp,
    decode_message,
    sign,
)
from agent.mip.auth import ntp_timestamp
from agent.mip.icmp import icmp_checksum
from tests.unit.test_mip_support import (
    COA,
    FA,
    FH_KEY,
    HA,
    HOA,
    MF_KEY,
    T0,
    make_ha,
    make_mn,
    sa,
)

TSHARK = shutil.which("tshark") or "/usr/bin/tshark"
NAT = IPv4Address("203.0.113.50")
FH = SecurityAssociation(512, FH_KEY)
MF = SecurityAssociation(600, MF_KEY)


def ipv4(src, dst, proto, payload, ttl=64):
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0x1234, 0, ttl, proto, 0,
                      IPv4Address(src).packed, IPv4Address(dst).packed)
    hdr = hdr[:10] + struct.pack("!H", icmp_checksum(hdr)) + hdr[12:]
    return hdr + payload


def udp(src, dst, sport, dport, payload):
    return ipv4(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)


def write_pcap(path, packets):
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 228))
        for i, p in enumerate(packets):
            f.write(struct.pack("<IIII", int(T0) + i, 0, len(p), len(p)))
            f.write(p)


def echo_request():
    icmp = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping"
    icmp = icmp[:2] + struct.pack("!H", icmp_checksum(icmp)) + icmp[4:]
    return ipv4(HOA, "10.1.0.99", 1, icmp)


def engine_messages():
    """(name, packet, payload) produced by the real engines."""
    pkts = []
    # 1. co-located MN behind a NAT asking for UDP tunnelling, answered by the HA
    mn = make_mn(nai="mn1@example.com", udp_tunnel=True, udp_tunnel_force=True,
                 flags=RegFlag.S | RegFlag.B)
    ha = make_ha(trusted_prefixes=["203.0.113.0/24"], udp_keepalive=110,
                 max_bindings_per_node=2)
    mn.register(T0, COA)
    (rrq,) = mn.datagrams_to_send()
    pkts.append(("rrq_colocated", udp(COA, HA, 4343, 434, rrq.data), rrq.data))
    ha.receive_datagram(rrq.data, str(NAT), 4343, str(HA), T0)
    (rrp,) = ha.datagrams_to_send()
    pkts.append(("rrp_accept", udp(HA, NAT, 434, 4343, rrp.data), rrp.data))
    # 2. identification mismatch (HA clock 60 s ahead)
    mn2 = make_mn()
    ha2 = make_ha()
    mn2.register(T0, COA)
    (r,) = mn2.datagrams_to_send()
    ha2.receive_datagram(r.data, str(COA), 434, str(HA), T0 + 60)
    (rrp133,) = ha2.datagrams_to_send()
    pkts.append(("rrp_133", udp(HA, COA, 434, 434, rrp133.data), rrp133.data))
    # 3. through a foreign agent: MN request (MHAE, delivery style, MFAE), FA relay (FHAE)
    mn3 = make_mn(fa_sa=MF, encapsulating_delivery=True, lifetime=300)
    fa = ForeignAgent(FaConfig(FA, ha_sas={HA: FH}, mn_sas={HOA: MF},
                               prefix_lengths=[24], udp_tunnel=True))
    ha3 = make_ha(fa_sas={FA: FH})
    mn3.register(T0, FA, foreign_agent=FA)
    (r,) = mn3.datagrams_to_send()
    pkts.append(("rrq_to_fa", udp(HOA, FA, 434, 434, r.data), r.data))
    fa.receive_datagram(r.data, str(HOA), 434, str(FA), T0)
    (relayed,) = fa.datagrams_to_send()
    pkts.append(("rrq_relayed", udp(FA, HA, 434, 434, relayed.data), relayed.data))
    ha3.receive_datagram(relayed.data, str(FA), 434, str(HA), T0)
    (rep,) = ha3.datagrams_to_send()
    pkts.append(("rrp_to_fa", udp(HA, FA, 434, 434, rep.data), rep.data))
    fa.receive_datagram(rep.data, str(HA), 434, str(FA), T0)
    (rep_mn,) = fa.datagrams_to_send()
    pkts.append(("rrp_to_mn", udp(FA, HOA, 434, 434, rep_mn.data), rep_mn.data))
    # 4. an FA denial (lifetime too long)
    mn3.register(T0 + 1, FA, foreign_agent=FA, lifetime=5000)
    (r,) = mn3.datagrams_to_send()
    fa.receive_datagram(r.data, str(HOA), 434, str(FA), T0 + 1)
    (deny,) = fa.datagrams_to_send()
    pkts.append(("rrp_fa_69", udp(FA, HOA, 434, 434, deny.data), deny.data))
    # 5. agent discovery
    fa.start(T0)
    (adv,) = fa.datagrams_to_send()
    pkts.append(("advertisement", ipv4(FA, "224.0.0.1", 1, adv.data, ttl=1), adv.data))
    mn3.solicit(T0)
    (sol,) = mn3.datagrams_to_send()
    pkts.append(("solicitation", ipv4(HOA, "224.0.0.2", 1, sol.data, ttl=1), sol.data))
    # 6. RFC 3519 tunnel data
    ha.send_tunnel_data(HOA, echo_request())
    (td,) = ha.datagrams_to_send()
    pkts.append(("tunnel_data", udp(HA, NAT, 434, 4343, td.data), td.data))
    return pkts


def flatten(obj, acc):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, dict):
                flatten(v, acc)
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                for x in v:
                    flatten(x, acc)
            else:
                acc.setdefault(k, []).append(v)
    return acc


def tshark(*args):
    proc = subprocess.run([TSHARK, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    if not os.path.exists(TSHARK):
        pytest.skip("tshark not installed")
    pkts = engine_messages()
    path = tmp_path_factory.mktemp("mip") / "mip.pcap"
    write_pcap(path, [p for _, p, _ in pkts])
    frames = json.loads(tshark("-r", str(path), "-T", "json", "-x", "--no-duplicate-keys",
                               "-o", "ip.check_checksum:TRUE"))
    assert len(frames) == len(pkts)
    fields = {}
    for (name, _, payload), frame in zip(pkts, frames):
        layers = frame["_source"]["layers"]
        fields[name] = (flatten(layers.get("mip", {}), {}), flatten(layers.get("icmp", {}), {}),
                        payload)
    bad = tshark("-r", str(path), "-o", "ip.check_checksum:TRUE", "-Y",
                 "_ws.malformed || _ws.expert.severity >= 0x00600000 || mip.data_not_dissected")
    return fields, bad


def one(d, key):
    vals = d[key]
    assert len(vals) == 1, (key, vals)
    return vals[0]


def test_tshark_reports_no_malformed_or_warning(decoded):
    _, bad = decoded
    assert bad.strip() == ""


def test_tshark_filter_does_catch_a_malformed_message(decoded, tmp_path):
    # the oracle is only worth something if it can fail: a truncated NAI extension
    bad = RegistrationRequest(RegFlag.D, 10, HOA, HA, COA, 1).encode() + bytes([131, 10]) + b"abc"
    path = tmp_path / "bad.pcap"
    write_pcap(path, [udp(COA, HA, 434, 434, bad)])
    out = tshark("-r", str(path), "-Y", "_ws.malformed || _ws.expert.severity >= 0x00600000")
    assert out.strip()


def test_tshark_colocated_request(decoded):
    m, _, payload = decoded[0]["rrq_colocated"]
    req = decode_message(payload)
    assert one(m, "mip.type") == "1"
    assert one(m, "mip.flags") == "0xe2"  # S B D T
    assert [one(m, f"mip.{f}") for f in "sbdmgvtx"] == ["1", "1", "1", "0", "0", "0", "1", "0"]
    assert one(m, "mip.life") == "1800"
    assert one(m, "mip.homeaddr") == str(HOA)
    assert one(m, "mip.haaddr") == str(HA)
    assert one(m, "mip.coa") == str(COA)
    assert one(m, "mip.ident_raw")[0] == f"{req.identification:016x}"
    assert one(m, "mip.ident").startswith("Jan 15, 2027 08:00:00")  # NTP time of T0
    assert m["mip.ext.type"] == ["131", "144", "32"]
    assert one(m, "mip.nai") == "mn1@example.com"
    assert one(m, "mip.ext.utrq.subtype") == "0"
    assert one(m, "mip.ext.utrq.f") == "1" and one(m, "mip.ext.utrq.r") == "0"
    assert one(m, "mip.ext.utrq.encaptype") == "4"
    assert one(m, "mip.auth.spi") == "0x00000100"
    assert one(m, "mip.auth.auth_raw")[0] == req.extensions[-1].authenticator.hex()


def test_tshark_reply_with_udp_tunnel_and_tnc(decoded):
    m, _, payload = decoded[0]["rrp_accept"]
    rep = decode_message(payload)
    assert one(m, "mip.type") == "3" and one(m, "mip.code") == "0"
    assert one(m, "mip.life") == "1800"
    assert one(m, "mip.ident_raw")[0] == f"{rep.identification:016x}"
    assert m["mip.ext.type"] == ["44", "149", "32"]
    assert one(m, "mip.ext.utrp.code") == "0"
    assert one(m, "mip.ext.utrp.f") == "1"
    assert one(m, "mip.ext.utrp.keepalive") == "110"
    assert one(m, "mip.extension_raw")[0] == "0000"  # TNC body: sub-type 0, reserved
    assert one(m, "mip.auth.spi") == "0x00000100"


def test_tshark_identification_mismatch_reply(decoded):
    m, _, payload = decoded[0]["rrp_133"]
    rep = decode_message(payload)
    assert one(m, "mip.code") == "133"
    assert one(m, "mip.ident_raw")[0] == f"{rep.identification:016x}"
    assert one(m, "mip.ident").startswith("Jan 15, 2027 08:01:00")  # the HA's clock


def test_tshark_foreign_agent_path(decoded):
    m, _, _ = decoded[0]["rrq_to_fa"]
    assert one(m, "mip.flags") == "0x02" and one(m, "mip.coa") == str(FA)
    assert m["mip.ext.type"] == ["32", "130", "33"]
    assert m["mip.auth.spi"] == ["0x00000100", "0x00000258"]
    m, _, _ = decoded[0]["rrq_relayed"]
    assert m["mip.ext.type"] == ["32", "34"]
    assert m["mip.auth.spi"] == ["0x00000100", "0x00000200"]
    m, _, _ = decoded[0]["rrp_to_fa"]
    assert one(m, "mip.code") == "0" and one(m, "mip.life") == "300"
    assert m["mip.ext.type"] == ["32", "34"]
    m, _, _ = decoded[0]["rrp_to_mn"]
    assert m["mip.ext.type"] == ["32", "33"]
    m, _, _ = decoded[0]["rrp_fa_69"]
    assert one(m, "mip.code") == "69" and one(m, "mip.life") == "1800"
    assert m["mip.ext.type"] == ["33"]


def test_tshark_agent_discovery(decoded):
    _, i, _ = decoded[0]["advertisement"]
    assert one(i, "icmp.type") == "9" and one(i, "icmp.code") == "0"
    assert one(i, "icmp.checksum.status") == "1"
    assert one(i, "icmp.mip.seq") == "0" and one(i, "icmp.mip.life") == "1800"
    assert one(i, "icmp.mip.flags") == "0x1180"
    assert one(i, "icmp.mip.f") == "1" and one(i, "icmp.mip.rt") == "1"
    assert one(i, "icmp.mip.u") == "1" and one(i, "icmp.mip.h") == "0"
    assert one(i, "icmp.mip.coa") == str(FA)
    assert one(i, "icmp.mip.prefixlength") == "24"
    _, i, _ = decoded[0]["solicitation"]
    assert one(i, "icmp.type") == "10" and one(i, "icmp.checksum.status") == "1"


def test_tshark_tunnel_data(decoded):
    m, _, _ = decoded[0]["tunnel_data"]
    assert one(m, "mip.type") == "4" and one(m, "mip.nattt.nexthdr") == "4"


# ---------------------------------------------------------------- scapy


@pytest.fixture(scope="module")
def scapy_mip():
    from scapy.layers import inet, mobileip

    return inet, mobileip


def test_scapy_parses_our_request_and_reply(scapy_mip):
    inet, mip = scapy_mip
    from scapy.packet import Raw

    req = sign(RegistrationRequest(RegFlag.D | RegFlag.T | RegFlag.G, 900, HOA, HA, COA,
                                   ntp_timestamp(T0), (NaiExtension("a@b"),)), sa())
    pkt = inet.IP(udp(COA, HA, 434, 434, req.encode()))
    assert pkt.haslayer(mip.MobileIPRRQ)
    r = pkt[mip.MobileIPRRQ]
    assert (pkt[mip.MobileIP].type, r.flags, r.lifetime) == (1, 0x2A, 900)
    assert (r.homeaddr, r.haaddr, r.coaddr, r.id) == (str(HOA), str(HA), str(COA),
                                                      req.identification)
    assert bytes(r.payload) == req.encode()[24:]  # our extensions, opaque to scapy
    rep = sign(RegistrationReply(133, 0, HOA, HA, 0x1122334455667788), sa())
    pkt = inet.IP(udp(HA, COA, 434, 434, rep.encode()))
    p = pkt[mip.MobileIPRRP]
    assert (p.code, p.lifetime, p.homeaddr, p.haaddr, p.id) == (133, 0, str(HOA), str(HA),
                                                                0x1122334455667788)
    td = inet.IP(udp(HA, COA, 434, 434, TunnelData(4, echo_request()).encode()))
    assert td[mip.MobileIPTunnelData].nexthdr == 4
    assert td[mip.MobileIPTunnelData].payload[inet.ICMP].type == 8


def test_we_parse_scapy_built_request_and_reply(scapy_mip):
    inet, mip = scapy_mip
    from scapy.packet import Raw, raw

    for flags in (0, 0x22, 0xFF):
        pkt = (inet.IP(src=str(COA), dst=str(HA)) / inet.UDP(sport=434, dport=434)
               / mip.MobileIP(type=1)
               / mip.MobileIPRRQ(flags=flags, lifetime=1800, homeaddr=str(HOA),
                                 haaddr=str(HA), coaddr=str(COA), id=0xDEADBEEF00000001))
        msg = decode_message(raw(pkt[inet.UDP].payload))
        assert isinstance(msg, RegistrationRequest)
        assert (int(msg.flags), msg.lifetime, msg.home_address, msg.home_agent,
                msg.care_of_address, msg.identification) == \
            (flags, 1800, HOA, HA, COA, 0xDEADBEEF00000001)
        assert msg.extensions == ()
    # scapy fixed part + our MHAE computed over it, carried as Raw: authenticates
    fixed = raw(mip.MobileIP(type=1) / mip.MobileIPRRQ(flags=0x22, lifetime=60,
                                                      homeaddr=str(HOA), haaddr=str(HA),
                                                      coaddr=str(COA), id=7))
    auth = sign(decode_message(fixed), sa()).extensions[-1]
    pkt = inet.IP(src=str(COA), dst=str(HA)) / inet.UDP(sport=434, dport=434) / \
        mip.MobileIP(fixed) / Raw(bytes([32, 20]) + (256).to_bytes(4, "big") + auth.authenticator)
    data = raw(pkt[inet.UDP].payload)
    from agent.mip import verify
    assert verify(decode_message(data), sa())
    # replies
    rep = raw(mip.MobileIP(type=3) / mip.MobileIPRRP(code=136, lifetime=0, homeaddr=str(HOA),
                                                     haaddr=str(HA), id=99))
    msg = decode_message(rep)
    assert isinstance(msg, RegistrationReply)
    assert (msg.code, msg.lifetime, msg.home_address, msg.home_agent, msg.identification) == \
        (136, 0, HOA, HA, 99)
    td = raw(mip.MobileIP(type=4) / mip.MobileIPTunnelData(nexthdr=4) / inet.IP(echo_request()))
    assert decode_message(td) == TunnelData(4, echo_request())


def test_scapy_agrees_on_icmp_checksums(scapy_mip):
    inet, _ = scapy_mip
    from scapy.packet import raw

    assert raw(inet.ICMP(type=10)) == AgentSolicitation().encode()
    assert decode_icmp(raw(inet.ICMP(type=10)))
    adv = AgentAdvertisement(300, 600, AdvFlag.F | AdvFlag.H, (FA,), 30, ((FA, 1),),
                             prefix_lengths=(16,), padding=1)
    ours = adv.encode()
    theirs = inet.ICMP(ours)
    del theirs.chksum  # let scapy recompute it
    assert raw(theirs) == ours
