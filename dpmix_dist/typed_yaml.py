"""Typed YAML configs, generic: frozen dataclasses (one per YAML section) filled from a YAML file and dotted
`section.key=value` overrides. Unknown keys and wrong types are errors that name the key; nothing here knows
what the sections mean (dpmix_dist/config.py and dpmix_dist/synthetic/config.py define them).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from dpmix_dist.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def fail_key(key: str, message: str) -> None:
    """Raise the ConfigError for setting `key`: `KEY: MESSAGE` (the message says the fix)."""
    raise ConfigError(f"{key}: {message}")


def check_bounds(section: str, obj: Any, **bounds: str) -> None:
    """Fail naming `section.NAME` for the first `NAME="> 0"` / `NAME=">= 1"` bound that `obj.NAME` misses (NaN
    misses every bound)."""
    for name, bound in bounds.items():
        op, limit = bound.split()
        value = getattr(obj, name)
        if not (value > float(limit) if op == ">" else value >= float(limit)):
            fail_key(f"{section}.{name}", f"must be {bound}, got {value}")


def resolve_config_path(name: str, config_dir: Path = CONFIG_DIR) -> Path:
    """`NAME`, `NAME.yaml` (in `config_dir`) or a path to a YAML file."""
    candidates = [Path(name), config_dir / name, config_dir / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    available = ", ".join(sorted(p.stem for p in config_dir.glob("*.yaml")))
    raise ConfigError(f"--config {name}: no such file or shipped config (shipped: {available})")


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` converted to `annotation`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [a for a in options if a is not type(None)]
        return _check_type(key, value, inner)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            fail_key(key, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            fail_key(key, f"must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail_key(key, f"must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-5 without a dot as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail_key(key, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            fail_key(key, f"must be finite, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            fail_key(key, f"must be a string, got {value!r}")
        return value
    if origin is tuple:  # tuple[X, ...]: a YAML list
        (inner, _) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            fail_key(key, f"must be a list, got {value!r}")
        return tuple(_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    raise TypeError(f"unsupported config type {annotation} for {key}")  # a bug in this file, not user input


def build_dataclass(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            where = f"{prefix}{key}"
            fail_key(where, f"unknown key (valid keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key, value, hint = f"{prefix}{f.name}", raw[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                fail_key(key, f"must be a mapping (a YAML section), got {value!r}")
            kwargs[f.name] = build_dataclass(hint, value, f"{key}.")
        else:
            kwargs[f.name] = _check_type(key, value, hint)
    return cls(**kwargs)


def apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. privacy.target_epsilon=2")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""


def load_yaml_config(cls: type, name: str, overrides: list[str] | tuple[str, ...] = (), config_dir: Path = CONFIG_DIR):
    """Read `config_dir/NAME.yaml` (or a path), apply `section.key=value` overrides, validate into `cls`."""
    path = resolve_config_path(name, config_dir)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.object[exc.start]:#04x} at position {exc.start}); "
                          "a config is YAML text: save it as UTF-8, or check that the path names the config "
                          "and not another file") from None  # fmt: skip
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        sections = ", ".join(f"{f.name}:" for f in dataclasses.fields(cls))
        raise ConfigError(f"{path}: must hold a mapping of sections ({sections})")
    for override in overrides:
        apply_override(raw, override)
    return build_dataclass(cls, raw, "")
