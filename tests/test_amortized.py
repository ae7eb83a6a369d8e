"""The amortized explainer and warm start: checkpoint loading without Lightning, explain, refusals, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amortized_cartoonx.amortized import AmortizedExplainer, WarmStartExplainer
from amortized_cartoonx.classifiers import load_classifier, normalization_name, wrap_classifier
from amortized_cartoonx.data import split_train_val_test
from amortized_cartoonx.errors import ConfigError, InputError
from amortized_cartoonx.evaluation.agreement import average_ranks, mask_agreement
from amortized_cartoonx.explainers import check_explainer
from amortized_cartoonx.explanation import Explanation, load_saved_explanation
from amortized_cartoonx.io import file_sha256
from amortized_cartoonx.optimizer import CartoonX, OptimizerConfig

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # the classifier spec imports conftest.make_tiny_cnn
    sys.path.insert(0, str(TESTS))
SPEC = "conftest:make_tiny_cnn"
SIZE = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as ``cartoonx fit`` writes it (the module's own save hook), of an untrained tiny network
    whose heads are perturbed so that masks vary between coefficients."""
    from amortized_cartoonx.mask_predictor import MaskPredictorConfig
    from amortized_cartoonx.training import AmortizedCartoonXModule

    torch.manual_seed(0)
    network = MaskPredictorConfig(width=8, decoder_width=8, embed_dim=8, init_bias=1.0)
    module = AmortizedCartoonXModule(SPEC, image_size=SIZE, levels=3, num_samples=2, mask_predictor=network)
    with torch.no_grad():
        for head in [*module.mask_predictor.detail_heads, module.mask_predictor.lowpass_head]:
            head[-1].weight.normal_(std=0.5)
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(state)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save(state, path)
    return path


@pytest.fixture
def small_images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x = torch.nn.functional.interpolate(torch.rand(3, 3, 4, 4, generator=gen), size=(SIZE, SIZE), mode="bilinear")
    return x.clamp(0, 1)


def test_checkpoint_loads_without_lightning(checkpoint):
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); import torch\n"
        "from amortized_cartoonx.amortized import AmortizedExplainer\n"
        "e = AmortizedExplainer.from_checkpoint(sys.argv[1], sys.argv[3])\n"
        "e.predict_mask(torch.rand(1, 3, 32, 32))\n"
        "assert 'pytorch_lightning' not in sys.modules and 'lightning' not in sys.modules, 'Lightning imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(checkpoint), str(TESTS), SPEC], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_explain_is_measured_like_the_optimizer(checkpoint, small_images):
    explainer = AmortizedExplainer.from_checkpoint(checkpoint, SPEC, measure_samples=8)
    explanation = explainer.explain(small_images, seeds=[5, 6, 7])
    assert isinstance(explanation, Explanation) and explanation.method == "amortized"
    assert explanation.steps.tolist() == [0, 0, 0] and explanation.history is None
    assert explanation.image.shape == (3, 1, SIZE, SIZE)
    flat = explanation.mask.flatten()
    assert bool(((flat >= 0) & (flat <= 1)).all()) and float(flat.std()) > 0.01
    # the exact optimizer started at this mask and run for 0 steps reports exactly the same numbers
    exact = CartoonX(explainer.classifier, levels=3, steps=0, num_samples=8)
    reference = exact.explain(small_images, init_mask=explanation.mask, seeds=[5, 6, 7])
    assert torch.allclose(explanation.loss, reference.loss)
    assert torch.allclose(explanation.distortion, reference.distortion)
    # an explicit target is explained (class-conditional), and predict_mask agrees with explain
    chosen = explainer.explain(small_images, target=[1, 2, 3], seeds=[5, 6, 7])
    assert chosen.target.tolist() == [1, 2, 3]
    assert torch.equal(explainer.predict_mask(small_images, [1, 2, 3]).flatten(), chosen.mask.flatten())
    settings = explainer.settings()
    assert settings["classifier"] == SPEC and settings["image_size"] == SIZE and settings["wave"] == "db3"
    # the file's content, not only its path (a later fit writes best.ckpt again under the same name)
    assert settings["checkpoint_sha256"] == file_sha256(checkpoint) and chosen.seeds == [5, 6, 7]
    warm = WarmStartExplainer(explainer, refine_steps=0)
    assert warm.settings()["checkpoint_sha256"] == file_sha256(checkpoint)


