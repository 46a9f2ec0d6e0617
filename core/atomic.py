"""Atomic file writes: write a temporary file in the same folder, fsync, rename over the target.

A reader (or a resumed run) sees either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (0o666 less the umask); ``mkstemp``
    makes its files private (0o600), which would make every result readable by its owner only."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_MODE = _file_mode()


def _fsync(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync(path.parent)


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text), "w")


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def torch_save(obj: Any, path: Path) -> None:
    import torch

    _atomic(path, lambda f: torch.save(obj, f), "wb")


def write_with(path: Path, save: Callable[[str], None]) -> None:
    """Atomically write a file produced by ``save(filename)`` (e.g. matplotlib's savefig): the
    temporary file is synced before the rename, and the folder after it, as for the others."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        save(tmp)
        _fsync(tmp)
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync(path.parent)
