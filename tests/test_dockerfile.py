"""The Dockerfile without an engine: lint and the promises the manifests and the README rely on (the image
itself is run by tests/test_container.py)."""

import re
import subprocess

from tests.support import REPO, tool


def test_dockerfile_passes_hadolint_with_no_ignored_rule():
    result = subprocess.run([tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hadolint ignore" not in (REPO / "Dockerfile").read_text()


def test_dockerfile_runs_as_numeric_non_root_user_with_exec_form_entrypoint():
    text = (REPO / "Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\d+):(\d+)\s*$", text, re.M)
    assert user and user[-1][0] != "0"
    assert re.search(r'^ENTRYPOINT \["vat-job"\]$', text, re.M), "exec form, so SIGTERM reaches Python"
    assert "PYTHONUNBUFFERED=1" in text
    # Installed from the lock file first, every file's hash checked (a layer of its own), then the project alone.
    assert "COPY lock/image.txt /tmp/requirements.txt" in text
    assert re.search(r"pip install [^\n]*--require-hashes --no-deps .*\n +-r /tmp/requirements.txt", text)
    assert "pip install --no-cache-dir --no-deps --no-build-isolation --no-compile ." in text


def test_dockerignore_keeps_the_context_small():
    lines = (REPO / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*" and "!job/" in lines and "!pyproject.toml" in lines
    assert "!lock/image.txt" in lines and "!lock/ci.txt" not in lines
