"""A TCP proxy in the test's own event loop, between a service and the real broker.

Tests cut it (the broker "goes away" for one service while the shared broker stays up for
everything else), hold it, or slow it: with ``write_delay_s`` every chunk of at most
``chunk_bytes`` waits that long before it is written on, in both directions, so a
connection carries at most ``chunk_bytes / write_delay_s`` bytes a second each way. A
publisher behind a slowed proxy sees a broker that takes and confirms messages several
times slower, like the slower machines this project runs on (RabbitMQ there confirmed
2,000 persistent messages/s where another machine confirmed 9,500).
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit

DEFAULT_CHUNK_BYTES = 65536


class TcpProxy:
    """Forwards a local port to a target; ``cut`` drops every connection and stops listening."""

    def __init__(
        self,
        host: str,
        port: int,
        write_delay_s: float = 0.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.target = (host, port)
        self.port = 0
        self.write_delay_s = write_delay_s
        self.chunk_bytes = chunk_bytes
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    @classmethod
    def to_url(
        cls, url: str, write_delay_s: float = 0.0, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> TcpProxy:
        """A proxy to the host and port of an ``amqp://`` URL (not started yet)."""
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5672, write_delay_s, chunk_bytes)

    def url(self, url: str) -> str:
        """``url`` (same user, password and path) pointed at this proxy's local port."""
        parts = urlsplit(url)
        credentials = f"{parts.username}:{parts.password}@" if parts.username else ""
        return urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{self.port}"))

    def hold(self) -> None:
        """Stop forwarding: callers time out; what they send is kept until ``resume``
        forwards it or ``cut`` drops it."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again, what was held first."""
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._flowing.set()  # the held data goes nowhere: its connections close below
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        # Not wait_closed(): in Python 3.11 it waits for every accepted connection, and
        # one still opening its upstream side is not in _writers yet.

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(self.chunk_bytes):
                if self.write_delay_s:
                    await asyncio.sleep(self.write_delay_s)
                await self._flowing.wait()
                if writer.is_closing():
                    break
                writer.write(data)
                await writer.drain()
        writer.close()
        self._writers.discard(writer)
