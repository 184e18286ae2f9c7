"""The two exception types of the Mobile IPv4 core."""

from __future__ import annotations


class MipDecodeError(ValueError):
    """Bytes that are not a well-formed Mobile IPv4 / agent-discovery message.

    The only exception any decoder in :mod:`agent.mip` raises; the message
    names what was wrong (``"Registration Request: truncated fixed part
    (17 of 24 bytes)"``).
    """


class MipConfigError(ValueError):
    """An invalid configuration value (for example an SPI below 256)."""
