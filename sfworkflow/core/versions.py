"""Mapping an instance from one loaded definition version to another (pure; ops/versions.py does the work).

`check_versions` and `check_map` refuse a migration that cannot run as asked, `parse_map` reads the
`--map OLD=NEW` entries, `decide` says where one instance goes (or why it cannot): an explicit mapping
first, else the same state when the target has it; never a terminal or initial state of the target, and
only a state that accepts the trigger of every pending timer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sfworkflow.core.engine import CompiledWorkflow, Engine
from sfworkflow.errors import VersionMigrationError


def check_versions(engine: Engine, workflow: str, from_version: int, to_version: int) -> tuple[CompiledWorkflow, ...]:
    """The compiled source and target versions, or VersionMigrationError saying what is not loaded."""
    loaded = sorted(v for n, v in engine.compiled if n == workflow)
    if not loaded:
        known = ", ".join(sorted(engine.latest)) or "none"
        raise VersionMigrationError(f"no workflow {workflow!r} is loaded (loaded workflows: {known})")
    if from_version == to_version:
        raise VersionMigrationError(f"--from and --to are both {from_version}: nothing to migrate")
    for v in (from_version, to_version):
        if (workflow, v) not in engine.compiled:
            raise VersionMigrationError(
                f"{workflow} v{v} is not loaded (loaded versions: {', '.join(f'v{x}' for x in loaded)}); "
                f"deploy a release that defines it (DEFINITIONS = (...) in sfworkflow/workflows/) and run this "
                f"command from that release"
            )
    return engine.compiled[(workflow, from_version)], engine.compiled[(workflow, to_version)]


def parse_map(entries: Iterable[str]) -> dict[str, str]:
    """`["OLD=NEW", ...]` -> {OLD: NEW}; a malformed or repeated entry raises VersionMigrationError."""
    out: dict[str, str] = {}
    for entry in entries:
        old, sep, new = entry.partition("=")
        old, new = old.strip(), new.strip()
        if not sep or not old or not new:
            raise VersionMigrationError(f"--map {entry!r}: expected OLD_STATE=NEW_STATE")
        if old in out and out[old] != new:
            raise VersionMigrationError(f"--map gives state {old!r} twice ({out[old]!r} and {new!r})")
        out[old] = new
    return out


def _states(cw: CompiledWorkflow) -> list[str]:
    return [str(s) for s in cw.definition.states]


def _target_problem(target: CompiledWorkflow, state: str) -> str | None:
    d = target.definition
    if state not in _states(target):
        return f"{state!r} is not a state of {d.name} v{d.version}"
    if state in d.terminal:
        return f"{state!r} is a terminal state of {d.name} v{d.version} (a migration does not end instances)"
    if state == target.initial:
        return f"{state!r} is the initial state of {d.name} v{d.version} (it means 'not started')"
    return None


def check_map(source: CompiledWorkflow, target: CompiledWorkflow, mapping: Mapping[str, str]) -> None:
    """Every --map entry must name a state of the source version and a usable state of the target."""
    s = source.definition
    for old, new in mapping.items():
        if old not in _states(source):
            raise VersionMigrationError(
                f"--map {old}={new}: {old!r} is not a state of {s.name} v{s.version} "
                f"(states: {', '.join(_states(source))})"
            )
        problem = _target_problem(target, new)
        if problem:
            raise VersionMigrationError(f"--map {old}={new}: {problem}")


@dataclass(frozen=True, slots=True)
class Verdict:
    to_state: str | None  # None: refused
    reason: str | None = None  # why it was refused


def decide(
    source: CompiledWorkflow, target: CompiledWorkflow, mapping: Mapping[str, str], state: str, timers: Iterable[str]
) -> Verdict:
    """Where an instance in `state` with pending timers `timers` goes in the target version, or why not."""
    s, t = source.definition, target.definition
    if state not in _states(source):
        return Verdict(None, f"state {state!r} is not a state of {s.name} v{s.version}")
    if state in mapping:
        to_state = mapping[state]
    elif state in _states(target):
        to_state = state
    else:
        return Verdict(
            None, f"state {state!r} does not exist in {t.name} v{t.version} and no --map {state}=STATE was given"
        )
    problem = _target_problem(target, to_state)
    if problem:
        return Verdict(None, problem)
    accepted = target.triggers_by_state[to_state]
    for name in sorted(set(timers)):
        if f"timer_{name}" not in accepted:
            return Verdict(
                None,
                f"pending timer {name!r}: state {to_state!r} of {t.name} v{t.version} does not accept timer_{name}",
            )
    return Verdict(to_state)
