"""Quality gate and promotion, against a real S3-compatible server (moto) on 127.0.0.1."""

import json
import os

import pytest

from job.promote import Gate, GateRefused, PromotionSlot, fetch_promoted, promote_run
from job.storage import RunStore, StorageError, make_client
from tests.support import BUCKET, REPO, events, run_job, s3_job_env


class Log:
    def __init__(self):
        self.records = []

    def info(self, event, **fields):
        self.records.append((event, fields))


class Settings:
    def __init__(self, promote_to="latest", min_accuracy=0.9, max_regression=0.005):
        self.promote_to = promote_to
        self.promote_min_accuracy = min_accuracy
        self.promote_max_regression = max_regression


@pytest.fixture
def client(aws_env):
    return make_client()


def finished_run(client, tmp_path, prefix, run_id, accuracy):
    """A run as the job leaves it in the bucket: model, report (the manifest is not needed for promotion)."""
    store = RunStore(client, BUCKET, prefix, run_id)
    folder = tmp_path / run_id
    (folder / "vat").mkdir(parents=True)
    (folder / "vat" / "model.pt").write_bytes(os.urandom(4096))
    report = {
        "run_id": run_id,
        "created_at": f"2026-11-2{len(run_id) % 10}T02:00:00+00:00",
        "settings": {"run_group": "vat-job-nightly"},
        "models": {"vat": {"mnist_test": {"accuracy": accuracy}}},
    }
    (folder / "report.json").write_text(json.dumps(report))
    store.upload(folder / "vat" / "model.pt", "vat/model.pt")
    store.upload(folder / "report.json", "report.json")
    return store, report, folder


@pytest.mark.parametrize(
    "candidate,promoted,passed",
    [
        (0.97, None, True),
        (0.94, None, False),  # below the minimum
        (0.968, 0.970, True),  # within the margin
        (0.960, 0.970, False),  # more than the margin below the promoted model
        (0.99, 0.97, True),
    ],
)
def test_gate(candidate, promoted, passed):
    ok, why = Gate(min_accuracy=0.95, max_regression=0.005).judge(candidate, promoted)
    assert ok is passed, why


def test_promotion_refusal_and_what_a_reader_sees(client, tmp_path):
    prefix, log = "promo", Log()
    slot = PromotionSlot(client, BUCKET, prefix, "latest")
    assert slot.current() is None
    with pytest.raises(StorageError, match="nothing promoted"):
        fetch_promoted(slot, tmp_path / "reader0")

    first, report, folder = finished_run(client, tmp_path, prefix, "night-1", 0.970)
    pointer = promote_run(first, report, Settings(), log)
    assert pointer["run_id"] == "night-1" and pointer["previous"] is None
    read = fetch_promoted(slot, tmp_path / "reader1")
    assert read.run_id == "night-1" and read.group == "vat-job-nightly"
    assert (tmp_path / "reader1/model.pt").read_bytes() == (folder / "vat/model.pt").read_bytes()
    assert json.loads((tmp_path / "reader1/report.json").read_text())["run_id"] == "night-1"

    # Retried pod of the same Job: nothing changes.
    assert promote_run(first, report, Settings(), log)["promoted_at"] == pointer["promoted_at"]

    # Worse by more than the margin: refused, kept under runs/, the promoted model untouched.
    worse, report, _ = finished_run(client, tmp_path, prefix, "night-2", 0.960)
    with pytest.raises(GateRefused, match="below the promoted model's") as refused:
        promote_run(worse, report, Settings(), log)
    assert refused.value.verdict["promoted_run_id"] == "night-1" and refused.value.verdict["passed"] is False
    assert slot.current().run_id == "night-1"
    assert "report.json" in worse.remote_objects(), "a refused run is kept"

    # Below the minimum, with nothing better around: refused too.
    with pytest.raises(GateRefused, match="below the minimum"):
        promote_run(worse, report, Settings(min_accuracy=0.99, max_regression=1.0), log)

    # A promotion that dies after copying its files but before the pointer: readers still see night-1, whole.
    better, report3, folder3 = finished_run(client, tmp_path, prefix, "night-3", 0.975)
    real_put = client.put_object

    def failing_put(**kwargs):
        if kwargs["Key"].endswith("pointer.json"):
            raise StorageError("the node died")
        return real_put(**kwargs)

    client.put_object = failing_put
    with pytest.raises(StorageError):
        promote_run(better, report3, Settings(), log)
    client.put_object = real_put
    assert fetch_promoted(slot, tmp_path / "reader2").run_id == "night-1"
    assert (tmp_path / "reader2/model.pt").read_bytes() == (tmp_path / "reader1/model.pt").read_bytes()

    # Within the margin and run again: promoted; the pointer names the previous one, whose files stay readable.
    pointer3 = promote_run(better, report3, Settings(), log)
    assert pointer3["previous"] == {"run_id": "night-1", "accuracy": 0.970}
    fetch_promoted(slot, tmp_path / "reader3")
    assert (tmp_path / "reader3/model.pt").read_bytes() == (folder3 / "vat/model.pt").read_bytes()
    old = pointer["files"]["model.pt"]["key"]
    assert client.head_object(Bucket=BUCKET, Key=old)["ContentLength"] == 4096, "an earlier reader's files stay"
    assert [e for e, _ in log.records].count("promoted") == 2


