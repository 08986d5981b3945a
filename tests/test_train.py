import dataclasses
import os
import pickle

import pytest
import torch
from torch.nn import functional as F

from job.augment import strongly_augmented, training_batch
from job.checkpoint import CheckpointError, latest_intact_checkpoint, load_checkpoint, save_checkpoint
from job.consistency import consistency_term
from job.logs import get_logger
from job.train import Hooks, Interrupted, StopFlag, Trainer, train_phase
from job.vat import entropy_with_logits, lds_loss, marginal_entropy_with_logits
from tests.support import RecordingLog, assert_same_weights, run_phase, small_settings, stop_after, weights

CPU = torch.device("cpu")


@pytest.mark.slow  # trains several phases: tens of seconds
def test_same_seed_same_result_and_another_seed_differs(mnist_split, tmp_path):
    s = small_settings()
    first = run_phase("vat", s, mnist_split, tmp_path / "a")
    second = run_phase("vat", s, mnist_split, tmp_path / "b")
    assert_same_weights(weights(first.model), weights(second.model))
    assert first.history == second.history
    other = run_phase("vat", small_settings(seed=7), mnist_split, tmp_path / "c")
    assert not torch.equal(other.model.fc2.weight, first.model.fc2.weight)


@pytest.mark.parametrize("phase", ["baseline", "vat"])
def test_training_reads_the_labels_of_the_labelled_images_and_no_other(mnist_split, tmp_path, phase):
    """Every label but the 100 of the labelled set changed: the same training, bit for bit."""
    others = torch.cat([mnist_split.unlabeled, mnist_split.seeded_test])
    labels = mnist_split.train_labels.clone()
    labels[others] = (labels[others] + 1) % 10
    hidden = dataclasses.replace(mnist_split, train_labels=labels)
    s = small_settings(hidden_units=24, baseline_steps=2, train_steps=2)  # a few updates show any label read
    seen = run_phase(phase, s, mnist_split, tmp_path / "seen")
    blind = run_phase(phase, s, hidden, tmp_path / "blind")
    assert_same_weights(weights(seen.model), weights(blind.model))
    assert seen.history == blind.history


@pytest.mark.slow  # trains several phases: tens of seconds
@pytest.mark.parametrize(
    "phase, options",
    [
        ("baseline", {}),
        ("vat", {}),
        ("vat", {"ema_decay": 0.9, "translate_px": 2}),
        ("baseline", {"translate_px": 2}),
        ("vat", {"rotate_deg": 15.0, "elastic_px": 1.0, "balance_weight": 0.5}),
    ],
)
def test_interrupted_and_resumed_equals_uninterrupted(mnist_split, tmp_path, phase, options):
    s = small_settings(checkpoint_every=100, **options)
    straight = run_phase(phase, s, mnist_split, tmp_path / "straight")
    with pytest.raises(Interrupted) as info:
        run_phase(phase, s, mnist_split, tmp_path / "resumed", stop=stop_after(3))
    assert info.value.step == 3 and info.value.checkpoint.exists()
    resumed = run_phase(phase, s, mnist_split, tmp_path / "resumed")
    assert resumed.resumed_from == 3
    assert_same_weights(weights(straight.model), weights(resumed.model))
    assert straight.history == resumed.history


def test_finished_phase_is_not_trained_again(mnist_split, tmp_path):
    s = small_settings()
    done = run_phase("baseline", s, mnist_split, tmp_path)
    again = run_phase("baseline", s, mnist_split, tmp_path)
    assert again.resumed_from == s.baseline_steps
    assert_same_weights(weights(done.model), weights(again.model))


