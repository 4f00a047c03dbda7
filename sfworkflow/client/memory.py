"""The garbage collector tuned for a long-running process with a large, stable heap: the service's, a worker's.

Everything built at start-up (compiled definitions, schema validators, the metrics registry, the drivers'
modules) lives as long as the process; the message path allocates many short-lived objects per message (the
parsed message, the plan's rows, the driver's frames, a worker's tasks and futures) and frees them by reference
counting, almost never in cycles. With CPython's default thresholds (700, 10, 10) the collector runs every 700
allocations and its older generations re-scan the whole start-up heap, and with hundreds of messages in flight
each young collection finds survivors to move up: about 5 % of the service's CPU in the drain benchmark, and 28 %
of the worker SDK's process in the closed loop. `settle_heap` moves the start-up heap out of the collector's sight
(`gc.freeze`) and collects the young generation less often; cycles are still collected, later. It changes the
whole process: the service calls it, and `CommandWorker.run()`, which owns its process; an application that
runs a worker inside its own process with `start()` decides for itself.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 20_000  # allocations between young collections (CPython's default: 700)
GEN1_THRESHOLD = 20  # young collections between middle ones (default 10)
GEN2_THRESHOLD = 20  # middle collections between full ones (default 10)


def settle_heap() -> None:
    """Freeze what exists now (call once the process, the service or a worker, has started) and collect less often
    from now on."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)


def unsettle_heap() -> None:
    """Undo settle_heap: what was frozen is seen by the collector again, at CPython's default thresholds (a process
    that runs several workloads one after the other, as bench/growth.py does)."""
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
