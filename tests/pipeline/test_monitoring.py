"""The operations files in jobs/monitoring/: the Prometheus alert rules and the Grafana dashboard
name only metrics the code registers (pipeline.metrics), and their queries are well formed.

``promtool`` (Debian package ``prometheus``) also checks the rules and runs their unit tests
(rgbatch-alerts.test.yaml) when it is on the PATH or named by ``$PROMTOOL``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from pipeline import metrics

MONITORING = Path(__file__).resolve().parents[2] / "jobs" / "monitoring"
RULES = MONITORING / "rgbatch-alerts.yaml"
RULE_TESTS = MONITORING / "rgbatch-alerts.test.yaml"
DASHBOARD = MONITORING / "rgbatch-dashboard.json"
NAME = re.compile(r"\bray_rgbatch_[a-z0-9_]+")
PAIRS = {"(": ")", "[": "]", "{": "}"}


def names_in(expr: str) -> set[str]:
    return set(NAME.findall(expr))


def balanced(expr: str) -> bool:
    stack: list[str] = []
    quoted = False
    for ch in expr:
        if ch == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif ch in PAIRS:
            stack.append(PAIRS[ch])
        elif ch in PAIRS.values() and (not stack or stack.pop() != ch):
            return False
    return not stack and not quoted


def test_alert_rules_cover_the_four_alerts_on_registered_metrics() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {r["alert"] for r in rules} == {
        "RgbatchRunFailed",
        "RgbatchErrorFractionHigh",
        "RgbatchNoProgress",
        "RgbatchNightlyLate",
    }
    registered = metrics.exported_names()
    for rule in rules:
        used = names_in(rule["expr"])
        assert used and used <= registered, (rule["alert"], used - registered)
        assert balanced(rule["expr"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if promtool:  # the real checker, where installed: syntax, then the rules' own unit tests
        for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
            done = subprocess.run([promtool, *args], capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rule_tests_feed_only_registered_series() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    series = [s["series"] for t in tests["tests"] for s in t["input_series"]]
    assert set().union(*(names_in(s) for s in series)) <= metrics.exported_names()
    tested = {a["alertname"] for t in tests["tests"] for a in t["alert_rule_test"]}
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    assert tested == {r["alert"] for r in rules}  # every alert has a firing case


def test_dashboard_queries_name_only_registered_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    registered = metrics.exported_names()
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            names = names_in(expr)
            assert names and names <= registered, (panel["title"], names - registered)
            assert balanced(expr) and 'run_id=~"$run_id"' in expr, panel["title"]
            used |= names
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert names_in(variables["run_id"]["definition"]) <= registered
    wanted = {
        "ray_rgbatch_rows_written_total",
        "ray_rgbatch_rows_errored_total",
        "ray_rgbatch_engine_slots_used",
        "ray_rgbatch_engine_queue_depth",
        "ray_rgbatch_engine_decode_steps_per_s",
        "ray_rgbatch_prefix_hits_total",
        "ray_rgbatch_toxicity_decisions_total",
        "ray_rgbatch_stage_batch_seconds_bucket",
        "ray_rgbatch_run_state",
    }
    assert wanted <= used, wanted - used
