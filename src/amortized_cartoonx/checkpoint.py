"""The amortized explainer's checkpoint format: what ``cartoonx fit`` writes and every reader checks.

A checkpoint is a plain ``torch.save`` dict read with ``weights_only=True`` (tensors and plain values only):
``state_dict`` holds the mask predictor's weights under :data:`STATE_PREFIX`, and ``checkpoint["cartoonx"]``
(:data:`META_KEY`) the settings it was trained with (classifier identity, image size, wavelet, lambda,
distortion, obfuscation, the network's config under :data:`NETWORK_KEY`, the data split).
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .classifiers import normalization_name, weights_digest
from .errors import ConfigError, InputError, one_line
from .feature_taps import check_taps
from .images import MAX_SIZE as MAX_IMAGE_SIZE
from .mask_predictor import MaskPredictor, MaskPredictorConfig
from .rde import LINKS
from .runtime import module_device

#: Version of the ``checkpoint["cartoonx"]`` settings dict. 2: the network is ``mask_predictor`` (was ``explainer``).
CHECKPOINT_FORMAT = 2
#: The readers accept these versions (older ones are translated on load).
READABLE_FORMATS = (1, 2)
#: ``checkpoint[META_KEY]["kind"]`` of an amortized CartoonX checkpoint.
CHECKPOINT_KIND = "amortized-cartoonx"
META_KEY = "cartoonx"
#: The network's config in the settings dict, and the prefix of its weights in ``state_dict``.
NETWORK_KEY = "mask_predictor"
STATE_PREFIX = "mask_predictor."
#: Format 1 called the network ``explainer``.
LEGACY_NETWORK_KEY = "explainer"
LEGACY_STATE_PREFIX = "explainer."

#: Network settings added after checkpoints were first written, with the value a file without them means (the
#: network it was trained as), so an older file never picks up a newer default.
ADDED_NETWORK_SETTINGS = {"coefficient_input": False, "aligned_upsampling": False}
#: Loss settings added later, likewise: every earlier explainer was trained with the softmax link.
ADDED_SETTINGS = {"link": "softmax"}

#: Sanity caps on what a checkpoint may ask the reader to allocate (a hand-edited file must not ask for 180 GB).
MAX_NUM_CLASSES = 100_000
MAX_CHANNELS = 4096
MAX_LEVELS = 12
#: The ``classifier`` encoder's list fields of the network config and their entries' type.
_TAP_FIELDS = {"taps": str, "tap_channels": int}

#: The settings every reader relies on, with their types.
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "classifier": str,
    "normalize": str,
    "image_size": int,
    "wave": str,
    "levels": int,
    "mode": str,
    "l1_lambda": (int, float),
    "distortion": str,
    "obfuscation": str,
}


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A validated checkpoint: ``meta`` (the settings, in the current format), the network's ``state``, and
    Lightning's ``hyper_parameters`` (the module's arguments, which a resumed ``cartoonx fit`` reads; not
    validated: only plain values, as ``weights_only`` reads them)."""

    path: Path
    meta: dict
    state: dict[str, Tensor]
    hyper_parameters: dict = field(default_factory=dict)


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read and validate an amortized checkpoint; every problem is one :class:`InputError` line naming the file.

    The file is read with ``torch.load(weights_only=True)`` (tensors and plain values: no code runs), the
    settings are checked for presence, types and sane sizes, and format 1 is translated to the current format.
    The weights are checked against the network only when the network is built (:func:`build_mask_predictor`).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    if not _is_torch_file(path):
        raise InputError(f"cannot read checkpoint {path}: not a checkpoint file (cartoonx fit writes torch.save files)")
    damaged = _damaged_zip_member(path)
    if damaged:
        raise InputError(f"cannot read checkpoint {path}: it is damaged ({damaged}); copy or download it again")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on its way to refusing a file
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object: loading it could run code
        raise InputError(
            f"cannot read checkpoint {path}: it holds objects other than tensors and plain values "
            "(refused: unpickling them could run code)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any reading failure is the user's file
        raise InputError(f"cannot read checkpoint {path}: {one_line(exc)}") from None
    meta = checkpoint.get(META_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or meta.get("kind") != CHECKPOINT_KIND:
        raise InputError(f"{path} is not an amortized CartoonX checkpoint (train one with cartoonx fit)")
    version = meta.get("format_version")
    if type(version) is not int or version not in READABLE_FORMATS:
        raise InputError(
            f"{path} has checkpoint format {version!r}; this version reads "
            f"{', '.join(map(str, READABLE_FORMATS))} (a newer file needs a newer amortized-cartoonx)"
        )
    key, prefix = (NETWORK_KEY, STATE_PREFIX) if version >= 2 else (LEGACY_NETWORK_KEY, LEGACY_STATE_PREFIX)
    meta = {**ADDED_SETTINGS, **{NETWORK_KEY if k == key else k: v for k, v in meta.items()}}
    if isinstance(meta.get(NETWORK_KEY), dict):
        meta[NETWORK_KEY] = {**ADDED_NETWORK_SETTINGS, **meta[NETWORK_KEY]}
    _check_settings(path, meta)
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict):
        raise InputError(f"{path} holds no state_dict")
    state = {k[len(prefix) :]: v for k, v in state_dict.items() if isinstance(k, str) and k.startswith(prefix)}
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise InputError(f"{path}: weight {name!r} is not a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InputError(f"{path}: weight {name!r} holds NaN or infinite values (a diverged training run?)")
    hparams = checkpoint.get("hyper_parameters")
    return LoadedCheckpoint(
        path=path, meta=meta, state=state, hyper_parameters=hparams if isinstance(hparams, dict) else {}
    )


def _damaged_zip_member(path: Path) -> str | None:
    """What is damaged in a zip-format ``torch.save`` file (a member whose CRC-32 does not match), else None.

    ``torch.load`` does not check the CRCs, so changed bytes inside a tensor would load as other weights. A file
    that is no readable zip is left to ``torch.load``'s own error."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError):  # testzip names a bad CRC
        return None
    return f"member {bad!r} fails its CRC-32 check" if bad else None


def _is_torch_file(path: Path) -> bool:
    """Whether ``path`` looks like a ``torch.save`` file: a zip archive (the default format) or a pickle of
    protocol 2 or later (the legacy format)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return True  # torch.load reports it
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _is_list_of(value: object, kind: type | tuple[type, ...], longest: int) -> bool:
    """``value`` is a list of at most ``longest`` entries of ``kind`` (booleans never count as numbers)."""
    return (
        isinstance(value, list)
        and len(value) <= longest
        and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
    )


def _check_settings(path: Path, meta: dict) -> None:
    for name, kind in _REQUIRED.items():
        if name not in meta:
            raise InputError(f"{path}: the checkpoint's settings lack {name!r}")
        value = meta[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise InputError(f"{path}: setting {name!r} has the wrong type ({type(value).__name__})")
    if not 1 <= meta["image_size"] <= MAX_IMAGE_SIZE:
        raise InputError(f"{path}: image_size {meta['image_size']} is outside 1..{MAX_IMAGE_SIZE}")
    if not 1 <= meta["levels"] <= MAX_LEVELS:
        raise InputError(f"{path}: levels {meta['levels']} is outside 1..{MAX_LEVELS}")
    if not math.isfinite(meta["l1_lambda"]) or meta["l1_lambda"] < 0:
        raise InputError(f"{path}: l1_lambda {meta['l1_lambda']} is not a finite number >= 0")
    if meta["link"] not in LINKS:
        raise InputError(f"{path}: link {meta['link']!r:.40} is not one of {', '.join(LINKS)}")
    network = meta.get(NETWORK_KEY)
    if not isinstance(network, dict):
        raise InputError(f"{path}: the checkpoint's settings lack the network's config ({NETWORK_KEY!r})")
    fields = {f.name for f in dataclasses.fields(MaskPredictorConfig)}
    unknown = sorted(set(network) - fields)
    if unknown:
        raise InputError(f"{path}: unknown network setting(s) {', '.join(map(repr, unknown))}")
    for name, kind in _TAP_FIELDS.items():  # the classifier encoder's layers: None or one entry per level
        value = network.get(name)
        if value is not None and not _is_list_of(value, kind, MAX_LEVELS):
            raise InputError(f"{path}: network setting {name!r} is not a list of {kind.__name__}")
    backbone = network.get("backbone")
    if backbone is not None and (not isinstance(backbone, str) or not 0 < len(backbone) <= 1000):
        raise InputError(f"{path}: network setting 'backbone' is not a classifier spec")
    biases = network.get("init_bias")
    # one per band; the network's own check gives the count
    if isinstance(biases, list) and not _is_list_of(biases, (int, float), 1 + MAX_LEVELS):
        raise InputError(f"{path}: network setting 'init_bias' is not a list of at most {1 + MAX_LEVELS} numbers")
    for name, value in network.items():
        if name in _TAP_FIELDS or name == "backbone" or (name == "init_bias" and isinstance(value, list)):
            continue
        default = getattr(MaskPredictorConfig, name, None)
        expected = (int, float) if isinstance(default, float) else type(default)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, expected):
            raise InputError(f"{path}: network setting {name!r} has the wrong type ({type(value).__name__})")
    caps = {"num_classes": MAX_NUM_CLASSES, "levels": MAX_LEVELS}
    caps.update({n: MAX_CHANNELS for n in ("width", "decoder_width", "embed_dim", "max_multiplier", "groups")})
    for name, cap in caps.items():
        if name in network and network[name] > cap:
            raise InputError(f"{path}: network setting {name}={network[name]} is above the cap {cap}")


def build_mask_predictor(
    loaded: LoadedCheckpoint, classifier: nn.Module | None = None, backbone: nn.Module | str | None = None
) -> MaskPredictor:
    """The network a checkpoint describes, with its weights; one :class:`InputError` line when they do not fit.

    ``classifier``: the explained classifier, which the ``classifier`` encoder reads features from (it must
    offer the recorded layers with the recorded channels). ``backbone``: the ``backbone`` encoder's network, a
    module or a spec; None loads the recorded spec when it is a built-in one (``torchvision:NAME``,
    ``efficientnet-lite0``): a checkpoint never decides what other code is imported. Other encoders ignore both.
    """
    try:
        config = MaskPredictorConfig(**loaded.meta[NETWORK_KEY])
        with torch.device("meta"):  # shapes only, no memory: settings within every cap can still ask for 44 GB
            shapes = {k: tuple(v.shape) for k, v in MaskPredictor(config).state_dict().items()}
    except (ConfigError, TypeError, ValueError) as exc:
        raise InputError(f"{loaded.path}: invalid network config ({exc})") from None
    stored = {k: tuple(v.shape) for k, v in loaded.state.items()}
    if shapes != stored:
        differ = sorted(set(shapes) ^ set(stored)) or sorted(k for k in shapes if shapes[k] != stored[k])
        raise InputError(
            f"{loaded.path}: the weights do not fit the recorded network ({len(differ)} tensors differ, e.g. "
            f"{differ[0]!r}: {shapes.get(differ[0])} in the network, {stored.get(differ[0])} stored)"
        )
    network = MaskPredictor(config)
    try:
        network.load_state_dict(loaded.state)
    except RuntimeError as exc:
        raise InputError(f"{loaded.path}: the weights do not fit the recorded network ({one_line(exc)})") from None
    cfg = network.config
    if cfg.encoder == "classifier":
        source = classifier
        if source is None:
            raise ConfigError(f"{loaded.path.name} reads the classifier's features: give the classifier")
    elif cfg.encoder == "backbone":
        source = _backbone(loaded, backbone, classifier)
        recorded, digest = loaded.meta.get("backbone_weights_sha256"), weights_digest(source)
        if recorded and digest and recorded != digest:
            raise ConfigError(
                f"{loaded.path.name} was trained on the features of a backbone with other weights than the one "
                f"given now ({cfg.backbone!r} in training; another version or file?)"
            )
        trained, used = loaded.meta.get("backbone_normalize"), normalization_name(source)
        if trained and used != trained:  # the same weights behind another input normalisation: other features
            raise ConfigError(
                f"{loaded.path.name} was trained on the features of the backbone with input normalisation "
                f"{trained}, the backbone given now uses {used}: give it as trained (a bare nn.Module is wrapped "
                "with the checkpoint's normalisation)"
            )
    else:
        return network
    role = "the backbone" if cfg.encoder == "backbone" else "the classifier"
    size, channels = int(loaded.meta["image_size"]), cfg.network_input_channels()
    check_taps(source, list(cfg.taps), list(cfg.tap_channels), size, role, channels)
    return network.attach(source)


def _backbone_normalize(loaded: LoadedCheckpoint) -> str:
    """The backbone's input normalisation in training (checkpoints before it was recorded: ``none``)."""
    return loaded.meta.get("backbone_normalize") or "none"


def _backbone(loaded: LoadedCheckpoint, given: nn.Module | str | None, classifier: nn.Module | None) -> nn.Module:
    """The backbone module: given, or loaded from the given spec or from the recorded built-in spec."""
    from .classifiers import Classifier, load_classifier, wrap_classifier

    if isinstance(given, nn.Module):  # a bare module: wrapped as in training (the recorded taps are the wrapper's)
        return given if isinstance(given, Classifier) else wrap_classifier(given, _backbone_normalize(loaded))
    spec = given or loaded.meta[NETWORK_KEY]["backbone"]
    if given is None and not (spec.startswith("torchvision:") or spec == "efficientnet-lite0"):
        raise ConfigError(
            f"{loaded.path.name} reads the features of the backbone {spec!r}: name it (backbone=...); a checkpoint "
            "loads only built-in backbones (torchvision:NAME, efficientnet-lite0) by itself"
        )
    return load_classifier(spec, normalize="auto", device=module_device(classifier))
