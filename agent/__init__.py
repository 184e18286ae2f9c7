"""mipmobike: RFC 5266 secure roaming (Mobile IPv4 + IKEv2/MOBIKE) for Linux."""

__version__ = "0.1.0"
