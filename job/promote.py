"""Promotion of a finished run's VAT model behind a quality gate, for the people who use the nightly's output.

    s3://<bucket>/<prefix>/<VAT_PROMOTE_TO>/
      pointer.json                     names the promoted run and its files (written last, compare-and-swap)
      runs/<run_id>/model.pt           copies of each promoted run's VAT model and report, never overwritten
      runs/<run_id>/report.json
      history/<time>-<verdict>-<run_id>.json    every promotion and every refusal (job/history.py)

A reader gets pointer.json, then the two keys it names, and checks their sha256 against it. Writing the copies
first and the pointer last (a single PUT, which S3 makes visible whole) means a reader sees either the old
promotion or the new one, never a model of one run with the report of another. Old copies stay, so a reader
that fetched the previous pointer a moment ago still finds its files.

The gate (job/gate.py) judges validation accuracy and records the test accuracy beside it. A refused run stays
in the bucket under runs/ and `GateRefused` is raised (cli.py maps it to its own exit code).

The pointer is replaced only if it is still the one that was judged: a conditional write, If-Match on the ETag
read with it (If-None-Match: * when there was none), as job/lock.py does. A promotion that loses a race reads the
new pointer and is judged again against it, up to ATTEMPTS times. On a server that ignores conditional writes
(found at preflight) the pointer's ETag is compared once more just before the write, which narrows the window to
a round trip but cannot close it: the promotion goes on with a warning (`promotion_not_atomic`), and the history
keeps every verdict; VAT_S3_CONDITIONAL_WRITES=require refuses such a server before training (run.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from job import history
from job.gate import METRIC, TEST_METRIC, Gate, accuracies
from job.layout import REPORT, sha256_of, write_json
from job.storage import STORAGE_ERRORS, RunStore, StorageError, describe_error, http_status
from job.untrusted import MAX_DOCUMENT_BYTES, Pointer, Report, Untrusted, parse, path_inside

POINTER = "pointer.json"
MODEL_FILE = "vat/model.pt"  # in the run folder
ATTEMPTS = 5  # judgements of one run: a lost race reads the new pointer and judges again
LOST_RACE = (404, 409, 412)  # the pointer changed (412, 409) or was deleted (404) since it was read


class GateRefused(Exception):
    """The run is complete and kept, but its model did not pass the quality gate and was not promoted."""

    def __init__(self, message: str, verdict: dict[str, Any]):
        super().__init__(message)
        self.verdict = verdict


class LostRace(Exception):
    """Another promotion wrote the pointer between this one's read and its write."""


