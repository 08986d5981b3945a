"""The container image and Kubernetes manifests, checked offline (no Docker engine, no cluster)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from job.cli import EXIT_CONFIG
from job.settings import Settings
from tests.conftest import REPO

K8S = REPO / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
TOOLS = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name, path=str(TOOLS)) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return found


def documents(path_or_text) -> list[dict]:
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    return [doc for doc in yaml.safe_load_all(text) if doc]


def pod_specs() -> list[tuple[str, dict]]:
    specs = []
    for path in MANIFESTS:
        for doc in documents(path):
            if doc["kind"] == "Job":
                specs.append((doc["metadata"]["name"], doc["spec"], doc["spec"]["template"]["spec"]))
            elif doc["kind"] == "CronJob":
                job = doc["spec"]["jobTemplate"]["spec"]
                specs.append((doc["metadata"]["name"], job, job["template"]["spec"]))
    return specs


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
    assert "pip install --no-cache-dir ." in text, "installed from pyproject.toml"


def test_dockerignore_keeps_the_context_small():
    lines = (REPO / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*" and "!job/" in lines and "!pyproject.toml" in lines


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_validates_strictly(path):
    result = subprocess.run([tool("kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomize_build_validates_strictly(tmp_path):
    built = subprocess.run([tool("kubectl"), "kustomize", str(K8S)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    out = tmp_path / "built.yaml"
    out.write_text(built.stdout)
    kinds = sorted(doc["kind"] for doc in documents(built.stdout))
    assert kinds == ["ConfigMap", "CronJob", "Job", "Job"], "the example Secret is not applied"
    result = subprocess.run([tool("kubernetes-validate"), "--strict", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_vat_variable_the_manifests_set_is_a_real_setting():
    settings = {f"VAT_{name.upper()}" for name in Settings.model_fields}
    used = set(re.findall(r"\b(VAT_[A-Z0-9_]+)\b", "".join(p.read_text() for p in MANIFESTS)))
    assert used, "the manifests set settings"
    assert used <= settings, used - settings


def test_pod_failure_policy_fails_at_once_on_configuration_errors_and_ignores_disruptions():
    for name, job, _ in pod_specs():
        rules = job["podFailurePolicy"]["rules"]
        fail = [r for r in rules if r["action"] == "FailJob"]
        assert fail and fail[0]["onExitCodes"]["values"] == [EXIT_CONFIG], name
        assert any(r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget" for r in rules)


def test_pods_are_restricted_and_match_the_image_uid():
    uid = int(re.findall(r"^USER\s+(\d+)", (REPO / "Dockerfile").read_text(), re.M)[-1])
    for name, job, pod in pod_specs():
        assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 30, name
        assert job["activeDeadlineSeconds"] and job["ttlSecondsAfterFinished"], name
        assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["runAsNonRoot"], name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        container = pod["containers"][0]
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/output", "/data", "/dev/shm"} <= mounts, "writable paths for a read-only root"
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        run_id = next(e for e in container["env"] if e["name"] == "VAT_RUN_ID")["value"]
        assert "$(JOB_UID)" in run_id, "a retried pod keeps its run id and resumes"


def test_cronjob_and_sweep_are_configured_for_their_jobs():
    cron = documents(K8S / "cronjob.yaml")[0]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["timeZone"] and cron["startingDeadlineSeconds"]
    assert cron["successfulJobsHistoryLimit"] and cron["failedJobsHistoryLimit"]
    sweep = documents(K8S / "sweep.yaml")[0]["spec"]
    assert sweep["completionMode"] == "Indexed" and sweep["parallelism"] == sweep["completions"] == 3
    env = {e["name"]: e.get("value") for e in sweep["template"]["spec"]["containers"][0]["env"]}
    assert env["VAT_LABEL_SPLIT_SEED_FROM_INDEX"] == "true" and "$(JOB_INDEX)" in env["VAT_RUN_ID"]
