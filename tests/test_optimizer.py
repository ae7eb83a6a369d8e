"""The exact batched optimizer (CartoonX and Pixel RDE)."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from amortized_cartoonx.errors import ConfigError, InputError, NonFiniteError
from amortized_cartoonx.optimizer import (
    LR_DECAYS,
    SCHEDULE_FIELDS,
    SCHEDULES,
    CartoonX,
    OptimizerConfig,
    PixelRDE,
    default_chunk,
)

FAST = {"steps": 30, "num_samples": 4}


class Recorder(torch.nn.Module):
    """``inner``, calling ``record(inputs, outputs)`` on every forward pass."""

    def __init__(self, inner, record):
        super().__init__()
        self.inner, self.record = inner, record

    def forward(self, x):
        out = self.inner(x)
        self.record(x, out)
        return out


def test_explanation_fields_and_shapes(tiny_cnn, images):
    exp = CartoonX(tiny_cnn, levels=3, **FAST).explain(images)
    n = images.shape[0]
    assert exp.method == "cartoonx" and len(exp) == n
    assert exp.image.shape == (n, 1, 48, 48)
    assert exp.mask.num_channels == 1 and exp.mask.levels == 3
    for name in (
        "target",
        "prob_original",
        "prob_masked",
        "prob_obfuscated",
        "distortion",
        "mask_mean",
        "loss",
        "steps",
    ):
        assert getattr(exp, name).shape == (n,), name
    assert exp.history.total.shape == (30, n)
    assert exp.steps.tolist() == [30] * n
    assert exp.seconds > 0
    torch.testing.assert_close(exp.loss, exp.distortion + 20.0 * exp.mask_mean)
    torch.testing.assert_close(exp.mask_mean, exp.mask.mean_per_image())
    assert exp.settings["l1_lambda"] == 20.0 and exp.settings["wave"] == "db3"
    assert exp.image.min() >= 0 and exp.image.max() <= 1


def test_mask_stays_in_unit_interval_and_loss_falls(tiny_cnn, images):
    exp = CartoonX(tiny_cnn, levels=3, steps=40, num_samples=4, lr=0.05).explain(images)
    flat = exp.mask.flatten()
    assert flat.min() >= 0 and flat.max() <= 1
    assert (flat == 0).any()  # the projection was active
    assert (exp.history.total[-5:].mean(0) < exp.history.total[:5].mean(0)).all()


def test_batch_equals_one_by_one(tiny_cnn, images):
    opt = CartoonX(tiny_cnn, levels=3, steps=15, num_samples=4, lr=0.02)
    batch = opt.explain(images, seeds=[5, 6, 7])
    for i, seed in enumerate([5, 6, 7]):
        single = opt.explain(images[i : i + 1], seeds=[seed])
        torch.testing.assert_close(single.mask.flatten(), batch.mask.flatten()[i : i + 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(single.history.total[:, 0], batch.history.total[:, i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(single.distortion, batch.distortion[i : i + 1], atol=1e-6, rtol=1e-4)


def test_chunked_samples_equal_unchunked(tiny_cnn, images):
    full = CartoonX(tiny_cnn, levels=3, steps=10, num_samples=6, lr=0.02, chunk_size=6).explain(images)
    chunked = CartoonX(tiny_cnn, levels=3, steps=10, num_samples=6, lr=0.02, chunk_size=4).explain(images)
    torch.testing.assert_close(chunked.mask.flatten(), full.mask.flatten(), atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.history.total, full.history.total, atol=1e-5, rtol=1e-5)


def test_default_chunk_keeps_cpu_passes_cache_sized_and_gpu_passes_whole():
    def on(device, n, size):
        return torch.empty(n, 3, size, size, device=device)

    assert default_chunk(64, on("cpu", 1, 256)) == 16  # 16 obfuscations of 256 px per pass
    assert default_chunk(64, on("cpu", 4, 256)) == 4  # 4 images x 4 samples
    assert default_chunk(64, on("cpu", 1, 64)) == 64  # small images: one pass
    assert default_chunk(64, on("cpu", 2, 1024)) == 1  # never below one sample
    assert default_chunk(64, on("meta", 1, 256)) == 64  # accelerators take every sample at once


def test_same_seed_same_result_other_seed_other_result(tiny_cnn, images):
    opt = CartoonX(tiny_cnn, levels=3, steps=10, num_samples=4, lr=0.02)
    a, b, c = (
        opt.explain(images, seeds=[1, 2, 3]),
        opt.explain(images, seeds=[1, 2, 3]),
        opt.explain(images, seeds=[4, 5, 6]),
    )
    assert torch.equal(a.mask.flatten(), b.mask.flatten())
    assert not torch.equal(a.mask.flatten(), c.mask.flatten())


def test_callers_model_is_left_as_it_was(tiny_cnn, images):
    tiny_cnn.train()
    tiny_cnn.features[0].weight.requires_grad_(True)
    tiny_cnn.head.bias.requires_grad_(False)
    flags = [(m, m.training) for m in tiny_cnn.modules()]
    grads = [(p, p.requires_grad) for p in tiny_cnn.parameters()]
    state = copy.deepcopy(tiny_cnn.state_dict())
    CartoonX(tiny_cnn, levels=3, **FAST).explain(images)
    assert all(m.training == mode for m, mode in flags)
    assert all(p.requires_grad == flag for p, flag in grads)
    assert all(p.grad is None for p in tiny_cnn.parameters())
    for key, value in tiny_cnn.state_dict().items():
        assert torch.equal(value, state[key]), key  # BatchNorm running stats untouched (eval mode inside)


def test_targets_per_image(tiny_cnn, images):
    exp = CartoonX(tiny_cnn, levels=3, steps=2, num_samples=2).explain(images, target=[4, 0, 2])
    assert exp.target.tolist() == [4, 0, 2]
    probs = tiny_cnn.eval()(images).softmax(1)
    torch.testing.assert_close(exp.prob_original, probs[torch.arange(3), torch.tensor([4, 0, 2])])


def test_init_mask_with_zero_steps_is_returned_clamped(tiny_cnn, images):
    opt = CartoonX(tiny_cnn, levels=3, **FAST)
    like = opt.representation.encode(images).mask_like()
    init = torch.rand(like.flatten().shape, generator=torch.Generator().manual_seed(0)) * 1.4 - 0.2
    exp = opt.explain(images, init_mask=init, steps=0)
    torch.testing.assert_close(exp.mask.flatten(), init.clamp(0, 1))
    assert exp.steps.tolist() == [0, 0, 0] and exp.history.total.shape == (0, 3)
    warm = opt.explain(images, init_mask=init, steps=5)
    assert warm.steps.tolist() == [5, 5, 5]
    with pytest.raises(InputError, match="does not fit"):
        opt.explain(images, init_mask=torch.ones(3, 10))


def test_early_stopping_stops_each_image(tiny_cnn, images):
    exp = CartoonX(tiny_cnn, levels=3, steps=400, num_samples=2, lr=0.1, stop_patience=5, stop_tolerance=0.05).explain(
        images
    )
    assert (exp.steps < 400).all()
    last = exp.history.total[-1]
    for n in range(3):  # history after an image stopped repeats its last value
        torch.testing.assert_close(exp.history.total[int(exp.steps[n]) - 1, n], last[n])


def test_a_saved_explanation_records_the_steps_run_and_the_levels_used(tiny_cnn, images, tmp_path):
    """The settings' steps (the config's) and distortion (the measure's name) overwrote the results in the file:
    an early stop or explain(steps=4) was saved as the config's steps; levels=7 on a small image as 7 levels."""
    from amortized_cartoonx.explanation import load_saved_explanation

    optimizer = CartoonX(tiny_cnn, levels=7, steps=9, num_samples=2, stop_patience=1, stop_tolerance=0.99)
    explanation = optimizer.explain(images, steps=4)
    explanation.save(tmp_path / "last.safetensors", -1)
    saved = load_saved_explanation(tmp_path / "last.safetensors")["metadata"]
    assert saved["steps"] == int(explanation.steps[-1]) < 4 and saved["settings"]["steps"] == 4  # the call's
    assert saved["settings"]["init_mask"] == "ones" and saved["seed_used"] == 2  # image 2 of seed 0: seed 2
    assert saved["distortion"] == float(explanation.distortion[-1]) and saved["settings"]["distortion"] == "label"
    assert saved["levels_used"] == len(explanation.mask.details) < 7 and saved["wave"] == "db3"
    assert explanation.mask.select(-1).lowpass.shape[0] == 1 and explanation.history.select(-1).total.shape[1] == 1
    with pytest.raises(IndexError, match="outside a batch of 3"):
        explanation.save(tmp_path / "x.safetensors", 3)


def test_pixel_rde_uses_a_pixel_mask_and_its_own_lambda(tiny_cnn, images):
    exp = PixelRDE(tiny_cnn, steps=5, num_samples=2).explain(images)
    assert exp.method == "pixel-rde"
    assert exp.mask.levels == 0 and exp.mask.lowpass.shape == (3, 1, 48, 48)
    assert exp.settings["l1_lambda"] == 4.0
    # explanation = mask * grey image
    torch.testing.assert_close(exp.image, (exp.mask.lowpass * images.mean(1, keepdim=True)).clamp(0, 1))


def test_full_mask_keeps_the_decision(tiny_cnn, images):
    exp = CartoonX(tiny_cnn, levels=3, steps=0, num_samples=4).explain(images)
    torch.testing.assert_close(exp.prob_masked, exp.prob_original, atol=1e-4, rtol=0)
    torch.testing.assert_close(exp.distortion, torch.zeros(3), atol=1e-8, rtol=0)


def test_bad_configuration_is_refused(tiny_cnn):
    with pytest.raises(ConfigError, match="num_samples"):
        CartoonX(tiny_cnn, num_samples=0)
    with pytest.raises(ConfigError, match="unknown distortion"):
        CartoonX(tiny_cnn, distortion="l3")
    with pytest.raises(ConfigError, match="steps"):
        OptimizerConfig(steps=-1).validate()


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("steps", "100", "steps must be an integer, got '100'"),
        ("steps", True, "steps must be an integer, got True"),
        ("num_samples", 2.5, "num_samples must be an integer"),
        ("seed", "a", "seed must be an integer"),
        ("l1_lambda", "20", "l1_lambda must be a number"),
        ("lr", None, None),  # None: the schedule's
    ],
)
def test_counts_must_be_integers_and_rates_numbers(field, value, needle):
    config = OptimizerConfig(**{field: value})
    if needle is None:
        assert config.validate() is config
        return
    with pytest.raises(ConfigError, match=re.escape(needle)):
        config.validate()


