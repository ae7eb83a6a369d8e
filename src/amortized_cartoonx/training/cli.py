"""``cartoonx fit``: PyTorch Lightning's ``LightningCLI`` for :class:`~.module.AmortizedCartoonXModule` and
:class:`~.data.MaskPredictorDataModule`.

The CLI is customised through LightningCLI's public API only: :meth:`~FitCLI.add_arguments_to_parser` adds the
run's options (``--run_name``, ``--checkpoint_dir``, ``--log_dir``, ``--wandb_project``) and links
``data.image_size`` to ``model.image_size``; :meth:`~FitCLI.instantiate_trainer` passes the run's checkpoints,
loggers and callbacks (:func:`~.trainer.trainer_arguments`, shared with the demo) as custom Trainer arguments.
:func:`fit_config` writes the config of a run built in Python (the demo's), so ``cartoonx fit`` can repeat it.
"""

from __future__ import annotations

import logging
import os
import sys

from ..errors import ConfigError
from ..runtime import ignore_lightning_noise, lightning_interrupts
from .data import MaskPredictorDataModule
from .module import AmortizedCartoonXModule
from .trainer import RunOutputs, default_run_name, default_run_stamp, trainer_arguments

logger = logging.getLogger(__name__)

#: What ``cartoonx fit --help`` says first (instead of ``Trainer.fit``'s generic first docstring line).
FIT_DESCRIPTION = (
    "cartoonx fit: train the amortized CartoonX explainer (the mask predictor network) on an image folder with "
    "the RDE loss, plus distillation when teacher masks are given; checkpoints for --checkpoint of cartoonx "
    "explain and evaluate."
)


def _make_cli_class(trainers: list | None = None):
    """The LightningCLI subclass (built lazily: importing :mod:`pytorch_lightning.cli` pulls in jsonargparse).

    ``trainers``: a list the Trainer it builds is appended to (so the caller can tell an interrupted run).
    """
    from pytorch_lightning.cli import LightningCLI

    class FitCLI(LightningCLI):
        """``cartoonx fit``: LightningCLI with the project's checkpoints and loggers as defaults.

        Adds ``--run_name`` (default: ``<config stem>-<timestamp>``), ``--checkpoint_dir`` (default
        ``checkpoints``: best by ``val/rde_loss`` and last go to ``<checkpoint_dir>/<run_name>/``), ``--log_dir``
        (default ``logs``) and ``--wandb_project``. Unless the config sets ``trainer.logger``, it logs to wandb
        (offline unless WANDB_MODE says otherwise) and CSV.
        """

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--run_name", type=str | None, default=None, help="name of the run (folders, wandb)")
            parser.add_argument("--checkpoint_dir", type=str, default="checkpoints", help="checkpoints go below")
            parser.add_argument("--log_dir", type=str, default="logs", help="CSV and wandb logs go below")
            parser.add_argument("--wandb_project", type=str, default="amortized-cartoonx", help="wandb project")
            parser.link_arguments("data.image_size", "model.image_size")

        def parse_arguments(self, parser, args) -> None:
            """Parse, then check ``--ckpt_path`` (:func:`check_resume_checkpoint`) before LightningCLI copies the
            file's hyper-parameters into the model's config."""
            super().parse_arguments(parser, args)
            subcommand = self.config.get("subcommand")
            if subcommand:
                check_resume_checkpoint(self.config[subcommand])

        def run_outputs(self) -> RunOutputs:
            """The run's folders from the parsed options."""
            config = self.config.get(str(self.subcommand), self.config)  # the subcommand's options
            return RunOutputs(
                run_name=config.get("run_name") or default_run_name(config.get("config")),
                checkpoint_dir=config.get("checkpoint_dir"),
                log_dir=config.get("log_dir"),
                wandb_project=config.get("wandb_project"),
            )

        def instantiate_trainer(self, **kwargs):
            """The Trainer of the parsed ``trainer`` options, with the run's checkpoints, loggers and callbacks."""
            config = self.config_init.get(str(self.subcommand), self.config_init)
            outputs = self.run_outputs()
            settings = {**dict(config.get("trainer") or {}), **kwargs}
            check_trainer_limits(settings)
            logger.info("run %s: checkpoints in %s", outputs.run_name, outputs.checkpoint_folder)
            trainer = super().instantiate_trainer(**trainer_arguments(outputs, settings))
            if trainers is not None:
                trainers.append(trainer)
            return trainer

    return FitCLI


#: ``--ckpt_path`` values that Lightning resolves itself from the run's checkpoints (not file paths).
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


def _option(config: object, key: str) -> object:
    """``config[key]`` of a jsonargparse Namespace, a dict or a dataclass (None when absent)."""
    if config is None:
        return None
    getter = getattr(config, "get", None)
    return getter(key) if callable(getter) else getattr(config, key, None)


