"""The status page at `/`: server-rendered HTML, then the same page in real headless Chromium (Debian's package):
the DOM it built and a screenshot (kept at /tmp/sfworkflow-status.png), decoded to check that the diagrams'
colours are on it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from sfworkflow.core import svg
from sfworkflow.http import status_page
from sfworkflow.ops import schedules
from sfworkflow.runtime.service import Service
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.support import REQUIRE_TOOLS, TENANT, Amqp, enrolled_data, event, running_service, state_of

COMMANDS = "sfworkflow.commands.sequence"
SCREENSHOT_COPY = Path("/tmp/sfworkflow-status.png")
CHROMIUM_TIMEOUT_S = 90.0
SCREENSHOT_W, SCREENSHOT_H = 1280, 2400  # tall enough for the page's top and its first diagrams
INSTALL_TIMEOUT_S = 600
STRICT_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
ACTIVE_STATE_FILL = bytes.fromhex(svg.KINDS["active"][0].removeprefix("#"))  # inside every active state's box


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
        why = f"Chromium is not installed and could not be installed (apt-get install -y chromium). {tried}"
        if REQUIRE_TOOLS:  # tests.support.require_tool's policy: under CI a missing tool fails the test
            pytest.fail(why + "; SFWORKFLOW_TEST_REQUIRE_TOOLS=1 makes that a failure")
        pytest.skip(why)
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


async def _counted(service: Service, events: int) -> None:
    """Wait until this replica's counters hold `events` events committed (recorded just after the ack)."""

    async def committed() -> bool:
        age = status_page.snapshot(service, 0.0).age_buckets
        return bool(age) and age[-1][1] >= events

    await wait_for(committed, what=f"{events} events in the event-age histogram")


def _card(html: str, card: str) -> str:
    """The value shown on an at-a-glance card."""
    found = re.search(rf'<div class="card" id="{card}"><div class="v[^"]*">([^<]*)</div>', html)
    assert found, f"no card {card}"
    return found[1]


