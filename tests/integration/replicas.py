"""Service processes for the tests: `Replica` runs `python -m tests.integration.replica RELEASE` (the service with
release 1 or 2 of the definitions, tests/integration/replica.py) against the test's database and vhost, for tests
that need two or more real replicas (a rolling deploy, limits shared across replicas)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.fuzz_support import http_get

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Replica:
    """One `python -m tests.integration.replica RELEASE` process against the test's database and vhost."""

    def __init__(self, settings: Settings, release: str, log: Path, **env: str) -> None:
        """`env`: more SFWORKFLOW_* settings for this process (e.g. SFWORKFLOW_RATE_LIMITS)."""
        self.release = release
        self.port = _free_port()
        self.log = log
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SFWORKFLOW_")},
            "SFWORKFLOW_DATABASE_URL": settings.database_url,
            "SFWORKFLOW_AMQP_URL": settings.amqp_url,
            "SFWORKFLOW_QUEUE_TYPE": "classic",
            "SFWORKFLOW_HTTP_HOST": "127.0.0.1",
            "SFWORKFLOW_HTTP_PORT": str(self.port),
            "SFWORKFLOW_TIMER_POLL_MS": "50",
            "SFWORKFLOW_RELAY_POLL_MS": "100",
            "SFWORKFLOW_SHUTDOWN_TIMEOUT_S": "3",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.replica", self.release],
            env=self.env, cwd=ROOT, stdout=out, stderr=out,
        )  # fmt: skip

    async def ready(self) -> None:
        async def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"release {self.release} exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                return (await http_get(self.port, "/readyz"))[0] == 200
            except OSError:
                return False

        await wait_for(up, timeout=30, what=f"release {self.release} ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def counter(self, name: str, **labels: str) -> float:
        _status, text = await http_get(self.port, "/metrics")
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
            if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                total += float(m.group(2))
        return total


@contextmanager
def replicas(settings: Settings, logs: Path, n: int = 2, release: str = "1", **env: str) -> Iterator[list[Replica]]:
    """`n` replicas of `release` (not started), each logging to `logs`/replica-<i>.log; stopped on the way out."""
    made = [Replica(settings, release, logs / f"replica-{i}.log", **env) for i in range(n)]
    try:
        yield made
    finally:
        for r in made:
            r.stop()


async def start_all(made: list[Replica]) -> None:
    """Start every replica, then wait until each is ready (they start side by side)."""
    for r in made:
        r.start()
    for r in made:
        await r.ready()
