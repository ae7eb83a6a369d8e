"""Teacher masks (``cartoonx targets``): records, seeds, resume, refusal, CLI, DDP; the store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # the classifier spec below imports conftest.make_tiny_cnn
    sys.path.insert(0, str(TESTS))

from amortized_cartoonx.classifiers import load_classifier  # noqa: E402
from amortized_cartoonx.errors import ConfigError, InputError  # noqa: E402
from amortized_cartoonx.images import load_images  # noqa: E402
from amortized_cartoonx.optimizer import CartoonX  # noqa: E402
from amortized_cartoonx.seeding import file_seeds, item_seed  # noqa: E402
from amortized_cartoonx.teacher_masks.store import FORMAT_VERSION, TeacherMaskStore  # noqa: E402

pl = pytest.importorskip("pytorch_lightning")
from amortized_cartoonx.teacher_masks.generate import generate_teacher_masks  # noqa: E402
from amortized_cartoonx.teacher_masks.lightning import TeacherBatch, TeacherWriter  # noqa: E402
from amortized_cartoonx.teacher_masks.plan import TeacherMaskSettings, build_manifest  # noqa: E402

SPEC = "conftest:make_tiny_cnn"  # a package.module:callable spec: a seeded tiny CNN
SIZE = 32  # db3 allows J = 4 at 32 px: the manifest must record the capped J
SETTINGS = dict(size=SIZE, steps=8, num_samples=4, lr=0.05)
RUN = dict(batch_size=4, accelerator="cpu", devices=1, progress=False)
NUM_IMAGES = 6


def make_folder(root: Path, count: int = NUM_IMAGES) -> Path:
    """``count`` seeded smooth RGB PNGs of 40 x 44 pixels (not square: they are centre-cropped)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(count):
        coarse = torch.from_numpy(rng.random((1, 3, 5, 5), dtype=np.float32))
        x = torch.nn.functional.interpolate(coarse, size=(40, 44), mode="bilinear", align_corners=False)[0]
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(root / f"img{i}.png")
    return root


def shard_ids(folder: Path) -> list[str]:
    """Every id of every shard (duplicates kept)."""
    ids = []
    for shard in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            ids += json.loads(fh.metadata()["ids"])
    return ids


def stored_masks(store: TeacherMaskStore, ids: list[str]) -> torch.Tensor:
    return torch.stack([store.get(i).mask for i in ids])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """One complete run: (image folder, store folder)."""
    root = tmp_path_factory.mktemp("targets")
    images = make_folder(root / "images")
    summary = generate_teacher_masks(images, root / "store", SPEC, **SETTINGS, **RUN)
    assert (summary.done, summary.skipped, summary.total) == (NUM_IMAGES, 0, NUM_IMAGES)
    return images, root / "store"


def test_one_record_per_image_with_manifest(reference):
    images, folder = reference
    store = TeacherMaskStore(folder)
    names = sorted(p.name for p in images.iterdir())
    assert sorted(store.ids()) == names
    assert len(shard_ids(folder)) == NUM_IMAGES  # no duplicate anywhere
    assert all(p.name.startswith("shard-") and "-r0-" in p.name for p in store.shards())
    manifest = store.manifest
    probe = CartoonX(load_classifier(SPEC)).representation.encode(torch.zeros(1, 3, SIZE, SIZE)).mask_like()
    assert manifest["mask_length"] == probe.numel_per_channel()
    assert manifest["band_shapes"] == [list(s) for s in probe.band_shapes()]
    assert (manifest["levels"], manifest["levels_requested"], manifest["wave"], manifest["mode"]) == (
        4,
        5,
        "db3",
        "zero",
    )
    expected = {"classifier": SPEC, "normalize": "none", "size": SIZE, "steps": 8, "num_samples": 4, "lr": 0.05}
    assert manifest["format_version"] == FORMAT_VERSION == 2 and manifest["seeding"].startswith("item_seed(file name")
    assert {k: manifest[k] for k in expected} == expected
    assert (manifest["l1_lambda"], manifest["obfuscation"], manifest["distortion"], manifest["seed"]) == (
        20.0,
        "gaussian-adaptive",
        "label",
        0,
    )
    for name in names:
        record = store.get(name)
        assert record.mask.shape == (manifest["mask_length"],)
        assert 0.0 <= float(record.mask.min()) and float(record.mask.max()) <= 1.0
        assert record.seed == item_seed(name, 0)  # the file name's seed, not the folder index
        assert record.loss == pytest.approx(record.distortion + 20.0 * record.mask_mean, rel=1e-3, abs=1e-3)


