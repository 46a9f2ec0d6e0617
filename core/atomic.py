"""Atomic file writes: write a temporary file in the same folder, fsync, rename over the target.

A reader (or a resumed run) sees either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import errno
import json
import math
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


# What the file system says when a write cannot be made: the user can act on these.
_ENVIRONMENT = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _environment_error(path: Path, error: OSError) -> Exception:
    """A TricksError for a write the file system refused (full, read-only, not allowed); any
    other OSError is left as it is."""
    from .errors import TricksError

    if error.errno not in _ENVIRONMENT:
        return error
    return TricksError(f"cannot write {path} ({error.strerror}); the previous version, if any, is kept: "
                       "free space or fix the permissions and resume, or choose another --out")


def _atomic(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise _environment_error(path, error) from None
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError):
            raise _environment_error(path, error) from None
        raise
    _fsync(path.parent)


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None: JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text), "w")


def dumps(obj: Any, **kwargs: Any) -> str:
    """JSON text of ``obj``, non-finite numbers written as null (strict JSON, never bare NaN)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(dumps(r) + "\n" for r in rows))


def torch_save(obj: Any, path: Path) -> None:
    import torch

    _atomic(path, lambda f: torch.save(obj, f), "wb")


def write_with(path: Path, save: Callable[[str], None]) -> None:
    """Atomically write a file produced by ``save(filename)`` (e.g. matplotlib's savefig): the
    temporary file is synced before the rename, and the folder after it, as for the others."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as error:
        raise _environment_error(path, error) from None
    os.close(fd)
    try:
        save(tmp)
        _fsync(tmp)
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise _environment_error(path, error) from None
        raise
    _fsync(path.parent)


def hold_lock(folder: Path, what: str, fix: str):
    """Hold an exclusive ``flock`` on ``FOLDER/.lock`` (creating the folder) and write this
    process's PID into it; the operating system releases it when the process ends, however it
    ends. Another holder makes this a TricksError naming its PID; close the returned handle to
    release. ``what`` names the folder's use (``the run directory``), ``fix`` the way out."""
    import errno
    import fcntl

    from .errors import TricksError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TricksError(f"{folder} is a file, not a folder for {what}; choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".lock", "a+")
    except OSError as error:
        raise TricksError(f"cannot write {what} {folder} ({error.strerror or error}); "
                          "choose an --out where you can write") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.seek(0)
        pid = handle.read().strip() or "unknown"
        handle.close()
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise TricksError(f"cannot lock {what} {folder} ({error.strerror}); choose an --out on a local disk") from None
        raise TricksError(f"{what} {folder} is in use by process {pid}; {fix}") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    except OSError as error:
        handle.close()
        raise TricksError(f"cannot write {what} {folder} ({error.strerror or error}); "
                          "free space or choose another --out") from None
    return handle
