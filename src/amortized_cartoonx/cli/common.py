"""Argument groups shared by the sub-commands, and small helpers. Import-light (no torch at import)."""

from __future__ import annotations

import argparse
import logging
import math
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

#: Mirrors of the registries in ``rde``, ``optimizer`` and ``amortized`` (kept here so ``--help`` needs no torch;
#: ``tests/test_methods.py`` ties them).
SCHEDULE_NAMES = ("paper", "fast", "refine")
PARAMETRISATION_NAMES = ("clamp", "logit")
PRECISION_NAMES = ("fp32", "bf16")
DISTORTION_NAMES = ("label", "maximize-target", "l2", "label-l2", "kl")
LINK_NAMES = ("softmax", "sigmoid")
OBFUSCATION_NAMES = ("gaussian-adaptive", "zero", "uniform")
CALIBRATION_NAMES = ("shift", "top-k")
#: Defaults of ``--size`` and of the DWT options (mirrors of ``wavelets.DEFAULT_WAVE``, ``DEFAULT_LEVELS`` and
#: ``DEFAULT_MODE``), used when neither the user nor a checkpoint or a synthetic classifier gives a value.
DEFAULT_SIZE = 256
DWT_DEFAULTS = {"wavelet": "db3", "levels": 5, "mode": "zero"}

logger = logging.getLogger(__name__)


