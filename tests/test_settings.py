import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from job.presets import ARTICLE_PRESET
from job.settings import ConfigError, Settings, load_settings
from tests.support import REPO, clean_environ, run_job, unavailable


def env_example_names() -> set[str]:
    names = set()
    for line in (REPO / ".env.example").read_text().splitlines():
        match = re.match(r"^#?\s*(VAT_[A-Z0-9_]+)=", line)
        if match:
            names.add(match.group(1))
    return names


def test_env_example_lists_every_setting_and_nothing_else():
    fields = {f"VAT_{name.upper()}" for name in Settings.model_fields}
    documented = env_example_names()
    assert fields - documented == set(), "settings missing from .env.example"
    assert documented - fields == set(), ".env.example names settings that do not exist"


def test_the_reference_and_env_example_are_generated_from_the_settings_and_fit_100_columns():
    from job import settings_help

    assert {n for fields in settings_help.SECTIONS.values() for n in fields} == set(Settings.model_fields)
    assert sum(len(fields) for fields in settings_help.SECTIONS.values()) == len(Settings.model_fields), "listed twice"
    for path, render in settings_help.GENERATED.items():
        assert (REPO / path).read_text() == render(), f"{path} is stale: python -m job.settings_help"
    example = (REPO / ".env.example").read_text().splitlines()
    assert max(map(len, example)) <= 100
    assert not [line for line in example if line.startswith(("VAT_", "AWS_"))], "nothing is set: copying pins nothing"
    assert {"# AWS_ACCESS_KEY_ID=", "# AWS_SECRET_ACCESS_KEY=", "# AWS_ENDPOINT_URL_S3="} <= set(example)


def test_env_example_defaults_are_the_real_defaults(monkeypatch):
    defaults = Settings(_env_file=None)
    for line in (REPO / ".env.example").read_text().splitlines():
        match = re.match(r"^# (VAT_[A-Z0-9_]+)=(.*)$", line)
        if match and match.group(2):
            name = match.group(1)[4:].lower()
            monkeypatch.setenv(match.group(1), match.group(2))
            parsed = getattr(load_settings(env_file=None), name)
            monkeypatch.delenv(match.group(1))
            assert parsed == getattr(defaults, name), name


def test_public_interface_names_and_defaults():
    s = load_settings(env_file=None)
    assert (s.test_split_seed, s.label_split_seed, s.num_labeled) == (42, 1, 100)
    assert s.device == "auto" and s.amp == "off" and s.log_format == "auto"
    assert s.labeled_batch_size == 100 and s.unlabeled_batch_size == 512


def test_run_id_is_generated_unique():
    assert load_settings(env_file=None).run_id != load_settings(env_file=None).run_id


@pytest.mark.parametrize(
    "name,value,fragment",
    [
        ("VAT_EPSILON", "-1", "greater than 0"),
        ("VAT_DEVICE", "tpu", "'auto', 'cpu' or 'cuda'"),
        ("VAT_TRAIN_STEPS", "12.5", "integer"),
        ("VAT_BALANCE_WEIGHT", "inf", "finite number"),
        ("VAT_ROTATE_DEG", "60", "less than or equal to 45"),
        ("VAT_AMP", "fp8", "'off', 'bf16' or 'fp16'"),
        ("VAT_RUN_ID", "../etc", "letters, digits"),
        ("VAT_RUN_ID", "abc\n", "letters, digits"),
        ("VAT_S3_BUCKET", "", "unset the variable for local output only"),
        ("VAT_MNIST_MIRRORS", '["https://example.org/', "JSON list of URLs"),
        ("VAT_MNIST_MIRRORS", "ftp://example.org/", "http:// or https://"),
        ("VAT_MNIST_MIRRORS", "ftp://user:s3cret-pw@example.org/", "http:// or https://"),
    ],
)
def test_invalid_values_name_variable_value_and_what_is_allowed(monkeypatch, name, value, fragment):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings(env_file=None)
    message = str(info.value)
    shown = repr(value).replace("user:s3cret-pw@", "***@")  # the value, its credentials masked
    assert name in message and shown in message and fragment in message
    assert "\n" not in message and "s3cret-pw" not in message


