"""Shared fixtures. Integration tests run against the real local PostgreSQL and RabbitMQ:

- each test gets its own database, cloned from a template migrated once per session;
- each test gets its own RabbitMQ vhost, so queues never leak between tests: made and deleted through the
  management plugin's HTTP API (SFWORKFLOW_TEST_RABBITMQ_API; scripts/services enables the plugin), ~10 ms a call,
  else with rabbitmqctl, which boots an Erlang VM each time (0.5-1.5 s, three calls a test: minutes a run).

Connection targets come from SFWORKFLOW_TEST_PG (server URL without database) and
SFWORKFLOW_TEST_AMQP (server URL without vhost).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import asyncpg
import pytest

from sfworkflow import db
from sfworkflow.db import migrate
from sfworkflow.settings import PREFIX, Settings

PG_SERVER = os.environ.get("SFWORKFLOW_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
AMQP_SERVER = os.environ.get("SFWORKFLOW_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672")
RABBITMQ_API = os.environ.get("SFWORKFLOW_TEST_RABBITMQ_API", "http://127.0.0.1:15672/api")
TEMPLATE_DB = f"sfw_template_{os.getpid()}"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's SFWORKFLOW_* settings."""
    for k in list(os.environ):
        if k.startswith(PREFIX) and not k.startswith(PREFIX + "TEST_"):
            monkeypatch.delenv(k)


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(f"{PG_SERVER}/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    async def create() -> None:
        await _admin(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"')
        await _admin(f'CREATE DATABASE "{TEMPLATE_DB}"')
        conn = await asyncpg.connect(f"{PG_SERVER}/{TEMPLATE_DB}")
        try:
            await migrate.migrate(conn)
        finally:
            await conn.close()

    asyncio.run(create())
    yield TEMPLATE_DB
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"'))


@pytest.fixture
async def database_url(template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test."""
    name = f"sfw_t_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield f"{PG_SERVER}/{name}"
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def _credentials() -> tuple[str, str]:
    url = urlsplit(AMQP_SERVER)
    return unquote(url.username or "guest"), unquote(url.password or "guest")


def _api(method: str, path: str, body: dict[str, Any] | None = None) -> None:
    """One call to RabbitMQ's HTTP API as the AMQP user; raises on anything but 2xx."""
    auth = base64.b64encode(":".join(_credentials()).encode()).decode()
    request = urllib.request.Request(
        RABBITMQ_API + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30):
        pass


_API_WORKS: list[bool] = []  # [True] once a scratch vhost was made and deleted through the API


def _api_available() -> bool:
    """Whether the API can make and delete a vhost here, tried until it could once (the plugin may still be
    starting); on anything else the tests use rabbitmqctl."""
    if _API_WORKS:
        return True
    scratch = quote(f"sfw-probe-{uuid.uuid4().hex[:12]}", safe="")
    try:
        _api("PUT", f"/vhosts/{scratch}")
        _api("DELETE", f"/vhosts/{scratch}")
    except Exception:
        return False
    _API_WORKS.append(True)
    return True


def _add_vhost(vhost: str) -> bool:
    """Make `vhost` with every permission for the AMQP user; whether through the API."""
    name, user = quote(vhost, safe=""), _credentials()[0]
    api = _api_available()
    if api:
        _api("PUT", f"/vhosts/{name}")
    else:
        _rabbitmqctl("add_vhost", vhost)
    try:
        if api:
            _api("PUT", f"/permissions/{name}/{quote(user, safe='')}", {"configure": ".*", "write": ".*", "read": ".*"})
        else:
            _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    except BaseException:
        _delete_vhost(vhost, api)
        raise
    return api


def _delete_vhost(vhost: str, api: bool) -> None:
    if api:
        _api("DELETE", f"/vhosts/{quote(vhost, safe='')}")
    else:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """A fresh RabbitMQ vhost for this test."""
    vhost = f"sfw-t-{uuid.uuid4().hex[:12]}"
    api = _add_vhost(vhost)
    yield f"{AMQP_SERVER}/{quote(vhost, safe='')}"
    _delete_vhost(vhost, api)


@pytest.fixture
def settings(database_url: str, amqp_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        amqp_url=amqp_url,
        http_host="127.0.0.1",
        http_port=0,
        timer_poll_ms=50,
        relay_poll_ms=100,
        queue_type="classic",
        batch_linger_ms=1.0,
    )


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test's database, for asserting on rows."""
    conn = await asyncpg.connect(database_url)
    await db.init_connection(conn)
    yield conn
    await conn.close()


async def wait_for(
    check: Callable[[], Awaitable[Any]], timeout: float = 15.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll `check` until it returns something truthy; fail the test with `what` after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
