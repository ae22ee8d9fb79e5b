"""The shipped Prometheus alert rules and Grafana dashboard (issue 17): the rules load in
Prometheus' own checker and their unit tests pass (each alert fires on what should fire it
and not on its look-alike), every runbook link lands on a heading of docs/OPERATIONS.md, and
the dashboard is importable JSON whose datasource is a variable. That every series the
dashboard and the rules name is really exported is tests/test_metrics_export.py's job."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "config" / "examples"
RULES = EXAMPLES / "prometheus-alerts.yml"
RULE_TESTS = EXAMPLES / "prometheus-alerts.test.yml"
DASHBOARD = EXAMPLES / "grafana-dashboard.json"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
#: Debian's prometheus package (scripts/test installs it; its service is never started)
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def promtool(*args: str) -> str:
    done = subprocess.run(
        [PROMTOOL, *args], cwd=EXAMPLES, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def rules() -> list[dict[str, object]]:
    loaded = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return found


def test_promtool_checks_the_rules() -> None:
    """A rule file Prometheus refuses to load would leave the operator with no alerts at all."""
    assert "SUCCESS" in promtool("check", "rules", RULES.name)


def test_the_rules_unit_tests_pass() -> None:
    """Each alert fires on the series that should fire it, with its summary, description
    and runbook link, and stays quiet on the look-alike (a standby poller, fast decisions)."""
    assert "SUCCESS" in promtool("test", "rules", RULE_TESTS.name)
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text(encoding="utf-8")))
    assert {str(rule["alert"]) for rule in rules()} <= tested, "an alert without a unit test"


def test_every_alert_says_what_and_links_its_runbook() -> None:
    """An alert page at 3 a.m. must say what broke and where the runbook is, and the link must
    land on a heading that exists."""
    headings = anchors(OPERATIONS.read_text(encoding="utf-8"))
    for rule in rules():
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert annotations["summary"], rule["alert"]
        assert annotations["description"], rule["alert"]
        path, _, anchor = str(annotations["runbook_url"]).partition("#")
        assert path == "docs/OPERATIONS.md", rule["alert"]
        assert anchor in headings, f"{rule['alert']}: no heading for #{anchor}"
        labels = rule["labels"]
        assert isinstance(labels, dict)
        assert labels["severity"] in {"warning", "critical"}, rule["alert"]


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [
        target["expr"]
        for panel in board["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def test_the_dashboard_is_importable_with_the_datasource_as_a_variable() -> None:
    """Grafana's import asks for the Prometheus datasource (``__inputs``), and every panel
    uses it through ``${DS_PROMETHEUS}``, so the file works on any Grafana."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    [source] = board["__inputs"]
    assert (source["name"], source["type"], source["pluginId"]) == (
        "DS_PROMETHEUS",
        "datasource",
        "prometheus",
    )
    assert board["title"]
    assert board["uid"]
    assert board["schemaVersion"] >= 30
    assert board["id"] is None, "an exported id would overwrite someone's dashboard"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert len(dashboard_exprs()) >= 10


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each panel's query parses in Prometheus' own parser (as recording rules, Grafana's
    ``$__rate_interval`` standing in as 5m): a typo shows an empty panel, never an error."""
    recorded = tmp_path / "dashboard-queries.yml"
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, expr in enumerate(dashboard_exprs()):
        promql = expr.replace("$__rate_interval", "5m")
        lines += [f"      - record: dashboard:query{n}", f"        expr: {json.dumps(promql)}"]
    recorded.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert f"SUCCESS: {len(dashboard_exprs())} rules found" in promtool(
        "check", "rules", str(recorded)
    )
