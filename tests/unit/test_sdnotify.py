"""systemd readiness notification shared by the daemons (agent.sdnotify)."""

import os
import socket

from agent.ha.runtime import notify_ready
from agent.sdnotify import notify


def _listener(addr):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(addr)
    s.settimeout(2)
    return s


def test_notify_path_and_abstract(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with _listener(path) as s:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        notify("READY=1")
        assert s.recv(100) == b"READY=1"
        notify_ready("ha ready")
        assert s.recv(100) == b"READY=1\nSTATUS=ha ready"
    name = f"mipmobike-test-{os.getpid()}"
    with _listener("\0" + name) as s:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notify("STOPPING=1")
        assert s.recv(100) == b"STOPPING=1"


def test_notify_without_systemd_or_listener(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notify("READY=1")                                   # no-op
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    notify("READY=1")                                   # nobody listening: logged, not raised
