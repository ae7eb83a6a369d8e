"""The mask-predictor network: band shapes for any size and J, range, initial masks, class conditioning."""

from __future__ import annotations

import pytest
import torch

from amortized_cartoonx.errors import ConfigError, InputError
from amortized_cartoonx.mask_predictor import (
    MaskPredictor,
    MaskPredictorConfig,
    align_to_band,
    count_parameters,
    logits_to_mask,
    upsample_aligned,
)
from amortized_cartoonx.wavelets import WaveletRepresentation

SMALL = dict(width=8, decoder_width=8, embed_dim=8)


@pytest.mark.parametrize(
    ("height", "width", "levels", "wave"),
    [(32, 32, 5, "db3"), (48, 48, 3, "db3"), (64, 64, 5, "db3"), (100, 80, 4, "db3"), (64, 64, 2, "haar")],
)
@pytest.mark.parametrize(("coefficient_input", "aligned"), [(False, False), (True, False), (True, True)])
def test_mask_bands_match_the_dwt(height, width, levels, wave, coefficient_input, aligned):
    net = MaskPredictor(
        num_classes=4,
        levels=levels,
        wave=wave,
        coefficient_input=coefficient_input,
        aligned_upsampling=aligned,
        **SMALL,
    )
    images = torch.rand(2, 3, height, width)
    mask = net.mask(images, torch.tensor([0, 3]))
    reference = WaveletRepresentation(wave, levels).encode(images).mask_like()
    assert mask.band_shapes() == reference.band_shapes()
    assert mask.levels == reference.levels  # J capped for small images, as the DWT does
    assert mask.image_size == (height, width)
    assert mask.num_channels == 1 and mask.num_images == 2
    flat = mask.flatten()
    assert flat.shape == (2, reference.numel_per_channel())
    assert bool(((flat >= 0) & (flat <= 1)).all())


def test_aligned_upsampling_puts_a_coarse_feature_at_twice_its_index():
    """Stage-s feature m sits at pixel 2^s m: coarse index k lands on fine index 2k (align_corners=False: 2k + 1/2)."""
    coarse = torch.zeros(1, 1, 6, 8)
    coarse[0, 0, 2, 3] = 1.0
    for size in ((12, 16), (11, 15)):  # even and odd fine sizes
        fine = upsample_aligned(coarse, size)[0, 0]
        assert fine.shape == size and float(fine[4, 6]) == 1.0
        rows, cols = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
        centre = [float((fine * grid).sum() / fine.sum()) for grid in (rows, cols)]
        assert centre == [4.0, 6.0]


def test_initial_mask_is_near_keep_everything():
    torch.manual_seed(0)
    net = MaskPredictor(num_classes=10, **SMALL)
    with torch.no_grad():
        flat = net.mask(torch.rand(3, 3, 64, 64), torch.tensor([1, 2, 3])).flatten()
    assert float(flat.min()) > 0.97  # sigmoid(4) = 0.982, tiny head weights
    net = MaskPredictor(num_classes=10, init_bias=0.0, **SMALL)
    with torch.no_grad():
        assert abs(float(net.mask(torch.rand(1, 3, 64, 64), torch.tensor([0])).flatten().mean()) - 0.5) < 0.01


@pytest.mark.parametrize("coefficient_input", [False, True])
def test_init_bias_per_band_sets_each_bands_initial_mask(coefficient_input):
    torch.manual_seed(0)
    biases = [4.0, -4.0, -2.0, 0.0, 2.0, 3.0]  # low-pass, then levels 1 (finest) .. 5
    net = MaskPredictor(num_classes=3, init_bias=biases, coefficient_input=coefficient_input, **SMALL)
    with torch.no_grad():
        mask = net.mask(torch.rand(2, 3, 64, 64), torch.tensor([0, 2]))
    expected = torch.sigmoid(torch.tensor(biases))
    assert torch.allclose(mask.per_band_means().mean(0), expected, atol=0.01)
    # one number is every band's bias
    assert MaskPredictorConfig(init_bias=-1.5).band_biases() == [-1.5] * 6


@pytest.mark.parametrize("bad", [[4.0, 4.0], [4.0] * 7, [4.0, float("nan"), 4.0, 4.0, 4.0, 4.0]])
def test_init_bias_with_the_wrong_number_of_bands_is_refused(bad):
    with pytest.raises(ConfigError, match="init_bias must be one finite number or 6"):
        MaskPredictorConfig(init_bias=bad).validate()