def test_the_loop_reports_every_updates_progress_and_where_a_resume_starts(mnist_split, tmp_path):
    settings = small_settings(log_every_s=1e-9, lr=0.002)  # a progress line after every update
    log, progress = RecordingLog(), []
    hooks = Hooks(log=log, on_progress=lambda *args: progress.append(args))
    train_phase("baseline", settings, mnist_split, CPU, tmp_path, StopFlag(), hooks)
    assert [(phase, done, total) for phase, done, total, *_ in progress] == [("baseline", n, 4) for n in (1, 2, 3, 4)]
    assert all(rate > 0 for *_, rate, _, _ in progress)
    assert [lr for *_, lr, _ in progress] == pytest.approx([0.002 * (1 - step / 4) for step in range(4)])
    assert log.events() == ["training_started"]
    log.records.clear()
    train_phase("baseline", settings, mnist_split, CPU, tmp_path, StopFlag(), hooks)
    assert log.records == [("resumed", {"phase": "baseline", "step": 4, "of": 4})], "finished: nothing trains again"


def test_resume_with_other_training_settings_is_refused(mnist_split, tmp_path):
    from job.checkpoint import ResumeMismatch

    run_phase("baseline", small_settings(), mnist_split, tmp_path)
    with pytest.raises(ResumeMismatch, match="VAT_LR was 0.001, now 0.01"):
        run_phase("baseline", small_settings(lr=0.01), mnist_split, tmp_path)


def test_the_run_folder_keeps_the_newest_checkpoints_and_a_resume_uses_them(mnist_split, tmp_path):
    s = small_settings(keep_checkpoints=1, baseline_steps=6)
    with pytest.raises(Interrupted):
        run_phase("baseline", s, mnist_split, tmp_path, stop=stop_after(5))
    assert [path.name for path in tmp_path.glob("checkpoint-*.pt")] == ["checkpoint-0000005.pt"]
    assert run_phase("baseline", s, mnist_split, tmp_path).resumed_from == 5
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*.pt")) == ["checkpoint-0000006.pt"]


@pytest.mark.slow
def test_checkpoints_a_resume_skipped_as_damaged_never_push_out_the_one_just_written(mnist_split, tmp_path):
    s = small_settings(baseline_steps=6)  # VAT_KEEP_CHECKPOINTS=2
    with pytest.raises(Interrupted):
        run_phase("baseline", s, mnist_split, tmp_path, stop=stop_after(5))  # leaves 4 and 5
    for path in tmp_path.glob("checkpoint-*.pt"):
        path.write_bytes(path.read_bytes()[:100])  # both damaged: the resume starts from scratch
    written = []
    hooks = Hooks(log=get_logger(), on_checkpoint=lambda path: written.append((path.name, path.exists())))
    assert train_phase("baseline", s, mnist_split, CPU, tmp_path, StopFlag(), hooks).resumed_from is None
    assert written and all(exists for _, exists in written), written
    assert max(p.name for p in tmp_path.glob("checkpoint-*.pt")) == "checkpoint-0000006.pt"


@pytest.mark.slow  # trains several phases: tens of seconds
def test_hidden_units_set_the_width_both_models_train_and_ship_and_a_resume_must_keep(mnist_split, tmp_path):
    from job.checkpoint import ResumeMismatch

    s = small_settings(hidden_units=24, ema_decay=0.9)
    for phase in ("baseline", "vat"):
        result = run_phase(phase, s, mnist_split, tmp_path / phase)
        assert result.model.fc1.out_features == 24 and result.model.fc2.in_features == 24
        shipped = torch.load(tmp_path / phase / "model.pt", weights_only=True)
        assert shipped["hidden_units"] == 24 and shipped["model"]["fc1.weight"].shape == (24, 7 * 7 * 64)
    with pytest.raises(ResumeMismatch, match="VAT_HIDDEN_UNITS was 24, now 1024"):  # the default width
        run_phase("vat", small_settings(ema_decay=0.9), mnist_split, tmp_path / "vat")


