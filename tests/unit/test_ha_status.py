"""`mipmobike status`: the generic rendering and the client against a real control socket."""

from __future__ import annotations

import asyncio
import json
import threading

from agent import cli
from agent.control import ControlServer
from agent.status import render


def test_render_nested_and_tables():
    text = "\n".join(render({
        "role": "ha", "uptime": 1.5, "trusted": True, "none": None,
        "listen": ["10.1.0.2", "10.2.0.2"],
        "bindings": [{"home_address": "10.1.0.100", "care_of_address": "192.0.2.10", "remaining": 12.0},
                     {"home_address": "10.1.0.101", "care_of_address": "198.51.100.1", "remaining": None}],
        "counters": {"requests": 3, "replies_by_code": {"0": 2, "131": 1}},
        "empty": {},
    }))
    assert "role:     ha" in text and "trusted:  yes" in text and "none:     -" in text
    assert "listen:   10.1.0.2, 10.2.0.2" in text
    assert "bindings: (2)" in text
    assert "home_address  care_of_address  remaining" in text
    assert "10.1.0.101    198.51.100.1     -" in text
    assert "counters:\n  requests:        3\n  replies_by_code:\n    0:   2\n    131: 1" in text
    assert "empty: -" in text


def test_render_wall_clock_times():
    import time
    now = time.time()
    today = time.strftime("%H:%M:%S", time.localtime(now))
    text = "\n".join(render({
        "established_at": now, "uptime": 1234567890.5, "last_mobike": None,
        "timeline": [{"trigger": "link-up", "t_trigger": now, "ms_ready": 12.5}],
        "old_at": 1_000_000_000.25,
    }))
    assert f"established_at: {today}." in text                  # a wall-clock key: a time of day
    assert "uptime:         1.23457e+09" in text               # not a wall-clock key: the number
    assert "last_mobike:    -" in text
    assert f"link-up  {today}." in text and "12.5" in text
    old_day = time.strftime("%Y-%m-%d ", time.localtime(1_000_000_000.25))
    assert f"old_at:         {old_day}" in text                # another day: with the date


def test_status_client(tmp_path, capsys):
    path = str(tmp_path / "d.sock")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    server = ControlServer(path)
    server.register("status", lambda req: {"role": "test", "bindings": [], "counters": {"requests": 7}})

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ready.wait(5)
    try:
        assert cli.main(["status", "--socket", path, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["counters"]["requests"] == 7
        assert cli.main(["status", "--socket", path]) == 0
        out = capsys.readouterr().out
        assert "role:     test" in out and "requests: 7" in out
        assert cli.main(["status", "--socket", str(tmp_path / "nothing.sock")]) == 1
        assert "cannot reach" in capsys.readouterr().err
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()
