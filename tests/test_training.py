"""Training the amortized explainer: a few Lightning steps lower the loss, teachers, checkpoints, the network's
config, the run's Trainer, cartoonx fit."""

from __future__ import annotations

import csv
import dataclasses
import inspect
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from amortized_cartoonx.errors import ConfigError
from amortized_cartoonx.evaluation.agreement import mask_agreement
from amortized_cartoonx.io import file_sha256
from amortized_cartoonx.mask_logits import sigmoid_for_mask
from amortized_cartoonx.mask_predictor import MaskPredictorConfig, logits_to_mask
from amortized_cartoonx.rde import make_generators

pl = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")  # the frozen classifier

from amortized_cartoonx.amortized import AmortizedExplainer  # noqa: E402
from amortized_cartoonx.optimizer import CartoonX  # noqa: E402
from amortized_cartoonx.teacher_masks.store import TeacherMaskStore  # noqa: E402
from amortized_cartoonx.training import (  # noqa: E402
    DISTILL_LOSSES,
    AmortizedCartoonXModule,
    MaskPredictorDataModule,
    RunOutputs,
    SparsityGate,
    check_teachers,
    fit_config,
    l1_ramp,
    noise_seeds,
    trainer_arguments,
    warmup_cosine,
)
from amortized_cartoonx.training.module import GATE_KEY  # noqa: E402
from amortized_cartoonx.training.trainer import LastCheckpoint  # noqa: E402

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:  # the classifier spec imports conftest.make_tiny_cnn
    sys.path.insert(0, str(TESTS))
SPEC = "conftest:make_tiny_cnn"
SIZE = 32
TINY_NET = dict(levels=3, mask_predictor=MaskPredictorConfig(width=8, decoder_width=8, embed_dim=8))


def write_images(folder: Path, count: int = 12, size: int = SIZE, seed: int = 0) -> Path:
    """Smooth random RGB images as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=gen), size=(size, size), mode="bilinear")
        array = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"img{i:02d}.png")
    return folder


def trainer(**overrides) -> pl.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return pl.Trainer(**{**settings, **overrides})


def fixed_loss(module: AmortizedCartoonXModule, images: torch.Tensor) -> float:
    """The RDE loss of the module's masks on fixed noise (seeds 0..N-1, 4 samples)."""
    with torch.no_grad():
        problem = module.objective.prepare(images)
        mask = module(images, problem.target)
        noise = module.objective.sample_noise(problem, 4, make_generators(range(images.shape[0]), "cpu"))
        return float(module.objective.loss(problem, mask, noise).total.mean())


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("train") / "images")


@pytest.mark.slow
def test_fit_lowers_the_loss_saves_and_resumes(image_dir, tmp_path):
    torch.manual_seed(0)
    module = AmortizedCartoonXModule(SPEC, image_size=SIZE, num_samples=2, lr=0.05, warmup_steps=0, **TINY_NET)
    data = MaskPredictorDataModule(str(image_dir), image_size=SIZE, labels=None, batch_size=4, num_workers=0)
    data.setup()
    images = torch.stack([data.datasets["val"][i]["image"] for i in range(len(data.datasets["val"]))])
    before = fixed_loss(module, images)
    fit = trainer(max_steps=6)
    fit.fit(module, datamodule=data)
    after = fixed_loss(module, images)
    assert after < before - 0.1, (before, after)  # the RDE loss on held-out images went down
    assert float(fit.callback_metrics["train/rde_loss_step"]) < before

    # checkpoint: plain data, explainer weights only, the settings recorded; round trip gives identical masks
    path = tmp_path / "model.ckpt"
    fit.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert all(k.startswith("mask_predictor.") for k in checkpoint["state_dict"])
    meta = checkpoint["cartoonx"]
    for key, value in (
        ("classifier", SPEC),
        ("image_size", SIZE),
        ("wave", "db3"),
        ("levels", 3),
        ("mode", "zero"),
        ("l1_lambda", 20.0),
        ("distortion", "label"),
        ("obfuscation", "gaussian-adaptive"),
    ):
        assert meta[key] == value
    assert meta["data"]["val_fraction"] == 0.1
    # the network: the given config completed with the classifier's classes and J; saved as plain values
    network = {**dataclasses.asdict(TINY_NET["mask_predictor"]), "num_classes": 5, "levels": 3}
    assert meta["mask_predictor"] == network == checkpoint["hyper_parameters"]["mask_predictor"]
    explainer = AmortizedExplainer.from_checkpoint(path, SPEC)
    target = torch.arange(images.shape[0]) % 5
    with torch.no_grad():
        expected = module.mask_predictor.mask(images, target).flatten()
    assert torch.equal(explainer.predict_mask(images, target).flatten(), expected)

    # resume from the checkpoint: the classifier (not saved) is put back, training goes on to step 8
    resumed = AmortizedCartoonXModule(SPEC, image_size=SIZE, num_samples=2, lr=0.05, warmup_steps=0, **TINY_NET)
    again = trainer(max_steps=8)
    again.fit(resumed, datamodule=data, ckpt_path=str(path))
    assert again.global_step == 8

    # ... but not on another split: images held out before would be trained on
    moved = MaskPredictorDataModule(
        str(image_dir), image_size=SIZE, labels=None, batch_size=4, num_workers=0, test_fraction=0.25
    )
    fresh = AmortizedCartoonXModule(SPEC, image_size=SIZE, num_samples=2, lr=0.05, warmup_steps=0, **TINY_NET)
    with pytest.raises(ConfigError, match=r"another data split \(test_fraction 0.0 -> 0.25\)"):
        trainer(max_steps=9).fit(fresh, datamodule=moved, ckpt_path=str(path))


