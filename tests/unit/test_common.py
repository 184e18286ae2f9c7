"""Shared daemon plumbing: configuration errors, key files, the control socket, rate-limited logs."""

import asyncio
import logging
import os

import pytest

from agent import config, control
from agent.log import RateLimitedLog


def test_config_errors_name_the_key(tmp_path):
    d = {"ha": {"lifetime_cap": "long", "addr": "10.0.0.300", "nodes": [{"spi": 12}]}}
    with pytest.raises(config.ConfigError, match=r"^ha\.lifetime_cap: must be an integer"):
        config.get_int(d["ha"], "lifetime_cap", "ha")
    with pytest.raises(config.ConfigError, match=r"^ha\.addr: must be an IPv4 address"):
        config.get_ip(d["ha"], "addr", "ha")
    with pytest.raises(config.ConfigError, match=r"^ha\.nodes\[0\]\.spi: must be >= 256, got 12"):
        config.get_int(d["ha"]["nodes"][0], "spi", "ha.nodes[0]", min=256)
    with pytest.raises(config.ConfigError, match=r"^ha\.missing: is required"):
        config.get_str(d["ha"], "missing", "ha")
    with pytest.raises(config.ConfigError, match=r"^ha\.typo: unknown key"):
        config.check_unknown({"typo": 1}, {"lifetime_cap"}, "ha")
    bad = tmp_path / "bad.toml"
    bad.write_text("[ha\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.read_toml(str(bad))


def test_key_file_must_be_0600(tmp_path):
    k = tmp_path / "mn.key"
    k.write_text("0x00112233445566778899aabbccddeeff\n")
    k.chmod(0o644)
    with pytest.raises(config.ConfigError, match=r"^ha\.nodes\[0\]\.key_file: .*mode 0644.*0600"):
        config.read_key_file(str(k), "ha.nodes[0].key_file")
    k.chmod(0o600)
    assert config.read_key_file(str(k), "x") == bytes.fromhex("00112233445566778899aabbccddeeff")
    link = tmp_path / "link.key"
    link.symlink_to(k)
    with pytest.raises(config.ConfigError):
        config.read_key_file(str(link), "x")


def test_control_socket_round_trip(tmp_path):
    path = str(tmp_path / "ctl.sock")

    async def main():
        srv = control.ControlServer(path)
        srv.register("status", lambda req: {"mode": "c", "n": 3})

        async def slow(req):
            return {"echo": req.get("x")}
        srv.register("echo", slow)
        srv.register("boom", lambda req: 1 / 0)
        await srv.start()
        assert os.stat(path).st_mode & 0o777 == 0o600
        loop = asyncio.get_running_loop()
        r1 = await loop.run_in_executor(None, control.request, path, "status")
        r2 = await loop.run_in_executor(None, lambda: control.request(path, "echo", x=5))
        with pytest.raises(control.ControlError, match="ZeroDivisionError"):
            await loop.run_in_executor(None, control.request, path, "boom")
        with pytest.raises(control.ControlError, match="unknown command"):
            await loop.run_in_executor(None, control.request, path, "nope")
        await srv.close()
        return r1, r2

    r1, r2 = asyncio.run(main())
    assert r1 == {"mode": "c", "n": 3} and r2 == {"echo": 5}
    with pytest.raises(control.ControlError, match="cannot reach"):
        control.request(path, "status")


def test_rate_limited_log_counts(caplog):
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("t"), interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        assert rl.once("badauth", "10.0.0.1", "bad auth from %s", "10.0.0.1")
        assert not rl.once("badauth", "10.0.0.1", "bad auth from %s", "10.0.0.1")
        assert rl.once("badauth", "10.0.0.2", "bad auth from %s", "10.0.0.2")
        now[0] = 11
        assert rl.once("badauth", "10.0.0.1", "bad auth from %s", "10.0.0.1")
    assert len(caplog.records) == 3
    assert "+1 more" in caplog.records[-1].getMessage()


def test_certificate_key_checked_on_the_descriptor(tmp_path):
    """CertAuth.load refuses a readable, symlinked or FIFO private key, like every other secret."""
    import os
    from agent.ike.config import CertAuth
    from agent.ike.errors import IkeConfigError
    key = tmp_path / "k.pem"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n")
    key.chmod(0o644)
    with pytest.raises(IkeConfigError, match="0644"):
        CertAuth.load(str(tmp_path / "none.crt"), str(key))
    key.chmod(0o600)
    link = tmp_path / "l.pem"
    link.symlink_to(key)
    with pytest.raises(IkeConfigError):
        CertAuth.load(str(tmp_path / "none.crt"), str(link))
    fifo = tmp_path / "f.pem"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(IkeConfigError, match="not a regular file"):
        CertAuth.load(str(tmp_path / "none.crt"), str(fifo))
