"""The strongSwan gateway fixture: a strongSwan client connects with PSK and gets a virtual IP."""

import re

from tests.lib.swan import Charon, client_swanctl


def test_strongswan_client_gets_virtual_ip(gateway_lab, procs, tmp_path, ipsec_backend):
    lab = gateway_lab
    cl = Charon(tmp_path / "swan", lab.client, "client", procs, ipsec=ipsec_backend)
    cl.write_swanctl(client_swanctl(lab.gw_addr, [lab.inside_net], lab.psk))
    cl.start()
    cl.load_all()
    cl.initiate("home", ike="home")
    sas = lab.gw.list_sas()
    assert "ESTABLISHED" in sas, sas
    m = re.search(r"remote '[^']*' @ [\d.]+\[\d+\] \[(10\.10\.100\.\d+)\]", sas)
    assert m, f"no virtual IP from the pool in the gateway's SA list:\n{sas}"
    vip = m.group(1)
    addrs = lab.client.ip("-4", "-o", "addr").stdout
    assert vip in addrs, f"virtual IP {vip} not installed on the client:\n{addrs}"
    # traffic from the virtual IP reaches the inside through the tunnel
    assert lab.client.ping(lab.internal_addr, 3, 2, "-I", vip)
