"""`sfworkflow run --processes N`: N service processes on one machine, so one command uses every core.

One Python process applies batches on one core at most; more cores need more processes. Each child is a whole
`sfworkflow run --processes 1`, a replica like any other: it consumes from the same queues, relays, fires
timers and serves its own HTTP (health, readiness, metrics) on SFWORKFLOW_HTTP_PORT + its index (0 stays 0:
any free port), so Prometheus scrapes each as a replica and the cluster gauges are still exported once.
Replicas share the work through RabbitMQ and PostgreSQL, so nothing else is shared between the children.

The parent only supervises: SIGTERM or SIGINT is passed to every child, which drains and exits; when a child
exits on its own (its background task died: 70, or it was killed), the parent stops the others the same way and
exits with that child's code (70 for a kill), so the orchestrator restarts the whole set, as it would one
replica. SFWORKFLOW_PROCESSES=0 runs one per usable core: the CPUs this process may run on, capped by a cgroup
CPU quota (a container's limit), not every core of the host.

The default is 1: more processes pay only on cores that PostgreSQL and RabbitMQ do not need. On this project's
2-core machine, where they share the cores with the service, 2 processes drained 0.7x what 1 did
(bench/throughput.py --processes 2); give sfworkflow N dedicated cores, then --processes N.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
from pathlib import Path

import structlog

from sfworkflow.runtime.supervisor import EXIT_TASK_DIED
from sfworkflow.settings import PREFIX, Settings

log = structlog.get_logger("sfworkflow.processes")

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup v2 quota when one is set; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def process_count(settings: Settings, requested: int | None) -> int:
    """--processes when given, else SFWORKFLOW_PROCESSES; 0 means one per usable core."""
    n = settings.processes if requested is None else requested
    return n if n > 0 else usable_cores()


def child_port(http_port: int, index: int) -> int:
    """A child's HTTP port: the base port plus its index (0, any free port, stays 0)."""
    return http_port + index if http_port else 0


def child_environment(base: dict[str, str], index: int, http_port: int) -> dict[str, str]:
    """A child's environment: the parent's, with its own HTTP port and one process."""
    return {**base, PREFIX + "HTTP_PORT": str(child_port(http_port, index)), PREFIX + "PROCESSES": "1"}


async def run_processes(n: int, settings: Settings) -> int:
    """Run `n` child processes until a signal or until one exits; the exit code of the whole."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    children: list[asyncio.subprocess.Process] = []
    first: asyncio.subprocess.Process | None = None
    codes: list[int] = []
    try:
        for k in range(n):
            env = child_environment(dict(os.environ), k, settings.http_port)
            children.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "sfworkflow", "run", "--processes", "1", env=env
                )
            )
        log.info(
            "started service processes",
            processes=n,
            pids=[c.pid for c in children],
            http_ports=[child_port(settings.http_port, k) for k in range(n)],
        )
        waits = {asyncio.ensure_future(c.wait()): c for c in children}
        stop = asyncio.ensure_future(stopping.wait())
        done, _ = await asyncio.wait({stop, *waits}, return_when=asyncio.FIRST_COMPLETED)
        first = next((waits[d] for d in done if d in waits), None)
        if first is not None:
            log.error(
                "a service process exited; stopping the others",
                pid=first.pid,
                exit_code=first.returncode,
            )
        stop.cancel()
        for c in children:
            if c.returncode is None:
                c.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(c.wait() for c in children))
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        for c in children:
            if c.returncode is None:
                c.kill()
    failed = [first.returncode or 0] if first is not None else [code for code in codes if code]
    if not failed or failed[0] == 0:
        return 0
    return failed[0] if failed[0] > 0 else EXIT_TASK_DIED  # killed by a signal: restarted like a dead task
