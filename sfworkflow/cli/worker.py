"""`sfworkflow worker`: run the simulated SalesFlow worker on its own (answers commands, for demos and drills)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

from sfworkflow.client import memory
from sfworkflow.errors import UsageError
from sfworkflow.settings import Settings

DEMO_MISSING = (
    "the demo code (sfworkflow/demo/) is not part of this installation: it ships with the repository, "
    "not with the service image; run it from a checkout (scripts/demo)"
)


def register(sub: Any) -> dict[str, Any]:
    p = sub.add_parser(
        "worker",
        help="run the simulated SalesFlow worker: answer commands for N seconds",
        description="Run the simulated SalesFlow worker on its own: it answers the service's commands (with "
        "--failure-rate of them failing retryably) for --seconds, then prints what it answered. For demos and "
        "drills, from a checkout (the demo code is not in the service image); needs RabbitMQ only.",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="how long to run (default 10; Ctrl-C stops early)")
    p.add_argument("--workflow", action="append", help="only this workflow's commands (repeatable)")
    p.add_argument("--failure-rate", type=float, default=0.0, help="share of commands failing retryably")
    p.add_argument("--seed", type=int, default=7)
    return {"worker": run}


async def run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        from sfworkflow.demo.profiles import Profile
        from sfworkflow.demo.worker import SimulatedWorker
    except ImportError as exc:
        raise UsageError(DEMO_MISSING) from exc
    # Its dedupe store is in memory (the SDK's MemoryDedupe): this command needs RabbitMQ only. The demo and the
    # chaos suite give the same worker a PostgresDedupe.
    worker = SimulatedWorker(
        settings.amqp_url, Profile(failure_rate=args.failure_rate, seed=args.seed), args.workflow or None
    )
    await worker.start()
    memory.settle_heap()  # this process is the worker's, as CommandWorker.run() would tune it
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), args.seconds)
    await worker.stop()
    s = worker.stats
    print(f"answered {sum(s.answers.values())} event(s) to {sum(s.commands.values())} command(s)")
    for k, n in sorted(s.commands.items()):
        print(f"  {k:<40}{n:>6}")
    return 0