def test_warm_start_with_zero_steps_returns_the_predicted_mask(checkpoint, small_images):
    amortized = AmortizedExplainer.from_checkpoint(checkpoint, SPEC)
    predicted = amortized.predict_mask(small_images)
    warm = WarmStartExplainer(amortized, refine_steps=0, config=OptimizerConfig(num_samples=8))
    explanation = warm.explain(small_images, seeds=[1, 2, 3])
    assert explanation.method == "warm" and explanation.steps.tolist() == [0, 0, 0]
    assert torch.equal(explanation.mask.flatten(), predicted.flatten())
    measured = AmortizedExplainer.from_checkpoint(checkpoint, SPEC, measure_samples=8)
    assert torch.allclose(explanation.loss, measured.explain(small_images, seeds=[1, 2, 3]).loss)

    refined = WarmStartExplainer(amortized, refine_steps=3, config=OptimizerConfig(num_samples=4)).explain(
        small_images, seeds=[1, 2, 3]
    )
    assert refined.steps.tolist() == [3, 3, 3] and refined.history.total.shape == (3, 3)
    assert not torch.equal(refined.mask.flatten(), predicted.flatten())
    assert refined.settings["refine_steps"] == 3 and refined.settings["method"] == "warm"


def test_the_warm_start_is_seeded_measured_and_recorded_as_its_start(checkpoint, small_images):
    """Without seeds the calibration used the amortized explainer's seed and the steps the config's (0), the
    default measurement had 64 draws whatever the amortized explainer's, and the settings left the calibration
    out: a calibrated and a plain warm start were recorded alike."""
    amortized = AmortizedExplainer.from_checkpoint(checkpoint, SPEC, seed=7, measure_samples=4)
    warm = WarmStartExplainer(amortized, refine_steps=0)
    assert (warm.optimizer.config.seed, warm.optimizer.config.measure_samples) == (7, 4)
    assert torch.equal(warm.explain(small_images).loss, amortized.explain(small_images).loss)
    calibrated = AmortizedExplainer.from_checkpoint(checkpoint, SPEC, calibration_samples=2, calibration_shifts=(0, 1))
    settings = WarmStartExplainer(calibrated, refine_steps=0).settings()
    assert settings["calibration_samples"] == 2 and settings["calibration_shifts"] == [0.0, 1.0]
    assert warm.settings()["calibration_samples"] == 0


def test_strict_size_off_keeps_the_levels_the_network_has(tmp_path):
    """Trained at 32 px with levels=5 (J capped to 4), a larger image got a 5-level DWT for a 4-level network: a
    raw shape error."""
    from amortized_cartoonx.training import AmortizedCartoonXModule

    module = AmortizedCartoonXModule(SPEC, image_size=SIZE, levels=5, num_samples=2)
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(state)
    torch.save(state, tmp_path / "capped.ckpt")
    assert (state["cartoonx"]["levels"], state["cartoonx"]["levels_used"]) == (5, 4)
    loose = AmortizedExplainer.from_checkpoint(tmp_path / "capped.ckpt", SPEC, strict_size=False, measure_samples=2)
    explanation = loose.explain(torch.rand(1, 3, 2 * SIZE, 2 * SIZE))
    assert len(explanation.mask.details) == 4


def test_float64_images_are_explained_like_float32_ones(checkpoint, small_images):
    """numpy's float64 reaches the network and the classifier in their own dtype; the masks agree."""
    amortized = AmortizedExplainer.from_checkpoint(checkpoint, SPEC, measure_samples=4)
    single = amortized.predict_mask(small_images).flatten()
    torch.testing.assert_close(amortized.predict_mask(small_images.double()).flatten().float(), single)
    warm = WarmStartExplainer(amortized, refine_steps=2, config=OptimizerConfig(num_samples=4))
    refined = warm.explain(small_images.double(), seeds=[1, 2, 3])
    assert bool(torch.isfinite(refined.loss).all()) and refined.steps.tolist() == [2, 2, 2]


