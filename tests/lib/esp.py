"""Two namespaces joined by a manually keyed ESP tunnel (``ip xfrm``), for the kernel tier.

    a (10.99.0.1; inner 192.168.201.1 on lo) <- ESP tunnel mode -> b (10.99.0.2; inner 192.168.202.1 on lo)

Traffic between the inner addresses goes through the tunnel; the outer addresses talk in clear.
"""

from __future__ import annotations

A, B, A_IN, B_IN = "10.99.0.1", "10.99.0.2", "192.168.201.1", "192.168.202.1"
ENC_AB, ENC_BA = "0x" + "0123456789abcdef" * 2, "0x" + "fedcba9876543210" * 2
AUTH_AB, AUTH_BA = "0x" + "00112233" * 8, "0x" + "ffeeddcc" * 8


def esp_tunnel(topology):
    """(a, b, a's interface, b's interface) with the states and policies in place on both."""
    a, b = topology.ns("a"), topology.ns("b")
    ia, ib = topology.link(a, b, f"{A}/24", f"{B}/24")
    a.addr("lo", f"{A_IN}/32")
    b.addr("lo", f"{B_IN}/32")
    a.route("192.168.202.0/24", "via", B, "src", A_IN)
    b.route("192.168.201.0/24", "via", A, "src", B_IN)
    for n in (a, b):
        n.ip("xfrm", "state", "add", "src", A, "dst", B, "proto", "esp", "spi", "0x1001", "reqid", "1",
             "mode", "tunnel", "enc", "cbc(aes)", ENC_AB, "auth-trunc", "hmac(sha256)", AUTH_AB, "128")
        n.ip("xfrm", "state", "add", "src", B, "dst", A, "proto", "esp", "spi", "0x2002", "reqid", "2",
             "mode", "tunnel", "enc", "cbc(aes)", ENC_BA, "auth-trunc", "hmac(sha256)", AUTH_BA, "128")
    for n, me, peer, lo, hi, out_req, in_req in ((a, A, B, "192.168.201.0/24", "192.168.202.0/24", "1", "2"),
                                                  (b, B, A, "192.168.202.0/24", "192.168.201.0/24", "2", "1")):
        n.ip("xfrm", "policy", "add", "src", lo, "dst", hi, "dir", "out", "tmpl", "src", me, "dst", peer,
             "proto", "esp", "reqid", out_req, "mode", "tunnel")
        n.ip("xfrm", "policy", "add", "src", hi, "dst", lo, "dir", "in", "tmpl", "src", peer, "dst", me,
             "proto", "esp", "reqid", in_req, "mode", "tunnel")
    return a, b, ia, ib