def test_masks_equal_the_optimizer_run_directly(reference):
    images, folder = reference
    store = TeacherMaskStore(folder)
    paths = sorted(images.iterdir())
    x = load_images(paths, SIZE)
    direct = CartoonX(load_classifier(SPEC), steps=8, num_samples=4, lr=0.05).explain(
        x, seeds=file_seeds([p.name for p in paths], 0)
    )
    ids = [p.name for p in paths]
    torch.testing.assert_close(stored_masks(store, ids), direct.mask.flatten(), atol=1e-3, rtol=0)  # float16
    assert [store.get(i).target for i in ids] == direct.target.tolist()
    torch.testing.assert_close(torch.tensor([store.get(i).loss for i in ids]), direct.loss, atol=1e-4, rtol=1e-4)
    assert float(direct.mask_mean.mean()) < 0.99  # the masks did move: the comparison is not trivial


def test_an_images_seed_is_its_file_names_whatever_the_folder_holds(reference, tmp_path):
    """A file that sorts first shifts every position; with ``limit`` and a non-zero seed each mask is still
    ``explain(image, seeds=[item_seed(name, seed)])`` of the image alone, not that of its position's seed."""
    images, _ = reference
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    shutil.copy(images / "img3.png", folder / "aaa.png")  # sorts before img0.png
    noisy = dict(size=SIZE, steps=8, num_samples=2, lr=0.1, l1_lambda=1.0)  # masks that depend on the seed
    summary = generate_teacher_masks(folder, tmp_path / "store", SPEC, **noisy, **RUN, limit=3, seed=7)
    assert summary.done == 3
    store = TeacherMaskStore(tmp_path / "store")
    assert sorted(store.ids()) == ["aaa.png", "img0.png", "img1.png"]
    cartoonx = CartoonX(load_classifier(SPEC), steps=8, num_samples=2, lr=0.1, l1_lambda=1.0)
    for position, name in enumerate(["aaa.png", "img0.png", "img1.png"]):
        image = load_images([folder / name], SIZE)
        assert store.get(name).seed == item_seed(name, 7)
        alone = cartoonx.explain(image, seeds=[item_seed(name, 7)]).mask.flatten()[0]
        torch.testing.assert_close(store.get(name).mask, alone, atol=1e-3, rtol=0)  # float16
        by_position = cartoonx.explain(image, seeds=[7 + position]).mask.flatten()[0]  # the old rule
        assert float((alone - by_position).abs().max()) > 0.05


