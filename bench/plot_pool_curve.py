"""Draw BENCHMARKS.md's accuracy-vs-unlabelled-pool curve from the sweep results (bench/results/h200_sweeps.jsonl).

usage: python bench/plot_pool_curve.py [RESULTS.jsonl] [OUT.png]
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
BASELINE_SEED1 = {"seeded_test_accuracy": 0.8914, "mnist_test_accuracy": 0.8931}  # bench_default.txt, same split


def main() -> None:
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results" / "h200_sweeps.jsonl"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else HERE / "results" / "unlabeled_pool_curve.png"
    rows = {r["name"]: r for r in map(json.loads, results.read_text().splitlines()) if "mnist_test_accuracy" in r}
    points = [
        (0, BASELINE_SEED1),
        (500, rows["xi1_unlabeled500"]),
        (5000, rows["xi1_unlabeled5000"]),
        (49_900, rows["xi1"]),
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("mnist_test_accuracy", "MNIST test"), ("seeded_test_accuracy", "seeded test")):
        ax.plot([max(n, 50) for n, _ in points], [p[key] for _, p in points], marker="o", label=label)
    ax.set(
        xscale="log",
        xlabel="unlabelled images (0 = baseline, drawn at 50)",
        ylabel="accuracy",
        title="VAT, 100 labels (label seed 1, xi=1, 3,000 updates)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out, dpi=100, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main()
