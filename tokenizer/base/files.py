"""Safe, atomic file output: every file a run directory holds is written through here.

Each file is written to a temporary name in the same folder,
flushed to disk, then renamed: a killed process leaves either the old file or the new
one, never half of one. Nothing here unpickles.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


class WriteError(OSError):
    """A file of the run directory could not be written; the message says which and what to do."""

    def __str__(self) -> str:
        return self.strerror


_WRITE_FIXES = {
    errno.ENOSPC: "free space",
    errno.EDQUOT: "free space or raise the disk quota",
    errno.EROFS: "choose a run_dir on a writable file system",
    errno.EACCES: "make the folder writable or choose another run_dir",
    errno.EPERM: "make the folder writable or choose another run_dir",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another run_dir",
    errno.EEXIST: "a part of the path is a file, not a folder: choose another run_dir",
}


def _write_fix(error: OSError) -> str:
    return _WRITE_FIXES.get(error.errno, "fix the cause")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, fsync the result, then rename it onto `path`.

    On an OSError (disk full, read-only or missing folder) the old file at `path` is left as it
    was, the temporary one is removed, and a WriteError says what to do.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp_name)
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as error:
        raise WriteError(
            error.errno,
            f"{error.strerror or error} while writing {path}: {_write_fix(error)} and run the "
            "same command again; nothing was replaced.",
        ) from error
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that atomic_write leaves when it is killed; they are never read."""
    strays = sorted(Path(folder).glob(".*.tmp"))
    for stray in strays:
        stray.unlink(missing_ok=True)
    return strays


def check_writable(run_dir: str | Path) -> None:
    """Fail with one sentence, before any work, where run_dir cannot be created or written."""
    try:
        probe = atomic_write_bytes(Path(run_dir) / ".write-check", b"")
    except WriteError as error:
        cause = error.__cause__
        raise WriteError(
            error.errno,
            f"run_dir={run_dir} cannot be written ({cause.strerror or cause}): "
            f"{_write_fix(cause)}, then run the same command again.",
        ) from cause
    probe.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
