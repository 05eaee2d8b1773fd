"""A small HTTP CONNECT proxy for tests (asyncio, in a thread): Basic authentication, a log of the
tunnels it opened, and an optional TLS-inspecting mode that terminates TLS with its own CA.

Only loopback targets are tunnelled; anything else gets 403 (tests never leave this machine).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
from dataclasses import dataclass, field

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ConnectProxy:
    username: str | None = None
    password: str | None = None
    #: Inspecting mode: present this context's certificate to the client and open a new TLS session
    #: upstream (as Zscaler-style proxies do). Client certificates cannot pass it.
    intercept: ssl.SSLContext | None = None
    tunnels: list[str] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connect-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "ConnectProxy":
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("proxy did not start")
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    def url(self, username: str | None = None, password: str | None = None) -> str:
        user = username if username is not None else self.username
        pw = password if password is not None else self.password
        cred = f"{user}:{pw}@" if user is not None else ""
        return f"http://{cred}127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    # -- one client -----------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, status: int, reason: str, extra: str = "") -> None:
        writer.write(f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request, *header_lines = head.split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        method, target, _ = request.split(" ", 2)
        if method != "CONNECT":
            self.refused.append(405)
            await self._reply(writer, 405, "Method Not Allowed")
            return
        if self.username is not None:
            expected = "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            if headers.get("proxy-authorization") != expected:
                self.refused.append(407)
                await self._reply(writer, 407, "Proxy Authentication Required", 'Proxy-Authenticate: Basic realm="test"\r\n')
                return
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        if host not in LOOPBACK:
            self.refused.append(403)
            await self._reply(writer, 403, "Forbidden")
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                host, int(port), ssl=self._upstream_tls() if self.intercept else None,
                server_hostname=host if self.intercept else None,
            )
        except OSError:
            self.refused.append(502)
            await self._reply(writer, 502, "Bad Gateway")
            return
        self.tunnels.append(target)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        if self.intercept is not None:
            await writer.start_tls(self.intercept)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            up_writer.close()

    @staticmethod
    def _upstream_tls() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        finally:
            if dst.can_write_eof():
                try:
                    dst.write_eof()
                except OSError:
                    pass
            else:
                dst.close()