def test_class_conditioning_changes_the_mask():
    torch.manual_seed(0)
    net = MaskPredictor(num_classes=10, init_std=0.5, **SMALL)
    for p in net.parameters():  # FiLM starts as the identity: give it weights, as training would
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.2)
    images = torch.rand(1, 3, 48, 48).expand(2, -1, -1, -1)
    mask = net(images, torch.tensor([1, 7])).flatten()
    assert not torch.allclose(mask[0], mask[1], atol=1e-4)
    same = net(images, torch.tensor([4, 4])).flatten()
    assert torch.allclose(same[0], same[1])


@pytest.mark.parametrize("coefficient_input", [False, True])
def test_gradients_reach_every_level(coefficient_input):
    net = MaskPredictor(num_classes=3, coefficient_input=coefficient_input, **SMALL)
    mask = net.mask(torch.rand(2, 3, 64, 64), torch.tensor([0, 1]))
    sum(b.sum() for b in mask.bands).backward()
    unused = [name for name, p in net.named_parameters() if p.grad is None]
    assert not unused  # every parameter takes part (DDP without find_unused_parameters)
    for head in net.detail_heads:
        assert float(head[-1].weight.grad.abs().sum()) > 0


def test_default_network_is_a_few_million_parameters():
    count = count_parameters(MaskPredictor(num_classes=1000))
    assert 1e6 < count < 8e6


def test_align_to_band_centres_the_features():
    feat = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 1, 2, 4)
    out = align_to_band(feat, (2, 6))  # one margin column each side, replicated border
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, 3.0]))
    assert align_to_band(feat, (2, 4)) is feat


def test_bad_inputs_are_refused():
    net = MaskPredictor(num_classes=3, **SMALL)
    with pytest.raises(InputError, match="target classes"):
        net(torch.rand(1, 3, 32, 32), torch.tensor([3]))
    with pytest.raises(InputError, match="targets for"):
        net(torch.rand(2, 3, 32, 32), torch.tensor([0]))
    with pytest.raises(InputError, match="too small"):
        net(torch.rand(1, 3, 4, 4), torch.tensor([0]))
    with pytest.raises(ConfigError, match="wavelet"):
        MaskPredictorConfig(wave="nope").validate()
    with pytest.raises(ConfigError, match="multiple of groups"):
        MaskPredictorConfig(width=12).validate()
    with pytest.raises(ConfigError, match="stretch"):
        MaskPredictorConfig(stretch=0.5).validate()


def test_stretched_masks_reach_zero_and_one_and_keep_a_gradient():
    logits = torch.tensor([-20.0, -3.0, 0.0, 3.0, 20.0], requires_grad=True)
    assert torch.equal(logits_to_mask(logits, 0.0), torch.sigmoid(logits))  # stretch 0: the plain sigmoid
    mask = logits_to_mask(logits, 0.05)
    assert mask[0].item() == 0.0 and mask[-1].item() == 1.0  # exact 0 and 1, which a sigmoid never reaches
    assert mask[2].item() == pytest.approx(0.5)
    assert bool(((mask >= 0) & (mask <= 1)).all())
    mask.sum().backward()
    expected = 1.1 * torch.sigmoid(logits.detach()) * (1 - torch.sigmoid(logits.detach()))
    torch.testing.assert_close(logits.grad, expected)  # straight through the clamp: a clamped entry can return
    net = MaskPredictor(num_classes=3, stretch=0.05, init_bias=-6.0, **SMALL)
    assert net.mask(torch.rand(1, 3, 64, 64), torch.tensor([0])).flatten().max().item() == 0.0


def test_coefficient_input_feeds_the_bands_to_the_heads():
    """With ``coefficient_input`` the heads see the image's own DWT coefficients: with the pixel encoder cut off,
    the logits still follow the image (and without the option they cannot); the DWT adds no state."""
    plain = MaskPredictor(num_classes=3, coefficient_input=False, **SMALL)
    images = torch.rand(1, 3, 64, 64)
    changed = images.clone()
    changed[:, :, 40:, 40:] = 1 - changed[:, :, 40:, 40:]
    target = torch.tensor([2])
    for coefficient_input in (True, False):
        torch.manual_seed(0)
        net = MaskPredictor(num_classes=3, coefficient_input=coefficient_input, init_std=0.5, **SMALL)
        with torch.no_grad():
            for branch in net.coefficient_branches:
                branch[-1].weight.normal_(std=0.5)
            for p in [*net.stem.parameters(), *net.down.parameters()]:  # the encoder sees no pixels
                p.zero_()
            moved = [(a - b).abs().max() for a, b in zip(net(images, target).bands, net(changed, target).bands)]
        if coefficient_input:
            assert all(float(m) > 1e-3 for m in moved)  # every band, the low-pass included
            extra = set(net.state_dict()) - set(plain.state_dict())
            assert extra and all(k.startswith(("coefficient_branches.", "coefficient_blocks.")) for k in extra)
        else:
            assert all(float(m) == 0 for m in moved)
