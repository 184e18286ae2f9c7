"""The kernel tier runs where ESP exists: an ESP state pair made with `ip xfrm`, ping through it."""

from tests.lib.capture import Capture
from tests.lib.esp import A_IN, B_IN, esp_tunnel


def test_esp_tunnel_ping(topology, tmp_path):
    a, b, ia, ib = esp_tunnel(topology)
    # what each side sends: ingress taps also see the decrypted packets, so record egress only
    with Capture(a, ia, tmp_path / "a.pcap", direction="out") as ca, \
            Capture(b, ib, tmp_path / "b.pcap", direction="out") as cap:
        assert a.ping(B_IN, 3, 2, "-I", A_IN)
    protos = [p["IP"].proto for c in (ca, cap) for p in c.packets() if p.haslayer("IP")]
    assert protos.count(50) >= 6, protos          # requests and replies, all ESP
    clear = [p.summary() for c in (ca, cap) for p in c.packets() if p.haslayer("ICMP")]
    assert not clear, f"ICMP crossed the link in clear: {clear}"
    stats = a.ip("-s", "xfrm", "state").stdout
    assert "3(packets)" in stats.replace(" ", ""), stats
