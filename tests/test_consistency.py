"""The options beyond VAT (issue 26): strong augmentation, consistency across it, targets from the weight average,
Conv-Small. What they are worth is for the GPU's screening (bench/gpu_session.sh); here: what they compute."""

import math
from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

from job.augment import StrongAugmentation, cut_out, strongly_augmented, warped
from job.checkpoint import (
    HISTORY_NAMES,
    TRAINING_FIELDS,
    ResumeMismatch,
    checkpoint_name,
    latest_intact_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from job.consistency import confident, consistency_loss, consistency_term, sharpened
from job.data import as_float_batch
from job.model import ConvSmall, build_model, exported, model_from_record, model_record
from job.presets import ARTICLE_PRESET, IMPLICIT_BEFORE_ADDED
from job.schedules import ramped_weights
from job.settings import ConfigError, Settings, load_settings
from job.train import Interrupted, Trainer
from job.training_options import TrainingOptions, as_used
from tests.support import RecordingLog, assert_same_weights, run_phase, small_settings, stop_after, weights

CPU = torch.device("cpu")
NONE = StrongAugmentation(translate_px=0, rotate_deg=0, shear_deg=0, scale=0, elastic_px=0, cutout_px=0)
DEFAULT = StrongAugmentation.from_settings(Settings(_env_file=None))
WITH_CUTOUT = replace(DEFAULT, cutout_px=8)  # every part of the transform (the default has no cutout since 0.2.0)


def digits(split, n=16):
    return split.train_images[split.labeled[:n]]


# --- strong augmentation -------------------------------------------------------------------------------------


def test_strong_augmentation_gives_each_image_its_own_transform_and_the_generator_decides_which(mnist_split):
    copies = digits(mnist_split, 1).repeat(12, 1, 1)  # one digit twelve times: any difference is the transform
    torch.manual_seed(5)
    first = strongly_augmented(copies, DEFAULT)
    assert first.shape == (12, 1, 28, 28) and first.dtype == torch.float32 and first.device == copies.device
    assert first.is_contiguous(memory_format=torch.channels_last) and 0 <= first.min() and first.max() <= 1
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12)]
    assert all(not torch.equal(first[i], first[j]) for i, j in pairs), "two images shared a transform"
    torch.manual_seed(5)
    assert torch.equal(strongly_augmented(copies, DEFAULT), first), "the same generator state, the same transforms"
    assert not torch.equal(strongly_augmented(copies, DEFAULT), first), "the generator moved on"