def test_unknown_variables_are_named_but_their_values_never_shown(monkeypatch, tmp_path):
    monkeypatch.setenv("VAT_EPSILLON", "2")
    with pytest.raises(ConfigError, match=r"VAT_EPSILLON in the environment: unknown setting.*VAT_EPSILON\?") as info:
        load_settings(env_file=None)
    assert "'2'" not in str(info.value)
    monkeypatch.delenv("VAT_EPSILLON")
    monkeypatch.setenv("VAT_AWS_SECRET_ACCESS_KEY", "hunter2-secret")
    with pytest.raises(ConfigError, match="VAT_AWS_SECRET_ACCESS_KEY") as info:
        load_settings(env_file=None)
    assert "hunter2" not in str(info.value)


def test_dotenv_may_hold_credentials_and_its_typos_are_named_as_written(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("AWS_SECRET_ACCESS_KEY=hunter2-secret\nAWS_ACCESS_KEY_ID=AKIA0\nVAT_EPSILON=3\n")
    assert load_settings(env_file=env_file).epsilon == 3.0, "non-VAT_ lines (docker --env-file's AWS_*) are not ours"
    env_file.write_text("VAT_TYPO=hunter2-secret\n")
    with pytest.raises(ConfigError) as info:
        load_settings(env_file=env_file)
    assert "VAT_TYPO in " in str(info.value) and "VAT_VAT_" not in str(info.value) and "hunter2" not in str(info.value)


def test_a_binary_dotenv_is_a_config_error(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="cannot be read as UTF-8"):
        load_settings(env_file=env_file)


def test_mirrors_accept_one_url_or_a_list_and_their_credentials_are_redacted(monkeypatch):
    monkeypatch.setenv("VAT_MNIST_MIRRORS", "https://example.org/mnist/")
    assert load_settings(env_file=None).mnist_mirrors == ["https://example.org/mnist/"]
    monkeypatch.setenv("VAT_MNIST_MIRRORS", '["http://user:password@host/mnist/", "https://b/"]')
    public = load_settings(env_file=None).public_dict()
    assert public["mnist_mirrors"] == ["http://***@host/mnist/", "https://b/"]
    monkeypatch.setenv("VAT_MNIST_MIRRORS", '["http://user:password@host/mnist/"')
    with pytest.raises(ConfigError) as info:
        load_settings(env_file=None)
    assert "password" not in str(info.value) and "VAT_MNIST_MIRRORS" in str(info.value)


def test_dotenv_file_is_honoured_and_typos_in_it_are_refused(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("VAT_EPSILON=3.5\n")
    assert load_settings(env_file=env_file).epsilon == 3.5
    env_file.write_text("VAT_EPSILN=3.5\n")
    with pytest.raises(ConfigError, match="VAT_EPSILN"):
        load_settings(env_file=env_file)


def test_article_preset_sets_article_hyperparameters_but_explicit_values_win(monkeypatch):
    monkeypatch.setenv("VAT_PRESET", "article")
    s = load_settings(env_file=None)
    for name, value in ARTICLE_PRESET.items():
        assert getattr(s, name) == value, name
    monkeypatch.setenv("VAT_EPSILON", "1.5")
    assert load_settings(env_file=None).epsilon == 1.5


def test_sweep_index_maps_to_label_seed(monkeypatch):
    monkeypatch.setenv("VAT_LABEL_SPLIT_SEED_FROM_INDEX", "true")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert load_settings(env_file=None).label_split_seed == 3
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    with pytest.raises(ConfigError, match="JOB_COMPLETION_INDEX"):
        load_settings(env_file=None)


# Every spelling pydantic reads as a bool (any case); the offset follows pydantic's reading, not a list of its own.
TRUE_SPELLINGS = ["1", "true", "t", "yes", "y", "on", "TRUE", "True", "T", "YES", "Y", "ON", "On"]
FALSE_SPELLINGS = ["0", "false", "f", "no", "n", "off", "FALSE", "False", "F", "NO", "N", "OFF", "Off"]


@pytest.mark.parametrize("spelling", TRUE_SPELLINGS + FALSE_SPELLINGS)
def test_sweep_offset_follows_every_bool_spelling_pydantic_accepts(monkeypatch, spelling):
    monkeypatch.setenv("VAT_LABEL_SPLIT_SEED_FROM_INDEX", spelling)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    settings = load_settings(env_file=None)
    on = spelling in TRUE_SPELLINGS
    assert settings.label_split_seed_from_index is on
    assert settings.label_split_seed == (1 + 3 if on else 1)


def test_sweep_offset_is_added_to_an_explicit_label_seed_and_the_preset_leaves_it(monkeypatch):
    monkeypatch.setenv("VAT_LABEL_SPLIT_SEED_FROM_INDEX", "y")
    monkeypatch.setenv("VAT_LABEL_SPLIT_SEED", "10")
    monkeypatch.setenv("VAT_PRESET", "article")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    assert load_settings(env_file=None).label_split_seed == 13


@pytest.mark.parametrize("index", ["-1", "two", "1.5", ""])
def test_sweep_refuses_a_completion_index_that_is_not_a_whole_number(monkeypatch, index):
    monkeypatch.setenv("VAT_LABEL_SPLIT_SEED_FROM_INDEX", "on")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", index)
    with pytest.raises(ConfigError, match=rf"^JOB_COMPLETION_INDEX={re.escape(repr(index))} must be a whole number"):
        load_settings(env_file=None)


def test_sweep_refuses_a_label_seed_pushed_past_its_range(monkeypatch):
    monkeypatch.setenv("VAT_LABEL_SPLIT_SEED_FROM_INDEX", "1")
    monkeypatch.setenv("VAT_LABEL_SPLIT_SEED", str(2**32 - 1))
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    with pytest.raises(ConfigError, match="JOB_COMPLETION_INDEX=1 is above"):
        load_settings(env_file=None)


def test_without_the_sweep_flag_a_bad_completion_index_is_ignored(monkeypatch):
    monkeypatch.setenv("VAT_LABEL_SPLIT_SEED_FROM_INDEX", "no")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "not-a-number")
    assert load_settings(env_file=None).label_split_seed == 1


@pytest.mark.parametrize(
    "extra",
    [
        {"VAT_EPSILON": "-1"},
        {"VAT_DEVICE": "tpu"},
        {"VAT_TRAIN_STEPS": "ten"},
        {"VAT_EPSILLON": "2"},
        {"VAT_AWS_SECRET_ACCESS_KEY": "hunter2-secret"},
        {"VAT_MNIST_MIRRORS": '["http://user:hunter2-secret@example.org/mnist/"'},
        {"VAT_S3_BUCKET": ""},
    ],
)
def test_bad_setting_exits_2_with_one_json_line_before_any_work(tmp_path, extra):
    result = run_job(clean_environ(VAT_OUTPUT_DIR=str(tmp_path / "out"), **extra), timeout=120)
    assert result.returncode == 2
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "config_error" and record["level"] == "error"
    assert next(iter(extra)) in record["message"]
    assert "hunter2" not in result.stdout + result.stderr and not result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cuda_requested_without_gpu_exits_10_a_fault_of_the_node_not_of_the_settings(tmp_path):
    env = clean_environ(VAT_OUTPUT_DIR=str(tmp_path / "out"), VAT_DEVICE="cuda", VAT_DATA_DIR=str(tmp_path))
    result = run_job({**env, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)  # a node without a GPU, on any machine
    assert result.returncode == 10
    (line,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert line["event"] == "no_gpu_visible" and line["exit_code"] == 10
    assert "VAT_DEVICE='cuda': no CUDA device is visible on this node" in line["message"]


def test_console_script_passes_exit_codes_and_flushes_its_output(tmp_path):
    script = Path(sys.executable).with_name("vat-job")
    if not script.exists():
        unavailable(f"the package is not installed as a console script ({script}): pip install -e .")
    help_text = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage: vat-job")
    bad = subprocess.run(
        [str(script)], env=clean_environ(VAT_EPSILON="-1"), capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["event"] == "config_error"


def test_promotion_refuses_a_partial_evaluation(monkeypatch):
    monkeypatch.setenv("VAT_S3_BUCKET", "b")
    monkeypatch.setenv("VAT_PROMOTE_TO", "latest")
    monkeypatch.setenv("VAT_EVAL_IMAGES", "1000")
    with pytest.raises(ConfigError, match="VAT_PROMOTE_TO needs VAT_EVAL_IMAGES=0"):
        load_settings(env_file=None)
