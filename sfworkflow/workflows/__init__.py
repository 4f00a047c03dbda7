"""The workflow definitions sfworkflow loads: one module per workflow, each a table of data."""

from __future__ import annotations

from sfworkflow.definition import WorkflowDefinition
from sfworkflow.workflows import sequence

DEFINITIONS: tuple[WorkflowDefinition, ...] = (sequence.DEFINITION,)
