"""Teacher masks (``cartoonx targets``): records, seeds, resume, refusal, CLI, DDP; the store's checks on load."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # the classifier spec below imports conftest.make_tiny_cnn
    sys.path.insert(0, str(TESTS))

from amortized_cartoonx.classifiers import load_classifier  # noqa: E402
from amortized_cartoonx.errors import ConfigError, InputError  # noqa: E402
from amortized_cartoonx.images import load_images  # noqa: E402
from amortized_cartoonx.io import file_sha256  # noqa: E402
from amortized_cartoonx.optimizer import CartoonX  # noqa: E402
from amortized_cartoonx.seeding import file_seeds, item_seed  # noqa: E402
from amortized_cartoonx.teacher_masks.files import FORMAT_VERSION  # noqa: E402
from amortized_cartoonx.teacher_masks.store import TeacherMaskStore  # noqa: E402

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
    for shard in store.shards():  # the same seed draws other noise on a GPU: each shard says where it ran
        with safe_open(str(shard), framework="pt") as fh:
            assert fh.metadata()["device_type"] == "cpu"
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


def test_a_spec_that_now_loads_other_weights_is_another_classifier(tmp_path):
    """A resume compared the spec's text only: a retrained classifier behind the same spec added its masks to the
    old one's."""
    images = make_folder(tmp_path / "images", 2)
    model_file, shift = tmp_path / "my_model.py", tmp_path / "shift.txt"
    model_file.write_text(
        "import torch, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from conftest import make_tiny_cnn\n"
        "def build():\n"
        "    model = make_tiny_cnn()\n"
        "    with torch.no_grad():\n"
        f"        model.head.bias.add_(float(open({str(shift)!r}).read()))\n"
        "    return model\n"
    )
    spec = f"{model_file}:build"
    shift.write_text("0")
    generate_teacher_masks(images, tmp_path / "store", spec, **SETTINGS, **RUN, limit=1)
    shift.write_text("1")  # retrained: the same spec, other weights
    with pytest.raises(ConfigError, match="classifier_weights_sha256"):
        generate_teacher_masks(images, tmp_path / "store", spec, **SETTINGS, **RUN)


def test_an_image_changed_since_its_mask_was_stored_is_refused(tmp_path):
    """A resume skipped stored ids by file name: an image edited in place kept its old mask."""
    images = make_folder(tmp_path / "images", 2)
    out = tmp_path / "store"
    generate_teacher_masks(images, out, SPEC, **SETTINGS, **RUN, limit=1)
    first = sorted(p.name for p in images.glob("*.png"))[0]
    assert TeacherMaskStore(out).contents()[first] == file_sha256(images / first)
    picture = np.asarray(Image.open(images / first))
    Image.fromarray(255 - picture).save(images / first)  # edited in place: the same name, other pixels
    with pytest.raises(ConfigError, match=f"1 image\\(s\\) of .* changed since .*{first}"):
        generate_teacher_masks(images, out, SPEC, **SETTINGS, **RUN)


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
        contents = ["0" * 64] * n
        return TeacherBatch(
            list(names), list(range(n)), contents, masks, torch.zeros(n, dtype=torch.long), *torch.ones(3, n)
        )

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
    assert f"{NUM_IMAGES} done, 0 already stored" in capsys.readouterr().out
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


@pytest.mark.slow
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


# --------------------------------------------------------------------------------------------- checks on load
# The store validates what it reads: one-line InputErrors naming the file, never a traceback or bad data.

K = 20  # the mask length of the small stores below
IDS = ["a.png", "b.png", "c.png"]


def small_store(folder: Path, manifest: dict | None = None) -> TeacherMaskStore:
    """A valid store of one shard (``shard-x``) holding three seeded masks of length K."""
    manifest = {"kind": "cartoonx-teacher-masks", "mask_length": K, "size": 8} if manifest is None else manifest
    store = TeacherMaskStore.create(folder, manifest)
    n = len(IDS)
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(n, K, generator=gen)
    store.write_shard("x", IDS, masks, torch.arange(n), *torch.rand(3, n, generator=gen), seeds=[5, 6, 7])
    return store


def raw_shard(path: Path, ids: list[str], masks: torch.Tensor, **tensors: torch.Tensor) -> Path:
    """A shard written with safetensors directly (``write_shard`` refuses bad values); n = ``masks``' rows."""
    n = masks.shape[0]
    base = {"masks": masks.half(), "targets": torch.zeros(n, dtype=torch.int64), "loss": torch.zeros(n)}
    base |= {"distortion": torch.zeros(n), "mask_mean": torch.zeros(n)}
    save_file({**base, **tensors}, str(path), metadata={"ids": json.dumps(ids)})
    return path


