"""`mipmobike doctor --json` reports what was tried, and agrees with what the kernel does."""

import json
import subprocess
import sys

from tests.lib.swan import kernel_has_esp


def test_doctor_json_reports_tried_features():
    p = subprocess.run([sys.executable, "-m", "agent.cli", "doctor", "--json"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    c = r["checks"]
    for name in ("root", "xfrm_policy", "esp", "esp_gcm", "ipip", "xfrm_migrate", "tc_clsact", "bcc", "cls_bpf",
                 "xdp_veth", "tool:strongswan", "tool:dnsmasq", "tool:tshark", "tool:qemu"):
        assert name in c, name
    # the mobile node needs these everywhere the suite runs
    for name in ("root", "xfrm_policy", "xfrm_migrate", "tc_clsact", "bcc", "cls_bpf", "xdp_veth"):
        assert c[name]["ok"], (name, c[name])
    assert c["bcc"]["headers"]                     # which headers bcc compiled against
    has_esp = kernel_has_esp()
    assert c["esp"]["ok"] is has_esp
    assert r["tiers"]["kernel"] == ("native" if has_esp and c["ipip"]["ok"] else "vm")
    assert r["mobile_node_can_run"] is True
    # what the node cannot do here is said, not hidden behind "can run"
    assert any("no ESP" in x for x in r["limits"]) is (not has_esp)
    assert any("no ipip" in x for x in r["limits"]) is (not c["ipip"]["ok"])
    # nothing left behind by the scratch namespace
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "mmdoc-" not in ns