def test_mismatched_settings_are_refused(checkpoint, small_images):
    explainer = AmortizedExplainer.from_checkpoint(checkpoint, SPEC)
    explainer.check_compatible(SPEC, SIZE, "db3", 3, "zero")  # the training settings pass
    with pytest.raises(ConfigError, match=r"image size 48x48 \(trained on 32x32: use --size 32\)"):
        explainer.check_compatible(image_size=48)
    with pytest.raises(ConfigError, match="wavelet haar"):
        explainer.check_compatible(wave="haar")
    with pytest.raises(ConfigError, match="classifier 'torchvision:resnet18:none'"):
        explainer.check_compatible("torchvision:resnet18:none")
    with pytest.raises(ConfigError, match="lambda 40"):
        explainer.check_compatible(l1_lambda=40.0)
    with pytest.raises(ConfigError, match="image size"):
        explainer.explain(torch.rand(1, 3, 48, 48))
    with pytest.raises(ConfigError, match="distortion kl"):
        WarmStartExplainer(explainer, 5, OptimizerConfig(distortion="kl"))
    other = load_classifier("torchvision:squeezenet1_0:none")
    with pytest.raises(ConfigError, match="was trained for classifier"):
        AmortizedExplainer.from_checkpoint(checkpoint, other)
    with pytest.raises(ConfigError, match="was trained for classifier"):
        AmortizedExplainer.from_checkpoint(checkpoint, "torchvision:squeezenet1_0:none")
    with pytest.raises(ConfigError, match="name the classifier"):
        AmortizedExplainer.from_checkpoint(checkpoint, None)


def test_the_input_normalisation_is_the_checkpoints(checkpoint, tmp_path):
    """normalize= with a spec ran the network behind another normalisation than in training, a bare module was
    wrapped without the checkpoint's, and settings() recorded the checkpoint's either way."""
    from conftest import make_tiny_cnn

    for classifier, normalize in [
        (SPEC, "imagenet"),
        (make_tiny_cnn(), "imagenet"),
        (wrap_classifier(make_tiny_cnn(), normalize="imagenet"), None),
    ]:
        with pytest.raises(ConfigError, match="trained with input normalisation none, the classifier uses imagenet"):
            AmortizedExplainer.from_checkpoint(checkpoint, classifier, normalize=normalize)
    with pytest.raises(ConfigError, match="a loaded Classifier keeps its own"):
        AmortizedExplainer.from_checkpoint(checkpoint, load_classifier(SPEC), normalize="none")
    state = torch.load(checkpoint, weights_only=True)
    state["cartoonx"]["normalize"] = "imagenet"
    torch.save(state, tmp_path / "imagenet.ckpt")
    bare = AmortizedExplainer.from_checkpoint(tmp_path / "imagenet.ckpt", make_tiny_cnn())
    assert normalization_name(bare.classifier) == "imagenet"  # a bare module gets the checkpoint's


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        ({"calibration_samples": 2.9}, "calibration_samples must be an integer of at least 0, got 2.9"),
        ({"calibration_samples": True}, "calibration_samples must be an integer"),
        ({"measure_samples": 2.7}, "measure_samples must be an integer of at least 1"),
        ({"seed": -3}, "seed must be an integer of at least 0, got -3"),
        ({"strict_size": "no"}, "strict_size must be True or False"),
        ({"calibration_samples": 2, "calibration_fractions": "abc"}, "calibration_fractions must be a sequence"),
        ({"calibration_samples": 2, "calibration_shifts": [0, "1"]}, "calibration_shifts must be a sequence"),
    ],
)
def test_options_are_checked_not_truncated(checkpoint, option, needle):
    """2.9 calibration samples ran as 2, seed 1.9 as 1, strict_size="no" as True; a string failed in float()."""
    with pytest.raises(ConfigError, match=needle):
        AmortizedExplainer.from_checkpoint(checkpoint, SPEC, **option)


def test_a_bad_refine_steps_or_images_list_is_an_error_of_the_library(checkpoint):
    amortized = AmortizedExplainer.from_checkpoint(checkpoint, SPEC)
    with pytest.raises(ConfigError, match="refine_steps must be an integer of at least 0, got '3'"):
        WarmStartExplainer(amortized, refine_steps="3")
    for explainer in (amortized, WarmStartExplainer(amortized, refine_steps=1)):
        with pytest.raises(InputError, match="images must be a tensor"):
            explainer.explain([[1.0]])