def check_resume_checkpoint(config: object) -> None:
    """Check ``fit``'s ``--ckpt_path`` before LightningCLI reads the file's settings into the model's config.

    A checkpoint must be a local file this package can read (:func:`~amortized_cartoonx.checkpoint.read_checkpoint`:
    ``weights_only=True``, one-line errors; Lightning would unpickle a URL with ``weights_only=False``), read
    with ``--weights_only true``, and name the classifier and the backbone the config names: LightningCLI would
    otherwise import and call the spec the *file* names, and code is imported only from a spec the user types.

    Raises:
        ConfigError: a URL, ``--weights_only false``, or another classifier or backbone spec.
        InputError: a file that is no readable checkpoint.
    """
    ckpt_path = _option(config, "ckpt_path")
    if not ckpt_path or str(ckpt_path) in LIGHTNING_CKPT_NAMES:
        return
    if "://" in str(ckpt_path):
        raise ConfigError(
            f"--ckpt_path {ckpt_path}: resume from a local file (download it first; Lightning would unpickle a "
            "remote checkpoint with weights_only=False)"
        )
    if str(ckpt_path).startswith("http"):  # Lightning fetches any path that starts so as a URL
        raise ConfigError(
            f"--ckpt_path {ckpt_path}: Lightning reads a path starting with 'http' as a URL; write ./{ckpt_path}"
        )
    if _option(config, "weights_only") is False:
        raise ConfigError("--weights_only false is refused: checkpoints are read with weights_only=True")
    if hasattr(config, "__setitem__"):
        config["weights_only"] = True  # Lightning's own read of the file, at Trainer.fit
    from ..checkpoint import read_checkpoint

    # validated: a readable cartoonx checkpoint, tensors and plain values only
    loaded = read_checkpoint(ckpt_path)
    hparams = loaded.hyper_parameters
    model = _option(config, "model")
    if "_class_path" in hparams:
        raise ConfigError(f"--ckpt_path {ckpt_path} names a model class; resuming takes the class cartoonx fit trains")
    given = {
        "classifier": _option(model, "classifier"),
        "backbone": _option(_option(model, "mask_predictor"), "backbone"),
    }
    recorded = {"classifier": hparams.get("classifier"), "backbone": _option(hparams.get("mask_predictor"), "backbone")}
    options = {"classifier": "--model.classifier", "backbone": "--model.mask_predictor.backbone"}
    for name, value in recorded.items():
        if value != given[name]:
            raise ConfigError(
                f"--ckpt_path {ckpt_path} was trained with {name} {value!r}, but the config names {given[name]!r}: "
                f"resume with the same {name} ({options[name]}; a checkpoint never chooses the code that is imported)"
            )
    link = _option(model, "link") or "softmax"
    if link != loaded.meta["link"]:  # the resumed run would train the checkpoint's loss under another name
        raise ConfigError(
            f"--ckpt_path {ckpt_path} was trained with the {loaded.meta['link']} link, but the config names "
            f"{link!r}: resume with --model.link {loaded.meta['link']}"
        )


def check_trainer_limits(settings: dict) -> None:
    """Refuse step and epoch limits that would train nothing (0) or that Lightning would reject with a traceback."""
    for name in ("max_steps", "max_epochs"):
        value = settings.get(name)
        if value is not None and value != -1 and (isinstance(value, bool) or value < 1):
            raise ConfigError(f"--trainer.{name} must be -1 (no limit) or at least 1, got {value}")


def run_fit(args: list[str] | None) -> None:
    """Run ``LightningCLI`` for :class:`AmortizedCartoonXModule` and :class:`MaskPredictorDataModule`.

    ``args`` are the command-line arguments after ``cartoonx`` (starting with ``fit``); None reads ``sys.argv``.
    """
    os.environ.setdefault("WANDB_MODE", "offline")  # never a network call unless the user asks for one
    given = sys.argv[1:] if args is None else args
    if any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in given) and any(
        a.startswith("--model.") for a in given
    ):
        logger.warning(
            "resuming from --ckpt_path: the model's settings are the checkpoint's (LightningCLI reads them from "
            "it); the --model.* options given here are not applied"
        )
    default_run_stamp()
    ignore_lightning_noise()
    trainers: list = []
    cli_class = _make_cli_class(trainers)
    with lightning_interrupts(lambda: trainers[-1] if trainers else None):
        cli_class(
            AmortizedCartoonXModule,
            MaskPredictorDataModule,
            args=args,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            # parse errors raise (cartoonx fit prints one line) instead of printing the whole usage first
            parser_kwargs={
                "exit_on_error": False,
                "fit": {"default_env": False, "exit_on_error": False, "description": FIT_DESCRIPTION},
            },
            save_config_kwargs={"overwrite": True},
        )


def fit_config(
    module: AmortizedCartoonXModule,
    datamodule: MaskPredictorDataModule,
    trainer_settings: dict,
    outputs: RunOutputs,
    seed: int | bool = 0,
) -> dict:
    """The ``cartoonx fit --config`` file of a run built in Python (the demo's): the same module, data, Trainer
    settings and folders, so ``cartoonx fit --config`` repeats the run.

    Args:
        module, datamodule: built with plain keyword arguments (their ``hparams`` are the config's sections).
        trainer_settings: plain ``pl.Trainer`` arguments, without the run's loggers and callbacks.
        outputs: the run's folders.
        seed: what ``seed_everything`` was called with before the module was built.

    Raises:
        ConfigError: the module and the data module disagree on the image size (``cartoonx fit`` links them).
    """
    model = {k: v for k, v in module.hparams.items() if not k.startswith("_")}  # not LightningCLI's own keys
    data = {k: v for k, v in datamodule.hparams.items() if not k.startswith("_")}
    if model.pop("image_size") != data["image_size"]:
        raise ConfigError(f"the module's image_size {module.hparams.image_size} is not the data's {data['image_size']}")
    return {
        "seed_everything": seed,
        "run_name": outputs.run_name,
        "checkpoint_dir": outputs.checkpoint_dir,
        "log_dir": outputs.log_dir,
        "wandb_project": outputs.wandb_project,
        "trainer": dict(trainer_settings),
        "model": model,
        "data": data,
    }