def _number(kind: type, low: float | None, low_open: bool, label: str):
    """An argparse ``type`` that parses a finite ``kind`` (int or float) at least (or above) ``low``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {label}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"expected {label}, got {text!r}")
        return value

    parse.__name__ = label  # argparse names the type in its messages
    return parse


#: argparse types: option values are checked when parsed (one line and exit code 2), never NaN or infinite.
positive_int = _number(int, 0, True, "a positive integer")
nonnegative_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a positive number")
nonnegative_float = _number(float, 0.0, False, "a number >= 0")
#: An image side: a positive integer up to ``images.MAX_SIZE`` (kept in sync by a test).
MAX_IMAGE_SIZE = 8192


def image_size(text: str) -> int:
    value = positive_int(text)
    if value > MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"expected an image side of at most {MAX_IMAGE_SIZE} px, got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_classifier_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("classifier")
    group.add_argument(
        "--classifier",
        required=required,
        metavar="SPEC",
        help="torchvision:NAME[:none|WEIGHTS], PATH.pt (TorchScript), PATH.pt2 (ExportedProgram), "
        "package.module:callable, synthetic[:PATH], or efficientnet-lite0 (the efficientnet extra)",
    )
    group.add_argument(
        "--normalize",
        default="auto",
        choices=("auto", "imagenet", "efficientnet-lite", "none"),
        help="input normalisation inside the wrapper; auto: the model's own (ImageNet's for torchvision models, "
        "(255x-127)/128 for efficientnet-lite0), none otherwise",
    )


def add_link_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, from_checkpoint: bool = False) -> None:
    """``--link softmax|sigmoid``; with ``from_checkpoint`` its default is None (:func:`fill_defaults` takes an
    amortized checkpoint's, else softmax)."""
    default = "the default, or an amortized checkpoint's" if from_checkpoint else "the default"
    parser.add_argument(
        "--link",
        default=None if from_checkpoint else "softmax",
        choices=LINK_NAMES,
        help=f"how the classifier's outputs become probabilities: softmax (one class per image; {default}) or "
        "sigmoid (multi-label, or a binary classifier with a single logit: each output is its own label's logit)",
    )


def add_rde_args(parser: argparse.ArgumentParser) -> None:
    """The exact optimizer's options (defaults: the paper's)."""
    group = parser.add_argument_group("RDE optimizer (defaults: the paper's)")
    group.add_argument(
        "--schedule",
        default=None,
        choices=SCHEDULE_NAMES,
        help="step schedule: steps, learning rate, its decay and the parametrisation (default: paper, 2000 steps "
        "at lr 1e-3; the warm start: refine, 60 steps at lr 0.1 with cosine decay; fast: 200 steps, "
        "lr 0.1 with cosine decay)",
    )
    group.add_argument("--steps", type=nonnegative_int, default=None, help="Adam steps (default: the schedule's)")
    group.add_argument("--samples", type=positive_int, default=64, help="noise samples per step (default 64)")
    group.add_argument(
        "--l1-lambda",
        type=nonnegative_float,
        default=None,
        help="sparsity weight (default 20 CartoonX, 4 Pixel RDE)",
    )
    group.add_argument(
        "--lr", type=positive_float, default=None, help="Adam learning rate (default: the schedule's; paper 1e-3)"
    )
    group.add_argument(
        "--parametrisation",
        default=None,
        choices=PARAMETRISATION_NAMES,
        help="clamp: the projected mask (the paper's); logit: a stretched sigmoid of free logits "
        "(default: the schedule's)",
    )
    group.add_argument(
        "--precision",
        default=None,
        choices=PRECISION_NAMES,
        help="the classifier's precision during the steps: fp32 (default) or bf16 (autocast; for GPUs with bf16 "
        "tensor cores); the DWT, the noise, the loss and the final measurement stay float32",
    )
    group.add_argument("--distortion", default="label", choices=DISTORTION_NAMES, help="default: label")
    add_link_arg(group, from_checkpoint=True)
    group.add_argument(
        "--obfuscation", default="gaussian-adaptive", choices=OBFUSCATION_NAMES, help="default: gaussian-adaptive"
    )
    # None: not given (fill_defaults uses a checkpoint's settings, or the defaults)
    group.add_argument("--wavelet", default=None, help="discrete wavelet (default db3, or a checkpoint's)")
    group.add_argument(
        "--levels",
        type=positive_int,
        default=None,
        help="DWT scales J, capped for small images (default 5, or a checkpoint's)",
    )
    group.add_argument(
        "--mode",
        default=None,
        help="DWT padding: zero (default, or a checkpoint's), symmetric, reflect, periodization",
    )
    group.add_argument(
        "--chunk-size",
        type=positive_int,
        default=None,
        help="noise samples per forward pass (bounds memory); default: all on a GPU, cache-sized chunks on a CPU",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="noise seed; an image's noise depends on this seed and its file name only (default 0)",
    )


def add_size_arg(
    parser: argparse.ArgumentParser,
    what: str = "images are resized and centre-cropped to SIZE",
    recorded: str = "the checkpoint's or a synthetic classifier's training size",
) -> None:
    """``--size``, default None: :func:`fill_defaults` sets the ``recorded`` size, else :data:`DEFAULT_SIZE`."""
    parser.add_argument(
        "--size", type=image_size, default=None, help=f"{what} (default: {recorded}, else {DEFAULT_SIZE})"
    )


def add_channels_arg(parser: argparse.ArgumentParser) -> None:
    """``--channels auto|1|3`` (:func:`resolve_channels`)."""
    parser.add_argument(
        "--channels",
        default="auto",
        choices=("auto", "1", "3"),
        help="colour channels of the classifier's input: 3 (RGB), 1 (greyscale: images converted by their luma), "
        "or auto (default): 3 if the classifier runs on RGB images, else 1 if it runs on greyscale ones",
    )


def resolve_channels(choice: str, classifier, size: int, device) -> int:
    """The channel count ``--channels`` asks for: ``auto`` probes the classifier
    (:func:`~amortized_cartoonx.classifiers.input_channels`) and logs a greyscale choice."""
    if choice != "auto":
        return int(choice)
    from amortized_cartoonx.classifiers import input_channels

    channels = input_channels(classifier, size, device)
    if channels == 1:
        logger.info("the classifier takes single-channel images: explaining greyscale images (--channels auto)")
    return channels


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def recorded_settings(checkpoint: str | None, classifier: str | None) -> tuple[dict, str]:
    """``(settings, source)``: the image size, DWT and link a checkpoint was trained with (read without
    Lightning), or the image size a synthetic classifier (``synthetic[:PATH]``) was trained at; ``({}, "")`` for
    neither."""
    if checkpoint:
        from amortized_cartoonx.checkpoint import read_checkpoint

        meta = read_checkpoint(Path(checkpoint).expanduser()).meta
        keys = {"size": "image_size", "wavelet": "wave", "levels": "levels", "mode": "mode", "link": "link"}
        return {option: meta[key] for option, key in keys.items()}, f"the checkpoint {Path(checkpoint).name}"
    if classifier and (classifier == "synthetic" or classifier.startswith("synthetic:")):
        from amortized_cartoonx.synthetic.classifier import read_metadata

        dataset = read_metadata(classifier.partition(":")[2] or None).get("dataset")
        size = dataset.get("size") if isinstance(dataset, dict) else None
        if isinstance(size, int) and not isinstance(size, bool):
            return {"size": size}, "the synthetic classifier's training size"
    return {}, ""


def fill_defaults(args: argparse.Namespace, recorded: dict | None = None, source: str = "") -> None:
    """Set ``--size`` and the DWT options the user did not give (None) to ``recorded`` settings (those of
    :func:`recorded_settings`), else to the defaults; logs the recorded ones used. Given values stay as given."""
    recorded = recorded or {}
    defaults = {"size": DEFAULT_SIZE, **DWT_DEFAULTS, "link": "softmax"}
    taken = []
    for option, default in defaults.items():
        if not hasattr(args, option) or getattr(args, option) is not None:
            continue
        value = recorded.get(option, default)
        setattr(args, option, value)
        if option in recorded:
            taken.append(f"--{option} {value}")
    if taken:
        logger.info("%s (from %s)", ", ".join(taken), source or "recorded settings")


def check_class_names(labels: list[str] | None, num_classes: int, path: str | None, link: str = "softmax") -> None:
    """Warn (one line) when a ``--labels`` file names another number of classes than the classifier has; refuse it
    with the sigmoid link, where each output is one label (a binary classifier's negative class has no output)."""
    if labels is None or len(labels) == num_classes:
        return
    if link == "sigmoid":
        from amortized_cartoonx.errors import ConfigError

        raise ConfigError(
            f"--labels {path} names {len(labels)} labels, the classifier has {num_classes} outputs: with the sigmoid "
            "link each output is one label, line k names output k (a single-logit classifier: one line, its "
            "positive label)"
        )
    logger.warning(
        "--labels %s names %d classes, the classifier has %d classes: the names may not fit the classes",
        path,
        len(labels),
        num_classes,
    )


def parse_targets(text: str | None, num_images: int, labels: list[str] | None = None) -> list[int] | None:
    """``--target``: one class for every image or one per image (commas), each an index or, with ``labels``,
    a class name: a whole line of the labels file (names may hold commas: ``tench, Tinca tinca``) or one of its
    comma-separated names (``goldfish``), compared without case; a name of several classes is refused. A number
    is always an index (a labels file whose line 5 reads ``1`` does not turn ``--target 1`` into class 5)."""
    from amortized_cartoonx.errors import InputError

    if text is None:
        return None
    numbers = all(part.strip().lstrip("-").isdigit() for part in text.split(","))  # indices before names
    whole = class_by_name(text, labels, whole_lines_only=True) if labels and not numbers else None
    if whole is not None:
        return [whole] * num_images
    values = []
    for part in text.split(","):
        try:
            values.append(int(part))
        except ValueError:
            index = class_by_name(part, labels) if labels else None
            if index is None:
                names = " or class names of --labels" if labels else " (class names need --labels FILE)"
                raise InputError(
                    f"--target takes class indices{names} separated by commas; {part.strip()!r} is neither"
                ) from None
            values.append(index)
    if len(values) == 1:
        return values * num_images
    if len(values) != num_images:
        raise InputError(f"--target gives {len(values)} classes for {num_images} images")
    return values


def class_by_name(name: str, labels: list[str], whole_lines_only: bool = False, option: str = "--target") -> int | None:
    """The index of the class ``name`` names in ``labels`` (a whole line, else one of a line's comma-separated
    names; case and outer spaces ignored), or None; an :class:`InputError` for a name of several classes."""
    from amortized_cartoonx.errors import InputError

    key = name.strip().casefold()
    if not key:
        return None
    found = [i for i, line in enumerate(labels) if line.strip().casefold() == key]
    if not found and not whole_lines_only:
        found = [i for i, line in enumerate(labels) if key in (n.strip().casefold() for n in line.split(","))]
    if len(found) > 1:
        raise InputError(
            f"{option} {name.strip()!r} names {len(found)} classes ({', '.join(map(str, found))}): give the index"
        )
    return found[0] if found else None


def read_target_file(path: str | Path, labels: list[str] | None = None) -> dict[str, int]:
    """``--target-file``: image file name -> class, from a JSON object (``{"cat.jpg": 281, ...}``) or a text file
    of lines ``NAME,CLASS`` or ``NAME<TAB>CLASS`` (split at the first tab, else at the first comma, so class names
    may hold commas; blank lines and lines starting with ``#`` are skipped). A class is an index or, with
    ``labels``, a class name as ``--target`` reads it; a name with a folder counts by its file name.

    Raises:
        InputError: a missing or unreadable file, a line or entry that is not a name and a class, a class that is
            neither an index nor a name of ``labels``, or one file name given twice.
    """
    import json

    from amortized_cartoonx.errors import InputError

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"--target-file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"--target-file {path} is not UTF-8 text") from None
    where = f"--target-file {path}"
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a JSON object of image file names to classes")
        items = [(str(k), v, f"{where}, entry {k!r}") for k, v in data.items()]
    else:
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, sep, value = line.partition("\t") if "\t" in line else line.partition(",")
            if not sep or not name.strip() or not value.strip():
                raise InputError(f"{where}, line {number}: expected NAME,CLASS (or NAME<TAB>CLASS), got {line!r}")
            items.append((name.strip(), value.strip(), f"{where}, line {number}"))
    targets: dict[str, int] = {}
    for name, value, place in items:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise InputError(f"{place}: a class is an index or a class name, got {value!r}")
        text_value = str(value).strip()
        if text_value.isdigit():
            index = int(text_value)
        else:
            index = class_by_name(text_value, labels, option="--target-file") if labels else None
            if index is None:
                names = "an index or a class name of --labels" if labels else "an index (class names need --labels)"
                raise InputError(f"{place}: the class {text_value!r} is not {names}")
        key = Path(name).name
        if key in targets:
            raise InputError(f"{place}: {key!r} is given twice")
        targets[key] = index
    return targets


def plain_text(doc: str | None) -> str:
    """A module docstring as plain text for ``--help``: ``code`` and :role:`~a.b.name` markup removed."""

    def role(match: re.Match) -> str:
        text = match.group(2)
        return text.rsplit(".", 1)[-1] if match.group(1) else text

    text = re.sub(r":[a-z]+:`(~?)([^`]+)`", role, doc or "")
    return text.replace("``", "")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N, mps")


def optimizer_config(args: argparse.Namespace, default_schedule: str = "paper"):
    """An :class:`OptimizerConfig` from the parsed RDE options (``--schedule`` or ``default_schedule``)."""
    from amortized_cartoonx.optimizer import OptimizerConfig

    return OptimizerConfig(
        schedule=args.schedule or default_schedule,
        steps=args.steps,
        num_samples=args.samples,
        lr=args.lr,
        parametrisation=args.parametrisation,
        precision=args.precision or "fp32",
        l1_lambda=args.l1_lambda,
        obfuscation=args.obfuscation,
        distortion=args.distortion,
        link=args.link,  # set by fill_defaults
        chunk_size=args.chunk_size,
        seed=args.seed,
    ).validate()


def build_optimizer(method: str, classifier, args: argparse.Namespace):
    """The exact optimizer for ``method`` (cartoonx or pixel-rde) from the parsed options."""
    from amortized_cartoonx.optimizer import CartoonX, PixelRDE

    config = optimizer_config(args)
    if method == "pixel-rde":
        return PixelRDE(classifier, config=config)
    return CartoonX(classifier, wave=args.wavelet, levels=args.levels, mode=args.mode, config=config)


def check_output_folder(out: str | Path, inputs: Sequence[Path] = (), outputs: Sequence[Path] = ()) -> Path:
    """Check, before any work, that ``out`` can be created and written to and that no input is overwritten.

    Nothing is created (a command that fails later on bad input leaves no empty folder): the folder itself, or
    its nearest existing parent, gets a probe file that is removed at once. Raises ``ConfigError`` (one line)
    when ``out`` or a parent is a file, cannot be written to, or when one of ``outputs`` (the files the command
    will write) is one of ``inputs``.
    """
    from amortized_cartoonx.errors import ConfigError

    out = Path(out).expanduser()
    protected = {Path(p).expanduser().resolve() for p in inputs}
    for path in outputs:
        if Path(path).expanduser().resolve() in protected:
            raise ConfigError(f"--out {out} would overwrite the input {path}: choose another output folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".cartoonx-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    return out
