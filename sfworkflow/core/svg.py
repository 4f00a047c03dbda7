"""A workflow's state machine as an SVG drawing, made here from its transition table. Pure: no I/O.

The status page shows it inline (its CSP allows no script, so no renderer runs in the browser) and
`sfworkflow diagram --format svg` prints it. grandalf's Sugiyama layout (the layered layout Graphviz calls
`dot`, in pure Python) places the states in layers from the start point down; the SVG is written here.

- Transitions between the same two states are one arrow; its label lists each trigger, with its guards in
  brackets below it, one entry per row of the table and source state.
- A row whose source is `*` (every active state) starts from one dashed box, "any active state", instead of
  from each active state: the same meaning, a quarter of the arrows.
- A transition that keeps the state (an internal one) is listed inside its state's box, under a rule, with
  a ↻ (UML's compartment of internal transitions): no loop to collide with the arrows leaving the box.
- Each label is a vertex of the layout between its arrow's two states, so the layout gives it room of its
  own: labels never overlap states or each other.
- The start point is a filled dot with an arrow to the initial state (green, bold); terminal states have a
  double border; states that wait for an operator are amber with a dashed border.

Sizes come from the text (a monospace font, 0.6 em per character); a viewBox lets the drawing scale. Every
name is XML-escaped. `svg(compiled)` draws each compiled workflow once and keeps the drawing.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape as _escape

from grandalf.graphs import Edge, Graph, Vertex
from grandalf.layouts import SugiyamaLayout

from sfworkflow.core.definition import ANY_ACTIVE
from sfworkflow.core.engine import CompiledWorkflow

SVG_NS = "http://www.w3.org/2000/svg"
ANY = ANY_ACTIVE  # an Arrow's source for a row that applies in every active state
ANY_TEXT = "any active state"
FONT = "ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', 'Liberation Mono', monospace"
CHAR_EM = 0.6  # width of one character of a monospace font, in em
STATE_PX, TRIGGER_PX, GUARD_PX = 13, 11, 10  # font sizes
LINE_GAP = 3  # px between lines of text
GUARD_CHARS = 28  # a label's list of guards wraps past this many characters
STATE_PAD_X, STATE_PAD_Y = 12, 8
LABEL_PAD = 3
START_R = 6
X_SPACE, Y_SPACE = 20, 18  # px between vertices of a layer; between layers
MARGIN = 8
ARROW_LEN, ARROW_HALF_W = 9.0, 4.0
DUMMY_PX = 6  # width and height of the layout's dummy vertices (the bends of arrows that cross layers)
ORDERING_ROUNDS = 4  # grandalf's crossing-reduction sweeps (more: fewer crossings, slower; 4 settles ours)
EDGE_COLOUR = "#5b6577"
KINDS = {  # kind: (fill, stroke, extra attributes of the border)
    "initial": ("#e6f4ea", "#067647", ""),
    "active": ("#eef4ff", "#3b5b92", ""),
    "operator": ("#fff4e0", "#b54708", ' stroke-dasharray="5 3"'),
    "terminal": ("#f0f2f6", "#1d2430", ""),
    "any": ("#ffffff", "#8a94a6", ' stroke-dasharray="3 3"'),
}


@dataclass(frozen=True, slots=True)
class Arrow:
    """One row of the table from one source state (ANY: every active state) to `dest` (the source itself for
    an internal transition), with the names of its guards."""

    source: str
    dest: str
    trigger: str
    guards: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StateGraph:
    """What the drawing shows: the states in table order, the initial one, the marked ones, the arrows."""

    title: str
    states: tuple[str, ...]
    initial: str
    terminal: frozenset[str]
    arrows: tuple[Arrow, ...]
    waits_for_operator: frozenset[str] = frozenset()


def state_graph(compiled: CompiledWorkflow) -> StateGraph:
    """The compiled table as `mermaid()` reads it, except that a `*` row is one arrow from ANY."""
    d = compiled.definition
    arrows: list[Arrow] = []
    for t, row in zip(d.transitions, compiled.table, strict=True):  # the table has one row per transition
        guards = tuple(c.__name__ for c in row["conditions"])
        sources = [ANY] if t.source == ANY_ACTIVE else row["source"]
        arrows += [Arrow(src, row["dest"] or src, row["trigger"], guards) for src in sources]
    return StateGraph(
        title=f"{d.name} v{d.version}",
        states=tuple(str(s) for s in compiled.machine.states),
        initial=compiled.initial,
        terminal=frozenset(str(s) for s in d.terminal),
        arrows=tuple(arrows),
        waits_for_operator=frozenset(str(s) for s in d.waits_for_operator),
    )


_DRAWN: weakref.WeakKeyDictionary[CompiledWorkflow, str] = weakref.WeakKeyDictionary()


def svg(compiled: CompiledWorkflow, standalone: bool = False) -> str:
    """The drawing of a compiled workflow, made once per CompiledWorkflow (a definition does not change).

    Inline in HTML (the default) the root needs no namespace; `standalone` adds it and an XML declaration,
    for a file of its own."""
    drawn = _DRAWN.get(compiled)
    if drawn is None:
        drawn = _DRAWN[compiled] = draw(state_graph(compiled))
    return as_file(drawn) if standalone else drawn


def as_file(inline: str) -> str:
    """An inline drawing as the text of an .svg file."""
    assert inline.startswith("<svg ")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="{SVG_NS}" {inline[5:]}\n'


def width_of(drawing: str) -> float:
    """The natural width of a drawing, in px (0 for no drawing)."""
    found = re.match(r'<svg [^>]*?width="([0-9]+)"', drawing)
    return float(found.group(1)) if found else 0.0


def x(text: str) -> str:
    """`text` escaped for XML character data and attribute values (either quote)."""
    return _escape(text, {'"': "&quot;", "'": "&apos;"})


# ---- sizes ------------------------------------------------------------------------------------------------

Point = tuple[float, float]
Box = tuple[float, float, float, float]  # centre x, centre y, half width, half height


def _text_w(text: str, px: float) -> float:
    return len(text) * px * CHAR_EM


def _wrap(guards: Sequence[str]) -> list[str]:
    """`[a, b, c]`, on more lines when longer than GUARD_CHARS (a guard is never split)."""
    if not guards:
        return []
    lines = ["[" + guards[0]]
    for g in guards[1:]:
        if len(lines[-1]) + len(", ") + len(g) + len("]") <= GUARD_CHARS:
            lines[-1] += ", " + g
        else:
            lines[-1] += ","
            lines.append(" " + g)
    lines[-1] += "]"
    return lines


def _line_h(kind: str) -> float:
    return (TRIGGER_PX if kind == "trigger" else GUARD_PX) + LINE_GAP


@dataclass(slots=True)
class _Lines:
    """The text of one arrow's label, or of a state's internal transitions: (text, trigger | guard)."""

    lines: list[tuple[str, str]]

    @classmethod
    def of(cls, arrows: Sequence[Arrow], prefix: str = "") -> _Lines:
        lines: list[tuple[str, str]] = []
        indent = " " * len(prefix)
        for a in arrows:
            lines.append((prefix + a.trigger, "trigger"))
            lines += [(indent + line, "guard") for line in _wrap(a.guards)]
        return cls(lines)

    @property
    def w(self) -> float:
        return max((_text_w(t, TRIGGER_PX if k == "trigger" else GUARD_PX) for t, k in self.lines), default=0.0)

    @property
    def h(self) -> float:
        return sum(_line_h(k) for _t, k in self.lines)

    def svg(self, left: float, top: float) -> str:
        out, y = [], top
        for text, kind in self.lines:
            px = TRIGGER_PX if kind == "trigger" else GUARD_PX
            y += _line_h(kind)
            colour = "#1d2430" if kind == "trigger" else "#6b7383"
            out.append(
                f'<text class="{kind}" x="{left:.1f}" y="{y - LINE_GAP - px * 0.18:.1f}" font-size="{px}" '
                f'fill="{colour}" xml:space="preserve">{x(text)}</text>'
            )
        return "".join(out)


@dataclass(slots=True)
class _View:
    """What grandalf reads (w, h) and writes (xy: the centre) for one vertex."""

    w: float
    h: float
    xy: Point = (0.0, 0.0)


@dataclass(slots=True)
class _EdgeView:
    """Where grandalf writes an edge's route: from its first vertex's centre, through its bends, to the last."""

    path: list[Point] = field(default_factory=list)

    def setpath(self, points: list[Point]) -> None:
        self.path = [(float(px), float(py)) for px, py in points]


class _Bounds:
    def __init__(self) -> None:
        self.left = self.top = float("inf")
        self.right = self.bottom = float("-inf")

    def add(self, cx: float, cy: float, hw: float = 0.0, hh: float = 0.0) -> None:
        self.left, self.right = min(self.left, cx - hw), max(self.right, cx + hw)
        self.top, self.bottom = min(self.top, cy - hh), max(self.bottom, cy + hh)


# ---- the drawing ------------------------------------------------------------------------------------------


def draw(graph: StateGraph) -> str:
    """Lay out `graph` and write it as an inline SVG element (no namespace; `as_file` adds it)."""
    nodes = list(graph.states)
    if any(a.source == ANY for a in graph.arrows):
        nodes.append(ANY)
    known = set(nodes)
    grouped: dict[tuple[str, str], list[Arrow]] = {}
    for a in graph.arrows:
        if a.source in known and a.dest in known:
            grouped.setdefault((a.source, a.dest), []).append(a)
    inner = {s: _Lines.of(grouped.get((s, s), []), "↻ ") for s in nodes}

    def name_of(s: str) -> str:
        return ANY_TEXT if s == ANY else s

    sizes: dict[str, tuple[float, float]] = {}
    for s in nodes:
        w = max(_text_w(name_of(s), STATE_PX), inner[s].w) + 2 * STATE_PAD_X
        h = STATE_PX + 2 * STATE_PAD_Y + (inner[s].h + 4 if inner[s].lines else 0)
        sizes[s] = (w, h)

    vertices: dict[str, Vertex] = {}
    for s in nodes:
        vertices[s] = Vertex(s)
        vertices[s].view = _View(*sizes[s])
    start = Vertex(None)
    start.view = _View(2 * START_R, 2 * START_R)
    start_edge = Edge(start, vertices[graph.initial])
    edges = [start_edge]
    labelled: list[tuple[str, str, _Lines, Vertex, Edge, Edge]] = []
    for (src, dest), arrows in grouped.items():
        if src != dest:
            text = _Lines.of(arrows)
            lv = Vertex((src, dest))
            lv.view = _View(text.w + 2 * LABEL_PAD, text.h + 2 * LABEL_PAD)
            e1, e2 = Edge(vertices[src], lv), Edge(lv, vertices[dest])
            edges += [e1, e2]
            labelled.append((src, dest, text, lv, e1, e2))
    for e in edges:
        e.view = _EdgeView()
    layout = Graph([start, *vertices.values(), *(lv for *_rest, lv, _e1, _e2 in labelled)], edges)
    # The layout needs no cycles: an arrow back to a state met earlier from the start (a retry, a resume) is
    # laid out reversed, both its halves, so that its label sits between its two states.
    back = _back_arrows([graph.initial, *nodes], [(src, dest) for src, dest, *_rest in labelled])
    inverted = [e for src, dest, _t, _lv, e1, e2 in labelled if (src, dest) in back for e in (e1, e2)]

    _place(layout, start, inverted)

    bounds = _Bounds()

    def box(s: str) -> Box:
        v = vertices[s].view
        return v.xy[0], v.xy[1], v.w / 2, v.h / 2

    out_edges: list[str] = []
    sx, sy = start.view.xy
    pts = [(sx, sy), *start_edge.view.path[1:-1], box(graph.initial)[:2]]
    pts[0], pts[-1] = _clip(pts[1], (sx, sy, START_R, START_R)), _clip(pts[-2], box(graph.initial))
    out_edges.append(f'<g class="edge start">{_curve(pts, bounds)}</g>')
    out_labels: list[str] = []
    for src, dest, text, lv, e1, e2 in labelled:
        sb, db = box(src), box(dest)
        pts = [sb[:2], *e1.view.path[1:-1], lv.view.xy, *e2.view.path[1:-1], db[:2]]
        pts[0], pts[-1] = _clip(pts[1], sb), _clip(pts[-2], db)
        out_edges.append(f'<g class="edge" data-from="{x(src)}" data-to="{x(dest)}">{_curve(pts, bounds)}</g>')
        lx, ly, lw, lh = lv.view.xy[0], lv.view.xy[1], lv.view.w, lv.view.h
        bounds.add(lx, ly, lw / 2, lh / 2)
        out_labels.append(
            f'<g class="label" data-from="{x(src)}" data-to="{x(dest)}">'
            f'<rect x="{lx - lw / 2:.1f}" y="{ly - lh / 2:.1f}" width="{lw:.1f}" height="{lh:.1f}" rx="3" '
            f'fill="#ffffff" fill-opacity="0.9"/>{text.svg(lx - lw / 2 + LABEL_PAD, ly - lh / 2 + LABEL_PAD)}</g>'
        )
    out_states = []
    for s in nodes:
        bounds.add(*box(s))
        out_states.append(_state(graph, s, name_of(s), box(s), inner[s]))
    bounds.add(sx, sy, START_R, START_R)

    left, top = math.floor(bounds.left - MARGIN), math.floor(bounds.top - MARGIN)
    w, h = math.ceil(bounds.right + MARGIN - left), math.ceil(bounds.bottom + MARGIN - top)
    return (
        f'<svg class="workflow-diagram" role="img" aria-label="{x(graph.title)}: state diagram" '
        f'width="{w}" height="{h}" viewBox="{left} {top} {w} {h}" font-family="{x(FONT)}">'
        f"<title>{x(graph.title)}</title>"
        f'<g fill="none" stroke="{EDGE_COLOUR}" stroke-width="1.2">{"".join(out_edges)}</g>'
        f'<circle class="start" cx="{sx:.1f}" cy="{sy:.1f}" r="{START_R}" fill="#1d2430"/>'
        f"{''.join(out_states)}{''.join(out_labels)}</svg>"
    )


def _place(layout: Graph, start: Vertex, inverted: list[Edge]) -> None:
    """Set every vertex's centre and every edge's route: each connected part of the graph laid out on its own
    (a table normally makes one), side by side, from x = 0 and y = 0."""
    shift_x = 0.0
    for part in layout.C:
        sug = SugiyamaLayout(part)
        sug.xspace, sug.yspace = X_SPACE, Y_SPACE
        sug.dw, sug.dh = DUMMY_PX, DUMMY_PX
        sug.init_all(roots=[start] if start in part.sV else None, inverted_edges=[e for e in inverted if e in part.sE])
        sug.draw(ORDERING_ROUNDS)
        placed = [v for layer in sug.layers for v in layer]  # the vertices and the bends
        left = min(v.view.xy[0] - v.view.w / 2 for v in placed)
        right = max(v.view.xy[0] + v.view.w / 2 for v in placed)
        top = min(v.view.xy[1] - v.view.h / 2 for v in placed)
        dx, dy = shift_x - left, -top
        for v in part.sV:
            v.view.xy = (v.view.xy[0] + dx, v.view.xy[1] + dy)
        for e in part.sE:
            e.view.path = [(px + dx, py + dy) for px, py in e.view.path]
        shift_x += right - left + 2 * X_SPACE


def _back_arrows(order: Sequence[str], arrows: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """The arrows a depth-first walk from `order[0]` (then from each state it did not reach, in `order`) finds
    going back to a state on its current path: reversing them leaves no cycle."""
    after: dict[str, list[str]] = {}
    for src, dest in arrows:
        after.setdefault(src, []).append(dest)
    back: set[tuple[str, str]] = set()
    done: set[str] = set()
    for root in order:
        if root in done:
            continue
        done.add(root)
        path, stack = {root}, [(root, iter(after.get(root, ())))]
        while stack:
            node, nexts = stack[-1]
            for dest in nexts:
                if dest in path:
                    back.add((node, dest))
                elif dest not in done:
                    done.add(dest)
                    path.add(dest)
                    stack.append((dest, iter(after.get(dest, ()))))
                    break
            else:
                stack.pop()
                path.discard(node)
    return back


def _state(graph: StateGraph, s: str, name: str, b: Box, inner: _Lines) -> str:
    if s == ANY:
        kind = "any"
    elif s in graph.terminal:
        kind = "terminal"
    elif s == graph.initial:
        kind = "initial"
    elif s in graph.waits_for_operator:
        kind = "operator"
    else:
        kind = "active"
    fill, stroke, extra = KINDS[kind]
    cx, cy, hw, hh = b
    top = cy - hh
    out = [
        f'<g class="state {kind}" data-state="{x(s)}"><title>{x(name)} ({kind})</title>'
        f'<rect x="{cx - hw:.1f}" y="{top:.1f}" width="{2 * hw:.1f}" height="{2 * hh:.1f}" rx="6" '
        f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"{extra}/>'
    ]
    if kind == "terminal":
        out.append(
            f'<rect x="{cx - hw + 3:.1f}" y="{top + 3:.1f}" width="{2 * hw - 6:.1f}" height="{2 * hh - 6:.1f}" '
            f'rx="4" fill="none" stroke="{stroke}"/>'
        )
    style = ' font-weight="700"' if kind == "initial" else ' font-style="italic"' if kind == "any" else ""
    name_y = top + STATE_PAD_Y + STATE_PX * 0.82
    out.append(
        f'<text class="name" x="{cx:.1f}" y="{name_y:.1f}" font-size="{STATE_PX}" text-anchor="middle" '
        f'fill="#1d2430"{style}>{x(name)}</text>'
    )
    if inner.lines:
        rule_y = top + STATE_PX + STATE_PAD_Y * 1.5
        out.append(f'<path d="M{cx - hw:.1f},{rule_y:.1f} H{cx + hw:.1f}" stroke="{stroke}" stroke-width="0.8"/>')
        out.append(inner.svg(cx - hw + STATE_PAD_X, rule_y + 2))
    out.append("</g>")
    return "".join(out)


def _clip(outside: Point, b: Box) -> Point:
    """Where the segment from a box's centre towards `outside` leaves the box."""
    cx, cy, hw, hh = b
    dx, dy = outside[0] - cx, outside[1] - cy
    if dx == 0 and dy == 0:
        return cx, cy
    t = min(hw / abs(dx) if dx else float("inf"), hh / abs(dy) if dy else float("inf"), 1.0)
    return cx + dx * t, cy + dy * t


