"""The control socket every daemon (mn, ha, fa) serves, and its client.

A Unix stream socket (mode 0600, root only) speaking one JSON object per line:
request ``{"cmd": "status"}`` -> reply ``{"ok": true, "result": {...}}`` or
``{"ok": false, "error": "..."}``. Daemons register handlers by command name.
``mipmobike status --socket PATH [--json]`` is the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from typing import Any, Awaitable, Callable

log = logging.getLogger("mipmobike.control")

DEFAULT_DIR = "/run/mipmobike"
Handler = Callable[[dict], Any | Awaitable[Any]]
MAX_REQUEST = 65536


def default_socket(role: str) -> str:
    return os.path.join(DEFAULT_DIR, f"{role}.sock")


class ControlServer:
    def __init__(self, path: str) -> None:
        self.path = path
        self.handlers: dict[str, Handler] = {}
        self._server: asyncio.AbstractServer | None = None

    def register(self, cmd: str, handler: Handler) -> None:
        self.handlers[cmd] = handler

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=MAX_REQUEST)
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(writer, {"ok": False, "error": "request too long"})
                    return
                if not line:
                    return
                await self._reply(writer, await self._dispatch(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("expected an object with a string 'cmd'")
        except (ValueError, RecursionError) as e:     # RecursionError: absurdly nested JSON
            return {"ok": False, "error": f"bad request: {type(e).__name__}"}
        handler = self.handlers.get(req["cmd"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {req['cmd']!r}; known: {sorted(self.handlers)}"}
        try:
            result = handler(req)
            if asyncio.iscoroutine(result):
                result = await result
            return {"ok": True, "result": result}
        except Exception as e:  # a handler bug must not kill the daemon
            log.exception("control command %s failed", req["cmd"])
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, obj: dict) -> None:
        writer.write(json.dumps(obj, default=str).encode() + b"\n")
        await writer.drain()


class ControlError(RuntimeError):
    pass


def request(path: str, cmd: str, timeout: float = 5.0, **args) -> Any:
    """Blocking client call: send one command, return its result or raise ControlError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            raise ControlError(f"cannot reach the daemon at {path}: {e.strerror or e}") from None
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError(f"garbled reply from {path}") from None
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return reply["result"]
