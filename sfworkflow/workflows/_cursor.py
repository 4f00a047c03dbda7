"""Guards shared by workflows that walk a list of steps with a cursor (`sequence`, `follow_up`).

The instance context holds `steps` (the list) and `cursor` (the index of the current step); a
worker's report names the `step` it is about.
"""

from __future__ import annotations

from sfworkflow.core.definition import Step


def is_current_step(step: Step) -> bool:
    cursor: int = step.context["cursor"]
    return bool(step.data.get("step") == cursor)


def has_next_step(step: Step) -> bool:
    cursor: int = step.context["cursor"]
    return cursor + 1 < len(step.context["steps"])


def is_last_step(step: Step) -> bool:
    return not has_next_step(step)


def current_and_has_next(step: Step) -> bool:
    return is_current_step(step) and has_next_step(step)


def current_and_last(step: Step) -> bool:
    return is_current_step(step) and is_last_step(step)
