"""docs/asyncapi.json is what the definitions and the topology generate (core/asyncapi.py), and says what the
service does (tests/integration/test_asyncapi_cli.py validates it with the AsyncAPI project's CLI)."""

from __future__ import annotations

from pathlib import Path

from sfworkflow.contract.topology import commands_queue
from sfworkflow.core import asyncapi
from sfworkflow.core.engine import Engine
from sfworkflow.workflows import DEFINITIONS

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_document_is_what_the_definitions_generate() -> None:
    expected = asyncapi.render(Engine(DEFINITIONS))
    assert asyncapi.ASYNCAPI_PATH.read_text() == expected, (
        "docs/asyncapi.json is stale: run `sfworkflow diagram --write-docs` and commit it"
    )


def test_every_message_of_every_workflow_is_there_with_its_schema() -> None:
    doc = asyncapi.document(Engine(DEFINITIONS))
    messages = doc["components"]["messages"]
    for d in DEFINITIONS:
        for e in d.events:
            m = messages[f"{d.name}_{e}"]
            assert m["payload"]["allOf"][1]["properties"]["data"] == {"$ref": f"../schemas/events/{d.name}.{e}.v1.json"}
            assert (ROOT / "docs" / m["payload"]["allOf"][1]["properties"]["data"]["$ref"]).is_file()
        for c in d.commands:
            assert f"{d.name}_{c}" in doc["channels"][f"commands_{d.name}"]["messages"]
        assert doc["channels"][f"commands_{d.name}"]["address"] == commands_queue(d.name) if d.commands else True
    assert {o["action"] for o in doc["operations"].values()} == {"receive", "send"}
