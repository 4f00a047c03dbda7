"""docs/asyncapi.json validated by the AsyncAPI project's own CLI (scripts/asyncapi: @asyncapi/cli from the npm
registry, installed by scripts/bootstrap), and the same check refusing a broken copy."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


async def _validate(path: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(ROOT / "scripts" / "asyncapi"), "validate", str(path), "--fail-severity", "warn",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 110)
    return await proc.wait(), out.decode()


async def test_the_asyncapi_document_is_valid_for_the_asyncapi_cli() -> None:
    rc, out = await _validate(ROOT / "docs" / "asyncapi.json")
    assert rc == 0, out
    assert "is valid" in out, out


async def test_the_asyncapi_cli_refuses_a_broken_document(tmp_path: Path) -> None:
    doc = json.loads((ROOT / "docs" / "asyncapi.json").read_text())
    doc["channels"]["events"]["bindings"]["amqp"]["exchange"]["type"] = "round-robin"
    broken = ROOT / "docs" / f".broken-{tmp_path.name}.json"  # beside the original: its $refs resolve the same
    broken.write_text(json.dumps(doc))
    try:
        rc, out = await _validate(broken)
    finally:
        broken.unlink()
    assert rc != 0, out


async def test_the_document_renders_as_one_html_page(tmp_path: Path) -> None:
    out = tmp_path / "asyncapi.html"
    proc = await asyncio.create_subprocess_exec(
        str(ROOT / "scripts" / "asyncapi"), "html", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    text, _ = await asyncio.wait_for(proc.communicate(), 110)
    assert await proc.wait() == 0, text.decode()
    page = out.read_text()
    assert "sfworkflow" in page and "sequence.send_step" in page and "sfworkflow.commands.sequence" in page
