"""Safe, atomic file output and dataclass <-> JSON configs for exported models.

Everything a run directory holds is written to a temporary name in the same folder,
flushed to disk, then renamed: a killed process leaves either the old file or the new
one, never half of one. Nothing here unpickles.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CONFIG_FORMAT_VERSION = 1


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, fsync the result, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


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
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; remove them.")
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _coerce(hints[name], value, f"{where}: {name}") for name, value in values.items()
    }
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be an object, got {type(value).__name__}.")
        return dataclass_from_dict(hint, value, where)
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
        if not isinstance(value, list | tuple):
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
