"""The chaos suite, in its short form (`python -m bench.chaos --quick`): faults under load, invariants hold.

Runs every scenario on one machine's servers (kill -9, crash between commit and ack, crash between publish and mark,
RabbitMQ restart, PostgreSQL restart with backends killed, three replicas with one killed, SIGTERM) against real
service processes. Slow (about two minutes) and it restarts the local RabbitMQ and PostgreSQL. Then the two past one
machine: a node of a three-node RabbitMQ cluster killed, then a second one, and a PostgreSQL primary killed and its
synchronous standby promoted (scripts/rabbitmq-cluster and scripts/pg-standby start them; about two minutes more).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import ha

REPO = Path(__file__).resolve().parents[2]


SINGLE_MACHINE = ("kill9", "commit_ack", "publish_mark", "rabbit_restart", "pg_restart", "replicas", "sigterm")
PAST_ONE_MACHINE = ("broker_node", "pg_failover")


def _chaos(scenarios: tuple[str, ...]) -> list[list[str]]:
    args = [a for name in scenarios for a in ("--scenario", name)]
    run = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--quick", *args], cwd=REPO, capture_output=True, text=True, timeout=880
    )
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    table = run.stdout.strip().splitlines()
    head = table[-len(scenarios) - 1].split()
    assert head[0] == "scenario"
    rows = [line.split() for line in table[-len(scenarios) :]]
    assert {r[0] for r in rows} == set(scenarios)
    for r in rows:
        # lost, dup effects, unpublished, lost timers, unsettled, replay diffs, failover missing, ok
        assert r[6:13] == ["0"] * 7 and r[-1] == "yes", r
    return rows


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_quick_every_invariant_holds() -> None:
    _chaos(SINGLE_MACHINE)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_quick_a_broker_node_and_the_database_primary_lost() -> None:
    try:
        rows = _chaos(PAST_ONE_MACHINE)
    finally:  # the suite tears them down itself, unless it was killed (a timeout): never leave them running
        ha.teardown()
    assert all(r[-2] != "-" for r in rows), rows  # each recovered, and says how fast