def test_a_store_of_the_old_seeding_is_read_but_never_resumed(reference, tmp_path):
    images, full = reference
    out = tmp_path / "old"
    shutil.copytree(full, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(format_version=1, seeding="seed + index of the image in the folder (files sorted by name)")
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert len(TeacherMaskStore(out)) == NUM_IMAGES  # its masks are valid teacher masks
    first = shard_ids(out)[0]
    (out / TeacherMaskStore(out).index[first][0].name).unlink()  # something left to compute
    with pytest.raises(ConfigError, match="format 1") as exc:
        generate_teacher_masks(images, out, SPEC, **SETTINGS, **RUN)
    assert str(out / "manifest.json") in str(exc.value) and "--out" in str(exc.value)
    assert first not in TeacherMaskStore(out)  # nothing was written


class StopAfterFirstBatch(pl.Callback):
    """Simulates a run killed after its first shard was written."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        raise RuntimeError("simulated kill")


def test_resume_after_interrupted_run(reference, tmp_path):
    images, full = reference
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="simulated kill"):
        generate_teacher_masks(images, out, SPEC, **SETTINGS, **RUN, callbacks=[StopAfterFirstBatch()])
    assert len(TeacherMaskStore(out)) == RUN["batch_size"]
    (out / ".shard-leftover.1234.safetensors.tmp").write_bytes(b"half a shard")  # a write killed midway

    summary = generate_teacher_masks(images, out, SPEC, **SETTINGS, **{**RUN, "batch_size": 1})
    assert (summary.done, summary.skipped) == (NUM_IMAGES - RUN["batch_size"], RUN["batch_size"])
    ids = shard_ids(out)
    assert sorted(ids) == sorted(p.name for p in images.iterdir())  # every image exactly once
    assert not list(out.glob("*.tmp"))
    # seeds follow the file name, not the run: the resumed masks equal the one-run masks
    names = sorted(ids)
    torch.testing.assert_close(stored_masks(TeacherMaskStore(out), names), stored_masks(TeacherMaskStore(full), names))


def test_lost_shard_is_recomputed_and_a_finished_folder_is_left_alone(reference, tmp_path):
    images, full = reference
    out = tmp_path / "store"
    shutil.copytree(full, out)
    first = TeacherMaskStore(out).shards()[0]
    lost = shard_ids(out)[: RUN["batch_size"]]
    first.unlink()
    summary = generate_teacher_masks(images, out, SPEC, **SETTINGS, **RUN)
    assert (summary.done, summary.skipped) == (len(lost), NUM_IMAGES - len(lost))
    assert sorted(shard_ids(out)) == sorted(p.name for p in images.iterdir())

    shards = {p.name: p.stat().st_mtime_ns for p in TeacherMaskStore(out).shards()}
    again = generate_teacher_masks(images, out, SPEC, **SETTINGS, **RUN)
    assert (again.done, again.skipped, again.mean_loss) == (0, NUM_IMAGES, None)
    assert {p.name: p.stat().st_mtime_ns for p in TeacherMaskStore(out).shards()} == shards


def test_limit_takes_the_first_images_and_the_rest_follows_later(reference, tmp_path):
    images, full = reference
    out = tmp_path / "store"
    names = sorted(p.name for p in images.iterdir())
    first = generate_teacher_masks(images, out, SPEC, **SETTINGS, **RUN, limit=2)
    assert (first.done, first.total) == (2, 2) and sorted(TeacherMaskStore(out).ids()) == names[:2]
    rest = generate_teacher_masks(images, out, SPEC, **SETTINGS, **RUN)
    assert (rest.done, rest.skipped) == (NUM_IMAGES - 2, 2)
    # an image's seed is its file name's with or without a limit: the masks are the one-run masks
    torch.testing.assert_close(stored_masks(TeacherMaskStore(out), names), stored_masks(TeacherMaskStore(full), names))
    with pytest.raises(ConfigError, match="limit"):
        generate_teacher_masks(images, out, SPEC, **SETTINGS, **RUN, limit=0)


def test_other_settings_are_refused(reference):
    images, folder = reference
    before = shard_ids(folder)
    with pytest.raises(ConfigError, match="steps"):
        generate_teacher_masks(images, folder, SPEC, **{**SETTINGS, "steps": 9}, **RUN)
    with pytest.raises(ConfigError, match="size"):
        generate_teacher_masks(images, folder, SPEC, **{**SETTINGS, "size": 40}, **RUN)
    assert shard_ids(folder) == before
    # chunk_size only bounds memory: it is not a setting of the masks
    assert generate_teacher_masks(images, folder, SPEC, **SETTINGS, **RUN, chunk_size=2).done == 0


def test_writer_drops_ids_already_written(reference, tmp_path):
    """Duplicated ids (as a padding sampler would give) and ids stored before the run are never written twice."""
    _, full = reference
    out = tmp_path / "store"
    TeacherMaskStore.create(out, dict(TeacherMaskStore(full).manifest))
    src = TeacherMaskStore(full)
    ids = sorted(src.ids())
    src_store = TeacherMaskStore(out)
    record = src.get(ids[0])
    src_store.write_shard("before", [ids[0]], record.mask[None], torch.tensor([0]), *torch.zeros(3, 1))

    class FakeTrainer:
        world_size, global_rank = 1, 0

    writer = TeacherWriter(out, "run", progress=False)
    writer.setup(FakeTrainer(), None, "predict")

    def batch(names):
        n = len(names)
        masks = torch.stack([src.get(i).mask for i in names])
        return TeacherBatch(list(names), list(range(n)), masks, torch.zeros(n, dtype=torch.long), *torch.ones(3, n))

    writer.write_on_batch_end(FakeTrainer(), None, batch(ids[:3]), None, None, 0, 0)
    writer.write_on_batch_end(FakeTrainer(), None, batch([ids[2], ids[3], ids[3]]), None, None, 1, 0)
    assert sorted(shard_ids(out)) == ids[:4]
    assert sorted(p.name for p in out.glob("shard-*")) == [
        "shard-before.safetensors",
        "shard-run-r0-000000.safetensors",
        "shard-run-r0-000001.safetensors",
    ]


def test_manifest_rejects_too_small_images(reference):
    classifier = load_classifier(SPEC)
    settings = TeacherMaskSettings(SPEC, size=4)
    with pytest.raises(InputError, match="too small"):
        build_manifest(settings, settings.build_optimizer(classifier), classifier)


def test_cli_end_to_end_and_errors(reference, tmp_path, capsys):
    from amortized_cartoonx.cli import main

    images, _ = reference
    out = tmp_path / "cli"
    args = ["targets", "--classifier", SPEC, "--images", str(images), "--out", str(out), "--size", str(SIZE)]
    args += ["--steps", "3", "--samples", "2", "--batch-size", "3", "--accelerator", "cpu", "--no-progress"]
    assert main(args) == 0
    assert f"{NUM_IMAGES} done, 0 skipped" in capsys.readouterr().out
    assert len(TeacherMaskStore(out)) == NUM_IMAGES

    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and err[0].startswith("cartoonx targets: error:"), err
        return err[0]

    assert "other settings" in error([*args, "--lr", "0.5"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in error([*args[:4], str(empty), "--out", str(tmp_path / "o2")])
    assert "cannot import" in error(["targets", "--classifier", "nosuch_module:nothing", *args[3:]])
    bad = make_folder(tmp_path / "bad", 2)
    (bad / "broken.png").write_bytes(b"not a png")
    assert "cannot read image" in error([*args[:4], str(bad), "--out", str(tmp_path / "o3")])


def test_ddp_on_cpu_writes_every_image_once(reference, tmp_path):
    """Two DDP processes (gloo) split the images; the masks equal the single-process run."""
    images, full = reference
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cartoonx = Path(sys.executable).parent / "cartoonx"  # Lightning's DDP launcher re-runs this command per rank
    cmd = [str(cartoonx), "targets", "--classifier", SPEC, "--images", str(images)]
    cmd += ["--out", str(out), "--size", str(SIZE), "--steps", "8", "--samples", "4", "--lr", "0.05"]
    cmd += ["--batch-size", "2", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--no-progress"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("teacher masks:") == 1  # one summary, from rank 0
    assert f"{NUM_IMAGES} done" in result.stdout
    ids = shard_ids(out)
    assert sorted(ids) == sorted(p.name for p in images.iterdir())
    assert {p.name.split("-r")[1][0] for p in out.glob("shard-*")} == {"0", "1"}
    torch.testing.assert_close(
        stored_masks(TeacherMaskStore(out), sorted(ids)), stored_masks(TeacherMaskStore(full), sorted(ids))
    )
