"""`vat-job collect`'s listings for people (a table with each group's mean and spread) and for tools (CSV)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

METRICS = [
    (m, t, k) for m in ("baseline", "vat") for t in ("seeded_test", "mnist_test") for k in ("accuracy", "macro_f1")
]
# Settings that name a run rather than describe it: never shown as "settings that differ".
IDENTITY = {"run_id", "run_group", "job_name", "job_uid"}


def metric_name(model: str, test_set: str, metric: str) -> str:
    return f"{model}.{test_set}.{metric}"


def differing_settings(rows: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for row in rows for k in row.get("settings", {})} - IDENTITY)
    return [k for k in keys if len({json.dumps(row.get("settings", {}).get(k)) for row in rows}) > 1]


def render_table(rows: list[dict[str, Any]], groups: list[dict[str, Any]]) -> str:
    differing = differing_settings(rows)
    header = [
        "run_id",
        "created_at",
        "status",
        "group",
        *differing,
        "base seeded acc/F1",
        "base mnist acc/F1",
        "vat seeded acc/F1",
        "vat mnist acc/F1",
    ]
    lines = []
    for row in rows:
        cells = [row["run_id"], (row.get("created_at") or "")[:19], row["status"], row.get("group", "")]
        cells += [str(row.get("settings", {}).get(k, "")) for k in differing]
        for model in ("baseline", "vat"):
            for test_set in ("seeded_test", "mnist_test"):
                acc, f1 = (row.get(metric_name(model, test_set, m)) for m in ("accuracy", "macro_f1"))
                cells.append(f"{acc:.4f}/{f1:.4f}" if acc is not None else "-")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=False)]
    out = io.StringIO()
    for cells in [header, *lines]:
        out.write("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip() + "\n")
    for group in groups:
        if group["runs"] < 2:
            continue
        out.write(
            f"\n{group['runs']} runs of group {group['group']}, one configuration "
            f"(label seeds {group['label_split_seeds']}): mean ± std\n"
        )
        for model, test_set, metric in METRICS:
            stat = group[metric_name(model, test_set, metric)]
            if stat["mean"] is not None:
                out.write(f"  {metric_name(model, test_set, metric):32s} {stat['mean']:.4f} ± {stat['std']:.4f}\n")
    return out.getvalue()


def render_csv(rows: list[dict[str, Any]]) -> str:
    differing = differing_settings(rows)
    columns = ["run_id", "created_at", "status", "group", *differing, *(metric_name(*m) for m in METRICS)]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**{k: row.get("settings", {}).get(k) for k in differing}, **row})
    return out.getvalue()