async def test_the_status_page_shows_stuck_instances_dead_letters_and_diagrams(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    settings = dataclasses.replace(settings, admin_token="a-token-the-page-does-not-need")
    async with running_service(settings) as service, aiohttp.ClientSession() as http:
        addresses = await _stuck_instances(settings, pg)
        await _counted(service, 2)
        async with http.get(f"http://127.0.0.1:{service.http_port}/") as r:  # no token: it is read-only
            assert r.status == 200 and r.content_type == "text/html"
            assert r.headers["Content-Security-Policy"] == STRICT_CSP  # no script, nothing from elsewhere
            html = await r.text()
        compiled = sorted(service.engine.compiled)
    assert '<meta http-equiv="refresh" content="10">' in html
    assert "<script" not in html and "http://" not in html and "https://" not in html  # no JS, no external asset
    for text in ("status-stuck-1", TENANT, "no_progress", "sequence.send_step", "reissue_command"):
        assert text in html, text
    assert "&lt;b&gt;esc&amp;&#x27;&quot;" in html and "<b>esc" not in html  # ids are escaped
    assert "invalid_json" in html  # dead letters by reason
    assert "stateDiagram-v2" in html and "sequence v" in html  # each workflow's Mermaid source, under its SVG
    assert html.count('<svg class="workflow-diagram"') == len(compiled)  # one drawing per loaded version
    for name, version in compiled:
        block = html.split(f'id="diagram-{name}-v{version}"', 1)[1].split('<div class="workflow"', 1)[0]
        assert '<svg class="workflow-diagram"' in block and "</svg>" in block, name
        assert "<details><summary>Mermaid source</summary><pre>stateDiagram-v2" in block, name
    assert 'data-state="sending"' in html and "stuck in sending (2)" in html  # where the stuck instances are
    assert "Instances by workflow and state" in html and "Outbox backlog" in html
    # At a glance: the two enrolled events, counted by this replica since it started, and the outbox.
    assert re.fullmatch(r"\d+(\.\d)?", _card(html, "events-per-s")), _card(html, "events-per-s")
    for lag in ("lag-p50", "lag-p99"):
        assert re.fullmatch(r"\d+ ms|\d+\.\d s|\d+[mhd]|> .+", _card(html, lag)), _card(html, lag)
    assert re.fullmatch(r"none|\d+ ms|\d+\.\d s|\d+[mhd]", _card(html, "outbox-oldest"))
    assert "this replica, since start: last" in html
    for address in addresses.values():  # ids only: no message body, no recipient address
        assert address not in html


async def test_the_status_page_lists_the_schedules(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(settings) as service, aiohttp.ClientSession() as http:
        added = schedules.build(
            service.engine, tenant=TENANT, name="daily-report", kind="tick", event_type="salesflow.daily_report",
            cron="0 8 * * *", timezone="Asia/Riyadh",
        )  # fmt: skip
        await schedules.add(pg, added, "oncall", "SalesFlow's beat job")
        await schedules.pause(pg, None, "follow_up.scan", "oncall", "INC-3 <b>scan</b> & co")
        async with http.get(f"http://127.0.0.1:{service.http_port}/") as r:
            assert r.status == 200
            html = await r.text()
    section = html.split('<section id="schedules">', 1)[1].split("</section>", 1)[0]
    assert "<h2>Schedules</h2>" in section
    rows = {re.sub(r"<[^>]+>", "", row.split("</td>", 1)[0]): row for row in section.split("<tr><td>")[1:]}
    assert set(rows) == {"daily-report", "follow_up.scan", "sequence.tick"}, rows
    report = rows["daily-report"]
    for text in (TENANT, "cron <code>0 8 * * *</code>", "Asia/Riyadh", "tick <code>salesflow.daily_report</code>",
                 '<span class="pill ok">active</span>', "05:00:00 UTC"):  # fmt: skip
        assert text in report, (text, report)
    assert re.search(r"<td class=num>0</td><td class=num>0</td></tr>", report), report  # fired, missed
    tick = rows["sequence.tick"]
    assert '<span class="muted">code</span>' in tick and "every 300 s" in tick and TENANT not in tick, tick
    assert '<span class="pill bad">paused</span>' in rows["follow_up.scan"]
    assert "INC-3" not in html  # a reason is not shown (free text)


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
        await _counted(service, 2)
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
            f"--window-size={SCREENSHOT_W},{SCREENSHOT_H}", url,
        )  # fmt: skip
        assert rc == 0, err.decode(errors="replace")[-2000:]
    text = dom.decode()
    assert "sfworkflow status" in text and "status-stuck-1" in text and "no_progress" in text
    assert text.count('<svg class="workflow-diagram"') == len(service.engine.compiled)  # in the browser's DOM
    assert 'id="events-per-s"' in text and "At a glance" in text
    assert shot.exists() and shot.stat().st_size > 10_000, "the screenshot is missing or blank"
    shutil.copyfile(shot, SCREENSHOT_COPY)
    width, height, colours = _png_colours(shot.read_bytes())
    assert (width, height) == (SCREENSHOT_W, SCREENSHOT_H)
    assert len(colours) > 50, "the screenshot is blank or nearly"
    assert ACTIVE_STATE_FILL in colours, "no state box of a diagram on the screenshot: the SVG did not render"


def _png_colours(png: bytes) -> tuple[int, int, set[bytes]]:
    """Width, height and the distinct RGB colours of an 8-bit, non-interlaced RGB(A) PNG (Chromium's)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks, header = 8, [], b""
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos : pos + 8])
        if kind == b"IHDR":
            header = png[pos + 8 : pos + 8 + n]
        elif kind == b"IDAT":
            chunks.append(png[pos + 8 : pos + 8 + n])
        pos += 12 + n
    width, height, depth, colour_type, _compression, _filter, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour_type in (2, 6) and not interlace, (depth, colour_type, interlace)
    bpp = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(b"".join(chunks)), width * bpp
    prev, colours = bytearray(stride), set()
    for y in range(height):  # undo each row's filter (PNG spec, section 9)
        start = y * (stride + 1)
        kind, row = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                row[i] = (row[i] + row[i - bpp]) & 255
        elif kind == 2:
            row = bytearray((a + b) & 255 for a, b in zip(row, prev, strict=True))
        elif kind == 3:
            for i in range(stride):
                row[i] = (row[i] + ((row[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif kind == 4:
            for i in range(stride):
                a, b, c = (row[i - bpp], prev[i], prev[i - bpp]) if i >= bpp else (0, prev[i], 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        colours.update(bytes(row[i : i + 3]) for i in range(0, stride, bpp))
        prev = row
    return width, height, colours