def test_numpy_numbers_and_an_int_lr_are_accepted(tiny_cnn, images):
    config = OptimizerConfig(steps=np.int64(2), num_samples=np.int32(2), lr=1, l1_lambda=np.float32(20))
    assert CartoonX(tiny_cnn, levels=3, config=config).explain(images[:1]).steps.tolist() == [2]
    with pytest.raises(ConfigError, match="steps must be an integer"):
        CartoonX(tiny_cnn, levels=3, steps=2, num_samples=2).explain(images[:1], steps=2.5)
    with pytest.raises(ConfigError, match="wavelet levels must be an integer"):
        CartoonX(tiny_cnn, levels="3")


def test_schedules_fill_steps_and_lr_unless_given():
    paper = OptimizerConfig()
    assert (paper.schedule, paper.steps, paper.lr, paper.lr_decay) == ("paper", 2000, 1e-3, "constant")
    mine = OptimizerConfig(steps=7, lr=0.5)
    assert (mine.steps, mine.lr, mine.lr_decay) == (7, 0.5, "constant")
    for name, preset in SCHEDULES.items():
        assert set(preset) == set(SCHEDULE_FIELDS)  # every schedule fills every field a new schedule refills
        config = OptimizerConfig(schedule=name)
        assert all(getattr(config, k) == v for k, v in preset.items())
    with pytest.raises(ConfigError, match="unknown schedule"):
        OptimizerConfig(schedule="warp")
    with pytest.raises(ConfigError, match="lr_decay"):
        OptimizerConfig(lr_decay="step").validate()
    with pytest.raises(ConfigError, match="finite"):
        OptimizerConfig(lr=float("nan")).validate()