def _curve(pts: list[Point], bounds: _Bounds) -> str:
    """A smooth path through the points (Catmull-Rom as cubic Béziers), with an arrowhead at the end."""
    d = [f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"]
    before_tip = pts[0]
    for i in range(len(pts) - 1):
        p0, p1, p2, p3 = pts[max(i - 1, 0)], pts[i], pts[i + 1], pts[min(i + 2, len(pts) - 1)]
        c1 = (p1[0] + (p2[0] - p0[0]) / 6, p1[1] + (p2[1] - p0[1]) / 6)
        c2 = (p2[0] - (p3[0] - p1[0]) / 6, p2[1] - (p3[1] - p1[1]) / 6)
        for p in (c1, c2, p2):  # a Bézier stays inside the hull of its points
            bounds.add(*p)
        d.append(f"C{c1[0]:.1f},{c1[1]:.1f} {c2[0]:.1f},{c2[1]:.1f} {p2[0]:.1f},{p2[1]:.1f}")
        before_tip = c2 if c2 != p2 else p1
    bounds.add(*pts[0])
    tip = pts[-1]
    dx, dy = tip[0] - before_tip[0], tip[1] - before_tip[1]
    n = (dx * dx + dy * dy) ** 0.5 or 1.0
    ux, uy = dx / n, dy / n
    bx, by = tip[0] - ux * ARROW_LEN, tip[1] - uy * ARROW_LEN
    head = [tip, (bx - uy * ARROW_HALF_W, by + ux * ARROW_HALF_W), (bx + uy * ARROW_HALF_W, by - ux * ARROW_HALF_W)]
    points = " ".join(f"{px:.1f},{py:.1f}" for px, py in head)
    return f'<path d="{" ".join(d)}"/><polygon points="{points}" fill="{EDGE_COLOUR}" stroke="none"/>'
