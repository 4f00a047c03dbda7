"""The workflow definitions sfworkflow loads: one module per workflow, each a table of data.

Every module of this package that defines `DEFINITION` (or `DEFINITIONS`, for several versions)
is loaded; adding a workflow is adding a module.
"""

from __future__ import annotations

import importlib
import pkgutil

from sfworkflow.core.definition import WorkflowDefinition


def _discover() -> tuple[WorkflowDefinition, ...]:
    found: list[WorkflowDefinition] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):  # drafts and helpers are not workflows
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(getattr(module, "DEFINITIONS", ()))
        if hasattr(module, "DEFINITION"):
            found.append(module.DEFINITION)
    return tuple(found)


DEFINITIONS: tuple[WorkflowDefinition, ...] = _discover()
