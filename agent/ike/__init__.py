"""IKEv2 initiator (RFC 7296) with NAT-T, sans-I/O.

Public API:
    IkeConfig, PskAuth, CertAuth, CaTrust, Identity   -- configuration
    IkeConnection                                      -- the state machine
    events: IkeSaEstablished, ChildSaEstablished, ChildSaFailed, ChildSaDeleted,
            IkeSaDeleted, AuthFailed, IkeFailed, EspSa, MobikeStarted, AddressUpdated,
            MobikeFailed, IkeSaRekeyed, LivenessChecked
    tshark_ikev2_line, append_tshark_keys              -- key export for tshark

    agent.ike.aio.AsyncIkeDriver                       -- the asyncio driver (sockets, timers, kernel)
    agent.ike.installer.XfrmInstaller / RecordingInstaller -- where CHILD SAs go
    agent.ike.driver.BlockingDriver                    -- a blocking loop for tools and tests
"""

from .auth import Identity
from .config import CaTrust, CertAuth, IkeConfig, PskAuth
from .connection import ChildSa, IkeConnection, Path, State
from .errors import (
    IkeAuthError, IkeConfigError, IkeCryptoError, IkeDecodeError, IkeError, IkeIntegrityError,
    IkeProposalError,
)
from .events import (
    AddressUpdated, AuthFailed, ChildSaDeleted, ChildSaEstablished, ChildSaFailed, EspSa, Event, IkeFailed,
    IkeSaDeleted, IkeSaEstablished, IkeSaRekeyed, LivenessChecked, MobikeFailed, MobikeStarted,
)
from .keylog import append_tshark_keys, tshark_ikev2_line
from .proposals import EspProposal, IkeProposal

__all__ = [
    "Identity", "CaTrust", "CertAuth", "IkeConfig", "PskAuth", "ChildSa", "IkeConnection", "Path",
    "State", "IkeAuthError", "IkeConfigError", "IkeCryptoError", "IkeDecodeError", "IkeError",
    "IkeIntegrityError", "IkeProposalError", "AuthFailed", "ChildSaDeleted", "ChildSaEstablished",
    "ChildSaFailed", "EspSa", "Event", "IkeFailed", "IkeSaDeleted", "IkeSaEstablished", "AddressUpdated",
    "IkeSaRekeyed", "LivenessChecked", "MobikeFailed", "MobikeStarted",
    "append_tshark_keys", "tshark_ikev2_line", "EspProposal", "IkeProposal",
]
