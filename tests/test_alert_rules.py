"""Prometheus alert rules (promtool) and the Grafana dashboard shipped in config/."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "prometheus" / "tokend-alerts.yml"
RULE_TESTS = ROOT / "config" / "prometheus" / "tokend-alerts.test.yml"
DASHBOARD = ROOT / "config" / "grafana" / "tokend-dashboard.json"
DOCS = ROOT / "docs" / "alerts.md"

# docs/contract.md's metric table, plus the configured pass interval that
# TokendNoSuccessfulPass scales with.
METRICS = {
    "tokend_refresh_attempts_total",
    "tokend_refresh_failures_total",
    "tokend_refresh_duration_seconds",
    "tokend_grants",
    "tokend_access_token_expiry_earliest_timestamp_seconds",
    "tokend_refresh_token_expiry_earliest_timestamp_seconds",
    "tokend_due_grants",
    "tokend_pass_duration_seconds",
    "tokend_pass_last_success_timestamp_seconds",
    "tokend_notifications_total",
    "tokend_build_info",
    "tokend_schedule_interval_seconds",
    "tokend_client_blocked",
    "tokend_grants_unreadable",
    "tokend_held_outcomes",
    "tokend_refresh_rate_needed",
    "tokend_refresh_rate_limit",
}
HISTOGRAMS = {"tokend_refresh_duration_seconds", "tokend_pass_duration_seconds"}
ALERTS = {
    "TokendDown",
    "TokendNoSuccessfulPass",
    "TokendInvalidClient",
    "TokendPermanentRefreshFailures",
    "TokendTransientFailuresSustained",
    "TokendGrantsReconsentDue",
    "TokendGrantsReconsentRequired",
    "TokendAccessTokenExpiringSoon",
    "TokendRefreshTokenExpiringSoon",
    "TokendDueBacklogNotShrinking",
    "TokendGrantsUnreadable",
    "TokendHeldOutcomes",
    "TokendCapacityLow",
}
METRIC_NAME = re.compile(r"\btokend_[a-z0-9_]+")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        # CI must prove the rules, so a runner without promtool is a broken runner;
        # only a developer's machine may skip.
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed, and CI is set")
        pytest.skip("promtool is not installed (set CI=1 to make this a failure)")
    return path


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def base_name(metric: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        stem = metric.removesuffix(suffix)
        if stem != metric and stem in HISTOGRAMS:
            return stem
    return metric


# ------------------------------------------------------------------- promtool


def test_rules_check() -> None:
    tool = promtool()
    result = run([tool, "check", "rules", str(RULES)], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_unit_tests() -> None:
    tool = promtool()
    # The test file names its rule file relative to itself.
    result = run([tool, "test", "rules", RULE_TESTS.name], RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def alert_names(text: str) -> list[str]:
    return re.findall(r"^\s*-\s*alert:\s*(\w+)\s*$", text, flags=re.MULTILINE)


def test_every_alert_is_tested_firing_and_silent() -> None:
    # Plain-text parsing keeps this free of a YAML dependency; promtool itself
    # rejects a malformed file in the tests above.
    assert set(alert_names(RULES.read_text())) == ALERTS
    fires: set[str] = set()
    silent: set[str] = set()
    case = re.compile(r"alertname:\s*(\w+)\s*\n\s*exp_alerts:\s*(\[\])?", flags=re.MULTILINE)
    for name, empty in case.findall(RULE_TESTS.read_text()):
        (silent if empty else fires).add(name)
    assert fires == ALERTS, f"no firing case: {ALERTS - fires}"
    assert silent == ALERTS, f"no silent case: {ALERTS - silent}"


def test_alert_rules_use_known_metrics() -> None:
    used = {base_name(m) for m in METRIC_NAME.findall(RULES.read_text())}
    assert used <= METRICS, used - METRICS


def test_every_alert_has_severity_and_runbook() -> None:
    blocks = re.split(r"^\s*-\s*alert:\s*", RULES.read_text(), flags=re.MULTILINE)[1:]
    assert len(blocks) == len(ALERTS)
    for block in blocks:
        name = block.split()[0]
        assert re.search(r"severity:\s*(critical|warning)\b", block), name
        for key in ("summary:", "description:", "runbook:"):
            assert key in block, f"{name}: no {key}"


def test_every_alert_is_documented() -> None:
    if not DOCS.exists():
        pytest.fail(f"{DOCS} is missing")
    headings = set(re.findall(r"^##\s+(\w+)\s*$", DOCS.read_text(), flags=re.MULTILINE))
    assert headings >= ALERTS, ALERTS - headings


# ------------------------------------------------------------------ dashboard


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # collapsed rows keep theirs inside
    return found


def queries(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def test_dashboard_is_importable_json() -> None:
    board = dashboard()
    assert board["title"] == "tokend"
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]


def test_dashboard_uses_known_metrics() -> None:
    exprs = queries(dashboard())
    used = {base_name(m) for e in exprs for m in METRIC_NAME.findall(e)}
    assert used <= METRICS, used - METRICS
    # The panels the dashboard promises.
    for metric in METRICS - {"tokend_build_info"}:
        assert metric in used, f"{metric} is on no panel"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every panel query is valid PromQL once Grafana's variables are filled in."""
    tool = promtool()
    substitutions = {
        "$__rate_interval": "5m",
        "$__interval": "1m",
        "$__range": "1h",
        "$job": ".*",
        "$instance": ".*",
        "$client": ".*",
    }
    exprs = [
        e
        for e in queries(dashboard())
        if not e.startswith("label_values(")  # Grafana's own function, not PromQL
    ]
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, expr in enumerate(exprs):
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        lines += [f"      - record: dashboard:query{n}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard.rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = run([tool, "check", "rules", str(rules)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
