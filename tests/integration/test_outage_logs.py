"""What an outage writes to the logs: `sfworkflow run`, as deployed (its own process, SFWORKFLOW_LOG_FORMAT left to
`auto`, stderr not a terminal), loses its RabbitMQ connections and then PostgreSQL for a few seconds; every line
it writes meanwhile, the libraries' too, is one JSON object.

This stops the machine's shared PostgreSQL cluster for a few seconds; it is always started again.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import pytest

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.test_postgres_outage import _pg_ctl, _pg_online, _readyz
from tests.support import Amqp, enrolled_data, event, terminate

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _close_connections_of(amqp_url: str) -> int:
    """Close every RabbitMQ connection of the test's vhost (the service's): how many were closed."""
    vhost = unquote(urlsplit(amqp_url).path.lstrip("/")) or "/"
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "vhost", "pid", "--no-table-headers"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    closed = 0
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[0] == vhost:
            subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", parts[1], "closed by test_outage_logs"],
                capture_output=True, timeout=60, check=False,
            )  # fmt: skip
            closed += 1
    return closed


async def _status(port: int) -> int:
    try:
        return (await _readyz(port))[0]
    except OSError:
        return 0


@pytest.mark.slow
async def test_every_line_an_outage_writes_is_json(settings: Settings) -> None:
    assert _pg_online(), "PostgreSQL must be running before this test"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFWORKFLOW_")}
    env.update(
        SFWORKFLOW_DATABASE_URL=settings.database_url, SFWORKFLOW_AMQP_URL=settings.amqp_url,
        SFWORKFLOW_HTTP_HOST="127.0.0.1", SFWORKFLOW_HTTP_PORT=str(port), SFWORKFLOW_QUEUE_TYPE="classic",
        SFWORKFLOW_SHUTDOWN_TIMEOUT_S="8",
    )  # fmt: skip
    with tempfile.TemporaryFile() as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sfworkflow", "run", cwd=REPO, env=env, stdout=out, stderr=out
        )
        try:
            await wait_for(lambda: _is(_status(port), 200), timeout=60, interval=0.1, what="the service ready")
            async with Amqp(settings.amqp_url) as mq:
                await mq.publish(event("sequence.enrolled", "before", enrolled_data(steps=1)))
            # The test's own connections are closed: what is left in the vhost is the service's.
            assert await asyncio.to_thread(_close_connections_of, settings.amqp_url) > 0
            try:
                await asyncio.to_thread(_pg_ctl, "stop")
                await wait_for(lambda: _is(_status(port), 503), timeout=20, interval=0.2, what="/readyz 503")
                async with Amqp(settings.amqp_url) as mq:
                    await mq.publish(event("sequence.enrolled", "during", enrolled_data(steps=1)))
            finally:
                if not _pg_online():
                    await asyncio.to_thread(_pg_ctl, "start")
            await wait_for(lambda: _is(_status(port), 200), timeout=60, interval=0.2, what="ready again")
        finally:
            await terminate(proc, 30)
        out.seek(0)
        text = out.read().decode()
    lines = [line for line in text.splitlines() if line.strip()]
    not_json = [line for line in lines if not _is_json_object(line)]
    assert not not_json, "lines that are not JSON:\n" + "\n".join(not_json[:20])
    docs = [orjson.loads(line) for line in lines]
    assert all({"event", "level", "timestamp"} <= set(d) for d in docs)
    assert any(d["level"] in ("warning", "error") for d in docs), "the outage left no warning in the logs"
    assert proc.returncode == 0, text[-2000:]


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(orjson.loads(line), dict)
    except orjson.JSONDecodeError:
        return False


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
