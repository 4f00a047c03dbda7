"""The SVG state diagrams (core/svg.py): well-formed, complete, escaped, drawn once; and the CLI prints them."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from enum import StrEnum
from types import SimpleNamespace
from typing import Any

import pytest

from sfworkflow.cli.main import main
from sfworkflow.core import diagrams, svg
from sfworkflow.core.definition import ANY_ACTIVE, Step, Transition, WorkflowDefinition
from sfworkflow.core.engine import CompiledWorkflow, Engine
from sfworkflow.http import status_page
from sfworkflow.workflows import DEFINITIONS

ENGINE = Engine(DEFINITIONS)
NS = {"s": svg.SVG_NS}


class Odd(StrEnum):
    START = "start"
    ANGLED = "<&>"
    QUOTED = "say \"hi\" 'there'"
    DONE = "done]]>"


def guard_with_a_long_name_to_wrap(step: Step) -> bool:
    return True


def second_guard(step: Step) -> bool:
    return True


ODD = WorkflowDefinition(
    name="odd<&>",
    version=1,
    states=Odd,
    initial=Odd.START,
    terminal=frozenset({Odd.DONE}),
    start_events=frozenset({"go"}),
    events=frozenset({"go", "a<b", "c&d", "stay", "end"}),
    commands=frozenset(),
    compensations=frozenset(),
    transitions=(
        Transition("go", Odd.START, Odd.ANGLED),
        Transition("a<b", Odd.ANGLED, Odd.QUOTED, [guard_with_a_long_name_to_wrap, second_guard]),
        Transition("c&d", Odd.QUOTED, Odd.ANGLED),
        Transition("c&d", Odd.ANGLED, Odd.QUOTED),  # two triggers between the same states: one arrow
        Transition("stay", Odd.QUOTED, None),  # internal: listed inside the box
        Transition("end", ANY_ACTIVE, Odd.DONE),  # one arrow from "any active state"
    ),
)


def parse(drawing: str) -> ET.Element:
    """A drawing as a file (with its namespace), parsed: it is well-formed XML."""
    return ET.fromstring(svg.as_file(drawing).encode())


def texts(root: ET.Element, cls: str) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{{{svg.SVG_NS}}}text") if t.get("class") == cls]


def groups(root: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{{{svg.SVG_NS}}}g") if cls in (g.get("class") or "").split()]


@pytest.mark.parametrize("key", sorted(ENGINE.compiled), ids=lambda k: f"{k[0]}.v{k[1]}")
def test_each_workflow_is_drawn_with_every_state_and_one_label_per_row_of_its_table(key: tuple[str, int]) -> None:
    compiled = ENGINE.compiled[key]
    graph = svg.state_graph(compiled)
    root = parse(svg.svg(compiled))
    assert root.tag == f"{{{svg.SVG_NS}}}svg" and root.get("viewBox")
    assert root.get("width") and float(root.get("width", 0)) > 100 and float(root.get("height", 0)) > 100
    states = {g.get("data-state") for g in groups(root, "state")}
    assert states >= set(compiled.machine.states)
    assert set(texts(root, "name")) >= set(compiled.machine.states)
    # One trigger line per row and source state (a `*` row: once, from "any active state")...
    assert sorted(t.removeprefix("↻ ") for t in texts(root, "trigger")) == sorted(a.trigger for a in graph.arrows)
    # ... one arrow per pair of different states, plus the one from the start point ...
    pairs = {(a.source, a.dest) for a in graph.arrows if a.source != a.dest}
    edges = groups(root, "edge")
    assert {(g.get("data-from"), g.get("data-to")) for g in edges if "start" not in g.get("class", "")} == pairs
    assert len(edges) == len(pairs) + 1
    # ... and every move of the machine is on the drawing: directly, or from "any active state".
    for row in compiled.table:
        for src in row["source"]:
            dest = row["dest"] or src
            assert (src, dest) in pairs or (svg.ANY, dest) in pairs or src == dest, (src, dest, row["trigger"])


def test_every_row_of_the_expanded_table_is_on_the_drawing() -> None:
    compiled = CompiledWorkflow(ODD)
    graph = svg.state_graph(compiled)
    assert [(a.source, a.dest, a.trigger) for a in graph.arrows] == [
        ("start", "<&>", "go"),
        ("<&>", "say \"hi\" 'there'", "a<b"),
        ("say \"hi\" 'there'", "<&>", "c&d"),
        ("<&>", "say \"hi\" 'there'", "c&d"),
        ("say \"hi\" 'there'", "say \"hi\" 'there'", "stay"),
        (svg.ANY, "done]]>", "end"),
    ]
    root = parse(svg.draw(graph))
    assert texts(root, "trigger").count("a<b") == 1 and "c&d" in texts(root, "trigger")
    assert "↻ stay" in texts(root, "trigger")  # inside its state's box
    assert svg.ANY_TEXT in texts(root, "name")
    assert "[guard_with_a_long_name_to_wrap," in texts(root, "guard")  # long guard lists wrap
    assert " second_guard]" in texts(root, "guard")
    labels = {(g.get("data-from"), g.get("data-to")) for g in groups(root, "label")}
    assert ("<&>", "say \"hi\" 'there'") in labels  # a<b and c&d share one arrow and one label


def test_names_are_escaped() -> None:
    drawing = svg.svg(CompiledWorkflow(ODD))
    for raw in ("<&>", "a<b", "c&d", "done]]>", "odd<&>", '"hi"'):
        assert raw not in drawing
    for escaped in ("&lt;&amp;&gt;", "a&lt;b", "c&amp;d", "done]]&gt;", "odd&lt;&amp;&gt; v1", "&quot;hi&quot;"):
        assert escaped in drawing
    root = parse(drawing)
    assert {"<&>", "say \"hi\" 'there'", "done]]>", "start"} <= set(texts(root, "name"))
    assert "".join(root.find("s:title", NS).itertext()) == "odd<&> v1"  # type: ignore[union-attr]


def test_terminal_states_have_a_double_border_and_the_start_an_arrow_to_the_initial_state() -> None:
    root = parse(svg.svg(CompiledWorkflow(ODD)))
    by_state = {g.get("data-state"): g for g in groups(root, "state")}
    assert "terminal" in by_state["done]]>"].get("class", "")
    assert len(by_state["done]]>"].findall("s:rect", NS)) == 2
    assert "initial" in by_state["start"].get("class", "")
    assert len(by_state["<&>"].findall("s:rect", NS)) == 1
    assert root.find("s:circle", NS) is not None and len(groups(root, "start")) == 1


def test_the_drawing_fits_its_view_box() -> None:
    """Every coordinate written lies inside the viewBox (states, labels, arrows and their curves)."""
    for compiled in [*ENGINE.compiled.values(), CompiledWorkflow(ODD)]:
        drawing = svg.svg(compiled)
        left, top, width, height = (float(v) for v in re.search(r'viewBox="([^"]+)"', drawing)[1].split())  # type: ignore[index]
        for xs, ys in re.findall(r'\bx="(-?[0-9.]+)" y="(-?[0-9.]+)"', drawing):
            assert left <= float(xs) <= left + width and top <= float(ys) <= top + height
        for xs, ys in re.findall(r"(-?[0-9.]+),(-?[0-9.]+)", drawing):
            assert left <= float(xs) <= left + width and top <= float(ys) <= top + height


def test_a_compiled_workflow_is_drawn_once() -> None:
    compiled = CompiledWorkflow(ODD)
    assert svg.svg(compiled) is svg.svg(compiled)
    assert svg.width_of(svg.svg(compiled)) == float(parse(svg.svg(compiled)).get("width", 0))
    assert svg.width_of("") == 0.0


def test_inline_drawings_name_no_namespace_and_files_do() -> None:
    compiled = ENGINE.workflow("sequence")
    assert compiled is not None
    inline = svg.svg(compiled)
    assert inline.startswith("<svg ") and "http" not in inline  # the status page links to nothing
    assert svg.svg(compiled, standalone=True).startswith('<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns=')


def test_the_cli_prints_the_svg(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagram", "sequence", "--format", "svg"]) == 0
    out = capsys.readouterr().out
    compiled = ENGINE.workflow("sequence")
    assert compiled is not None and out == diagrams.render(compiled, "svg")
    assert ET.fromstring(out.encode()).tag == f"{{{svg.SVG_NS}}}svg"


def test_a_diagram_that_cannot_be_drawn_leaves_its_mermaid_source_on_the_status_page(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(compiled: CompiledWorkflow, standalone: bool = False) -> str:
        raise ZeroDivisionError("a layout bug")

    service: Any = SimpleNamespace(engine=ENGINE)
    monkeypatch.setattr(svg, "svg", broken)
    drawn = status_page.draw_diagrams(service)
    assert drawn == dict.fromkeys(ENGINE.compiled, "")
    html = status_page._diagrams(service, drawn, [])
    assert "<svg" not in html and html.count("could not be drawn") == len(ENGINE.compiled)
    assert html.count("<pre>stateDiagram-v2") == len(ENGINE.compiled)
