"""Definition versions, pure: two versions of `sequence` side by side, and the migration's mapping rules.

`sequence_v2()` is also the v2 the integration tests deploy (tests/integration/test_versions.py).
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime
from enum import StrEnum

import pytest

from sfworkflow.cli import versions as versions_cmd
from sfworkflow.cli.main import build_parser
from sfworkflow.core.definition import EngineEvent, InstanceKey, InstanceView, Step, Transition, WorkflowDefinition
from sfworkflow.core.engine import Engine, Outcome
from sfworkflow.core.versions import check_map, check_versions, decide, parse_map
from sfworkflow.errors import VersionMigrationError
from sfworkflow.ops.versions import InstanceResult, MigrationReport
from sfworkflow.settings import Settings
from sfworkflow.workflows import DEFINITIONS, sequence
from sfworkflow.workflows.sequence import S

V1 = sequence.DEFINITION

# v2 drops pause/resume (state `paused`) and confirms the last send before completing: sending --step_sent
# (last step)--> confirming --timer_confirm_due--> completed.
S2 = StrEnum("S2", [(m.name, m.value) for m in S if m is not S.PAUSED] + [("CONFIRMING", "confirming")])


def finish_then_confirm(step: Step) -> None:
    sequence.finish(step)
    step.set_timer_in("confirm_due", 0)


def record_confirmed(step: Step) -> None:
    step.note(confirmed=True)


def _touches(t: Transition, state: str) -> bool:
    sources = [t.source] if isinstance(t.source, str) else list(t.source)
    return state in sources or t.dest == state


def sequence_v2() -> WorkflowDefinition:
    transitions: list[Transition] = []
    for t in V1.transitions:
        if _touches(t, S.PAUSED):
            continue
        if t.trigger == "step_sent" and t.dest == S.COMPLETED:
            t = dataclasses.replace(t, dest=S2.CONFIRMING, action=finish_then_confirm)
        transitions.append(t)
    transitions.append(Transition("timer_confirm_due", S2.CONFIRMING, S2.COMPLETED, action=record_confirmed))
    return dataclasses.replace(
        V1,
        version=2,
        states=S2,
        internal_events=V1.internal_events | {"timer_confirm_due"},
        transitions=tuple(transitions),
        description=V1.description + " (v2: confirms the last send; no pause)",
    )


V2 = sequence_v2()
ENGINE = Engine((*DEFINITIONS, V2))
C1 = ENGINE.workflow("sequence", 1)
C2 = ENGINE.workflow("sequence", 2)
KEY = InstanceKey("3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00", "sequence", "enr-1")
T0 = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)


def _event(name: str, data: dict | None = None, internal: bool = False) -> EngineEvent:
    return EngineEvent(str(uuid.uuid4()), name, data or {}, T0, internal=internal)


# ---- two versions loaded -----------------------------------------------------------------------------------
def test_new_instances_start_on_the_latest_version() -> None:
    assert ENGINE.latest["sequence"] == 2
    assert ENGINE.workflow("sequence") is C2
    assert C1 is not None and C1.definition is V1


def test_an_instance_steps_on_the_machine_of_its_own_version() -> None:
    """The same instance and event: v1 completes, v2 goes to `confirming` first."""
    context = {
        "sequence_id": "s",
        "lead_id": "l",
        "recipient": {"channel": "email", "address": "a@example.com"},
        "steps": [{"template_id": "t", "delay_seconds": 0}],
        "cursor": 0,
        "attempt": 1,
    }
    view = InstanceView(KEY, "sending", context, 2, 1)
    ev = _event("step_sent", {"step": 0})
    assert C1 is not None and C2 is not None
    d1 = ENGINE.step(C1, KEY, view, ev, T0)
    d2 = ENGINE.step(C2, KEY, view, ev, T0)
    assert (d1.outcome, d1.to_state) == (Outcome.APPLIED, "completed")
    assert (d2.outcome, d2.to_state) == (Outcome.APPLIED, "confirming")
    assert [t.name for t in d2.timers_set] == ["confirm_due"]
    paused = ENGINE.step(C2, KEY, InstanceView(KEY, "waiting", context, 2, 2), _event("paused"), T0)
    assert paused.outcome is Outcome.PARKED  # v2 has no pause


# ---- check_versions, parse_map, check_map --------------------------------------------------------------
def test_check_versions_names_what_is_not_loaded() -> None:
    assert check_versions(ENGINE, "sequence", 1, 2) == (C1, C2)
    assert check_versions(ENGINE, "sequence", 2, 1) == (C2, C1)  # rolling back is a migration too
    with pytest.raises(VersionMigrationError, match=r"sequence v3 is not loaded \(loaded versions: v1, v2\)"):
        check_versions(ENGINE, "sequence", 1, 3)
    with pytest.raises(VersionMigrationError, match="sequence v2 is not loaded"):
        check_versions(Engine(DEFINITIONS), "sequence", 1, 2)
    with pytest.raises(VersionMigrationError, match="no workflow 'nope'"):
        check_versions(ENGINE, "nope", 1, 2)
    with pytest.raises(VersionMigrationError, match="both 1"):
        check_versions(ENGINE, "sequence", 1, 1)


def test_parse_map() -> None:
    assert parse_map([]) == {}
    assert parse_map(["paused=waiting", " retry_wait = sending "]) == {"paused": "waiting", "retry_wait": "sending"}
    assert parse_map(["paused=waiting", "paused=waiting"]) == {"paused": "waiting"}
    for bad in ("paused", "=waiting", "paused=", ""):
        with pytest.raises(VersionMigrationError, match="expected OLD_STATE=NEW_STATE"):
            parse_map([bad])
    with pytest.raises(VersionMigrationError, match="twice"):
        parse_map(["paused=waiting", "paused=sending"])


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"pausd": "waiting"}, "'pausd' is not a state of sequence v1"),
        ({"paused": "paused"}, "'paused' is not a state of sequence v2"),
        ({"paused": "completed"}, "'completed' is a terminal state of sequence v2"),
        ({"paused": "new"}, "'new' is the initial state of sequence v2"),
    ],
)
def test_check_map_refuses_bad_entries(mapping: dict[str, str], message: str) -> None:
    assert C1 is not None and C2 is not None
    with pytest.raises(VersionMigrationError, match=message):
        check_map(C1, C2, mapping)


# ---- decide ----------------------------------------------------------------------------------------------------
def test_a_state_that_exists_in_the_target_is_kept() -> None:
    assert C1 is not None and C2 is not None
    assert decide(C1, C2, {}, "waiting", ["step_due"]).to_state == "waiting"
    assert decide(C1, C2, {}, "retry_wait", ["retry_due"]).to_state == "retry_wait"
    assert decide(C1, C2, {}, "sending", []).to_state == "sending"


def test_a_state_missing_from_the_target_needs_a_map_entry() -> None:
    assert C1 is not None and C2 is not None
    v = decide(C1, C2, {}, "paused", [])
    assert v.to_state is None
    assert v.reason == "state 'paused' does not exist in sequence v2 and no --map paused=STATE was given"
    assert decide(C1, C2, {"paused": "waiting"}, "paused", []).to_state == "waiting"


def test_a_map_entry_wins_over_keeping_the_name() -> None:
    assert C1 is not None and C2 is not None
    assert decide(C1, C2, {"retry_wait": "sending"}, "retry_wait", []).to_state == "sending"


def test_the_target_state_must_accept_every_pending_timer() -> None:
    assert C1 is not None and C2 is not None
    v = decide(C1, C2, {"waiting": "sending"}, "waiting", ["step_due"])
    assert v.to_state is None
    assert v.reason == "pending timer 'step_due': state 'sending' of sequence v2 does not accept timer_step_due"
    v = decide(C1, C2, {"paused": "retry_wait"}, "paused", ["step_due"])
    assert v.reason is not None and "does not accept timer_step_due" in v.reason
    assert decide(C1, C2, {"paused": "retry_wait"}, "paused", ["retry_due"]).to_state == "retry_wait"


def test_rolling_back_refuses_states_only_the_newer_version_has() -> None:
    assert C1 is not None and C2 is not None
    v = decide(C2, C1, {}, "confirming", ["confirm_due"])
    assert v.to_state is None and "does not exist in sequence v1" in (v.reason or "")
    v = decide(C2, C1, {"confirming": "sending"}, "confirming", ["confirm_due"])
    assert v.reason == "pending timer 'confirm_due': state 'sending' of sequence v1 does not accept timer_confirm_due"
    assert decide(C2, C1, {"confirming": "sending"}, "confirming", []).to_state == "sending"


def test_an_unknown_or_unusable_state_is_refused() -> None:
    assert C1 is not None and C2 is not None
    assert "not a state of sequence v1" in (decide(C1, C2, {}, "bogus", []).reason or "")
    assert "initial state" in (decide(C1, C2, {}, "new", []).reason or "")
    assert "terminal state" in (decide(C1, C2, {}, "completed", []).reason or "")


# ---- the report and the command line -----------------------------------------------------------------------
def test_report_lines() -> None:
    tenant = KEY.tenant_id
    results = [
        InstanceResult(1, tenant, "a", "migrated", "waiting", "waiting"),
        InstanceResult(2, tenant, "b", "refused", "paused", reason="no map"),
        InstanceResult(3, tenant, "c", "skipped", "sending", reason="busy (row locked)"),
    ]
    dry = MigrationReport("sequence", 1, 2, True, results)
    assert dry.lines() == [
        f"would migrate {tenant}/sequence/a: v1 waiting -> v2 waiting",
        f"would refuse {tenant}/sequence/b (paused): no map",
        f"skipped {tenant}/sequence/c (sending): busy (row locked)",
        "sequence v1 -> v2 (dry run: nothing changed): would migrate 1, refused 1, skipped 1, would break 0 (their "
        "histories replay differently)",
        "skipped instances were busy or changed meanwhile: run the command again to take them",
    ]
    real = MigrationReport("sequence", 1, 2, False, results[:1])
    assert real.lines() == [f"migrated {tenant}/sequence/a: v1 waiting -> v2 waiting", real.lines()[-1]]
    assert real.lines()[-1] == "sequence v1 -> v2: migrated 1, refused 0, skipped 0"


def test_command_line() -> None:
    argv = "migrate-instances --workflow sequence --from 1 --to 2 --map paused=waiting --map retry_wait=sending"
    args = build_parser().parse_args([*argv.split(), "--dry-run", "--limit", "10", "--reason", "v2 rollout"])
    assert (args.command, args.workflow, args.from_version, args.to_version) == ("migrate-instances", "sequence", 1, 2)
    assert args.mapping == ["paused=waiting", "retry_wait=sending"]
    assert (args.dry_run, args.limit, args.reason) == (True, 10, "v2 rollout")
    defaults = build_parser().parse_args(["migrate-instances", "--workflow", "sequence", "--from", "1", "--to", "2"])
    assert (defaults.mapping, defaults.dry_run, defaults.limit, defaults.reason) == ([], False, None, None)


async def test_command_refuses_a_version_that_is_not_loaded(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release with only sequence v1: the command says so before touching the database."""
    monkeypatch.setattr(versions_cmd, "loaded_definitions", lambda: DEFINITIONS)
    assert V1 in DEFINITIONS and V2 not in DEFINITIONS
    args = build_parser().parse_args(["migrate-instances", "--workflow", "sequence", "--from", "1", "--to", "2"])
    unreachable = Settings(database_url="postgresql://nobody@127.0.0.1:1/none", amqp_url="amqp://127.0.0.1:1/")
    assert await versions_cmd._cmd_migrate_instances(unreachable, args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("sfworkflow migrate-instances: sequence v2 is not loaded (loaded versions: v1)")