def test_fit_with_teacher_masks_logs_distillation_and_agreement(image_dir, tmp_path):
    from conftest import make_tiny_cnn

    data = MaskPredictorDataModule(str(image_dir), image_size=SIZE, labels=None, batch_size=4, num_workers=0)
    data.setup()
    ids = data.splits["train"][:6] + data.splits["val"][:2]
    images = torch.stack(
        [data.datasets["train"].folder.__class__(image_dir, SIZE, None, ids=ids)[i]["image"] for i in range(len(ids))]
    )
    exact = CartoonX(make_tiny_cnn(), levels=3, steps=3, num_samples=2)
    explanation = exact.explain(images)
    store = TeacherMaskStore.create(
        tmp_path / "teachers",
        {
            "classifier": SPEC,
            "size": SIZE,
            "wave": "db3",
            "levels": 3,
            "mode": "zero",
            "l1_lambda": 20.0,
            "distortion": "label",
            "obfuscation": "gaussian-adaptive",
            "mask_length": explanation.mask.flatten().shape[1],
        },
    )
    store.write_shard(
        "a",
        ids,
        explanation.mask.flatten(),
        explanation.target,
        explanation.loss,
        explanation.distortion,
        explanation.mask_mean,
    )

    module = AmortizedCartoonXModule(SPEC, image_size=SIZE, num_samples=2, distill_weight=1.0, **TINY_NET)
    with_teachers = MaskPredictorDataModule(
        str(image_dir), image_size=SIZE, labels=None, teachers=str(store.folder), batch_size=4, num_workers=0
    )
    fit = trainer(max_steps=2, limit_val_batches=1)
    fit.fit(module, datamodule=with_teachers)
    metrics = fit.callback_metrics
    for key in (
        "train/distill_loss_step",
        "train/spearman_step",
        "train/top10_overlap_step",
        "val/distill_loss",
        "val/spearman",
        "val/top10_overlap",
        "val/rde_loss",
        "val/mask_mean",
        "val/distortion",
    ):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert 0.0 <= float(metrics["val/top10_overlap"]) <= 1.0

    item = with_teachers.datasets["train"][with_teachers.datasets["train"].folder.ids.index(ids[0])]
    assert item["has_teacher"] and item["target"] == item["teacher_target"] == int(explanation.target[0])


@pytest.mark.parametrize("stretch", [0.0, 0.2])
@pytest.mark.parametrize("name", ["bce", "bce-balanced", "l1"])
def test_distillation_is_smallest_where_the_network_outputs_the_teacher_mask(name, stretch):
    gen = torch.Generator().manual_seed(0)
    teacher = torch.rand(2, 64, generator=gen)
    if stretch > 0:  # a stretched mask reaches 0 and 1 exactly, as the optimizer's teachers do
        teacher[:, :8], teacher[:, 8:16] = 0.0, 1.0
    at_teacher = torch.logit((teacher + stretch) / (1 + 2 * stretch))  # logits whose mask is the teacher's
    torch.testing.assert_close(logits_to_mask(at_teacher, stretch), teacher, rtol=0, atol=1e-6)
    distill = DISTILL_LOSSES[name]
    best = distill(at_teacher, teacher, stretch)
    for scale in (0.01, 0.3, 3.0):
        moved = at_teacher + scale * torch.randn(at_teacher.shape, generator=gen)
        assert bool((distill(moved, teacher, stretch) > best).all()), scale
    if name.startswith("bce"):  # a stationary point; the sigmoid's BCE against the raw teacher is not, once stretched
        logits = at_teacher.clone().requires_grad_()
        distill(logits, teacher, stretch).sum().backward()
        assert float(logits.grad.abs().max()) < 1e-6
        if stretch > 0:
            assert float(torch.autograd.grad(distill(logits, teacher, 0.0).sum(), logits)[0].abs().max()) > 1e-3