@pytest.mark.slow  # trains several phases: tens of seconds
def test_checkpoints_from_before_hidden_units_existed_are_the_articles_width_and_unknown_settings_are_refused(
    mnist_split, tmp_path
):
    """Not skipped as corrupt (which would retrain from scratch over the run's files): refused, or resumed."""
    from job.checkpoint import ResumeMismatch

    article_width = small_settings(hidden_units=100)
    run_phase("baseline", article_width, mnist_split, tmp_path)
    for path in tmp_path.glob("checkpoint-*.pt"):
        state = load_checkpoint(path)
        for added_later in ("hidden_units", "rotate_deg"):  # as written before these settings existed
            del state["settings"][added_later]
        save_checkpoint(path, state)
    with pytest.raises(ResumeMismatch, match="VAT_ROTATE_DEG was 0.0, now 10.0"):
        run_phase("baseline", small_settings(hidden_units=100, rotate_deg=10), mnist_split, tmp_path)
    with pytest.raises(ResumeMismatch, match="VAT_HIDDEN_UNITS was 100, now 24"):
        run_phase("baseline", small_settings(hidden_units=24), mnist_split, tmp_path)
    with pytest.raises(ResumeMismatch, match="VAT_HIDDEN_UNITS was 100, now 1024"):  # not silently the new default
        run_phase("baseline", small_settings(), mnist_split, tmp_path)
    assert run_phase("baseline", article_width, mnist_split, tmp_path).resumed_from == 4

    for path in tmp_path.glob("checkpoint-*.pt"):
        state = load_checkpoint(path)
        state["settings"]["pixel_dropout"] = 0.1  # a setting of a newer version
        save_checkpoint(path, state)
    with pytest.raises(ResumeMismatch, match="another version of vat-job"):
        run_phase("baseline", article_width, mnist_split, tmp_path)


def batchnorm_statistics(model):
    return {name: b.clone() for name, b in model.named_buffers() if name.startswith("bn")}


