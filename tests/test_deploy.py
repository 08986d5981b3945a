"""The container image and Kubernetes manifests, checked offline (no Docker engine, no cluster)."""

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from job.settings import Settings
from tests.support import REPO, moto_on_loopback, tool, unavailable

K8S = REPO / "k8s"
MANIFESTS = sorted(K8S.rglob("*.yaml"))
APPLIED = ("settings", "nightly")  # kubectl apply -k: safe to re-apply, create no Job
CREATED = ("one-off", "sweep")  # kubectl create with a generated name, never applied
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir())
# What README's commands do to a one-off or sweep before `kubectl create`: metadata.name becomes generateName.
TO_GENERATE_NAME = '[{"op":"move","from":"/metadata/name","path":"/metadata/generateName"}]'


def documents(path_or_text) -> list[dict]:
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    return [doc for doc in yaml.safe_load_all(text) if doc]


def pod_specs(docs=None) -> list[tuple[str, dict, dict]]:
    specs = []
    for doc in docs if docs is not None else [d for path in MANIFESTS for d in documents(path)]:
        if doc["kind"] == "Job":
            name = doc["metadata"].get("name") or doc["metadata"]["generateName"]
            specs.append((name, doc["spec"], doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "CronJob":
            job = doc["spec"]["jobTemplate"]["spec"]
            specs.append((doc["metadata"]["name"], job, job["template"]["spec"]))
    return specs


def build(directory: Path) -> str:
    built = subprocess.run([tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return built.stdout


def render_overlay(folder: Path, resources: list[Path], components: list[Path] = (), **fields) -> str:
    """kubectl kustomize of an overlay made in folder: these resources and components, and other fields."""
    folder.mkdir()
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **fields}
    kustomization["resources"] = [os.path.relpath(path, folder) for path in resources]
    kustomization["components"] = [os.path.relpath(path, folder) for path in components]
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return build(folder)


def as_created(rendered: str) -> str:
    """README's pipe for one-offs and sweeps: kubectl patch --local turns the name into a generateName prefix."""
    patched = subprocess.run(
        [tool("kubectl"), "patch", "--local", "-f", "-", "--type=json", "-o", "yaml", "-p", TO_GENERATE_NAME],
        input=rendered,
        capture_output=True,
        text=True,
    )
    assert patched.returncode == 0, patched.stderr
    return patched.stdout


def env_of(pod: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["containers"][0]["env"]}


def minimum_kubernetes_version() -> tuple[int, int]:
    found = re.search(r"Minimum Kubernetes version: \*\*1\.(\d+)\*\*", (REPO / "docs" / "kubernetes.md").read_text())
    assert found, "docs/kubernetes.md states the minimum Kubernetes version"
    return 1, int(found.group(1))


def validator_versions() -> list[str]:
    """Every Kubernetes minor version from README's minimum to the newest whose schemas the validator ships."""
    try:
        import kubernetes_validate
    except ImportError:
        return []  # the validation tests are then skipped (empty parameter set)
    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    shipped = sorted(
        (1, int(m.group(1))) for d in schemas.iterdir() if (m := re.match(r"^v1\.(\d+)\.0-local-strict$", d.name))
    )
    return [f"1.{minor}.0" for _, minor in shipped if (1, minor) >= minimum_kubernetes_version()]


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    """Each entry point rendered as a user runs it, plus one overlay with every optional component."""
    out = tmp_path_factory.mktemp("built")
    files = {}
    for name in APPLIED + CREATED:
        text = build(K8S / name)
        files[name] = out / f"{name}.yaml"
        files[name].write_text(as_created(text) if name in CREATED else text)
    everything = render_overlay(
        out / "all-components",
        [K8S / name for name in ("nightly", *CREATED)],
        [K8S / "components" / c for c in COMPONENTS],
    )
    files["all-components"] = out / "all-components.yaml"
    files["all-components"].write_text(everything)
    return files


def test_the_minimum_version_is_one_the_validator_knows_and_the_range_reaches_its_newest():
    versions = validator_versions() or unavailable("kubernetes-validate is not installed")
    assert versions[0] == f"1.{minimum_kubernetes_version()[1]}.0"
    assert len(versions) >= 2


@pytest.mark.parametrize("version", validator_versions())
def test_every_manifest_validates_strictly_from_the_minimum_version_to_the_newest(builds, version):
    paths = [str(p) for p in builds.values()]
    raw = [
        str(p)
        for p in MANIFESTS
        if "kind: Kustomization" not in p.read_text() and "kind: Component" not in p.read_text()
    ]
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *paths, *raw],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_nothing_applied_creates_a_job_and_nothing_starts_everything_at_once(builds):
    assert not (K8S / "kustomization.yaml").exists(), "kubectl apply -k k8s/ must not start every run at once"
    for name in APPLIED:
        kinds = {doc["kind"] for doc in documents(builds[name].read_text())}
        assert "Job" not in kinds and kinds <= {"ConfigMap", "ServiceAccount", "CronJob"}, name
    assert {d["kind"] for d in documents(builds["nightly"].read_text())} == {"ConfigMap", "ServiceAccount", "CronJob"}
    for name in CREATED:
        (job,) = documents(builds[name].read_text())
        assert job["kind"] == "Job" and "name" not in job["metadata"], name
        assert job["metadata"]["generateName"].endswith("-"), "kubectl create gives each run a unique name"
    assert "Secret" not in builds["all-components"].read_text(), "the example Secret is never applied"


def failure_policies(builds) -> dict[str, dict]:
    """Each rendered Job spec by name: the nightly's jobTemplate, the one-off, the sweep."""
    specs = {name: job for name, job, _ in pod_specs(documents(builds["nightly"].read_text()))}
    for name in CREATED:
        specs[name] = documents(builds[name].read_text())[0]["spec"]
    return specs


def test_pod_failure_policies_follow_the_exit_codes_of_the_cli(builds):
    from job.cli import FAIL_JOB, RETRIED

    for name, job in failure_policies(builds).items():
        rules = job["podFailurePolicy"]["rules"]
        assert job["podReplacementPolicy"] == "Failed", "never two pods writing one run"
        ignore = [r for r in rules if r["action"] == "Ignore"]
        assert ignore[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}], name
        exits = [(r["action"], r["onExitCodes"]["values"]) for r in rules if "onExitCodes" in r]
        fail = "FailIndex" if name == "sweep" else "FailJob"  # a sweep: that seed fails alone, the others go on
        assert name != "sweep" or job["backoffLimitPerIndex"]
        assert [values for action, values in exits if action == fail] == [[code] for code in FAIL_JOB], (
            f"{name}: each code that a retry cannot help fails at once, in its own rule"
        )
        assert [values for action, values in exits if action == "Count"] == [list(RETRIED)], name
        assert {action for action, _ in exits} == {fail, "Count"}, name


def test_the_exit_codes_agree_in_the_cli_its_docstring_and_the_readme():
    """With test_pod_failure_policies_follow_the_exit_codes_of_the_cli: README, cli.py and every manifest agree."""
    import job.cli as cli

    codes = {value for name, value in vars(cli).items() if name.startswith("EXIT_")}
    documented = {int(m[1]) for m in re.finditer(r"^\s{1,2}(\d{1,2})  \S", cli.__doc__, flags=re.M)}
    readme = (REPO / "docs" / "operations.md").read_text()
    section = readme[readme.index("## Exit codes") :]
    section = section[: section.index("\n## ")]
    rows = {int(m[1]) for m in re.finditer(r"^\| (\d+) \|", section, flags=re.M)}
    assert codes == documented == rows, "every exit code in the constants, the docstring and README's table"
    assert cli.EXIT_NO_GPU not in cli.FAIL_JOB and cli.EXIT_CONFIG in cli.FAIL_JOB, "a bad node is not a bad setting"
    for text in (cli.__doc__, section):  # the sentence on Kubernetes, in the docstring and under README's table
        said = " ".join(text.split())
        assert f"{' and '.join(map(str, cli.FAIL_JOB))} fail the Job at once" in said
        assert f"{' and '.join(map(str, cli.RETRIED))} is retried on a new pod" in said


def test_pods_are_restricted_need_only_the_gpu_limit_and_toleration_and_take_optional_credentials(builds):
    uid = int(re.findall(r"^USER\s+(\d+)", (REPO / "Dockerfile").read_text(), re.M)[-1])
    docs = [d for name in APPLIED + CREATED for d in documents(builds[name].read_text())]
    specs = pod_specs(docs)
    assert len(specs) == 3
    for name, job, pod in specs:
        assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 30, name
        assert job["activeDeadlineSeconds"] and job["ttlSecondsAfterFinished"], name
        assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["runAsNonRoot"], name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["serviceAccountName"] == "vat-job" and pod["automountServiceAccountToken"] is False
        assert "nodeSelector" not in pod and "runtimeClassName" not in pod, "opt-in components, not the default"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        container = pod["containers"][0]
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"].startswith("registry.example.com/"), "the image comes from k8s/site"
        secret = next(e["secretRef"] for e in container["envFrom"] if "secretRef" in e)
        assert secret["optional"] is True, "credentials may come from the pod's cloud identity instead"
        assert container["terminationMessagePath"] == "/dev/termination-log", "the gate's reason (job/cli.py)"
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError", "else the last log lines"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert mounts == {"/tmp", "/output", "/data"}, "writable paths for a read-only root; no unused /dev/shm"
        env = env_of(pod)
        assert "batch.kubernetes.io/job-name" in env["VAT_JOB_NAME"]["fieldRef"]["fieldPath"]
        assert "batch.kubernetes.io/controller-uid" in env["VAT_JOB_UID"]["fieldRef"]["fieldPath"]
        assert "VAT_RUN_ID" not in env, "derived from the Job by the job, the same for every retried pod"


def quantity(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return float(text[:-2]) * units[text[-2:]] if text[-2:] in units else float(text)


def test_resources_follow_the_measured_peaks_with_headroom(builds):
    # BENCHMARKS.md, the job on one H200: peak host RSS 1.65 GB (1.77 GB with AMP=bf16), peak GPU memory 843 MB
    # (the first default; the 0.2.0 default's CPU runs peaked at 1,413-1,499 MiB, not yet measured on a GPU).
    peak_rss = 1.77e9
    for name, _, pod in pod_specs(documents(builds["all-components"].read_text())):
        resources = pod["containers"][0]["resources"]
        request, limit = quantity(resources["requests"]["memory"]), quantity(resources["limits"]["memory"])
        assert peak_rss < request <= 1.5 * peak_rss, name
        assert 1.5 * peak_rss <= limit <= 2 * peak_rss, name
        assert "cpu" not in resources["limits"], "no CPU throttling of the loop that feeds the GPU"
        assert float(resources["requests"]["cpu"]) <= 2, name
        assert quantity(resources["limits"]["ephemeral-storage"]) >= sum(
            quantity(v["emptyDir"]["sizeLimit"]) for v in pod["volumes"]
        )


def test_the_three_pod_templates_differ_only_in_their_role(builds):
    templates = {}
    for name, _, pod in pod_specs([d for n in ("nightly", *CREATED) for d in documents(builds[n].read_text())]):
        pod = yaml.safe_load(yaml.safe_dump(pod))
        pod["containers"][0].pop("env")
        templates[name] = pod
    first, *rest = templates.values()
    assert all(t == first for t in rest), "change the pod in all three manifests"


JOB_NAME_LABEL = "metadata.labels['batch.kubernetes.io/job-name']"
JOB_UID_LABEL = "metadata.labels['batch.kubernetes.io/controller-uid']"


def settings_in(pod: dict, job_name: str, monkeypatch, job_uid: str = "0123abcd-ffff"):
    """The settings a container of this pod template loads in a Job named job_name: the ConfigMap's (envFrom), then
    its env with the downward API's values."""
    from job.settings import load_settings

    downward = {JOB_NAME_LABEL: job_name, JOB_UID_LABEL: job_uid}
    for name in [n for n in os.environ if n.startswith("VAT_")]:
        monkeypatch.delenv(name)
    (config,) = documents(K8S / "settings" / "configmap.yaml")
    for name, value in config["data"].items():
        if name.startswith("VAT_"):
            monkeypatch.setenv(name, value)
    for entry in pod["containers"][0]["env"]:
        value = entry["value"] if "value" in entry else downward[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        monkeypatch.setenv(entry["name"], value)
    return load_settings(env_file=None)


def test_run_identity_and_groups_from_the_manifests(builds, monkeypatch):
    (cron,) = [d for d in documents(builds["nightly"].read_text()) if d["kind"] == "CronJob"]
    _, _, pod = pod_specs([cron])[0]
    env = env_of(pod)
    assert env["VAT_RUN_GROUP"] == {"fieldRef": {"fieldPath": JOB_NAME_LABEL}}, "from the Job, not a literal"
    assert env["VAT_PROMOTE_TO"] == "latest"
    scheduled = settings_in(pod, f"{cron['metadata']['name']}-29930520", monkeypatch)
    assert scheduled.run_group == "vat-job-nightly", "the CronJob's name is its runs' group"
    assert scheduled.run_id == "20261128T0200Z-vat-job-nightly-0123abcd"
    sweep = documents(builds["sweep"].read_text())[0]["spec"]["template"]["spec"]
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert settings_in(sweep, "vat-sweep-q9w8e", monkeypatch).run_group == "vat-sweep-q9w8e", "a sweep's own name"
    assert env_of(sweep)["VAT_LABEL_SPLIT_SEED_FROM_INDEX"] == "true"
    one_off = env_of(documents(builds["one-off"].read_text())[0]["spec"]["template"]["spec"])
    assert one_off["VAT_RUN_GROUP"] == "one-off" and "VAT_PROMOTE_TO" not in one_off
    assert "VAT_PROMOTE_TO" not in env_of(sweep)


def test_the_nightly_group_follows_the_cronjobs_name_under_an_overlay_with_a_name_prefix(tmp_path, monkeypatch):
    """Two teams sharing a bucket keep their own groups (and promoted-model history): the group is not a literal."""
    rendered = render_overlay(tmp_path / "team-a", [K8S / "nightly"], namePrefix="team-a-")
    (cron,) = [d for d in documents(rendered) if d["kind"] == "CronJob"]
    name = cron["metadata"]["name"]
    assert name == "team-a-vat-job-nightly"
    _, _, pod = pod_specs([cron])[0]
    scheduled = settings_in(pod, f"{name}-29930520", monkeypatch)  # what the CronJob controller names its Job
    assert (scheduled.run_group, scheduled.run_id) == (name, "20261128T0200Z-team-a-vat-job-nightly-0123abcd")
    # By hand, as the README does it: kubectl create job "team-a-vat-job-nightly-$(date -u +%Y%m%d%H%M%S)" --from=...
    by_hand = settings_in(pod, f"{name}-20261129153000", monkeypatch)
    assert (by_hand.run_group, by_hand.run_id) == (name, f"{name}-20261129153000-0123abcd")


def test_every_vat_variable_the_manifests_set_is_a_real_setting():
    settings = {f"VAT_{name.upper()}" for name in Settings.model_fields}
    used = set(re.findall(r"\b(VAT_[A-Z0-9_]+)\b", "".join(p.read_text() for p in MANIFESTS)))
    assert used, "the manifests set settings"
    assert used <= settings, used - settings


def test_the_image_the_cluster_pulls_and_the_one_the_guide_builds_are_this_version():
    # A new default (or anything else a resume refuses) comes with a new version; a site left on the old tag
    # would run the old recipe under the new documents.
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    site = yaml.safe_load((K8S / "site" / "kustomization.yaml").read_text())
    assert [image["newTag"] for image in site["images"] if image["name"] == "vat-job"] == [version]
    built = re.findall(r"\bvat-job:([\w.+-]*\w)", (REPO / "docs" / "kubernetes.md").read_text())
    assert len(built) >= 2 and set(built) == {version}, built  # docker build -t ... and docker push ...


def test_optional_components_patch_jobs_and_the_cronjob(builds):
    specs = pod_specs(documents(builds["all-components"].read_text()))
    assert len(specs) == 3
    gfd = {"key": "nvidia.com/gpu.count", "operator": "Exists"}  # a label GFD itself sets (not the GPU Operator)
    for _, job, pod in specs:
        assert pod["runtimeClassName"] == "nvidia" and "nodeSelector" not in pod
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert terms == [{"matchExpressions": [gfd]}]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/mig-1g.18gb"] == 1
        assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"], "a slice instead of a GPU"
        assert job["suspend"] is True, "Kueue starts the Job once admitted"
    for doc in documents(builds["all-components"].read_text()):
        meta = {"Job": lambda d: d["metadata"], "CronJob": lambda d: d["spec"]["jobTemplate"]["metadata"]}
        if doc["kind"] in meta:
            assert meta[doc["kind"]](doc)["labels"]["kueue.x-k8s.io/queue-name"], doc["kind"]
    assert "nvidia.com/gpu.present" not in builds["all-components"].read_text(), "set by the GPU Operator only"


def test_the_settings_send_only_s3_to_the_endpoint_and_take_no_credentials_from_the_node(builds):
    (config,) = [d for d in documents(builds["nightly"].read_text()) if d["kind"] == "ConfigMap"]
    data = config["data"]
    assert "AWS_ENDPOINT_URL_S3" in data and "AWS_ENDPOINT_URL" not in data, "the global one redirects STS (IRSA)"
    assert data["AWS_EC2_METADATA_DISABLED"] == "true"


def test_without_credentials_the_configmaps_variables_keep_boto3_away_from_the_instance_metadata_service(
    builds, monkeypatch, tmp_path
):
    """A missing Secret must not fall back to the node's role: boto3 never asks the metadata service."""
    import http.server
    import threading

    import boto3

    (config,) = [d for d in documents(builds["nightly"].read_text()) if d["kind"] == "ConfigMap"]
    asked = []

    class MetadataService(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            asked.append(self.path)
            self.send_error(404)

        do_PUT = do_GET  # noqa: N815  (IMDSv2's token request)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MetadataService)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{server.server_port}/")
    try:
        for name, value in config["data"].items():
            if name.startswith("AWS_"):
                monkeypatch.setenv(name, value)
        assert boto3.Session().get_credentials() is None and asked == [], "the pod's settings: no metadata service"
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "false")  # what "false" turns back on
        assert boto3.Session().get_credentials() is None and asked, "the check above would have seen a request"
    finally:
        server.shutdown()


def test_readmes_resume_of_a_sweep_seed_continues_that_run_in_the_sweeps_group(builds, monkeypatch):
    """README, "Resume after the retries ran out": a one-off with kubectl set env --local VAT_RUN_ID, group, seed."""
    run_id, sweep = "vat-sweep-q9w8e-3f2a9c1d-2", "vat-sweep-q9w8e"
    resumed = subprocess.run(
        [tool("kubectl"), "set", "env", "--local", "-f", "-", "-o", "yaml"]
        + [f"VAT_RUN_ID={run_id}", f"VAT_RUN_GROUP={sweep}", "VAT_LABEL_SPLIT_SEED=3"],
        input=builds["one-off"].read_text(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    (job,) = documents(resumed.stdout)
    assert "generateName" in job["metadata"], "still created with a new name"
    entries = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert len({e["name"] for e in entries}) == len(entries), "set env replaces, never duplicates a variable"
    settings = settings_in(job["spec"]["template"]["spec"], "vat-job-one-off-b7x2k", monkeypatch, "99999999-0000")
    # What the sweep's pod 2 had: the same run, group and label seed (1+2), so it resumes instead of exiting 2.
    assert (settings.run_id, settings.run_group, settings.label_split_seed) == (run_id, sweep, 3)


def test_the_example_lifecycle_rule_is_accepted_by_an_s3_server_and_spares_the_promoted_model(builds):
    """docs/operations.md, "Retention": old runs expire, the promoted copies (outside runs/) never do."""
    text = (REPO / "docs" / "operations.md").read_text()
    retention = text[text.index("## Retention") :]
    lifecycle = json.loads(retention.split("```json", 1)[1].split("```", 1)[0])
    (config,) = [d for d in documents(builds["nightly"].read_text()) if d["kind"] == "ConfigMap"]
    (cron,) = [d for d in documents(builds["nightly"].read_text()) if d["kind"] == "CronJob"]
    prefix, promoted = config["data"]["VAT_S3_PREFIX"], env_of(pod_specs([cron])[0][2])["VAT_PROMOTE_TO"]
    expiring = [rule["Filter"]["Prefix"] for rule in lifecycle["Rules"] if "Expiration" in rule]
    assert expiring == [f"{prefix}/runs/"], "only the runs"
    assert not f"{prefix}/{promoted}/runs/x/model.pt".startswith(expiring[0]), "the promoted copies stay"
    with moto_on_loopback("vat-results") as s3:
        s3["client"].put_bucket_lifecycle_configuration(Bucket="vat-results", LifecycleConfiguration=lifecycle)
        stored = s3["client"].get_bucket_lifecycle_configuration(Bucket="vat-results")["Rules"]
    assert [rule["ID"] for rule in stored] == [rule["ID"] for rule in lifecycle["Rules"]]