def one_line_naming(exc: pytest.ExceptionInfo, *paths: Path) -> str:
    message = str(exc.value)
    assert "\n" not in message and all(str(p) in message or p.name in message for p in paths), message
    return message


def records(store: TeacherMaskStore) -> list:
    return [store.get(i) for i in store.ids()]


def test_a_healthy_small_store_reads_back(tmp_path):
    store = TeacherMaskStore(small_store(tmp_path / "s").folder)
    assert sorted(store.ids()) == IDS and store.mask_length == K and store.verify() == len(IDS)
    assert [r.seed for r in records(store)] == [5, 6, 7] and all(r.mask.shape == (K,) for r in records(store))


@pytest.mark.parametrize(
    "content, words",
    [
        (b"{not json", "not valid JSON"),
        (bytes(range(256)) * 4, "not valid JSON"),  # binary garbage
        (b"[1, 2, 3]", "JSON object expected"),
        (b'{"kind": "cartoonx-teacher-masks"}', "no format_version"),
        (b'{"format_version": "2"}', "format_version"),
        (b'{"format_version": 2, "mask_length": "20"}', "mask_length"),
        (b'{"format_version": 2, "mask_length": true}', "mask_length"),
        (b'{"format_version": 2, "mask_length": 0}', "mask_length"),
        (b'{"format_version": 2, "band_shapes": [[2, 2]], "mask_length": 5}', "band_shapes"),
        (b'{"format_version": 2, "band_shapes": [[2, "x"]]}', "band_shapes"),
        (b'{"format_version": 2, "lr": null}', "lr"),
        (b'{"format_version": 2, "kind": "something else"}', "kind"),
        (b'{"format_version": 99}', "newer"),
    ],
)
def test_a_bad_manifest_is_one_line_naming_it(tmp_path, content, words):
    folder = small_store(tmp_path / "s").folder
    (folder / "manifest.json").write_bytes(content)
    with pytest.raises(InputError, match=words) as exc:
        TeacherMaskStore(folder)
    one_line_naming(exc, folder / "manifest.json")
    with pytest.raises(InputError):  # a run into the folder reads it too
        TeacherMaskStore.create(folder, {"mask_length": K})


