"""The version is written once, in `sfworkflow/__init__.py`; the distribution and the OpenAPI document read it."""

from __future__ import annotations

import importlib.metadata
import pathlib
import tomllib

import sfworkflow
from sfworkflow.http import openapi

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_installed_distribution_has_the_package_version() -> None:
    assert importlib.metadata.version("sfworkflow") == sfworkflow.__version__


def test_openapi_document_states_the_package_version() -> None:
    assert openapi.document()["info"]["version"] == sfworkflow.__version__


def test_pyproject_reads_the_version_from_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"], "pyproject.toml must not write the version a second time"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["hatch"]["version"]["path"] == "sfworkflow/__init__.py"
