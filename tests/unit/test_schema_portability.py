"""The JSON Schemas under schemas/ as other teams' validators read them (Ajv in strict mode, Python, Go)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2] / "schemas"
FILES = sorted(ROOT.glob("*/*.json"))


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for k, v in node.items():
            out += _walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _walk(v, f"{path}/{i}")
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_schema_s_id_is_a_urn_that_names_its_file(path: Path) -> None:
    """Not https://sfworkflow/…: a host nobody owns, which some tools try to fetch."""
    name, _, version = path.name.removesuffix(".json").rpartition(".v")
    assert orjson.loads(path.read_bytes())["$id"] == f"urn:sfworkflow:schemas:{path.parent.name}:{name}:v{version}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_schema_has_a_union_of_types_other_than_nullable(path: Path) -> None:
    """Ajv's strict mode rejects `"type": ["object", "string"]` without allowUnionTypes; anyOf says the same."""
    for where, node in _walk(orjson.loads(path.read_bytes())):
        t = node.get("type")
        if isinstance(t, list):
            assert len([x for x in t if x != "null"]) == 1, f"{path.name}{where}: type {t}"


@pytest.mark.parametrize("name", ["command", "lifecycle"])
def test_the_envelopes_sfworkflow_publishes_accept_fields_added_later(name: str) -> None:
    """A consumer validating with the v1 schema keeps working when sfworkflow adds an optional field."""
    from sfworkflow.contract import schemas

    s = schemas.default()
    example = orjson.loads((ROOT / "envelope" / f"{name}.v1.json").read_bytes())["examples"][0]
    assert s.errors("envelope", name, example) == []
    assert (
        s.errors(
            "envelope", name, {**example, "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
        )
        == []
    )
