"""`pip install sfworkflow` is the producer and the worker SDK; the service's own dependencies are an extra."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE_ONLY = ("aiohttp", "transitions", "uvloop")


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