@dataclass(frozen=True)
class PromotionSlot:
    """The stable location in the bucket, s3://<bucket>/<prefix>/<name>/."""

    client: Any
    bucket: str
    prefix: str
    name: str

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.name}/" if self.prefix else f"{self.name}/"

    @property
    def pointer_key(self) -> str:
        return self.root + POINTER

    def _call(self, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError) as error:
            raise StorageError(describe_error(error, self.bucket)) from None

    def read(self) -> tuple[Pointer | None, str | None]:
        """The pointer of the promoted model and its ETag, or (None, None) when nothing was promoted yet; a pointer
        that fails its schema (job.untrusted.Pointer) raises Untrusted."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.pointer_key)
            body = response["Body"].read(MAX_DOCUMENT_BYTES + 1)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise StorageError(describe_error(error, self.bucket)) from None
        except BotoCoreError as error:
            raise StorageError(describe_error(error, self.bucket)) from None
        pointer = parse(body, Pointer, f"s3://{self.bucket}/{self.pointer_key}")
        for name, entry in pointer.files.named().items():
            if not entry.key.startswith(self.root + "runs/") or ".." in entry.key.split("/"):
                raise Untrusted(f"s3://{self.bucket}/{self.pointer_key}: files.{name}: names a key outside the slot")
        return pointer, response.get("ETag")

    def current(self) -> Pointer | None:
        return self.read()[0]

    def validation_accuracy(self, pointer: Pointer) -> float:
        """The validation accuracy of a promoted model whose pointer recorded another metric (before issue 25: the
        test set's), from the copy of its report: checked against the pointer's size and sha256 and read through
        the Report schema. Raises Untrusted when it cannot be read."""
        entry, where = pointer.files.report, f"s3://{self.bucket}/{pointer.files.report.key}"
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=entry.key)["Body"].read(MAX_DOCUMENT_BYTES + 1)
        except STORAGE_ERRORS as error:
            if http_status(error) != 404:
                raise StorageError(describe_error(error, self.bucket)) from None
            raise Untrusted(f"{where}, the promoted run's report, is missing") from None
        if len(body) != entry.size or hashlib.sha256(body).hexdigest() != entry.sha256:
            raise Untrusted(f"{where} does not match the sha256 (or the size) in {self.pointer_key}")
        return parse(body, Report, where).models.vat.seeded_test.accuracy

    def copy_files(self, store: RunStore) -> dict[str, Any]:
        """Copy the run's model and report under runs/<run_id>/ (server side) and check them."""
        files = {}
        for name, relative in (("model.pt", MODEL_FILE), ("report.json", REPORT)):
            size, sha256 = store.stored(relative)
            key = f"{self.root}runs/{store.run_id}/{name}"
            self._call(
                self.client.copy_object,
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": store.key(relative)},
                MetadataDirective="COPY",
            )
            head = self._call(self.client.head_object, Bucket=self.bucket, Key=key)
            if head["ContentLength"] != size or head.get("Metadata", {}).get("sha256") != sha256:
                raise StorageError(f"the copy of {relative} to {key} did not arrive intact (size or sha256 differs)")
            files[name] = {"key": key, "size": size, "sha256": sha256}
        return files

    def write_pointer(self, pointer: dict[str, Any], etag: str | None, check_first: bool) -> None:
        """Replace pointer.json only if it is still the one read with `etag` (create it only if there was none);
        raise LostRace when it is not. `check_first`, for a server that ignores the condition: compare the ETag
        with a HEAD just before the write."""
        if check_first:
            try:
                now = self.client.head_object(Bucket=self.bucket, Key=self.pointer_key)["ETag"]
            except STORAGE_ERRORS as error:
                if http_status(error) != 404:
                    raise StorageError(describe_error(error, self.bucket)) from None
                now = None
            if now != etag:
                raise LostRace
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self.pointer_key,
                Body=(json.dumps(pointer, indent=2) + "\n").encode(),
                ContentType="application/json",
                CacheControl="no-cache",
                **condition,
            )
        except STORAGE_ERRORS as error:
            if http_status(error) in LOST_RACE:
                raise LostRace from None
            raise StorageError(describe_error(error, self.bucket)) from None


def comparable(slot: PromotionSlot, current: Pointer | None, log: Any) -> tuple[float | None, list[dict[str, Any]]]:
    """The promoted model's validation accuracy, and the drift window (run id and accuracy, newest first)."""
    if current is None:
        return None, []
    if current.metric == METRIC:
        older = [entry.model_dump() for entry in current.recent if entry.run_id != current.run_id]
        return current.accuracy, [{"run_id": current.run_id, "accuracy": current.accuracy}, *older]
    accuracy = slot.validation_accuracy(current)
    log.warning(
        "gate_metric_converted",
        promoted_run_id=current.run_id,
        message=f"the promoted model was judged on {current.metric}; it is compared on {METRIC} ({accuracy:.4f}, "
        "from its report), and the drift window starts again with it",
    )
    return accuracy, [{"run_id": current.run_id, "accuracy": accuracy}]


def record(slot: PromotionSlot, store: RunStore, group: Any, verdict: dict[str, Any], log: Any) -> None:
    """Add a verdict to the slot's history; one that cannot be written is a warning, never another verdict."""
    name = "promoted" if verdict["passed"] else "refused"
    event = {"verdict": name, "run_id": store.run_id, "group": group, "at": datetime.now(UTC).isoformat(), **verdict}
    try:
        history.append(slot.client, slot.bucket, slot.root, event)
    except StorageError as error:
        log.warning("promotion_history_not_written", verdict=name, error=str(error))