def test_balanced_distillation_charges_a_network_that_deletes_what_a_sparse_teacher_keeps():
    stretch = 0.05
    teacher = torch.zeros(2, 2000)
    teacher[:, :10] = 1.0  # the teacher keeps 0.5% of the entries, as CartoonX does
    deleting = torch.logit(sigmoid_for_mask(torch.zeros_like(teacher), stretch))  # the empty mask, at its boundary
    keeping = torch.logit(sigmoid_for_mask(teacher, stretch))  # the teacher's own mask
    plain, balanced = DISTILL_LOSSES["bce"], DISTILL_LOSSES["bce-balanced"]
    # the plain mean barely notices the deleted 0.5%; the balanced loss weighs them as half of the loss
    assert float((plain(deleting, teacher, stretch) - plain(keeping, teacher, stretch)).max()) < 0.05
    assert float((balanced(deleting, teacher, stretch) - balanced(keeping, teacher, stretch)).min()) > 1.0
    # an all-zero teacher: only the deleted half, where deleting everything is right
    empty = torch.zeros(1, 2000)
    assert float(balanced(deleting[:1], empty, stretch)) < float(balanced(keeping[:1], empty, stretch))


def test_distillation_and_agreement_read_the_stretched_mask():
    network = dataclasses.replace(TINY_NET["mask_predictor"], stretch=0.2)
    module = AmortizedCartoonXModule(SPEC, image_size=SIZE, **{**TINY_NET, "mask_predictor": network})
    module.hparams.distill_loss = "l1"
    images, target = torch.rand(2, 3, SIZE, SIZE), torch.tensor([1, 3])
    with torch.no_grad():
        logits = module.mask_predictor(images, target).map(lambda b: 3 * torch.randn_like(b))
    teacher = module.mask_predictor.mask_from_logits(logits).flatten()  # the network's own output, 0s and 1s too
    assert bool((teacher == 0).any() and (teacher == 1).any())
    batch = {"teacher_mask": teacher, "has_teacher": torch.ones(2), "teacher_target": target}
    _, metrics, weights = module.distillation(batch, logits, target)
    assert float(metrics["distill_loss"]) < 1e-9  # equal masks (up to the last bit of a vectorised sigmoid)
    torch.testing.assert_close(metrics["spearman"], torch.tensor(1.0))
    # the stretched mask ties many entries at 1 and 0, so even itself it overlaps in expectation only: as itself
    itself = mask_agreement(teacher.reshape(2, -1), teacher.reshape(2, -1))["top_overlap"].mean()
    assert float(itself) < 1.0
    torch.testing.assert_close(metrics["top10_overlap"], itself)
    assert weights == {"distill_loss": 2, "spearman": 2, "top10_overlap": 2, "teacher_fraction": 2}
    # a batch without a teacher for its classes logs the same names, of weight 0 (DDP ranks all-reduce them alike)
    none = {"teacher_mask": teacher, "has_teacher": torch.tensor([1, 0]), "teacher_target": torch.tensor([5, 3])}
    loss, metrics, weights = module.distillation(none, logits, target)
    assert loss is None and set(metrics) == set(weights) == {
        "distill_loss",
        "spearman",
        "top10_overlap",
        "teacher_fraction",
    }
    assert weights["distill_loss"] == 0 and weights["teacher_fraction"] == 2 and float(metrics["teacher_fraction"]) == 0


def test_stream_batches_log_the_loss_of_fresh_and_folder_images_apart():
    module = AmortizedCartoonXModule(SPEC, image_size=SIZE, num_samples=2, **TINY_NET)
    images = torch.rand(4, 3, SIZE, SIZE)
    with torch.no_grad():
        problem = module.objective.prepare(images)
        mask = module(images, problem.target)
        ids = ["a.png", "b.png", "stream-000000", "stream-000001"]
        loss, plain = module.rde_loss(problem, mask, ids, "train")
        again, metrics = module.rde_loss(problem, mask, ids, "train", torch.tensor([False, False, True, True]))
        noise = module.objective.sample_noise(
            problem, 2, make_generators(noise_seeds(0, "train", 0, ids), images.device)
        )
        per_image = module.objective.loss(problem, mask, noise).total  # (4,): the same seeded noise
    assert "rde_loss_stream" not in plain and "rde_loss_folder" not in plain  # a batch without the stream
    torch.testing.assert_close(again, loss)  # what is minimised does not change
    torch.testing.assert_close(metrics["rde_loss_folder"], per_image[:2].mean())
    torch.testing.assert_close(metrics["rde_loss_stream"], per_image[2:].mean())
    _, only_fresh = module.rde_loss(problem, mask, ids, "train", torch.ones(4, dtype=torch.bool))
    assert "rde_loss_folder" not in only_fresh  # a kind absent from the batch is not logged as a NaN
    torch.testing.assert_close(only_fresh["rde_loss_stream"], per_image.mean())


