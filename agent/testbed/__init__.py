"""The RFC 5266 testbed in network namespaces: ``Testbed(id).up()``, ``.move(net)``, ``.down()``.

See ``agent.testbed.testbed`` for the API, ``agent.testbed.layout`` for the
networks and the address plan, ``agent.testbed.cli`` for ``mipmobike testbed``.
"""

from .layout import LAYOUTS, Addresses, Layout, Net, figure1
from .testbed import STATE_ROOT, Testbed, TestbedError, addresses_plan

__all__ = ["Testbed", "TestbedError", "STATE_ROOT", "Layout", "Net", "Addresses", "LAYOUTS", "figure1",
           "addresses_plan"]
