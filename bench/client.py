"""A small asyncio HTTP/1.1 keep-alive client: the load of phases c (when wrk is not
installed), d and e.

Small on purpose: one pre-encoded request per call, Content-Length or chunked bodies,
reconnect when the server closed an idle connection. No dependency, and cheaper per
request than a general-purpose client, which matters when the load generator shares
two cores with the server it measures.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

# gunicorn's keepalive is 5 s: reconnect rather than reuse a connection idle this long.
IDLE_REUSE_S = 3.0


def basic_auth(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def encode(self, host: str) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.body or self.method in {"POST", "PUT", "PATCH"}:
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


@dataclass
class Response:
    status: int
    body: bytes
    # Seconds from a Retry-After header, if the answer had one.
    retry_after: float | None = None


class ConnectionClosed(Exception):
    pass


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._last_used = 0.0

    async def _open(self) -> None:
        self.close()
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def send(self, request: Request) -> Response:
        fresh = self._writer is None or time.monotonic() - self._last_used > IDLE_REUSE_S
        if fresh:
            await self._open()
        try:
            return await self._exchange(request)
        except (ConnectionClosed, ConnectionError, asyncio.IncompleteReadError):
            if fresh:
                raise
            # The server closed a kept-alive connection before reading the request
            # (no response byte arrived): sending it again on a new one is safe.
            await self._open()
            return await self._exchange(request)

    async def _exchange(self, request: Request) -> Response:
        assert self._reader is not None
        assert self._writer is not None
        self._writer.write(request.encode(f"{self.host}:{self.port}"))
        await self._writer.drain()
        try:
            head = await self._reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as error:
            if not error.partial:
                raise ConnectionClosed from error
            raise
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self._reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        else:
            body = await self._reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        self._last_used = time.monotonic()
        retry_after = headers.get("retry-after", "")
        return Response(status, body, float(retry_after) if retry_after.isdigit() else None)

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        parts = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)


@dataclass
class ClosedLoopResult:
    requests: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    seconds: float = 0.0


async def closed_loop(
    host: str,
    port: int,
    *,
    clients: int,
    seconds: float,
    next_request: Callable[[int, int], Request],
    on_tick: Callable[[], None] | None = None,
) -> ClosedLoopResult:
    """`clients` keep-alive connections, each sending its next request as soon as the
    last answer arrived, for `seconds`. next_request(client, n) builds each request."""
    result = ClosedLoopResult()
    started = time.perf_counter()
    deadline = started + seconds

    async def client(number: int) -> None:
        connection = Connection(host, port)
        sent = 0
        try:
            while time.perf_counter() < deadline:
                request = next_request(number, sent)
                sent += 1
                begin = time.perf_counter()
                try:
                    response = await connection.send(request)
                except (OSError, asyncio.IncompleteReadError, ConnectionClosed):
                    result.errors += 1
                    connection.close()
                    continue
                result.latencies_s.append(time.perf_counter() - begin)
                result.requests += 1
                result.statuses[response.status] = result.statuses.get(response.status, 0) + 1
        finally:
            connection.close()

    async def ticker() -> None:
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.5)
            if on_tick is not None:
                on_tick()

    await asyncio.gather(ticker(), *(client(n) for n in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


class Pool:
    """Keep-alive connections shared by concurrent operations; opens more on demand,
    up to `limit` (an operation beyond it waits, and that wait counts in its latency)."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port = host, port
        self._idle: list[Connection] = []
        self._slots = asyncio.Semaphore(limit)
        self.opened = 0

    async def run(self, work: Callable[[Connection], Awaitable[object]]) -> object:
        async with self._slots:
            if self._idle:
                connection = self._idle.pop()
            else:
                connection = Connection(self.host, self.port)
                self.opened += 1
            try:
                outcome = await work(connection)
            except BaseException:
                connection.close()
                raise
            self._idle.append(connection)
            return outcome

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