def promote_run(store: RunStore, report: dict[str, Any], settings: Any, log: Any) -> dict[str, Any]:
    """Gate a finished, uploaded run and promote it; raise GateRefused when it does not pass. Every verdict goes
    to the slot's history."""
    slot = PromotionSlot(store.client, store.bucket, store.prefix, settings.promote_to)
    gate = Gate(
        settings.promote_min_accuracy,
        settings.promote_max_regression,
        settings.promote_max_drift,
        settings.promote_drift_window,
    )
    candidate, test = accuracies(report)
    group = report.get("settings", {}).get("run_group")
    atomic = store.conditional_writes is not False  # None (not probed): the server's answers decide
    if not atomic:
        log.warning(
            "promotion_not_atomic",
            message="the S3 server ignores conditional writes: a promotion that writes between this one's last "
            "check of pointer.json and its write is replaced unseen (the history keeps both verdicts)",
        )
    files, verdict = None, None
    for attempt in range(1, ATTEMPTS + 1):
        base = {"metric": METRIC, "candidate": candidate, "test_metric": TEST_METRIC, "test_accuracy": test}
        try:
            current, etag = slot.read()
            promoted, recent = comparable(slot, current, log)
        except Untrusted as error:
            # The gate cannot compare with a model it cannot read; overwriting the pointer would hide the damage.
            why = f"{error}; restore the pointer (bucket versioning) or delete it, then run again"
            refused = {**base, "min_accuracy": gate.min_accuracy, "passed": False, "reason": why}
            record(slot, store, group, refused, log)
            raise GateRefused(f"not promoted: {why}", refused) from None
        if current and current.run_id == store.run_id:
            if verdict is not None:  # our own write, answered as a lost race (a retried PUT): recorded now
                record(slot, store, group, verdict, log)
            log.info("already_promoted", run_id=store.run_id, pointer=slot.pointer_key)  # or a retried pod
            return current.model_dump(by_alias=True)
        passed, why = gate.judge(candidate, promoted, [entry["accuracy"] for entry in recent])
        verdict = {
            **base,
            "promoted": promoted,
            "promoted_run_id": current.run_id if current else None,
            "min_accuracy": gate.min_accuracy,
            "max_regression": gate.max_regression,
            "max_drift": gate.max_drift,
            "drift_window": gate.drift_window,
            "drift_floor": gate.floor([entry["accuracy"] for entry in recent]),
            "passed": passed,
            "reason": why,
        }
        log.info("quality_gate", attempt=attempt, **verdict)
        if not passed:
            record(slot, store, group, verdict, log)
            raise GateRefused(f"not promoted: {why}", verdict)
        files = files or slot.copy_files(store)
        pointer = {
            "run_id": store.run_id,
            "group": group,
            "created_at": report.get("created_at"),
            "promoted_at": datetime.now(UTC).isoformat(),
            "metric": METRIC,
            "accuracy": candidate,
            "test_metric": TEST_METRIC,
            "test_accuracy": test,
            "files": files,
            "previous": {"run_id": current.run_id, "accuracy": promoted} if current else None,
            "recent": [{"run_id": store.run_id, "accuracy": candidate}, *recent][: gate.drift_window],
        }
        try:
            slot.write_pointer(pointer, etag, check_first=not atomic)
        except LostRace:
            log.warning(
                "promotion_race_lost",
                attempt=attempt,
                message="another promotion wrote pointer.json after it was read: judging again against it",
            )
            continue
        record(slot, store, group, verdict, log)
        log.info("promoted", pointer=f"s3://{slot.bucket}/{slot.pointer_key}", accuracy=candidate, files=files)
        return pointer
    raise StorageError(
        f"s3://{slot.bucket}/{slot.pointer_key} changed under each of {ATTEMPTS} attempts to promote run "
        f"{store.run_id}; run it again (with the same VAT_RUN_ID)"
    )


def fetch_promoted(slot: PromotionSlot, destination: Path) -> Pointer:
    """The reader's side: the pointer (through its schema), then the two files it names, each checked against its
    sha256 and size.

    Writes destination/model.pt, destination/report.json and destination/pointer.json; raises StorageError
    when nothing is promoted or a file does not match its pointer, Untrusted when the pointer fails its schema.
    """
    pointer = slot.current()
    if pointer is None:
        raise StorageError(f"nothing promoted under s3://{slot.bucket}/{slot.root}")
    destination.mkdir(parents=True, exist_ok=True)
    targets = {name: path_inside(destination, name) for name in (*pointer.files.named(), POINTER)}
    if None in targets.values():  # the names are the schema's own; a symbolic link in DIR could still point away
        raise StorageError(f"{destination} holds a link that leads outside it; use an empty folder")
    # Every file is fetched and checked before any is put in place: a failure leaves DIR as it was (an earlier
    # promotion stays whole there), never the new model beside the old report.
    partials = {name: destination / f".{name}.part" for name in pointer.files.named()}
    try:
        for name, entry in pointer.files.named().items():
            slot._call(slot.client.download_file, Bucket=slot.bucket, Key=entry.key, Filename=str(partials[name]))
            if partials[name].stat().st_size != entry.size or sha256_of(partials[name]) != entry.sha256:
                raise StorageError(f"{entry.key} does not match the sha256 (or the size) in {slot.pointer_key}")
    except BaseException:
        for partial in partials.values():
            partial.unlink(missing_ok=True)
        raise
    for name, partial in partials.items():
        partial.replace(targets[name])
    write_json(targets[POINTER], pointer.model_dump(mode="json", by_alias=True))
    return pointer