def test_an_unknown_or_missing_device_is_refused_before_loading(checkpoint):
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        AmortizedExplainer.from_checkpoint(checkpoint, SPEC, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is available"):
            AmortizedExplainer.from_checkpoint(checkpoint, SPEC, device="cuda")
    assert AmortizedExplainer.from_checkpoint(checkpoint, SPEC, device="auto").meta["image_size"] == SIZE


def test_unreadable_checkpoints_are_refused(tmp_path):
    with pytest.raises(InputError, match="not found"):
        AmortizedExplainer.from_checkpoint(tmp_path / "missing.ckpt", SPEC)
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(InputError, match="not an amortized CartoonX checkpoint"):
        AmortizedExplainer.from_checkpoint(tmp_path / "other.ckpt", SPEC)
    (tmp_path / "junk.ckpt").write_text("junk")
    with pytest.raises(InputError, match="cannot read checkpoint"):
        AmortizedExplainer.from_checkpoint(tmp_path / "junk.ckpt", SPEC)


def test_cli_explain_amortized_and_warm(checkpoint, small_images, tmp_path, capsys):
    from PIL import Image

    from amortized_cartoonx.cli import main

    paths = []
    for i, image in enumerate(small_images[:2]):
        paths.append(str(tmp_path / f"im{i}.png"))
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(paths[-1])
    common = [
        "--classifier",
        SPEC,
        "--checkpoint",
        str(checkpoint),
        "--size",
        str(SIZE),
        "--levels",
        "3",
        "--samples",
        "4",
        "--device",
        "cpu",
    ]
    assert main(["explain", *paths, "--method", "amortized", "--out", str(tmp_path / "a"), *common]) == 0
    assert (
        main(["explain", *paths, "--method", "warm", "--refine-steps", "2", "--out", str(tmp_path / "w"), *common]) == 0
    )
    for folder, method, steps in (("a", "amortized", 0), ("w", "warm", 2)):
        lines = (tmp_path / folder / "summary.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["method"] for r in records] == [method, method] and records[0]["steps"] == steps
        assert (tmp_path / folder / "im0.png").is_file()
        saved = load_saved_explanation(tmp_path / folder / "im0.safetensors")
        assert saved["metadata"]["method"] == method and saved["metadata"]["steps"] == steps
    capsys.readouterr()
    args = ["explain", paths[0], "--method", "amortized", "--out", str(tmp_path / "x"), *common]
    assert main([*args[:-8], "--size", "48", *args[-6:]]) == 2  # trained at 32 px
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "use --size 32" in error[0]
    assert main(["explain", paths[0], "--method", "warm", "--classifier", SPEC, "--out", str(tmp_path / "y")]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err
    # calibrated, and warm start in logit space
    calibrated = ["--calibrate-samples", "2", "--out", str(tmp_path / "c")]
    assert main(["explain", *paths, "--method", "amortized", *calibrated, *common]) == 0
    records = [json.loads(line) for line in (tmp_path / "c" / "summary.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["amortized-calibrated"] * 2
    top_k = ["--calibrate-samples", "2", "--calibration", "top-k", "--out", str(tmp_path / "k")]
    assert main(["explain", paths[0], "--method", "amortized", *top_k, *common]) == 0
    saved = load_saved_explanation(tmp_path / "k" / "im0.safetensors")
    assert set(saved["mask"].flatten().unique().tolist()) <= {0.0, 1.0}  # a binary top-k mask
    logit = ["--refine-steps", "2", "--parametrisation", "logit", "--lr", "0.1", "--out", str(tmp_path / "l")]
    assert main(["explain", *paths, "--method", "warm", *logit, *common]) == 0
    assert main(["explain", paths[0], "--calibrate-samples", "2", "--out", str(tmp_path / "z"), *common[:2]]) == 2
    assert "--calibrate-samples is for" in capsys.readouterr().err


def test_agreement_and_split_helpers():
    ranks = average_ranks(torch.tensor([0.5, 0.1, 0.5, 0.9]))
    assert ranks.tolist() == [1.5, 0.0, 1.5, 3.0]
    a = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]])
    same = mask_agreement(a, a * 0.5)
    assert same["spearman"].item() == pytest.approx(1.0) and same["top_overlap"].item() == 1.0
    reverse = mask_agreement(a, a.flip(1))
    assert reverse["spearman"].item() == pytest.approx(-1.0) and reverse["top_overlap"].item() == 0.0
    assert mask_agreement(a, torch.ones_like(a))["spearman"].item() == 0.0  # a constant mask: no correlation

    # sparse masks tie most entries at 0: unrelated ones overlap by chance (0.1), not by a shared tie-break (they
    # scored 0.94, as did the empty mask against any sparse one)
    gen = torch.Generator().manual_seed(0)
    sparse = (torch.rand(20, 4000, generator=gen) < 0.005) * torch.rand(20, 4000, generator=gen)
    unrelated = mask_agreement(sparse, sparse.roll(1, 0))["top_overlap"]
    assert float(unrelated.mean()) == pytest.approx(0.1, abs=0.02)
    assert float(mask_agreement(torch.zeros_like(sparse), sparse)["top_overlap"].mean()) == pytest.approx(0.1, abs=0.02)
    assert float(mask_agreement(torch.ones_like(a), a)["top_overlap"]) == pytest.approx(0.1)  # constant: chance
    assert bool((mask_agreement(sparse, sparse)["top_overlap"] > 0.1).all())  # identical sparse masks do better

    ids = [f"{i:03d}.jpg" for i in range(200)]
    split = split_train_val_test(ids, 0.1, 0.2, seed=0)
    assert sorted(split["train"] + split["val"] + split["test"]) == ids
    assert 20 < len(split["test"]) < 60 and 5 < len(split["val"]) < 40
    assert split_train_val_test(ids[:50], 0.1, 0.2, seed=0)["test"] == [i for i in split["test"] if i in ids[:50]]


def test_amortized_and_warm_start_are_explainers(checkpoint):
    amortized = AmortizedExplainer.from_checkpoint(checkpoint, SPEC, seed=3, strict_size=False)
    warm = WarmStartExplainer(amortized, refine_steps=1)
    for explainer in (amortized, warm):
        check_explainer(explainer)
    assert amortized.seed == 3 and not amortized.strict_size
    with pytest.raises(ConfigError, match="measure_samples"):
        AmortizedExplainer.from_checkpoint(checkpoint, SPEC, measure_samples=0)


def test_calibration_picks_the_shift_with_the_lowest_loss(checkpoint, small_images):
    single = AmortizedExplainer.from_checkpoint(checkpoint, SPEC, measure_samples=8)
    shifts = (-3.0, 0.0, 3.0)
    calibrated = AmortizedExplainer.from_checkpoint(
        checkpoint, SPEC, measure_samples=8, calibration_samples=4, calibration_shifts=shifts
    )
    problem, logits = single.predict_logits(small_images)
    _, chosen = calibrated.predict(small_images, seeds=[1, 2, 3])
    net = calibrated.mask_predictor
    candidates = [net.mask_from_logits(logits.map(lambda z, b=b: z + b)) for b in shifts]
    # the chosen shift has the lowest loss on the calibration noise among the candidates
    from amortized_cartoonx.rde import make_generators
    from amortized_cartoonx.seeding import Stream, stream_seeds

    noise = calibrated.objective.sample_noise(
        problem, 4, make_generators(stream_seeds([1, 2, 3], Stream.CALIBRATE), "cpu")
    )
    losses = torch.stack([calibrated.objective.loss(problem, m, noise).total for m in candidates])  # (3, N)
    for n, best in enumerate(losses.argmin(0).tolist()):
        assert torch.equal(chosen.flatten()[n], candidates[best].flatten()[n])
    # deterministic, reported as its own method, and the single pass is unchanged
    explanation = calibrated.explain(small_images, seeds=[1, 2, 3])
    assert explanation.method == "amortized-calibrated" and explanation.settings["calibration_samples"] == 4
    assert explanation.settings["calibration_shifts"] == list(shifts)
    assert torch.equal(explanation.mask.flatten(), calibrated.explain(small_images, seeds=[1, 2, 3]).mask.flatten())
    assert torch.equal(explanation.mask.flatten(), chosen.flatten())
    assert single.explain(small_images, seeds=[1, 2, 3]).method == "amortized"
    # only the zero shift: the single pass
    zero = AmortizedExplainer.from_checkpoint(checkpoint, SPEC, calibration_samples=2, calibration_shifts=(0.0,))
    assert torch.equal(zero.predict(small_images)[1].flatten(), single.predict(small_images)[1].flatten())
    with pytest.raises(ConfigError):
        AmortizedExplainer.from_checkpoint(checkpoint, SPEC, calibration_samples=-1)


def test_top_k_masks_keep_exactly_k_largest_entries():
    from amortized_cartoonx.amortized import top_k_masks

    mask = torch.tensor([[0.9, 0.1, 0.5, 0.5, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])  # masses 2.0 and 1.0
    masks = top_k_masks(mask, (0.5, 1.0, 2.0, 10.0))
    assert masks.shape == (4, 2, 5)
    assert masks.tolist()[0] == [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]  # k = 1 and k = round(0.5) clamped to 1
    assert masks.tolist()[1] == [[1, 0, 1, 0, 0], [1, 0, 0, 0, 0]]  # k = 2 (ties: the earlier entry), k = 1
    assert masks.tolist()[2] == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]  # k = 4 and 2
    assert masks[3].sum(1).tolist() == [5, 5]  # clamped to D


def test_top_k_calibration_picks_the_binary_mask_with_the_lowest_loss(checkpoint, small_images):
    fractions = (0.5, 1.0, 2.0)
    single = AmortizedExplainer.from_checkpoint(checkpoint, SPEC, measure_samples=8)
    calibrated = AmortizedExplainer.from_checkpoint(
        checkpoint, SPEC, measure_samples=8, calibration_samples=4, calibration="top-k", calibration_fractions=fractions
    )
    problem, chosen = calibrated.predict(small_images, seeds=[1, 2, 3])
    predicted = single.predict(small_images)[1].flatten()  # (N, D)
    flat = chosen.flatten()
    assert set(flat.unique().tolist()) <= {0.0, 1.0}  # binary
    for n in range(flat.shape[0]):
        k = int(flat[n].sum())
        assert k in {max(1, round(r * float(predicted[n].sum()))) for r in fractions}
        kept, deleted = predicted[n][flat[n] == 1], predicted[n][flat[n] == 0]
        assert deleted.numel() == 0 or kept.min() >= deleted.max()  # the k largest predicted entries
    explanation = calibrated.explain(small_images, seeds=[1, 2, 3])
    assert explanation.method == "amortized-calibrated"
    assert explanation.settings["calibration"] == "top-k" and explanation.settings["calibration_fractions"] == [
        0.5,
        1.0,
        2.0,
    ]
    assert torch.equal(explanation.mask.flatten(), flat)
    # the warm start refines the calibrated mask
    warm = WarmStartExplainer(calibrated, refine_steps=0).explain(small_images, seeds=[1, 2, 3])
    assert torch.equal(warm.mask.flatten(), flat)
    with pytest.raises(ConfigError, match="calibration must be"):
        AmortizedExplainer.from_checkpoint(checkpoint, SPEC, calibration_samples=2, calibration="quantile")
    with pytest.raises(ConfigError, match="calibration_fractions"):
        AmortizedExplainer.from_checkpoint(
            checkpoint, SPEC, calibration_samples=2, calibration="top-k", calibration_fractions=(0.0,)
        )


def _refined_from_a_perturbed_optimum(images, config: OptimizerConfig, perturb) -> None:
    """A tiny convergence check: from the exact optimizer's own mask, perturbed by ``perturb(flat_mask,
    generator)``, a refinement with ``config`` gets back to (about) the exact loss, which the perturbation had
    raised."""
    from conftest import make_tiny_cnn

    classifier = make_tiny_cnn()
    seeds = [1, 2, 3]
    exact = CartoonX(classifier, levels=3, steps=150, num_samples=8, lr=0.05, lr_decay="cosine", measure_samples=32)
    reference = exact.explain(images, seeds=seeds)
    noisy = perturb(reference.mask.flatten(), torch.Generator().manual_seed(0))
    refiner = CartoonX(classifier, levels=3, config=config)
    perturbed = refiner.explain(images, init_mask=noisy, seeds=seeds, steps=0)
    refined = refiner.explain(images, init_mask=noisy, seeds=seeds)
    assert bool((perturbed.loss > reference.loss * 1.2).all())
    assert bool((refined.loss <= reference.loss * 1.1 + 0.02).all()), (refined.loss, reference.loss)


def test_the_refine_schedule_returns_to_the_optimum_in_its_60_steps(small_images):
    config = OptimizerConfig(schedule="refine", num_samples=8, measure_samples=32)
    assert config.steps == 60
    _refined_from_a_perturbed_optimum(
        small_images, config, lambda flat, gen: (flat + 0.5 * torch.randn(flat.shape, generator=gen)).clamp(0, 1)
    )


def test_warm_start_in_logit_space_returns_to_the_optimum_in_few_steps(small_images):
    config = OptimizerConfig(
        steps=30, num_samples=8, lr=0.3, lr_decay="cosine", parametrisation="logit", measure_samples=32
    )
    _refined_from_a_perturbed_optimum(
        small_images,
        config,
        lambda flat, gen: torch.sigmoid(
            torch.logit(flat.clamp(0.02, 0.98)) + 1.5 * torch.randn(flat.shape, generator=gen)
        ),
    )