def test_a_schedule_given_as_an_override_brings_its_own_steps_and_lr(tiny_cnn):
    # dataclasses.replace on the default config would keep the paper's 2000 steps at lr 1e-3 under the name "fast"
    fast = CartoonX(tiny_cnn, levels=3, schedule="fast").config
    assert all(getattr(fast, k) == v for k, v in SCHEDULES["fast"].items())
    assert CartoonX(tiny_cnn, levels=3, schedule="fast", lr=0.3).config.lr == 0.3
    mine = OptimizerConfig(lr=0.05)
    assert mine.replace(steps=9).lr == 0.05  # no new schedule: nothing else changes
    assert mine.replace(schedule="paper").lr == 0.05
    refine = OptimizerConfig(schedule="fast", num_samples=8).replace(schedule="refine")
    assert (refine.steps, refine.num_samples) == (SCHEDULES["refine"]["steps"], 8)
    with pytest.raises(ConfigError, match=r"use config.replace\(schedule='paper'\)"):
        refine.schedule = "paper"  # would have kept refine's steps and lr under the name 'paper'
    refine.schedule = "refine"  # the same name is harmless


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_decayed_schedules_are_deterministic_batched_and_stay_in_the_unit_interval(tiny_cnn, images, decay):
    opt = CartoonX(tiny_cnn, levels=3, steps=12, num_samples=4, lr=0.1, lr_decay=decay)
    batch = opt.explain(images, seeds=[5, 6, 7])
    again = opt.explain(images, seeds=[5, 6, 7])
    assert torch.equal(batch.mask.flatten(), again.mask.flatten())
    flat = batch.mask.flatten()
    assert flat.min() >= 0 and flat.max() <= 1
    single = opt.explain(images[1:2], seeds=[6])
    torch.testing.assert_close(single.mask.flatten(), flat[1:2], atol=1e-5, rtol=0)
    constant = CartoonX(tiny_cnn, levels=3, steps=12, num_samples=4, lr=0.1).explain(images, seeds=[5, 6, 7])
    assert not torch.equal(constant.mask.flatten(), flat)  # the decay changed the path


