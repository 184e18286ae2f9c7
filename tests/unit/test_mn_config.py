"""Mobile node configuration: valid files load, every mistake names its key."""

import pytest

from agent import check_config
from agent.config import ConfigError
from agent.mn import config

GOOD = """
[mn]
interfaces = ["eth0"]
home_address = "10.1.0.100"
home_agent = "10.1.0.1"
home_prefix = "10.1.0.0/24"
spi = 256
key_file = "{key}"

[vpn]
gateway = "198.51.100.1"
gateway_id = "gw.vpn.example"
local_id = "mn1@vpn.example"
psk_file = "{psk}"
internal_prefixes = ["10.0.0.0/8"]
"""


@pytest.fixture
def files(tmp_path):
    key, psk = tmp_path / "mn.key", tmp_path / "vpn.psk"
    key.write_text("00112233445566778899aabbccddeeff")
    psk.write_text("a shared secret")
    key.chmod(0o600)
    psk.chmod(0o600)
    return tmp_path, key, psk


def write(tmp_path, text):
    p = tmp_path / "mn.toml"
    p.write_text(text)
    return str(p)


def test_good_config_loads(files):
    d, key, psk = files
    cfg = config.load(write(d, GOOD.format(key=key, psk=psk)))
    assert str(cfg.home_address) == "10.1.0.100" and cfg.spi == 256 and cfg.algorithm == "hmac-md5"
    assert cfg.key == bytes.fromhex("00112233445566778899aabbccddeeff")
    assert cfg.vpn.psk == b"a shared secret"
    assert "key=" not in repr(cfg)          # the key never shows in a repr (logs)
    assert check_config.check(write(d, GOOD.format(key=key, psk=psk))) == "mn"


@pytest.mark.parametrize("change, key, reason", [
    (("spi = 256", "spi = 12"), "mn.spi", "must be between 256"),
    (('home_agent = "10.1.0.1"', 'home_agent = "10.1.0"'), "mn.home_agent", "IPv4 address"),
    (('home_address = "10.1.0.100"', 'home_address = "10.9.0.100"'), "mn.home_address", "not inside"),
    (('interfaces = ["eth0"]', 'interfaces = []'), "mn.interfaces", "non-empty"),
    (('spi = 256', 'spi = 256\nlifetme = 5'), "mn.lifetme", "unknown key"),
    (('internal_prefixes = ["10.0.0.0/8"]', 'internal_prefixes = ["192.168.0.0/16"]'),
     "vpn.internal_prefixes", "must contain the home agent"),
])
def test_bad_config_names_key(files, change, key, reason):
    d, k, psk = files
    text = GOOD.format(key=k, psk=psk).replace(*change)
    with pytest.raises(ConfigError) as e:
        config.load(write(d, text))
    assert e.value.key == key and reason in e.value.reason


def test_world_readable_key_refused(files):
    d, key, psk = files
    psk.chmod(0o644)
    with pytest.raises(ConfigError, match=r"^vpn\.psk_file: .*0644"):
        config.load(write(d, GOOD.format(key=key, psk=psk)))


def test_check_config_command(files, capsys):
    from agent import cli
    d, key, psk = files
    assert cli.main(["check-config", write(d, GOOD.format(key=key, psk=psk))]) == 0
    assert "valid mn configuration" in capsys.readouterr().out
    assert cli.main(["check-config", write(d, GOOD.format(key=key, psk=psk).replace("spi = 256", "spi = -1"))]) == 1
    assert "mn.spi" in capsys.readouterr().err


def test_shipped_example_is_valid(files):
    """examples/mn.toml loads once its key files exist (paths swapped for test ones)."""
    import pathlib
    d, key, psk = files
    text = (pathlib.Path(__file__).parents[2] / "examples" / "mn.toml").read_text()
    text = text.replace("/etc/mipmobike/mn.key", str(key)).replace("/etc/mipmobike/vpn.psk", str(psk))
    cfg = config.load(write(d, text))
    assert cfg.vpn is not None and cfg.use_fa and cfg.gate_backend == "auto"


