"""The debug option vpn.debug_keylog: IKE keys for tshark, written 0600, only when configured."""

import asyncio
import os
import stat

from agent.ike.installer import RecordingInstaller
from tests.netns.test_vpn_mobike import vpn_for


def test_debug_keylog_written_0600_and_tshark_reads_it(gateway_lab, tmp_path):
    lab = gateway_lab
    keylog = tmp_path / "ike-keys"

    async def main(path):
        vpn = vpn_for(lab, tmp_path, RecordingInstaller())
        vpn.vcfg.debug_keylog = path
        try:
            await vpn.update(lab.client_if, lab.client_addr)
            return vpn.status()["ike_spi_i"]
        finally:
            await vpn.stop()

    # off by default: nothing written anywhere
    asyncio.run(main(None))
    assert not keylog.exists()
    spi_i = asyncio.run(main(str(keylog)))
    st = os.stat(keylog)
    assert stat.S_IMODE(st.st_mode) == 0o600
    fields = keylog.read_text().strip().splitlines()[-1].split(",")
    # SPIi, SPIr, SK_ei, SK_er, "encryption", SK_ai, SK_ar, "integrity": tshark's ikev2_decryption_table
    assert len(fields) == 8 and fields[0] == spi_i and fields[4].startswith('"')
