"""Every random stream of the project, and the one way an item (an image file, a synthetic scene) gets a seed.

Reproducibility rests on two rules:

* **An item's seed depends on its id and the user's seed only** -- never on its position in a folder, the batch
  it lands in, the number of devices or ``--limit``: :func:`item_seed` hashes ``(seed, item id)``. The exact
  optimizer (``cartoonx explain``, ``targets``, ``evaluate``), the training noise and the synthetic scenes all
  use it, so the same file explained by any command with the same ``--seed`` gets the same noise.
* **Each use of randomness draws from its own stream**, derived from the item's seed and a :class:`Stream`
  number with :func:`stream_seeds`. Two uses never share draws, and adding a new use never changes the
  draws of an existing one. A new use is one new line in :class:`Stream`; ``tests/test_seeding.py`` pins the
  table, so a change to it is deliberate.

The Python API's ``explain(images, seeds=None)`` has no ids: image ``n`` of a call gets ``seed + n``
(:func:`image_seeds`); pass ``seeds`` to choose them (the commands pass ``item_seed(file name, seed)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from enum import IntEnum

import numpy as np

from .errors import InputError


class Stream(IntEnum):
    """The project's random streams (the numbers are part of the results: never renumber one)."""

    #: The exact optimizer's noise draws, one generator per image (``RDEOptimizer.explain``).
    OPTIMIZE = 0
    #: The final measurement of a mask: distortion, loss and ``prob_obfuscated`` of an ``Explanation``.
    MEASURE = 1
    #: The evaluation's obfuscation noise for the rate-distortion curves and panel (c).
    EVAL_NOISE = 10
    #: The evaluation's tie-breaking among equally relevant positions when ranking a relevance map.
    EVAL_TIES = 11
    #: SmoothGrad's input noise.
    SMOOTHGRAD = 20
    #: The random-ordering baselines (random pixels, random wavelet coefficients).
    RANDOM_ORDER = 21
    #: Amortized training: the noise of a training step (with the step number and the image).
    TRAIN_NOISE = 30
    #: Amortized training: the noise of a validation pass (fixed across epochs: step 0).
    VAL_NOISE = 31
    #: Amortized training: the noise of a test pass.
    TEST_NOISE = 32
    #: Amortized training: the augmentation of a training image (random resized crop, flip), per epoch and image.
    AUGMENT = 33
    #: Amortized training: the order of the training images in an epoch (with augmentation or a stream).
    TRAIN_ORDER = 34
    #: The amortized explainer's calibration: the noise that picks each image's sparsity shift.
    CALIBRATE = 40
    #: The evaluation's sanity checks: re-initialising a classifier layer (with the layer's index).
    SANITY = 50


_MASK63 = 2**63 - 1


def item_seed(item_id: str, seed: int = 0) -> int:
    """The 63-bit seed of one item: SHA-256 of ``"{seed}:{item_id}"``, its first 8 bytes little-endian.

    ``item_id`` is a file name for images (not a path: the same file in two folders gets the same seed).
    """
    digest = hashlib.sha256(f"{int(seed)}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & _MASK63


def item_unit(item_id: str, seed: int = 0) -> float:
    """:func:`item_seed` mapped to ``[0, 1)``: a uniform draw that belongs to the item (used for splits)."""
    return item_seed(item_id, seed) / 2**63


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from a sequence of integers (numpy's ``SeedSequence``, so nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def stream_seeds(seeds: Sequence[int], stream: Stream) -> list[int]:
    """Per-image seeds for one use (``stream``) from the per-image seeds ``seeds``."""
    return [derive_seed(s, int(stream)) for s in seeds]


def step_seeds(base: int, stream: Stream, step: int, ids: Sequence[str]) -> list[int]:
    """Per-image seeds of one training step: a function of (base seed, stream, step, image id) only, so a
    batch's noise does not depend on its order, its size or the device it runs on."""
    return [derive_seed(base, int(stream), step, item_seed(i)) for i in ids]


def image_seeds(num_images: int, seed: int, seeds: Sequence[int] | None = None) -> list[int]:
    """Per-image seeds of an ``explain`` call: ``seeds`` if given (checked: :func:`check_seeds`), else ``seed,
    seed + 1, ...``."""
    if seeds is None:
        if seed < 0:  # the noise generators take non-negative seeds only
            raise InputError(f"seed must be at least 0 (image n is seeded seed + n), got {seed}; or pass seeds=")
        return [seed + i for i in range(num_images)]
    return check_seeds(seeds, num_images)


def check_seeds(seeds: Sequence[int], num_images: int) -> list[int]:
    """``seeds`` as a list of ``num_images`` non-negative ints (Python, numpy or 0-d tensor integers, or floats
    of integral value); anything else is an :class:`~amortized_cartoonx.errors.InputError`."""
    try:
        given = list(seeds)
    except TypeError:
        raise InputError(f"seeds must be one integer per image, got {type(seeds).__name__}") from None
    checked = [_seed(s) for s in given]
    if len(checked) != num_images:
        raise InputError(f"got {len(checked)} seeds for {num_images} images")
    return checked


def _seed(value: object) -> int:
    try:
        seed = int(value)  # type: ignore[call-overload]
        integral = bool(seed == value) and not isinstance(value, bool)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        integral = False
    if not integral or seed < 0:
        raise InputError(f"seeds must be non-negative integers, got {value!r:.60}")
    return seed


#: How the commands seed an image file (recorded in teacher manifests and saved explanations).
FILE_SEEDING = "item_seed(file name, seed): SHA-256 of '{seed}:{file name}', first 8 bytes (amortized_cartoonx.seeding)"


def file_seeds(ids: Sequence[str], seed: int) -> list[int]:
    """Per-image seeds of the commands, which know each image's file name: ``item_seed(id, seed)``."""
    return [item_seed(i, seed) for i in ids]
