"""Typed errors of the IKEv2 core."""

from __future__ import annotations

from .const import NotifyType


class IkeError(Exception):
    """Base class of every error raised by agent.ike."""


class IkeDecodeError(IkeError):
    """A message or payload does not parse.

    ``notify`` is the notify type a responder would answer with
    (INVALID_SYNTAX, UNSUPPORTED_CRITICAL_PAYLOAD, INVALID_MAJOR_VERSION) and
    ``notify_data`` its data (the payload type for an unsupported critical
    payload).
    """

    def __init__(self, reason: str, notify: int = NotifyType.INVALID_SYNTAX,
                 notify_data: bytes = b""):
        super().__init__(reason)
        self.reason = reason
        self.notify = int(notify)
        self.notify_data = notify_data


class IkeIntegrityError(IkeError):
    """The checksum / ICV of an SK payload is wrong (or its layout is)."""


class IkeCryptoError(IkeError):
    """A key exchange value or a signature is unusable."""


class IkeAuthError(IkeError):
    """The peer's authentication (AUTH, certificate, identity) failed."""


class IkeProposalError(IkeError):
    """A proposal string or a responder's choice is invalid."""


class IkeConfigError(IkeError):
    """The configuration is incomplete or inconsistent."""
