"""The engine runs the machine's transitions itself (core/engine.py, `Route`); here it is held to the machine.

Every workflow's property walk (random event sequences: tests/unit/test_*_properties.py) runs again with each
step fired both ways: by the routes, on the step the engine goes on with, and by the `transitions` machine's
own trigger, on a copy of the step made before. The state reached, and everything the guards and actions
wrote on the step (context, commands, timers, notes, requests), must be the same, or both must raise the same
exception.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from transitions import Machine

from sfworkflow.core import engine
from sfworkflow.core.definition import Step
from sfworkflow.core.engine import Route, machine_routes
from sfworkflow.errors import DefinitionError
from tests.unit import (
    enginekit,
    test_affiliate_payout_properties,
    test_agent_properties,
    test_follow_up_properties,
    test_notification_properties,
    test_partner_approval_properties,
    test_prospecting_properties,
    test_self_improvement_properties,
    test_sequence_properties,
)

WALKS = [
    test_affiliate_payout_properties,
    test_agent_properties,
    test_follow_up_properties,
    test_notification_properties,
    test_partner_approval_properties,
    test_prospecting_properties,
    test_self_improvement_properties,
    test_sequence_properties,
]
WRITTEN = ("context", "outgoing", "timers_set", "timers_cancelled", "cancel_all_timers", "notes", "requests", "_n")


def _copy(step: Step) -> Step:
    twin = copy.copy(step)
    for name in WRITTEN:
        setattr(twin, name, copy.deepcopy(getattr(step, name)))
    return twin


def _by_machine(state: str, step: Step) -> str | None:
    """What the machine's trigger does: the state it reaches, or None when no transition applies."""
    compiled = enginekit.ENGINE.workflow(step.definition.name, step.definition.version)
    assert compiled is not None
    if step.event.name not in compiled.triggers_by_state[state]:
        return None
    compiled.cursor.state = state
    moved = compiled.machine.events[step.event.name].trigger(compiled.cursor, step)
    return str(compiled.cursor.state) if moved else None


def _outcome(fire: Callable[[], str | None]) -> tuple[str, Any]:
    try:
        return "state", fire()
    except Exception as exc:
        return "raised", (type(exc), str(exc))


def _checked(fire_by_routes: Callable[[tuple[Route, ...], str, Step], str | None]) -> Any:
    checks = {"steps": 0}

    def fire(routes: tuple[Route, ...], state: str, step: Step) -> str | None:
        twin = _copy(step)
        expected = _outcome(lambda: _by_machine(state, twin))
        got = _outcome(lambda: fire_by_routes(routes, state, step))
        assert got == expected, f"{step.definition.name} {state} + {step.event.name}: {got} != {expected}"
        for name in WRITTEN:
            assert getattr(step, name) == getattr(twin, name), f"{step.definition.name} {step.event.name}: {name}"
        checks["steps"] += 1
        if got[0] == "raised":
            raise RuntimeError(got[1][1])
        return got[1]  # type: ignore[no-any-return]

    return fire, checks


@pytest.mark.parametrize("walk", WALKS, ids=[m.__name__.rpartition(".")[2] for m in WALKS])
def test_routes_decide_what_the_machine_decides(walk: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    fire, checks = _checked(engine._fire)
    monkeypatch.setattr(engine, "_fire", fire)
    walk.test_random_event_sequences_keep_the_engine_sound()
    assert checks["steps"] > 100  # the walk went through the routes


def test_a_machine_with_callbacks_the_routes_do_not_run_is_refused() -> None:
    """Routes run guards and `after` actions only; a machine with any other callback would be run wrongly."""

    class Model:
        state = "a"

    def noop(*_: Any) -> None:
        return None

    plain = Machine(model=Model(), states=["a", "b"], initial="a", auto_transitions=False,
                    transitions=[{"trigger": "go", "source": "a", "dest": "b", "after": [noop]}])  # fmt: skip
    assert machine_routes(plain)[("a", "go")] == (Route((), "b", (noop,)),)
    entering = Machine(model=Model(), states=[{"name": "a"}, {"name": "b", "on_enter": [noop]}], initial="a",
                       auto_transitions=False, transitions=[{"trigger": "go", "source": "a", "dest": "b"}])  # fmt: skip
    with pytest.raises(DefinitionError, match=r"b\.on_enter"):
        machine_routes(entering)
    before = Machine(model=Model(), states=["a", "b"], initial="a", auto_transitions=False,
                     transitions=[{"trigger": "go", "source": "a", "dest": "b", "before": [noop]}])  # fmt: skip
    with pytest.raises(DefinitionError, match="before"):
        machine_routes(before)


def test_the_first_route_whose_guards_hold_is_taken() -> None:
    """Order and guards as the machine applies them: routes are tried in table order; an internal route (no
    destination) keeps the state."""
    ran: list[str] = []
    routes = (
        Route(((lambda s: False, True),), "x", (lambda s: ran.append("x"),)),
        Route(((lambda s: True, True), (lambda s: False, False)), None, (lambda s: ran.append("y"),)),
        Route((), "z", (lambda s: ran.append("z"),)),
    )
    step: Any = object()
    assert engine._fire(routes, "here", step) == "here"
    assert ran == ["y"]
    assert engine._fire((), "here", step) is None
