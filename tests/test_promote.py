"""Quality gate and promotion, against real S3-compatible servers on 127.0.0.1: moto, and s3rver (which ignores
conditional writes) for the races."""

import json
import os

import pytest

from job import history
from job.gate import METRIC, TEST_METRIC
from job.promote import Gate, GateRefused, PromotionSlot, fetch_promoted, promote_run
from job.storage import RunStore, StorageError, make_client
from tests.support import BUCKET, REPO, RecordingLog, s3rver_on_loopback


class Settings:
    def __init__(self, promote_to="latest", min_accuracy=0.9, max_regression=0.005, max_drift=0.01, window=30):
        self.promote_to = promote_to
        self.promote_min_accuracy = min_accuracy
        self.promote_max_regression = max_regression
        self.promote_max_drift = max_drift
        self.promote_drift_window = window


@pytest.fixture
def client(aws_env):
    return make_client()


def finished_run(client, tmp_path, prefix, run_id, accuracy, test_accuracy=None):
    """A run as the job leaves it in the bucket: model, report (the manifest is not needed for promotion). Its
    validation accuracy is `accuracy`; the test set's is a little lower unless given."""
    store = RunStore(client, BUCKET, prefix, run_id)
    folder = tmp_path / run_id
    (folder / "vat").mkdir(parents=True)
    (folder / "vat" / "model.pt").write_bytes(os.urandom(4096))
    report = {
        "run_id": run_id,
        "created_at": f"2026-11-2{len(run_id) % 10}T02:00:00+00:00",
        "settings": {"run_group": "vat-job-nightly"},
        "models": {
            model: {
                "seeded_test": {"accuracy": accuracy, "macro_f1": accuracy},
                "mnist_test": {"accuracy": test, "macro_f1": test},
            }
            for model, test in (("baseline", 0.5), ("vat", test_accuracy or round(accuracy - 0.002, 4)))
        },
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


@pytest.mark.parametrize(
    "candidate,recent,passed",
    [
        (0.975, [0.980, 0.985], True),  # exactly the drift floor, 0.985 - 0.01
        (0.9749, [0.9790, 0.985], False),  # within the regression margin of the promoted, not of the best
        (0.9749, [0.979, 0.983, 0.980, 0.985], True),  # 0.985 is out of the window of 3
    ],
)
def test_the_drift_bound_is_the_best_of_the_last_n_promoted_models(candidate, recent, passed):
    gate = Gate(min_accuracy=0.95, max_regression=0.005, max_drift=0.01, drift_window=3)
    ok, why = gate.judge(candidate, recent[0], recent)
    assert ok is passed, why
    assert passed or "best of the last 2 promoted models (drift floor 0.9750)" in why


def test_promotion_refusal_and_what_a_reader_sees(client, tmp_path):
    prefix, log = "promo", RecordingLog()
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
    pointer = promote_run(store, report, Settings(), RecordingLog())
    client.put_object(Bucket=BUCKET, Key=pointer["files"]["model.pt"]["key"], Body=b"not the model")
    with pytest.raises(StorageError, match="does not match the sha256"):
        fetch_promoted(PromotionSlot(client, BUCKET, "tamper", "latest"), tmp_path / "reader")
    assert not (tmp_path / "reader" / "model.pt").exists()


def test_every_exit_code_is_documented_in_the_cli_and_the_readme():
    import re

    from job import cli

    codes = {value for name, value in vars(cli).items() if name.startswith("EXIT_")}
    readme = (REPO / "docs" / "operations.md").read_text()
    table = {int(c) for c in re.findall(r"^\| (\d+) \| ", readme.split("## Exit codes")[1].split("\n## ")[0], re.M)}
    documented = {int(c) for c in re.findall(r"^ {1,2}(\d+)  ", cli.__doc__, re.M)}
    assert codes == table == documented and cli.EXIT_GATE_REFUSED == 6


def test_a_failed_fetch_leaves_the_readers_folder_with_the_earlier_promotion_whole(client, tmp_path):
    slot, reader = PromotionSlot(client, BUCKET, "whole", "latest"), tmp_path / "reader"
    first, report, folder = finished_run(client, tmp_path, "whole", "night-1", 0.97)
    promote_run(first, report, Settings(), RecordingLog())
    fetch_promoted(slot, reader)
    second, report2, _ = finished_run(client, tmp_path, "whole", "night-2", 0.98)
    pointer = promote_run(second, report2, Settings(), RecordingLog())
    client.put_object(Bucket=BUCKET, Key=pointer["files"]["report.json"]["key"], Body=b"{}")  # the model is fine
    with pytest.raises(StorageError, match="does not match the sha256"):
        fetch_promoted(slot, reader)
    assert (reader / "model.pt").read_bytes() == (folder / "vat" / "model.pt").read_bytes(), "not night-2's model"
    assert json.loads((reader / "report.json").read_text())["run_id"] == "night-1"
    assert json.loads((reader / "pointer.json").read_text())["run_id"] == "night-1"
    assert sorted(p.name for p in reader.iterdir()) == ["model.pt", "pointer.json", "report.json"]


def history_of(client, prefix):
    events, problems = history.read(client, BUCKET, f"{prefix}/latest/")
    assert problems == []
    return [(event.verdict, event.run_id) for event in events]


def test_eight_promotions_each_0_0049_lower_cannot_walk_from_0_985_to_0_951(client, tmp_path):
    """Issue 25: each step is within VAT_PROMOTE_MAX_REGRESSION of the model before it; without a drift bound all
    eight are promoted and the slot ends at 0.9507. With VAT_PROMOTE_MAX_DRIFT=0.01 the walk stops at 0.975."""
    steps = [round(0.985 - 0.0049 * k, 4) for k in range(8)]
    assert steps[0] == 0.985 and steps[-1] == 0.9507
    for prefix, max_drift in (("walk-unbounded", 1.0), ("walk-bounded", 0.01)):
        log, verdicts = RecordingLog(), []
        for k, accuracy in enumerate(steps):
            store, report, _ = finished_run(client, tmp_path / prefix, prefix, f"step-{k}", accuracy)
            try:
                promote_run(store, report, Settings(max_drift=max_drift), log)
                verdicts.append("promoted")
            except GateRefused as refused:
                verdicts.append(refused.verdict["reason"])
        pointer = PromotionSlot(client, BUCKET, prefix, "latest").current()
        if max_drift == 1.0:
            assert verdicts == ["promoted"] * 8 and pointer.accuracy == 0.9507, "the walk the issue describes"
            continue
        assert verdicts[:3] == ["promoted"] * 3 and pointer.run_id == "step-2" and pointer.accuracy == 0.9752
        assert "more than 0.0100 below 0.9850, the best of the last 3 promoted models" in verdicts[3]
        assert "promoted" not in verdicts[3:]
        assert [e["accuracy"] for e in pointer.model_dump()["recent"]] == [0.9752, 0.9801, 0.985]
        assert history_of(client, prefix) == [("promoted", f"step-{k}") for k in range(3)] + [
            ("refused", f"step-{k}") for k in range(3, 8)
        ]


def test_the_gate_judges_validation_accuracy_and_records_the_test_accuracy_beside_it(client, tmp_path):
    prefix, log = "validation", RecordingLog()
    store, report, _ = finished_run(client, tmp_path, prefix, "night-1", 0.97, test_accuracy=0.99)
    pointer = promote_run(store, report, Settings(), log)
    assert (pointer["metric"], pointer["accuracy"], pointer["test_accuracy"]) == (METRIC, 0.97, 0.99)
    assert METRIC == "vat.seeded_test.accuracy" and TEST_METRIC == "vat.mnist_test.accuracy"
    # A better test accuracy does not help a candidate whose validation accuracy is too low.
    worse, report2, _ = finished_run(client, tmp_path, prefix, "night-2", 0.96, test_accuracy=0.999)
    with pytest.raises(GateRefused) as refused:
        promote_run(worse, report2, Settings(), log)
    verdict = refused.value.verdict
    assert (verdict["metric"], verdict["candidate"], verdict["test_accuracy"]) == (METRIC, 0.96, 0.999)
    (event,) = [e for e in history.read(client, BUCKET, f"{prefix}/latest/")[0] if e.verdict == "refused"]
    assert (event.candidate, event.test_accuracy, event.promoted, event.promoted_run_id) == (
        0.96,
        0.999,
        0.97,
        "night-1",
    )


def old_pointer(client, prefix, run_id, test_accuracy, validation_accuracy, tmp_path):
    """A slot as a version before issue 25 left it: the pointer records the test set's accuracy."""
    store, report, _ = finished_run(client, tmp_path, prefix, run_id, validation_accuracy, test_accuracy)
    pointer = promote_run(store, report, Settings(), RecordingLog())
    old = {k: v for k, v in pointer.items() if k not in ("test_metric", "test_accuracy", "recent")}
    old.update(metric="vat.mnist_test.accuracy", accuracy=test_accuracy)
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/latest/pointer.json", Body=json.dumps(old).encode())
    return pointer


def test_a_pointer_that_recorded_the_test_accuracy_is_compared_on_its_reports_validation_accuracy(client, tmp_path):
    prefix, log = "old-pointer", RecordingLog()
    old_pointer(client, prefix, "old-1", test_accuracy=0.990, validation_accuracy=0.975, tmp_path=tmp_path)
    # 0.972 is more than 0.005 below the old pointer's 0.990 (test) but within 0.005 of its 0.975 (validation).
    store, report, _ = finished_run(client, tmp_path, prefix, "new-1", 0.972)
    pointer = promote_run(store, report, Settings(), log)
    assert pointer["previous"] == {"run_id": "old-1", "accuracy": 0.975}
    assert [e["run_id"] for e in pointer["recent"]] == ["new-1", "old-1"]
    converted = [fields for event, fields in log.records if event == "gate_metric_converted"]
    assert converted and "vat.mnist_test.accuracy" in converted[0]["message"]


def test_an_old_pointer_whose_report_cannot_be_read_refuses_promotion(client, tmp_path):
    prefix = "old-pointer-damaged"
    first = old_pointer(client, prefix, "old-1", test_accuracy=0.990, validation_accuracy=0.975, tmp_path=tmp_path)
    client.put_object(Bucket=BUCKET, Key=first["files"]["report.json"]["key"], Body=b'{"forged": 1}')
    store, report, _ = finished_run(client, tmp_path, prefix, "new-1", 0.99)
    with pytest.raises(GateRefused, match="does not match the sha256"):
        promote_run(store, report, Settings(), RecordingLog())
    assert PromotionSlot(client, BUCKET, prefix, "latest").current().run_id == "old-1"
    assert history_of(client, prefix)[-1] == ("refused", "new-1")


class Interleave:
    """A client that runs `meanwhile()` once, just before its first `method` call on `key`: another promotion
    slipped in between this one's steps, deterministically."""

    def __init__(self, client, method, key, meanwhile):
        self._client, self._method, self._key, self._meanwhile = client, method, key, meanwhile

    def __getattr__(self, name):
        real = getattr(self._client, name)
        if name != self._method:
            return real

        def call(**kwargs):
            if kwargs.get("Key") == self._key and self._meanwhile:
                meanwhile, self._meanwhile = self._meanwhile, None
                meanwhile()
            return real(**kwargs)

        return call


def race(client, tmp_path, prefix, method):
    """The slot holds `first` (0.985). B (0.981, within 0.005 of it) reads the pointer and passes; then A (0.990)
    is promoted; then B makes its `method` call on the pointer. Returns (B's outcome, B's log, A's pointer)."""
    key = f"{prefix}/latest/pointer.json"
    first, report, _ = finished_run(client, tmp_path, prefix, "first", 0.985)
    first.preflight()
    promote_run(first, report, Settings(), RecordingLog())
    a, a_report, _ = finished_run(client, tmp_path, prefix, "run-a", 0.990)
    a.preflight()
    b, b_report, _ = finished_run(client, tmp_path, prefix, "run-b", 0.981)
    b.preflight()
    promoted_a = {}
    b.client = Interleave(
        client, method, key, lambda: promoted_a.update(promote_run(a, a_report, Settings(), RecordingLog()))
    )
    b_log = RecordingLog()
    try:
        outcome = promote_run(b, b_report, Settings(), b_log)
    except GateRefused as refused:
        outcome = refused
    return outcome, b_log, promoted_a


def test_two_promotions_racing_on_moto_the_loser_is_judged_again_against_the_winner(client, tmp_path):
    outcome, log, a = race(client, tmp_path, "race-moto", "put_object")
    assert isinstance(outcome, GateRefused), "B's conditional write failed; judged again against A it is refused"
    assert outcome.verdict["promoted_run_id"] == "run-a" and "below the promoted model's 0.9900" in str(outcome)
    assert log.events().count("quality_gate") == 2 and "promotion_race_lost" in log.events()
    assert "promotion_not_atomic" not in log.events()
    pointer = PromotionSlot(client, BUCKET, "race-moto", "latest").current()
    assert pointer.run_id == "run-a" and pointer.previous.run_id == "first" and a["run_id"] == "run-a"
    assert history_of(client, "race-moto") == [("promoted", "first"), ("promoted", "run-a"), ("refused", "run-b")]


@pytest.fixture(scope="module")
def s3rver_client():
    import boto3

    with s3rver_on_loopback(BUCKET) as server, pytest.MonkeyPatch.context() as patch:
        for name, value in server["env"].items():
            patch.setenv(name, value)
        patch.setattr(boto3, "DEFAULT_SESSION", None)  # its credentials are cached: s3rver has its own
        yield make_client()
        patch.setattr(boto3, "DEFAULT_SESSION", None)


def test_on_s3rver_a_race_seen_before_the_write_is_judged_again(s3rver_client, tmp_path):
    """Without conditional writes the pointer's ETag is compared again just before the write (a HEAD): A's
    promotion before that check is seen, and B is judged again against A."""
    outcome, log, _ = race(s3rver_client, tmp_path, "race-s3rver-1", "head_object")
    assert isinstance(outcome, GateRefused) and outcome.verdict["promoted_run_id"] == "run-a"
    assert "promotion_not_atomic" in log.events() and "promotion_race_lost" in log.events()
    assert PromotionSlot(s3rver_client, BUCKET, "race-s3rver-1", "latest").current().run_id == "run-a"


def test_on_s3rver_a_race_after_the_last_check_is_lost_as_documented_and_the_history_shows_it(s3rver_client, tmp_path):
    """The documented fallback (docs/operations.md): between the last check and the write the server cannot
    refuse B's write, so B replaces A unseen; the warning said so, and the history has both promotions."""
    outcome, log, a = race(s3rver_client, tmp_path, "race-s3rver-2", "put_object")
    assert isinstance(outcome, dict) and outcome["run_id"] == "run-b" and a["run_id"] == "run-a"
    warning = dict(log.records)["promotion_not_atomic"]["message"]
    assert "ignores conditional writes" in warning and "replaced unseen" in warning
    pointer = PromotionSlot(s3rver_client, BUCKET, "race-s3rver-2", "latest").current()
    assert pointer.run_id == "run-b" and pointer.previous.run_id == "first", "B judged the pointer before A's"
    assert history_of(s3rver_client, "race-s3rver-2") == [
        ("promoted", "first"),
        ("promoted", "run-a"),
        ("promoted", "run-b"),
    ]
