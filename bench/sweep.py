"""Accuracy experiments: train VAT (or the baseline) under several settings and write one JSON line each.

usage: python bench/sweep.py --plan PLAN.json --out RESULTS.jsonl [--data-dir DIR] [--deadline-s S]
                             [--worker I --workers N]

PLAN.json is a list of {"name": ..., "phase": "vat"|"baseline", "settings": {field: value}}; what an entry does
not set is the job's default. Each entry is trained from scratch in this process (no checkpoints), its training
settings as resolved are recorded (`trained_with`: lines written before session 7 lack it, and those without
`train_steps` in `settings` trained 3,000 updates, the default then) and it is evaluated on the seeded test set
(for selection) and the official MNIST test set (reported, never used to choose). A VAT model trained without
VAT_BN_REESTIMATE is evaluated a second time after re-estimating its BatchNorm statistics (`bnre_*` keys),
so every entry also measures that option at no training cost; with VAT_EMA_DECAY the shipped model is the weight
average and the last weights are scored too (`last_*` keys). With --workers N, this process takes every
N-th entry starting at I, so several processes can share one GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "mnist"))
    parser.add_argument("--deadline-s", type=float, default=1e9, help="start no new entry after this many seconds")
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    began = time.perf_counter()

    import torch

    from job.checkpoint import training_settings
    from job.data import load_mnist, raw_dir
    from job.device import configure_backend, resolve_device
    from job.evaluate import evaluate
    from job.logs import configure_logging, get_logger
    from job.settings import MAX_STEPS, load_settings
    from job.train import Hooks, StopFlag, reestimate_batchnorm, train_phase

    def scores(metrics: dict, prefix: str = "") -> dict:
        return {
            f"{prefix}{t}_{m}": round(metrics[t][m], 4)
            for t in ("seeded_test", "mnist_test")
            for m in ("accuracy", "macro_f1")
        }

    configure_logging("json", "warning")
    plan = json.loads(Path(args.plan).read_text())[args.worker :: args.workers]
    cache: dict[tuple, object] = {}
    for entry in plan:
        if time.perf_counter() - began > args.deadline_s:
            print(json.dumps({"name": entry["name"], "skipped": "deadline"}), flush=True)
            continue
        s = load_settings(env_file=None, checkpoint_every=MAX_STEPS, log_every_s=86_400, **entry["settings"])
        device = resolve_device(s.device)
        configure_backend(device, s.deterministic)
        key = (s.test_split_seed, s.label_split_seed, s.num_labeled, s.num_unlabeled)
        if key not in cache:
            cache[key] = load_mnist(raw_dir(Path(args.data_dir)), *key).to(device)
        split = cache[key]
        try:
            with tempfile.TemporaryDirectory() as folder:
                t = time.perf_counter()
                result = train_phase(
                    entry["phase"], s, split, device, Path(folder), StopFlag(), Hooks(log=get_logger())
                )
                seconds = time.perf_counter() - t
            metrics = evaluate(result.model, split, s.eval_batch_size)
            line = {
                "name": entry["name"],
                "phase": entry["phase"],
                "settings": entry["settings"],
                # every training setting as resolved, so a line stays readable after the job's defaults change
                "trained_with": training_settings(entry["phase"], s),
                "seconds": round(seconds, 2),
                "ms_per_update": round(1000 * seconds / max(result.steps, 1), 3),
                **scores(metrics),
                "seeded_test_recall_per_class": [
                    round(metrics["seeded_test"]["classification_report"][str(c)]["recall"], 3) for c in range(10)
                ],
                "final_losses": {k: round(v[-1], 5) for k, v in result.history.items() if v and k != "confident"},
                "device": str(device),
            }
            if s.consistency_weight and entry["phase"] == "vat":  # the mask rate over the last 100 updates
                tail = result.history["confident"][-100:]
                line["confident_share_last100"] = round(sum(tail) / len(tail), 4)
            if result.model is not result.last_weights:  # VAT_EMA_DECAY: the last weights, scored for comparison
                result.last_weights.eval()
                line.update(scores(evaluate(result.last_weights, split, s.eval_batch_size), prefix="last_"))
            if entry["phase"] == "vat" and not s.bn_reestimate:
                reestimate_batchnorm(result.model, split, s.unlabeled_batch_size)
                line.update(scores(evaluate(result.model, split, s.eval_batch_size), prefix="bnre_"))
        except Exception as error:  # one broken entry must not stop the sweep
            line = {"name": entry["name"], "error": f"{type(error).__name__}: {error}"}
        with open(args.out, "a") as out:
            out.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
