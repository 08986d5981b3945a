"""Benchmark the whole job on whatever device is there and print a short table.

usage: python bench/bench.py [--data-dir DIR] [--profile-steps N] [KEY=VALUE ...]

KEY=VALUE pairs are job settings (e.g. TRAIN_STEPS=200 AMP=bf16), passed as VAT_KEY. The job runs as users
run it (`python -m job` in a subprocess, MNIST already on disk), then a few VAT updates are profiled in
this process to show where the time goes (per operator on CPU, per kernel on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_job(data_dir: Path, settings: dict[str, str]) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory() as out:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VAT_")}
        env.update(
            VAT_DATA_DIR=str(data_dir), VAT_OUTPUT_DIR=out, VAT_RUN_ID="bench", VAT_PLOTS="false", VAT_LOG_EVERY_S="30"
        )
        env.update({f"VAT_{k.upper()}": v for k, v in settings.items()})
        began = time.perf_counter()
        job = subprocess.Popen(
            [sys.executable, "-m", "job"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert job.stdout is not None and job.stderr is not None
        lines, finished = [], None
        for line in job.stdout:
            lines.append(line)
            if '"run_finished"' in line:
                finished = time.perf_counter()
        errors = job.stderr.read()
        job.wait()
        ended = time.perf_counter()
        wall = ended - began
        if job.returncode != 0:
            sys.exit(f"job failed ({job.returncode}):\n{''.join(lines)[-3000:]}\n{errors[-3000:]}")
        report = json.loads((Path(out) / "bench" / "report.json").read_text())
        report["teardown_s"] = ended - finished if finished else float("nan")
        return report, wall


def profile_updates(data_dir: Path, settings: dict[str, str], steps: int) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from job.data import load_mnist, raw_dir
    from job.device import configure_backend, resolve_device
    from job.settings import load_settings
    from job.train import Trainer

    s = load_settings(env_file=None, **{k.lower(): v for k, v in settings.items()})
    device = resolve_device(s.device)
    configure_backend(device, s.deterministic)
    split = load_mnist(raw_dir(data_dir), 42, 1, s.num_labeled).to(device)
    lines = []
    for graphs in [False, True] if device.type == "cuda" else [False]:
        s_graphs = s.model_copy(update={"cuda_graphs": graphs})
        trainer = Trainer("vat", s_graphs, split, device)
        trainer.model.train()
        for step in range(5):
            trainer.update(step)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        began = time.perf_counter()
        with profile(activities=activities) as prof:
            for step in range(5, 5 + steps):
                trainer.update(step)
            sync()
        per_update = (time.perf_counter() - began) / steps
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        lines.append(f"\n## VAT update, cuda_graphs={graphs}: {per_update * 1000:.2f} ms/update under the profiler\n")
        lines.append(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "mnist"))
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("settings", nargs="*", help="KEY=VALUE job settings")
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.settings)
    sys.path.insert(0, str(REPO))

    report, wall = run_job(Path(args.data_dir), settings)
    env, timings, models = report["environment"], report["timings_s"], report["models"]
    base, vat = models["baseline"], models["vat"]
    rows = [
        ("device", f"{env['device']} ({env['device_name']})"),
        ("torch", env["versions"]["torch"]),
        ("settings", " ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"),
        ("start-up (process start to job start: imports)", f"{timings.get('startup') or 0:.2f} s"),
        ("data preparation", f"{timings['data']:.2f} s"),
        ("baseline", f"{base['steps']} updates, {1000 * base['train_seconds'] / max(base['steps'], 1):.2f} ms/update"),
        ("VAT", f"{vat['steps']} updates, {1000 * vat['train_seconds'] / max(vat['steps'], 1):.2f} ms/update"),
        ("whole job (in process)", f"{timings['total']:.2f} s"),
        ("whole job (process wall)", f"{wall:.2f} s"),
        ("exit after the last log line", f"{report['teardown_s']:.2f} s"),
        ("peak host memory (RSS)", f"{timings['peak_rss_mb']:.0f} MB"),
        ("peak GPU memory", f"{timings['peak_gpu_memory_mb']:.0f} MB" if "peak_gpu_memory_mb" in timings else "-"),
        (
            "baseline accuracy seeded/mnist",
            f"{base['seeded_test']['accuracy']:.4f} / {base['mnist_test']['accuracy']:.4f}",
        ),
        ("VAT accuracy seeded/mnist", f"{vat['seeded_test']['accuracy']:.4f} / {vat['mnist_test']['accuracy']:.4f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print("| what | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    if args.profile_steps:
        print(profile_updates(Path(args.data_dir), settings, args.profile_steps))


if __name__ == "__main__":
    main()
