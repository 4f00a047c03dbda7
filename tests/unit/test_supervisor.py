"""The supervisor with plain asyncio tasks (no I/O): a task that dies is reported once; an orderly stop is not."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter

from sfworkflow.runtime.supervisor import Supervisor, TaskExit


class Watched:
    """A supervisor with its failure callback and exit counter recorded."""

    def __init__(self) -> None:
        self.calls: list[TaskExit] = []
        self.exits = Counter("exits", "exits", ["task"], registry=CollectorRegistry())
        self.sup = Supervisor(self.calls.append, self.exits)

    def counted(self, kind: str) -> float:
        return self.exits.labels(kind)._value.get()


async def _forever() -> None:
    await asyncio.Event().wait()


async def _until(stop: asyncio.Event) -> None:
    await stop.wait()


async def _boom() -> None:
    raise RuntimeError("metrics.record broke")


async def test_a_task_that_raises_triggers_the_stop_callback_once() -> None:
    w = Watched()
    healthy = w.sup.spawn("timers", _forever())
    first = w.sup.spawn("consumer", _boom(), index=0)
    second = w.sup.spawn("consumer", _boom(), index=1)
    await asyncio.wait({first, second})

    assert len(w.calls) == 1  # the service is asked to stop once, however many tasks die
    failure = w.calls[0]
    assert failure is w.sup.failure
    assert (failure.name, failure.kind, failure.how) == ("sfworkflow-consumer-0", "consumer", "raised")
    assert isinstance(failure.error, RuntimeError)
    assert failure.describe() == "sfworkflow-consumer-0 raised RuntimeError: metrics.record broke"
    assert w.counted("consumer") == 2 and w.sup.failures == 2  # every death is counted
    assert not healthy.done()
    await w.sup.close()
    assert healthy.cancelled() and len(w.calls) == 1  # closing is an orderly stop


async def test_returning_or_being_cancelled_by_someone_else_is_a_death_too() -> None:
    w = Watched()

    async def quietly() -> None:
        return None

    returned = w.sup.spawn("relay", quietly())
    await asyncio.wait({returned})
    assert [(c.name, c.how) for c in w.calls] == [("sfworkflow-relay", "returned")]

    w = Watched()
    stats = w.sup.spawn("stats", _forever())
    await asyncio.sleep(0)  # let it start
    stats.cancel()  # not through the supervisor
    await asyncio.wait({stats})
    assert [(c.name, c.how) for c in w.calls] == [("sfworkflow-stats", "cancelled")]
    assert w.counted("stats") == 1


async def test_an_orderly_stop_is_not_a_failure() -> None:
    w = Watched()
    stop = asyncio.Event()
    loops = [w.sup.spawn("consumer", _until(stop), index=i) for i in range(2)]
    listen = w.sup.spawn("relay-listen", _forever())
    stubborn = w.sup.spawn("timers", _forever())  # ignores the stop: cancelled after the timeout
    for t in loops:
        w.sup.stopping(t)  # told first, so a loop that returns early is still an orderly end
    stop.set()
    for t in loops:
        await w.sup.stop(t, timeout=5.0)
    w.sup.cancel(listen)
    await w.sup.stop(listen, timeout=5.0)
    await w.sup.stop(stubborn, timeout=0.0)

    assert all(t.done() for t in (*loops, listen, stubborn))
    assert w.calls == [] and w.sup.failure is None and w.sup.failures == 0
    assert w.sup.running == []
    assert w.counted("consumer") == w.counted("timers") == 0


async def test_a_task_that_raises_while_it_is_being_stopped_still_counts() -> None:
    w = Watched()
    stop = asyncio.Event()

    async def fails_on_the_way_out() -> None:
        await stop.wait()
        raise RuntimeError("ack after close")

    task = w.sup.spawn("consumer", fails_on_the_way_out(), index=0)
    w.sup.stopping(task)
    stop.set()
    await w.sup.stop(task, timeout=5.0)  # never raises what the task raised
    assert [(c.name, c.how) for c in w.calls] == [("sfworkflow-consumer-0", "raised")]


async def test_stopping_a_task_that_died_already_returns_quietly() -> None:
    w = Watched()
    task = w.sup.spawn("timers", _boom())
    await asyncio.wait({task})
    await w.sup.stop(task, timeout=1.0)
    assert len(w.calls) == 1 and w.counted("timers") == 1


async def test_a_failing_callback_does_not_hide_the_failure() -> None:
    def broken(_exit: TaskExit) -> None:
        raise ValueError("callback broke")

    sup = Supervisor(broken)
    task = sup.spawn("stats", _boom())
    await asyncio.wait({task})
    await asyncio.sleep(0)
    assert sup.failure is not None and sup.failure.name == "sfworkflow-stats"
