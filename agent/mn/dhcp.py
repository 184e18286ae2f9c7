"""DHCPv4 for an access interface, through pyroute2's asyncio client.

The agent needs the lease, not the client's own idea of routing: in modes c
and mc the default route goes into the Mobile IP tunnel, so no hook of the
client touches addresses or routes. ``Dhcp.acquire()`` returns a ``Lease``
(address, prefix, router, server, lease time); ``release()`` gives it back.
Leases are kept in memory only: a new link is a new network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass

from pyroute2.dhcp.client import AsyncDHCPClient, ClientConfig
from pyroute2.dhcp.fsm import State
from pyroute2.dhcp.leases import Lease as _PrLease

log = logging.getLogger("mipmobike.dhcp")


class _MemoryLease(_PrLease):
    def dump(self) -> None:
        pass

    @classmethod
    def load(cls, interface: str):
        return None


@dataclass(frozen=True)
class Lease:
    ifname: str
    address: ipaddress.IPv4Interface
    router: ipaddress.IPv4Address | None
    server: str | None
    lease_time: int | None

    @property
    def ip(self) -> ipaddress.IPv4Address:
        return self.address.ip


class DhcpError(RuntimeError):
    pass


class Dhcp:
    def __init__(self, ifname: str, timeout: float = 10.0) -> None:
        self.ifname, self.timeout = ifname, timeout
        self._client: AsyncDHCPClient | None = None

    async def acquire(self) -> Lease:
        await self.release()
        cfg = ClientConfig(interface=self.ifname, lease_type=_MemoryLease, handle_signals=False,
                           write_pidfile=False, release=True, host_name=None, vendor_id="mipmobike")
        client = AsyncDHCPClient(cfg)
        await client.__aenter__()
        self._client = client
        try:
            await client.bootstrap()
            await client.wait_for_state(State.BOUND, timeout=self.timeout)
        except (asyncio.TimeoutError, OSError) as e:
            await self.release()
            raise DhcpError(f"no DHCP lease on {self.ifname} within {self.timeout}s: {e}") from None
        pl = client.lease
        router = getattr(pl, "default_gateway", None)
        try:
            server = pl.ack["options"].get("server_id")
        except Exception:
            server = None
        return Lease(self.ifname, ipaddress.IPv4Interface(f"{pl.ip}/{pl.prefixlen}"),
                     ipaddress.IPv4Address(router) if router else None, server,
                     pl.ack["options"].get("lease_time") if hasattr(pl, "ack") else None)

    async def release(self, send: bool = True) -> None:
        """Stop the client; ``send=False`` when the link is gone (no DHCPRELEASE)."""
        client, self._client = self._client, None
        if client is not None:
            client.config.release = send
            try:
                await asyncio.wait_for(client.__aexit__(None, None, None), 3)
            except Exception as e:   # the link may already be gone
                log.debug("DHCP client on %s closed with %s", self.ifname, e)
