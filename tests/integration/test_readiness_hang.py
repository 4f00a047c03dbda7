"""A PostgreSQL that stops answering (a frozen network path: connections open, no byte comes back) must not hang
the readiness check: /metrics and /readyz answer within their timeout, saying PostgreSQL is down, and recover
once it answers again. Without a bound, a scrape took the pool's command_timeout and more (34 s measured), past
Prometheus's scrape timeout, so `sfworkflow_ready` went stale instead of 0.

The freeze is a TCP proxy of this test's own between the service and PostgreSQL; PostgreSQL is untouched."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import quick
from tests.integration.test_metrics import samples
from tests.support import running_service

SCRAPE_LIMIT_S = 15.0  # the client gives up after this: well past the 2 s check, well short of a 30 s timeout


class FreezableProxy:
    """Forwards TCP to PostgreSQL; `frozen` holds every byte (in both directions) until thawed."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.thawed = asyncio.Event()
        self.thawed.set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.thawed.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        await self.thawed.wait()
        server_r, server_w = await asyncio.open_connection(*self.target)
        for reader, writer in ((client_r, server_w), (server_r, client_w)):
            task = asyncio.create_task(self._pipe(reader, writer))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield self.server.sockets[0].getsockname()[1]
        finally:
            self.thawed.set()
            self.server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)


def through(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


async def scrape(http: aiohttp.ClientSession, port: int | None) -> str:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 200
        return await r.text()


async def test_a_postgresql_that_stops_answering_reads_as_not_ready_within_the_check_timeout(
    settings: Settings,
) -> None:
    target = urlsplit(settings.database_url)
    proxy = FreezableProxy(target.hostname or "127.0.0.1", target.port or 5432)
    async with proxy.running() as port:
        proxied = quick(dataclasses.replace(settings, database_url=through(settings.database_url, port)))
        async with (
            running_service(proxied) as service,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_LIMIT_S)) as http,
        ):

            async def ready(want: float) -> bool:
                return samples(await scrape(http, service.http_port), "sfworkflow_ready") == [({}, want)]

            await wait_for(lambda: ready(1.0), what="the replica ready")
            proxy.thawed.clear()
            # Two scrapes while frozen: the second comes while the first check's query is still unanswered.
            for _ in range(2):
                text = await scrape(http, service.http_port)  # aiohttp raises TimeoutError past SCRAPE_LIMIT_S
                assert samples(text, "sfworkflow_ready") == [({}, 0.0)]
                assert ({"dependency": "postgres"}, 0.0) in samples(text, "sfworkflow_dependency_up")
            async with http.get(f"http://127.0.0.1:{service.http_port}/readyz") as r:
                body = await r.json()
                assert r.status == 503
            assert "postgres" in body["failed"]
            proxy.thawed.set()
            await wait_for(lambda: ready(1.0), timeout=60, what="the replica ready again after PostgreSQL answers")
