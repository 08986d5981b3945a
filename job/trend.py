"""`vat-job collect --trend`: one group's accuracy over time, as a table and a PNG (matplotlib, loaded here only).

The main line is what the promotion gate judges, the VAT model's validation accuracy (seeded_test); the official
test set's (mnist_test) is shown beside it. Runs the gate promoted or refused are marked (from the promotion
slot's history, job/history.py), and the gate's line is drawn: its minimum and, where the history has it, the
drift floor (job/gate.py).
"""

from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Callable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

from job.untrusted import path_inside

# The rows are collect's: one per run, metrics under "<model>.<test set>.<metric>"; the line each gets.
TREND = {
    "vat.seeded_test.accuracy": ("vat (validation: gated)", "o-"),
    "vat.mnist_test.accuracy": ("vat (mnist_test: not gated)", "^:"),
    "baseline.seeded_test.accuracy": ("baseline (validation)", "s--"),
}
VAT, VAT_TEST, BASELINE = TREND


def trend_rows(
    rows: list[dict[str, Any]],
    configuration: Callable[[dict[str, Any]], dict[str, Any]],
    verdicts: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One group's finished runs, oldest first (created_at is ISO 8601 UTC), with the accuracies shown. A run whose
    configuration differs from the run before gets `changed` ("train_steps 3000->6000"), so that a step in the
    accuracy that a new image's defaults made is not read as drift. `verdicts` (run id -> its last history entry)
    give a run `gate` (promoted, refused), `gate_minimum` and `drift_floor`; a gated run without one still gets
    its report's minimum."""
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
    for row in finished:
        event = (verdicts or {}).get(row["run_id"])
        settings = row.get("settings", {})
        minimum = settings.get("promote_min_accuracy") if settings.get("promote_to") else None
        if event is not None:
            row.update(gate=event.verdict, gate_minimum=event.min_accuracy, drift_floor=event.drift_floor)
        elif type(minimum) in (int, float) and 0 <= minimum <= 1:  # a report's word: used only if a fraction
            row["gate_minimum"] = float(minimum)
    return finished


def gate_line(row: dict[str, Any]) -> float | None:
    lines = [row[k] for k in ("gate_minimum", "drift_floor") if row.get(k) is not None]
    return max(lines) if lines else None


def render_trend(group: str, rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    out.write(f"group {group}: {len(rows)} finished runs, oldest first; the gate judges vat val acc\n")
    header = ["created_at", "run_id", "vat val acc", "change", "vat test acc", "base val acc", "gate", "gate line"]
    header.append("settings changed")
    lines, previous = [], None
    for row in rows:
        vat = row[VAT]
        change = "-" if previous is None else f"{vat - previous:+.4f}"
        line = gate_line(row)
        lines.append(
            [
                row["created_at"][:19],
                row["run_id"],
                f"{vat:.4f}",
                change,
                *(f"{row[k]:.4f}" if row.get(k) is not None else "-" for k in (VAT_TEST, BASELINE)),
                row.get("gate", "-"),
                f"{line:.4f}" if line is not None else "-",
                row.get("changed", ""),
            ]
        )
        previous = vat
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=False)]
    for cells in [header, *lines]:
        out.write("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip() + "\n")
    return out.getvalue()


def plot_trend(group: str, rows: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy of each run of the group by the time it was made, the gate's verdicts and its line."""
    from datetime import datetime

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from job.layout import atomic_write_bytes

    def values(key: str) -> list[float]:
        return [math.nan if row.get(key) is None else row[key] for row in rows]

    times = [datetime.fromisoformat(row["created_at"]) for row in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, (label, style) in TREND.items():
        ax.plot(times, values(name), style, label=label, linewidth=1, markersize=4)
    for key, label, style in (("gate_minimum", "gate minimum", "r-"), ("drift_floor", "drift floor", "C1--")):
        if any(row.get(key) is not None for row in rows):
            ax.plot(times, values(key), style, label=label, linewidth=1, drawstyle="steps-post")
    for verdict, marker, color in (("promoted", "o", "purple"), ("refused", "x", "red")):
        marked = [(when, row[VAT]) for when, row in zip(times, rows, strict=True) if row.get("gate") == verdict]
        if marked:
            ax.scatter(*zip(*marked, strict=True), s=80, marker=marker, label=verdict, zorder=3, **_face(marker, color))
    for when, row in zip(times, rows, strict=True):
        if "changed" in row:
            ax.axvline(when, color="grey", linestyle=":", linewidth=1)
            ax.annotate(row["changed"], (when, 0.02), xycoords=("data", "axes fraction"), rotation=90, fontsize=6)
    ax.set(title=f"{group}: accuracy over time", xlabel="run created (UTC)", ylabel="accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.autofmt_xdate()
    atomic_write_bytes(path, lambda handle: fig.savefig(handle, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return path


def _face(marker: str, color: str) -> dict[str, Any]:
    """A ring around the point for "o" (the point stays visible), a plain cross for "x"."""
    return {"facecolors": "none", "edgecolors": color} if marker == "o" else {"color": color}


def show(
    rows: list[dict[str, Any]],
    configuration: Callable[[dict[str, Any]], dict[str, Any]],
    verdicts: Mapping[str, Any],
    fmt: str,
    plot: Path | None,
    emit: Callable[..., None],
) -> int:
    """collect --trend: the table (or JSON) on stdout, the PNG to `plot` (default trend-<group>.png here)."""
    names = sorted({row["group"] for row in rows if "group" in row})
    if len(names) != 1:
        emit(f"vat-job collect: --trend needs --group (groups here: {', '.join(names) or 'none'})", file=sys.stderr)
        return 2
    trend = trend_rows(rows, configuration, verdicts)
    if fmt == "json":
        emit(json.dumps({"group": names[0], "runs": trend}, indent=2))
    else:
        emit(render_trend(names[0], trend), end="")
    if trend:
        # The group is a validated name (job.untrusted.Report), and the default file stays in this folder.
        path = plot or path_inside(Path.cwd(), f"trend-{names[0]}.png")
        if path is None:
            emit(f"vat-job collect: group {names[0]!r} cannot name a file; pass --plot", file=sys.stderr)
            return 2
        plot_trend(names[0], trend, path)
        emit(f"plot: {path}", file=sys.stderr)
    return 0
