"""The trust-detection gate (RFC 5266 section 3.4) and RRQ steering.

Public API for the mobile node daemon:

    from agent.gate import Gate, GateState, open_detection_socket

    gate = Gate("mn")                                   # BPF, else netfilter; adopts installed state
    gate.set_allowed(home_agents=[(ha, 434)], gateways=[gw])
    gate.attach(ifname)                                 # closed (or the adopted state)
    sock = open_detection_socket(ifname, coa)           # RRQ leaves in the clear, on ifname
    gate.open(ifname) / gate.close(ifname) / gate.off(ifname)
    gate.counters(ifname); gate.status()
    gate.release()                                      # on exit: the gate stays as it is
"""

from .allowlist import AllowEntry, GateConfigError
from .core import DEFAULT_BPFFS, Gate
from .defs import GateError, GateState
from .steer import DETECT_MARK, open_detection_socket

__all__ = ["Gate", "GateState", "GateError", "GateConfigError", "AllowEntry", "DEFAULT_BPFFS",
           "DETECT_MARK", "open_detection_socket"]
