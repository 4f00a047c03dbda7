"""What /metrics says, read from a running service as Prometheus would scrape it: the README's table names
every series (and nothing that is not there), the standard process/platform/GC collectors and
sfworkflow_build_info are present, lag buckets reach an hour, sfworkflow_ready follows readiness at each
scrape, and the parked-deadline cluster gauge tells how close the nearest parked event is to being
dead-lettered."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import orjson
from prometheus_client.parser import text_string_to_metric_families

from sfworkflow import __version__
from sfworkflow.contract.headers import REDRIVES
from sfworkflow.db import migrate
from sfworkflow.runtime.service import Service
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import COMMANDS_Q, Inbox, quick, wait_all_published, wait_state
from tests.support import Amqp, enrolled_data, event, running_service

README = Path(__file__).resolve().parents[2] / "README.md"
TABLE_HEADER = "| metric | labels | meaning |"


async def scrape(service: Service) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{service.http_port}/metrics") as r,
    ):
        assert r.status == 200
        return await r.text()


def exposed_names(text: str) -> set[str]:
    """Metric names as a reader of /metrics writes them: counters with _total, the others by family name."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def readme_table_names() -> list[str]:
    """The names in the first column of the README's metrics table (one row may name several, `process_*`
    names a prefix)."""
    lines = README.read_text().splitlines()
    start = lines.index(TABLE_HEADER) + 2
    names: list[str] = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        names += re.findall(r"`([a-z_*]+)`", line.split("|")[1])
    return names


async def _leading(service: Service) -> bool:
    return service.metrics.cluster_exported


async def test_the_readme_table_names_every_series_and_only_those(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "metrics-1", enrolled_data(steps=1)))
        await wait_state(pg, "metrics-1", "sending")
        await wait_all_published(pg)
        await wait_for(lambda: _leading(service), what="the service exporting the cluster gauges")
        text = await scrape(service)

    exposed = exposed_names(text)
    documented = readme_table_names()
    exact = {n for n in documented if not n.endswith("*")}
    prefixes = [n[:-1] for n in documented if n.endswith("*")]
    assert sorted(exact - exposed) == [], "in the README's table but not on /metrics"
    undocumented = sorted(n for n in exposed if n not in exact and not any(n.startswith(p) for p in prefixes))
    assert undocumented == [], "on /metrics but not in the README's table"
    for prefix in prefixes:
        assert any(n.startswith(prefix) for n in exposed), f"no series named {prefix}*"
    assert len(documented) == len(set(documented)), "a metric is named twice in the README's table"


async def test_build_info_standard_collectors_and_lag_buckets_up_to_an_hour(settings: Settings) -> None:
    async with running_service(quick(settings)) as service:
        text = await scrape(service)

    ((labels, value),) = samples(text, "sfworkflow_build_info")
    assert value == 1
    assert labels["version"] == __version__
    assert labels["schema"] == str(max(v for v, _ in migrate.available()))
    assert re.fullmatch(r"3\.\d+\.\d+.*", labels["python"])
    ((_, rss),) = samples(text, "process_resident_memory_bytes")
    assert rss > 10 * 2**20  # a running Python service with its libraries holds more than 10 MiB
    ((_, fds),) = samples(text, "process_open_fds")
    assert fds > 0
    assert samples(text, "python_info")
    assert samples(text, "python_gc_collections_total")
    bounds = [float(labels["le"]) for labels, _ in samples(text, "sfworkflow_event_age_at_commit_seconds_bucket")]
    assert 3600.0 in bounds and {60.0, 300.0, 1800.0} <= set(bounds)


async def test_sfworkflow_ready_follows_readiness_at_each_scrape(settings: Settings) -> None:
    async with running_service(quick(settings), consume=False) as service:
        service.metrics.ready.set(1)  # as a previous scrape might have left it: this scrape must set it anew
        not_consuming = await scrape(service)
    async with running_service(quick(settings)) as service:

        async def ready() -> str | None:
            text = await scrape(service)
            return text if samples(text, "sfworkflow_ready") == [({}, 1.0)] else None

        consuming = await wait_for(ready, what="sfworkflow_ready 1 on a consuming replica")

    assert samples(not_consuming, "sfworkflow_ready") == [({}, 0.0)]
    assert ({"dependency": "postgres"}, 1.0) in samples(not_consuming, "sfworkflow_dependency_up")
    assert ({"dependency": "rabbitmq"}, 1.0) in samples(consuming, "sfworkflow_dependency_up")


async def test_parked_nearest_deadline_gauge(settings: Settings, pg: asyncpg.Connection) -> None:
    """+Inf while nothing is parked; once an event is parked, the seconds left until its deadline."""

    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:
        await wait_for(lambda: _leading(service), what="the service exporting the cluster gauges")
        assert samples(await scrape(service), "sfworkflow_parked_nearest_deadline_seconds") == [({}, math.inf)]

        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("sequence.enrolled", "park-gauge", enrolled_data(steps=2)))
        await commands.wait(1)
        await wait_state(pg, "park-gauge", "sending")
        await mq.publish(event("sequence.step_sent", "park-gauge", {"step": 1, "provider_message_id": "p1"}))

        async def nearest() -> float | None:
            ((_, value),) = samples(await scrape(service), "sfworkflow_parked_nearest_deadline_seconds")
            return value if math.isfinite(value) else None

        left = await wait_for(nearest, what="the gauge showing the parked event's deadline")
        left_in_db = await pg.fetchval("SELECT EXTRACT(EPOCH FROM deadline - now())::float8 FROM sfworkflow.parked")
        await wait_all_published(pg)

    assert 0 < left <= settings.park_timeout_s
    assert left_in_db <= left  # the gauge was read before (a round of the stats task), so at most as much left


async def test_lag_counts_an_event_once_not_its_duplicates_nor_its_redrives(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    """A producer's retry of an event already applied, or a dead letter redriven an hour later, is not lag: the
    histogram observes each event once, when it is first applied (so the lag alert does not page on them)."""
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    first = event("sequence.enrolled", "lag-1", enrolled_data(steps=1))
    redriven = event("sequence.enrolled", "lag-2", enrolled_data(steps=1), timestamp=an_hour_ago)
    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:

        async def observed() -> float:
            ((_, n),) = samples(await scrape(service), "sfworkflow_event_age_at_commit_seconds_count")
            return n

        await mq.publish(first)
        await wait_state(pg, "lag-1", "sending")
        assert await observed() == 1
        await mq.publish(first, times=2)  # a producer's retries: duplicates
        await mq.publish_raw(
            orjson.dumps(redriven), message_id=redriven["event_id"], headers={REDRIVES: 1}
        )  # as `sfworkflow dead-letters redrive` re-publishes it
        await wait_state(pg, "lag-2", "sending")

        async def duplicates_counted() -> bool:
            text = await scrape(service)
            return ({"workflow": "sequence", "outcome": "duplicate"}, 2.0) in samples(text, "sfworkflow_events_total")

        await wait_for(duplicates_counted, what="both duplicates counted")
        assert await observed() == 1
        await wait_all_published(pg)
