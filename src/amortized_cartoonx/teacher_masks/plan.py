"""What a teacher-mask run computes, decided in the launching process (no Lightning).

* :class:`TeacherMaskSettings` -- everything that determines the masks of a folder;
* :func:`build_manifest` -- those settings as the store's ``manifest.json`` (a run with others is refused);
* :func:`plan_teacher_masks` -- the images still to compute, each with its seed, and a run id.

**Seeds.** An image's seed is :func:`~amortized_cartoonx.seeding.item_seed` of its file name and the user's
``seed`` (:func:`~amortized_cartoonx.seeding.file_seeds`), so its mask depends on the image, the settings and
``seed`` only: never on its position in the folder, the folder's other files, ``limit``, a resume, the batch
size or the number of devices. ``cartoonx explain --seed S`` on the same file gives the same mask, as does
``CartoonX(...).explain(image, seeds=[item_seed(file name, S)])``.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..classifiers import Classifier, classifier_identity, load_classifier, normalization_name
from ..errors import ConfigError
from ..images import list_images
from ..optimizer import CartoonX, OptimizerConfig
from ..seeding import FILE_SEEDING, file_seeds
from ..wavelets import DEFAULT_LEVELS, DEFAULT_MODE, DEFAULT_WAVE
from .files import IDENTITY_KEYS, MANIFEST_KIND
from .store import TeacherMaskStore

#: The :class:`OptimizerConfig` fields that determine the masks (recorded in the manifest). ``chunk_size`` is
#: left out on purpose: it only bounds memory, so a resumed run may change it.
RESULT_FIELDS = (
    "schedule",
    "steps",
    "num_samples",
    "final_samples",
    "lr",
    "lr_decay",
    "lr_final",
    "parametrisation",
    "logit_stretch",
    "precision",
    "l1_lambda",
    "obfuscation",
    "distortion",
    "link",
    "stop_patience",
    "stop_tolerance",
    "measure_samples",
    "seed",
)

#: The manifest's description of how an image's seed is chosen (see the module docstring).
SEEDING = FILE_SEEDING


@dataclass
class TeacherMaskSettings:
    """Everything that determines the teacher masks of a folder.

    Attributes:
        classifier: the classifier spec (see :func:`~amortized_cartoonx.classifiers.load_classifier`).
        normalize: ``auto``, ``imagenet`` or ``none`` (the manifest records the resolved one).
        size: images are resized and centre-cropped to ``size x size``. Default 256 (the paper's).
        wave, levels, mode: the DWT (``levels`` is capped for small sizes; the manifest records the J used).
        config: the exact optimizer's hyper-parameters (the paper's by default).
    """

    classifier: str
    normalize: str = "auto"
    size: int = 256
    wave: str = DEFAULT_WAVE
    levels: int = DEFAULT_LEVELS
    mode: str = DEFAULT_MODE
    config: OptimizerConfig = field(default_factory=OptimizerConfig)

    def build_optimizer(self, classifier: Classifier) -> CartoonX:
        return CartoonX(classifier, wave=self.wave, levels=self.levels, mode=self.mode, config=self.config)

    def load_classifier(self, device: str | torch.device = "cpu") -> Classifier:
        """The classifier of :attr:`classifier`, built under the CPU random state of ``config.seed`` (the global
        state is left as it was): a spec whose weights come from the random initialisation (an untrained
        ``package.module:Class``) builds the same weights in every process of a run (each DDP rank, the manifest's
        digest), as ``cartoonx fit`` builds its classifier after ``seed_everything``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return load_classifier(self.classifier, normalize=self.normalize, device=device)


def build_manifest(settings: TeacherMaskSettings, optimizer: CartoonX, classifier: Classifier) -> dict:
    """The manifest of a teacher store: every setting that determines the masks, and the mask layout.

    Keys: ``kind``, ``method``, ``target`` (``predicted``: the classifier's predicted class), ``classifier`` (and
    its :data:`~.files.IDENTITY_KEYS`: a model file's SHA-256, the weights' digest),
    ``normalize`` (resolved: ``imagenet`` or ``none``), ``size``, ``representation``, ``wave``, ``levels`` (the J
    used at this size), ``levels_requested``, ``mode``, ``mask_length`` (K), ``band_shapes`` (per band, low-pass
    first, its shape without N and C), ``seeding`` (:data:`SEEDING`) and the optimizer's :data:`RESULT_FIELDS`
    (``l1_lambda`` resolved to the method's default when not given). The store adds ``format_version``.
    """
    representation = optimizer.representation
    levels = representation.levels_for(settings.size, settings.size)  # InputError when the size is too small
    probe = torch.zeros(1, 3, settings.size, settings.size)
    mask = representation.encode(probe).mask_like()
    config = asdict(optimizer.config)
    return {
        "kind": MANIFEST_KIND,
        "method": optimizer.method,
        "target": "predicted",
        "classifier": settings.classifier,
        **{k: v for k, v in classifier_identity(settings.classifier, classifier).items() if k in IDENTITY_KEYS},
        "normalize": normalization_name(classifier),
        "size": settings.size,
        **representation.describe(),
        "levels": levels,
        "levels_requested": settings.levels,
        "mask_length": mask.numel_per_channel(),
        "band_shapes": [list(s) for s in mask.band_shapes()],
        "seeding": SEEDING,
        **{name: config[name] for name in RESULT_FIELDS},
    }


@dataclass
class TeacherMaskPlan:
    """The images a run computes: ``ids`` (file names, in folder order) with their ``seeds``
    (``item_seed(id, seed)``); ``total`` images considered, ``skipped`` already stored; ``run_id`` names this
    run's shards."""

    ids: list[str]
    seeds: list[int]
    total: int
    skipped: int
    run_id: str


def new_run_id() -> str:
    """``YYYYmmddTHHMMSS-<6 hex>`` (UTC): sorts by start time, unique across concurrent launches."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def plan_teacher_masks(
    images: str | Path, store: TeacherMaskStore, seed: int, limit: int | None = None
) -> TeacherMaskPlan:
    """The images of folder ``images`` (the first ``limit`` by name, if given) not yet in ``store``, each with
    its seed ``item_seed(file name, seed)``.

    Raises:
        ConfigError: an image whose file changed since its mask was stored (the store records each file's SHA-256).
    """
    files = list_images(images)  # InputError when the folder is missing or has no images
    if limit is not None:
        files = files[:limit]
    done = set(store.ids())
    changed = store.changed_images(files)
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise ConfigError(
            f"{len(changed)} image(s) of {images} changed since their teacher masks were stored in {store.folder} "
            f"({shown}): write the masks of the new images to another folder"
        )
    ids = [path.name for path in files if path.name not in done]
    return TeacherMaskPlan(
        ids=ids,
        seeds=file_seeds(ids, seed),
        total=len(files),
        skipped=len(files) - len(ids),
        run_id=new_run_id(),
    )
