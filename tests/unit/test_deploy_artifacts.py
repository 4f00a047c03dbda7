"""The Prometheus alerts (deploy/prometheus/alerts.yml) and the Grafana dashboard (deploy/grafana/sfworkflow.json):
promtool checks the rules and runs their unit tests (alerts_test.yml); every alert links to a runbook section and
has a test where it fires and one where it stays quiet; every dashboard expression is valid PromQL on a panel
that reads the dashboard's data source. That they name only metrics sfworkflow exports is checked against a running
service in tests/integration/test_deploy_metrics.py."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.deploykit import (
    ALERTS,
    ALERTS_TEST,
    RUNBOOK,
    RUNBOOK_LINK,
    alert_rules,
    alert_tests,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    github_anchors,
    grafana_to_promql,
    metric_names,
)
from tests.support import require_tool

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _promtool(*args: str) -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    proc = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}{proc.stderr}"


def test_alert_rules_pass_promtool_check() -> None:
    _promtool("check", "rules", str(ALERTS))


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    _promtool("test", "rules", str(ALERTS_TEST))


def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook_section() -> None:
    runbook = RUNBOOK.read_text()
    anchors = github_anchors(runbook)
    rules = alert_rules()
    assert rules
    names = [rule["alert"] for rule in rules]
    assert [n for n, count in Counter(names).items() if count > 1] == []
    for rule in rules:
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in {"page", "ticket"}, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name
        url = annotations.get("runbook_url", "")
        assert url.startswith(RUNBOOK_LINK), f"{name}: runbook_url {url!r} is not {RUNBOOK_LINK}<anchor>"
        anchor = url.removeprefix(RUNBOOK_LINK)
        assert anchor in anchors, f"{name}: docs/runbook.md has no heading with anchor #{anchor}"
        assert f"`{name}`" in runbook, f"{name} is not in docs/runbook.md's table of alerts"


def test_every_alert_fires_in_a_unit_test_and_stays_quiet_in_another() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in alert_tests():
        for check in case.get("alert_rule_test", []):
            expected = check.get("exp_alerts") or []
            for alert in expected:  # a firing case checks the labels and the annotations, not just that it fires
                assert "exp_labels" in alert and "exp_annotations" in alert, (case["name"], check["alertname"])
            (fires if expected else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "alerts no test makes fire"
    assert names - quiet == set(), "alerts no test shows quiet on healthy series"
    assert (fires | quiet) - names == set(), "tests of alerts that do not exist"


def test_the_runbook_anchors_are_computed_like_github() -> None:
    markdown = "# A title\n## Outbox rows given up\n```bash\n# not a heading\n```\n## `sfworkflow run`, exit 70\n"
    markdown += "## Dead letters\n## Dead letters\n"
    assert github_anchors(markdown) == {
        "a-title",
        "outbox-rows-given-up",
        "sfworkflow-run-exit-70",
        "dead-letters",
        "dead-letters-1",
    }


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (outcome) (rate(sfworkflow_events_total{job="$job"}[$__rate_interval]))', {"sfworkflow_events_total"}),
        (
            "histogram_quantile(0.99, sum by (le) (rate(sfworkflow_event_age_at_commit_seconds_bucket[5m]))) > 10",
            {"sfworkflow_event_age_at_commit_seconds_bucket"},
        ),
        ("sum(rate(a_sum[5m])) / on (job) group_left () sum(rate(a_count[1h:5m] offset 1h))", {"a_sum", "a_count"}),
        ('(sum by (job) (up{job="x"}) == 0) or absent(up{job="x"})', {"up"}),
        ("min(x_seconds) < +Inf and y unless bool z", {"x_seconds", "y", "z"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)") * 1e3 + 0.5', {"m"}),
        ('{__name__="by_name", le="1"}', {"by_name"}),
        ("process_cpu_seconds_total @ end()", {"process_cpu_seconds_total"}),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_the_dashboard_has_unique_panel_ids_and_reads_its_datasource_variable() -> None:
    doc = dashboard()
    assert doc["uid"] == "sfworkflow" and doc["schemaVersion"] >= 36
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["datasource"] == DATASOURCE
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    for panel in panels:
        if panel["type"] == "row":
            assert not panel.get("targets"), panel["title"]
            continue
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel.get("datasource") == DATASOURCE, where
        assert panel.get("targets"), where
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), where
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, where
            assert target.get("expr"), where


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:panel_{n}", "expr": grafana_to_promql(expr)}
        for n, (_, expr) in enumerate(dashboard_exprs())
    ]
    assert rules
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _promtool("check", "rules", str(path))


# The cluster gauges: one replica exports them at a time, but two may for a moment (a leader whose session died
# silently, until PostgreSQL notices): summed over replicas they would double, so they are read with max or min.
CLUSTER_GAUGES = (
    "sfworkflow_outbox_backlog",
    "sfworkflow_outbox_oldest_age_seconds",
    "sfworkflow_outbox_failed",
    "sfworkflow_instances",
    "sfworkflow_parked_events",
    "sfworkflow_parked_nearest_deadline_seconds",
    "sfworkflow_stuck_instances",
)
_SUMMED = re.compile(
    r"\b(?:sum|count|avg)\s*(?:(?:by|without)\s*\([^)]*\)\s*)?\(\s*(" + "|".join(CLUSTER_GAUGES) + r")\b"
)


def test_no_expression_sums_a_cluster_gauge_over_replicas() -> None:
    exprs = [e for _, e in dashboard_exprs()] + [str(r["expr"]) for r in alert_rules()]
    summed = [e for e in exprs if _SUMMED.search(e)]
    assert summed == []
    assert _SUMMED.search('sum by (workflow, state) (sfworkflow_instances{job="a"})')  # the pattern finds one
    assert not _SUMMED.search('sum(max by (workflow) (sfworkflow_stuck_instances{job="a"}))')