@pytest.mark.parametrize("change, key, reason", [
    (("[vpn]", "[mn.detection]\ninitial_timeout = nan\n[vpn]"), "mn.detection.initial_timeout", "finite"),
    (("spi = 256", "spi = 256\nrenew_fraction = inf"), "mn.renew_fraction", "finite"),
    (("spi = 256", "spi = 256\ndetection = 3"), "mn.detection", "must be a table"),
    (("[vpn]", "[mn.detection]\ninitial_timeout = 5.0\nmax_timeout = 1.0\n[vpn]"),
     "mn.detection.max_timeout", "initial_timeout"),
])
def test_hostile_values_name_the_key(files, change, key, reason):
    d, k, psk = files
    with pytest.raises(ConfigError) as e:
        config.load(write(d, GOOD.format(key=k, psk=psk).replace(*change)))
    assert e.value.key == key and reason in e.value.reason


def test_psk_not_in_repr(files):
    d, key, psk = files
    cfg = config.load(write(d, GOOD.format(key=key, psk=psk)))
    assert b"a shared secret" not in repr(cfg).encode() and "shared secret" not in repr(cfg)


def test_fifo_key_file_refused_without_hanging(tmp_path):
    import os
    fifo = tmp_path / "k.fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        from agent.config import read_key_file
        read_key_file(str(fifo), "mn.key_file")


def test_garbage_proposals_refused_at_load(files):
    """A proposal the IKE code cannot parse is a config error now, not a failure at the first IKE start."""
    d, k, psk = files
    base = GOOD.format(key=k, psk=psk)
    with pytest.raises(ConfigError) as e:
        config.load(write(d, base + 'ike_proposals = ["aes128-sha256-modp2048", "aes999-nonsense"]\n'))
    assert e.value.key == "vpn.ike_proposals[1]" and "aes999-nonsense" in e.value.reason
    with pytest.raises(ConfigError) as e:
        config.load(write(d, base + 'esp_proposals = ["chacha-bogus"]\n'))
    assert e.value.key == "vpn.esp_proposals[0]"
    cfg = config.load(write(d, base + 'ike_proposals = ["aes128-sha256-modp2048"]\n'))
    assert cfg.vpn.ike_proposals == ["aes128-sha256-modp2048"]


CERT_VPN = """
[vpn]
gateway = "198.51.100.1"
gateway_id = "gw.vpn.example"
local_id = "mn1@vpn.example"
auth = "cert"
cert = "{cert}"
key_file = "{ckey}"
ca = "{ca}"
internal_prefixes = ["10.0.0.0/8"]
"""


def test_certificate_files_checked_at_load(files):
    """Missing or unreadable certificate material names its key at load (and in check-config)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d, k, psk = files
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mn1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_p, key_p, ca_p = d / "mn.crt", d / "mn.pem", d / "ca.crt"
    cert_p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    key_p.chmod(0o600)
    head = GOOD.format(key=k, psk=psk).split("[vpn]")[0]

    def text(**kw):
        paths = dict(cert=cert_p, ckey=key_p, ca=ca_p)
        paths.update(kw)
        return head + CERT_VPN.format(**paths)

    cfg = config.load(write(d, text()))
    assert cfg.vpn.auth == "cert"
    for kw, key_name in ((dict(cert=d / "missing.crt"), "vpn.cert"), (dict(ca=d / "nope.crt"), "vpn.ca"),
                         (dict(ca=psk), "vpn.ca")):
        with pytest.raises(ConfigError) as e:
            config.load(write(d, text(**kw)))
        assert e.value.key == key_name and "cannot be loaded" in e.value.reason, e.value


def test_gate_ingress_hook(files):
    d, k, psk = files
    base = GOOD.format(key=k, psk=psk)
    assert config.load(write(d, base)).gate_ingress == "auto"
    assert config.load(write(d, base + '\n[gate]\ningress = "tc"\n')).gate_ingress == "tc"
    with pytest.raises(ConfigError) as e:
        config.load(write(d, base + '\n[gate]\ningress = "ebpf"\n'))
    assert e.value.key == "gate.ingress"
