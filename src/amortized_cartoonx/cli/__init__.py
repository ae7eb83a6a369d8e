"""The ``cartoonx`` command. Sub-command modules are import-light: heavy imports happen in ``run``.

``cartoonx --help`` must answer fast, so nothing here imports torch or Lightning.
"""

from __future__ import annotations

import errno
import importlib
import logging
import sys

from .common import Parser

#: sub-command -> module (each defines ``add_parser(subparsers)`` which sets ``run``).
COMMANDS = {
    "explain": "amortized_cartoonx.cli.explain",
    "fit": "amortized_cartoonx.cli.fit",
    "evaluate": "amortized_cartoonx.cli.evaluate",
    "targets": "amortized_cartoonx.cli.targets",
    "train-classifier": "amortized_cartoonx.cli.train_classifier",
    "demo": "amortized_cartoonx.cli.demo",
}


def build_parser() -> Parser:
    parser = Parser(
        prog="cartoonx",
        description="CartoonX explanations of image classifiers: exact optimizer, amortized explainer, evaluation.",
    )
    from amortized_cartoonx import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def configure_logging() -> None:
    """``cartoonx: message`` lines on stderr at INFO, without Lightning's advertising tips."""
    logging.basicConfig(level=logging.INFO, format="cartoonx: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DropTips) for f in handler.filters):
            handler.addFilter(_DropTips())


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from amortized_cartoonx.allocator import tune_cpu_allocator

    tune_cpu_allocator()  # CPU steps reuse freed memory instead of faulting in fresh pages (see allocator.py)
    if argv[:1] == ["fit"]:  # LightningCLI parses every argument of fit itself (its --help included)
        return importlib.import_module(COMMANDS["fit"]).main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    configure_logging()
    from amortized_cartoonx.errors import CartoonXError

    try:
        return int(args.run(args) or 0)
    except CartoonXError as exc:
        print(f"cartoonx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cartoonx {args.command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if not _peer_failed(exc):
            raise
        print(
            f"cartoonx {args.command}: error: another process of this run stopped (its own error is above): "
            f"{' '.join(str(exc).split())[:200]}",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:  # the disk: full, read-only, failing (what is written so far resumes)
        if exc.errno not in _DISK_ERRORS:
            raise  # anything else keeps its traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"cartoonx {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


#: The ``errno`` values of a disk that cannot take the outputs, reported in one line.
_DISK_ERRORS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EIO", "EACCES", "EPERM") if hasattr(errno, name)
)


def _peer_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is this process's side of another DDP process's failure (gloo's "Connection closed by
    peer", a torch ``DistBackendError``): that process printed the real error, this one should not add a
    traceback."""
    distributed = getattr(sys.modules.get("torch"), "distributed", None)
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return False
    return type(exc).__name__ == "DistBackendError" or "Connection closed by peer" in str(exc)


if __name__ == "__main__":  # python -m amortized_cartoonx.cli
    sys.exit(main())
