"""`vat-job collect --trend`: one group's accuracy over time, as a table and a PNG (matplotlib, loaded here only)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

# The rows are collect's: one per run, metrics under "<model>.<test set>.<metric>"; the line each gets.
TREND = {"vat.mnist_test.accuracy": ("vat (mnist_test)", "o-"), "baseline.mnist_test.accuracy": ("baseline", "s--")}
VAT, BASELINE = TREND


def trend_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One group's finished runs, oldest first (created_at is ISO 8601 UTC), with the accuracies shown."""
    finished = [row for row in rows if row.get("created_at") and row.get(VAT) is not None]
    return sorted(finished, key=lambda row: row["created_at"])


def render_trend(group: str, rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    out.write(f"group {group}: {len(rows)} finished runs, oldest first\n")
    header = ["created_at", "run_id", "vat mnist acc", "change", "baseline mnist acc"]
    lines, previous = [], None
    for row in rows:
        vat, base = row[VAT], row.get(BASELINE)
        change = "" if previous is None else f"{vat - previous:+.4f}"
        lines.append([row["created_at"][:19], row["run_id"], f"{vat:.4f}", change, f"{base:.4f}" if base else "-"])
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
    ax.set(title=f"{group}: accuracy over time", xlabel="run created (UTC)", ylabel="accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.autofmt_xdate()
    atomic_write_bytes(path, lambda handle: fig.savefig(handle, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return path
