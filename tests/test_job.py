"""The whole job as users run it: `python -m job` in a subprocess, a few steps on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_WIDTH, REPO, job_env, sigterm_during_vat

REQUIRED_LOG_KEYS = {"timestamp", "level", "event", "run_id"}


def run(env, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "job"], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, mnist_dir):
    tmp = tmp_path_factory.mktemp("job")
    env = job_env(tmp, mnist_dir, RUN_ID="e2e", PLOTS="true", LOG_EVERY_S="0.01", **DEFAULT_WIDTH)
    result = run(env)
    return tmp / "runs" / "e2e", result


def test_job_exits_0_and_every_stdout_line_is_json_with_the_required_keys(finished_run):
    folder, result = finished_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = json_lines(result.stdout)  # fails on any non-JSON line
    assert all(REQUIRED_LOG_KEYS <= record.keys() for record in records)
    assert {r["run_id"] for r in records} == {"e2e"}
    events = [r["event"] for r in records]
    assert "progress" in events and events[-2:] == ["run_finished", "summary"]
    progress = next(r for r in records if r["event"] == "progress")
    assert {"phase", "step", "of", "percent", "job_eta", "job_eta_s", "steps_per_s", "cross_entropy"} <= progress.keys()
    assert result.stderr.strip() == ""
    assert (
        json_lines((folder / "log.jsonl").read_text()) == records[: len(json_lines((folder / "log.jsonl").read_text()))]
    )


def test_report_has_the_documented_layout(finished_run):
    folder, _ = finished_run
    report = json.loads((folder / "report.json").read_text())
    assert report["run_id"] == "e2e"
    assert report["settings"]["epsilon"] == 3.5 and "environment" in report
    assert report["settings"]["hidden_units"] == 1024  # the default width, end to end
    assert report["environment"]["versions"]["torch"]
    timings = report["timings_s"]
    assert 0 < timings["startup"] < 120 and timings["peak_rss_mb"] > 0
    assert len(report["split"]["labeled_indices"]) == 100
    assert report["split"]["labeled_class_counts"] == [11, 10, 10, 10, 9, 8, 10, 11, 10, 11]
    for name, steps in (("baseline", 6), ("vat", 4)):
        model = report["models"][name]
        assert model["steps"] == steps and model["train_seconds"] > 0
        for test_set in ("seeded_test", "mnist_test"):
            result = model[test_set]
            assert 0 <= result["accuracy"] <= 1 and 0 <= result["macro_f1"] <= 1
            matrix = result["confusion_matrix"]
            assert len(matrix) == 10 and sum(map(sum, matrix)) == 10_000
            assert "macro avg" in result["classification_report"]
    for path in (
        "baseline/model.pt",
        "vat/model.pt",
        "baseline/checkpoint-0000006.pt",
        "vat/checkpoint-0000002.pt",
        "plots/losses.png",
        "plots/labeled_images.png",
        "plots/confusion_mnist_test.png",
        "plots/confusion_seeded_test.png",
    ):
        assert (folder / path).is_file(), path
    assert (folder / "plots/losses.png").read_bytes()[:4] == b"\x89PNG"


def test_console_format_is_for_people(tmp_path, mnist_dir):
    env = job_env(tmp_path, mnist_dir, LOG_FORMAT="console", BASELINE_STEPS=0, TRAIN_STEPS=0)
    result = run(env)
    assert result.returncode == 0
    assert "run_finished" in result.stdout and not result.stdout.lstrip().startswith("{")


def test_sigterm_checkpoints_exits_5_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, mnist_dir):
    steps = dict(BASELINE_STEPS=4, TRAIN_STEPS=16, CHECKPOINT_EVERY=1000, UNLABELED_BATCH_SIZE=64)
    straight = run(job_env(tmp_path / "a", mnist_dir, RUN_ID="straight", **steps))
    assert straight.returncode == 0, straight.stdout[-2000:]

    env = job_env(tmp_path / "b", mnist_dir, RUN_ID="resumed", LOG_EVERY_S="0.01", **steps)
    code, rest, seconds = sigterm_during_vat(env)
    assert code == 5 and seconds < 30
    interrupted = json_lines(rest)[-1]
    assert interrupted["event"] == "interrupted" and interrupted["signal"] == "SIGTERM"
    assert Path(interrupted["checkpoint"]).is_file() and 0 < interrupted["step"] < 16

    resumed = run(env)
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    resumed_events = json_lines(resumed.stdout)
    assert any(r["event"] == "resumed" and r["phase"] == "vat" for r in resumed_events)
    a = json.loads((tmp_path / "a/runs/straight/report.json").read_text())["models"]
    b = json.loads((tmp_path / "b/runs/resumed/report.json").read_text())["models"]
    for name in ("baseline", "vat"):
        for test_set in ("seeded_test", "mnist_test"):
            assert a[name][test_set]["confusion_matrix"] == b[name][test_set]["confusion_matrix"]
    assert b["vat"]["resumed_from_step"] == interrupted["step"]
