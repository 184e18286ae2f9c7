"""Typed exceptions for XFRM operations.

Every kernel refusal becomes an :class:`XfrmError` (an ``OSError``) that
carries the errno, the operation ("add SA", "migrate", ...), what it was
applied to, and the kernel's extended-ack message when there is one.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Iterable, Optional


class XfrmError(OSError):
    """A NETLINK_XFRM request failed.

    ``errno``: the kernel's error number; ``operation``: what was attempted;
    ``target``: a short description of the object (never key material);
    ``kernel_message``: the extended ack text, if the kernel gave one.
    """

    def __init__(self, code: int, operation: str, target: str = "",
                 kernel_message: Optional[str] = None, message: Optional[str] = None):
        self.operation = operation
        self.target = target
        self.kernel_message = kernel_message or None
        if message is None:
            message = f"{operation}{' ' + target if target else ''}: {os.strerror(code)}"
            if self.kernel_message:
                message += f" ({self.kernel_message})"
        super().__init__(code, message)

    def __str__(self):
        return f"[Errno {self.errno}] {self.strerror}"


class XfrmNotFound(XfrmError):
    """No such SA or policy (ENOENT / ESRCH)."""


class XfrmExists(XfrmError):
    """The SA or policy is already there (EEXIST)."""


class XfrmPermissionError(XfrmError):
    """CAP_NET_ADMIN is missing in the network namespace (EPERM / EACCES)."""


class XfrmInvalid(XfrmError):
    """The kernel rejected the request as malformed or inconsistent (EINVAL)."""


class XfrmUnsupported(XfrmError):
    """The running kernel lacks a feature the request needs."""


class EspUnavailable(XfrmUnsupported):
    """The kernel has no ESP (CONFIG_INET_ESP / esp4 / esp6 missing)."""


class AlgorithmUnavailable(XfrmUnsupported):
    """The kernel crypto API has no implementation of an algorithm."""


class MigrateUnsupported(XfrmUnsupported):
    """XFRM_MSG_MIGRATE is not built in (CONFIG_XFRM_MIGRATE unset)."""


class NamespaceNotFound(XfrmError):
    """The network namespace to open the socket in does not exist."""


_BY_ERRNO = {
    _errno.ENOENT: XfrmNotFound,
    _errno.ESRCH: XfrmNotFound,
    _errno.EEXIST: XfrmExists,
    _errno.EPERM: XfrmPermissionError,
    _errno.EACCES: XfrmPermissionError,
    _errno.EINVAL: XfrmInvalid,
}

_PROTO_NAMES = {50: "ESP", 51: "AH", 108: "IPComp"}


def from_kernel(code: int, operation: str, target: str = "",
                kernel_message: Optional[str] = None, *, proto: Optional[int] = None,
                algorithms: Iterable[str] = ()) -> XfrmError:
    """The exception for a kernel error ``code`` answering ``operation``.

    ``proto`` and ``algorithms`` describe the SA being added, so that the
    "this kernel has no ESP" and "no such algorithm" cases get messages that
    say exactly that.
    """
    code = abs(code)
    if operation in ("add SA", "update SA", "allocate SPI") and code == _errno.EPROTONOSUPPORT:
        name = _PROTO_NAMES.get(proto or 50, f"IP protocol {proto}")
        module = {"ESP": "esp4/esp6", "AH": "ah4/ah6", "IPComp": "ipcomp/ipcomp6"}.get(name, "")
        text = (f"{operation} {target}: this kernel has no {name} support, so it cannot "
                f"hold {name} SAs (CONFIG_INET_{name.upper()} not built, or module "
                f"{module} missing)")
        if kernel_message:
            text += f" [kernel: {kernel_message}]"
        cls = EspUnavailable if name == "ESP" else XfrmUnsupported
        return cls(code, operation, target, kernel_message, message=text)
    if operation in ("add SA", "update SA") and code == _errno.ENOSYS:
        names = ", ".join(algorithms) or "?"
        text = (f"{operation} {target}: the kernel crypto API lacks an algorithm of this SA "
                f"({names})")
        if kernel_message:
            text += f" [kernel: {kernel_message}]"
        return AlgorithmUnavailable(code, operation, target, kernel_message, message=text)
    if operation == "migrate" and code == _errno.ENOPROTOOPT:
        text = (f"migrate {target}: this kernel has no XFRM_MSG_MIGRATE "
                f"(CONFIG_XFRM_MIGRATE not set)")
        return MigrateUnsupported(code, operation, target, kernel_message, message=text)
    cls = _BY_ERRNO.get(code, XfrmError)
    return cls(code, operation, target, kernel_message)
