"""What each setting means, in one place. docs/configuration.md and .env.example are generated from this and from
the Settings class's defaults: `python -m job.settings_help` rewrites both, and a test fails when they drift."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

from job.settings import Settings, env_name

# Section -> setting -> what it means (and its choices). Every field of Settings is here, once.
SECTIONS: dict[str, dict[str, str]] = {
    "preset": {
        "preset": (
            "default: the tuned recipe; article: the seed article's hyperparameters exactly; smoke: the whole "
            "pipeline in about a minute on a 2-core CPU, to see it work (not a result). Explicit values always "
            "win over a preset"
        ),
    },
    "data and output": {
        "data_dir": (
            "MNIST root in torchvision's layout (<dir>/MNIST/raw/*-ubyte); downloaded there when missing or corrupt. "
            "The image's default is /data"
        ),
        "mnist_mirrors": "Mirrors tried in order for <mirror>/<file>.gz (a JSON list, or URLs separated by commas)",
        "download_retries": "Attempts per mirror and file (exponential backoff between them)",
        "download_timeout_s": "Seconds before one download attempt gives up",
        "output_dir": "Folder that holds one sub-folder per run. The image's default is /output",
        "run_id": (
            "Run id (letters, digits, . _ -); default: generated, e.g. 20261128T180000Z-1a2b3c. Reuse one to resume a"
            " run."
        ),
        "run_group": (
            "Group of runs this one belongs to (one-off, the nightly CronJob's name, a sweep's name): in report.json;"
            " collect groups, filters and trends by it. Equal to VAT_JOB_NAME (the manifests' downward API), a "
            "CronJob's Job (<cronjob>-<digits>) gives the CronJob's name"
        ),
        "job_name": (
            "Kubernetes Job name (the manifests set it from the downward API); with VAT_JOB_UID and no VAT_RUN_ID it "
            "gives the run id, the same for every retried pod"
        ),
        "job_uid": "Kubernetes Job uid (downward API), see VAT_JOB_NAME",
    },
    "the split (the article's procedure)": {
        "test_split_seed": "random_state of the first train_test_split: 60,000 -> 50,000 pool + 10,000 seeded test",
        "label_split_seed": "random_state of the second split: pool -> labelled + unlabelled",
        "label_split_seed_from_index": (
            "Add JOB_COMPLETION_INDEX (Kubernetes Indexed Job) to VAT_LABEL_SPLIT_SEED, for seed sweeps"
        ),
        "num_labeled": "Labelled images taken from the pool",
        "num_unlabeled": "Unlabelled images used (the first N of the shuffled pool); default: the whole pool (49,900)",
    },
    "training": {
        "device": "auto (CUDA when present, else CPU) | cpu | cuda (fails with exit 10 when no GPU is visible)",
        "seed": "Seed of the training randomness (initial weights, batches, dropout, VAT directions)",
        "deterministic": "Deterministic algorithms (CPU: same metrics on every run; CUDA: deterministic cuDNN)",
        "amp": "Mixed precision for the forward passes: off | bf16 | fp16 (the power iteration stays float32)",
        "cuda_graphs": "On CUDA, replay each update as one CUDA graph (not with fp16)",
        "baseline_steps": "Updates of the labelled-only baseline",
        "train_steps": "Updates of the VAT model (the article: 3,000)",
        "labeled_batch_size": "Labelled images per update (both models)",
        "unlabeled_batch_size": "Unlabelled images per VAT update",
        "lr": "Adam learning rate",
        "lr_decay": "Learning-rate schedule: none | linear (decays to 0 at the last update)",
        "epsilon": "L2 norm of the adversarial perturbation, per image (pixels in [0, 1])",
        "epsilon_scaling": (
            "Radius of each example's perturbation: fixed (VAT_EPSILON for every image) | input_norm (VAT_EPSILON "
            "times the image's L2 norm over the batch's mean norm; beyond the article)"
        ),
        "xi": "L2 norm of the finite-difference probe in the power iteration",
        "power_iterations": "Power-iteration steps",
        "vat_weight": "Weight of the LDS term in the VAT loss",
        "entmin_weight": "Weight of entropy minimisation on unlabelled predictions (VAT+EntMin); 0 turns it off",
        "entmin_rampup_steps": (
            "EntMin's weight rises linearly from 0 to VAT_ENTMIN_WEIGHT over this many VAT updates (0: full weight at"
            " once)"
        ),
        "balance_weight": (
            "Weight of a class-balance term: the entropy of the unlabelled batch's mean prediction, maximised "
            "(IMSAT's; with EntMin at the same weight, the mutual information of images and classes); not ramped; "
            "beyond the article; 0 turns it off"
        ),
        "perturbed_bn": (
            "BatchNorm in the perturbed passes: frozen (running statistics untouched) | update (the article)"
        ),
        "dropout_masks": (
            "Dropout in the unlabelled passes: shared (one mask for clean and perturbed) | independent (the article) "
            "| none"
        ),
        "bn_reestimate": (
            "After VAT training, recompute BatchNorm's running statistics over the clean unlabelled images"
        ),
        "ema_decay": (
            "Evaluate and ship an exponential moving average of the VAT model's weights and BatchNorm statistics with"
            " this decay per update (warm-up: min(decay, (1+n)/(10+n))); 0 turns it off"
        ),
        "translate_px": (
            "Shift every training image (both models) by a random whole number of pixels, up to this many along each "
            "axis, zeros filling in; beyond the article; 0 turns it off"
        ),
        "rotate_deg": (
            "Turn every training image (both models) by a random angle of up to this many degrees either way, after "
            "the shift (bilinear, zeros filling in); beyond the article; 0 turns it off"
        ),
        "elastic_px": (
            "Distort every training image (both models) elastically, after the rotation: a smooth random displacement"
            " field (white noise blurred with a 4-pixel Gaussian, as Simard et al. 2003) whose components have this "
            "standard deviation in pixels; beyond the article; 0 turns it off"
        ),
        "hidden_units": (
            "Units in the hidden layer of both models; the article's 100 is VAT_PRESET=article's, 1,024 is beyond the"
            " article"
        ),
        "checkpoint_every": "Write a checkpoint every N updates (and at the end of each model)",
        "keep_checkpoints": (
            "Checkpoints kept per model, in the run folder and in the bucket: the newest N (one to resume from, the "
            "others in case it is damaged; 1: no fallback); older ones are deleted"
        ),
        "eval_batch_size": "Images per evaluation batch",
        "eval_images": (
            "Evaluate on the first N images of each test set (validation and MNIST test) instead of all 10,000; 0: "
            "all. For quick checks: fewer images, noisier figures (report.json gives n). Not with VAT_PROMOTE_TO"
        ),
    },
    "beyond VAT: consistency, strong augmentation, another network (docs/method.md)": {
        "model": (
            "Network of both models: article (the article's CNN, VAT_HIDDEN_UNITS wide) | conv-small (Conv-Small of the"
            " Ladder and Pi-model papers: 3x3 convolutions of 96 and 192 channels, global average pooling; about 4 "
            "times the arithmetic of the article's CNN at 1,024 units; VAT_HIDDEN_UNITS unused)"
        ),
        "labeled_augment": (
            "Labelled batch of both models: weak (VAT_TRANSLATE_PX, VAT_ROTATE_DEG, VAT_ELASTIC_PX) | strong (the "
            "VAT_STRONG_* transform instead), whatever the unlabelled batch gets"
        ),
        "consistency_weight": (
            "Weight of consistency across strong augmentation (FixMatch, UDA): a strongly augmented copy of each "
            "unlabelled image is trained to match the prediction on its weakly augmented one; 0 turns it off"
        ),
        "consistency_targets": (
            "hard (FixMatch: cross-entropy with the predicted class) | soft (UDA: KL divergence from the prediction "
            "sharpened by VAT_CONSISTENCY_TEMPERATURE)"
        ),
        "consistency_threshold": (
            "Only images whose weak prediction gives its class at least this probability count (both kinds of target;"
            " the others count 0 in the batch's mean); 0 keeps all"
        ),
        "consistency_temperature": "Soft targets are softmax(logits / this): below 1 sharper than the prediction",
        "consistency_targets_from": (
            "model (the weights being trained, on the same batch) | weight_average (mean teacher: the VAT_EMA_DECAY "
            "average, in evaluation mode; needs VAT_EMA_DECAY > 0 when the term is on)"
        ),
        "consistency_rampup_steps": (
            "The consistency term's weight rises linearly from 0 to VAT_CONSISTENCY_WEIGHT over this many VAT updates,"
            " meant to let its targets come from a model VAT has already shaped (0: full weight at once, as FixMatch)"
        ),
        "vat_targets_from": (
            "The clean prediction VAT's perturbed pass must match: model | weight_average (as above; EntMin stays on "
            "the model's own prediction)"
        ),
        "strong_translate_px": "Strong augmentation: a random whole-pixel shift of up to this many pixels per axis",
        "strong_rotate_deg": "Strong augmentation: a random turn of up to this many degrees either way",
        "strong_shear_deg": "Strong augmentation: a random horizontal shear of up to this many degrees either way",
        "strong_scale": "Strong augmentation: the digit drawn at a random size within 1 plus or minus this",
        "strong_elastic_px": "Strong augmentation: an elastic distortion of this many pixels (as VAT_ELASTIC_PX)",
        "strong_cutout_px": "Strong augmentation: a square of this side, at a random place, blanked out; 0: none",
    },
    "output": {
        "log_format": (
            "auto (console at a terminal, JSON lines otherwise: docker without -t, Kubernetes) | json | console"
        ),
        "log_level": "debug | info | warning | error",
        "log_every_s": "Seconds between progress lines",
        "plots": "Write the PNG pictures (loss curves, labelled images, confusion matrices)",
    },
    "object storage": {
        "s3_bucket": "Bucket to upload to; unset: local output only, no network",
        "s3_prefix": "Key prefix: objects go to s3://<bucket>/<prefix>/runs/<run_id>/",
        "s3_endpoint_url": "Endpoint of an S3-compatible server; unset: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS",
        "s3_addressing_style": "auto | path (most non-AWS servers) | virtual",
        "s3_checksums": (
            "when_required (works with MinIO, Ceph, R2, GCS...) | when_supported (boto3's default since 1.36)"
        ),
        "s3_conditional_writes": (
            "warn | require: what to do when the server ignores conditional writes (If-None-Match; s3rver, old "
            "MinIO): the bucket lease cannot then keep a second node off the same run id. warn logs it; require "
            "refuses (exit 4)"
        ),
        "s3_max_attempts": "Attempts per request (boto3 standard retry mode, with backoff)",
        "s3_connect_timeout_s": "Seconds to wait for a connection to the endpoint",
        "s3_read_timeout_s": (
            "Seconds to wait for each answer of the server (a hung server costs at most this per attempt)"
        ),
        "lock_wait_s": "Seconds to wait for another job writing the same run id before exiting with code 7",
    },
    "promotion (nightly retraining)": {
        "promote_to": (
            "Folder under the prefix that holds the promoted model (e.g. latest); unset: no promotion. "
            "Needs VAT_S3_BUCKET"
        ),
        "promote_min_accuracy": (
            "Gate: the VAT model's validation accuracy (seeded_test; the MNIST test accuracy is only recorded) "
            "must be at least this"
        ),
        "promote_max_regression": (
            "Gate: and not more than this below the promoted model's (accuracy points, 0.005 = half a point)"
        ),
        "promote_max_drift": (
            "Gate: and not more than this below the best of the last VAT_PROMOTE_DRIFT_WINDOW promoted models "
            "(bounds slow drift)"
        ),
        "promote_drift_window": (
            "Gate: how many of the last promoted models the drift bound looks back on (the pointer remembers them)"
        ),
    },
    "for the platform (Kubernetes, Prometheus)": {
        "pushgateway_url": (
            "Pushgateway that the run's metrics are pushed to when it ends, success or failure (e.g. "
            "http://pushgateway:9091); unset: none"
        ),
        "pushgateway_timeout_s": (
            "Seconds the push may take at most (name resolution included); a failed push is a warning, never a failed"
            " run"
        ),
        "termination_message_path": (
            "File for the container's termination message (the quality gate's reason), written only where it exists "
            "and is writable"
        ),
    },
}

BOTO3_VARIABLES = {
    "AWS_ACCESS_KEY_ID": "the key pair (or AWS_PROFILE, a web identity, an instance role: boto3's chain)",
    "AWS_SECRET_ACCESS_KEY": "",
    "AWS_ENDPOINT_URL_S3": "an S3-compatible server's URL (MinIO, Ceph...); only S3 is redirected, not STS",
    "AWS_DEFAULT_REGION": "the bucket's region (AWS); any value for most other servers",
}
REPO = Path(__file__).resolve().parents[1]


def default_text(name: str) -> str:
    """The default as a variable would spell it ("" when there is none, or one is generated)."""
    field = Settings.model_fields[name]
    if field.default_factory is not None or field.default is None:
        return ""
    value = field.default
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def comment(text: str, width: int = 100) -> list[str]:
    return textwrap.wrap(text, width, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False)


def env_example() -> str:
    """.env.example: every setting commented out at its default (copying the file pins nothing), lines <= 100."""
    out = [
        "# vat-job settings, generated from job/settings_help.py (python -m job.settings_help): do not edit.",
        "# Every variable is optional and commented out at its default: uncomment what you change.",
        "# Copy to .env: read from the working directory by vat-job, and by docker run --env-file .env.",
    ]
    for section, fields in SECTIONS.items():
        out += ["", f"# --- {section} " + "-" * max(3, 93 - len(section))]
        for name, help_text in fields.items():
            line = f"# {env_name(name)}={default_text(name)}"
            if len(line) > 100:  # the default on its own comment line, the variable to fill in below it
                out += [*comment(help_text), f"# Default: {default_text(name)}", f"# {env_name(name)}="]
            else:
                out += [*comment(help_text), line]
    out += ["", "# --- credentials: boto3's own variables " + "-" * 57]
    out += comment(
        "Read by boto3, never logged. vat-job takes AWS_* lines of .env into its environment when they are not "
        "set there already, as docker run --env-file does."
    )
    for name, help_text in BOTO3_VARIABLES.items():
        out += [*(comment(help_text) if help_text else []), f"# {name}="]
    return "\n".join(out) + "\n"


def reference() -> str:
    """docs/configuration.md: one table per section."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `job/settings_help.py` and the defaults of `job/settings.py` (`python -m job.settings_help`).",
        "Every setting is a `VAT_*` environment variable (or a line of `.env`), validated before any work: a bad",
        "value is exit 2 with one line naming the variable. `.env.example` holds the same list, commented out.",
    ]
    for section, fields in SECTIONS.items():
        out += ["", f"## {section[0].upper()}{section[1:]}", "", "| variable | default | meaning |", "|---|---|---|"]
        for name, help_text in fields.items():
            default = default_text(name)
            shown = f"`{default}`" if default else "(none)"
            out.append(f"| `{env_name(name)}` | {shown} | {help_text.replace('|', chr(92) + '|')} |")
    out += ["", "## Credentials and endpoint (boto3's variables)", "", "| variable | meaning |", "|---|---|"]
    out += [f"| `{name}` | {text or 'see AWS_ACCESS_KEY_ID'} |" for name, text in BOTO3_VARIABLES.items()]
    return "\n".join(out) + "\n"


GENERATED: dict[str, Any] = {".env.example": env_example, "docs/configuration.md": reference}


def main() -> int:
    """Rewrite the generated files; with --check, exit 1 if one differs (what CI and the tests do)."""
    stale = [p for p, render in GENERATED.items() if not (REPO / p).is_file() or (REPO / p).read_text() != render()]
    if "--check" in sys.argv:
        print("\n".join(f"{path} is out of date: python -m job.settings_help" for path in stale))
        return 1 if stale else 0
    for path, render in GENERATED.items():
        (REPO / path).write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
