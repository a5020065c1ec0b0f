"""Safe, atomic file output and dataclass <-> JSON configs for exported models.

Everything a run directory holds is written to a temporary name in the same folder,
flushed to disk, then renamed: a killed process leaves either the old file or the new
one, never half of one. Nothing here unpickles.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import functools
import json
import os
import tempfile
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CONFIG_FORMAT_VERSION = 1


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


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON types (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def save_config(config: Any, path: str | Path, kind: str) -> Path:
    payload = {"kind": kind, "format_version": CONFIG_FORMAT_VERSION, **config_to_dict(config)}
    return atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def load_config(cls: type[T], path: str | Path, kind: str) -> T:
    """Read a config written by `save_config`, refusing anything that is not exactly `cls`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No config file at {path}: export the model with save_pretrained first."
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-export the model.") from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        raise ValueError(f"{path} does not describe a {kind} (kind={payload.get('kind')!r}).")
    version = payload.pop("format_version", None)
    if version != CONFIG_FORMAT_VERSION:
        raise ValueError(
            f"{path} has config format version {version!r}; this code reads version "
            f"{CONFIG_FORMAT_VERSION}. Upgrade the package or re-export the model."
        )
    payload.pop("kind")
    return dataclass_from_dict(cls, payload, where=str(path))


def dataclass_from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build a (possibly nested) dataclass from plain values, checking names and types."""
    return cls(**_checked_fields(cls, values, where))


def _checked_fields(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` for the fields of dataclass `cls`, each coerced to its declared type; a
    ValueError naming the field for an unknown name or a value of the wrong type."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        close = sorted({m for name in unknown for m in difflib.get_close_matches(name, names, 1)})
        hint = f" (did you mean {close}?)" if close else ""
        raise ValueError(
            f"{where}: unknown field(s) {unknown} for {cls.__name__}; remove them or fix their "
            f"spelling{hint}."
        )
    hints = typing.get_type_hints(cls)
    return {name: _coerce(hints[name], value, f"{where}: {name}") for name, value in values.items()}


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):  # a dict, or Hydra's DictConfig
            raise ValueError(f"{where} must be an object, got {type(value).__name__}.")
        return dataclass_from_dict(hint, dict(value), where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if errors else f"{where} has an invalid value {value!r}.")
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str | bytes):  # or ListConfig
            raise ValueError(f"{where} must be a list, got {type(value).__name__}.")
        args = typing.get_args(hint)
        item_hint = args[0] if args else Any
        return tuple(_coerce(item_hint, item, where) for item in value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ValueError(f"{where} must be {hint.__name__}, got {value!r}.")
    return value


def mismatched_tensors(state: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Names of tensors missing on either side or of another shape, sorted: what makes a
    weights file and a config (or a checkpoint and a model) not belong together."""
    return sorted(
        name
        for name in set(state) | set(expected)
        if name not in state or name not in expected or state[name].shape != expected[name].shape
    )


def checked_config(where: str) -> Callable[[type[T]], type[T]]:
    """Make a config dataclass refuse unknown fields and values of the wrong type however it is
    built (Hydra's instantiate, code, JSON), before its __post_init__ runs, with a sentence that
    names the field: `where` is the config's place, such as "data" or "tokenizer.model"."""

    def decorate(cls: type[T]) -> type[T]:
        init = cls.__init__
        names = [f.name for f in dataclasses.fields(cls) if f.init]

        @functools.wraps(init)
        def checked_init(self, *args: Any, **kwargs: Any) -> None:
            positional = _checked_fields(cls, dict(zip(names, args, strict=False)), where)
            extra = args[len(names) :]  # too many arguments: left for __init__'s own TypeError
            init(self, *positional.values(), *extra, **_checked_fields(cls, kwargs, where))

        cls.__init__ = checked_init
        return cls

    return decorate
