"""Typed experiment configs: YAML files in configs/ parsed into dataclasses, every field overridable from
the command line as `key=value` (dotted keys for nested fields). Unknown keys and wrong types are
rejected with the key's name, before any work starts.

Written by hand because none of our dependencies does strict dataclass <- YAML with dotted overrides
(OmegaConf would, but it is one more dependency for ~80 lines).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from thinktok.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A config that does not match its dataclass: names the key."""


def _check(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: {value!r} matches none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (Any, Any)
        return {k: _check(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    return cls(**{k: _check(v, hints[k], prefix + k) for k, v in data.items()})


def set_dotted(data: dict, key: str, value: Any) -> None:
    *path, last = key.split(".")
    for part in path:
        node = data.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a mapping")
        data = node
    data[last] = value


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """YAML file (or nothing: the dataclass defaults) + `key=value` overrides -> a checked config."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    config = from_dict(cls, data)
    validate = getattr(config, "validate", None)
    if validate:
        validate()
    return config


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def field_help(cls) -> dict[str, str]:
    """Each field's help: the comment on its line, else the comment lines right above it. Read from the
    source, so the help `--help-config` prints is the comment a developer reads (one text, not two)."""
    import inspect
    import io
    import tokenize

    source = inspect.getsource(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    # line -> its comment (a "#" inside a string is none)
    comment = {t.start[0]: t.string.lstrip("# ").strip() for t in tokens if t.type == tokenize.COMMENT}
    helps, above = {}, []
    for n, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(comment.get(n, stripped.lstrip("# ")))
            continue
        name = stripped.split(":", 1)[0].strip()
        if name in names and ":" in stripped:
            helps[name] = comment.get(n) or " ".join(above)
        above = []
    return helps


def describe(cls, prefix: str = "") -> list[str]:
    """Every field of a config dataclass, nested ones dotted: `key: type = default  help`."""
    out = []
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += describe(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = tp.__name__ if typing.get_origin(tp) is None and hasattr(tp, "__name__") else str(tp)
        name = name.replace("typing.", "")
        out.append(f"{prefix}{f.name}: {name} = {default!r}  {helps.get(f.name, '')}".rstrip())
    return out
