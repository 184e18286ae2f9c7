"""i-HA / i-FA configuration: the examples parse, errors name the key, key files must be 0600."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from agent.config import ConfigError
from agent.fa import config as fa_config
from agent.ha import config as ha_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _key(tmp_path, name="k.key", mode=0o600, text="00112233445566778899aabbccddeeff") -> str:
    p = tmp_path / name
    p.write_text(text)
    os.chmod(p, mode)
    return str(p)


def _example(tmp_path, name) -> dict:
    text = (EXAMPLES / name).read_text()
    key = _key(tmp_path)
    return tomllib.loads(re.sub(r'key_file = "[^"]*"', f'key_file = "{key}"', text))


def _ha(tmp_path, **over) -> dict:
    doc = {"ha": {"address": "10.1.0.2", "nodes": [
        {"home_address": "10.1.0.100", "spi": 256, "key_file": _key(tmp_path)}]}}
    doc["ha"].update(over)
    return doc


def test_ha_example_parses(tmp_path):
    s = ha_config.parse(_example(tmp_path, "ha.toml"))
    assert str(s.address) == "10.1.0.2" and [str(a) for a in s.listen] == ["10.1.0.2"]
    assert s.home_interface == "eth0" and s.dataplane.backend == "auto" and s.dataplane.mtu == 1480
    n1, n2 = s.engine.nodes
    assert n1.nai == b"mn1@corp.example" and n1.reverse_tunnel_required and n1.sa.spi == 256
    assert n2.max_lifetime == 600 and n2.sa.key == bytes.fromhex("00112233445566778899aabbccddeeff")
    assert [str(p) for p in s.engine.trusted_prefixes] == ["10.0.0.0/8"]
    assert list(map(str, s.engine.fa_sas)) == ["10.20.0.1"]


def test_fa_example_parses(tmp_path):
    s = fa_config.parse(_example(tmp_path, "fa.toml"))
    assert s.interface == "eth1" and str(s.address) == "10.20.0.1"
    assert [str(a) for a in s.engine.care_of_addresses] == ["10.20.0.1"]
    assert s.engine.advertisement_interval == 5.0 and s.engine.advertisement_lifetime == 15
    assert list(map(str, s.engine.ha_sas)) == ["10.1.0.2"] and s.dataplane.route_protocol == 181


def test_ha_defaults(tmp_path):
    s = ha_config.parse(_ha(tmp_path))
    assert s.listen == [s.address] and s.port == 434 and s.engine.max_lifetime == 1800
    assert s.dataplane.route_protocol == 180 and s.dataplane.backend == "auto"
    assert s.control_socket == "/run/mipmobike/ha.sock"


@pytest.mark.parametrize("over,key,reason", [
    ({"address": "10.1.0.999"}, "ha.address", "IPv4"),
    ({"max_lifetime": 0}, "ha.max_lifetime", "between"),
    ({"trusted_prefixes": ["10.0.0.0/33"]}, "ha.trusted_prefixes[0]", "prefix"),
    ({"colour": "blue"}, "ha.colour", "unknown key"),
    ({"nodes": []}, "ha.nodes", "at least one"),
    ({"dataplane": {"backend": "gre"}}, "ha.dataplane.backend", "one of"),
    ({"dataplane": {"device_prefix": "toolong"}}, "ha.dataplane.device_prefix", "1..4"),
    ({"home_interface": "x" * 16}, "ha.home_interface", "interface name"),
])
def test_ha_errors_name_the_key(tmp_path, over, key, reason):
    with pytest.raises(ConfigError) as e:
        ha_config.parse(_ha(tmp_path, **over))
    assert e.value.key == key and reason in e.value.reason, str(e.value)


def test_ha_node_errors(tmp_path):
    k = _key(tmp_path)
    for node, key, reason in [
        ({"home_address": "10.1.0.100", "spi": 12, "key_file": k}, "ha.nodes[0].spi", "between 256"),
        ({"home_address": "10.1.0.100", "spi": 256, "key_file": k, "algorithm": "sha1"},
         "ha.nodes[0].algorithm", "one of"),
        ({"home_address": "10.1.0.100", "spi": 256}, "ha.nodes[0].key_file", "required"),
        ({"home_address": "10.1.0.100", "spi": 256, "key_file": k, "replay": "never"},
         "ha.nodes[0].replay", "one of"),
    ]:
        with pytest.raises(ConfigError) as e:
            ha_config.parse({"ha": {"address": "10.1.0.2", "nodes": [node]}})
        assert e.value.key == key and reason in e.value.reason, str(e.value)
    dup = {"home_address": "10.1.0.100", "spi": 256, "key_file": k}
    with pytest.raises(ConfigError) as e:
        ha_config.parse({"ha": {"address": "10.1.0.2", "nodes": [dup, dict(dup, spi=257)]}})
    assert e.value.key == "ha.nodes[1].home_address" and "already" in e.value.reason


def test_key_file_must_be_0600(tmp_path):
    loose = _key(tmp_path, "loose.key", 0o644)
    with pytest.raises(ConfigError) as e:
        ha_config.parse({"ha": {"address": "10.1.0.2", "nodes": [
            {"home_address": "10.1.0.100", "spi": 256, "key_file": loose}]}})
    assert e.value.key == "ha.nodes[0].key_file" and "0600" in e.value.reason
    with pytest.raises(ConfigError) as e:
        fa_config.parse({"fa": {"interface": "eth1", "address": "10.20.0.1", "home_agents": [
            {"address": "10.1.0.2", "spi": 300, "key_file": loose}]}})
    assert e.value.key == "fa.home_agents[0].key_file"


@pytest.mark.parametrize("over,key", [
    ({"interface": ""}, "fa.interface"),
    ({"address": "nope"}, "fa.address"),
    ({"care_of_addresses": ["1.2.3"]}, "fa.care_of_addresses[0]"),
    ({"advertisement_interval": -1}, "fa.advertisement_interval"),
    ({"registration_lifetime": 70000}, "fa.registration_lifetime"),
    ({"extra": 1}, "fa.extra"),
])
def test_fa_errors_name_the_key(over, key):
    doc = {"fa": {"interface": "eth1", "address": "10.20.0.1"}}
    doc["fa"].update(over)
    with pytest.raises(ConfigError) as e:
        fa_config.parse(doc)
    assert e.value.key == key, str(e.value)


def test_fa_interval_zero_means_solicited_only():
    s = fa_config.parse({"fa": {"interface": "eth1", "address": "10.20.0.1", "advertisement_interval": 0}})
    assert s.engine.advertisement_interval is None


def test_check_config_understands_both(tmp_path):
    from agent.check_config import check

    for name in ("ha.toml", "fa.toml"):
        text = (EXAMPLES / name).read_text()
        key = _key(tmp_path)
        p = tmp_path / name
        p.write_text(re.sub(r'key_file = "[^"]*"', f'key_file = "{key}"', text))
        assert check(str(p)) == name.split(".")[0]
