"""A promotion slot's history: one object per verdict of the quality gate, a promotion or a refusal.

    s3://<bucket>/<prefix>/<VAT_PROMOTE_TO>/history/<UTC time>-<verdict>-<run_id>.json

Each verdict is a new object of its own, never rewritten: no read-modify-write, so two runs judged at the same
moment cannot lose each other's entry, on a server without conditional writes too. Read back (`vat-job collect
--promoted-history`, the marks of `collect --trend`), every document passes the `HistoryEvent` schema
(job.untrusted); one that does not is named and left out, and the others are listed.
"""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime
from typing import Any

from job.runid import RUN_ID_PATTERN
from job.storage import STORAGE_ERRORS, StorageError, describe_error
from job.untrusted import MAX_DOCUMENT_BYTES, HistoryEvent, Untrusted, parse

FOLDER = "history/"
MAX_EVENTS = 1000  # read back, the newest: three years of nightlies, one small GET each
KEY = re.compile(rf"\d{{8}}T\d{{12}}Z-(?:promoted|refused)-{RUN_ID_PATTERN.pattern}\.json")


def append(client: Any, bucket: str, slot_root: str, event: dict[str, Any]) -> str:
    """Store one verdict (`event`: a HistoryEvent's fields, and more) under a key of its own; return the key."""
    at = datetime.fromisoformat(event["at"]).astimezone(UTC)
    key = f"{slot_root}{FOLDER}{at:%Y%m%dT%H%M%S%f}Z-{event['verdict']}-{event['run_id']}.json"
    body = (json.dumps(event, indent=2) + "\n").encode()
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")
    except STORAGE_ERRORS as error:
        raise StorageError(describe_error(error, bucket)) from None
    return key


def read(client: Any, bucket: str, slot_root: str, limit: int = MAX_EVENTS) -> tuple[list[HistoryEvent], list[str]]:
    """The slot's verdicts, oldest first, and one line for each object under history/ that is not one."""
    root = slot_root + FOLDER
    try:
        pages = list(client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=root))
    except STORAGE_ERRORS as error:
        raise StorageError(describe_error(error, bucket)) from None
    keys = [item["Key"] for page in pages for item in page.get("Contents", []) if item["Key"] != root]
    named = sorted(key for key in keys if KEY.fullmatch(key[len(root) :]))
    problems = []
    if len(named) < len(keys):  # their names are not printed: a key may hold anything, terminal escapes too
        problems.append(f"{len(keys) - len(named)} object(s) under s3://{bucket}/{root} are not history entries")
    if len(named) > limit:
        problems.append(f"only the newest {limit} of {len(named)} history entries are read")
        named = named[-limit:]
    events = []
    for key in named:
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            body = response["Body"].read(MAX_DOCUMENT_BYTES + 1)
            events.append(parse(body, HistoryEvent, f"s3://{bucket}/{key}"))
        except Untrusted as error:
            problems.append(f"{error} (left out)")
        except STORAGE_ERRORS as error:
            raise StorageError(describe_error(error, bucket)) from None
    return sorted(events, key=lambda event: event.at), problems


def latest_per_run(events: list[HistoryEvent]) -> dict[str, HistoryEvent]:
    """run id -> its last verdict (a run refused, then promoted when run again, is promoted)."""
    return {event.run_id: event for event in events}


def gate_line(event: HistoryEvent) -> float | None:
    """The lowest accuracy the gate let through at that verdict: the minimum, or the drift floor if higher."""
    lines = [line for line in (event.min_accuracy, event.drift_floor) if line is not None]
    return max(lines) if lines else None


def render(events: list[HistoryEvent], fmt: str) -> str:
    rows = [event.model_dump(mode="json") for event in events]
    if fmt == "json":
        return json.dumps({"history": rows}, indent=2) + "\n"
    out = io.StringIO()
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(HistoryEvent.model_fields))
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    header = ["at", "verdict", "run_id", "group", "val acc", "test acc", "judged against", "gate line", "reason"]
    lines = []
    for event in events:
        against = f"{event.promoted_run_id} ({event.promoted:.4f})" if event.promoted is not None else "-"
        line = gate_line(event)
        lines.append(
            [
                event.at.astimezone(UTC).isoformat()[:19],
                event.verdict,
                event.run_id,
                event.group or "-",
                f"{event.candidate:.4f}",
                f"{event.test_accuracy:.4f}" if event.test_accuracy is not None else "-",
                against,
                f"{line:.4f}" if line is not None else "-",
                event.reason,  # one line without control characters (the schema's)
            ]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=False)]
    for cells in [header, *lines]:
        out.write("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip() + "\n")
    return out.getvalue()
