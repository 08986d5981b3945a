"""The lock files (.ci/lock writes them) against pyproject.toml: every declared package locked at a version its range
admits, every file hashed, the image's lock the CI lock's versions, and the image without what the job never imports."""

import ast
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
DEPENDENCIES = [Requirement(line) for line in PROJECT["dependencies"]]
TEST_EXTRA = [Requirement(line) for line in PROJECT["optional-dependencies"]["test"]]
# The distribution a module comes from, where the two names differ.
DISTRIBUTION = {
    "sklearn": "scikit-learn",
    "dotenv": "python-dotenv",
    "pydantic_settings": "pydantic-settings",
    "PIL": "pillow",
    "prometheus_client": "prometheus-client",
}


def locked(name: str) -> dict[str, tuple[str, frozenset[str]]]:
    """lock/<name>.txt as {package: (version, sha256 digests)}."""
    entries = re.findall(
        r"^([A-Za-z0-9._-]+)==(\S+) \\\n((?: +--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)",
        (REPO / "lock" / f"{name}.txt").read_text(),
        re.M,
    )
    return {
        canonicalize_name(package): (version, frozenset(re.findall(r"[0-9a-f]{64}", hashes)))
        for package, version, hashes in entries
    }


@pytest.mark.parametrize(("lock", "declared"), [("image", DEPENDENCIES), ("ci", DEPENDENCIES + TEST_EXTRA)])
def test_every_declared_package_is_locked_at_a_version_pyproject_admits(lock, declared):
    pins = locked(lock)
    lines = [line for line in (REPO / "lock" / f"{lock}.txt").read_text().splitlines() if re.match(r"[A-Za-z]", line)]
    assert len(pins) == len(lines), "every requirement is name==version with at least one sha256"
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is declared in pyproject.toml but not in lock/{lock}.txt: run .ci/lock"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), f"{name}=={version} vs {requirement}"


def test_the_image_gets_the_versions_and_files_ci_tests():
    ci = locked("ci")
    assert {name: ci.get(name) for name in locked("image")} == locked("image")


def test_ci_tools_are_pinned_exactly():
    assert all(str(r.specifier).startswith("==") and len(r.specifier) == 1 for r in TEST_EXTRA), TEST_EXTRA


def test_the_image_carries_nothing_the_job_does_not_import():
    imported = set()
    for path in (REPO / "job").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    distributions = {canonicalize_name(DISTRIBUTION.get(module, module)) for module in imported}
    declared = {canonicalize_name(r.name) for r in DEPENDENCIES}
    assert declared <= distributions, f"declared but never imported by job/: {declared - distributions}"
    assert "torchvision" not in locked("image")
