"""The diagrams come from the definitions, and the committed docs match them."""

from __future__ import annotations

import pytest

from sfworkflow.cli.main import main
from sfworkflow.core import diagrams
from sfworkflow.core.engine import Engine
from sfworkflow.workflows import DEFINITIONS

ENGINE = Engine(DEFINITIONS)


def test_committed_workflows_doc_matches_the_definitions() -> None:
    expected = diagrams.workflows_doc(ENGINE)
    actual = diagrams.DOCS_PATH.read_text() if diagrams.DOCS_PATH.exists() else ""
    assert actual == expected, "docs/workflows.md is stale: run `sfworkflow diagram --write-docs` and commit it"


@pytest.mark.parametrize("key", sorted(ENGINE.compiled), ids=lambda k: f"{k[0]}.v{k[1]}")
def test_dot_has_every_state_and_transition(key: tuple[str, int]) -> None:
    compiled = ENGINE.compiled[key]
    dot = compiled.dot()
    assert dot.startswith(f'digraph "{key[0]}_v{key[1]}" {{') and dot.rstrip().endswith("}")
    for state in compiled.machine.states:
        assert f'"{state}" [shape=' in dot
    edges = sum(len(row["source"]) for row in compiled.table)
    assert dot.count(" -> ") == edges + 1  # + the edge from the start point


def test_every_workflow_appears_in_the_doc_with_its_mermaid() -> None:
    doc = diagrams.workflows_doc(ENGINE)
    for (name, version), compiled in ENGINE.compiled.items():
        assert f"## `{name}` (definition v{version})" in doc
        assert compiled.mermaid().rstrip() in doc


def test_cli_prints_a_diagram(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagram", "sequence", "--format", "dot"]) == 0
    assert capsys.readouterr().out == ENGINE.workflow("sequence").dot()  # type: ignore[union-attr]
    assert main(["diagram", "no_such_workflow"]) == 2
    assert "no workflow" in capsys.readouterr().err
