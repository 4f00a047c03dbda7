"""The status page at `/`: server-rendered HTML, then the same page in real headless Chromium (Debian's package)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.support import TENANT, Amqp, enrolled_data, event, running_service, state_of

COMMANDS = "sfworkflow.commands.sequence"
SCREENSHOT_COPY = Path("/tmp/sfworkflow-status.png")
CHROMIUM_TIMEOUT_S = 90.0
INSTALL_TIMEOUT_S = 600


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


@pytest.fixture(scope="session")
def chromium() -> Iterator[str]:
    """Debian's chromium; installed with apt-get (once per test session) when missing."""
    path = _find_chromium()
    tried = ""
    if path is None and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (
            ["apt-get", "install", "-y", "chromium"],
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "chromium"],
        ):
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as exc:
                tried = f"{' '.join(cmd)}: {exc}"
                break
            tried = f"{' '.join(cmd)} exited {done.returncode}: {(done.stderr or done.stdout)[-300:]}"
            if done.returncode == 0 and cmd[1] == "install":
                break  # installed (else: refresh the package lists once, then try again)
        path = _find_chromium()
    if path is None:
        pytest.skip(f"Chromium is not installed and could not be installed (apt-get install -y chromium). {tried}")
    yield path


async def _stuck_instances(settings: Settings, pg: asyncpg.Connection) -> dict[str, str]:
    """Two instances stuck on an unanswered command (one with an id to escape) and one dead letter."""
    addresses = {"status-stuck-1": "private.person@example.com", "<b>esc&'\"": "another.person@example.com"}
    async with Amqp(settings.amqp_url) as mq:
        for entity, address in addresses.items():
            await mq.publish(event("sequence.enrolled", entity, enrolled_data(steps=1, address=address)))
        await mq.publish_raw(b"{not json")
        await wait_for(
            lambda: pg.fetchval("SELECT count(*) = 2 FROM sfworkflow.instance WHERE state = 'sending'"),
            what="two instances sending",
        )
        await wait_for(
            lambda: pg.fetchval("SELECT count(*) = 1 FROM sfworkflow.outbox WHERE kind = 'dead_letter'"),
            what="one dead letter",
        )
    await pg.execute("UPDATE sfworkflow.instance SET state_entered_at = now() - interval '20 minutes'")
    assert await state_of(pg, "status-stuck-1") == "sending"
    return addresses


async def test_the_status_page_shows_stuck_instances_dead_letters_and_diagrams(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    settings = dataclasses.replace(settings, admin_token="a-token-the-page-does-not-need")
    async with running_service(settings) as service, aiohttp.ClientSession() as http:
        addresses = await _stuck_instances(settings, pg)
        async with http.get(f"http://127.0.0.1:{service.http_port}/") as r:  # no token: it is read-only
            assert r.status == 200 and r.content_type == "text/html"
            assert "default-src 'none'" in r.headers["Content-Security-Policy"]
            html = await r.text()
    assert '<meta http-equiv="refresh" content="10">' in html
    assert "<script" not in html and "http://" not in html and "https://" not in html  # no JS, no external asset
    for text in ("status-stuck-1", TENANT, "no_progress", "sequence.send_step", "reissue_command"):
        assert text in html, text
    assert "&lt;b&gt;esc&amp;&#x27;&quot;" in html and "<b>esc" not in html  # ids are escaped
    assert "invalid_json" in html  # dead letters by reason
    assert "stateDiagram-v2" in html and "sequence v" in html  # each workflow's diagram
    assert "Instances by workflow and state" in html and "Outbox backlog" in html
    for address in addresses.values():  # ids only: no message body, no recipient address
        assert address not in html


async def _run(*cmd: str) -> tuple[int, bytes, bytes]:
    """Run Chromium without blocking the event loop (the service under test answers on this loop)."""
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CHROMIUM_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


@pytest.mark.timeout(INSTALL_TIMEOUT_S * 2 + 180)
async def test_the_status_page_in_headless_chromium(
    settings: Settings, pg: asyncpg.Connection, chromium: str, tmp_path: Path
) -> None:
    async with running_service(settings) as service:
        await _stuck_instances(settings, pg)
        url = f"http://127.0.0.1:{service.http_port}/"
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars",
        ]  # fmt: skip
        rc, dom, err = await _run(chromium, *flags, f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", url)
        assert rc == 0, err.decode(errors="replace")[-2000:]
        shot = tmp_path / "status.png"
        rc, _out, err = await _run(
            chromium, *flags, f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={shot}",
            "--window-size=1280,2000", url,
        )  # fmt: skip
        assert rc == 0, err.decode(errors="replace")[-2000:]
    text = dom.decode()
    assert "sfworkflow status" in text and "status-stuck-1" in text and "no_progress" in text
    assert shot.exists() and shot.stat().st_size > 10_000, "the screenshot is missing or blank"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copyfile(shot, SCREENSHOT_COPY)
