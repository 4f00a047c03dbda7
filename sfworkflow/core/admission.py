"""Fair admission: how many of each shard's buffered deliveries the next batch takes.

Events arrive on `SFWORKFLOW_EVENT_SHARDS` queues, a tenant always on the same one (RabbitMQ's consistent-hash
exchange on the `x-sfworkflow-tenant` header, contract/topology.py). A batch loop holds one channel per shard and
makes each batch of up to `size` deliveries by max-min fair shares over what each shard has buffered: every
shard with deliveries gets an equal share, a shard with fewer than its share takes them all and the rest is
shared again among the others; the one-delivery remainders go round the shards from `start`, which the caller
turns one shard on per batch. So a shard alone fills whole batches (work-conserving: a tenant alone drains as
fast as before) and a shard with one delivery waits behind at most the batch in progress, whatever another shard
holds. Each shard's part is a prefix of its buffer in arrival order, which keeps a channel's multiple-ack exact
and a tenant's events in order. Pure: no I/O, unit-tested in tests/unit/test_admission.py.
"""

from __future__ import annotations

from collections.abc import Sequence


def fair_shares(counts: Sequence[int], size: int, start: int = 0) -> list[int]:
    """How many deliveries to take from each shard: `counts[k]` are buffered on shard k, at most `size` in all.

    Max-min fair: no shard gets more than another unless that other took everything it had; the total is
    `min(size, sum(counts))`. Remainders of one go to shards in order from `start` (mod the number of shards)."""
    if size < 0 or any(c < 0 for c in counts):
        raise ValueError(f"fair_shares: counts and size must not be negative, got {list(counts)} and {size}")
    n = len(counts)
    take = [0] * n
    left = size
    open_ = [k for k in range(n) if counts[k] > 0]
    while left > 0 and open_:
        share = left // len(open_)
        if share == 0:  # fewer deliveries left than shards with some: one each, round from `start`
            for k in sorted(open_, key=lambda k: (k - start) % n)[:left]:
                take[k] += 1
            break
        still = []
        for k in open_:
            got = min(share, counts[k] - take[k])
            take[k] += got
            left -= got
            if take[k] < counts[k]:
                still.append(k)
        open_ = still
    return take