def test_the_gate_moves_once_per_optimizer_step_with_gradient_accumulation(image_dir):
    """It moved on every batch, so with accumulate_grad_batches=2 it climbed twice as fast as the plain ramp."""
    module = AmortizedCartoonXModule(
        SPEC, image_size=SIZE, num_samples=2, warmup_steps=0, l1_warmup_steps=100, l1_gate=1.0, **TINY_NET
    )
    data = MaskPredictorDataModule(str(image_dir), image_size=SIZE, labels=None, batch_size=2, num_workers=0)
    fit = trainer(max_steps=3, accumulate_grad_batches=2, limit_val_batches=0)
    fit.fit(module, datamodule=data)
    assert fit.global_step == 3 and module.sparsity_gate.position <= 3


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        ({"lr": 0}, "lr must be above 0.0, got 0"),
        ({"lr": float("nan")}, "lr must be above 0.0, got nan"),
        ({"min_lr_ratio": 3}, "min_lr_ratio must be at least 0.0 and at most 1.0, got 3"),
        ({"warmup_steps": -5}, "warmup_steps must be at least 0, got -5"),
        ({"weight_decay": -1}, "weight_decay must be at least 0.0"),
        ({"l1_warmup_steps": -2}, "l1_warmup_steps must be at least 0"),
        ({"log_images": -1}, "log_images must be at least 0"),
        ({"val_samples": 0}, "val_samples must be at least 1"),
        ({"noise_seed": -1}, "noise_seed must be a non-negative integer, got -1"),
    ],
)
def test_training_settings_out_of_range_are_refused(option, needle):
    """Each ran: lr 0 trained nothing, val_samples 0 fell back to num_samples, the others trained oddly."""
    with pytest.raises(ConfigError, match=re.escape(needle)):
        AmortizedCartoonXModule(SPEC, image_size=SIZE, **TINY_NET, **option)


def test_data_settings_out_of_range_are_refused(image_dir):
    with pytest.raises(ConfigError, match="val_batch_size must be at least 1"):
        MaskPredictorDataModule(str(image_dir), image_size=SIZE, val_batch_size=0)
    with pytest.raises(ConfigError, match="num_workers must be at least 0"):
        MaskPredictorDataModule(str(image_dir), image_size=SIZE, num_workers=-1)
    with pytest.raises(ConfigError, match="train_seed must be a non-negative integer"):  # numpy failed in a worker
        MaskPredictorDataModule(str(image_dir), image_size=SIZE, train_seed=-1)


def test_the_network_config_is_completed_and_conflicts_are_refused():
    module = AmortizedCartoonXModule(SPEC, image_size=SIZE, **TINY_NET)
    config = module.mask_predictor.config
    assert (config.width, config.decoder_width, config.embed_dim) == (8, 8, 8)
    assert (config.num_classes, config.wave, config.levels, config.mode) == (5, "db3", 3, "zero")
    # the saved hyper-parameters rebuild the same module (load_from_checkpoint passes the network as a dict)
    rebuilt = AmortizedCartoonXModule(**dict(module.hparams))
    assert rebuilt.mask_predictor.config == config
    capped = AmortizedCartoonXModule(SPEC, image_size=SIZE, levels=9, mask_predictor=MaskPredictorConfig(width=8))
    assert capped.mask_predictor.config.levels == capped.levels_used < 9  # J as the image size allows
    for field, value in (("num_classes", 7), ("wave", "haar"), ("levels", 2), ("mode", "symmetric")):
        with pytest.raises(ConfigError, match=f"mask_predictor.{field}="):
            AmortizedCartoonXModule(
                SPEC, image_size=SIZE, levels=3, mask_predictor=MaskPredictorConfig(**{field: value})
            )
    with pytest.raises(ConfigError, match="invalid mask_predictor"):
        AmortizedCartoonXModule(SPEC, image_size=SIZE, mask_predictor={"widht": 8})


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_has_a_valid_network_section(path):
    """A shipped config's ``model.mask_predictor`` goes through the module's own completion (a typo, a retired
    field, or a wave/levels/mode that disagrees with the model's fails here, not after a download)."""
    from amortized_cartoonx.training.module import _DERIVED_NETWORK_FIELDS, _complete, _network_config

    model = yaml.safe_load(path.read_text())["model"]
    network = _network_config(model.get("mask_predictor"))
    derived = {name: model.get(name, getattr(network, name)) for name in _DERIVED_NETWORK_FIELDS}
    _complete(network, derived, derived["levels"]).validate()


