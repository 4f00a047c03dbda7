"""Diagrams of the workflow definitions: Mermaid, Graphviz DOT and SVG, and docs/workflows.md built from them.

The document is generated, never edited by hand: `sfworkflow diagram --write-docs` rewrites it and a
test fails when the committed file differs from what the definitions generate.
"""

from __future__ import annotations

from pathlib import Path

from sfworkflow.contract.topology import commands_queue, compensations_queue
from sfworkflow.core import svg
from sfworkflow.core.engine import CompiledWorkflow, Engine

DOCS_PATH = Path(__file__).resolve().parents[2] / "docs" / "workflows.md"


def render(compiled: CompiledWorkflow, fmt: str = "mermaid") -> str:
    if fmt == "dot":
        return compiled.dot()
    if fmt == "mermaid":
        return compiled.mermaid()
    if fmt == "svg":  # drawn here, as the status page shows it (core/svg.py), as a file of its own
        return svg.svg(compiled, standalone=True)
    raise ValueError(f"unknown diagram format {fmt!r}: use mermaid, dot or svg")


def workflows_doc(engine: Engine) -> str:
    """docs/workflows.md: every loaded workflow version with its states, messages and diagram."""
    out = [
        "# Workflows",
        "",
        "Generated from the definitions in `sfworkflow/workflows/` by `sfworkflow diagram --write-docs`;",
        "do not edit by hand (a test compares this file with what the definitions generate).",
        "",
    ]
    for (name, version), cw in sorted(engine.compiled.items()):
        d = cw.definition
        states = [str(s) for s in d.states]
        active = [s for s in states if s not in d.terminal and s != cw.initial]
        out += [
            f"## `{name}` (definition v{version})",
            "",
            d.description or "",
            "",
            f"- **states**: initial `{cw.initial}`; active {', '.join(f'`{s}`' for s in active)}; "
            f"terminal {', '.join(f'`{s}`' for s in sorted(d.terminal))}"
            + (
                f"; waiting for an operator {', '.join(f'`{s}`' for s in sorted(d.waits_for_operator))}"
                if d.waits_for_operator
                else ""
            ),
            f"- **events in**: {', '.join(f'`{name}.{e}`' for e in sorted(d.events))} "
            f"(start: {', '.join(f'`{name}.{e}`' for e in sorted(d.start_events))})",
            f"- **commands out** (`{commands_queue(name)}`): "
            + (", ".join(f"`{name}.{c}`" for c in sorted(d.commands)) or "none"),
            f"- **compensations out** (`{compensations_queue(name)}`): "
            + (", ".join(f"`{name}.{c}`" for c in sorted(d.compensations)) or "none"),
            f"- **internal events**: {', '.join(f'`{e}`' for e in sorted(d.internal_events)) or 'none'}",
            f"- **retries**: {d.retry.max_attempts} attempts, backoff {d.retry.base_s:g} s doubling, "
            f"capped at {d.retry.cap_s:g} s, ±20 % jitter",
            "- **stuck when** (`sfworkflow stuck`): a pending timer overdue; "
            + "; ".join(
                f"`{s}` " + ("never by age" if v is None else f"after {v:g} s without progress")
                for s, v in d.stuck_after_s.items()
            )
            + "".join(f"; `{s}` at once (waits for an operator)" for s in sorted(d.waits_for_operator)),
            "",
            "```mermaid",
            cw.mermaid().rstrip(),
            "```",
            "",
        ]
    return "\n".join(out)
