"""`sfworkflow run --processes N`: N replicas under one parent. Each child serves HTTP on the base port plus its
index and consumes like any replica; SIGTERM to the parent drains every child and exits 0; a child that dies
makes the parent stop the others and exit 70, for the orchestrator to restart the set."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from sfworkflow.runtime.processes import child_environment, usable_cores
from sfworkflow.runtime.supervisor import EXIT_TASK_DIED
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.fuzz_support import http_get
from tests.integration.helpers_extra import wait_state
from tests.support import Amqp, enrolled_data, event, terminate

REPO = Path(__file__).resolve().parents[2]


def _two_free_ports() -> int:
    """A port p with p + 1 free too."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = int(a.getsockname()[1])
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
        return p
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture
async def parent(settings: Settings) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    port = _two_free_ports()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFWORKFLOW_")}
    env.update(
        SFWORKFLOW_DATABASE_URL=settings.database_url,
        SFWORKFLOW_AMQP_URL=settings.amqp_url,
        SFWORKFLOW_HTTP_HOST="127.0.0.1",
        SFWORKFLOW_HTTP_PORT=str(port),
        SFWORKFLOW_QUEUE_TYPE="classic",
        SFWORKFLOW_TIMER_POLL_MS="50",
    )
    with tempfile.TemporaryFile() as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sfworkflow", "run", "--processes", "2", cwd=REPO, env=env, stdout=log, stderr=log
        )
        try:
            for p in (port, port + 1):
                await wait_for(lambda p=p: _ready(p), timeout=60, interval=0.1, what=f"the child on port {p} ready")
            yield proc, port
        finally:
            await terminate(proc, 30)


async def _ready(port: int) -> bool:
    try:
        return (await http_get(port, "/readyz"))[0] == 200
    except OSError:
        return False


def _children(proc: asyncio.subprocess.Process) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children()


async def test_two_processes_serve_consume_and_drain_on_sigterm(
    parent: tuple[asyncio.subprocess.Process, int], settings: Settings, pg: asyncpg.Connection
) -> None:
    proc, _port = parent
    children = _children(proc)
    assert len(children) == 2
    async with Amqp(settings.amqp_url) as mq:
        for i in range(20):
            await mq.publish(event("sequence.enrolled", f"p-{i}", enrolled_data(steps=1)))
        for i in range(20):
            await wait_state(pg, f"p-{i}", "sending")
    backends = await pg.fetchval(
        "SELECT count(DISTINCT pid) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'sfworkflow-stats'"
    )
    assert backends == 2  # each child runs its own stats task (one of them leads)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    for c in children:
        assert not c.is_running() or c.status() == psutil.STATUS_ZOMBIE


async def test_a_child_that_dies_stops_the_set_with_70(parent: tuple[asyncio.subprocess.Process, int]) -> None:
    proc, _port = parent
    victim, other = _children(proc)
    victim.kill()
    assert await asyncio.wait_for(proc.wait(), 30) == EXIT_TASK_DIED
    await wait_for(lambda: _gone(other), timeout=10, what="the other child stopped")


async def _gone(p: psutil.Process) -> bool:
    return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE


def test_each_child_gets_its_own_port_and_one_process() -> None:
    assert child_environment({"X": "1"}, 2, 8080) == {
        "X": "1",
        "SFWORKFLOW_HTTP_PORT": "8082",
        "SFWORKFLOW_PROCESSES": "1",
    }
    assert child_environment({}, 3, 0)["SFWORKFLOW_HTTP_PORT"] == "0"


def test_usable_cores_honour_a_cgroup_quota(tmp_path: Path) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert usable_cores(quota) == min(2, len(os.sched_getaffinity(0)))
    quota.write_text("max 100000\n")
    assert usable_cores(quota) == len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path / "absent") == len(os.sched_getaffinity(0))
