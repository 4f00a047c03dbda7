"""Recorded histories as steps to replay (core/compat.py from_rows), without a database: what a replay stops at, and
the version the steps before a migration ran on."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from sfworkflow.core.compat import from_rows
from sfworkflow.core.definition import InstanceKey

KEY = InstanceKey("3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00", "sequence", "enr-1")
AT = datetime(2027, 1, 4, 8, tzinfo=UTC)


def _row(seq: int, outcome: str = "applied", body: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return {
        "seq": seq, "event_id": f"00000000-0000-4000-8000-{seq:012d}", "event_type": "sequence.enrolled",
        "outcome": outcome, "to_state": "waiting", "detail": None, "created_at": AT,
        "body": None if body is None else orjson.dumps(body), **kw,
    }  # fmt: skip


def test_a_lower_case_z_timestamp_the_envelope_schema_admits_is_read() -> None:
    h = from_rows(KEY, 1, [_row(1, body={"timestamp": "2027-01-04T07:59:00z", "data": {"x": 1}})])
    assert h.cut is None and h.steps[0].timestamp == datetime(2027, 1, 4, 7, 59, tzinfo=UTC)


def test_an_unreadable_body_cuts_that_history_only() -> None:
    h = from_rows(KEY, 1, [_row(1, body={"data": {}})])  # no timestamp
    assert (h.steps, h.cut, h.cut_at) == ([], "an event body that could not be read", 1)


def test_the_steps_before_a_migration_are_replayed_on_the_version_they_ran_on() -> None:
    rows = [
        _row(1, body={"timestamp": "2027-01-04T07:59:00Z", "data": {}}),
        _row(2, "migrated", event_type="sequence.migrated", detail={"from_version": 1, "to_version": 2}),
        _row(3, body={"timestamp": "2027-01-04T08:01:00Z", "data": {}}),
    ]
    h = from_rows(KEY, 2, rows)
    assert h.definition_version == 1 and [s.seq for s in h.steps] == [1] and h.cut_at == 2


def test_an_event_recorded_before_bodies_were_kept_ends_the_replay_there() -> None:
    h = from_rows(KEY, 1, [_row(1, body={"timestamp": "2027-01-04T07:59:00Z", "data": {}}), _row(2)])
    assert [s.seq for s in h.steps] == [1] and "migration 0017" in (h.cut or "")
