"""Promotion of a finished run's VAT model behind a quality gate, for the people who use the nightly's output.

    s3://<bucket>/<prefix>/<VAT_PROMOTE_TO>/
      pointer.json                     names the promoted run and its files (one PUT, written last)
      runs/<run_id>/model.pt           copies of each promoted run's VAT model and report, never overwritten
      runs/<run_id>/report.json

A reader gets pointer.json, then the two keys it names, and checks their sha256 against it. Writing the copies
first and the pointer last (a single PUT, which S3 makes visible whole) means a reader sees either the old
promotion or the new one, never a model of one run with the report of another. Old copies stay, so a reader
that fetched the previous pointer a moment ago still finds its files.

The gate: the candidate's VAT accuracy on the MNIST test set must be at least VAT_PROMOTE_MIN_ACCURACY, and not
more than VAT_PROMOTE_MAX_REGRESSION below the promoted model's. A refused run stays in the bucket under runs/
and `GateRefused` is raised (cli.py maps it to its own exit code). Two runs promoting at the same instant: the
last pointer written wins; the nightly CronJob's `concurrencyPolicy: Forbid` keeps that from happening.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from job.layout import REPORT, sha256_of, write_json
from job.storage import RunStore, StorageError, describe_error
from job.untrusted import MAX_DOCUMENT_BYTES, Pointer, Untrusted, parse, path_inside

POINTER = "pointer.json"
MODEL_FILE = "vat/model.pt"  # in the run folder
METRIC = "vat.mnist_test.accuracy"


class GateRefused(Exception):
    """The run is complete and kept, but its model did not pass the quality gate and was not promoted."""

    def __init__(self, message: str, verdict: dict[str, Any]):
        super().__init__(message)
        self.verdict = verdict


@dataclass(frozen=True)
class Gate:
    min_accuracy: float
    max_regression: float

    def judge(self, candidate: float, promoted: float | None) -> tuple[bool, str]:
        """(passed, why) for a candidate accuracy against the promoted model's (None: nothing promoted yet)."""
        if candidate < self.min_accuracy:
            return False, f"accuracy {candidate:.4f} is below the minimum {self.min_accuracy:.4f}"
        if promoted is not None and candidate < promoted - self.max_regression:
            return False, (
                f"accuracy {candidate:.4f} is more than {self.max_regression:.4f} below the promoted model's "
                f"{promoted:.4f}"
            )
        if promoted is None:
            return True, f"accuracy {candidate:.4f} >= {self.min_accuracy:.4f}; nothing promoted yet"
        return True, f"accuracy {candidate:.4f} is within {self.max_regression} of the promoted {promoted:.4f}"


def candidate_accuracy(report: dict[str, Any]) -> float:
    return float(report["models"]["vat"]["mnist_test"]["accuracy"])


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

    def current(self) -> Pointer | None:
        """The pointer of the promoted model, or None when nothing was promoted yet; a pointer that fails its schema
        (job.untrusted.Pointer) raises Untrusted."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.pointer_key)
            body = response["Body"].read(MAX_DOCUMENT_BYTES + 1)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise StorageError(describe_error(error, self.bucket)) from None
        except BotoCoreError as error:
            raise StorageError(describe_error(error, self.bucket)) from None
        pointer = parse(body, Pointer, f"s3://{self.bucket}/{self.pointer_key}")
        for name, entry in pointer.files.named().items():
            if not entry.key.startswith(self.root + "runs/") or ".." in entry.key.split("/"):
                raise Untrusted(f"s3://{self.bucket}/{self.pointer_key}: files.{name}: names a key outside the slot")
        return pointer

    def promote(self, store: RunStore, report: dict[str, Any], previous: Pointer | None) -> dict[str, Any]:
        """Copy the run's model and report under runs/<run_id>/ (server side), check them, then write the pointer."""
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
        pointer = {
            "run_id": store.run_id,
            "group": report.get("settings", {}).get("run_group"),
            "created_at": report.get("created_at"),
            "promoted_at": datetime.now(UTC).isoformat(),
            "metric": METRIC,
            "accuracy": candidate_accuracy(report),
            "files": files,
            "previous": {"run_id": previous.run_id, "accuracy": previous.accuracy} if previous else None,
        }
        body = (json.dumps(pointer, indent=2) + "\n").encode()
        self._call(
            self.client.put_object,
            Bucket=self.bucket,
            Key=self.pointer_key,
            Body=body,
            ContentType="application/json",
            CacheControl="no-cache",
        )
        return pointer


def promote_run(store: RunStore, report: dict[str, Any], settings: Any, log: Any) -> dict[str, Any]:
    """Gate a finished, uploaded run and promote it; raise GateRefused when it does not pass."""
    slot = PromotionSlot(store.client, store.bucket, store.prefix, settings.promote_to)
    gate = Gate(settings.promote_min_accuracy, settings.promote_max_regression)
    candidate = candidate_accuracy(report)
    try:
        current = slot.current()
    except Untrusted as error:
        # The gate cannot compare with a model it cannot read; overwriting the pointer would hide the damage.
        why = f"{error}; restore the pointer (bucket versioning) or delete it, then run again"
        raise GateRefused(
            f"not promoted: {why}", {"metric": METRIC, "candidate": candidate, "passed": False, "reason": why}
        ) from None
    if current and current.run_id == store.run_id:
        log.info("already_promoted", run_id=store.run_id, pointer=slot.pointer_key)  # a retried pod after promotion
        return current.model_dump(by_alias=True)
    promoted_accuracy = current.accuracy if current else None
    passed, why = gate.judge(candidate, promoted_accuracy)
    verdict = {
        "metric": METRIC,
        "candidate": candidate,
        "promoted": promoted_accuracy,
        "promoted_run_id": current.run_id if current else None,
        "min_accuracy": gate.min_accuracy,
        "max_regression": gate.max_regression,
        "passed": passed,
        "reason": why,
    }
    log.info("quality_gate", **verdict)
    if not passed:
        raise GateRefused(f"not promoted: {why}", verdict)
    pointer = slot.promote(store, report, current)
    log.info("promoted", pointer=f"s3://{slot.bucket}/{slot.pointer_key}", accuracy=candidate, files=pointer["files"])
    return pointer


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
