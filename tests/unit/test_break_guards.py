"""Regression guards from a security review: properties that hold today.

- key files: a symlink, a group/world-readable file, a directory or an empty
  file is refused with a ConfigError naming the key;
- no key material in the repr/str of the objects that hold it;
- an established IKE SA: mutated, truncated or random datagrams never raise
  and never change its state (SPIs, message IDs, children, path, keys);
- Mobile IPv4, timestamp replay protection: mutated registration requests
  never change the home agent's bindings or identification state, mutated
  replies never change the mobile node's binding or pending attempt;
- the control socket: bad JSON, an unknown command and an oversized request
  get an error reply and the server keeps answering.

Bounded and seeded: a few thousand inputs per test.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import stat
import struct

import pytest

from agent.config import ConfigError, read_key_file
from agent.control import ControlServer
from agent.ike import PskAuth, State
from agent.mip import HaConfig, HaNode, HomeAgent
from tests.unit.test_ike_connection import established
from tests.unit.test_mip_support import COA, HA, HOA, T0, Rng, make_mn, sa

KEY_HEX = "00112233445566778899aabbccddeeff"


# ------------------------------------------------------------------------------ key files

def _key(tmp_path, name, mode=0o600, data=KEY_HEX.encode()):
    p = tmp_path / name
    p.write_bytes(data)
    os.chmod(p, mode)
    return str(p)


def test_key_file_good_is_read(tmp_path):
    assert read_key_file(_key(tmp_path, "k"), "mn.key_file") == bytes.fromhex(KEY_HEX)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o620, 0o602])
def test_key_file_readable_or_writable_by_others_is_refused(tmp_path, mode):
    with pytest.raises(ConfigError) as e:
        read_key_file(_key(tmp_path, "k", mode), "ha.nodes[0].key_file")
    assert e.value.key == "ha.nodes[0].key_file" and "mode" in e.value.reason


def test_key_file_symlink_directory_empty_refused(tmp_path):
    good = _key(tmp_path, "k")
    link = tmp_path / "link"
    os.symlink(good, link)
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    for path in (str(link), str(d), _key(tmp_path, "empty", data=b""), _key(tmp_path, "ws", data=b" \n\t")):
        with pytest.raises(ConfigError) as e:
            read_key_file(path, "vpn.psk_file")
        assert e.value.key == "vpn.psk_file"


# ------------------------------------------------------------------------------ secrets in repr

def test_key_holders_do_not_show_keys():
    import xfrm
    from agent.ike.events import EspSa
    secret = b"\xab" * 20
    objs = [
        PskAuth(secret),
        sa(key=secret),
        EspSa(1, "cbc(aes)", secret, "hmac(sha256)", secret, 128, None, 0, False),
        xfrm.Algorithms.gcm(secret),
        xfrm.Algorithms.cbc_hmac(b"\xab" * 16, b"\xab" * 32),
    ]
    for o in objs:
        text = repr(o) + str(o)
        assert "abab" not in text.lower() and "\\xab" not in text, type(o).__name__


def test_ike_keys_do_not_show_in_repr():
    n, evs = established()
    k = n.conn.keys
    text = repr(k) + str(k) + repr(n.conn.config) + "".join(repr(e) for e in evs)
    for v in (k.sk_d, k.sk_ai, k.sk_ar, k.sk_ei, k.sk_er, k.sk_pi, k.sk_pr,
              evs[1].inbound.encr_key, evs[1].outbound.encr_key):
        assert v.hex() not in text and repr(v) not in text


# ------------------------------------------------------------------------------ IKE: bad input

def _mutate(rnd: random.Random, b: bytes) -> bytes:
    b = bytearray(b)
    for _ in range(rnd.randint(1, 4)):
        if not b:
            break
        i = rnd.randrange(len(b))
        op = rnd.randrange(6)
        if op == 0:
            b[i] ^= 1 << rnd.randrange(8)
        elif op == 1:
            b[i] = rnd.randrange(256)
        elif op == 2:
            b[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        elif op == 3:
            del b[i:i + rnd.randint(1, 8)]
        elif op == 4:
            del b[i:]
        else:
            b[i:i + 4] = struct.pack("!I", rnd.choice([0, 0xFFFFFFFF, 0x7FFFFFFF, len(b)]))
    return bytes(b)


def _ike_snapshot(c):
    return (c.state, tuple(sorted(c.children)), c.spi_i, c.spi_r, c._peer_mid, c._next_mid, c.path,
            c.keys.sk_d, c.nat_local, c.nat_remote, tuple(c.peer_addresses), c.last_received)


def test_established_ike_sa_survives_mutated_datagrams_unchanged():
    logging.getLogger("agent.ike").setLevel(logging.ERROR)
    try:
        n, _ = established()
        c = n.conn
        good = n.gw.request(c.path.local, [])      # an authentic request, never delivered as is
        seeds = [good, good[4:], n.gw.init_resp, bytes(4) + n.gw.last[1]]
        originals = {good, good[4:]}
        before = _ike_snapshot(c)
        rnd = random.Random(5266)
        for i in range(6000):
            s = rnd.choice(seeds)
            d = _mutate(rnd, s) if i % 10 else bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 120)))
            if d in originals or (d[:4] == bytes(4) and d[4:] == good[4:]):
                continue
            local = c.path.local if i % 3 else (c.path.local[0], 500)
            c.receive_datagram(d, c.path.remote, local, n.now)
            out = c.datagrams_to_send(n.now)
            assert not out, (d.hex(), out)
            assert c.next_event() is None, d.hex()
            assert _ike_snapshot(c) == before, d.hex()
        assert c.state is State.ESTABLISHED and c.stats["dropped"] > 1000
    finally:
        logging.getLogger("agent.ike").setLevel(logging.NOTSET)


# ------------------------------------------------------------------------------ MIP: bad input

def _registered_pair():
    s = sa()
    ha = HomeAgent(HaConfig(HA, [HaNode(HOA, s)], trusted_prefixes=["192.0.2.0/24"]), rng=Rng())
    mn = make_mn(sa=s, accept_unauthenticated_fa_denials=False)
    mn.register(T0, COA)
    for _ in range(3):
        for d in mn.datagrams_to_send():
            ha.receive_datagram(d.data, str(COA), 434, str(HA), T0)
        for d in ha.datagrams_to_send():
            mn.receive_datagram(d.data, str(HA), 434, str(COA), T0)
    assert mn.binding is not None and mn.binding.tnc
    while mn.next_event() or ha.next_event():
        pass
    return ha, mn


def test_mutated_requests_never_change_home_agent_state():
    ha, mn = _registered_pair()
    mn.register(T0 + 1, COA)
    (rrq,) = mn.datagrams_to_send()
    st = ha._nodes[HOA]
    before = (repr(ha.bindings), st.last_ident)
    rnd = random.Random(3344)
    for _ in range(4000):
        d = _mutate(rnd, rrq.data)
        if d == rrq.data:
            continue
        ha.receive_datagram(d, str(COA), 434, str(HA), T0 + 1)
        ha.datagrams_to_send()
        assert ha.next_event() is None, d.hex()
        assert (repr(ha.bindings), st.last_ident) == before, d.hex()


def test_mutated_replies_never_change_mobile_node_state():
    ha, mn = _registered_pair()
    mn.register(T0 + 5, COA)
    (rrq,) = mn.datagrams_to_send()
    ha.receive_datagram(rrq.data, str(COA), 434, str(HA), T0 + 5)
    (rrp,) = ha.datagrams_to_send()

    def snap():
        a = mn._attempt
        return (mn.binding, a.care_of_address, a.deadline, len(a.sent), mn._renew_at, mn.clock_offset,
                mn._last_ident)
    before = snap()
    rnd = random.Random(5944)
    for _ in range(4000):
        d = _mutate(rnd, rrp.data)
        if d == rrp.data:
            continue
        mn.receive_datagram(d, str(HA), 434, str(COA), T0 + 5.1)
        assert not mn.datagrams_to_send() and mn.next_event() is None, d.hex()
        assert snap() == before, d.hex()
    mn.receive_datagram(rrp.data, str(HA), 434, str(COA), T0 + 5.1)   # the genuine reply still counts
    assert mn.binding.registered_at == T0 + 5 and not mn.pending


# ------------------------------------------------------------------------------ control socket

def test_control_socket_mode_and_bad_requests(tmp_path):
    async def main():
        path = str(tmp_path / "ctl.sock")
        srv = ControlServer(path)
        srv.register("status", lambda req: {"ok": 1})
        await srv.start()
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

            async def ask(data: bytes) -> bytes:
                r, w = await asyncio.open_unix_connection(path, limit=1 << 20)
                w.write(data)
                await w.drain()
                line = await asyncio.wait_for(r.readline(), 5)
                w.close()
                return line
            for bad in (b"not json\n", b"[1, 2]\n", b'{"cmd": 3}\n', b'{"cmd": "rm -rf"}\n',
                        b"\xff\xfe\xfd\n", b"x" * 200_000 + b"\n"):
                reply = await ask(bad)
                assert reply.startswith(b'{"ok": false'), (bad[:20], reply)
            assert await ask(b'{"cmd": "status"}\n') == b'{"ok": true, "result": {"ok": 1}}\n'
        finally:
            await srv.close()
        assert not os.path.exists(path)
    asyncio.run(main())
