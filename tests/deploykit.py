"""Reading the deploy artifacts (deploy/prometheus/alerts.yml and its promtool tests, deploy/grafana/sfworkflow.json,
docs/runbook.md) for tests/unit/test_deploy_artifacts.py and tests/integration/test_deploy_metrics.py: the alert
rules, the dashboard's PromQL, the metric names an expression reads, the anchors of the runbook's headings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sfworkflow.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_LINK = "docs/runbook.md#"

# Series Prometheus makes itself (not on /metrics): the scrape's `up`.
PROMETHEUS_SERIES = frozenset({"up"})


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of alerts.yml (recording rules left out)."""
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def alert_tests() -> list[dict[str, Any]]:
    """The `tests:` of alerts_test.yml."""
    tests: list[dict[str, Any]] = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    return tests


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(DASHBOARD.read_bytes())
    return doc


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too (rows included)."""
    out: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target: where is `panel id/refId: title`."""
    return [
        (f"panel {panel['id']}/{target.get('refId', '?')}: {panel.get('title', '')}", target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def dashboard_variable_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of the metric each `label_values(metric, label)` variable query reads."""
    out = []
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        if variable.get("type") == "query" and (match := re.match(r"\s*label_values\((.*),\s*\w+\s*\)\s*$", query)):
            out.append((f"variable {variable['name']}", match.group(1)))
    return out


# Grafana's interval variables, which stand where PromQL takes a duration.
_GRAFANA_INTERVAL = re.compile(r"\$(?:\{__(?:rate_interval|interval|range)\}|__(?:rate_interval|interval|range)\b)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression as Prometheus takes it: Grafana's interval variables become 5m. Other variables
    (`$job`) may only stand in label values, inside strings, where they are valid PromQL as they are."""
    promql = _GRAFANA_INTERVAL.sub("5m", expr)
    left = _STRING.sub('""', promql)
    if "$" in left:
        raise ValueError(f"a Grafana variable outside a label value in {expr!r}")
    return promql


_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([^"]*)"')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_RANGE = re.compile(r"\[[^\[\]]*\]")  # range selectors and subqueries
_MODIFIER = re.compile(r"\boffset\s+-?\w+|@\s*(?:start\s*\(\s*\)|end\s*\(\s*\)|[-+]?[\d.]+)")
_NUMBER = re.compile(r"(?<![\w:.])(?:0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?![\w:])")
_CALL = re.compile(r"\b[a-zA-Z_]\w*\s*\(")
_IDENTIFIER = re.compile(r"[a-zA-Z_:][\w:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers, groupings, range
    selectors, modifiers, numbers, function and aggregation names and keywords are taken out."""
    text = grafana_to_promql(expr)
    names = set(_NAME_MATCHER.findall(text))
    text = _STRING.sub(" ", text)
    for pattern in (_MATCHERS, _GROUPING, _RANGE, _MODIFIER, _NUMBER, _CALL):
        text = pattern.sub(" ", text)
    names.update(name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS)
    return names


def exposed_names(exposition: str) -> set[str]:
    """The series names of a /metrics text: every sample's name (`_total`, `_bucket`, `_sum`, `_count` included).
    A family without samples (a labelled gauge nothing set yet) has no series to query, so it is not in it."""
    return {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}


_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, punctuation dropped, spaces to hyphens, a
    repeated slug numbered (-1, -2 …). Lines in fenced code blocks are not headings."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match is None:
            continue
        text = _LINK.sub(r"\1", match.group(2)).lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors
