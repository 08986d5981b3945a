"""What a run tells Prometheus, pushed to a Pushgateway (VAT_PUSHGATEWAY_URL) when it ends, however it ends.

A batch job is gone before Prometheus could scrape it, so it pushes, as Prometheus advises for batch jobs, to one
group per job and run group: {job="vat-job", run_group=<VAT_RUN_GROUP>}. The push is a POST: it replaces the
metrics whose names it carries and keeps the others, so the last success's timestamp and accuracy outlive the
failed nights after it, while everything about the latest run is that run's.

    vat_job_accuracy{model, test_set}               this run's (test_set: seeded_test, the validation set carved
                                                    from the training images; mnist_test, the official test set);
                                                    NaN when the run ended before its models were evaluated
    vat_job_phase_duration_seconds{phase}           startup, data, baseline, vat (training), total (the whole run,
                                                    uploads and the gate included); a failed run: total only
    vat_job_gate_verdict{verdict, run_id}           1 for this run's verdict (promoted, refused, not_gated), 0 else
    vat_job_exit_code{run_id}                       the process's exit code (README, "Exit codes")
    vat_job_last_success_timestamp_seconds          pushed only when the run exits 0
    vat_job_last_success_accuracy{model, test_set}  pushed with it: the accuracy of the last successful run

The push never changes the exit code and never waits longer than VAT_PUSHGATEWAY_TIMEOUT_S, name resolution
included (it runs in a thread that is given up on): a failure is one warning line.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

from job.layout import RunLayout

JOB = "vat-job"
VERDICTS = ("promoted", "refused", "not_gated")
MODELS = ("baseline", "vat")
TEST_SETS = ("seeded_test", "mnist_test")


def run_metrics(
    run_id: str, exit_code: int, verdict: str, report: dict[str, Any] | None, total_seconds: float
) -> CollectorRegistry:
    """The metrics of one run; `report` is its report.json (None when the run ended before writing one)."""
    registry = CollectorRegistry()

    def gauge(name: str, text: str, *labels: str) -> Gauge:
        return Gauge(f"vat_job_{name}", text, labels, registry=registry)

    accuracy = gauge("accuracy", "Accuracy of this run's models", "model", "test_set")
    duration = gauge("phase_duration_seconds", "Seconds per phase of this run", "phase")
    gate = gauge("gate_verdict", "1 for this run's quality gate verdict", "verdict", "run_id")
    gauge("exit_code", "Exit code of this run", "run_id").labels(run_id).set(exit_code)
    for name in VERDICTS:
        gate.labels(name, run_id).set(1 if name == verdict else 0)
    duration.labels("total").set(total_seconds)
    for phase, seconds in phase_seconds(report).items():
        duration.labels(phase).set(seconds)
    models = [(model, test_set) for model in MODELS for test_set in TEST_SETS]
    for model, test_set in models:
        accuracy.labels(model, test_set).set(accuracy_in(report, model, test_set))
    if exit_code == 0:
        gauge("last_success_timestamp_seconds", "When the last successful run ended").set_to_current_time()
        last = gauge("last_success_accuracy", "Accuracy of the last successful run's models", "model", "test_set")
        for model, test_set in models:
            last.labels(model, test_set).set(accuracy_in(report, model, test_set))
    return registry


def accuracy_in(report: dict[str, Any] | None, model: str, test_set: str) -> float:
    try:
        return float(report["models"][model][test_set]["accuracy"]) if report else float("nan")
    except (KeyError, TypeError, ValueError):
        return float("nan")


def phase_seconds(report: dict[str, Any] | None) -> dict[str, float]:
    if not report:
        return {}
    timings, models = report.get("timings_s") or {}, report.get("models") or {}
    phases = {"startup": timings.get("startup"), "data": timings.get("data")}
    phases.update({model: (models.get(model) or {}).get("train_seconds") for model in MODELS})
    return {phase: seconds for phase, seconds in phases.items() if isinstance(seconds, int | float)}


def push(url: str, group: str, registry: CollectorRegistry, timeout_s: float) -> str | None:
    """POST the registry to the Pushgateway's group {job, run_group}; None, or why it did not arrive in time."""
    outcome: list[str | None] = []

    def send() -> None:
        try:
            pushadd_to_gateway(url, job=JOB, registry=registry, grouping_key={"run_group": group}, timeout=timeout_s)
            outcome.append(None)
        except Exception as error:  # whatever goes wrong, the run's exit code stays its own
            outcome.append(f"{type(error).__name__}: {error}")

    sender = threading.Thread(target=send, name="metrics-push", daemon=True)
    sender.start()
    sender.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s} s"


def push_run(
    settings: Any, exit_code: int, verdict: str, report: dict[str, Any] | None, total_seconds: float, log: Any
) -> None:
    """Push this run's metrics; the report is read from the run folder when the run did not return one."""
    began = time.monotonic()
    fields = {"pushgateway": settings.pushgateway_url, "group": settings.run_group, "exit_code": exit_code}
    try:
        report = report or saved_report(settings.output_dir, settings.run_id)
        registry = run_metrics(settings.run_id, exit_code, verdict, report, total_seconds)
        problem = push(settings.pushgateway_url, settings.run_group, registry, settings.pushgateway_timeout_s)
    except Exception as error:  # metrics are a report on the run, never a reason for it to fail
        problem = f"{type(error).__name__}: {error}"
    if problem:
        log.warning("metrics_push_failed", error=problem, **fields)
    else:
        log.info("metrics_pushed", verdict=verdict, seconds=round(time.monotonic() - began, 3), **fields)


def saved_report(output_dir: Path, run_id: str) -> dict[str, Any] | None:
    """report.json of the run folder: written once the models are evaluated, so a run refused by the gate (or one
    whose upload failed) still reports its accuracy."""
    try:
        report = json.loads(RunLayout.of(output_dir, run_id).report.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None
