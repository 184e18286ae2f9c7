"""NETLINK_XFRM for Python, built on pyroute2's netlink message classes."""

from .sockopt import socket_bypass, socket_espinudp

__all__ = ["socket_bypass", "socket_espinudp"]
