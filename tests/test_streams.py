"""Training data that does not run out: the synthetic stream (determinism, ranks, workers, resuming), augmented
views of folder images (seeded, never of teacher-masked images), fixed validation and test images, a fit step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import amortized_cartoonx
from amortized_cartoonx.errors import ConfigError
from amortized_cartoonx.images import load_image
from amortized_cartoonx.mask_predictor import MaskPredictorConfig
from amortized_cartoonx.synthetic.dataset import CLASS_NAMES, CartoonConfig, SyntheticStream

pl = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")  # the frozen classifier

from amortized_cartoonx.teacher_masks.store import TeacherMaskStore  # noqa: E402
from amortized_cartoonx.training import AmortizedCartoonXModule, MaskPredictorDataModule  # noqa: E402
from amortized_cartoonx.training.streams import (  # noqa: E402
    AugmentConfig,
    FolderViews,
    StreamConfig,
    StreamLoader,
    TrainingStream,
    augment_image,
    crop_box,
    view_generator,
)

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # the classifier spec imports conftest.make_tiny_cnn
    sys.path.insert(0, str(TESTS))
SPEC = "conftest:make_tiny_cnn"
SIZE = 32
TINY_NET = dict(levels=3, mask_predictor=MaskPredictorConfig(width=8, decoder_width=8, embed_dim=8))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """16 smooth random RGB images, 48 x 40 px (not square: the crop is taken from the whole image)."""
    folder = tmp_path_factory.mktemp("streams") / "images"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(16):
        x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=gen), size=(40, 48), mode="bilinear")
        Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


def data_module(image_dir: Path, **options) -> MaskPredictorDataModule:
    settings = dict(image_size=SIZE, labels=None, val_fraction=0.25, batch_size=4, num_workers=0)
    data = MaskPredictorDataModule(str(image_dir), **{**settings, **options})
    data.setup()
    return data


def stream_of(data: MaskPredictorDataModule, rank: int = 0, world_size: int = 1, seed: int = 0) -> TrainingStream:
    scenes = SyntheticStream(data.stream.seed, config=data.stream.scenes)
    count = data.stream.count(data.hparams.batch_size)
    return TrainingStream(data.datasets["train"], scenes, data.hparams.batch_size, count, seed, rank, world_size)


def keys(items: list[dict]) -> list[str]:
    return [item["id"] for item in items]


# ---- the training stream ------------------------------------------------------------------------------------


def test_two_ranks_get_disjoint_items_whose_union_is_the_single_rank_stream(image_dir):
    data = data_module(image_dir, stream=StreamConfig(fraction=0.5, seed=1), augment=None)
    single = [keys(stream_of(data).batch(t)) for t in range(4)]  # 2 folder draws + 2 stream items per batch
    assert all(len(batch) == 4 for batch in single)
    assert [i.startswith("stream-") for i in single[0]] == [False, False, True, True]
    assert [item["from_stream"] for item in stream_of(data).batch(0)] == [False, False, True, True]
    ranks = [[keys(stream_of(data, rank, 2).batch(t)) for t in range(2)] for rank in range(2)]
    first, second = (sum(batches, []) for batches in ranks)
    assert not set(first) & set(second)  # 4 of the 12 training images and 4 stream items: all distinct here
    assert sorted(first + second) == sorted(sum(single, []))
    # the same batch again is the same images, and another seed orders the folder differently
    assert torch.equal(stream_of(data).batch(3)[0]["image"], stream_of(data).batch(3)[0]["image"])
    orders = {tuple(keys(stream_of(data, seed=s).batch(0))[:2]) for s in range(4)}
    assert len(orders) > 1


def test_workers_and_the_start_position_do_not_change_the_batches(image_dir):
    data = data_module(image_dir, stream=StreamConfig(fraction=0.5), augment=AugmentConfig())
    stream = stream_of(data)
    expected = [stream.batch(t) for t in range(2, 5)]

    def first_batches(loader, count=3):
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == count:
                return batches

    for workers in (0, 2):
        batches = first_batches(StreamLoader(stream_of(data), position=lambda: 2, num_workers=workers))
        for batch, items in zip(batches, expected):
            assert list(batch["id"]) == keys(items)
            assert torch.equal(batch["image"], torch.stack([item["image"] for item in items]))


def test_the_data_module_streams_only_for_training(image_dir):
    plain = data_module(image_dir, augment=None, test_fraction=0.2)
    streamed = data_module(image_dir, stream={"fraction": 0.75, "seed": 2}, augment={}, train_seed=5, test_fraction=0.2)
    assert streamed.splits == plain.splits and plain.splits["test"]  # the folder's split does not change
    for name in ("val", "test"):  # nor do the validation and test images: never augmented
        assert streamed.datasets[name].augment is None
        fixed, again = plain.datasets[name], streamed.datasets[name]
        assert fixed.folder.ids == again.folder.ids
        for i in range(len(fixed)):
            assert torch.equal(again[i]["image"], load_image(image_dir / fixed.folder.ids[i], SIZE))
    fixed, again = next(iter(plain.val_dataloader())), next(iter(streamed.val_dataloader()))
    assert list(fixed["id"]) == list(again["id"]) and torch.equal(fixed["image"], again["image"])
    loader = streamed.train_dataloader()
    assert isinstance(loader, StreamLoader)
    batch = next(iter(loader))
    assert sum(i.startswith("stream-") for i in batch["id"]) == 3  # 0.75 of 4
    assert batch["image"].shape == (4, 3, SIZE, SIZE)
    assert streamed.hparams["stream"]["scenes"]["size"] == SIZE  # drawn at the data's size, saved as plain values
    assert streamed.hparams["augment"] == {"scale": [0.5, 1.0], "ratio": [0.75, 4 / 3], "flip": True}
    # the saved hyper-parameters build the same data module
    rebuilt = MaskPredictorDataModule(**dict(streamed.hparams))
    assert (rebuilt.stream, rebuilt.augment) == (streamed.stream, streamed.augment)


def test_stream_images_explain_their_label_or_the_prediction(image_dir, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("file,class_index\n" + "".join(f"img{i:02d}.png,{i % 5}\n" for i in range(16)))
    for source in ("label", "auto", "predicted"):
        data = data_module(image_dir, labels=str(labels), target_source=source, stream=StreamConfig(fraction=0.5))
        batch = next(iter(data.train_dataloader()))
        expected = batch["label"] if source == "label" else torch.full((4,), -1)  # -1: the classifier's prediction
        assert batch["target"].tolist() == expected.tolist()
        assert 0 <= int(batch["label"][3]) < len(CLASS_NAMES)  # a stream image's label is its scene's class


def test_bad_stream_and_augment_settings_are_refused(image_dir):
    with pytest.raises(ConfigError, match="stream.fraction"):
        MaskPredictorDataModule(str(image_dir), stream=StreamConfig(fraction=1.5))
    with pytest.raises(ConfigError, match="rounds to no stream image"):
        MaskPredictorDataModule(str(image_dir), batch_size=4, stream=StreamConfig(fraction=0.1))
    with pytest.raises(ConfigError, match="stream.scenes.size"):
        MaskPredictorDataModule(str(image_dir), image_size=SIZE, stream={"scenes": {"size": 128}})
    with pytest.raises(ConfigError, match="unknown stream settings: frac"):
        MaskPredictorDataModule(str(image_dir), stream={"frac": 0.5})
    with pytest.raises(ConfigError, match="augment.scale"):
        MaskPredictorDataModule(str(image_dir), augment={"scale": [0.0, 1.0]})


# ---- augmentation ----------------------------------------------------------------------------------------------


def test_crop_boxes_are_seeded_and_inside_the_image():
    boxes = [crop_box(40, 48, (0.5, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(s)) for s in range(20)]
    assert boxes == [crop_box(40, 48, (0.5, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(s)) for s in range(20)]
    assert len(set(boxes)) > 10
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 48
        assert 0.5 * 40 * 48 * 0.9 <= h * w <= 40 * 48
    # a box that cannot fit falls back to the central crop with the nearest ratio
    assert crop_box(10, 100, (1.0, 1.0), (1.0, 1.0), torch.Generator().manual_seed(0)) == (0, 45, 10, 10)
    image = torch.rand(3, 40, 48)
    config = AugmentConfig(scale=(1.0, 1.0), ratio=(1.2, 1.2), flip=False)
    view = augment_image(image, SIZE, config, view_generator(0, 0, "a"))
    assert view.shape == (3, SIZE, SIZE) and 0 <= float(view.min()) and float(view.max()) <= 1


def test_augmented_views_are_seeded_per_epoch_and_never_of_teacher_images(image_dir, tmp_path):
    data = data_module(image_dir, augment=AugmentConfig())  # on (off by default)
    train = data.datasets["train"]
    plain = train[0]["image"]  # an index: the unaugmented image
    assert torch.equal(plain, load_image(image_dir / train.folder.ids[0], SIZE))
    assert torch.equal(train[(0, 3)]["image"], train[(0, 3)]["image"])  # (index, epoch): that epoch's view
    assert not torch.equal(train[(0, 3)]["image"], train[(0, 4)]["image"])
    assert not torch.equal(train[(0, 3)]["image"], plain)
    reseeded = data_module(image_dir, augment=AugmentConfig(), train_seed=1).datasets["train"]
    assert not torch.equal(reseeded[(0, 3)]["image"], train[(0, 3)]["image"])
    assert torch.equal(data_module(image_dir, augment=None).datasets["train"][(0, 3)]["image"], plain)

    # teacher-masked images are never augmented: their mask explains the unaugmented image
    store = TeacherMaskStore.create(tmp_path / "teachers", {"mask_length": 10})
    ids = train.folder.ids[:2]
    store.write_shard("a", ids, torch.rand(2, 10), torch.tensor([1, 2]), *torch.zeros(3, 2))
    with_teachers = data_module(image_dir, teachers=str(store.folder), augment=AugmentConfig()).datasets["train"]
    for epoch in range(3):
        item = with_teachers[(0, epoch)]
        assert item["has_teacher"] and item["target"] == 1 and torch.equal(item["image"], plain)
        other = with_teachers[(2, epoch)]
        assert not other["has_teacher"] and not torch.equal(other["image"], with_teachers[2]["image"])

    # folder images with teacher masks and stream images share a batch (distillation still sees its teachers)
    mixed = data_module(
        image_dir, teachers=str(store.folder), stream=StreamConfig(fraction=0.5), augment=AugmentConfig(), train_seed=3
    )
    batch = next(iter(mixed.train_dataloader()))
    assert batch["teacher_mask"].shape == (4, 10) and batch["has_teacher"].tolist()[2:] == [False, False]
    assert batch["teacher_target"].tolist()[2:] == [-1, -1] and batch["target"].tolist()[2:] == [-1, -1]


def test_folder_views_shard_the_epoch_and_change_with_it(image_dir):
    train = data_module(image_dir, augment=AugmentConfig()).datasets["train"]
    single = list(FolderViews(train, seed=0))
    assert sorted(index for index, _ in single) == list(range(len(train))) and {e for _, e in single} == {0}
    halves = [list(FolderViews(train, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == sorted(single)
    later = FolderViews(train, seed=0)
    later.set_epoch(1)
    assert [e for _, e in later] == [1] * len(train) and [i for i, _ in later] != [i for i, _ in single]


def tiny_fit(module, data, max_steps, max_epochs, callback, ckpt_path=None, **options) -> pl.Trainer:
    """``trainer.fit`` on the CPU, quietly, with ``callback``; ``options`` go to the Trainer."""
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **options,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def test_folder_views_start_where_the_position_says(image_dir):
    train = data_module(image_dir, augment=AugmentConfig()).datasets["train"]
    whole = FolderViews(train, seed=3)
    whole.set_epoch(2)
    resumed = FolderViews(train, seed=3, batch_size=4, position=lambda: (2, 1))
    assert list(resumed) == list(whole)[4:] and resumed.epoch == 2
    assert list(FolderViews(train, seed=3, position=lambda: None)) == list(FolderViews(train, seed=3))


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.parametrize("augment", [False, True])
def test_a_folder_fit_resumed_inside_an_epoch_trains_on_the_batches_the_whole_run_did(image_dir, tmp_path, augment):
    """12 training images in batches of 4: 3 batches an epoch. Resumed from a checkpoint written by a validation
    inside an epoch, at an epoch's end, or at the end of a shorter run (where Lightning counts the epoch as done),
    with and without ``max_epochs`` (Lightning then starts the loader before it restores its step), and with
    gradient accumulation, the run trains on the batches (ids and augmented pixels) of the uninterrupted run (and,
    resumed from a validation's checkpoint, ends with its weights)."""
    seen: list[tuple[list[str], float]] = []

    class Batches(pl.Callback):
        def __init__(self, save_at: int | None = None, path: Path | None = None):
            self.save_at, self.path = save_at, path

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append((list(batch["id"]), round(float(batch["image"].double().sum()), 6)))

        def on_validation_end(self, trainer, module):
            if trainer.global_step == self.save_at and not self.path.exists():
                trainer.save_checkpoint(self.path)  # what LastCheckpoint writes after a validation

    def fit(max_steps, callback, ckpt_path=None, max_epochs=None, accumulate=1):
        pl.seed_everything(0)
        module = AmortizedCartoonXModule(SPEC, image_size=SIZE, num_samples=1, warmup_steps=0, **TINY_NET)
        data = data_module(image_dir, augment=AugmentConfig() if augment else None)
        options = dict(accumulate_grad_batches=accumulate, val_check_interval=1, check_val_every_n_epoch=None)
        return tiny_fit(module, data, max_steps, max_epochs, callback, ckpt_path, limit_val_batches=1, **options)

    def weights(trainer) -> list[torch.Tensor]:
        return list(trainer.lightning_module.mask_predictor.state_dict().values())

    final = weights(fit(7, Batches()))
    whole = list(seen)
    assert len(whole) == 7 and whole[3][0] != whole[0][0]  # a second epoch in another order
    cases = [(2, "validation", None), (3, "validation", None), (4, "validation", None), (4, "validation", 9)]
    cases += [(4, "end", None), (4, "end", 9)]
    for step, how, max_epochs in cases:
        path = tmp_path / f"{step}-{how}-{max_epochs}.ckpt"
        seen.clear()
        if how == "validation":
            fit(7, Batches(step, path), max_epochs=max_epochs)
        else:
            fit(step, Batches(), max_epochs=max_epochs).save_checkpoint(path)  # LastCheckpoint.on_train_end
        seen.clear()
        resumed = fit(7, Batches(), ckpt_path=str(path), max_epochs=max_epochs)
        assert seen == whole[step:], (step, how, max_epochs)
        if how == "validation":  # (a shorter first run has a shorter cosine learning-rate schedule)
            assert all(torch.equal(a, b) for a, b in zip(weights(resumed), final)), (step, max_epochs)

    # accumulating 2 batches a step: 2 steps an epoch (Lightning steps on an epoch's last batch), so 3 steps are
    # 5 batches; a run of 3 steps resumed to 5 trains batches 5 to 9 of the whole run
    seen.clear()
    fit(5, Batches(), accumulate=2)
    whole = list(seen)
    seen.clear()
    path = tmp_path / "accumulated.ckpt"
    fit(3, Batches(), accumulate=2).save_checkpoint(path)
    assert seen == whole[:5]
    seen.clear()
    fit(5, Batches(), ckpt_path=str(path), accumulate=2)
    assert seen == whole[5:]


# ---- training ---------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`max_epochs` was not set")
def test_a_fit_step_trains_on_the_stream_and_continues_it_on_resume(image_dir, tmp_path):
    seen: list[list[str]] = []

    class Ids(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(list(batch["id"]))

    def fit(max_steps: int, ckpt_path: str | None = None, max_epochs: int | None = None, **options) -> pl.Trainer:
        torch.manual_seed(0)
        module = AmortizedCartoonXModule(SPEC, image_size=SIZE, num_samples=1, warmup_steps=0, **TINY_NET)
        scenes = CartoonConfig(classes=CLASS_NAMES[:5])  # the tiny classifier's 5 classes
        data = data_module(image_dir, stream=StreamConfig(fraction=0.5, seed=7, scenes=scenes))
        return tiny_fit(module, data, max_steps, max_epochs, Ids(), ckpt_path, limit_val_batches=0, **options)

    trainer = fit(2)
    assert trainer.global_step == 2 and len(seen) == 2
    expected = stream_of(data_module(image_dir, stream=StreamConfig(fraction=0.5, seed=7)))
    assert seen == [keys(expected.batch(t)) for t in range(2)]
    path = tmp_path / "stream.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # the data settings are plain values
    assert checkpoint["datamodule_hyper_parameters"]["stream"]["seed"] == 7
    for max_epochs in (None, 5):  # with max_epochs Lightning starts the loader before it restores the step
        seen.clear()
        fit(3, ckpt_path=str(path), max_epochs=max_epochs)
        assert seen == [keys(expected.batch(2))]  # resumed at step 2: the stream goes on, it does not start again

    # epochs of 3 batches, 2 accumulated a step: Lightning steps after batches 2 and 3 of an epoch, and the next
    # epoch goes on at batch 4 (it went on at step x 2 = batch 5, skipping one), resumed runs too
    accumulated = dict(limit_train_batches=3, accumulate_grad_batches=2)
    seen.clear()
    trainer = fit(5, **accumulated)
    assert len(seen) == 8 and seen == [keys(expected.batch(t)) for t in range(8)]
    seen.clear()
    fit(3, **accumulated).save_checkpoint(path)
    seen.clear()
    fit(5, ckpt_path=str(path), **accumulated)
    assert seen == [keys(expected.batch(t)) for t in range(5, 8)]

    with pytest.raises(ConfigError, match="max_steps"):
        fit(-1)


DDP_SCRIPT = """
import json, sys
import pytorch_lightning as pl
import torch
from amortized_cartoonx.mask_predictor import MaskPredictorConfig
from amortized_cartoonx.synthetic.dataset import CLASS_NAMES, CartoonConfig
from amortized_cartoonx.training import AmortizedCartoonXModule, MaskPredictorDataModule
from amortized_cartoonx.training.streams import StreamConfig

torch.set_num_threads(1)
images, out = sys.argv[1], sys.argv[2]


class Ids(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        with open(f"{out}/ids-{trainer.global_rank}.jsonl", "a") as fh:
            fh.write(json.dumps(list(batch["id"])) + "\\n")


network = MaskPredictorConfig(width=8, decoder_width=8, embed_dim=8)
module = AmortizedCartoonXModule(
    "conftest:make_tiny_cnn", image_size=32, levels=3, num_samples=1, mask_predictor=network
)
stream = StreamConfig(fraction=0.5, seed=7, scenes=CartoonConfig(classes=CLASS_NAMES[:5]))
data = MaskPredictorDataModule(
    images, image_size=32, labels=None, val_fraction=0.25, batch_size=4, num_workers=1, stream=stream
)
trainer = pl.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_steps=2, val_check_interval=2, limit_val_batches=1,
    num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False, callbacks=[Ids()],
)
trainer.fit(module, datamodule=data)
"""


@pytest.mark.slow
def test_ddp_ranks_train_on_their_own_shards_of_the_stream(image_dir, tmp_path):
    """Two DDP processes (gloo): Lightning keeps the stream's loader, and each rank sees exactly its shard."""
    script = tmp_path / "fit_ddp.py"
    script.write_text(DDP_SCRIPT)
    source = Path(amortized_cartoonx.__file__).resolve().parents[1]  # the package under test, for every rank
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(script), str(image_dir), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = data_module(image_dir, stream=StreamConfig(fraction=0.5, seed=7))
    for rank in range(2):
        seen = [json.loads(line) for line in (tmp_path / f"ids-{rank}.jsonl").read_text().splitlines()]
        assert seen == [keys(stream_of(data, rank, 2).batch(t)) for t in range(2)]
