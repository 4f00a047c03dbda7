"""The JSON Schemas under schemas/: they compile, their examples hold, and they match the definitions."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema_rs
import orjson
import pytest

from sfworkflow.client.producer import build_event, validate_event
from sfworkflow.contract import schemas
from sfworkflow.core.engine import LIFECYCLE_ENDS
from sfworkflow.errors import InvalidEvent
from sfworkflow.workflows import DEFINITIONS

SET = schemas.default()
ROOT = SET.root
FILES = sorted(ROOT.glob("*/*.json"))
KINDS = ("envelope", "events", "commands", "lifecycle")
LIFECYCLE_TYPES = {"workflow.started", "workflow.completed", "workflow.failed", "workflow.compensated"}

EVENT_TYPES = {d.event_type(e) for d in DEFINITIONS for e in d.events}
COMMAND_TYPES = {f"{d.name}.{c}" for d in DEFINITIONS for c in d.commands | d.compensations}


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_schema_dir_is_the_repository_folder_and_not_empty() -> None:
    assert (ROOT / "envelope" / "event.v1.json").is_file()
    assert len(FILES) >= 4
    assert {p.parent.name for p in FILES} <= set(KINDS)


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_schema_file_compiles_and_is_loaded(path: Path) -> None:
    doc = orjson.loads(path.read_bytes())
    assert doc.get("$schema") == "https://json-schema.org/draft/2020-12/schema"
    jsonschema_rs.validator_for(doc, validate_formats=True)
    m = re.fullmatch(r"(.+)\.v(\d+)\.json", path.name)
    assert m, path.name
    assert SET.validator(path.parent.name, m[1], int(m[2])) is not None


EXAMPLES = [(path, i, ex) for path in FILES for i, ex in enumerate(orjson.loads(path.read_bytes()).get("examples", []))]


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_every_schema_has_examples(path: Path) -> None:
    assert orjson.loads(path.read_bytes()).get("examples"), f"{_rel(path)} has no examples"


@pytest.mark.parametrize(("path", "i", "example"), EXAMPLES, ids=[f"{_rel(p)}#{i}" for p, i, _ in EXAMPLES])
def test_example_validates_against_its_schema(path: Path, i: int, example: object) -> None:
    v = jsonschema_rs.validator_for(orjson.loads(path.read_bytes()), validate_formats=True)
    errors = [e.message for e in v.iter_errors(example)]
    assert errors == []


ENVELOPE_EXAMPLES = [
    (name, i, ex)
    for name in ("event", "command", "lifecycle")
    for i, ex in enumerate(SET.raw[("envelope", name, 1)]["examples"])
]


@pytest.mark.parametrize(
    ("envelope", "i", "example"), ENVELOPE_EXAMPLES, ids=[f"{n}#{i}" for n, i, _ in ENVELOPE_EXAMPLES]
)
def test_envelope_example_data_validates_against_its_data_schema(envelope: str, i: int, example: dict) -> None:
    kind = {"event": "events", "command": "commands", "lifecycle": "lifecycle"}[envelope]
    type_ = example["command_type"] if envelope == "command" else example["event_type"]
    version = example.get("schema_version", 1)
    assert SET.errors(kind, type_, example["data"], version) == []


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_every_known_event_type_has_a_schema(event_type: str) -> None:
    assert (ROOT / "events" / f"{event_type}.v1.json").is_file()


@pytest.mark.parametrize("command_type", sorted(COMMAND_TYPES))
def test_every_command_and_compensation_has_a_schema(command_type: str) -> None:
    assert (ROOT / "commands" / f"{command_type}.v1.json").is_file()


@pytest.mark.parametrize("event_type", sorted(LIFECYCLE_TYPES))
def test_every_lifecycle_event_type_has_a_schema(event_type: str) -> None:
    assert (ROOT / "lifecycle" / f"{event_type}.v1.json").is_file()


def test_lifecycle_types_cover_what_the_engine_emits() -> None:
    assert set(LIFECYCLE_ENDS) <= LIFECYCLE_TYPES
    enum = set(SET.raw[("envelope", "lifecycle", 1)]["properties"]["event_type"]["enum"])
    assert enum == LIFECYCLE_TYPES


def test_no_stale_schema_files() -> None:
    assert SET.names("events") == EVENT_TYPES
    assert SET.names("commands") == COMMAND_TYPES
    assert SET.names("lifecycle") == LIFECYCLE_TYPES
    assert SET.names("envelope") == {
        "event",
        "command",
        "lifecycle",
        "tick",
    }  # tick: a schedule's, for SalesFlow's jobs


def test_errors_reports_a_missing_schema_and_valid_instances() -> None:
    assert SET.errors("events", "sequence.nothing", {}) == ["no schema events/sequence.nothing.v1.json"]
    assert SET.errors("events", "sequence.replied", {}) == []
    errors = SET.errors("events", "sequence.step_failed", {"x": 1})
    assert 1 <= len(errors) <= 3 and all(e.startswith("<root>") for e in errors)


# ---- producer.build_event / validate_event -------------------------------------------------------------
TENANT = "9b2c4f1a-7d3e-4c5b-a8f9-0e1d2c3b4a59"
ENROLLED = {
    "sequence_id": "seq-onboarding-7",
    "lead_id": "lead-1093",
    "recipient": {"channel": "email", "address": "ana@example.com"},
    "steps": [{"template_id": "tpl-welcome", "delay_seconds": 0}],
}


def _enrolled(**kw: object) -> dict:
    return build_event(
        "sequence.enrolled",
        tenant_id=TENANT,
        entity_id="enrollment-42",
        data=dict(ENROLLED),
        source="salesflow.sequences",
        **kw,
    )


def test_build_event_is_valid() -> None:
    event = _enrolled()
    validate_event(event)
    validate_event(event, SET)
    assert event["spec_version"] == "1.0" and event["schema_version"] == 1
    assert event["timestamp"].endswith("Z")


def test_build_event_makes_fresh_ids() -> None:
    assert _enrolled()["event_id"] != _enrolled()["event_id"]
    assert _enrolled(event_id="3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00")["event_id"] == (
        "3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00"
    )


@pytest.mark.parametrize(
    ("mutate", "mentions"),
    [
        (lambda e: e.update(tenant_id="nope"), "tenant_id"),
        (lambda e: e["data"].update(steps=[]), "steps"),
        (lambda e: e.update(event_type="sequence.exploded"), "unknown event type"),
        (lambda e: e.update(schema_version=2), "unknown event type"),
        (lambda e: e.update(extra=1), "extra"),
        (lambda e: e.pop("data"), "data"),
    ],
    ids=["bad-tenant", "empty-steps", "unknown-type", "unknown-version", "extra-field", "no-data"],
)
def test_validate_event_raises_for_invalid_events(mutate, mentions: str) -> None:
    event = _enrolled()
    mutate(event)
    with pytest.raises(InvalidEvent) as exc:
        validate_event(event)
    assert mentions in str(exc.value)
