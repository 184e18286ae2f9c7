"""The kernel tier runs where ESP exists: an ESP state pair made with `ip xfrm`, ping through it."""

from tests.lib.capture import Capture

ENC_AB, ENC_BA = "0x" + "0123456789abcdef" * 2, "0x" + "fedcba9876543210" * 2
AUTH_AB, AUTH_BA = "0x" + "00112233" * 8, "0x" + "ffeeddcc" * 8


def test_esp_tunnel_ping(topology, tmp_path):
    a, b = topology.ns("a"), topology.ns("b")
    ia, ib = topology.link(a, b, "10.99.0.1/24", "10.99.0.2/24")
    a.addr("lo", "192.168.201.1/32")
    b.addr("lo", "192.168.202.1/32")
    a.route("192.168.202.0/24", "via", "10.99.0.2", "src", "192.168.201.1")
    b.route("192.168.201.0/24", "via", "10.99.0.1", "src", "192.168.202.1")
    for n in (a, b):
        n.ip("xfrm", "state", "add", "src", "10.99.0.1", "dst", "10.99.0.2", "proto", "esp", "spi", "0x1001",
             "reqid", "1", "mode", "tunnel", "enc", "cbc(aes)", ENC_AB, "auth-trunc", "hmac(sha256)", AUTH_AB, "128")
        n.ip("xfrm", "state", "add", "src", "10.99.0.2", "dst", "10.99.0.1", "proto", "esp", "spi", "0x2002",
             "reqid", "2", "mode", "tunnel", "enc", "cbc(aes)", ENC_BA, "auth-trunc", "hmac(sha256)", AUTH_BA, "128")
    for n, me, peer, lo, hi, out_req, in_req in (
            (a, "10.99.0.1", "10.99.0.2", "192.168.201.0/24", "192.168.202.0/24", "1", "2"),
            (b, "10.99.0.2", "10.99.0.1", "192.168.202.0/24", "192.168.201.0/24", "2", "1")):
        n.ip("xfrm", "policy", "add", "src", lo, "dst", hi, "dir", "out", "tmpl", "src", me, "dst", peer,
             "proto", "esp", "reqid", out_req, "mode", "tunnel")
        n.ip("xfrm", "policy", "add", "src", hi, "dst", lo, "dir", "in", "tmpl", "src", peer, "dst", me,
             "proto", "esp", "reqid", in_req, "mode", "tunnel")
    # what each side sends: ingress taps also see the decrypted packets, so record egress only
    with Capture(a, ia, tmp_path / "a.pcap", direction="out") as ca, \
            Capture(b, ib, tmp_path / "b.pcap", direction="out") as cap:
        assert a.ping("192.168.202.1", 3, 2, "-I", "192.168.201.1")
    protos = [p["IP"].proto for c in (ca, cap) for p in c.packets() if p.haslayer("IP")]
    assert protos.count(50) >= 6, protos          # requests and replies, all ESP
    clear = [p.summary() for c in (ca, cap) for p in c.packets() if p.haslayer("ICMP")]
    assert not clear, f"ICMP crossed the link in clear: {clear}"
    stats = a.ip("-s", "xfrm", "state").stdout
    assert "3(packets)" in stats.replace(" ", ""), stats
