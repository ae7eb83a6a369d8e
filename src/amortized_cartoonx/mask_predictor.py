"""The mask-predictor network: one forward pass from an image and a class to a CartoonX mask. Pure torch.

The network predicts a logit for every DWT coefficient position of the image (the low-pass band and the J
detail levels x 3 orientations, shared by the colour channels, as the exact optimizer's mask), for any
image size the wavelet accepts. Its shape follows the DWT:

* a convolutional encoder whose stage s (s = 1..J) has stride ``2^s``, so the feature map of stage s
  lives on the same grid as the detail coefficients of level s;
* a top-down decoder (an FPN / U-Net without the full-resolution output) that brings the coarse, more
  semantic features back to every level;
* per level, a 3-channel head (one logit per orientation); on the coarsest level, a 1-channel head for
  the low-pass band (every parameter takes part in every forward pass at the training size, as DDP needs;
  build the network with the J the training size allows); with ``coefficient_input`` (the default) each head
  also reads its band's own DWT coefficients of the image, on the band's grid;
* class conditioning by FiLM: an embedding of the target class scales and shifts the features of every
  block, so the same image can be explained for any class.

The encoder (``encoder`` in the config, :data:`ENCODERS`):

* ``scratch``: the convolutional stages above, learned from the training images alone;
* ``classifier``: the same stages, plus, added to stage s, a learned 1x1 projection of the explained
  classifier's own feature map at stride ``2^s`` (frozen; read with temporary forward hooks, found
  automatically by :func:`~amortized_cartoonx.feature_taps.find_taps`). The classifier is given to the network
  (:meth:`MaskPredictor.attach`); it is not one of its submodules, so its weights are never trained or saved.
* ``backbone``: the same with the feature maps of another frozen ``nn.Module``, named by a classifier spec
  (``backbone``, e.g. ``torchvision:resnet18``): pretrained features for any classifier, TorchScript files
  included.

Feature maps and coefficient bands differ by a few positions: with ``mode="zero"`` a level-j band of a
length-n signal has ``floor((n_{j-1} + F - 1) / 2)`` entries (F = filter length), the extra ones covering the
padding around the image. :func:`align_to_band` places the feature map centred in the band (a shift, no
stretching) and replicates its border into the margins, so coefficient k of level j reads the features at
the image position it describes.

The heads start with tiny weights and a bias of ``init_bias`` (default 4, sigmoid 0.982): an untrained
network predicts nearly "keep everything", the exact optimizer's starting point. ``init_bias`` may also give one
bias per band, to start from another mask density on each scale.

Shapes: N images, C = 3 colour channels, H x W pixels, J levels, level j = 1 the finest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, InputError
from .feature_taps import check_hookable, collect, find_taps, read_taps, recording
from .images import CHANNELS, to_channels
from .mask_logits import logits_to_mask
from .rde import band_statistics, full_precision
from .wavelets import (
    DEFAULT_LEVELS,
    DEFAULT_MODE,
    DEFAULT_WAVE,
    PAD_MODES,
    Coefficients,
    WaveletRepresentation,
    band_sizes,
    check_wavelet,
    max_levels,
)

#: Input standardisation of the network (images arrive in [0, 1]); a fixed affine map, not the classifier's.
_INPUT_MEAN = 0.45
_INPUT_STD = 0.25
#: The encoders of :class:`MaskPredictor` (see the module docstring).
ENCODERS = ("scratch", "classifier", "backbone")
#: The encoders that read a frozen network's feature maps.
TAPPED_ENCODERS = ("classifier", "backbone")


@dataclass
class MaskPredictorConfig:
    """Hyper-parameters of :class:`MaskPredictor` (stored in checkpoints as a plain dict).

    Attributes:
        num_classes: K, the classifier's number of classes (size of the class embedding table).
        wave, levels, mode: the DWT whose coefficients are masked (db3, J=5, zero padding: the paper's).
            ``levels`` is the largest J; smaller images use fewer levels, as the wavelet representation does.
        width: channels of the first encoder stage; stage s has ``width * min(2^(s-1), max_multiplier)``.
            Default 32 (about 5 million parameters with the defaults and 1000 classes).
        max_multiplier: cap of the channel multiplier. Default 8.
        decoder_width: channels of the decoder levels (capped by the encoder stage's). Default 64.
        embed_dim: size of the class embedding. Default 128.
        init_bias: initial bias of the heads; ``sigmoid(init_bias)`` is the initial mask. One number for every
            band (default 4.0: keep everything, the optimizer's start), or one per band, low-pass first, then
            levels 1 (finest) to J, e.g. ``[4, -4, -4, 4, 4, 4]`` to start with the two finest levels deleted.
        stretch: the mask is ``clamp((1 + 2 * stretch) * sigmoid(z) - stretch, 0, 1)`` (see :func:`logits_to_mask`).
            0 (default): the plain sigmoid. With ``stretch > 0`` (e.g. 0.05), masks reach exactly 0 and 1, as the
            exact optimizer's projected masks do, instead of sigmoid tails that cost ``l1_lambda * floor``.
        init_std: standard deviation of the heads' initial weights. Default 1e-3.
        groups: GroupNorm groups (batch-size independent normalisation). Default 8.
        encoder: ``scratch`` (default), ``classifier`` (adds the explained classifier's frozen feature maps) or
            ``backbone`` (adds those of the network ``backbone`` names); see the module docstring.
        backbone: the ``backbone`` encoder's network, a classifier spec
            (:func:`~amortized_cartoonx.classifiers.load_classifier`; its own normalisation).
        coefficient_input: the heads also read the image's own DWT coefficients (default True). Every band's
            coefficients, divided by the band's std (per image; the low-pass band also centred), and their
            absolute values pass a small convolution and are added to the decoder's features on the band's own
            grid; a FiLM residual block then mixes them before the head. The network sees exactly the quantities
            it masks instead of reconstructing them from pixels. False: the heads read the decoder's features
            only (checkpoints written before this setting existed load as False).
        aligned_upsampling: the decoder's top-down path samples the coarser map at the finer map's own
            positions: encoder stage s's feature m sits at pixel ``2^s m`` (stride-2 convolutions with padding
            1), so the finer map's m reads the coarser map at ``m / 2``. False (the default, and every checkpoint
            written before this setting existed): bilinear resizing with ``align_corners=False``, which reads it
            at ``m / 2 - 1/4`` of a coarse cell, so coarse context arrives half a fine cell off at each level.
        taps, tap_channels: with a tapped encoder, the layer read for each level 1..J and its channels. Leave
            them None: :meth:`with_taps` (called by the training module) fills them in.
        in_channels: the images' colour channels: 3 (RGB; the default, and every checkpoint written before this
            setting existed) or 1 (greyscale, for a single-channel classifier). The training module sets it from
            the classifier. A ``backbone`` encoder reads greyscale images repeated to RGB.
    """

    num_classes: int = 1000
    wave: str = DEFAULT_WAVE
    levels: int = DEFAULT_LEVELS
    mode: str = DEFAULT_MODE
    width: int = 32
    max_multiplier: int = 8
    decoder_width: int = 64
    embed_dim: int = 128
    init_bias: float | list[float] = 4.0
    stretch: float = 0.0
    init_std: float = 1e-3
    groups: int = 8
    encoder: str = "scratch"
    backbone: str | None = None
    coefficient_input: bool = True
    aligned_upsampling: bool = False
    taps: list[str] | None = None
    tap_channels: list[int] | None = None
    in_channels: int = 3

    def validate(self) -> MaskPredictorConfig:
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, got {self.num_classes}")
        if self.levels < 1:
            raise ConfigError(f"levels must be at least 1, got {self.levels}")
        check_wavelet(self.wave)
        if self.mode not in PAD_MODES:
            raise ConfigError(f"unknown wavelet padding mode {self.mode!r}; choose from: {', '.join(PAD_MODES)}")
        for name in ("width", "decoder_width", "embed_dim", "max_multiplier", "groups"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.stretch < 0.5:
            raise ConfigError(f"stretch must be in [0, 0.5), got {self.stretch}")
        biases = self.band_biases()
        if len(biases) != 1 + self.levels or not all(math.isfinite(b) for b in biases):
            raise ConfigError(
                f"init_bias must be one finite number or {1 + self.levels} (low-pass, then levels 1..{self.levels}),"
                f" got {self.init_bias}"
            )
        for name in ("width", "decoder_width"):
            if getattr(self, name) % self.groups:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be a multiple of groups ({self.groups})")
        if self.in_channels not in CHANNELS:
            raise ConfigError(f"in_channels must be 1 (greyscale) or 3 (RGB), got {self.in_channels}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"unknown encoder {self.encoder!r}; choose from: {', '.join(ENCODERS)}")
        if (self.encoder == "backbone") != bool(self.backbone):
            raise ConfigError("the backbone encoder needs a backbone spec (and only it takes one)")
        if self.encoder in TAPPED_ENCODERS and self.taps is not None:
            if self.tap_channels is None or len(self.taps) != self.levels or len(self.tap_channels) != self.levels:
                raise ConfigError(
                    f"taps and tap_channels must name one layer per level ({self.levels}), got {self.taps} and "
                    f"{self.tap_channels}"
                )
        return self

    def band_biases(self) -> list[float]:
        """The heads' initial biases, one per band: low-pass first, then levels 1 (finest) to J."""
        if isinstance(self.init_bias, (int, float)):
            return [float(self.init_bias)] * (1 + self.levels)
        return [float(b) for b in self.init_bias]

    def with_taps(self, network: nn.Module | None, image_size: int) -> MaskPredictorConfig:
        """This config with ``taps`` found in ``network`` (the classifier, or the backbone) for ``image_size``
        images (the ``scratch`` encoder: unchanged)."""
        if self.encoder not in TAPPED_ENCODERS or self.taps is not None:
            return self
        role = "the backbone" if self.encoder == "backbone" else "the classifier"
        found = find_taps(network, image_size, self.levels, role, self.network_input_channels())
        return replace(self, taps=[t.name for t in found], tap_channels=[t.channels for t in found])

    def network_input_channels(self) -> int:
        """The channels of the images a tapped encoder's network gets: the classifier's own (``in_channels``),
        a backbone's RGB."""
        return 3 if self.encoder == "backbone" else self.in_channels

    def stage_channels(self) -> list[int]:
        """Channels of encoder stages 1..J."""
        return [self.width * min(2**s, self.max_multiplier) for s in range(self.levels)]

    def decoder_channels(self) -> list[int]:
        """Channels of decoder levels 1..J: ``decoder_width``, but never more than the encoder stage's."""
        return [min(self.decoder_width, c) for c in self.stage_channels()]


class FiLM(nn.Module):
    """Feature-wise affine modulation by the class embedding: ``x * (1 + gamma) + beta``, identity at init."""

    def __init__(self, embed_dim: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        """``x: (N, C, h, w)``, ``embedding: (N, E)``."""
        gamma, beta = self.proj(embedding)[:, :, None, None].chunk(2, dim=1)  # (N, C, 1, 1) each
        return x * (1 + gamma) + beta


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> FiLM -> SiLU -> conv3x3, plus the input."""

    def __init__(self, channels: int, embed_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, channels), channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(groups, channels), channels)
        self.film = FiLM(embed_dim, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.film(self.norm2(h), embedding)))
        return x + h


def align_to_band(features: Tensor, size: tuple[int, int]) -> Tensor:
    """Resample ``features: (N, C, h, w)`` onto a coefficient band of ``size = (H_j, W_j)``.

    The band's index k reads the feature map at ``k - (H_j - h) / 2``: the map is centred in the band
    (bilinear for half-integer offsets), with its border replicated into the margins that the DWT's
    padding adds. Equal sizes pass through unchanged.
    """
    height, width = features.shape[-2:]
    if (height, width) == tuple(size):
        return features

    def axis(n_band: int, n_feat: int) -> Tensor:
        pos = torch.arange(n_band, device=features.device, dtype=torch.float32) - (n_band - n_feat) / 2
        return 2 * pos / max(n_feat - 1, 1) - 1 if n_feat > 1 else torch.zeros_like(pos)

    ys, xs = axis(size[0], height), axis(size[1], width)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H_j, W_j, 2) as (x, y)
    grid = grid.unsqueeze(0).expand(features.shape[0], -1, -1, -1)
    out = F.grid_sample(features.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(features.dtype)


class MaskPredictor(nn.Module):
    """Predict CartoonX mask logits for every DWT coefficient of an image, for a given class.

    Args:
        config: a :class:`MaskPredictorConfig` (or its fields as keyword arguments).
        features: with a tapped encoder, the classifier or backbone whose feature maps it reads (or call
            :meth:`attach` later); it stays the caller's (not a submodule, never trained, saved or moved).

    ``forward(images (N, C, H, W) in [0, 1], target (N,) long) -> Coefficients`` of logits with bands
    ``(N, 1, H_J, W_J)`` and ``(N, 1, 3, H_j, W_j)``; :meth:`mask` maps them to [0, 1] (:func:`logits_to_mask`).
    """

    def __init__(
        self, config: MaskPredictorConfig | None = None, *, features: nn.Module | None = None, **fields
    ) -> None:
        super().__init__()
        if config is not None and fields:
            raise TypeError("give a MaskPredictorConfig or keyword fields, not both")
        self.config = (config or MaskPredictorConfig(**fields)).validate()
        cfg = self.config
        if cfg.encoder in TAPPED_ENCODERS and cfg.taps is None:
            raise ConfigError(f"the {cfg.encoder} encoder needs its taps: build the config with config.with_taps(...)")
        self._features: tuple[nn.Module, ...] = ()  # a tuple: not registered as a submodule
        channels = cfg.stage_channels()
        groups = cfg.groups

        self.embedding = nn.Embedding(cfg.num_classes, cfg.embed_dim)
        nn.init.normal_(self.embedding.weight, std=1.0)
        stem_out = max(channels[0] // 2, 8)
        # full resolution: the finest details need the pixels
        self.stem = nn.Conv2d(cfg.in_channels, stem_out, 3, padding=1)
        self.down = nn.ModuleList()
        self.encoder = nn.ModuleList()
        previous = stem_out
        for c in channels:  # stage s: stride 2^s
            self.down.append(nn.Conv2d(previous, c, 3, stride=2, padding=1))
            self.encoder.append(ResBlock(c, cfg.embed_dim, groups))
            previous = c
        widths = cfg.decoder_channels()
        self.lateral = nn.ModuleList(nn.Conv2d(c, d, 1) for c, d in zip(channels, widths))
        self.top_down = nn.ModuleList(  # level s + 1's decoder output -> level s's width
            nn.Conv2d(widths[s + 1], widths[s], 1) if widths[s + 1] != widths[s] else nn.Identity()
            for s in range(len(widths) - 1)
        )
        self.decoder = nn.ModuleList(ResBlock(d, cfg.embed_dim, groups) for d in widths)
        biases = cfg.band_biases()  # low-pass, then levels 1..J
        self.detail_heads = nn.ModuleList(self._head(d, 3, b) for d, b in zip(widths, biases[1:]))
        self.lowpass_head = self._head(widths[-1], 1, biases[0])  # on the coarsest level
        # coefficient_input: per detail level, then the low-pass band (built empty otherwise)
        coefficient_widths = (widths + widths[-1:]) if cfg.coefficient_input else []
        colours = cfg.in_channels
        coefficient_inputs = [2 * colours * 3] * len(widths) + [2 * colours]  # (c/std, |c|/std) x colours (x 3)
        self.coefficient_branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(k, d, 3, padding=1), nn.SiLU(), nn.Conv2d(d, d, 1))
            for k, d in zip(coefficient_inputs, coefficient_widths)
        )
        self.coefficient_blocks = nn.ModuleList(ResBlock(d, cfg.embed_dim, groups) for d in coefficient_widths)
        self._dwt: tuple[nn.Module, ...] = ()
        if cfg.coefficient_input:  # not a submodule: its filters are constants, not state
            self._dwt = (WaveletRepresentation(cfg.wave, cfg.levels, cfg.mode),)
        self.tap_projections = nn.ModuleList(  # classifier encoder: its map at stage s -> stage s's channels
            nn.Sequential(nn.GroupNorm(1, t), nn.Conv2d(t, c, 1)) for t, c in zip(cfg.tap_channels or [], channels)
        )
        if features is not None:
            self.attach(features)

    def attach(self, features: nn.Module) -> MaskPredictor:
        """Read feature maps from ``features`` (the classifier or the backbone). Returns self."""
        if self.config.encoder not in TAPPED_ENCODERS:
            raise ConfigError(f"the {self.config.encoder!r} encoder reads no classifier features")
        role = "the backbone" if self.config.encoder == "backbone" else "the classifier"
        self._features = (check_hookable(features, role),)
        return self

    @property
    def feature_source(self) -> nn.Module | None:
        """The attached classifier or backbone of a tapped encoder (None: none attached)."""
        return self._features[0] if self._features else None

    def _head(self, width: int, out: int, bias: float) -> nn.Sequential:
        conv = nn.Conv2d(width, out, 1)
        nn.init.normal_(conv.weight, std=self.config.init_std)
        nn.init.constant_(conv.bias, bias)
        return nn.Sequential(nn.GroupNorm(min(self.config.groups, width), width), nn.SiLU(), conv)

    def settings(self) -> dict:
        """The configuration as a plain dict (what a checkpoint stores)."""
        return asdict(self.config)

    def band_shapes(self, height: int, width: int) -> tuple[int, list[tuple[int, int]]]:
        """``(J, [(H_j, W_j) for j = 1..J])`` for an ``height x width`` image; J is capped as the DWT does."""
        cap = max_levels(height, width, self.config.wave, self.config.mode)
        if cap < 1:
            raise InputError(f"image of {height}x{width} pixels is too small for the {self.config.wave} wavelet")
        levels = min(cap, self.config.levels)  # as WaveletRepresentation.levels_for
        rows = band_sizes(height, self.config.wave, levels, self.config.mode)
        cols = band_sizes(width, self.config.wave, levels, self.config.mode)
        return levels, list(zip(rows, cols))

    @contextmanager
    def tapping(self, network: object) -> Iterator[Callable[[], list[Tensor] | None]]:
        """Record this network's taps during the passes of ``network`` inside the block, so that a caller who runs
        the classifier anyway (for its logits) saves the encoder's own pass. Yields a function that returns the
        taps for :meth:`forward` (``taps=``), or None when ``network`` is not the attached feature source (then
        :meth:`forward` reads them itself)::

            with mask_predictor.tapping(classifier) as taps:
                problem = objective.prepare(images)      # runs the classifier once
            logits = mask_predictor(images, problem.target, taps=taps())
        """
        if self.config.encoder not in TAPPED_ENCODERS or self.feature_source is not network:
            yield lambda: None
            return
        names = list(self.config.taps)
        with recording(self.feature_source, set(names)) as outputs:
            yield lambda: collect(outputs, names)

    def check_channels(self, images: Tensor) -> None:
        """Refuse images that are not ``(N, in_channels, H, W)`` (:class:`InputError`, naming the conversion)."""
        channels = self.config.in_channels
        if images.ndim != 4 or images.shape[1] != channels:
            kind = "RGB" if channels == 3 else "greyscale"
            raise InputError(
                f"the mask predictor takes {kind} images (N, {channels}, H, W), got {tuple(images.shape)} "
                f"(amortized_cartoonx.images.to_channels(images, {channels}) converts them)"
            )

    def forward(self, images: Tensor, target: Tensor, *, taps: list[Tensor] | None = None) -> Coefficients:
        """Mask logits. ``images: (N, C, H, W)`` in [0, 1] with C = ``in_channels``; ``target: (N,)`` class
        indices. ``taps``: the feature maps of a tapped encoder recorded on these images (:meth:`tapping`); None
        reads them with one pass."""
        self.check_channels(images)
        target = torch.as_tensor(target, device=images.device).long().reshape(-1)
        if target.shape[0] != images.shape[0]:
            raise InputError(f"got {target.shape[0]} targets for {images.shape[0]} images")
        if bool(((target < 0) | (target >= self.config.num_classes)).any()):
            raise InputError(f"target classes must be in [0, {self.config.num_classes}), got {target.tolist()}")
        height, width = images.shape[-2:]
        levels, shapes = self.band_shapes(height, width)

        embedding = self.embedding(target)  # (N, E)
        if taps is None or self.config.encoder not in TAPPED_ENCODERS:
            taps = self._read_taps(images)  # tapped encoder: (N, C_s, h_s, w_s) per stage, else empty
        x = self.stem((images - _INPUT_MEAN) / _INPUT_STD)  # (N, c0, H, W)
        features = []
        for s, (down, block) in enumerate(zip(self.down, self.encoder)):
            x = down(F.silu(x))  # stage s: (N, c_s, ~H/2^s, ~W/2^s)
            if taps:
                x = x + self.tap_projections[s](_resize(taps[s], x.shape[-2:]))
            x = block(x, embedding)
            features.append(x)

        decoded: list[Tensor] = [None] * len(features)  # type: ignore[list-item]
        top = None
        for s in reversed(range(len(features))):  # coarse to fine
            lateral = self.lateral[s](features[s])
            if top is not None:
                top = self.top_down[s](top)
                if self.config.aligned_upsampling:
                    top = upsample_aligned(top, lateral.shape[-2:])
                else:
                    top = F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
                lateral = lateral + top
            top = self.decoder[s](lateral, embedding)
            decoded[s] = top

        if self.config.coefficient_input:
            return self._heads_on_coefficients(images, decoded, levels, shapes, embedding)
        details = []
        for j in range(levels):  # level j + 1: (N, 1, 3, H_j, W_j)
            logits = align_to_band(self.detail_heads[j](decoded[j]), shapes[j])  # (N, 3, H_j, W_j)
            details.append(logits.unsqueeze(1))
        lowpass = self.lowpass_head(self._lowpass_grid(decoded, levels))  # (N, 1, ~H/2^J, ~W/2^J)
        lowpass = align_to_band(lowpass, shapes[-1])  # (N, 1, H_J, W_J)
        return Coefficients(lowpass=lowpass, details=tuple(details), image_size=(height, width))

    @staticmethod
    def _lowpass_grid(decoded: list[Tensor], levels: int) -> Tensor:
        """The features the low-pass head reads: the coarsest level's, brought to level J's grid when a small
        image caps J."""
        if levels < len(decoded):
            return F.interpolate(decoded[-1], size=decoded[levels - 1].shape[-2:], mode="bilinear", align_corners=False)
        return decoded[-1]

    def _heads_on_coefficients(
        self, images: Tensor, decoded: list[Tensor], levels: int, shapes: list[tuple[int, int]], embedding: Tensor
    ) -> Coefficients:
        """The heads of ``coefficient_input``: decoder features on each band's grid + the band's coefficients."""
        with torch.no_grad(), full_precision(images.device):
            coeffs = self._dwt[0].encode(images.float())  # lowpass (N, C, H_J, W_J), level j (N, C, 3, H_j, W_j)
            stats = band_statistics(coeffs)  # (N, 1 + J): the low-pass band first, as the obfuscation's noise uses
        num_images = images.shape[0]

        def standardised(band: Tensor, group: int, centre: bool) -> Tensor:
            mean = stats.mean[:, group] if centre else stats.mean.new_zeros(num_images)
            std = stats.std[:, group].clamp_min(1e-6)
            z = (band.reshape(num_images, -1, *band.shape[-2:]) - mean[:, None, None, None]) / std[:, None, None, None]
            return torch.cat([z, z.abs()], dim=1).to(decoded[0].dtype)

        def head(index: int, features: Tensor, group: int, centre: bool, out: nn.Module) -> Tensor:
            band = coeffs.bands[group]
            x = align_to_band(features, tuple(band.shape[-2:])) + self.coefficient_branches[index](
                standardised(band, group, centre)
            )
            return out(self.coefficient_blocks[index](x, embedding))

        details = tuple(head(j, decoded[j], 1 + j, False, self.detail_heads[j]).unsqueeze(1) for j in range(levels))
        lowpass = head(len(self.detail_heads), self._lowpass_grid(decoded, levels), 0, True, self.lowpass_head)
        return Coefficients(lowpass=lowpass, details=details, image_size=tuple(images.shape[-2:]))

    def _read_taps(self, images: Tensor) -> list[Tensor]:
        if self.config.encoder not in TAPPED_ENCODERS:
            return []
        if not self._features:
            raise ConfigError(
                f"the {self.config.encoder} encoder has no network attached: call mask_predictor.attach(...)"
            )
        images = to_channels(images, self.config.network_input_channels())  # a backbone reads greyscale as RGB
        return read_taps(self._features[0], images, list(self.config.taps))

    def mask(self, images: Tensor, target: Tensor) -> Coefficients:
        """The predicted mask in [0, 1]: :func:`logits_to_mask` of :meth:`forward`."""
        return self.mask_from_logits(self(images, target))

    def mask_from_logits(self, logits: Coefficients) -> Coefficients:
        return logits.map(lambda z: logits_to_mask(z, self.config.stretch))


def upsample_aligned(coarse: Tensor, size: tuple[int, int]) -> Tensor:
    """``coarse: (N, C, h, w)`` (a stride-``2^(s+1)`` feature map) onto the ``size`` grid of stride ``2^s``: fine
    index m reads coarse position ``m / 2`` (bilinear; the last row and column, past the coarse map's end, take
    its border)."""

    def axis(n_fine: int, n_coarse: int) -> Tensor:
        pos = torch.arange(n_fine, device=coarse.device, dtype=torch.float32) / 2
        return 2 * pos / max(n_coarse - 1, 1) - 1 if n_coarse > 1 else torch.zeros_like(pos)

    ys, xs = axis(size[0], coarse.shape[-2]), axis(size[1], coarse.shape[-1])
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)
    grid = grid.unsqueeze(0).expand(coarse.shape[0], -1, -1, -1)
    out = F.grid_sample(coarse.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(coarse.dtype)


def _resize(features: Tensor, size: tuple[int, int]) -> Tensor:
    """``features: (N, C, h, w)`` onto an ``size`` grid: area-averaged when shrinking, bilinear when growing."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    if features.shape[-2] >= size[0] and features.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(features, size)
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_size(module: nn.Module) -> str:
    """``"3.1M parameters"``."""
    n = count_parameters(module)
    return f"{n / 1e6:.1f}M parameters" if n >= 1e5 else f"{n} parameters"


__all__ = [
    "ENCODERS",
    "MaskPredictor",
    "MaskPredictorConfig",
    "FiLM",
    "ResBlock",
    "align_to_band",
    "count_parameters",
    "logits_to_mask",
]
