"""The synthetic cartoon benchmark as a torch Dataset (pure torch, no Lightning): :class:`CartoonConfig`,
:class:`SyntheticCartoons` (a fixed number of items of a split) and :class:`SyntheticStream` (endless fresh items).

The paper's premise is that natural images are roughly piece-wise smooth ("cartoon-like"); every image here is
one by construction. What a scene holds (a smooth background, one outlined decisive object whose shape is the
class, one to three distractors of other classes, pixel noise), how it is drawn and how it is rendered lives in
:mod:`.scenes`; this module decides which scene an item is.

**Determinism.** Item ``i`` of the split ``split`` with seed ``seed`` is drawn from its own
``torch.Generator`` seeded by :func:`item_seed` (a hash of ``(split, seed, i)``): the same image whatever the
worker, the order of access or the other items. The stream (:data:`STREAM`) is a fourth sequence of items with
ids of its own, so it never repeats an item of ``train``, ``val`` or ``test``. Scenes are resolution-free, so
one item rendered at 64 and at 128 px is the same picture; only the pixel noise is drawn per resolution.

Shapes:
    image ``(3, S, S)`` float32 in [0, 1]; ``object_mask`` and ``distractor_mask`` ``(S, S)`` bool (the pixels
    at least half covered by the decisive object, outline included, and by any distractor).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..runtime import single_thread
from ..seeding import item_seed as _item_seed
from .scenes import SHAPES, Scene, render_scene, sample_scene

#: The classes, in class-index order: the shape of the decisive object (each a key of :data:`~.scenes.SHAPES`).
CLASS_NAMES: tuple[str, ...] = ("disc", "square", "triangle", "cross", "ring", "star", "crescent", "heart")

#: Dataset splits; each has its own stream of items (the held-out accuracy uses ``test``).
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: The endless stream of fresh training items (:class:`SyntheticStream`): not a split, never exported for
#: validation or test; its items hash ``cartoon:stream:<index>``, distinct from every split's.
STREAM = "stream"

#: The dataset seed of the held-out ``test`` images (fixed, so held-out accuracies compare across runs).
HELD_OUT_SEED = 0


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CartoonConfig:
    """How scenes are drawn. Lengths are fractions of the image side; colours are RGB in [0, 1].

    Attributes:
        size: image side S in pixels (default 64; any size >= 16 works, e.g. 128).
        object_radius: range of the decisive object's circumscribed radius.
        distractor_radius: range of a distractor's circumscribed radius.
        distractors: inclusive range of the number of distractors asked for.
        outline_width: the decisive object's outline width (at least one pixel).
        gap: the least distance between two objects' circumscribed discs.
        min_contrast: the least RGB distance between an object's fill and the background under its centre.
        texture_amplitude: range of the background texture's amplitude.
        noise_std: range of the pixel noise's standard deviation (drawn per image).
        shading: the largest relative brightness change across an object (a linear shading).
        supersample: sub-pixels per pixel side for antialiased edges.
        placement_tries: draws of a distractor position before it is left out.
    """

    size: int = 64
    object_radius: tuple[float, float] = (0.16, 0.23)
    distractor_radius: tuple[float, float] = (0.10, 0.16)
    distractors: tuple[int, int] = (1, 3)
    outline_width: float = 0.03
    gap: float = 0.02
    min_contrast: float = 0.35
    texture_amplitude: tuple[float, float] = (0.01, 0.05)
    noise_std: tuple[float, float] = (0.0, 0.04)
    shading: float = 0.15
    supersample: int = 3
    placement_tries: int = 30
    classes: tuple[str, ...] = field(default=CLASS_NAMES)

    def validate(self) -> CartoonConfig:
        if self.size < 16:
            raise ConfigError(f"synthetic images need a size of at least 16 px, got {self.size}")
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown or len(self.classes) < 2:
            raise ConfigError(f"classes must be at least two of {', '.join(SHAPES)}; got {list(self.classes)}")
        if not 0 <= self.distractors[0] <= self.distractors[1] <= len(self.classes) - 1:
            raise ConfigError(f"distractors must be a range within [0, {len(self.classes) - 1}]")
        for name in ("object_radius", "distractor_radius"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi < 0.5:
                raise ConfigError(f"{name} must satisfy 0 < low <= high < 0.5, got {(lo, hi)}")
        if self.supersample < 1:
            raise ConfigError("supersample must be at least 1")
        return self

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> CartoonConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown synthetic dataset settings: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}).validate()


# --------------------------------------------------------------------------------------------- items


def item_seed(split: str, seed: int, index: int) -> int:
    """The 63-bit seed of item ``index`` in ``split`` with dataset seed ``seed``: the project's one item hash,
    :func:`~amortized_cartoonx.seeding.item_seed`, of the id ``cartoon:{split}:{index}``."""
    return _item_seed(f"cartoon:{split}:{index}", seed)


def render_item(split: str, seed: int, index: int, config: CartoonConfig) -> dict:
    """Item ``index`` of ``split`` (a split or :data:`STREAM`) with dataset seed ``seed``, drawn from its own
    generator: ``image``, ``label``, ``object_mask``, ``distractor_mask``, ``id`` (``"<split>-<seed>-<index:05d>"``),
    ``index``."""
    with single_thread():
        gen = torch.Generator().manual_seed(item_seed(split, seed, index))
        scene = sample_scene(gen, config)
        image, object_mask, distractor_mask = render_scene(scene, config)
    return {
        "image": image,
        "label": scene.label,
        "object_mask": object_mask,
        "distractor_mask": distractor_mask,
        "id": f"{split}-{seed}-{index:05d}",
        "index": index,
    }


# --------------------------------------------------------------------------------------------- dataset


class SyntheticCartoons(Dataset):
    """``num_images`` procedural cartoon images, generated on the fly, deterministic per item.

    Each item is a dict: ``image`` ``(3, S, S)`` float32 in [0, 1], ``label`` (int), ``object_mask`` and
    ``distractor_mask`` ``(S, S)`` bool, ``id`` (``"<split>-<seed>-<index:05d>"``), ``index``.

    Args:
        num_images: the dataset's length.
        size: image side S (overrides ``config.size``); default 64.
        seed: the dataset seed; with ``split`` it selects the stream of items.
        split: ``train``, ``val`` or ``test`` (distinct streams; the held-out accuracy uses ``test``).
        config: drawing settings (:class:`CartoonConfig`).
    """

    def __init__(
        self,
        num_images: int,
        size: int | None = None,
        seed: int = 0,
        split: str = "train",
        config: CartoonConfig | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")
        if num_images < 0:
            raise ConfigError(f"the number of images must be non-negative, got {num_images}")
        config = config or CartoonConfig()
        if size is not None:
            config = dataclasses.replace(config, size=size)
        self.config = config.validate()
        self.num_images = num_images
        self.seed = seed
        self.split = split

    @property
    def size(self) -> int:
        return self.config.size

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.classes

    def __len__(self) -> int:
        return self.num_images

    def item_id(self, index: int) -> str:
        return f"{self.split}-{self.seed}-{index:05d}"

    def scene(self, index: int) -> Scene:
        """The scene of item ``index`` (drawn from its own generator)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        gen = torch.Generator().manual_seed(item_seed(self.split, self.seed, index))
        return sample_scene(gen, self.config)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        return render_item(self.split, self.seed, index, self.config)