def test_the_learning_rate_follows_the_decay():
    assert LR_DECAYS["constant"](5, 10, 0.0) == 1.0
    assert LR_DECAYS["linear"](0, 10, 0.0) == 1.0 and LR_DECAYS["linear"](5, 10, 0.0) == 0.5
    assert LR_DECAYS["cosine"](0, 10, 0.1) == pytest.approx(1.0) and LR_DECAYS["cosine"](10, 10, 0.1) == pytest.approx(
        0.1
    )
    values = [LR_DECAYS["cosine"](s, 10, 0.0) for s in range(10)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_a_diverging_loss_stops_with_a_clear_error(images):
    class FineOnceThenNaN(torch.nn.Module):
        """Finite logits for the original images (the check on the way in), NaN under noise."""

        calls = 0

        def forward(self, x):
            self.calls += 1
            logits = torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)
            return logits if self.calls == 1 else logits * float("nan")

    with pytest.raises(NonFiniteError, match="RDE loss of image 0 became nan"):
        CartoonX(FineOnceThenNaN(), levels=3, steps=10, num_samples=2).explain(images)


def test_logit_parametrisation_is_deterministic_batched_and_in_the_unit_interval(tiny_cnn, images):
    config = OptimizerConfig(steps=20, num_samples=4, lr=0.2, parametrisation="logit")
    batch = CartoonX(tiny_cnn, levels=3, config=config).explain(images, seeds=[1, 2, 3])
    again = CartoonX(tiny_cnn, levels=3, config=config).explain(images, seeds=[1, 2, 3])
    assert torch.equal(batch.mask.flatten(), again.mask.flatten())
    one = CartoonX(tiny_cnn, levels=3, config=config).explain(images[1:2], seeds=[2])
    assert torch.allclose(one.mask.flatten(), batch.mask.flatten()[1:2], atol=1e-5)
    flat = batch.mask.flatten()
    assert bool(((flat >= 0) & (flat <= 1)).all())
    assert bool((batch.history.total[-1] < batch.history.total[0]).all())
    # chunked noise samples give the same result (each backward pass has its own graph from the logits)
    chunked = CartoonX(tiny_cnn, levels=3, config=config, chunk_size=2).explain(images, seeds=[1, 2, 3])
    assert torch.allclose(chunked.mask.flatten(), flat, atol=1e-5)


def test_logit_parametrisation_starts_from_the_given_mask(tiny_cnn, images):
    config = OptimizerConfig(steps=0, num_samples=4, parametrisation="logit")
    explainer = CartoonX(tiny_cnn, levels=3, config=config)
    start = explainer.explain(images[:1]).mask.flatten()
    assert torch.allclose(start, torch.ones_like(start))  # the all-ones mask, at finite logits
    given = torch.rand_like(start)
    given[:10] = 0.0
    assert torch.allclose(explainer.explain(images[:1], init_mask=given).mask.flatten(), given, atol=1e-5)
    with pytest.raises(ConfigError, match="parametrisation"):
        OptimizerConfig(parametrisation="tanh").validate()


