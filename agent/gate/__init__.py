"""The trust-detection gate (RFC 5266 section 3.4) and RRQ steering.

Public API for the mobile node daemon:

    from agent.gate import Gate, GateState, open_detection_socket

    gate = Gate("mn")                              # BPF, else netfilter; adopts an installed gate
    gate.set_allowed(home_agents=[(ha, 434)], gateways=[gw])   # ipset mipmobike-mn, mirrored to BPF
    gate.attach(ifname)                            # closed (or the state a predecessor left)
    gate.close(ifname)                             # detecting: only DHCP/ARP/RS-RA/RRQ/IKE/ESP pass
    sock = open_detection_socket(ifname, coa)      # its RRQ leaves in the clear on ifname, marked
    gate.open(ifname) / gate.off(ifname)
    gate.state(ifname); gate.interfaces(); gate.counters(ifname); gate.status()
    gate.release()                                 # exit, kernel keeps gating (crash-equivalent)
    gate.destroy()                                 # clean stop: detach everything, drop ipset and pins

Methods block for a few ms; from inside a running asyncio loop they run on a
private worker thread. Errors are ``GateError`` (kernel/attach problems) and
``GateConfigError`` (a bad address or port in the allow-list).
"""

from .allowlist import AllowEntry, GateConfigError
from .core import DEFAULT_BPFFS, Gate
from .defs import GateAbiError, GateError, GateState
from .steer import DETECT_MARK, open_detection_socket

__all__ = ["Gate", "GateState", "GateError", "GateAbiError", "GateConfigError", "AllowEntry", "DEFAULT_BPFFS",
           "DETECT_MARK", "open_detection_socket"]
