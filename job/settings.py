"""Every setting of the job, read from `VAT_*` environment variables (and `.env`), validated at start.

The field names are the public interface: `VAT_<FIELD NAME IN UPPER CASE>`. `.env.example` documents each
one and a test keeps the two in step. `VAT_PRESET=article` switches the defaults of the training
hyperparameters to the seed article's; a variable set explicitly always wins over a preset.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from dotenv import dotenv_values
from pydantic import Field, NonNegativeInt, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from job.presets import PRESETS
from job.runid import RUN_ID_PATTERN, cronjob_group, generate_run_id, kubernetes_run_id
from job.training_options import MAX_STEPS, TrainingOptions
from job.untrusted import BOTO3_ENDPOINTS, MAX_DRIFT_WINDOW, checked_url, mask, register_environment_secrets

ENV_PREFIX = "VAT_"

URL_SETTINGS = ("mnist_mirrors", "s3_endpoint_url", "pushgateway_url")  # their passwords are masked everywhere
UNKNOWN_SETTING = "unknown setting (a typo?); the settings are listed in .env.example"


class ConfigError(Exception):
    """A setting is invalid; the message is one line naming the variable, its value and what is allowed."""


class Settings(BaseSettings, TrainingOptions):  # TrainingOptions: the options beyond VAT
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",  # .env may hold other variables (AWS_*...); unknown VAT_* names are refused below
        validate_default=True,
        allow_inf_nan=False,  # VAT_BALANCE_WEIGHT=inf would train to NaN weights; no setting needs infinity
    )

    # Where things are.
    preset: Literal["default", "article", "smoke"] = "default"
    data_dir: Path = Path("data")
    mnist_mirrors: Annotated[list[str], NoDecode] = Field(
        default=[
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ]
    )
    download_retries: int = Field(default=3, ge=1, le=20)
    download_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    output_dir: Path = Path("runs")
    run_id: str = Field(default_factory=generate_run_id)
    # Which runs belong together (one-off, the nightly CronJob's name, a sweep's name): recorded in report.json,
    # `vat-job collect` groups and filters by it. Promotion ignores it: a run is gated against whatever model
    # VAT_PROMOTE_TO holds, whichever group promoted it.
    run_group: str = Field(default="one-off", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    # Set by the Kubernetes manifests (downward API); with both and no VAT_RUN_ID the run id is derived from them.
    job_name: str | None = None
    job_uid: str | None = None

    # The split (the article's procedure).
    test_split_seed: int = Field(default=42, ge=0, le=2**32 - 1)
    label_split_seed: int = Field(default=1, ge=0, le=2**32 - 1)
    label_split_seed_from_index: bool = False
    num_labeled: int = Field(default=100, ge=10, le=49_000)
    num_unlabeled: int | None = Field(default=None, ge=1, le=49_990)

    # Training.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    deterministic: bool = True
    amp: Literal["off", "bf16", "fp16"] = "off"
    cuda_graphs: bool = True
    baseline_steps: int = Field(default=500, ge=0, le=MAX_STEPS)
    train_steps: int = Field(default=6000, ge=0, le=MAX_STEPS)
    labeled_batch_size: int = Field(default=100, ge=1, le=49_000)
    unlabeled_batch_size: int = Field(default=512, ge=1, le=49_990)
    lr: float = Field(default=1e-3, gt=0, le=1.0)
    lr_decay: Literal["none", "linear"] = "linear"
    epsilon: float = Field(default=3.5, gt=0, le=100)
    epsilon_scaling: Literal["fixed", "input_norm"] = "fixed"
    xi: float = Field(default=1.0, gt=0, le=100)
    power_iterations: int = Field(default=1, ge=1, le=10)
    vat_weight: float = Field(default=1.0, ge=0, le=1000)
    entmin_weight: float = Field(default=1.0, ge=0, le=1000)
    entmin_rampup_steps: int = Field(default=1500, ge=0, le=MAX_STEPS)
    balance_weight: float = Field(default=0.0, ge=0, le=1000)
    perturbed_bn: Literal["frozen", "update"] = "frozen"
    dropout_masks: Literal["shared", "independent", "none"] = "shared"
    bn_reestimate: bool = False
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    translate_px: int = Field(default=1, ge=0, le=8)
    rotate_deg: float = Field(default=0.0, ge=0, le=45)
    elastic_px: float = Field(default=0.0, ge=0, le=8)
    hidden_units: int = Field(default=1024, ge=1, le=8192)
    checkpoint_every: int = Field(default=500, ge=1, le=MAX_STEPS)
    keep_checkpoints: int = Field(default=2, ge=1, le=1000)
    eval_batch_size: int = Field(default=250, ge=1, le=70_000)
    eval_images: int = Field(default=0, ge=0, le=10_000)  # 0: all

    # Output.
    log_format: Literal["auto", "json", "console"] = "auto"  # auto: console at a terminal, JSON lines otherwise
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_every_s: float = Field(default=5.0, gt=0, le=86_400)
    plots: bool = True

    # Object storage (the endpoint and credentials come from boto3's own variables).
    s3_bucket: str | None = None
    s3_prefix: str = "vat-job"
    s3_endpoint_url: str | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    s3_checksums: Literal["when_required", "when_supported"] = "when_required"
    # A server that ignores conditional writes (If-None-Match) cannot keep two nodes off one run id: warn, or refuse.
    s3_conditional_writes: Literal["warn", "require"] = "warn"
    s3_max_attempts: int = Field(default=5, ge=1, le=20)
    s3_connect_timeout_s: float = Field(default=5.0, gt=0, le=600)
    s3_read_timeout_s: float = Field(default=20.0, gt=0, le=600)
    lock_wait_s: float = Field(default=150.0, ge=0, le=86_400)

    # Promotion of a finished run's VAT model to s3://<bucket>/<prefix>/<promote_to>/ behind a quality gate, which
    # judges the validation accuracy (vat.seeded_test): job/promote.py.
    promote_to: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    promote_min_accuracy: float = Field(default=0.95, ge=0, le=1)
    promote_max_regression: float = Field(default=0.005, ge=0, le=1)
    promote_max_drift: float = Field(default=0.01, ge=0, le=1)  # below the best of the last promote_drift_window
    promote_drift_window: int = Field(default=30, ge=1, le=MAX_DRIFT_WINDOW)

    pushgateway_url: str | None = None  # metrics, at the end of a run (checked_url, like every URL setting)
    pushgateway_timeout_s: float = Field(default=5.0, gt=0, le=60)
    termination_message_path: Path = Path("/dev/termination-log")  # the reason a Kubernetes pod failed

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in PRESETS.get(str(data.get("preset")), {}).items():
                data.setdefault(name, value)
        return data

    @model_validator(mode="after")
    def _sweep_index(self) -> Settings:
        # A Kubernetes Indexed Job gives each pod JOB_COMPLETION_INDEX; a sweep trains label seed 1+index. Applied to
        # the validated values: whatever pydantic reads as true (y, on, 1...) turns the offset on.
        if not self.label_split_seed_from_index:
            return self
        raw = os.environ.get("JOB_COMPLETION_INDEX")
        if raw is None:
            raise ValueError("label_split_seed_from_index needs JOB_COMPLETION_INDEX (set by an Indexed Job)")
        try:
            index = TypeAdapter(NonNegativeInt).validate_python(raw)
        except ValidationError:
            raise ValueError(f"JOB_COMPLETION_INDEX={raw!r} must be a whole number >= 0") from None
        if self.label_split_seed + index > 2**32 - 1:
            raise ValueError(
                f"VAT_LABEL_SPLIT_SEED={self.label_split_seed} plus JOB_COMPLETION_INDEX={index} is above 2**32-1"
            )
        self.label_split_seed += index
        return self

    @model_validator(mode="before")
    @classmethod
    def _run_id_from_kubernetes_job(cls, data: Any) -> Any:
        # Every retried pod of a Job gets the same id, so it resumes the run; an explicit VAT_RUN_ID wins.
        if isinstance(data, dict) and not data.get("run_id") and data.get("job_name") and data.get("job_uid"):
            data["run_id"] = kubernetes_run_id(
                str(data["job_name"]),
                str(data["job_uid"]),
                str(data.get("run_group") or "one-off"),
                os.environ.get("JOB_COMPLETION_INDEX"),
            )
        return data

    @field_validator("run_id")
    @classmethod
    def _run_id_is_a_path_segment(cls, value: str) -> str:
        if not RUN_ID_PATTERN.fullmatch(value):
            raise ValueError(
                "must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return value

    @field_validator("mnist_mirrors", mode="before")  # a JSON list, or URLs separated by commas (one URL too)
    @classmethod
    def _mirrors_from_text(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError("must be a JSON list of URLs, or URLs separated by commas") from None
        elif isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            for url in value:
                checked_url(url)  # raises with the URL masked: it may hold a mirror's password
        return value

    @field_validator("s3_endpoint_url", "pushgateway_url")
    @classmethod
    def _endpoint_is_a_url(cls, value: str | None) -> str | None:
        return checked_url(value) if value else None

    @field_validator("s3_bucket")
    @classmethod
    def _bucket_is_a_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}", value):
            raise ValueError("is not a bucket name (letters, digits, . _ -); unset the variable for local output only")
        return value

    @field_validator("s3_prefix")
    @classmethod
    def _prefix_without_slashes_at_ends(cls, value: str) -> str:
        return value.strip("/")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.labeled_batch_size > self.num_labeled:
            raise ValueError(
                f"VAT_LABELED_BATCH_SIZE={self.labeled_batch_size} is larger than VAT_NUM_LABELED={self.num_labeled}"
            )
        pool = 50_000 - self.num_labeled
        if self.num_unlabeled is not None and self.num_unlabeled > pool:
            raise ValueError(f"VAT_NUM_UNLABELED={self.num_unlabeled} is larger than the unlabelled pool ({pool})")
        if self.promote_to and not self.s3_bucket:
            raise ValueError(f"VAT_PROMOTE_TO={self.promote_to} needs VAT_S3_BUCKET: promotion writes to the bucket")
        if self.promote_to and self.eval_images:
            raise ValueError("VAT_PROMOTE_TO needs VAT_EVAL_IMAGES=0: the gate judges all 10,000 validation images")
        unlabeled = self.num_unlabeled or pool
        if self.train_steps and self.unlabeled_batch_size > unlabeled:
            raise ValueError(
                f"VAT_UNLABELED_BATCH_SIZE={self.unlabeled_batch_size} is larger than the unlabelled set ({unlabeled})"
            )
        return self

    @property
    def resolved_num_unlabeled(self) -> int:
        return self.num_unlabeled or 50_000 - self.num_labeled

    def public_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values, with anything secret-looking redacted."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump(mode="json").items():
            out[name] = "***" if re.search(r"secret|password|token|key", name) else mask(value)
        return out

    @model_validator(mode="before")  # defined last, so it runs first: the run id is derived from the group
    @classmethod
    def _group_from_a_cronjobs_job(cls, data: Any) -> Any:  # its real name, whatever an overlay's namePrefix made
        if isinstance(data, dict) and data.get("job_name") and data.get("run_group") == data["job_name"]:
            data["run_group"] = cronjob_group(str(data["job_name"]))  # <cronjob>-<digits> -> <cronjob>
        return data


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _refuse_unknown(values: Any, where: str) -> None:  # names a VAT_* typo, never its value (a secret?)
    known = [env_name(field) for field in Settings.model_fields]
    for name in sorted(k for k in values if k.upper().startswith(ENV_PREFIX) and k.upper() not in known):
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.8)
        raise ConfigError(f"{name} in {where}: {UNKNOWN_SETTING}" + (f" (did you mean {close[0]}?)" if close else ""))


def load_settings(env_file: str | Path | None = ".env", **overrides: Any) -> Settings:
    """Read and validate the settings; raise ConfigError with one line that says what to fix (no secret in it)."""
    _refuse_unknown(os.environ, "the environment")
    file_values: dict[str, str | None] = {}
    if env_file is not None and Path(env_file).is_file():
        try:
            file_values = dotenv_values(env_file, encoding="utf-8")
        except (UnicodeDecodeError, OSError, ValueError) as error:
            raise ConfigError(f"{env_file} cannot be read as UTF-8 KEY=value lines ({type(error).__name__})") from None
        _refuse_unknown(file_values, str(env_file))
        for name, value in file_values.items():  # boto3's AWS_* lines, read as docker run --env-file reads them
            if name.startswith("AWS_") and value and name not in os.environ:
                os.environ[name] = value
    register_environment_secrets({**file_values, **os.environ}, [env_name(f) for f in URL_SETTINGS])
    for name in BOTO3_ENDPOINTS:  # boto3's own variables: botocore would fail later, deep in a traceback
        try:
            checked_url(os.environ[name]) if os.environ.get(name) else None
        except ValueError as error:
            raise ConfigError(f"{name}: {error}") from None
    try:
        return Settings(_env_file=env_file, **overrides)
    except ValidationError as error:
        raise ConfigError(mask(_one_line(error, {**file_values, **os.environ}))) from None
    except (SettingsError, UnicodeDecodeError) as error:
        raise ConfigError(mask(f"settings cannot be read: {error}")) from None


def _one_line(error: ValidationError, env: dict[str, Any]) -> str:
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        if loc:
            name = env_name(loc[0])
            value = env.get(name, item.get("input"))
            problems.append(f"{name}={value!r}: {_allowed(item)}")
        else:
            problems.append(str(item["msg"]).removeprefix("Value error, "))
    return "; ".join(problems)


def _allowed(item: dict[str, Any]) -> str:
    msg = str(item["msg"]).removeprefix("Value error, ")
    ctx = item.get("ctx") or {}
    if item["type"] == "literal_error" and "expected" in ctx:
        return f"must be one of {ctx['expected']}"
    if item["type"] == "extra_forbidden":
        return UNKNOWN_SETTING
    return msg[0].lower() + msg[1:] if msg else msg
