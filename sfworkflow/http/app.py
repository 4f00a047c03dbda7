"""HTTP surface (aiohttp): /healthz (alive), /readyz (dependencies), /metrics (Prometheus text),
the status page at / (sfworkflow.status_page) and the admin API under /v1/ (sfworkflow.admin)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sfworkflow.http import admin, status_page

if TYPE_CHECKING:
    from sfworkflow.runtime.service import Service
else:
    Service = object

READY_CHECK_TIMEOUT_S = 2.0
SERVICE: web.AppKey[Service] = web.AppKey("service")


def build_app(service: Service) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[SERVICE] = service
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    status_page.mount(app, service)
    admin.mount(app, service)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    service: Service = request.app[SERVICE]
    checks = await service.readiness(READY_CHECK_TIMEOUT_S)
    ready = all(c["ok"] for c in checks.values())
    # `failed` is always there (empty when ready), so a client reading it needs no case for a 200.
    failed = sorted(k for k, c in checks.items() if not c["ok"])
    body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "checks": checks, "failed": failed}
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text. Each scrape runs the readiness check first, so sfworkflow_ready and
    sfworkflow_dependency_up say what /readyz would answer at that moment (at most READY_CHECK_TIMEOUT_S per
    database check when PostgreSQL does not answer)."""
    service: Service = request.app[SERVICE]
    await service.readiness(READY_CHECK_TIMEOUT_S)
    service.record_buffers()
    body = await asyncio.to_thread(service.metrics.render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