def test_bf16_precision_runs_the_classifier_in_bf16_and_measures_in_float32(tiny_cnn, images):
    seen = []
    config = OptimizerConfig(steps=15, num_samples=4, lr=0.05)
    model = Recorder(tiny_cnn, lambda x, out: seen.append(out.dtype))
    low = CartoonX(model, levels=3, config=config, precision="bf16").explain(images, seeds=[1, 2, 3])
    assert torch.bfloat16 in seen  # the steps ran under autocast
    assert seen[0] == torch.float32 and seen[-1] == torch.float32  # the start and the measurement did not
    assert low.settings["precision"] == "bf16"
    assert low.loss.dtype == torch.float32 and bool(torch.isfinite(low.loss).all())
    again = CartoonX(model, levels=3, config=config, precision="bf16").explain(images, seeds=[1, 2, 3])
    assert torch.equal(low.mask.flatten(), again.mask.flatten())  # deterministic
    full = CartoonX(tiny_cnn, levels=3, config=config).explain(images, seeds=[1, 2, 3])
    assert not torch.equal(low.mask.flatten(), full.mask.flatten())  # bf16 really changed the arithmetic
    torch.testing.assert_close(low.loss, full.loss, rtol=0.1, atol=0.02)  # ... but not the result
    flat = low.mask.flatten()
    assert bool(((flat >= 0) & (flat <= 1)).all())
    with pytest.raises(ConfigError, match="precision"):
        OptimizerConfig(precision="fp16").validate()


def test_noise_samples_ramp_from_first_to_final(tiny_cnn, images):
    from amortized_cartoonx.optimizer import samples_at

    assert [samples_at(s, 5, 4, 12) for s in range(5)] == [4, 6, 8, 10, 12]
    assert samples_at(3, 5, 8, None) == 8 and samples_at(0, 1, 4, 12) == 4
    drawn = []
    config = OptimizerConfig(steps=5, num_samples=2, final_samples=6, lr=0.05, measure_samples=3)
    counting = Recorder(tiny_cnn, lambda x, out: drawn.append(x.shape[0]))
    ramped = CartoonX(counting, levels=3, config=config).explain(images[:1], seeds=[4])
    assert drawn[1:6] == [2, 3, 4, 5, 6]  # the steps, after the clean pass
    assert 3 in drawn[6:] and max(drawn[6:]) == 3  # the measurement: measure_samples, not the ramp's end
    again = CartoonX(tiny_cnn, levels=3, config=config).explain(images[:1], seeds=[4])
    assert torch.equal(ramped.mask.flatten(), again.mask.flatten())
    chunked = CartoonX(tiny_cnn, levels=3, config=config, chunk_size=2).explain(images[:1], seeds=[4])
    assert torch.allclose(chunked.mask.flatten(), ramped.mask.flatten(), atol=1e-5)
    flat = ramped.mask.flatten()
    assert bool(((flat >= 0) & (flat <= 1)).all())
    with pytest.raises(ConfigError, match="final_samples"):
        OptimizerConfig(final_samples=0).validate()


def test_settings_added_later_leave_old_cache_keys_and_manifests_valid():
    from amortized_cartoonx.evaluation.cache import settings_hash
    from amortized_cartoonx.optimizer import LATER_DEFAULTS, without_later_defaults

    old = {"method": "cartoonx", "steps": 200, "nested": [{"lr": 0.1}]}
    new = {**old, **LATER_DEFAULTS, "nested": [{"lr": 0.1, "precision": "fp32"}]}
    assert without_later_defaults(new) == old
    assert settings_hash(new) == settings_hash(old)
    assert settings_hash({**old, "precision": "bf16"}) != settings_hash(old)
    assert settings_hash({**old, "final_samples": 16}) != settings_hash(old)
    assert set(LATER_DEFAULTS) <= set(OptimizerConfig().__dict__)
    defaults = OptimizerConfig()
    assert all(getattr(defaults, k) == v for k, v in LATER_DEFAULTS.items())  # the neutral values are the defaults


def test_an_explanation_is_reproduced_from_its_settings_and_seeds(tiny_cnn, images):
    """explain(steps=, seeds=, init_mask=) changed the masks but not the record: settings said the config's steps
    and seed, and nothing of the start mask."""
    optimizer = CartoonX(tiny_cnn, levels=2, steps=9, num_samples=2, lr=0.05)
    start = torch.full((images.shape[0], optimizer.representation.encode(images).numel_per_channel()), 0.5)
    first = optimizer.explain(images, steps=3, seeds=[11, 12, 13], init_mask=start)
    assert first.seeds == [11, 12, 13] and first.settings["steps"] == 3 and first.settings["init_mask"] == "given"
    config = {k: first.settings[k] for k in ("lr", "num_samples", "lr_decay", "steps")}
    again = CartoonX(tiny_cnn, levels=2, **config).explain(images, seeds=first.seeds, init_mask=start)
    assert torch.equal(again.mask.flatten(), first.mask.flatten())
