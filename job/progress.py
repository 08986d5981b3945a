"""What a person watching the job sees: progress lines that lead with phase, step/of and percent, the whole job's
remaining time, and only the losses the phase trains (with consistency, also the share of targets it keeps); and
the summary a run ends with (job.report writes the same numbers into report.json and summary.md)."""

from __future__ import annotations

from typing import Any

from job.layout import PHASES

# A VAT update passes the unlabelled batch three times (clean, power iteration, perturbed) beside the labelled one:
# measured on the 2-core CPU at 512 + 100 images, 6.4 baseline updates' time (BENCHMARKS.md). Before VAT has run,
# its time is estimated from the baseline's rate with this; after, it is measured. The consistency term's strong
# pass (forward and backward of the strongly augmented batch, and drawing its transforms) made a VAT update 1.43
# times as long on the same CPU (BENCHMARKS.md, issue 26's cost table).
UNLABELED_COST = 1.07
CONSISTENCY_COST = 1.43


def clock(seconds: float) -> str:
    """h:mm:ss."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """The loop's `on_progress` hook (job.train.Hooks): one `progress` line per VAT_LOG_EVERY_S."""

    def __init__(self, settings: Any, log: Any) -> None:
        self.log = log
        self.steps = {"baseline": settings.baseline_steps, "vat": settings.train_steps}
        vat_terms = [("lds", settings.vat_weight), ("entropy", settings.entmin_weight + settings.balance_weight)]
        vat_terms += [("consistency", settings.consistency_weight), ("confident", settings.consistency_weight)]
        self.terms = {"baseline": ["cross_entropy"], "vat": ["cross_entropy", *(t for t, w in vat_terms if w > 0)]}
        self.vat_cost = 1 + UNLABELED_COST * settings.unlabeled_batch_size / settings.labeled_batch_size
        if settings.consistency_weight > 0:
            self.vat_cost *= CONSISTENCY_COST

    def job_seconds_left(self, phase: str, done: int, total: int, rate: float) -> float:
        left = (total - done) / rate
        if phase == "baseline":  # VAT is still to come
            left += self.steps["vat"] / (rate / self.vat_cost)
        return left

    def __call__(self, phase: str, done: int, total: int, rate: float, lr: float, losses: dict[str, float]) -> None:
        left = self.job_seconds_left(phase, done, total, rate)
        self.log.info(
            "progress",
            phase=phase,
            step=done,
            of=total,
            percent=round(100 * done / total, 1),
            job_eta=clock(left) + ("~" if phase == "baseline" else ""),  # ~: VAT's time estimated, not yet measured
            job_eta_s=round(left, 1),
            steps_per_s=round(rate, 2),
            lr=float(f"{lr:.3g}"),
            **{name: round(losses[name], 4) for name in self.terms[phase]},
        )


def summary_table(report: dict[str, Any], where: str) -> str:
    """The lines a run ends with: both models on both test sets, the time, and where the files are."""
    models = report["models"]
    lines = [
        "",
        f"run {report['run_id']} finished in {clock(report['timings_s']['total'])}",
        f"{'model':10} {'validation acc':>15} {'F1':>7} {'MNIST test acc':>15} {'F1':>7} {'train time':>11}",
    ]
    for phase in PHASES:
        seeded, test = models[phase]["seeded_test"], models[phase]["mnist_test"]
        lines.append(
            f"{phase:10} {seeded['accuracy']:>15.4f} {seeded['macro_f1']:>7.4f} {test['accuracy']:>15.4f} "
            f"{test['macro_f1']:>7.4f} {clock(models[phase]['train_seconds']):>11}"
        )
    lines.append(f"files: {where}")
    return "\n".join(lines) + "\n"