def test_the_old_data_module_name_still_works_with_a_warning():
    import amortized_cartoonx.training as training

    with pytest.warns(DeprecationWarning, match="use MaskPredictorDataModule"):
        from amortized_cartoonx.training import ExplainerDataModule
    assert ExplainerDataModule is MaskPredictorDataModule
    with pytest.warns(DeprecationWarning):
        assert training.ExplainerDataModule is MaskPredictorDataModule
    with pytest.raises(AttributeError):
        training.NoSuchName  # noqa: B018


def test_the_run_trainer_adds_checkpoints_loggers_and_callbacks(tmp_path, monkeypatch):
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    import amortized_cartoonx.training.trainer as run_trainer

    outputs = RunOutputs("run", checkpoint_dir=str(tmp_path / "ckpt"), log_dir=str(tmp_path / "logs"))
    mine = pl.callbacks.EarlyStopping(monitor="val/rde_loss")
    settings = {"max_steps": 3, "callbacks": [mine]}
    arguments = trainer_arguments(outputs, settings)
    assert settings == {"max_steps": 3, "callbacks": [mine]}  # the caller's settings are not changed
    mine_, best, last, monitor = arguments["callbacks"]
    assert mine_ is mine and isinstance(monitor, LearningRateMonitor)
    assert isinstance(best, ModelCheckpoint) and best.dirpath == str(tmp_path / "ckpt" / "run")
    assert (best.monitor, best.filename, best.save_last) == ("val/rde_loss", "best", None)
    assert isinstance(last, LastCheckpoint) and (last.dirpath, last.monitor) == (best.dirpath, None)
    assert [type(lg) for lg in arguments["logger"]] == [CSVLogger]  # WANDB_MODE=disabled in the tests
    assert arguments["default_root_dir"] == str(tmp_path / "logs" / "run") and arguments["max_steps"] == 3

    quiet = trainer_arguments(outputs, {"logger": False, "enable_checkpointing": False, "default_root_dir": "x"})
    assert quiet == {"logger": False, "enable_checkpointing": False, "default_root_dir": "x", "callbacks": []}

    made = []  # wandb: offline unless WANDB_MODE asks otherwise, never without being asked
    monkeypatch.setattr(run_trainer, "WandbLogger", lambda **kwargs: made.append(kwargs) or "wandb")
    for mode, offline in ((None, True), ("offline", True), ("online", False)):
        monkeypatch.delenv("WANDB_MODE") if mode is None else monkeypatch.setenv("WANDB_MODE", mode)
        assert trainer_arguments(outputs, {})["logger"][1] == "wandb"
        assert made[-1]["offline"] is offline and made[-1]["project"] == "amortized-cartoonx"
    assert len(made) == 3