def test_a_reader_refuses_a_file_that_does_not_match_the_pointer(client, tmp_path):
    store, report, _ = finished_run(client, tmp_path, "tamper", "night-1", 0.97)
    pointer = promote_run(store, report, Settings(), Log())
    client.put_object(Bucket=BUCKET, Key=pointer["files"]["model.pt"]["key"], Body=b"not the model")
    with pytest.raises(StorageError, match="does not match the sha256"):
        fetch_promoted(PromotionSlot(client, BUCKET, "tamper", "latest"), tmp_path / "reader")
    assert not (tmp_path / "reader" / "model.pt").exists()


@pytest.mark.slow
def test_the_job_promotes_then_a_refused_run_exits_6_and_stays_in_the_bucket(tmp_path, mnist_dir, s3_server):
    env = s3_job_env(tmp_path, mnist_dir, s3_server, S3_PREFIX="nightly", PROMOTE_TO="latest")
    env.update(VAT_RUN_GROUP="vat-job-nightly", VAT_PROMOTE_MIN_ACCURACY="0.0")
    first = run_job({**env, "VAT_RUN_ID": "n-1"})
    assert first.returncode == 0, first.stdout[-3000:]
    assert events(first.stdout)[-1]["event"] == "promoted"

    refused = run_job({**env, "VAT_RUN_ID": "n-2", "VAT_PROMOTE_MIN_ACCURACY": "0.999"})
    assert refused.returncode == 6, refused.stdout[-3000:]
    last = events(refused.stdout)[-1]
    assert last["event"] == "quality_gate_refused" and last["exit_code"] == 6 and "below the minimum" in last["message"]
    client = s3_server["client"]
    pointer = json.loads(client.get_object(Bucket=BUCKET, Key="nightly/latest/pointer.json")["Body"].read())
    assert pointer["run_id"] == "n-1" and pointer["group"] == "vat-job-nightly"
    stored = client.list_objects_v2(Bucket=BUCKET, Prefix="nightly/runs/n-2/")["Contents"]
    assert "nightly/runs/n-2/manifest.json" in {o["Key"] for o in stored}, "the refused run is complete and kept"
    report = json.loads(client.get_object(Bucket=BUCKET, Key="nightly/runs/n-2/report.json")["Body"].read())
    assert report["group"] == "vat-job-nightly"


def test_every_exit_code_is_documented_in_the_cli_and_the_readme():
    import re

    from job import cli

    codes = {value for name, value in vars(cli).items() if name.startswith("EXIT_")}
    readme = (REPO / "README.md").read_text()
    table = {int(c) for c in re.findall(r"^\| (\d) \| ", readme.split("## Exit codes")[1].split("\n## ")[0], re.M)}
    documented = {int(c) for c in re.findall(r"^  (\d)  ", cli.__doc__, re.M)}
    assert codes == table == documented and cli.EXIT_GATE_REFUSED == 6


def test_a_failed_fetch_leaves_the_readers_folder_with_the_earlier_promotion_whole(client, tmp_path):
    slot, reader = PromotionSlot(client, BUCKET, "whole", "latest"), tmp_path / "reader"
    first, report, folder = finished_run(client, tmp_path, "whole", "night-1", 0.97)
    promote_run(first, report, Settings(), Log())
    fetch_promoted(slot, reader)
    second, report2, _ = finished_run(client, tmp_path, "whole", "night-2", 0.98)
    pointer = promote_run(second, report2, Settings(), Log())
    client.put_object(Bucket=BUCKET, Key=pointer["files"]["report.json"]["key"], Body=b"{}")  # the model is fine
    with pytest.raises(StorageError, match="does not match the sha256"):
        fetch_promoted(slot, reader)
    assert (reader / "model.pt").read_bytes() == (folder / "vat" / "model.pt").read_bytes(), "not night-2's model"
    assert json.loads((reader / "report.json").read_text())["run_id"] == "night-1"
    assert json.loads((reader / "pointer.json").read_text())["run_id"] == "night-1"
    assert sorted(p.name for p in reader.iterdir()) == ["model.pt", "pointer.json", "report.json"]
