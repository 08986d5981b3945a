"""Issue 23, a user's first hour: the README's model snippet runs, `vat-job predict` agrees with the report, the
run folder has a summary for people and files anyone may read, the CLI says what is wrong, and a pre-flight
failure leaves nothing behind."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.support import REPO, job_env, moto_on_loopback, run_job


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_dir):
    tmp = tmp_path_factory.mktemp("first-hour")
    env = job_env(tmp, mnist_dir, RUN_ID="first", PLOTS="true", LOG_FORMAT="console")
    result = run_job(env, umask=0o022)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / "runs" / "first", result, env


def idx_images(path):
    data = path.read_bytes()
    count = int.from_bytes(data[4:8], "big")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, 28, 28)


@pytest.mark.slow  # the job in a subprocess
def test_the_readme_snippet_loads_the_shipped_model_with_torch_alone(finished, mnist_dir):
    folder, _, _ = finished
    readme = (REPO / "README.md").read_text()
    snippet = readme.split("## Collect results and use the model", 1)[1].split("```python\n", 1)[1].split("```")[0]
    assert len(snippet.strip().splitlines()) == 3
    images = idx_images(mnist_dir / "MNIST/raw/t10k-images-idx3-ubyte")
    labels = np.frombuffer((mnist_dir / "MNIST/raw/t10k-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)
    program = (
        "import sys, numpy, torch\n"
        "images = torch.from_numpy(numpy.load(sys.argv[1]))\n"
        + snippet.replace("runs/<run_id>", str(folder))
        + "numpy.save(sys.argv[2], digits.numpy())\n"
    )
    np.save(folder.parent / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = folder.parent / "digits.npy"
    # -I: isolated, so `job` cannot be imported from the repository: torch alone loads the file
    done = subprocess.run(
        [sys.executable, "-I", "-c", program, str(folder.parent / "images.npy"), str(out)],
        env=env,
        cwd=folder.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    scored = json.loads((folder / "report.json").read_text())["models"]["vat"]["mnist_test"]
    n = scored["n"]  # the first n images (VAT_EVAL_IMAGES)
    accuracy = float((np.load(out)[:n] == labels[:n]).mean())
    assert accuracy == pytest.approx(scored["accuracy"], abs=1e-4)


@pytest.mark.slow  # the job in a subprocess
def test_predict_agrees_with_the_report_on_idx_and_png(finished, mnist_dir, tmp_path):
    from PIL import Image

    folder, _, env = finished
    idx = mnist_dir / "MNIST/raw/t10k-images-idx3-ubyte"
    result = run_job(env, "predict", "--model", str(folder), str(idx))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    labels = np.frombuffer((mnist_dir / "MNIST/raw/t10k-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)
    digits = np.array([int(line.split("\t")[1]) for line in lines])
    scored = json.loads((folder / "report.json").read_text())["models"]["vat"]["mnist_test"]
    n = scored["n"]  # the first n images (VAT_EVAL_IMAGES)
    assert len(lines) == 10_000 and lines[0].startswith(f"{idx}[0]\t")
    assert float((digits[:n] == labels[:n]).mean()) == pytest.approx(scored["accuracy"], abs=1e-4)
    png = tmp_path / "seven.png"
    Image.fromarray(idx_images(idx)[0]).save(png)
    one = run_job(env, "predict", "--model", str(folder / "vat" / "model.pt"), str(png))
    assert one.returncode == 0 and one.stdout.split("\t")[1] == str(digits[0]), one.stdout + one.stderr
    bad = run_job(env, "predict", "--model", str(folder), str(REPO / "README.md"))
    assert bad.returncode == 3 and "not a PNG or an MNIST IDX" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow  # the job in a subprocess
def test_the_run_folder_has_a_summary_and_files_anyone_may_read(finished):
    folder, result, _ = finished
    report = json.loads((folder / "report.json").read_text())
    summary = (folder / "summary.md").read_text()
    for phase in ("baseline", "vat"):
        assert f"| {phase} | {report['models'][phase]['seeded_test']['accuracy']:.4f} |" in summary
    assert "VAT_TRAIN_STEPS=4" in summary and "![losses](plots/losses.png)" in summary
    modes = {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}
    assert {mode for name, mode in modes.items() if not name.startswith(".")} == {0o644}, modes
    # At a terminal (console format) the run ends with its summary table.
    tail = result.stdout.rstrip().splitlines()[-5:]
    assert "validation acc" in tail[1] and tail[2].startswith("baseline") and tail[-1].startswith("files: ")


@pytest.mark.slow  # the job in a subprocess
def test_progress_lines_lead_with_phase_step_and_percent_and_show_only_trained_terms(mnist_dir, tmp_path):
    env = job_env(tmp_path, mnist_dir, LOG_EVERY_S="0.001", LOG_FORMAT="json")
    result = run_job(env)
    assert result.returncode == 0, result.stdout[-2000:]
    progress = [json.loads(line) for line in result.stdout.splitlines() if '"progress"' in line]
    baseline = next(p for p in progress if p["phase"] == "baseline")
    vat = next(p for p in progress if p["phase"] == "vat")
    assert list(baseline)[:4] == ["phase", "step", "of", "percent"]
    assert re.fullmatch(r"\d+:\d\d:\d\d~?", baseline["job_eta"])
    assert "lds" not in baseline and "entropy" not in baseline and {"lds", "entropy"} <= set(vat)
    assert json.loads(result.stdout.splitlines()[-1])["event"] == "summary"


def test_the_cli_says_what_is_wrong_on_stderr(tmp_path):
    env = job_env(tmp_path, tmp_path)
    version = run_job(env, "--version")
    assert version.returncode == 0 and re.fullmatch(r"vat-job \d+\.\d+\.\d+\n", version.stdout)
    helped = run_job(env, "--help")
    assert helped.returncode == 0 and "predict" in helped.stdout and "docs/configuration.md" in helped.stdout
    wrong = run_job(env, "trian")
    assert wrong.returncode == 2 and "unknown command" in wrong.stderr and wrong.stdout == ""


@pytest.mark.slow  # the job in a subprocess
def test_a_closed_pipe_ends_quietly(tmp_path):
    env = job_env(tmp_path, tmp_path)
    done = subprocess.run(
        f"{sys.executable} -m job --help | head -c 10 >/dev/null; {sys.executable} -m job predict --help | head -1",
        shell=True,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


@pytest.mark.slow  # the job in a subprocess
def test_a_data_error_leaves_no_run_folder(tmp_path):
    env = job_env(
        tmp_path, tmp_path / "empty", RUN_ID="nodata", MNIST_MIRRORS="http://127.0.0.1:9/", DOWNLOAD_RETRIES="1"
    )
    result = run_job(env, timeout=120)
    assert result.returncode == 3, result.stdout[-2000:]
    assert not (tmp_path / "runs" / "nodata").exists()


def test_the_smoke_preset_is_short_and_explicit_values_win(monkeypatch):
    from job.settings import load_settings

    monkeypatch.setenv("VAT_PRESET", "smoke")
    smoke = load_settings(env_file=None)
    assert smoke.train_steps <= 200 and smoke.hidden_units == 100 and smoke.baseline_steps <= 200
    monkeypatch.setenv("VAT_TRAIN_STEPS", "7")
    assert load_settings(env_file=None).train_steps == 7


def test_aws_lines_of_dotenv_reach_boto3_natively(tmp_path, monkeypatch):
    from job.settings import load_settings

    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    (tmp_path / ".env").write_text("AWS_ACCESS_KEY_ID=from-dotenv\nVAT_SEED=3\n")
    assert load_settings(env_file=tmp_path / ".env").seed == 3
    assert os.environ["AWS_ACCESS_KEY_ID"] == "from-dotenv"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")


def test_collect_says_when_nothing_matches_and_refuses_contradictory_flags(tmp_path):

    with moto_on_loopback("first-hour") as server:
        env = {**job_env(tmp_path, tmp_path, S3_BUCKET="first-hour", S3_PREFIX="nothing-here"), **server["env"]}
        for args, said in [
            (["--run", "nope-123"], "no run nope-123 under s3://first-hour/nothing-here/runs/"),
            ([], "no run under s3://first-hour/nothing-here/runs/ (check VAT_S3_PREFIX)"),
            (["--promoted", str(tmp_path / "p"), "--run", "x"], "--promoted fetches the promoted model"),
            (["--trend"], "--trend needs --group"),
        ]:
            result = run_job(env, "collect", *args, timeout=60)
            assert result.returncode == 2 and said in result.stderr, (args, result.stderr)
