"""The Figure-1 testbed with kernel ESP (the VM): up, a VPN client reaching the
correspondent with raw ESP, MOBIKE into the NAT (ESP-in-UDP), down leaves nothing."""

import subprocess
import time

from agent.testbed import Testbed
from tests.lib.names import RUN, ns_prefix


def test_testbed_with_kernel_esp_up_move_down(tmp_path):
    tb = Testbed(f"k{RUN}", root=tmp_path, ns_prefix=f"{ns_prefix()}tbk-", agents="none")
    try:
        tb.up(at="external-1")
        assert tb.ipsec == "kernel", "the kernel tier runs where the kernel has ESP"
        assert tb.static_address(50) == "198.51.100.50/24"            # (DHCP is shown in the netns tier)
        assert not tb.ping("mn", tb.addr.cn, 1, 1)                      # no plain way in
        client = tb.vpn_client()
        client.initiate("home-psk", "home-psk")
        sas = tb.gateway().list_sas()
        assert "INSTALLED, TUNNEL," in sas, sas                         # raw ESP, not UDP-encapsulated
        assert tb.ping("mn", tb.addr.cn, 2, 3)
        states = tb.exec("gw", ["ip", "xfrm", "state"]).stdout
        assert "proto esp" in states and "encap" not in states, states  # in the kernel, not libipsec
        tb.move("external-2")
        tb.static_address(50)
        deadline = time.monotonic() + 60
        while f"@ {tb.addr.nat_public}[" not in (sas := tb.gateway().list_sas()):
            assert time.monotonic() < deadline, sas
            time.sleep(0.5)
        assert "TUNNEL-in-UDP" in sas, sas
        assert tb.ping("mn", tb.addr.cn, 3, 3)
        tb.impair(loss=1, delay_ms=5)                                   # netem is there in this kernel
        assert "netem" in tb.exec("mn", ["tc", "qdisc", "show", "dev", tb.mn_if]).stdout
        tb.impair()
    finally:
        tb.down()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in names for n in tb.namespaces.values())
    assert not tb.dir.exists()
