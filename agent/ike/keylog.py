"""Export of IKE SA keys for tshark / Wireshark (debugging only).

Wireshark's IKEv2 dissector reads a UAT file ``ikev2_decryption_table`` from
its personal configuration directory (``WIRESHARK_CONFIG_DIR``); one line per
IKE SA:

    SPIi,SPIr,SK_ei,SK_er,"<encryption name>",SK_ai,SK_ar,"<integrity name>"

hex without separators; for AES-GCM the SK_e* values include the 4-byte salt
and the integrity keys are empty with "NONE [RFC4306]". These keys decrypt
the whole IKE SA: the file is created with mode 0600 and an existing file
with a wider mode is refused.
"""

from __future__ import annotations

import os
import stat

from .crypto import IkeKeys

_NONE_INTEG = "NONE [RFC4306]"


def tshark_ikev2_line(keys: IkeKeys) -> str:
    s = keys.suite
    integ = s.integ.wireshark if s.integ else _NONE_INTEG
    return (f'{keys.spi_i.hex()},{keys.spi_r.hex()},{keys.sk_ei.hex()},{keys.sk_er.hex()},'
            f'"{s.encr.wireshark}",{keys.sk_ai.hex()},{keys.sk_ar.hex()},"{integ}"')


def append_tshark_keys(path: str, keys: IkeKeys) -> None:
    """Append one IKE SA to an ikev2_decryption_table file (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise PermissionError(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; refusing to write keys "
                                  "into a file others can read")
        os.write(fd, (tshark_ikev2_line(keys) + "\n").encode())
    finally:
        os.close(fd)
