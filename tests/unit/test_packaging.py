"""`pip install sfworkflow` is the producer and the worker SDK; the service's own dependencies are an extra."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE_ONLY = ("aiohttp", "transitions", "uvloop", "grandalf", "shtab", "croniter")


def _project() -> dict[str, object]:
    project: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def test_the_base_install_leaves_the_service_s_dependencies_to_the_service_extra() -> None:
    base = " ".join(_project()["dependencies"])  # type: ignore[arg-type]
    extra = " ".join(_project()["optional-dependencies"]["service"])  # type: ignore[index]
    for name in SERVICE_ONLY:
        assert name not in base and name in extra


def test_the_sdk_imports_without_the_service_s_dependencies_and_the_cli_says_what_to_install() -> None:
    script = f"""
import sys
for name in {SERVICE_ONLY!r}:
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
from sfworkflow.client.worker import CommandWorker, PostgresDedupe
from sfworkflow.client.producer import EventPublisher, build_event
from sfworkflow.cli.main import main
sys.exit(main(["stuck"]))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "pip install 'sfworkflow[service]'" in done.stderr
    assert "aiohttp, transitions" in done.stderr


def test_without_opentelemetry_installed_nothing_is_traced_and_everything_still_works() -> None:
    script = """
import sys
sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
from sfworkflow.client import tracing
from sfworkflow.client.producer import build_event
from sfworkflow.runtime.service import Service
from sfworkflow.settings import Settings
assert tracing.tracer() is None and tracing.current_traceparent() is None and tracing.current_trace_id() is None
assert tracing.parent_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01") is None
event = build_event("sequence.paused", tenant_id="9b2c4f1a-7d3e-4c5b-a8f9-0e1d2c3b4a59", entity_id="e", data={},
                    source="tests")
assert event["trace_id"] is None
assert Service(Settings()).tracer is None
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
