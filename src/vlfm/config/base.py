"""Dataclass configs from nested dicts: unknown keys and wrong types are errors (a typo must never silently fall
back to a default), and `a.b.c=value` overrides change single fields."""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from typing import Any

import yaml

from vlfm.io import ConfigError

__all__ = ["apply_overrides", "check_choice", "check_name", "check_range", "check_ranges", "from_dict", "parse_yaml", "to_dict"]

log = logging.getLogger("vlfm")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


# A numeric field's allowed range, by name: what a config section's RANGES table (field -> rule) says.
RANGES = {
    ">= 1": lambda v: v >= 1,
    ">= 0": lambda v: v >= 0,
    "> 0": lambda v: v > 0,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
}


def check_range(key: str, value, rule: str) -> None:
    """A finite number within `rule` (a RANGES name); otherwise a ConfigError naming the key, value and range."""
    if isinstance(value, (list, tuple)):
        for item in value:
            check_range(key, item, rule)
    elif value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and RANGES[rule](value)):
        raise ConfigError(f"{key}={value!r} is out of range: it must be {rule}")


def check_ranges(section, prefix: str, table: dict[str, str]) -> None:
    """Every field a section's table names within its range (None: unset, allowed); `prefix` names the section."""
    for name, rule in table.items():
        check_range(f"{prefix}{name}", getattr(section, name), rule)


def check_name(key: str, value: str) -> None:
    """A run name is one plain directory name under output_dir."""
    if not value.strip() or "/" in value or "\\" in value or value in (".", "..") or len(value) > 200 or "\0" in value:
        raise ConfigError(f"{key}={value[:60]!r}{'...' if len(value) > 60 else ''} ({len(value)} characters) must be a "
                          "plain directory name: not empty, no '/', at most 200 characters")


def parse_yaml(text: str, where: str):
    """YAML text; a syntax error is one ConfigError naming `where` and the line and column (1-based)."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as error:  # ValueError: a date such as 2024-13-45
        mark = getattr(error, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or getattr(error, "reason", None) or str(error) or type(error).__name__
        raise ConfigError(f"{where}{at}: not valid YAML ({' '.join(str(problem).split())})") from None


def from_dict(cls, data: dict[str, Any] | None, prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys raise ConfigError naming them. Keys of earlier
    versions are translated first (a section's `RENAMED` table, or its `upgrade(data)`), so older runs load."""
    data = upgrade(cls, dict(data or {}), prefix)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys under {prefix.rstrip('.') or 'the top level'}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping, got {value!r}")
            kwargs[name] = from_dict(hint, value, f"{prefix}{name}.")
        elif _dataclass_list(hint):
            kwargs[name] = _dataclass_items(typing.get_args(hint)[0], value, f"{prefix}{name}")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as error:
        raise ConfigError(f"{prefix or 'config'}: {error}") from None
    except ValueError as error:  # a section's own check (WorldConfig's ranges, ...): its message names the key
        raise ConfigError(str(error)) from None


def upgrade(cls, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in data:
            log.warning("config key %s%s is now %s%s", prefix, old, prefix, new)
            data.setdefault(new, data.pop(old))
    return cls.upgrade(data) if hasattr(cls, "upgrade") else data


def _dataclass_list(hint) -> bool:
    """list[SomeDataclass]: a YAML list of mappings, each built with from_dict."""
    args = typing.get_args(hint)
    return typing.get_origin(hint) is list and len(args) == 1 and dataclasses.is_dataclass(args[0])


def _dataclass_items(cls, value, key: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list, got {value!r}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"{key}[{i}] must be a mapping, got {item!r}")
        out.append(from_dict(cls, item, f"{key}[{i}]."))
    return out


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v for k, v in items})


def _coerce(value, hint, key: str):
    """Check a YAML/JSON value against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _coerce(value, hint, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}")
    if origin in (list, tuple) and not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list, got {value!r}")
    if origin is tuple and args and Ellipsis not in args and len(value) != len(args):
        raise ConfigError(f"{key} must hold {len(args)} values, got {value!r}")
    if origin in (list, tuple) and args:  # each item checked as the list's item type
        return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = parse_yaml(raw, f"override {item!r}")
    return data
