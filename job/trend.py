"""`vat-job collect --trend`: one group's accuracy over time, as a table and a PNG (matplotlib, loaded here only)."""

from __future__ import annotations

import io
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

# The rows are collect's: one per run, metrics under "<model>.<test set>.<metric>"; the line each gets.
TREND = {"vat.mnist_test.accuracy": ("vat (mnist_test)", "o-"), "baseline.mnist_test.accuracy": ("baseline", "s--")}
VAT, BASELINE = TREND


def trend_rows(
    rows: list[dict[str, Any]], configuration: Callable[[dict[str, Any]], dict[str, Any]]
) -> list[dict[str, Any]]:
    """One group's finished runs, oldest first (created_at is ISO 8601 UTC), with the accuracies shown. A run whose
    configuration differs from the run before gets `changed` ("train_steps 3000->6000"), so that a step in the
    accuracy that a new image's defaults made is not read as drift."""
    finished = sorted(
        (row for row in rows if row.get("created_at") and row.get(VAT) is not None), key=lambda row: row["created_at"]
    )
    for before, row in pairwise(finished):
        old, new = configuration(before), configuration(row)
        changed = [
            f"{k} {old.get(k)}->{new.get(k)}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)
        ]
        if changed:
            row["changed"] = ", ".join(changed)
    return finished


def render_trend(group: str, rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    out.write(f"group {group}: {len(rows)} finished runs, oldest first\n")
    header = ["created_at", "run_id", "vat mnist acc", "change", "baseline mnist acc", "settings changed"]
    lines, previous = [], None
    for row in rows:
        vat, base = row[VAT], row.get(BASELINE)
        change = "" if previous is None else f"{vat - previous:+.4f}"
        base_text = f"{base:.4f}" if base else "-"
        lines.append([row["created_at"][:19], row["run_id"], f"{vat:.4f}", change, base_text, row.get("changed", "")])
        previous = vat
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=False)]
    for cells in [header, *lines]:
        out.write("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip() + "\n")
    return out.getvalue()


def plot_trend(group: str, rows: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy on the MNIST test set of each run of the group, by the time it was made."""
    from datetime import datetime

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from job.layout import atomic_write_bytes

    times = [datetime.fromisoformat(row["created_at"]) for row in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, (label, style) in TREND.items():
        ax.plot(times, [row.get(name) for row in rows], style, label=label, linewidth=1, markersize=4)
    for when, row in zip(times, rows, strict=True):
        if "changed" in row:
            ax.axvline(when, color="grey", linestyle=":", linewidth=1)
            ax.annotate(row["changed"], (when, 0.02), xycoords=("data", "axes fraction"), rotation=90, fontsize=6)
    ax.set(title=f"{group}: accuracy over time", xlabel="run created (UTC)", ylabel="accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.autofmt_xdate()
    atomic_write_bytes(path, lambda handle: fig.savefig(handle, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return path
