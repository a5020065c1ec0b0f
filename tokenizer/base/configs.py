"""Typed configs: dataclasses that refuse unknown fields and wrong types, and their JSON files.

A config reaches a model from Hydra's instantiate, from code or from an exported config.json;
`checked_config` makes each path refuse an unknown field or a value of the wrong type with a
sentence that names the field, and `save_config` / `load_config` round-trip a config through
JSON with its kind and format version, so one model's file is never read as another's.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tokenizer.base.files import atomic_write_text

T = TypeVar("T")

CONFIG_FORMAT_VERSION = 1


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
