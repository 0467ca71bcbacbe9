"""Typed YAML configs, generic: frozen dataclasses (one per YAML section) filled from a YAML file and dotted
`section.key=value` overrides. Unknown keys and wrong types are errors that name the key; nothing here knows
what the sections mean (dpmix_dist/config.py and dpmix_dist/synthetic/config.py define them).

A setting that does something only under other choices of its section declares them (`only_when` metadata); where
they do not hold, writing it is an error, even at its default value: the loader knows which keys the YAML and the
overrides wrote, which a dataclass default cannot tell. An override `KEY=null` removes KEY, so its default applies
(for a field that may be null, the default is null): how a key written in the YAML file is taken out on the command
line.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

import yaml

from dpmix_dist.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
UNSET = object()  # what an override KEY=null leaves in the raw mapping: KEY is checked, then not given


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
        if raw.get(f.name, UNSET) is UNSET:
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
        if node.get(part) is UNSET:  # a section removed by an earlier SECTION=null
            node[part] = {}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    value = yaml.safe_load(text) if text.strip() else ""
    node[parts[-1]] = UNSET if value is None else value  # null: back to the default (see the module docstring)


def given_keys(raw: dict[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys of the settings that `raw` (YAML plus overrides) sets; a mapping is a section."""
    keys = set()
    for key, value in raw.items():
        if isinstance(value, dict):
            keys |= given_keys(value, f"{prefix}{key}.")
        elif value is not UNSET:
            keys.add(f"{prefix}{key}")
    return keys


def only_when(**conditions: Any) -> dict[str, Any]:
    """Field metadata of a setting that does something only under other choices of its section: each named setting
    must have one of the given values (a tuple: any of them; a list-valued setting must hold one of them)."""
    return {"only_when": {name: v if isinstance(v, tuple) else (v,) for name, v in conditions.items()}}


def _text(value: Any) -> str:
    """A value as YAML writes it (true, [crop, flip])."""
    if isinstance(value, tuple):
        return f"[{', '.join(map(_text, value))}]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def unused_settings(config: Any, prefix: str = "") -> dict[str, str]:
    """Dotted key -> why it does nothing, for each setting (sections walked) whose `only_when` does not hold."""
    unused = {}
    for f in dataclasses.fields(config):
        if dataclasses.is_dataclass(value := getattr(config, f.name)):
            unused |= unused_settings(value, f"{prefix}{f.name}.")
        for name, allowed in f.metadata.get("only_when", {}).items():
            current = getattr(config, name)
            if not set(current if isinstance(current, tuple) else (current,)) & set(allowed):
                needed = "/".join(map(_text, allowed))
                needed = f" with {needed}" if isinstance(current, tuple) else f"={needed}"
                why = f"only {prefix}{name}{needed} uses it, not {prefix}{name}={_text(current)}"
                unused[f"{prefix}{f.name}"] = why
                break
    return unused


def refuse_unused(config: Any, given: Collection[str] | None) -> None:
    """Refuse each unused setting that `given` holds, i.e. that the YAML or an override wrote, even at its default;
    with `given` None (a config built in code: its `__post_init__`), each that differs from its default."""
    for key, why in unused_settings(config).items():
        if given is None:  # built in code: only a value other than the default shows that the setting was set
            *path, name = key.split(".")
            section = functools.reduce(getattr, path, config)
            (f,) = [f for f in dataclasses.fields(section) if f.name == name]
            if getattr(section, name) == (f.default_factory() if f.default is dataclasses.MISSING else f.default):
                continue
        elif key not in given:
            continue
        fail_key(key, f"does nothing here: {why}; remove it (on the command line: {key}=null)")


def build_config(cls: type, raw: dict[str, Any]) -> Any:
    """`raw` (YAML plus overrides) into `cls`; an unused setting that `raw` writes is refused (`refuse_unused`)."""
    config = build_dataclass(cls, raw, "")
    refuse_unused(config, given_keys(raw))
    return config


def dump_yaml(config: Any) -> str:
    """`config` as YAML, in field order, without its unused settings: they hold their defaults (and written, they
    would be refused), so the text loads back to an equal config."""
    raw = dataclasses.asdict(config)
    for key in unused_settings(config):
        *path, name = key.split(".")
        del functools.reduce(dict.__getitem__, path, raw)[name]
    return yaml.safe_dump(raw, sort_keys=False)


def load_yaml_config(cls: type, name: str, overrides: list[str] | tuple[str, ...] = (), config_dir: Path = CONFIG_DIR):
    """Read `config_dir/NAME.yaml` (or a path), apply `section.key=value` overrides, validate into `cls`."""
    path = resolve_config_path(name, config_dir)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {exc.object[exc.start]:#04x} at position {exc.start}); "
            "a config is YAML text: save it as UTF-8, or check that the path names the config "
            "and not another file"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        sections = ", ".join(f"{f.name}:" for f in dataclasses.fields(cls))
        raise ConfigError(f"{path}: must hold a mapping of sections ({sections})")
    for override in overrides:
        apply_override(raw, override)
    return build_config(cls, raw)
