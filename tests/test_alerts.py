"""The alerts on the job's metrics (k8s/monitoring/vat-job.rules.yml): promtool checks them and runs their unit
tests; the PrometheusRule for the Prometheus Operator holds the same groups; the exit codes they name are the cli's."""

import re
import subprocess

import pytest
import yaml

from tests.support import REPO, tool
from tests.test_deploy import render_overlay

MONITORING = REPO / "k8s" / "monitoring"
RULES = MONITORING / "vat-job.rules.yml"
COMPONENT = REPO / "k8s" / "components" / "prometheus-rule"


def promtool(*args: str) -> str:
    result = subprocess.run([tool("promtool"), *args], capture_output=True, text=True, cwd=MONITORING, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_checks_the_rules():
    assert "SUCCESS: 4 rules found" in promtool("check", "rules", RULES.name)


@pytest.mark.slow
def test_promtool_unit_tests_of_the_alerts_pass():
    assert "SUCCESS" in promtool("test", "rules", "vat-job.rules.test.yml")


def test_every_alert_has_a_unit_test_and_clears_with_the_next_success():
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    cases = yaml.safe_load((MONITORING / "vat-job.rules.test.yml").read_text())["tests"]
    fired = {c["alertname"] for t in cases for c in t["alert_rule_test"] if c["exp_alerts"]}
    cleared = {c["alertname"] for t in cases for c in t["alert_rule_test"] if not c["exp_alerts"]}
    assert alerts == {
        "VatJobNightlyNotSucceeded",
        "VatJobGateRefused",
        "VatJobAccuracyDropped",
        "VatJobFailed",
    }
    assert fired == alerts and cleared == alerts


def test_the_prometheus_rule_holds_the_same_groups_as_the_rules_file(tmp_path):
    (rule,) = yaml.safe_load_all((COMPONENT / "prometheusrule.yaml").read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text()), "change both files"
    # The component adds it to the nightly (applied), not to one-off runs and sweeps (created again each time).
    rendered = render_overlay(tmp_path / "with-alerts", [REPO / "k8s" / "nightly"], [COMPONENT])
    kinds = [doc["kind"] for doc in yaml.safe_load_all(rendered) if doc]
    assert sorted(kinds) == ["ConfigMap", "CronJob", "PrometheusRule", "ServiceAccount"]
    assert "prometheus-rule" not in (REPO / "k8s" / "site" / "kustomization.yaml").read_text()


def test_the_failure_alert_names_the_exit_codes_the_cli_uses():
    from job.cli import EXIT_CONFIG, EXIT_GATE_REFUSED, EXIT_OK, FAIL_JOB

    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    (failed,) = [rule for rule in rules if rule["alert"] == "VatJobFailed"]
    at_once = {int(code) for code in re.findall(r"vat_job_exit_code\{[^}]*\} == (\d+)", failed["expr"])}
    excluded = {int(code) for code in re.findall(r"!= (\d+)", failed["expr"])}
    assert at_once == set(FAIL_JOB) - {EXIT_GATE_REFUSED} == {EXIT_CONFIG}, "a Job failed at once alerts at once"
    assert excluded == {EXIT_OK, EXIT_CONFIG, EXIT_GATE_REFUSED}, "a refusal has its own alert"
