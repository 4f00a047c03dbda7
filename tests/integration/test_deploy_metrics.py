"""The alerts (deploy/prometheus/alerts.yml) and the dashboard (deploy/grafana/sfworkflow.json) read only metrics a
running service exports: every metric name in their PromQL (and in the dashboard's variable queries) is a series
on its /metrics (besides `up`, which Prometheus makes). tests/unit/test_deploy_artifacts.py checks the rest."""

from __future__ import annotations

import aiohttp
import asyncpg

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.deploykit import (
    PROMETHEUS_SERIES,
    alert_rules,
    dashboard_exprs,
    dashboard_variable_exprs,
    exposed_names,
    metric_names,
)
from tests.integration.helpers_extra import quick, wait_all_published, wait_state
from tests.support import Amqp, enrolled_data, event, running_service


async def test_the_dashboard_and_the_alerts_read_only_metrics_that_exist(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:
        # An active instance, so that sfworkflow_instances{workflow,state} has a series.
        await mq.publish(event("sequence.enrolled", "deploy-1", enrolled_data(steps=1)))
        await wait_state(pg, "deploy-1", "sending")
        await wait_all_published(pg)
        url = f"http://127.0.0.1:{service.http_port}/metrics"
        async with aiohttp.ClientSession() as http:

            async def metrics_with_cluster_gauges() -> str | None:
                if not service.metrics.cluster_exported:  # the only replica takes the lead at its first round
                    return None
                async with http.get(url) as r:
                    assert r.status == 200
                    body = await r.text()
                return body if "\nsfworkflow_instances{" in body else None

            text: str = await wait_for(metrics_with_cluster_gauges, what="/metrics with the cluster gauges")

    exposed = exposed_names(text) | PROMETHEUS_SERIES
    exprs = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    exprs += dashboard_exprs() + dashboard_variable_exprs()
    assert "variable job" in dict(exprs)
    read = {where: metric_names(expr) for where, expr in exprs}
    assert [where for where, names in read.items() if not names] == []  # an extraction that finds nothing passes
    assert {where: sorted(names - exposed) for where, names in read.items() if names - exposed} == {}
