"""What a user sees when the job stops on an error: one line and a documented exit code, a traceback only for bugs."""

import json

import pytest

from tests.support import job_env, python, run_job

# An internal error as users meet it: the job's entry point, with the run itself replaced by a bug.
WITH_A_BUG = """
import sys
import job.cli

def run_job(settings, stop, log):
    raise RuntimeError("a bug in the job")

sys.modules["job.run"] = type(sys)("job.run")
sys.modules["job.run"].run_job = run_job
sys.exit(job.cli.main([]))
"""


@pytest.mark.slow
def test_internal_error_in_json_is_one_line_with_the_traceback(tmp_path, mnist_dir):
    result = python("-c", WITH_A_BUG, env=job_env(tmp_path, mnist_dir), timeout=120)
    assert result.returncode == 1
    assert result.stderr == ""
    (line,) = [json.loads(text) for text in result.stdout.splitlines()]
    assert line["event"] == "internal_error" and line["exit_code"] == 1
    (exception,) = line["exception"]
    assert exception["exc_type"] == "RuntimeError" and exception["exc_value"] == "a bug in the job"
    assert exception["frames"][-1]["name"] == "run_job"


@pytest.mark.slow
def test_internal_error_in_console_prints_the_traceback_once(tmp_path, mnist_dir):
    result = python("-c", WITH_A_BUG, env=job_env(tmp_path, mnist_dir, LOG_FORMAT="console"), timeout=120)
    assert result.returncode == 1
    assert result.stderr == ""  # no second traceback from the renderer itself (it used to crash on the list)
    assert result.stdout.count("Traceback (most recent call last)") == 1
    assert "internal_error" in result.stdout and "RuntimeError: a bug in the job" in result.stdout


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_unwritable_output_folder_is_one_line_and_exit_2_before_torch_loads(tmp_path, log_format):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = job_env(tmp_path, tmp_path, OUTPUT_DIR=str(blocker / "runs"), LOG_FORMAT=log_format)
    command = "import sys, job.cli; code = job.cli.main([]); assert 'torch' not in sys.modules; sys.exit(code)"
    result = python("-c", command, env=env, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == "" and len(result.stdout.strip().splitlines()) == 1
    assert "Traceback" not in result.stdout
    assert "VAT_OUTPUT_DIR=" in result.stdout and "is not writable" in result.stdout and "--user" in result.stdout


@pytest.mark.slow
def test_data_folder_that_cannot_receive_mnist_is_one_line_and_exit_3(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = job_env(tmp_path, blocker / "data", MNIST_MIRRORS='["http://127.0.0.1:9/"]')
    result = run_job(env, timeout=120)
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    last = json.loads(result.stdout.splitlines()[-1])
    assert last["event"] == "data_error" and "Traceback" not in result.stdout
    assert "cannot be written to download it" in last["message"] and "MNIST/raw" in last["message"]