class _WorseEveryValidation(pl.LightningModule):
    """A linear model whose validation loss is the step count: the first validation is the best."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/rde_loss", float(self.global_step))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("max_steps", [6, 7])  # the run ends on a validation, or 1 step after one
def test_last_ckpt_is_the_last_state_not_the_best(tmp_path, max_steps):
    """Lightning 2.6's save_last wrote last.ckpt only when best.ckpt improved: after the best validation it
    stopped, and a resume from last.ckpt went back to the best step."""
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(8, 2)), batch_size=2)
    outputs = RunOutputs("run", checkpoint_dir=str(tmp_path / "ckpt"), log_dir=str(tmp_path / "logs"))
    settings = dict(max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None, logger=False)
    settings |= dict(enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    pl.Trainer(**trainer_arguments(outputs, settings)).fit(_WorseEveryValidation(), data, data)
    step = {
        name: torch.load(outputs.checkpoint_folder / f"{name}.ckpt", weights_only=True)["global_step"]
        for name in ("best", "last")
    }
    assert step == {"best": 2, "last": max_steps}
    assert sorted(p.name for p in outputs.checkpoint_folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    # a second run under the same name replaces both (best.ckpt was kept, the new best went to best-v1.ckpt)
    pl.Trainer(**trainer_arguments(outputs, settings)).fit(_WorseEveryValidation(), data, data)
    assert sorted(p.name for p in outputs.checkpoint_folder.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_fit_config_refuses_modules_and_data_of_different_sizes(image_dir):
    module = AmortizedCartoonXModule(SPEC, image_size=SIZE, **TINY_NET)
    data = MaskPredictorDataModule(str(image_dir), image_size=SIZE, labels=None, num_workers=0)
    config = fit_config(module, data, {"max_steps": 2}, RunOutputs("run"), seed=3)
    assert config["seed_everything"] == 3 and config["trainer"] == {"max_steps": 2}
    assert "image_size" not in config["model"] and config["data"]["image_size"] == SIZE  # linked by cartoonx fit
    assert config["model"]["mask_predictor"]["width"] == 8
    other = MaskPredictorDataModule(str(image_dir), image_size=SIZE * 2, labels=None, num_workers=0)
    with pytest.raises(ConfigError, match="image_size"):
        fit_config(module, other, {}, RunOutputs("run"))


def test_the_fit_cli_customises_lightning_through_its_public_api_only():
    from amortized_cartoonx.training import cli

    fit_cli = cli._make_cli_class()
    own = {name for name in vars(fit_cli) if not name.startswith("__")}
    assert own == {"add_arguments_to_parser", "instantiate_trainer", "parse_arguments", "run_outputs"}, own
    source = inspect.getsource(cli)
    assert "self._" not in source and "super()._" not in source  # no private LightningCLI method or attribute


def test_teachers_of_images_changed_since_are_refused(tmp_path):
    """The fit paired each image with the stored mask of its file name, whatever the file holds now."""
    images = write_images(tmp_path / "images", count=4)
    names = sorted(p.name for p in images.glob("*.png"))
    store = TeacherMaskStore.create(
        tmp_path / "teachers",
        {"classifier": SPEC, "size": SIZE, "wave": "db3", "levels": 3, "mode": "zero", "mask_length": 4},
    )
    digests = ["0" * 64] + [file_sha256(images / n) for n in names[1:2]]  # the first file changed since
    store.write_shard(
        "a", names[:2], torch.ones(2, 4), torch.zeros(2, dtype=torch.long), *torch.ones(3, 2), contents=digests
    )
    data = MaskPredictorDataModule(str(images), image_size=SIZE, labels=None, teachers=str(tmp_path / "teachers"))
    with pytest.raises(
        ConfigError, match=f"1 image\\(s\\) .* changed since their teacher masks were made \\({names[0]}"
    ):
        data.setup()


def test_teachers_of_another_size_are_refused():
    settings = {
        "classifier": SPEC,
        "normalize": "none",
        "image_size": 32,
        "wave": "db3",
        "mode": "zero",
        "levels_used": 3,
        "l1_lambda": 20.0,
        "distortion": "label",
        "obfuscation": "gaussian-adaptive",
    }
    check_teachers({"classifier": SPEC, "size": 32, "mask_length": 100}, settings, 100)
    with pytest.raises(ConfigError, match="size 48"):
        check_teachers({"classifier": SPEC, "size": 48, "mask_length": 200}, settings, 100)
    with pytest.raises(ConfigError, match="classifier"):
        check_teachers({"classifier": "other:model"}, settings, 100)
    # the weights decide when both record them: the same weights under another spec text pass, others do not
    weighed = {**settings, "classifier_weights_sha256": "a" * 64}
    check_teachers({"classifier": "synthetic:elsewhere", "classifier_weights_sha256": "a" * 64}, weighed, 100)
    with pytest.raises(ConfigError, match="with other weights"):
        check_teachers({"classifier": SPEC, "classifier_weights_sha256": "b" * 64}, weighed, 100)
    # the same weights behind another input normalisation explain another problem (the digest is the same)
    with pytest.raises(ConfigError, match=r"normalize 'imagenet' \(training: 'none'\)"):
        check_teachers(
            {"classifier": SPEC, "classifier_weights_sha256": "a" * 64, "normalize": "imagenet"}, weighed, 100
        )


def test_noise_seeds_and_schedule():
    first = noise_seeds(0, "train", 3, ["a.jpg", "b.jpg"])
    assert first == noise_seeds(0, "train", 3, ["a.jpg", "b.jpg"])  # reproducible
    assert len(set(first)) == 2  # per image
    assert noise_seeds(0, "train", 3, ["b.jpg"])[0] == first[1]  # independent of the batch's other images
    assert first != noise_seeds(0, "train", 4, ["a.jpg", "b.jpg"])  # fresh noise every step
    assert first != noise_seeds(0, "val", 3, ["a.jpg", "b.jpg"])
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(5, 0, float("inf"), 0.1) == 1.0
    assert [l1_ramp(step, 4) for step in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert l1_ramp(0, 0) == 1.0  # no ramp: the full lambda from the first step


def test_a_gated_fit_follows_the_gate_logs_its_ratio_and_resumes_it(tmp_path):
    images = write_images(tmp_path / "images", count=8)
    data = MaskPredictorDataModule(str(images), image_size=SIZE, labels=None, batch_size=4, num_workers=0)
    settings = dict(image_size=SIZE, num_samples=2, lr=0.01, warmup_steps=0, l1_warmup_steps=10, l1_gate=1.0)
    torch.manual_seed(0)
    module = AmortizedCartoonXModule(SPEC, **settings, **TINY_NET)
    seen = []
    original = module.sparsity_gate.update

    def spy(distortion: float, empty: float) -> float:
        seen.append((distortion, empty))
        return original(distortion, empty)

    module.sparsity_gate.update = spy
    fit = trainer(max_steps=3)
    fit.fit(module, datamodule=data)
    assert len(seen) == 3 and all(empty > 0 for _, empty in seen)  # the empty mask's distortion, every step
    gate = module.sparsity_gate
    replay = SparsityGate(warmup=10, gate=1.0)  # the module's gate is exactly the rule fed with its reports
    for distortion, empty in seen:
        replay.update(distortion, empty)
    assert gate.state() == replay.state() and gate.ratio is not None
    metrics = {name: float(value) for name, value in fit.callback_metrics.items()}
    assert metrics["train/distortion_ratio_step"] == pytest.approx(gate.ratio, rel=1e-5)
    assert metrics["train/l1_ramp_step"] == pytest.approx(gate.fraction)
    # the training loss charges the gate's share of lambda
    expected = metrics["train/distortion_step"] + gate.fraction * 20.0 * metrics["train/mask_mean_step"]
    assert metrics["train/loss_step"] == pytest.approx(expected, rel=1e-5)

    path = tmp_path / "gated.ckpt"
    fit.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)[GATE_KEY]
    assert saved == {"position": gate.position, "ratio": pytest.approx(gate.ratio)}
    resumed = AmortizedCartoonXModule(SPEC, **settings, **TINY_NET)
    resumed.on_load_checkpoint({"state_dict": {}, GATE_KEY: saved})
    assert resumed.sparsity_gate.state() == saved
    with pytest.raises(ConfigError, match="l1_warmup_steps"):
        AmortizedCartoonXModule(SPEC, image_size=SIZE, l1_gate=0.5, **TINY_NET)  # a gate needs a ramp
    with pytest.raises(ConfigError, match="l1_gate"):
        AmortizedCartoonXModule(SPEC, image_size=SIZE, l1_gate=-0.1, l1_warmup_steps=5, **TINY_NET)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_cartoonx_fit_with_the_tiny_config(tmp_path, monkeypatch, capsys):
    from amortized_cartoonx.cli import main

    write_images(tmp_path / "tiny-images")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = ROOT / "configs" / "tiny.yaml"
    assert "conftest" not in config.read_text()  # the package's own classifier: no tests/ on the path needed
    args = ["fit", "--config", str(config), "--trainer.max_steps", "2", "--model.mask_predictor.embed_dim", "16"]
    assert main(args) == 0
    for name in ("best.ckpt", "last.ckpt"):
        assert (tmp_path / "checkpoints" / "tiny" / name).is_file()
    assert (tmp_path / "logs" / "tiny" / "config.yaml").is_file()
    with (tmp_path / "logs" / "tiny" / "metrics.csv").open() as fh:
        columns = next(csv.reader(fh))
    assert {"train/rde_loss_step", "val/rde_loss", "val/mask_mean", "val/distortion"} <= set(columns)
    checkpoint = torch.load(tmp_path / "checkpoints" / "tiny" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["cartoonx"]["image_size"] == SIZE
    assert checkpoint["cartoonx"]["classifier"] == "amortized_cartoonx.synthetic.classifier:CartoonCNN"
    network = checkpoint["cartoonx"]["mask_predictor"]  # model.mask_predictor from the file and the command line
    assert (network["width"], network["decoder_width"], network["embed_dim"], network["num_classes"]) == (8, 8, 16, 8)

    capsys.readouterr()
    assert main(args + ["--model.classifier", "no_such_module:factory", "--run_name", "bad"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("cartoonx fit: error: cannot import no_such")


def test_under_ddp_each_rank_reads_each_validation_image_once_and_trains_its_share(tmp_path):
    """A DistributedSampler padded the short rank's validation share with repeated images (counted twice in the
    metric that picks best.ckpt), and the training loader dropped a rank's only batch when the whole folder
    made more than one batch: on 2 ranks a small run trained nothing and stopped with exit code 0."""
    from types import SimpleNamespace

    images = write_images(tmp_path / "images", count=13)
    seen = []
    for rank in (0, 1):
        data = MaskPredictorDataModule(
            str(images), image_size=SIZE, labels=None, batch_size=4, val_fraction=0.5, num_workers=0
        )
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0, accumulate_grad_batches=1)
        data.setup("fit")
        val = [i for batch in data.val_dataloader() for i in batch["id"]]
        seen += val
        train = data.train_dataloader()
        assert 4 < len(data.datasets["train"]) <= 8 and not train.drop_last  # a rank's share is one batch: kept
    assert len(data.splits["val"]) % 2 == 1  # odd: a padding sampler would repeat one
    assert sorted(seen) == sorted(data.splits["val"]) and len(seen) == len(set(seen))


@pytest.mark.slow
def test_two_cpu_ranks_validate_as_one(tmp_path):
    """``cartoonx fit`` on 2 CPU ranks (DDP, gloo), teachers for some images only, 5 validation images: a rank
    without a teacher in its validation share hung the other (different metrics, different all-reduces); the
    short share was padded with a repeated image; Lightning's sync averaged the image counts as integers."""
    import shutil
    import subprocess

    from amortized_cartoonx.cli import main

    images = write_images(tmp_path / "images", count=20)
    (tmp_path / "some").mkdir()
    for name in ("img02.png", "img03.png", "img04.png", "img06.png", "img16.png"):
        shutil.copy(images / name, tmp_path / "some" / name)
    targets = ["targets", "--classifier", SPEC, "--images", str(tmp_path / "some"), "--out", str(tmp_path / "teach")]
    assert (
        main([*targets, "--size", str(SIZE), "--levels", "3", "--steps", "2", "--samples", "2", "--no-progress"]) == 0
    )
    config = tmp_path / "fit.yaml"
    config.write_text(
        "trainer: {accelerator: cpu, max_steps: 1, val_check_interval: 1, num_sanity_val_steps: 0,"
        " enable_progress_bar: false, enable_model_summary: false, logger: false}\n"
        f"model: {{classifier: '{SPEC}', levels: 3, num_samples: 2, lr: 1.0e-12, warmup_steps: 0, log_images: 0,"
        " distill_weight: 1.0, mask_predictor: {width: 8, decoder_width: 8, embed_dim: 8}}\n"
        f"data: {{images: '{images}', image_size: {SIZE}, labels: null, val_fraction: 0.25, batch_size: 4,"
        f" val_batch_size: 2, num_workers: 0, teachers: '{tmp_path / 'teach'}'}}\n"
    )
    import amortized_cartoonx

    source = Path(amortized_cartoonx.__file__).resolve().parents[1]  # the ranks run the code under test
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{source}{os.pathsep}{TESTS}"}
    scores = {}
    for devices in (1, 2):
        command = [sys.executable, "-m", "amortized_cartoonx.cli", "fit", "--config", str(config)]
        command += ["--trainer.devices", str(devices), "--run_name", f"d{devices}"]
        command += ["--trainer.strategy", "ddp"] * (devices == 2) + ["--checkpoint_dir", str(tmp_path / "ckpt")]
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        checkpoint = torch.load(tmp_path / "ckpt" / f"d{devices}" / "last.ckpt", weights_only=True)
        callbacks = checkpoint["callbacks"]
        scores[devices] = next(v["best_model_score"] for k, v in callbacks.items() if "val/rde_loss" in k)
    torch.testing.assert_close(scores[2], scores[1], rtol=1e-5, atol=0)