@pytest.mark.parametrize("mode", ["frozen", "update"])
def test_perturbed_passes_normalise_with_batch_statistics_and_leave_the_running_ones_alone_when_frozen(
    mnist_split, monkeypatch, mode
):
    """The passes inside the LDS (the power iteration's and the perturbed one) see each batch through its own
    statistics, as in training, not the running ones (eval mode); with VAT_PERTURBED_BN=frozen (the default) they
    leave the running mean, variance and count exactly as they were, with "update" they fold into them."""
    import job.train as train_module

    trainer = Trainer("vat", small_settings(perturbed_bn=mode, power_iterations=2), mnist_split, CPU)
    model = trainer.model.train()
    norms = [model.bn1, model.bn2]
    passes, statistics = [], {}

    def normalised_with_batch_statistics(norm, inputs, output):
        expected = F.batch_norm(inputs[0], None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
        passes.append(torch.allclose(output, expected, rtol=1e-4, atol=1e-5))

    def spy(*args, **kwargs):
        statistics["before"] = batchnorm_statistics(model)
        hooks = [norm.register_forward_hook(normalised_with_batch_statistics) for norm in norms]
        try:
            return real(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
            statistics["after"] = batchnorm_statistics(model)

    real = train_module.lds_loss
    monkeypatch.setattr(train_module, "lds_loss", spy)
    trainer.update(0)
    trainer.update(1)  # the running statistics now hold two updates' worth: far from any one batch's
    assert len(passes) == 2 * len(norms) * 3 and all(passes), "per update and layer: 2 power iterations, 1 perturbed"
    before, after = statistics["before"], statistics["after"]
    assert before.keys() == after.keys() and len(before) == 6
    unchanged = {name for name in before if torch.equal(before[name], after[name])}
    assert unchanged == (set(before) if mode == "frozen" else set()), mode


def test_amp_bf16_update_runs_and_keeps_the_power_iteration_in_float32(mnist_split, monkeypatch):
    import job.train as train_module

    seen = []
    real = train_module.lds_loss

    def spy(forward, x, clean_logits, **kw):
        seen.append((clean_logits.dtype, kw["power_forward"](x).dtype, forward(x).dtype))
        return real(forward, x, clean_logits, **kw)

    monkeypatch.setattr(train_module, "lds_loss", spy)
    trainer = Trainer("vat", small_settings(amp="bf16"), mnist_split, CPU)
    trainer.model.train()
    labelled = []  # the labelled pass runs under autocast too
    trainer.model.register_forward_hook(lambda _, args, out: labelled.append(out.dtype) if len(args) == 1 else None)
    losses = trainer.update(0)
    assert torch.isfinite(losses).all() and losses[1] > 0
    assert seen == [(torch.float32, torch.float32, torch.bfloat16)] and labelled == [torch.bfloat16]


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "checkpoint-0000002.pt"
    with path.open("wb") as handle:
        torch.save({"model": Exploit(), "step": 2}, handle, pickle_module=pickle)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_newest_checkpoint_falls_back_to_an_older_intact_one(tmp_path):
    save_checkpoint(tmp_path / "checkpoint-0000002.pt", {"model": {"w": torch.ones(3)}, "step": 2})
    save_checkpoint(tmp_path / "checkpoint-0000004.pt", {"model": {"w": torch.ones(3)}, "step": 4})
    newest = tmp_path / "checkpoint-0000004.pt"
    newest.write_bytes(newest.read_bytes()[:200])
    corrupt = []
    state = latest_intact_checkpoint(tmp_path, lambda path, error: corrupt.append(path))
    assert state["step"] == 2 and corrupt == [newest]


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "checkpoint-0000002.pt"
    save_checkpoint(path, {"model": {}, "step": 2})
    before = path.read_bytes()
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_checkpoint(path, {"model": lambda: None, "step": 3})  # not picklable
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file left behind"


@pytest.mark.slow  # trains several phases: tens of seconds
def test_entmin_weight_ramps_up_linearly_and_a_resumed_run_continues_the_ramp(mnist_split, tmp_path):
    from job.schedules import ramped_weight

    assert [ramped_weight(step, 0.5, 4) for step in (0, 1, 2, 4, 9)] == [0.0, 0.125, 0.25, 0.5, 0.5]
    assert ramped_weight(0, 0.5, 0) == 0.5
    s = small_settings(entmin_weight=1.0, entmin_rampup_steps=4, checkpoint_every=100)
    straight = run_phase("vat", s, mnist_split, tmp_path / "straight")
    with pytest.raises(Interrupted):
        run_phase("vat", s, mnist_split, tmp_path / "resumed", stop=stop_after(3))
    resumed = run_phase("vat", s, mnist_split, tmp_path / "resumed")
    assert_same_weights(weights(straight.model), weights(resumed.model))
    unramped = run_phase("vat", small_settings(entmin_weight=1.0), mnist_split, tmp_path / "unramped")
    assert not torch.equal(unramped.model.fc2.weight, straight.model.fc2.weight), "the ramp changes the updates"


def test_without_dropout_the_unlabelled_passes_are_deterministic_given_the_batch(mnist_split):
    trainer = Trainer("vat", small_settings(dropout_masks="none"), mnist_split, CPU)
    model = trainer.model.train()
    x = torch.rand(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    keep_all = model.dropout_mask(8, x, p=0.0)
    assert torch.equal(keep_all, torch.ones(8, model.hidden_units))
    assert torch.equal(model(x, keep_all), model(x, keep_all))
    assert not torch.equal(model(x), model(x)), "the default mask drops units"
    assert torch.isfinite(trainer.update(0)).all()


@pytest.mark.parametrize("masks", ["shared", "independent", "none"])
def test_the_unlabelled_passes_of_one_update_take_the_dropout_mask_the_setting_names(mnist_split, masks):
    """The seed's perturbed passes drew their own masks, so the probe measured dropout noise as well as the
    perturbation; "shared" gives every pass of one update (clean, power iterations, perturbed) the same mask."""
    settings = small_settings(dropout_masks=masks, power_iterations=2, consistency_weight=0.0)  # VAT's passes alone
    trainer = Trainer("vat", settings, mnist_split, CPU)
    unlabelled = []
    trainer.model.register_forward_pre_hook(
        lambda _, args: unlabelled.append(args[1] if len(args) > 1 else None) if len(args[0]) == 32 else None
    )
    trainer.update(0)
    assert len(unlabelled) == 1 + 2 + 1, "clean, two power iterations, perturbed"
    if masks == "independent":
        assert unlabelled == [None] * 4, "each pass draws its own, as nn.Dropout would"
        return
    assert all(mask is unlabelled[0] for mask in unlabelled)
    assert set(unlabelled[0].unique().tolist()) == ({1.0} if masks == "none" else {0.0, 2.0})


def test_the_clean_pass_builds_a_graph_only_for_a_term_that_trains_through_it(mnist_split, monkeypatch):
    """Without EntMin and the balance term the clean prediction is only a target (VAT's, and under the default the
    consistency term's): no graph, no entropy."""
    import job.train

    targets = []
    monkeypatch.setattr(job.train, "lds_loss", lambda *args, **kw: targets.append(args[2]) or lds_loss(*args, **kw))
    for entmin, balance, graph in [(0.0, 0.0, False), (0.0, 0.5, True), (1.0, 0.0, True)]:
        trainer = Trainer("vat", small_settings(entmin_weight=entmin, balance_weight=balance), mnist_split, CPU)
        targets.clear()
        entropy = trainer.update(0)[2]
        assert targets[0].requires_grad == graph and (entropy > 0) == graph, (entmin, balance)


def test_an_update_hands_each_term_its_settings_and_the_clean_prediction(mnist_split, monkeypatch):
    """test_vat and test_consistency test the terms themselves; this is what the trainer passes them and how it
    weighs them (the balance term is subtracted: it maximises the entropy of the batch's mean prediction)."""
    import job.train

    settings = small_settings(
        epsilon=2.5,
        epsilon_scaling="input_norm",
        xi=0.5,
        power_iterations=2,
        vat_weight=0.5,
        balance_weight=0.3,
        consistency_weight=0.0,  # its hand-off: tests/test_consistency.py
    )
    trainer = Trainer("vat", settings, mnist_split, CPU)
    calls, losses, clean = {}, [], []

    def lds_spy(forward, x, clean_logits, **options):
        calls["lds"] = (x, clean_logits, options)
        return lds_loss(forward, x, clean_logits, **options)

    backward = trainer._backward
    monkeypatch.setattr(job.train, "lds_loss", lds_spy)
    monkeypatch.setattr(trainer, "_backward", lambda loss: (losses.append(loss.detach()), backward(loss)))
    trainer.model.register_forward_hook(lambda _, args, out: clean.append(out.detach()) if len(args[0]) == 32 else None)
    ce, lds, entropy, *_ = trainer.update(5)
    x, clean_logits, options = calls["lds"]
    assert len(x) == 32 and torch.equal(clean_logits.detach(), clean[0]) and options["target_logits"] is clean_logits
    assert {k: options[k] for k in ("epsilon", "epsilon_scaling", "xi", "power_iterations")} == {
        "epsilon": 2.5,
        "epsilon_scaling": "input_norm",
        "xi": 0.5,
        "power_iterations": 2,
    }
    assert trainer.ramped["entmin"] > 0 and torch.allclose(entropy, entropy_with_logits(clean[0]))
    entmin_term = trainer.ramped["entmin"] * entropy - 0.3 * marginal_entropy_with_logits(clean[0])
    assert torch.allclose(torch.stack(losses), torch.stack([ce, entmin_term, 0.5 * lds]))


@pytest.mark.parametrize(("shift", "rotate", "elastic"), [(2, 0.0, 0.0), (0, 20.0, 0.0), (0, 0.0, 2.0), (1, 10.0, 1.0)])
def test_the_trainers_batches_are_augmented_as_the_settings_say(mnist_split, shift, rotate, elastic):
    trainer = Trainer(
        "vat", small_settings(translate_px=shift, rotate_deg=rotate, elastic_px=elastic), mnist_split, CPU
    )
    torch.manual_seed(3)
    images, indices = trainer.batch(mnist_split.unlabeled, 16)
    torch.manual_seed(3)
    expected = training_batch(mnist_split.train_images, mnist_split.unlabeled, 16, shift, rotate, elastic)
    assert torch.equal(indices, expected[1]) and torch.equal(images, expected[0])
    plain = mnist_split.train_images[indices].unsqueeze(1).float() / 255
    assert not torch.equal(images, plain), "augmented"


@pytest.mark.parametrize("decay", ["linear", "none"])
def test_each_update_steps_the_optimiser_at_the_schedules_learning_rate(mnist_split, decay):
    trainer = Trainer("vat", small_settings(lr=0.002, lr_decay=decay), mnist_split, CPU)
    trainer.optimizer.param_groups[0]["lr"] = 1.0  # what the step must not see
    stepped, step_once = [], trainer._step
    trainer._step = lambda: (stepped.append(trainer.optimizer.param_groups[0]["lr"]), step_once())
    for step in (0, 3, 5):
        trainer.update(step)
    expected = [0.002 * (1 - step / 6) if decay == "linear" else 0.002 for step in (0, 3, 5)]
    assert stepped == pytest.approx(expected)


def test_the_consistency_term_gets_a_strong_view_of_the_same_images_and_the_updates_dropout_mask(
    mnist_split, monkeypatch
):
    import job.train

    # At full weight from the first update and every target kept, so that the term and its weight are not 0.
    settings = small_settings(
        consistency_weight=0.5, consistency_rampup_steps=0, consistency_threshold=0.0, vat_weight=0.0
    )
    trainer = Trainer("vat", settings, mnist_split, CPU)
    calls, batches, masks, losses = [], [], [], []

    def term_spy(model, strong, targets, mask, settings):
        calls.append((strong, targets, mask))
        return consistency_term(model, strong, targets, mask, settings)

    def augment_spy(images, strength):
        calls.append((images, strongly_augmented(images, strength)))
        return calls[-1][1]

    batch, backward = trainer.batch, trainer._backward
    monkeypatch.setattr(job.train, "consistency_term", term_spy)
    monkeypatch.setattr(job.train, "strongly_augmented", augment_spy)
    monkeypatch.setattr(trainer, "batch", lambda *args: batches.append(batch(*args)) or batches[-1])
    monkeypatch.setattr(trainer, "_backward", lambda loss: (losses.append(loss.detach()), backward(loss)))
    trainer.model.register_forward_pre_hook(lambda _, args: masks.append(args[1]) if len(args) > 1 else None)
    outputs = []
    trainer.model.register_forward_hook(lambda _, args, out: outputs.append(out) if len(args) > 1 else None)
    consistency = trainer.update(0)[3]
    (images, augmented), (strong, targets, mask) = calls
    (_, unlabelled) = batches[-1]
    assert torch.equal(images, mnist_split.train_images[unlabelled]), "the unlabelled batch's own images"
    assert strong is augmented and targets is outputs[0], "the strong view against the clean pass's prediction"
    assert mask is masks[0], "the clean pass's mask (VAT_DROPOUT_MASKS=shared)"
    assert consistency > 0 and torch.allclose(losses[-1], 0.5 * consistency)


def test_a_baseline_update_sees_the_labelled_batch_only(mnist_split):
    trainer = Trainer("baseline", small_settings(labeled_batch_size=20), mnist_split, CPU)
    sizes = []
    trainer.model.register_forward_pre_hook(lambda _, args: sizes.append(len(args[0])))
    losses = trainer.update(0)
    assert sizes == [20] and losses[0] > 0 and not losses[1:].any(), "one labelled pass, no unlabelled term"


@pytest.mark.parametrize("ema_decay", [0.0, 0.999])
def test_batchnorm_reestimation_gives_the_average_statistics_of_the_unlabelled_images(mnist_split, tmp_path, ema_decay):
    from job.data import as_float_batch

    split = dataclasses.replace(mnist_split, unlabeled=mnist_split.unlabeled[:256])
    s = small_settings(
        bn_reestimate=True, num_unlabeled=256, unlabeled_batch_size=32, train_steps=2, ema_decay=ema_decay
    )
    model = run_phase("vat", s, split, tmp_path).model
    images = as_float_batch(split.train_images[split.unlabeled], channels_last=True)
    with torch.no_grad():
        conv1 = model.conv1(images)
    # With equal batches the average of the batch means is the mean over all images.
    torch.testing.assert_close(model.bn1.running_mean, conv1.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    state = load_checkpoint(tmp_path / "checkpoint-0000002.pt")
    # The shipped model is re-estimated: the weight average when there is one, else the last weights.
    saved = state["ema"]["module.bn1.running_mean"] if ema_decay else state["model"]["bn1.running_mean"]
    assert torch.equal(saved, model.bn1.running_mean), "the final checkpoint holds the re-estimated statistics"


def test_shifted_images_are_the_same_digits_moved_by_at_most_the_limit(mnist_split):
    from job.augment import randomly_shifted

    images = mnist_split.train_images[mnist_split.labeled[:50]]
    assert randomly_shifted(images, 0) is images
    shifted = randomly_shifted(images, 2)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    moved = 0
    for original, image in zip(images, shifted, strict=True):
        # The image must be a window of the zero-padded original at one offset in [0, 4]^2 (a shift in [-2, 2]).
        padded = torch.nn.functional.pad(original, (2, 2, 2, 2))
        found = [(r, c) for r in range(5) for c in range(5) if torch.equal(padded[r : r + 28, c : c + 28], image)]
        assert found, "not a pure translation within 2 pixels"
        moved += (2, 2) not in found
    assert moved > 35  # 24 of 25 shifts move the image


def test_rotated_images_are_the_same_digits_turned_about_their_centre(mnist_split):
    from job.augment import randomly_deformed, warped
    from job.data import as_float_batch

    batch = as_float_batch(mnist_split.train_images[mnist_split.labeled[:20]], channels_last=True)
    assert randomly_deformed(batch, 0, 0) is batch
    quarter = torch.full((20,), torch.pi / 2)
    # A quarter turn maps the pixel grid onto itself: it must be rot90 exactly (up to rounding), not a resampling.
    torch.testing.assert_close(warped(batch, quarter), torch.rot90(batch, k=1, dims=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(warped(batch, torch.zeros(20)), batch, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    turned = randomly_deformed(batch, 10.0, 0)
    assert turned.shape == batch.shape and turned.is_contiguous(memory_format=torch.channels_last)
    ink, turned_ink = batch.sum(dim=(1, 2, 3)), turned.sum(dim=(1, 2, 3))
    torch.testing.assert_close(turned_ink, ink, rtol=0.03, atol=0)  # bilinear resampling keeps the ink
    change = (turned - batch).abs().sum(dim=(1, 2, 3)) / ink
    assert (change > 0.01).sum() >= 18 and (change < 0.9).all()  # nearly all moved, none beyond recognition


def test_elastic_displacements_have_the_set_size_and_are_smooth_and_distort_each_image_its_own_way(mnist_split):
    from job.augment import ELASTIC_SMOOTHING_PX, randomly_deformed, smooth_noise, warped
    from job.data import as_float_batch

    torch.manual_seed(0)
    field = smooth_noise(400, 28, ELASTIC_SMOOTHING_PX, CPU)
    assert field.shape == (400, 28, 28, 2)
    assert abs(field.std().item() - 1.0) < 0.05  # unit standard deviation at every pixel, so VAT_ELASTIC_PX is pixels
    neighbours = torch.corrcoef(torch.stack([field[:, :-1].flatten(), field[:, 1:].flatten()]))[0, 1]
    assert neighbours > 0.9  # smooth: a rubber-sheet warp, not pixel noise

    batch = as_float_batch(mnist_split.train_images[mnist_split.labeled[:20]], channels_last=True)
    # A uniform displacement of one pixel's width (2/28 in grid units) to the right samples from the right: a shift.
    shift = torch.zeros(20, 28, 28, 2)
    shift[..., 0] = 2 / 28
    torch.testing.assert_close(warped(batch, torch.zeros(20), shift)[..., :-1], batch[..., 1:], atol=1e-5, rtol=0)
    distorted = randomly_deformed(batch, 0, 1.0)
    ink = batch.sum(dim=(1, 2, 3))
    torch.testing.assert_close(distorted.sum(dim=(1, 2, 3)), ink, rtol=0.35, atol=0)  # strokes stretch, not vanish
    change = (distorted - batch).abs().sum(dim=(1, 2, 3)) / ink
    assert (change > 0.05).all() and change.std() > 0.02  # every image distorted, each by its own field


def test_the_balance_term_pulls_a_lopsided_batch_toward_equal_classes():
    from job.vat import entropy_with_logits, marginal_entropy_with_logits

    uniform_mean = torch.eye(10).repeat(3, 1) * 30  # confident, and every class equally often
    torch.testing.assert_close(marginal_entropy_with_logits(uniform_mean), torch.log(torch.tensor(10.0)))
    assert entropy_with_logits(uniform_mean) < 1e-6  # EntMin alone cannot tell the two batches apart
    lopsided = torch.zeros(30, 10)
    lopsided[:, 3] = 30.0
    assert marginal_entropy_with_logits(lopsided) < 1e-3
    logits = torch.randn(64, 10)
    logits[:, 3] += 4.0  # most of the batch says "3"
    logits.requires_grad_()
    marginal_entropy_with_logits(logits).backward()
    with torch.no_grad():
        shares = torch.softmax(logits + 0.5 * logits.grad, dim=1).mean(dim=0)  # a step that maximises it
    assert shares[3] < torch.softmax(logits, dim=1).mean(dim=0)[3]


def test_weight_average_starts_at_the_weights_and_follows_them_with_the_warm_up_decay():
    from job.model import build_model, weight_average

    torch.manual_seed(0)
    model = build_model()
    ema = weight_average(model, decay=0.99)
    ema.update_parameters(model)  # n=0: a copy
    assert torch.equal(ema.module.fc2.weight, model.fc2.weight)
    previous = ema.module.fc2.weight.detach().clone()
    with torch.no_grad():
        model.fc2.weight.add_(1.0)
    ema.update_parameters(model)  # n=1: keep (1+1)/(10+1) of the average
    keep = 2 / 11
    expected = keep * previous + (1 - keep) * model.fc2.weight.detach()
    assert torch.allclose(ema.module.fc2.weight, expected, atol=1e-6)
    assert torch.equal(ema.module.bn1.num_batches_tracked, model.bn1.num_batches_tracked)


@pytest.mark.slow
def test_vat_with_weight_average_ships_the_average(mnist_split, tmp_path):
    result = run_phase("vat", small_settings(ema_decay=0.9), mnist_split, tmp_path)
    assert result.model is not result.last_weights
    assert not torch.equal(result.model.fc2.weight, result.last_weights.fc2.weight)
    saved = load_checkpoint(tmp_path / "model.pt")["model"]
    assert torch.equal(saved["fc2.weight"], result.model.fc2.weight.detach())