def test_strong_augmentation_draws_from_the_default_generator_of_the_images_device(mnist_split, monkeypatch):
    """Every random draw names the images' device (on CUDA: its generator, inside a graph; the CPU's untouched)."""
    devices = []
    for name in ("rand", "randint", "randn"):
        real = getattr(torch, name)

        def spy(*args, _real=real, **kwargs):
            devices.append(kwargs.get("device"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    strongly_augmented(digits(mnist_split), WITH_CUTOUT)
    assert len(devices) == 4 and all(torch.device(d) == CPU for d in devices), devices


def test_with_every_strength_at_zero_the_images_are_only_converted(mnist_split):
    images = digits(mnist_split)
    torch.testing.assert_close(strongly_augmented(images, NONE), as_float_batch(images), atol=1e-5, rtol=0)


def test_the_affine_part_is_the_rotation_it_draws_when_only_rotation_is_on(mnist_split):
    images = digits(mnist_split)
    torch.manual_seed(3)
    turned = strongly_augmented(images, StrongAugmentation(0, 30.0, 0, 0, 0, 0))
    torch.manual_seed(3)
    angles = (torch.rand(3, len(images)) * 2 - 1)[0] * math.radians(30.0)
    torch.testing.assert_close(turned, warped(as_float_batch(images), angles), atol=1e-5, rtol=0)
    assert angles.abs().max() > math.radians(10), "a range of angles, not all near 0"


def test_shear_and_scale_resample_as_torchs_affine_grid_within_their_limits(mnist_split):
    """Shear and scale only: each image's matrix is [[1, tan(shear)], [0, 1]] / size with |shear| <= shear_deg and
    |size - 1| <= scale, drawn over the whole range, and the image is what torch's affine_grid and grid_sample make
    of that matrix (an independent construction of the same resampling)."""
    from job.augment import random_affine

    images = digits(mnist_split, 64)
    strength = StrongAugmentation(0, 0, shear_deg=15.0, scale=0.2, elastic_px=0, cutout_px=0)
    torch.manual_seed(5)
    augmented = strongly_augmented(images, strength)
    torch.manual_seed(5)
    matrices = random_affine(len(images), strength, CPU)
    size = 1 / matrices[:, 1, 1]
    shear_deg = torch.rad2deg(torch.atan(matrices[:, 0, 1] * size))
    assert torch.allclose(matrices[:, 1, 0], torch.zeros(len(images)))
    torch.testing.assert_close(matrices[:, 0, 0], matrices[:, 1, 1])
    assert (size - 1).abs().max() <= 0.2 + 1e-6 and (size - 1).abs().max() > 0.15
    assert shear_deg.abs().max() <= 15.0 + 1e-4 and shear_deg.abs().max() > 11.0
    theta = torch.cat([matrices, torch.zeros(len(images), 2, 1)], dim=2)
    batch = as_float_batch(images)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    torch.testing.assert_close(augmented, F.grid_sample(batch, grid, align_corners=False), atol=1e-5, rtol=0)
    enlarged = size > 1.1  # drawn bigger than it is: more ink, and the other way round
    ink = augmented.sum(dim=(1, 2, 3)) / batch.sum(dim=(1, 2, 3))
    assert (ink[enlarged] > 1.1).all() and (ink[size < 0.9] < 0.9).all()


def test_cutout_blanks_one_square_of_at_most_the_side_per_image_and_touches_nothing_else():
    batch = torch.rand(64, 1, 28, 28) + 0.1  # no pixel is 0 before
    torch.manual_seed(0)
    cut = cut_out(batch, 6)
    assert cut_out(batch, 0) is batch
    blanked = cut == 0
    assert torch.equal(cut[~blanked], batch[~blanked])
    for image in blanked[:, 0]:
        rows, cols = image.any(dim=1).nonzero().flatten(), image.any(dim=0).nonzero().flatten()
        assert 1 <= len(rows) <= 6 and 1 <= len(cols) <= 6
        assert image.sum() == len(rows) * len(cols), "one axis-aligned rectangle (a square cut by the border)"
    assert (blanked.sum(dim=(1, 2, 3)) == 36).sum() > 25, "most squares lie inside the image"
    corners = {tuple(image.nonzero().min(dim=0).values.tolist()) for image in blanked[:, 0]}
    assert len(corners) > 48, "each image draws its own square, not one square for the batch"


# --- the consistency loss ------------------------------------------------------------------------------------


def logits_with_top_probability(tops):
    """Logits whose softmax gives class i % 10 probability tops[i] and spreads the rest evenly."""
    rows = []
    for i, top in enumerate(tops):
        p = torch.full((10,), (1 - top) / 9)
        p[i % 10] = top
        rows.append(p.log())
    return torch.stack(rows)


def test_the_pseudo_label_mask_keeps_exactly_the_targets_at_or_above_the_threshold():
    target = logits_with_top_probability([0.99, 0.96, 0.94, 0.5, 0.951, 0.2])
    assert confident(target, 0.95).tolist() == [1, 1, 0, 0, 1, 0]
    assert confident(target, 0.0).tolist() == [1] * 6 and confident(target, 1.0).tolist() == [0] * 6
    strong = torch.randn(6, 10)
    per_image = F.cross_entropy(strong, target.argmax(dim=1), reduction="none")
    for threshold, kept in ((0.95, [0, 1, 4]), (0.0, range(6)), (0.995, [])):
        loss = consistency_loss(strong, target, mode="hard", threshold=threshold, temperature=1.0)
        torch.testing.assert_close(loss, per_image[list(kept)].sum() / 6)  # the mean over the whole batch
        soft = consistency_loss(strong, target, mode="soft", threshold=threshold, temperature=1.0)
        assert (soft == 0) == (len(list(kept)) == 0), "the mask applies to soft targets too"


def test_soft_targets_sharpen_with_a_temperature_below_one():
    target = torch.randn(32, 10)
    plain = F.softmax(target, dim=1)
    torch.testing.assert_close(sharpened(target, 1.0), plain)
    sharp, sharper = sharpened(target, 0.5), sharpened(target, 0.1)
    assert torch.equal(sharp.argmax(dim=1), plain.argmax(dim=1)), "the same class, surer"
    assert (plain.amax(dim=1) < sharp.amax(dim=1)).all() and (sharp.amax(dim=1) < sharper.amax(dim=1)).all()
    torch.testing.assert_close(sharp.sum(dim=1), torch.ones(32))


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_the_loss_is_zero_when_the_strong_view_predicts_the_target_and_no_gradient_reaches_the_target(mode):
    torch.manual_seed(0)
    target = torch.randn(16, 10, requires_grad=True)
    if mode == "soft":
        matching = (target.detach() / 0.4).clone()  # softmax(matching) is the sharpened target itself
    else:
        matching = 60.0 * F.one_hot(target.detach().argmax(dim=1), 10).float()  # sure of the target's class
    options = {"mode": mode, "threshold": 0.0, "temperature": 0.4}
    assert consistency_loss(matching, target, **options).abs() < 1e-5
    strong = torch.randn(16, 10, requires_grad=True)
    loss = consistency_loss(strong, target, **options)
    assert loss > 0.1
    loss.backward()
    assert target.grad is None and strong.grad is not None and strong.grad.abs().sum() > 0


def test_the_soft_loss_is_kl_from_the_sharpened_target_to_the_strong_prediction_and_hard_is_cross_entropy():
    """UDA's direction, KL(target || strong), checked against torch's kl_div; FixMatch's against cross_entropy."""
    torch.manual_seed(3)
    strong, target = torch.randn(8, 10), 3 * torch.randn(8, 10)
    q = sharpened(target, 0.4)
    expected = F.kl_div(F.log_softmax(strong, 1), q, reduction="none").sum(1).mean()
    soft = consistency_loss(strong, target, mode="soft", threshold=0.0, temperature=0.4)
    assert soft > 0.1 and torch.allclose(soft, expected)
    hard = consistency_loss(strong, target, mode="hard", threshold=0.0, temperature=0.4)
    assert torch.allclose(hard, F.cross_entropy(strong, target.argmax(1)))


# --- Conv-Small ----------------------------------------------------------------------------------------------


def test_conv_small_maps_digits_to_ten_logits_and_takes_a_shared_dropout_mask():
    torch.manual_seed(0)
    model = build_model(architecture="conv-small").to(memory_format=torch.channels_last).train()
    assert isinstance(model, ConvSmall)
    x = torch.rand(5, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    mask = model.dropout_mask(5, x)
    assert model(x).shape == (5, 10) and mask.shape == (5, 96 * 14 * 14 + 192 * 7 * 7)
    assert set(mask.unique().tolist()) == {0.0, 2.0}, "p = 0.5, scaled"
    assert torch.equal(model(x, mask), model(x, mask)), "one mask, one prediction (VAT's shared passes)"
    assert not torch.equal(model(x), model(x)), "without a mask, each pass draws its own"
    assert torch.equal(model.dropout_mask(5, x, p=0.0), torch.ones_like(mask))
    model.eval()
    assert torch.equal(model(x, mask), model(x)), "no dropout in evaluation"
    with pytest.raises(ValueError, match="unknown model"):
        build_model(architecture="resnet")


@pytest.mark.parametrize("architecture", [pytest.param("conv-small", marks=pytest.mark.slow), "article"])  # 3 s
def test_a_model_round_trips_through_model_pt_predict_and_torch_export(architecture, tmp_path):
    from job.predict import load_model

    torch.manual_seed(0)
    model = build_model(24, architecture)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so evaluation mode shows
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    model.eval()
    record = model_record(model)
    assert record["architecture"] == architecture and ("hidden_units" in record) == (architecture == "article")
    save_checkpoint(tmp_path / "model.pt", {"model": model.state_dict(), "step": -1, **record})  # as train.py does
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    expected = model(images.unsqueeze(1).float() / 255.0)
    torch.testing.assert_close(load_model(tmp_path / "model.pt")(images), expected)
    torch.testing.assert_close(exported(model).module()(images), expected, atol=1e-5, rtol=1e-4)
    assert type(model_from_record({"hidden_units": 24})).__name__ == "ArticleCNN", "a model.pt from before VAT_MODEL"


# --- the options in training -----------------------------------------------------------------------------------


def test_strong_augmentation_of_the_labelled_batch_changes_its_images_and_keeps_their_labels(mnist_split, monkeypatch):
    labels_seen = []
    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda logits, labels: labels_seen.append(labels) or real(logits, labels))
    for augment in ("weak", "strong"):
        trainer = Trainer(
            "baseline", small_settings(labeled_augment=augment, translate_px=0, hidden_units=24), mnist_split, CPU
        )
        trainer.model.train()
        inputs: list[torch.Tensor] = []
        hook = trainer.model.register_forward_pre_hook(lambda module, args, into=inputs: into.append(args[0].clone()))
        trainer.update(0)
        hook.remove()
        original = as_float_batch(mnist_split.train_images[mnist_split.labeled])
        changed = (inputs[0] - original).abs().sum(dim=(1, 2, 3))
        assert torch.equal(labels_seen[-1], mnist_split.train_labels[mnist_split.labeled]), "the same labels, in order"
        if augment == "weak":
            assert changed.max() == 0, "VAT_TRANSLATE_PX=0: the images as they are"
        else:
            assert (changed > 0).all(), "every labelled image transformed"


@pytest.mark.slow
def test_targets_come_from_the_weight_average_in_evaluation_mode(mnist_split, monkeypatch):
    import job.train as train_module

    calls, vat_targets = [], []
    real, real_lds = train_module.targets_from_weight_average, train_module.lds_loss

    def spy(average, x):
        out = real(average, x)
        calls.append((average, average.training, out.requires_grad, out))
        return out

    def lds_spy(forward, x, clean_logits, **kwargs):
        vat_targets.append((clean_logits, kwargs["target_logits"]))
        return real_lds(forward, x, clean_logits, **kwargs)

    monkeypatch.setattr(train_module, "targets_from_weight_average", spy)
    monkeypatch.setattr(train_module, "lds_loss", lds_spy)
    options = dict(consistency_weight=1.0, consistency_threshold=0.0, ema_decay=0.9, hidden_units=24)
    both = dict(consistency_targets_from="weight_average", vat_targets_from="weight_average")
    trainer = Trainer("vat", small_settings(**both, **options), mnist_split, CPU)
    trainer.model.train()
    losses = trainer.update(0)
    assert [call[:3] for call in calls] == [(trainer.ema.module, False, False)] and losses[3] > 0
    direction_from, pulled_towards = vat_targets[0]
    assert pulled_towards is calls[0][3], "VAT pulls the perturbed prediction towards the average's"
    assert direction_from is not calls[0][3] and direction_from.requires_grad, "its direction: the model's own"
    assert trainer.model.training, "the model being trained stays in training mode"
    calls.clear()
    Trainer("vat", small_settings(**options), mnist_split, CPU).update(0)
    assert calls == [], "VAT_*_TARGETS_FROM=model: no pass of the average"
    off = dict(options, consistency_weight=0.0, vat_weight=0.0, entmin_weight=1.0)
    Trainer("vat", small_settings(**both, **off), mnist_split, CPU).update(0)
    assert calls == [], "the average's targets are not computed for terms that are off"
    with pytest.raises(ConfigError, match="VAT_VAT_TARGETS_FROM=weight_average needs a weight average"):
        load_settings(env_file=None, vat_targets_from="weight_average", ema_decay=0.0)
    with pytest.raises(ConfigError, match="VAT_CONSISTENCY_TARGETS_FROM=weight_average needs a weight average"):
        load_settings(env_file=None, consistency_targets_from="weight_average", consistency_weight=1.0, ema_decay=0.0)
    # Off, a term needs no target and so no average: its unused setting is not an error (as elsewhere).
    load_settings(env_file=None, consistency_targets_from="weight_average", consistency_weight=0.0, ema_decay=0.0)
    load_settings(env_file=None, vat_targets_from="weight_average", vat_weight=0.0, ema_decay=0.0)


def test_with_the_options_off_an_update_draws_and_computes_what_it_did_before_them(mnist_split, monkeypatch):
    """Off (as in the article preset), nothing of them runs: the same draws from the generator, the same numbers as
    before them."""
    import job.train as train_module

    for name in ("strongly_augmented", "consistency_term", "targets_from_weight_average"):
        monkeypatch.setattr(train_module, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} ran"))
    for phase in ("baseline", "vat"):
        trainer = Trainer(phase, small_settings(hidden_units=24, consistency_weight=0.0), mnist_split, CPU)
        assert trainer.update(0)[3] == 0


def test_consistency_alone_skips_vats_passes(mnist_split, monkeypatch):
    import job.train as train_module

    monkeypatch.setattr(train_module, "lds_loss", lambda *a, **k: pytest.fail("LDS computed at VAT_VAT_WEIGHT=0"))
    s = small_settings(vat_weight=0.0, consistency_weight=1.0, consistency_threshold=0.0, hidden_units=24)
    trainer = Trainer("vat", s, mnist_split, CPU)
    trainer.model.train()
    losses = trainer.update(0)
    assert losses[1] == 0 and losses[3] > 0


def test_an_update_records_the_share_of_targets_the_threshold_keeps(mnist_split, monkeypatch):
    """The history's `confident` column is the mask rate a FixMatch user watches: all at threshold 0, none at 1,
    and 0 while the term is off."""
    import job.train as train_module

    targets, shares = [], {}
    monkeypatch.setattr(train_module, "consistency_term", lambda *a: targets.append(a[2]) or consistency_term(*a))
    for threshold in (0.0, 0.5, 1.0):
        s = small_settings(consistency_weight=1.0, consistency_threshold=threshold, hidden_units=24)
        trainer = Trainer("vat", s, mnist_split, CPU)
        trainer.model.train()
        shares[threshold] = trainer.update(0)[HISTORY_NAMES.index("confident")].item()
        assert shares[threshold] == confident(targets[-1], threshold).mean().item(), "the mask the loss used"
    assert shares[0.0] == 1.0 and shares[1.0] == 0.0
    trainer = Trainer("vat", small_settings(hidden_units=24, consistency_weight=0.0), mnist_split, CPU)
    trainer.model.train()
    assert trainer.update(0)[HISTORY_NAMES.index("confident")] == 0


def test_the_consistency_term_ramps_up_and_at_the_start_of_its_ramp_changes_nothing(mnist_split):
    def weights_after_one_update(step: int, **options) -> dict[str, torch.Tensor]:
        trainer = Trainer(
            "vat", small_settings(hidden_units=24, consistency_threshold=0.0, **options), mnist_split, CPU
        )
        trainer.update(step)
        return weights(trainer.model)

    ramped = dict(consistency_weight=2.0, consistency_rampup_steps=4)
    assert ramped_weights(2, small_settings(**ramped))["consistency"] == 1.0
    at_once = dict(consistency_rampup_steps=0)  # full weight from the first update (the default ramps since 0.2.0)
    assert_same_weights(weights_after_one_update(0, **ramped), weights_after_one_update(0, consistency_weight=0.0))
    assert_same_weights(
        weights_after_one_update(2, **ramped), weights_after_one_update(2, consistency_weight=1.0, **at_once)
    )
    assert_same_weights(
        weights_after_one_update(5, **ramped), weights_after_one_update(5, consistency_weight=2.0, **at_once)
    )
    unramped = weights_after_one_update(2, consistency_weight=2.0, **at_once)
    assert any(not torch.equal(unramped[k], v) for k, v in weights_after_one_update(2, **ramped).items())


def test_under_cuda_graphs_the_ramped_weights_are_the_same_device_scalars_filled_anew_each_update(mnist_split):
    # A captured graph reads the tensors it was captured with: replacing one by a float would freeze its weight.
    trainer = Trainer(
        "vat",
        small_settings(
            hidden_units=24,
            consistency_weight=2.0,
            consistency_rampup_steps=4,
            entmin_weight=1.0,
            entmin_rampup_steps=8,
        ),
        mnist_split,
        CPU,
    )
    held = {term: torch.zeros(()) for term in ("entmin", "consistency")}  # as the Trainer holds them on a GPU
    trainer.ramped = dict(held)
    for step, expected in ((1, {"entmin": 0.125, "consistency": 0.5}), (6, {"entmin": 0.75, "consistency": 2.0})):
        trainer.update(step)
        assert all(trainer.ramped[term] is held[term] for term in held)
        assert {term: held[term].item() for term in held} == expected


def test_progress_lines_show_the_consistency_term_and_its_confident_share_only_when_it_is_on():
    from job.progress import Progress

    losses = dict.fromkeys(HISTORY_NAMES, 0.5)
    log = RecordingLog()
    for weight in (0.0, 1.0):
        Progress(small_settings(consistency_weight=weight), log)("vat", 10, 100, 2.0, 1e-3, losses)
    (_, off), (_, on) = log.records
    assert not {"consistency", "confident"} & set(off) and {"consistency", "confident"} <= set(on)


def test_before_vat_runs_the_time_left_counts_the_strong_pass():
    from job.progress import CONSISTENCY_COST, Progress

    def vat_seconds_left(weight: float) -> float:  # during the baseline, from its rate of 10 updates/s
        progress = Progress(small_settings(consistency_weight=weight), RecordingLog())
        return progress.job_seconds_left("baseline", 5, 5, 10.0)

    assert vat_seconds_left(1.0) == pytest.approx(vat_seconds_left(0.0) * CONSISTENCY_COST) and CONSISTENCY_COST > 1


EVERYTHING_ON = dict(
    labeled_augment="strong",
    consistency_weight=1.0,
    consistency_targets="soft",
    consistency_threshold=0.0,
    consistency_targets_from="weight_average",
    vat_targets_from="weight_average",
    ema_decay=0.9,
    entmin_weight=1.0,
    consistency_rampup_steps=4,  # a resume after update 2 continues the ramp where it was
    strong_cutout_px=8,  # off by default since 0.2.0: its draws too
    hidden_units=24,
)


@pytest.mark.slow  # trains four phases: ten seconds and more
@pytest.mark.parametrize(
    "phase, options",
    [
        ("vat", EVERYTHING_ON),
        # Hard targets on the other network, with a threshold that drops every target at first and keeps some later.
        ("vat", {**EVERYTHING_ON, "model": "conv-small", "consistency_targets": "hard", "consistency_threshold": 0.15}),
        ("baseline", {"labeled_augment": "strong", "model": "conv-small", "baseline_steps": 3}),
    ],
)
def test_resumed_with_every_option_on_equals_uninterrupted(mnist_split, tmp_path, phase, options):
    s = small_settings(checkpoint_every=100, **options)
    straight = run_phase(phase, s, mnist_split, tmp_path / "straight")
    with pytest.raises(Interrupted):
        run_phase(phase, s, mnist_split, tmp_path / "resumed", stop=stop_after(2))
    resumed = run_phase(phase, s, mnist_split, tmp_path / "resumed")
    assert resumed.resumed_from == 2
    assert_same_weights(weights(straight.model), weights(resumed.model))
    assert straight.history == resumed.history, "the losses and the confident share"
    if phase == "vat":
        consistency = straight.history["consistency"]
        if options["consistency_threshold"] == 0:
            assert all(value > 0 for value in consistency), "the term was on"
        else:  # the young teacher's targets fall below the threshold at first, some pass it after the resume
            assert consistency[:2] == [0.0, 0.0] and any(value > 0 for value in consistency[2:]), consistency
        assert [c > 0 for c in consistency] == [share > 0 for share in straight.history["confident"]]


def test_the_article_preset_has_every_option_off_and_the_default_only_the_consistency_term():
    article = load_settings(env_file=None, preset="article")
    assert (article.model, article.labeled_augment, article.consistency_weight) == ("article", "weak", 0.0)
    assert (article.consistency_targets_from, article.vat_targets_from) == ("model", "model")
    for name in ("model", "labeled_augment", "consistency_weight", "consistency_targets_from", "vat_targets_from"):
        assert name in ARTICLE_PRESET, f"the article preset says {name} explicitly"
    # A record (checkpoint, report) from before the options reads as the article's values, so `collect` keeps a
    # nightly configuration of the article one group across the change.
    fields = TrainingOptions.model_fields
    assert as_used({n: getattr(article, n) for n in fields}) == as_used({n: IMPLICIT_BEFORE_ADDED[n] for n in fields})
    # The default since 0.2.0 (issue 26): FixMatch's term beside VAT, hard targets above 0.95, no cutout, ramped in
    # over 1,500 updates; a record from before the options differs from it in the term's weight alone (the ramp and
    # the cutout are not used where the term is off), so its resume under the default is refused, never mixed.
    default = load_settings(env_file=None, preset="default")
    chosen = dict(
        consistency_weight=1.0, consistency_targets="hard", consistency_threshold=0.95, consistency_rampup_steps=1500
    )
    assert {n: getattr(default, n) for n in chosen} == chosen and default.strong_cutout_px == 0
    assert (default.model, default.labeled_augment, default.consistency_targets_from) == ("article", "weak", "model")
    before = as_used({n: IMPLICIT_BEFORE_ADDED[n] for n in fields})
    now = as_used({n: getattr(default, n) for n in fields})
    assert {n for n in fields if before[n] != now[n]} == {"consistency_weight"}


def test_every_training_option_is_recorded_in_the_vat_checkpoint():
    # An option left out of the record would let a resume mix two experiments without a word.
    assert set(TrainingOptions.model_fields) <= set(TRAINING_FIELDS["vat"])


def test_a_resume_across_a_changed_option_is_refused_and_old_checkpoints_count_as_all_off(mnist_split, tmp_path):
    quick = dict(train_steps=2, checkpoint_every=1, hidden_units=24, ema_decay=0.0, consistency_weight=0.0)
    run_phase("vat", small_settings(**quick), mnist_split, tmp_path)
    changes = {
        "consistency_weight": (0.5, "VAT_CONSISTENCY_WEIGHT was 0.0, now 0.5"),
        "model": ("conv-small", "VAT_MODEL was 'article', now 'conv-small'"),
        "labeled_augment": ("strong", "VAT_LABELED_AUGMENT was 'weak', now 'strong'"),
    }
    for name, (value, message) in changes.items():
        with pytest.raises(ResumeMismatch, match=message) as refused:
            run_phase("vat", small_settings(**{**quick, name: value}), mnist_split, tmp_path)
        assert "default" not in str(refused.value)  # the operator chose the new value
    # After an upgrade that changed a default, the operator changed nothing: the refusal says where the value came from.
    without_decay = {k: v for k, v in quick.items() if k != "ema_decay"}
    with pytest.raises(ResumeMismatch, match=r"VAT_EMA_DECAY was 0.0, now 0.999 \(this version's default\)"):
        run_phase("vat", small_settings(**without_decay), mnist_split, tmp_path)
    for path in tmp_path.glob("checkpoint-*.pt"):  # as written before the options existed
        state = load_checkpoint(path)
        state["settings"] = {k: v for k, v in state["settings"].items() if k not in TrainingOptions.model_fields}
        state["history"] = state["history"][:, :3]  # no consistency column yet
        save_checkpoint(path, state)
    with pytest.raises(ResumeMismatch, match="VAT_CONSISTENCY_WEIGHT was 0.0, now 0.5"):
        run_phase("vat", small_settings(**{**quick, "consistency_weight": 0.5}), mnist_split, tmp_path)
    # Such a run, resumed by a version whose default has the term on (0.2.0), is refused unless the old value is set.
    with pytest.raises(ResumeMismatch, match=r"VAT_CONSISTENCY_WEIGHT was 0.0, now 1.0 \(this version's default\)"):
        run_phase(
            "vat",
            small_settings(**{k: v for k, v in quick.items() if k != "consistency_weight"}),
            mnist_split,
            tmp_path,
        )
    resumed = run_phase("vat", small_settings(**quick), mnist_split, tmp_path)
    assert resumed.resumed_from == 2 and resumed.history["consistency"] == resumed.history["confident"] == [0.0, 0.0]


def test_a_checkpoint_from_before_the_confident_column_resumes_with_its_share_unknown_not_zero(mnist_split, tmp_path):
    quick = dict(train_steps=4, checkpoint_every=2, hidden_units=24, consistency_weight=1.0, consistency_threshold=0.0)
    with pytest.raises(Interrupted):
        run_phase("vat", small_settings(**quick), mnist_split, tmp_path, stop=stop_after(2))
    for path in tmp_path.glob("checkpoint-*.pt"):  # as written before the column: four losses, consistency on
        state = load_checkpoint(path)
        state["history"] = state["history"][:, :4]
        save_checkpoint(path, state)
    resumed = run_phase("vat", small_settings(**quick), mnist_split, tmp_path)
    share = resumed.history["confident"]
    assert resumed.resumed_from == 2 and all(math.isnan(v) for v in share[:2]) and share[2:] == [1.0, 1.0], share
    assert all(v > 0 for v in resumed.history["consistency"]), "the losses the checkpoint kept"


def test_a_checkpoint_with_more_history_columns_than_this_job_knows_is_skipped_as_unreadable(mnist_split, tmp_path):
    s = small_settings(train_steps=2, checkpoint_every=1, hidden_units=24)
    run_phase("vat", s, mnist_split, tmp_path)
    newest = tmp_path / checkpoint_name(2)
    state = load_checkpoint(newest)
    state["history"] = torch.cat([state["history"], state["history"][:, :1]], dim=1)
    save_checkpoint(newest, state)
    skipped = []
    expected = ("vat", Trainer("vat", s, mnist_split, CPU).model.state_dict(), s)
    state = latest_intact_checkpoint(tmp_path, lambda path, error: skipped.append((path, str(error))), expected)
    assert state["step"] == 1 and skipped[0][0] == newest and "6 columns, this job knows 5" in skipped[0][1]


def test_an_option_the_run_does_not_use_neither_refuses_a_resume_nor_splits_a_collect_group(mnist_split, tmp_path):
    """Consistency off: its target kind, threshold and source and the strong transform change nothing; hard targets:
    the temperature changes nothing. Such a value is recorded at its default, so a resume goes on and `collect`
    counts the run with the others; a value that is used still refuses the resume and splits the group."""
    from job.collect import configuration

    quick = dict(train_steps=2, checkpoint_every=1, hidden_units=24, ema_decay=0.9)
    off = dict(quick, consistency_weight=0.0)
    unused_when_off = dict(
        consistency_targets="soft",
        consistency_threshold=0.5,
        consistency_temperature=2.0,
        consistency_targets_from="weight_average",
        strong_cutout_px=4,
        strong_rotate_deg=5.0,
        consistency_rampup_steps=10,
    )
    run_phase("vat", small_settings(**off), mnist_split, tmp_path / "off")
    for name, value in unused_when_off.items():
        resumed = run_phase("vat", small_settings(**off, **{name: value}), mnist_split, tmp_path / "off")
        assert resumed.resumed_from == 2, name

    hard = dict(quick, consistency_weight=0.5, consistency_targets="hard")
    on = tmp_path / "on"
    run_phase("vat", small_settings(**hard), mnist_split, on)
    assert run_phase("vat", small_settings(**hard, consistency_temperature=2.0), mnist_split, on).resumed_from == 2
    used = {
        "consistency_threshold": (0.5, "VAT_CONSISTENCY_THRESHOLD was 0.95, now 0.5"),
        "strong_cutout_px": (4, "VAT_STRONG_CUTOUT_PX was 0, now 4"),
        "consistency_targets_from": ("weight_average", "VAT_CONSISTENCY_TARGETS_FROM was 'model', now 'weight_avera"),
        "consistency_rampup_steps": (4, "VAT_CONSISTENCY_RAMPUP_STEPS was 1500, now 4"),
        "consistency_targets": ("soft", "VAT_CONSISTENCY_TARGETS was 'hard', now 'soft'"),
        "vat_targets_from": ("weight_average", "VAT_VAT_TARGETS_FROM was 'model', now 'weight_average'"),
    }
    for name, (value, message) in used.items():
        with pytest.raises(ResumeMismatch, match=message):
            run_phase("vat", small_settings(**{**hard, name: value}), mnist_split, on)

    def group_of(**settings):
        return configuration({"settings": small_settings(**settings).public_dict()})

    assert all(
        group_of(consistency_weight=0.0, **{name: value}) == group_of(consistency_weight=0.0)
        for name, value in unused_when_off.items()
    )
    assert group_of(consistency_weight=0.5, consistency_threshold=0.5) != group_of(consistency_weight=0.5)
    assert group_of(strong_cutout_px=4, labeled_augment="strong") != group_of(labeled_augment="strong")
    assert group_of(vat_weight=0.0, vat_targets_from="weight_average", ema_decay=0.9) == group_of(
        vat_weight=0.0, ema_decay=0.9
    )