class SyntheticStream:
    """An endless stream of fresh procedural training images: item ``k`` is a function of ``(seed, k)`` alone.

    Items are those of :class:`SyntheticCartoons` (same keys; ``id`` ``"stream-<seed>-<k:05d>"``), drawn from the
    stream's own sequence (:data:`STREAM`), so no item is ever one of the ``train``, ``val`` or ``test`` images,
    whatever their seeds. Which item goes to which step, device and worker is decided by the reader
    (:class:`~amortized_cartoonx.training.streams.TrainingStream`); this class only says what item ``k`` is.

    Args:
        seed: the stream's seed.
        size: image side S (overrides ``config.size``); default 64.
        config: drawing settings (:class:`CartoonConfig`).
    """

    def __init__(self, seed: int = 0, size: int | None = None, config: CartoonConfig | None = None) -> None:
        config = config or CartoonConfig()
        if size is not None:
            config = dataclasses.replace(config, size=size)
        self.config = config.validate()
        self.seed = int(seed)

    @property
    def size(self) -> int:
        return self.config.size

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.classes

    def scene(self, index: int) -> Scene:
        """The scene of item ``index``."""
        if index < 0:
            raise IndexError(f"stream items are numbered from 0, got {index}")
        return sample_scene(torch.Generator().manual_seed(item_seed(STREAM, self.seed, index)), self.config)

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            raise IndexError(f"stream items are numbered from 0, got {index}")
        return render_item(STREAM, self.seed, index, self.config)
