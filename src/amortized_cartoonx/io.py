"""Atomic file writes: a temporary file beside the target, then a rename. Never a half-written file."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import one_line


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f"{path.suffix}.tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}(\.[^.]+)?\.tmp$")  # tempfile.mkstemp's 8 random characters

#: A temporary file of :func:`atomic_path` older than this (seconds) belongs to a writer that died (SIGKILL, a
#: crash: no ``finally`` ran); a live one is renamed within seconds.
STALE_AFTER = 3600.0


def remove_stale_temporaries(folder: str | Path, recursive: bool = False, older_than: float = STALE_AFTER) -> int:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` (and below, if ``recursive``) when its
    process was killed, if older than ``older_than`` seconds: a run going on beside, in the same folder, keeps
    its own. Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    now, removed = time.time(), 0
    for path in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        if not _TEMPORARY.match(path.name):  # only atomic_path's names: .<stem>.<8 random><suffix>.tmp
            continue
        try:
            if path.is_file() and now - path.stat().st_mtime > older_than:
                path.unlink()
                removed += 1
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
    return removed


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path``.

    A writer library's own error for a failed write (safetensors': ``I/O error: No space left on device (os error
    28)``) is raised as an :class:`OSError` naming ``path``, as Python's own writes fail."""
    with atomic_path(path) as tmp:
        try:
            write(tmp)
        except OSError:
            raise
        except Exception as exc:
            if "(os error " in str(exc) or "IoError(" in str(exc):  # the forms safetensors' errors take
                raise OSError(errno.EIO, f"cannot write {path}: {one_line(exc)}") from exc
            raise


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (identifies a model file or checkpoint by content)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
