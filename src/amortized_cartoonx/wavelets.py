"""Image representations for RDE: the discrete wavelet transform (CartoonX) and the identity (Pixel RDE).

Both representations turn an image batch ``x: (N, C, H, W)`` into :class:`Coefficients`: one low-pass
band and zero or more detail levels. Pixel RDE is the special case with no detail levels and the
image itself as the "low-pass" band, so every piece of RDE (noise, masking, loss, ranking) has one code path.

Shapes (N images, C channels, J levels, level j = 1 is the finest)::

    lowpass     (N, C, H_J, W_J)
    details[j]  (N, C, 3, H_j, W_j)      3 orientations; details[0] is level 1
    mask        the same with C = 1: one entry per coefficient position, shared by the colour channels

At 256x256 with db3, J=5 and zero padding: low-pass 12x12, details 130, 67, 36, 20, 12 pixels square,
69,831 mask entries.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .errors import ConfigError, InputError, is_integer
from .fused_ops import clamp_unit, interleave_unit_clamp, mix, mix_into_bands

logger = logging.getLogger(__name__)

with warnings.catch_warnings():  # pytorch_wavelets imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import pywt
    from pytorch_wavelets import DWTForward, DWTInverse

#: The DWT's default settings, the paper's.
DEFAULT_WAVE = "db3"
DEFAULT_LEVELS = 5
DEFAULT_MODE = "zero"
PAD_MODES = ("zero", "symmetric", "reflect", "periodization")


def image_slice(index: int, count: int) -> slice:
    """``slice`` of image ``index`` (negative: from the end) of a batch of ``count``; IndexError outside it."""
    if not -count <= index < count:
        raise IndexError(f"image {index} is outside a batch of {count}")
    index %= count
    return slice(index, index + 1)


@dataclass(frozen=True)
class Coefficients:
    """A batch of coefficients: a low-pass band and the detail levels, finest first.

    Attributes:
        lowpass: ``(N, C, H_J, W_J)``.
        details: ``J`` tensors ``(N, C, 3, H_j, W_j)``; ``details[0]`` is the finest level. Empty for pixels.
        image_size: ``(H, W)`` of the image these coefficients decode to.

    A mask is a ``Coefficients`` with ``C = 1``; ``coeffs * mask`` broadcasts it over the colour channels.
    """

    lowpass: Tensor
    details: tuple[Tensor, ...]
    image_size: tuple[int, int]

    # ---- structure -------------------------------------------------------------------------------------
    @property
    def bands(self) -> tuple[Tensor, ...]:
        """``(lowpass, details[0], ..., details[J-1])``: the groups of the adaptive noise, in flat order."""
        return (self.lowpass, *self.details)

    def with_bands(self, bands: Sequence[Tensor]) -> Coefficients:
        """New coefficients of the same structure from ``bands`` in :attr:`bands` order."""
        if len(bands) != 1 + len(self.details):
            raise ValueError(f"expected {1 + len(self.details)} bands, got {len(bands)}")
        return replace(self, lowpass=bands[0], details=tuple(bands[1:]))

    @property
    def levels(self) -> int:
        """J, the number of detail levels (0 for the pixel representation)."""
        return len(self.details)

    @property
    def num_images(self) -> int:
        return self.lowpass.shape[0]

    @property
    def num_channels(self) -> int:
        return self.lowpass.shape[1]

    @property
    def device(self) -> torch.device:
        return self.lowpass.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lowpass.dtype

    def band_shapes(self) -> list[tuple[int, ...]]:
        """Per band, its shape without the leading N and C axes."""
        return [tuple(b.shape[2:]) for b in self.bands]

    def numel_per_channel(self) -> int:
        """Coefficient positions per image (= mask entries per image)."""
        return sum(math.prod(s) for s in self.band_shapes())

    # ---- element-wise arithmetic (broadcasting, e.g. a C=1 mask against C=3 coefficients) --------------
    def map(self, fn: Callable[[Tensor], Tensor]) -> Coefficients:
        return self.with_bands([fn(b) for b in self.bands])

    def zip_map(self, other: Coefficients, fn: Callable[[Tensor, Tensor], Tensor]) -> Coefficients:
        if other.levels != self.levels:
            raise ValueError(f"cannot combine {self.levels} and {other.levels} detail levels")
        return self.with_bands([fn(a, b) for a, b in zip(self.bands, other.bands)])

    def __mul__(self, other: Coefficients | float) -> Coefficients:
        if isinstance(other, Coefficients):
            return self.zip_map(other, torch.mul)
        return self.map(lambda b: b * other)

    __rmul__ = __mul__

    def __add__(self, other: Coefficients) -> Coefficients:
        return self.zip_map(other, torch.add)

    def __sub__(self, other: Coefficients) -> Coefficients:
        return self.zip_map(other, torch.sub)

    def to(self, *args, **kwargs) -> Coefficients:
        return self.map(lambda b: b.to(*args, **kwargs))

    def detach(self) -> Coefficients:
        return self.map(Tensor.detach)

    def clone(self) -> Coefficients:
        return self.map(Tensor.clone)

    def clamp(self, low: float = 0.0, high: float = 1.0) -> Coefficients:
        return self.map(lambda b: b.clamp(low, high))

    def select(self, index: int | slice | Tensor) -> Coefficients:
        """The images ``index`` of the batch (an int, negative ones included, keeps the batch axis)."""
        if isinstance(index, int):
            index = image_slice(index, self.lowpass.shape[0])
        return self.map(lambda b: b[index])

    @staticmethod
    def cat(items: Sequence[Coefficients]) -> Coefficients:
        """Concatenate batches along N."""
        first = items[0]
        return first.with_bands([torch.cat(parts) for parts in zip(*(c.bands for c in items))])

    # ---- masks -------------------------------------------------------------------------------------------
    def mask_like(self, value: float = 1.0, requires_grad: bool = False) -> Coefficients:
        """A channel-shared mask ``(N, 1, ...)`` for these coefficients, filled with ``value``."""
        return self.map(
            lambda b: torch.full(
                (b.shape[0], 1, *b.shape[2:]), value, device=b.device, dtype=b.dtype, requires_grad=requires_grad
            )
        )

    def mean_per_image(self) -> Tensor:
        """``(N,)``: the mean over every entry of each image (for a mask: the paper's l1 / k)."""
        total = sum(b.flatten(1).sum(1) for b in self.bands)
        count = sum(b[0].numel() for b in self.bands)
        return total / count

    # ---- flat vectors (ranking coefficients, storing masks) ---------------------------------------------
    def flatten(self) -> Tensor:
        """``(N, C * K)``: per image, the bands in :attr:`bands` order, each in row-major order.

        For a mask (C = 1) this is one entry per coefficient position, ``K = numel_per_channel()``.
        """
        return torch.cat([b.flatten(1) for b in self.bands], dim=1)

    def unflatten(self, flat: Tensor) -> Coefficients:
        """The inverse of :meth:`flatten` for a ``flat: (N', C' * K)`` with this object's band layout.

        The channel count is inferred from ``flat``, so a mask vector can be unflattened against
        colour coefficients and the other way round.
        """
        shapes = self.band_shapes()
        per_channel = sum(math.prod(s) for s in shapes)
        if flat.ndim != 2 or flat.shape[1] % per_channel:
            raise InputError(
                f"flat tensor of shape {tuple(flat.shape)} does not fit {per_channel} coefficients per channel"
            )
        channels = flat.shape[1] // per_channel
        sizes = [channels * math.prod(s) for s in shapes]
        parts = torch.split(flat, sizes, dim=1)
        return self.with_bands([p.reshape(flat.shape[0], channels, *s) for p, s in zip(parts, shapes)])

    def per_band_means(self) -> Tensor:
        """``(N, 1 + J)``: the mean of each band per image (low-pass first, then levels 1..J)."""
        return torch.stack([b.flatten(1).mean(1) for b in self.bands], dim=1)


def band_sizes(size: int, wave: str, levels: int, mode: str = DEFAULT_MODE) -> list[int]:
    """Lengths of the detail bands of a 1-D signal of length ``size`` (finest first), as pytorch_wavelets gives."""
    filt = pywt.Wavelet(wave).dec_len
    out = []
    for _ in range(levels):
        size = pywt.dwt_coeff_len(size, filt, "periodization" if mode == "periodization" else "zero")
        out.append(size)
    return out


def max_levels(height: int, width: int, wave: str, mode: str = DEFAULT_MODE) -> int:
    """The largest J whose coarsest band still has at least the filter's length on both axes (0 if none).

    pytorch_wavelets' inverse is not exact when a level is smaller than the filter (its issue 42).
    """
    filt = pywt.Wavelet(wave).dec_len
    levels = 0
    while True:
        sizes = [band_sizes(n, wave, levels + 1, mode)[-1] for n in (height, width)]
        if min(sizes) < filt or levels >= 16:
            return levels
        levels += 1


def check_wavelet(wave: str) -> str:
    """Validate a discrete wavelet name (``db3``, ``haar``, ``sym4``, ...)."""
    if wave not in pywt.wavelist(kind="discrete"):
        raise ConfigError(
            f"unknown wavelet {wave!r}; choose a discrete wavelet of PyWavelets, e.g. db3, haar, sym4, coif2"
        )
    return wave


class Representation(nn.Module):
    """A linear image representation ``x = f(h)`` in which RDE masks coefficients."""

    #: Short name, recorded in outputs and checkpoints.
    name: str = ""

    def encode(self, x: Tensor) -> Coefficients:
        """``x: (N, C, H, W) -> Coefficients``."""
        raise NotImplementedError

    def decode(self, coeffs: Coefficients, *, unit_clamp: bool = False) -> Tensor:
        """``Coefficients -> (N, C, H, W)`` with ``(H, W) = coeffs.image_size``; clamped to [0, 1] with
        ``unit_clamp`` (with :func:`~amortized_cartoonx.fused_ops.clamp_unit`'s gradient)."""
        raise NotImplementedError

    def decode_mixed(
        self, coeffs: Coefficients, mask: Coefficients, noise: Coefficients, *, unit_clamp: bool = False
    ) -> Tensor:
        """``(N * L, C, H, W)``: :meth:`decode` of ``s * h + (1 - s) * v`` for every noise sample (rows
        image-major), for coefficients ``h`` (bands ``(N, C, ...)``), a mask ``s`` (``(N, 1 or C, ...)``) and noise
        ``v`` (``(N, L, C, ...)``). Here: :func:`~amortized_cartoonx.fused_ops.mix`, then :meth:`decode` (called
        without ``unit_clamp``, so a subclass that only implements ``decode(coeffs)`` works)."""
        mixed = [mix(s, h, v).flatten(0, 1) for h, s, v in zip(coeffs.bands, mask.bands, noise.bands)]
        decoded = self.decode(coeffs.with_bands(mixed))
        return clamp_unit(decoded) if unit_clamp else decoded

    def describe(self) -> dict:
        """The settings that define the representation (for manifests and checkpoints)."""
        return {"representation": self.name}


class PixelRepresentation(Representation):
    """The identity: one "band", the image itself. Used by Pixel RDE."""

    name = "pixel"

    def encode(self, x: Tensor) -> Coefficients:
        # a copy, as the DWT's output is: never the caller's tensor (nor an inference-mode tensor) as a band
        return Coefficients(lowpass=x.detach().clone(), details=(), image_size=(x.shape[-2], x.shape[-1]))

    def decode(self, coeffs: Coefficients, *, unit_clamp: bool = False) -> Tensor:
        if coeffs.levels:
            raise ValueError("pixel coefficients have no detail levels")
        return clamp_unit(coeffs.lowpass) if unit_clamp else coeffs.lowpass


class WaveletRepresentation(Representation):
    """The 2-D DWT of pytorch_wavelets (CartoonX).

    Args:
        wave: any discrete wavelet of PyWavelets. Default ``db3`` (the paper's).
        levels: J, the number of scales. Default 5. Capped per image size (with a logged warning) so that
            the coarsest band is at least as long as the filter.
        mode: padding, one of ``zero`` (default, the paper's), ``symmetric``, ``reflect``, ``periodization``.
    """

    name = "wavelet"

    def __init__(self, wave: str = DEFAULT_WAVE, levels: int = DEFAULT_LEVELS, mode: str = DEFAULT_MODE):
        super().__init__()
        if mode not in PAD_MODES:
            raise ConfigError(f"unknown wavelet padding mode {mode!r}; choose from: {', '.join(PAD_MODES)}")
        if not is_integer(levels) or levels < 1:
            raise ConfigError(f"the number of wavelet levels must be an integer of at least 1, got {levels!r}")
        self.wave = check_wavelet(wave)
        self.levels = levels
        self.mode = mode
        self.inverse = DWTInverse(wave=wave, mode=mode)
        # One 2-D transposed convolution per level does the whole synthesis filter bank (see decode).
        cols = (self.inverse.g0_col.reshape(-1), self.inverse.g1_col.reshape(-1))
        rows = (self.inverse.g0_row.reshape(-1), self.inverse.g1_row.reshape(-1))
        kernels = [torch.outer(cols[a], rows[b]) for a, b in ((0, 0), (1, 0), (0, 1), (1, 1))]
        self.register_buffer("synthesis_kernels", torch.stack(kernels).unsqueeze(1), persistent=False)  # (4,1,L,L)
        self.register_buffer("synthesis_phases", polyphase_kernels(self.synthesis_kernels), persistent=False)
        self.register_buffer("synthesis_pairs", paired_kernels(self.synthesis_phases), persistent=False)
        self.forwards = nn.ModuleDict()  # one DWTForward per J actually used (J depends on the image size)
        self._warned: set[tuple[int, int]] = set()

    def levels_for(self, height: int, width: int) -> int:
        """The J used for an ``height x width`` image: ``levels``, capped for small images."""
        cap = max_levels(height, width, self.wave, self.mode)
        if cap < 1:
            raise InputError(
                f"image of {height}x{width} pixels is too small for the {self.wave} wavelet "
                f"(filter length {pywt.Wavelet(self.wave).dec_len}); use a larger --size"
            )
        if cap < self.levels and (height, width) not in self._warned:
            self._warned.add((height, width))
            logger.warning(
                "%dx%d images allow at most J=%d levels of %s; using J=%d instead of %d",
                height,
                width,
                cap,
                self.wave,
                cap,
                self.levels,
            )
        return min(cap, self.levels)

    def _forward_module(self, levels: int, like: Tensor) -> DWTForward:
        key = str(levels)
        if key not in self.forwards:
            self.forwards[key] = DWTForward(J=levels, wave=self.wave, mode=self.mode)
        return self.forwards[key].to(device=like.device, dtype=like.dtype)

    def encode(self, x: Tensor) -> Coefficients:
        height, width = x.shape[-2:]
        levels = self.levels_for(height, width)
        lowpass, details = self._forward_module(levels, x)(x)
        return Coefficients(lowpass=lowpass, details=tuple(details), image_size=(height, width))

    def decode(self, coeffs: Coefficients, *, unit_clamp: bool = False) -> Tensor:
        """The inverse DWT, cropped to ``coeffs.image_size`` (and clamped to [0, 1] with ``unit_clamp``).

        Same result as pytorch_wavelets' ``DWTInverse`` (the tests check it), but each level is one
        unpadded stride-1 ``conv2d`` of the four sub-bands (channels folded into the batch) into the four
        output phases, interleaved as ``pixel_shuffle`` would (:func:`interleave_phases`): the polyphase form
        of the level's 2-D transposed convolution with the outer-product filters (:func:`polyphase_kernels`).
        Two kernels per level instead of ``DWTInverse``'s six grouped 1-D transposed convolutions, and none of
        them a transposed or grouped convolution, for which cuDNN picks a slow direct kernel (35% of a step's
        GPU time on an H200 before this form). Periodization padding uses ``DWTInverse``. With ``unit_clamp``,
        the finest level's interleave and the clamp are one pass on a CPU
        (:func:`~amortized_cartoonx.fused_ops.interleave_unit_clamp`) when no crop falls between them.
        """
        if self.mode == "periodization":
            self.inverse.to(device=coeffs.device, dtype=coeffs.dtype)
            x = self.inverse((coeffs.lowpass, list(coeffs.details)))
            height, width = coeffs.image_size
            x = x[..., :height, :width]  # odd sizes come back one pixel larger
            return clamp_unit(x) if unit_clamp else x

        def bands_at(level: int, x: Tensor) -> Tensor:  # (N*C, 4, H_j, W_j)
            n, c, rows, cols = x.shape
            return torch.cat([x.unsqueeze(2), coeffs.details[level]], dim=2).reshape(n * c, 4, rows, cols)

        return self._synthesize(coeffs.lowpass, coeffs.details, bands_at, coeffs.image_size, unit_clamp)

    def decode_mixed(
        self, coeffs: Coefficients, mask: Coefficients, noise: Coefficients, *, unit_clamp: bool = False
    ) -> Tensor:
        """:meth:`Representation.decode_mixed`; each level's mixed details are written straight beside its
        low-pass (:func:`~amortized_cartoonx.fused_ops.mix_into_bands`) instead of mixed, then concatenated."""
        if self.mode == "periodization":
            return super().decode_mixed(coeffs, mask, noise, unit_clamp=unit_clamp)
        lowpass = mix(mask.lowpass, coeffs.lowpass, noise.lowpass).flatten(0, 1)  # (N*L, C, H_J, W_J)

        def bands_at(level: int, x: Tensor) -> Tensor:  # (N*L*C, 4, H_j, W_j)
            return mix_into_bands(x, mask.details[level], coeffs.details[level], noise.details[level])

        return self._synthesize(lowpass, coeffs.details, bands_at, coeffs.image_size, unit_clamp)

    def _synthesize(
        self,
        lowpass: Tensor,
        details: Sequence[Tensor],
        bands_at: Callable[[int, Tensor], Tensor],
        image_size: tuple[int, int],
        unit_clamp: bool,
    ) -> Tensor:
        """The synthesis levels, coarse to fine, from ``lowpass (M, C, H_J, W_J)``; ``bands_at(j, x)`` gives level
        j's four sub-bands ``(M * C, 4, H_j, W_j)`` with ``x`` (the low-pass so far, cropped to the level) first;
        ``details`` give the levels' sizes."""
        height, width = image_size
        phases = self.synthesis_phases.to(device=lowpass.device, dtype=lowpass.dtype)
        # CPU: two maps per convolution (see paired_kernels); cuDNN gets the plain 4-channel form
        pairs = (
            self.synthesis_pairs.to(device=lowpass.device, dtype=lowpass.dtype)
            if lowpass.device.type == "cpu"
            else None
        )
        x = lowpass
        for level in reversed(range(len(details))):  # coarse to fine
            rows, cols = details[level].shape[-2:]
            if x.shape[-2:] != (rows, cols):  # drop the extra row/column of odd sizes
                x = x[..., :rows, :cols]
            n, c = x.shape[:2]
            z = synthesis_phase_maps(bands_at(level, x), phases, pairs)  # (M*C, 4, H_j - L/2 + 1, W_j - L/2 + 1)
            fuse_clamp = unit_clamp and z.device.type == "cpu"  # the fused form was measured on CPUs only
            if level == 0 and fuse_clamp and 2 * z.shape[-2] == height and 2 * z.shape[-1] == width:
                return interleave_unit_clamp(z).reshape(n, c, height, width)
            y = interleave_phases(z)  # (M*C, 1, 2 H_j - L + 2, 2 W_j - L + 2)
            x = y.reshape(n, c, *y.shape[-2:])
        if x.shape[-2:] != (height, width):  # odd sizes come back one pixel larger
            x = x[..., :height, :width]
        return clamp_unit(x) if unit_clamp else x

    def describe(self) -> dict:
        return {"representation": self.name, "wave": self.wave, "levels": self.levels, "mode": self.mode}


def polyphase_kernels(kernels: Tensor) -> Tensor:
    """``(4, 1, L, L) -> (4, 4, L/2, L/2)``: the synthesis filters of one level in polyphase form.

    A stride-2 transposed convolution with an ``L x L`` filter ``W`` (L even) equals, on each of the four
    output phases ``(r, s)`` (row and column parity), a stride-1 convolution with the sub-filter
    ``W[2t + r, 2u + s]``; flipped, so that ``conv2d`` (a correlation) computes it. Output channel
    ``2 r + s`` holds phase ``(r, s)``, the order :func:`interleave_phases` interleaves. See :func:`synthesis_step`.
    """
    length = kernels.shape[-1]
    if length % 2:
        raise ConfigError(f"synthesis filters of odd length {length} are not supported")  # PyWavelets': even
    half = length // 2
    weight = kernels.new_zeros(4, kernels.shape[0], half, half)
    for r in range(2):
        for s in range(2):
            weight[2 * r + s] = kernels[:, 0, r::2, s::2].flip(-1, -2)
    return weight


def paired_kernels(phases: Tensor) -> Tensor:
    """``(4, 4, l, l) -> (8, 8, l, l)``: the polyphase kernels twice on the diagonal, for two maps at once.

    oneDNN, the CPU's convolution library, pads a 4-channel convolution's channels to its vector width of 8, so
    half of its work is on zeros; two maps side by side as 8 channels (a free view of the batch) with this
    block-diagonal kernel fill the width, which halves the backward pass (``scripts/profile_step.py``).
    """
    pairs = phases.new_zeros(8, 8, *phases.shape[2:])
    pairs[:4, :4] = phases
    pairs[4:, 4:] = phases
    return pairs


def synthesis_step(bands: Tensor, phases: Tensor, pairs: Tensor | None = None) -> Tensor:
    """One level of the inverse DWT: ``(M, 4, H, W)`` sub-bands to ``(M, 1, 2H - L + 2, 2W - L + 2)``.

    ``interleave_phases(synthesis_phase_maps(bands, phases, pairs))``; see :func:`synthesis_phase_maps`.
    """
    return interleave_phases(synthesis_phase_maps(bands, phases, pairs))  # (M, 1, 2H - L + 2, 2W - L + 2)


def synthesis_phase_maps(bands: Tensor, phases: Tensor, pairs: Tensor | None = None) -> Tensor:
    """One level of the inverse DWT before the interleave: ``(M, 4, H, W)`` sub-bands to the four output phases
    ``(M, 4, H - L/2 + 1, W - L/2 + 1)`` (channel ``2 r + s``: output pixels ``(2i + r, 2j + s)``).

    Equal to ``conv_transpose2d(bands, kernels, stride=2, padding=L - 2)`` for the level's ``L x L``
    outer-product filters ``kernels`` (L even; ``phases = polyphase_kernels(kernels)``). That transposed
    convolution's padding ``L - 2 = 2 (L/2 - 1)`` crops exactly the phase outputs that an unpadded ("valid")
    stride-1 convolution leaves out, so no padding, cropping or copies are needed. With ``pairs``
    (:func:`paired_kernels`) and M even, two maps go through each convolution together; the same result.
    """
    m, _, height, width = bands.shape
    if pairs is not None and m % 2 == 0:
        z = valid_conv2d(bands.reshape(m // 2, 8, height, width), pairs)
        z = z.reshape(m, 4, *z.shape[-2:])
    else:
        z = valid_conv2d(bands, phases)  # (M, 4, H - L/2 + 1, W - L/2 + 1), channel 2 r + s
    return z


@functools.cache
def _avx512() -> bool:
    """Whether torch's CPU kernels run with AVX-512 (and oneDNN's vector width is 16 floats)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


#: On an AVX-512 CPU, :class:`_ValidConv2d`'s forward pass runs an 8-channel input of at least this many values as
#: 16 channels too: faster for large inputs (the finest level from 6 noise samples of an RGB 256 px image up),
#: slower for small ones (measured in docs/results.md).
QUAD_FORWARD_MIN_NUMEL = 1 << 21


class _ValidConv2d(torch.autograd.Function):
    """``conv2d(x, weight)`` (stride 1, no padding) whose input gradient is a forward ``conv2d``: the gradient is the
    full convolution of the output gradient with the flipped, transposed kernel (padding ``k - 1``).

    On a CPU, oneDNN's backward-data kernel for these small-channel convolutions takes twice the time of a forward
    one (9.6 against 4.5 ms at level 1 of 16 images, 256 px, 2 threads); the forward form is as fast as the forward
    pass. On an AVX-512 CPU an 8-channel gradient of an even batch goes through as 16 channels (two samples side
    by side, the kernel twice on the diagonal), oneDNN's vector width there, which is faster again (the paired
    kernels' reason, :func:`paired_kernels`; with AVX2 it would be slower), and so does a large forward input
    (:data:`QUAD_FORWARD_MIN_NUMEL`). The same results up to the order of the floating-point sums. No gradient
    for ``weight``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        m, channels, height, width = x.shape
        if _as_sixteen(weight, m) and x.numel() >= QUAD_FORWARD_MIN_NUMEL:  # two samples side by side
            out = torch.nn.functional.conv2d(x.reshape(m // 2, 16, height, width), _diagonal_twice(weight))
            return out.reshape(m, channels, *out.shape[-2:])
        return torch.nn.functional.conv2d(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (weight,) = ctx.saved_tensors
        kh, kw = weight.shape[-2:]
        transposed = weight.transpose(0, 1).flip(-1, -2)
        m, channels, height, width = grad.shape
        if _as_sixteen(weight, m):  # two samples side by side as 16 channels
            quad = _diagonal_twice(transposed)
            out = torch.nn.functional.conv2d(grad.reshape(m // 2, 16, height, width), quad, padding=(kh - 1, kw - 1))
            return out.reshape(m, channels, *out.shape[-2:]), None
        return torch.nn.functional.conv2d(grad, transposed, padding=(kh - 1, kw - 1)), None


def _as_sixteen(weight: Tensor, batch: int) -> bool:
    """Whether an 8-to-8-channel convolution of ``batch`` maps runs as 16 channels (even batch, AVX-512)."""
    return tuple(weight.shape[:2]) == (8, 8) and batch % 2 == 0 and _avx512()


def _diagonal_twice(weight: Tensor) -> Tensor:
    """``(8, 8, k, k) -> (16, 16, k, k)``: ``weight`` twice on the block diagonal."""
    out = weight.new_zeros(16, 16, *weight.shape[2:])
    out[:8, :8] = weight
    out[8:, 8:] = weight
    return out


def valid_conv2d(x: Tensor, weight: Tensor) -> Tensor:
    """``conv2d(x, weight)``, stride 1, no padding; on a CPU with the input gradient of :class:`_ValidConv2d`."""
    if x.device.type == "cpu" and x.requires_grad and not weight.requires_grad:
        return _ValidConv2d.apply(x, weight)
    return torch.nn.functional.conv2d(x, weight)


def interleave_phases(z: Tensor) -> Tensor:
    """``(M, 4, H, W) -> (M, 1, 2H, 2W)``: output pixel ``(2i + r, 2j + s)`` is ``z[:, 2r + s, i, j]``.

    The same values as ``pixel_shuffle(z, 2)``, as one view, permute and copy: on a CPU about twice as fast
    forward and three times backward as ``pixel_shuffle``'s kernels (``scripts/profile_step.py``).
    """
    m, _, height, width = z.shape
    return z.view(m, 2, 2, height, width).permute(0, 3, 1, 4, 2).reshape(m, 1, 2 * height, 2 * width)


def grey(x: Tensor) -> Tensor:
    """``(N, C, H, W) -> (N, 1, H, W)``: the channel mean, the paper's greyscale image."""
    return x.mean(dim=1, keepdim=True)