class RunsCode:
    """Unpickling this writes a marker file: a shard loader that unpickles would be caught."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.mark.parametrize("kind", ["pickle", "torch.save", "truncated", "empty", "text"])
def test_a_shard_that_is_not_safetensors_is_one_line_and_never_unpickled(tmp_path, kind):
    folder = small_store(tmp_path / "s").folder
    good = (folder / "shard-x.safetensors").read_bytes()
    marker = tmp_path / "marker"
    bad = folder / "shard-y.safetensors"
    if kind == "pickle":
        bad.write_bytes(pickle.dumps({"masks": RunsCode(marker)}))
    elif kind == "torch.save":
        torch.save({"masks": RunsCode(marker)}, bad)
    elif kind == "truncated":
        bad.write_bytes(good[: len(good) - 7])
    else:
        bad.write_bytes(b"" if kind == "empty" else b"masks,targets\n0.5,1\n")
    store = TeacherMaskStore(folder)
    with pytest.raises(InputError, match="not a valid teacher-mask shard") as exc:
        store.ids()
    one_line_naming(exc, bad)
    assert not marker.exists()


@pytest.mark.parametrize(
    "masks, other, words",
    [
        (torch.full((3, K), float("nan")), {}, "outside"),
        (torch.full((3, K), float("inf")), {}, "outside"),
        (torch.full((3, K), 1.5), {}, "outside"),
        (torch.full((3, K), -0.25), {}, "outside"),
        (torch.rand(3, K), {"loss": torch.tensor([0.0, float("nan"), 0.0])}, "loss"),
        (torch.rand(3, K), {"targets": torch.tensor([0, -1, 0])}, "target"),
    ],
)
def test_bad_values_are_refused_on_load_naming_the_shard(tmp_path, masks, other, words):
    """A valid safetensors file of bad values (it sorts before the good shard): loading any of its masks,
    or :meth:`verify`, is one line naming it; the good shard still loads."""
    folder = small_store(tmp_path / "s").folder
    bad = raw_shard(folder / "shard-a.safetensors", ["d.png", "e.png", "f.png"], masks, **other)
    store = TeacherMaskStore(folder)
    assert len(store) == 6  # the header is fine: the index is built without reading values
    assert store.get("a.png").mask.shape == (K,)
    with pytest.raises(InputError, match=words) as exc:
        store.get("e.png")
    one_line_naming(exc, bad)
    with pytest.raises(InputError, match=words) as exc:
        TeacherMaskStore(folder).verify()
    one_line_naming(exc, bad)


def test_a_shard_of_another_mask_length_is_refused(tmp_path):
    folder = small_store(tmp_path / "s").folder
    bad = raw_shard(folder / "shard-y.safetensors", ["d.png"], torch.rand(1, K + 1))
    with pytest.raises(InputError, match=f"length {K + 1}, expected {K}") as exc:
        TeacherMaskStore(folder).ids()
    one_line_naming(exc, bad)
    # without a mask_length in the manifest, every shard must agree with the first
    bare = small_store(tmp_path / "bare", manifest={}).folder
    raw_shard(bare / "shard-y.safetensors", ["d.png"], torch.rand(1, K + 1))
    with pytest.raises(InputError, match="length") as exc:
        TeacherMaskStore(bare).ids()
    one_line_naming(exc, bare / "shard-y.safetensors")


@pytest.mark.parametrize(
    "ids, tensors, words",
    [
        (["d.png", "d.png"], {}, "twice"),
        (["d.png"], {}, "1 ids for 2 masks"),
        (["d.png", ""], {}, "non-empty strings"),
        (["d.png", "e.png"], {"targets": torch.zeros(2)}, "dtype"),
        (["d.png", "e.png"], {"loss": torch.zeros(3)}, "shape"),
        (["d.png", "e.png"], {"seeds": torch.zeros(2, 1, dtype=torch.int64)}, "seeds has shape"),
    ],
)
def test_a_shard_of_the_wrong_structure_is_refused(tmp_path, ids, tensors, words):
    folder = small_store(tmp_path / "s").folder
    bad = raw_shard(folder / "shard-y.safetensors", ids, torch.rand(2, K), **tensors)
    with pytest.raises(InputError, match=words) as exc:
        TeacherMaskStore(folder).ids()
    one_line_naming(exc, bad)


def test_masks_that_are_not_a_matrix_are_named_with_their_shape(tmp_path):
    """The message said "expected [-1, K]" (the row count it could not read) for 3-D masks."""
    folder = small_store(tmp_path / "s").folder
    bad = folder / "shard-y.safetensors"
    tensors = {"masks": torch.rand(2, K, 1).half(), "targets": torch.zeros(2, dtype=torch.int64)}
    tensors |= {name: torch.zeros(2) for name in ("loss", "distortion", "mask_mean")}
    save_file(tensors, str(bad), metadata={"ids": json.dumps(["d.png", "e.png"])})
    with pytest.raises(InputError, match=r"masks has shape \[2, 20, 1\], expected \[n, K\]") as exc:
        TeacherMaskStore(folder).ids()
    one_line_naming(exc, bad)


def test_the_same_id_in_two_shards_names_both(tmp_path):
    """A shard of NaN masks that sorts first used to replace the good masks silently."""
    folder = small_store(tmp_path / "s").folder
    raw_shard(folder / "shard-a.safetensors", ["b.png"], torch.full((1, K), float("nan")))
    with pytest.raises(InputError, match="'b.png' is in two shards") as exc:
        TeacherMaskStore(folder).ids()
    message = one_line_naming(exc, folder / "shard-a.safetensors", folder / "shard-x.safetensors")
    assert "shard-a.safetensors" in message and "shard-x.safetensors" in message


def test_write_shard_refuses_bad_masks(tmp_path):
    store = small_store(tmp_path / "s")
    n = 2
    for masks in (torch.full((n, K), float("nan")), torch.full((n, K), 2.0), torch.rand(n, K + 1)):
        with pytest.raises(ValueError):
            store.write_shard("bad", ["d.png", "e.png"], masks, torch.zeros(n, dtype=torch.long), *torch.zeros(3, n))
    assert not list(store.folder.glob("shard-bad*"))


@pytest.mark.parametrize("damage", ["truncated shard", "nan shard", "manifest"])
def test_resuming_into_a_damaged_folder_is_one_line_and_exit_2(reference, tmp_path, capsys, damage):
    from amortized_cartoonx.cli import main

    images, full = reference
    out = tmp_path / "store"
    shutil.copytree(full, out)
    shards = TeacherMaskStore(out).shards()
    shards[-1].unlink()  # something left to compute
    if damage == "truncated shard":
        bad = shards[0]
        bad.write_bytes(bad.read_bytes()[:100])
    elif damage == "nan shard":
        length = TeacherMaskStore(out).mask_length
        bad = raw_shard(out / "shard-0.safetensors", ["zzz.png"], torch.full((1, length), float("nan")))
    else:
        bad = out / "manifest.json"
        bad.write_bytes(b"\x80\x04\x95 not json")
    before = sorted(p.name for p in out.iterdir())
    args = ["targets", "--classifier", SPEC, "--images", str(images), "--out", str(out), "--size", str(SIZE)]
    args += ["--steps", "8", "--samples", "4", "--lr", "0.05", "--accelerator", "cpu", "--no-progress"]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("cartoonx targets: error:") and str(bad) in err[0], err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing computed or written


@pytest.mark.parametrize(
    ("option", "needle"),
    [(["--accelerator", "bogus"], "invalid accelerator name"), (["--strategy", "bogus"], "invalid strategy name")],
)
def test_trainer_settings_lightning_refuses_are_one_line(tmp_path, capsys, option, needle):
    """They were Lightning's tracebacks, exit code 1."""
    from amortized_cartoonx.cli import main

    images = make_folder(tmp_path / "images", 1)
    args = ["targets", "--classifier", SPEC, "--images", str(images), "--out", str(tmp_path / "out")]
    assert main([*args, "--size", str(SIZE), "--steps", "2", "--samples", "2", "--no-progress", *option]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "the Lightning Trainer refuses" in err[0] and needle in err[0], err


def test_fuzzed_stores_load_valid_data_or_raise_input_error(tmp_path):
    """~200 seeded mutations (truncations, byte flips, overwritten runs) of a valid shard and manifest: each store
    either loads masks that are valid or raises InputError (one line) -- never another exception. A changed shard
    is always refused (its checksum); a changed manifest may still be a valid one."""
    source = small_store(tmp_path / "source").folder
    files = {name: (source / name).read_bytes() for name in ("shard-x.safetensors", "manifest.json")}
    rng = np.random.default_rng(13)
    outcomes = {"valid": 0, "refused": 0, "shard valid": 0}
    for case in range(200):
        folder = tmp_path / f"case{case}"
        folder.mkdir()
        target = "manifest.json" if case % 5 == 0 else "shard-x.safetensors"
        for name, data in files.items():
            data = bytearray(data)
            if name == target:
                kind = rng.integers(4)
                if kind == 0:  # truncation
                    data = data[: int(rng.integers(len(data)))]
                elif kind == 1:  # a few byte flips anywhere (in a shard, mostly its JSON header)
                    for at in rng.integers(len(data), size=int(rng.integers(1, 5))):
                        data[at] ^= int(rng.integers(1, 256))
                elif kind == 2:  # a byte flip in a shard's tensor data, or in the manifest's values
                    start = 8 + int.from_bytes(data[:8], "little") if name != "manifest.json" else len(data) // 2
                    data[int(rng.integers(start, len(data)))] ^= int(rng.integers(1, 256))
                else:  # a run of random bytes
                    at = int(rng.integers(len(data)))
                    data[at : at + 8] = rng.integers(256, size=8, dtype=np.uint8).tobytes()
            (folder / name).write_bytes(bytes(data))
        try:
            store = TeacherMaskStore(folder)
            loaded = records(store)
        except InputError as exc:
            assert "\n" not in str(exc) and str(folder) in str(exc), str(exc)
            outcomes["refused"] += 1
            continue
        for record in loaded:
            assert record.mask.shape == (store.mask_length,) and torch.isfinite(record.mask).all()
            assert 0 <= float(record.mask.min()) and float(record.mask.max()) <= 1 and record.target >= 0
        outcomes["valid"] += 1
        outcomes["shard valid"] += target != "manifest.json"
    assert outcomes["refused"] > 50 and outcomes["valid"] > 0, outcomes  # both kinds of outcome were exercised
    assert outcomes["shard valid"] == 0, outcomes


def test_a_shard_whose_mask_bytes_changed_is_refused(tmp_path):
    """Safetensors files carry no checksum: mask values overwritten within [0, 1] read as another mask."""
    store = small_store(tmp_path / "store")
    shard = store.shards()[0]
    data = bytearray(shard.read_bytes())
    data[-6:-2] = b"\x00\x3c\x00\x3c"  # two float16 ones at the end of the last tensor's data
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match its checksum"):
        records(TeacherMaskStore(store.folder))


def test_a_manifest_from_before_later_settings_counts_at_their_earlier_values():
    from amortized_cartoonx.teacher_masks.files import manifest_differences

    old = {"steps": 200, "lr": 0.1}  # written before manifests recorded the precision
    assert manifest_differences(old, {**old, "precision": "fp32"}) == []
    assert manifest_differences(old, {**old, "precision": "bf16"}) == ["precision"]
    assert manifest_differences({**old, "precision": "bf16"}, {**old, "precision": "bf16"}) == []
    # the parametrisation came later too: an old manifest is a clamp one, whose logit stretch is unused
    clamp = {**old, "parametrisation": "clamp", "logit_stretch": 0.1}
    assert manifest_differences(old, clamp) == []
    assert manifest_differences(old, {**clamp, "parametrisation": "logit"}) == ["logit_stretch", "parametrisation"]
    assert manifest_differences({**clamp, "parametrisation": "logit"}, {**clamp, "parametrisation": "logit"}) == []


def test_the_summary_line_says_which_folder_each_count_is_of(tmp_path):
    from amortized_cartoonx.teacher_masks.generate import TeacherMaskSummary

    line = TeacherMaskSummary(tmp_path / "teachers", 7, 2, 5, 1.0, 0.5).line()
    assert "of 7 images from the image folder" in line and "5 already stored" in line
    assert f"masks in {tmp_path / 'teachers'}/" in line and "in the folder" not in line


def test_every_process_builds_the_same_untrained_classifier_and_a_rank_may_idle(tmp_path):
    """An untrained ``package.module:Class`` spec gave each DDP rank other weights (rank 1 then refused the store
    as made with another classifier); a rank without images raised, as a class attribute meant to allow it was
    reset by Lightning's DataHooks.__init__."""
    from amortized_cartoonx.classifiers import weights_digest
    from amortized_cartoonx.teacher_masks.lightning import TeacherMaskDataModule
    from amortized_cartoonx.teacher_masks.plan import TeacherMaskSettings

    settings = TeacherMaskSettings("amortized_cartoonx.synthetic.classifier:CartoonCNN", size=32)
    state = torch.random.get_rng_state()
    first, second = settings.load_classifier(), settings.load_classifier()
    assert weights_digest(first) == weights_digest(second) and torch.equal(torch.random.get_rng_state(), state)
    assert TeacherMaskDataModule(tmp_path, 32, None, 1).allow_zero_length_dataloader_with_multiple_devices


def test_a_second_run_into_a_store_being_written_is_refused(tmp_path):
    """Two targets runs into one folder both computed the missing images, stored some twice, and left a store
    every later run refused ('image ... is in two shards')."""
    from amortized_cartoonx.teacher_masks.store import writer_lock

    images = make_folder(tmp_path / "images", 2)
    with writer_lock(tmp_path / "store"):
        with pytest.raises(ConfigError, match="another run is writing teacher masks into"):
            generate_teacher_masks(images, tmp_path / "store", SPEC, **SETTINGS, **RUN)
    summary = generate_teacher_masks(images, tmp_path / "store", SPEC, **SETTINGS, **RUN)  # released: it runs
    assert summary.done == 2


def test_the_writer_lock_leaves_other_ranks_and_lockless_filesystems_alone(tmp_path, monkeypatch):
    """A torchrun or srun rank other than 0 was refused as 'another run'; so was every run on a filesystem
    without flock (NFS's emulation needs a file open for writing; ENOLCK, EOPNOTSUPP elsewhere)."""
    import errno
    import fcntl

    from amortized_cartoonx.teacher_masks.store import writer_lock

    with writer_lock(tmp_path):
        for name in ("RANK", "SLURM_PROCID"):
            monkeypatch.setenv(name, "1")
            with writer_lock(tmp_path):  # a later process of the same job: under rank 0's lock
                pass
            monkeypatch.delenv(name)

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock .*No locks available"):
        with writer_lock(tmp_path):
            pass


def test_a_folder_whose_first_run_failed_before_any_mask_takes_new_settings(tmp_path):
    """A first run that failed at its first batch (a classifier refused, say) left its manifest and no masks:
    the folder then refused every run with other settings, the corrected one included."""
    images = make_folder(tmp_path / "images", 2)
    out = tmp_path / "store"
    generate_teacher_masks(images, tmp_path / "other", SPEC, **{**SETTINGS, "steps": 9}, **RUN, limit=1)
    out.mkdir()
    shutil.copy(tmp_path / "other" / "manifest.json", out)  # the manifest of steps 9, no shard
    summary = generate_teacher_masks(images, out, SPEC, **SETTINGS, **RUN, limit=1)
    assert summary.done == 1 and TeacherMaskStore(out).manifest["steps"] == SETTINGS["steps"]
    with pytest.raises(ConfigError, match="steps"):  # with masks in it, other settings are refused again
        generate_teacher_masks(images, out, SPEC, **{**SETTINGS, "steps": 9}, **RUN)
