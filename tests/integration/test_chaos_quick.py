"""The chaos suite, in its short form (`python -m bench.chaos --quick`): faults under load, invariants hold.

Runs every scenario (kill -9, crash between commit and ack, crash between publish and mark, RabbitMQ
restart, PostgreSQL restart with backends killed, three replicas with one killed, SIGTERM) against real
service processes. Slow (about two minutes) and it restarts the local RabbitMQ and PostgreSQL.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_quick_every_invariant_holds() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--quick"], cwd=REPO, capture_output=True, text=True, timeout=880
    )
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    table = run.stdout.strip().splitlines()
    head = table[-8].split()
    assert head[0] == "scenario"
    rows = [line.split() for line in table[-7:]]
    assert {r[0] for r in rows} == {
        "kill9", "commit_ack", "publish_mark", "rabbit_restart", "pg_restart", "replicas", "sigterm",
    }  # fmt: skip
    for r in rows:
        assert r[6] == "0" and r[7] == "0" and r[11] == "0" and r[-1] == "yes", r  # lost, dup effects, replay, ok