def test_configure_optimizers_works_outside_a_trainer():
    """The 'no Trainer: no decay' branch never ran: Lightning's trainer property raises instead of returning None."""
    module = AmortizedCartoonXModule(SPEC, image_size=SIZE, warmup_steps=2, **TINY_NET)
    schedule = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    factors = [schedule.lr_lambdas[0](step) for step in (0, 1, 5, 10_000)]
    assert factors == [0.5, 1.0, 1.0, 1.0]


def test_a_resume_keeps_the_classifier_the_checkpoint_was_trained_for():
    """--ckpt_path last (and Trainer.fit(ckpt_path=...)) resumed a checkpoint of classifier A on classifier B."""
    module = AmortizedCartoonXModule(SPEC, image_size=SIZE, **TINY_NET)
    ours = module.classifier_identity["classifier_weights_sha256"]
    same = {"classifier": "elsewhere:same", "classifier_weights_sha256": ours}  # the same weights, another spec
    module.on_load_checkpoint({"cartoonx": same, "state_dict": {}})
    for meta in ({"classifier": SPEC, "classifier_weights_sha256": "a" * 64}, {"classifier": "other:model"}):
        with pytest.raises(ConfigError, match="the checkpoint was trained for classifier"):
            module.on_load_checkpoint({"cartoonx": meta, "state_dict": {}})
