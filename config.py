"""The config system of train.py and eval.py: dataclasses, YAML files and `--a.b=value` overrides.

A config is a tree of dataclasses whose defaults are the papers' values (each module holds its
own). A YAML file overrides them, then the command line does:

    python train.py --cfg foveal_tiny.yaml --optim.lr=1e-3 --foveal.model.grid_z='[2.5, 3]'
    python train.py --cfg canvit_tiny.yaml --distill.model.backbone='{embed_dim: 64}'

An override is `--key=value` or `--key value`; a value is read as YAML (`1e-4`, `true`, `[1, 2]`,
`{a: 1}`), and a list may also be written `a,b,c`. An unknown key, a wrong type or a YAML
syntax error stops the program before any work, with a message naming the key (or the file and
line). Nothing here knows train.py's or eval.py's fields.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A bad config: the message names the key, the value and what is allowed."""


def _coerce(value, typ, key: str):
    """Check (and, for strings from the command line or YAML's '1e-4', convert) one value."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        typ = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (tuple, list):
        if isinstance(value, str):
            text = value.strip()
            value = _yaml(text, key) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        elem = args if origin is tuple and Ellipsis not in args else [args[0]] * len(value)
        if len(elem) != len(value):
            raise ConfigError(f"{key}: expected {len(elem)} values, got {value!r}")
        return origin(_coerce(v, t, key) for v, t in zip(value, elem))
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if typ in (int, float):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if typ is int else float(value)
            except (ValueError, yaml.YAMLError):
                raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (typ is int and value != int(value)):
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")
        return typ(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {typ}")


def _yaml(text: str, what: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{what}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None


def apply_overrides(cfg, overrides: dict, prefix: str = "") -> None:
    """Recursively override dataclass `cfg` in place; unknown keys and wrong types raise."""
    hints = typing.get_type_hints(type(cfg))
    valid = {f.name for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if key not in valid:
            raise ConfigError(f"unknown config key '{name}'; valid keys{' in ' + prefix[:-1] if prefix else ''}: "
                              f"{', '.join(sorted(valid))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if isinstance(value, str):                       # --section='{a: 1, b: 2}'
                value = _yaml(value, name)
            if not isinstance(value, dict):
                raise ConfigError(f"'{name}' is a section: expected a mapping, got {value!r}")
            apply_overrides(current, value, name + ".")
        else:
            setattr(cfg, key, _coerce(value, hints[key], name))


def find_config(path: str) -> Path:
    """A config path as given, or by name in the project root or its configs/ folder."""
    for p in (Path(path), HERE / path, HERE / "configs" / path, HERE / "configs" / Path(path).name):
        if p.is_file():
            return p
    raise ConfigError(f"config file {path!r} not found (looked in ., {HERE} and {HERE / 'configs'}); "
                      f"the shipped ones: {', '.join(p.name for p in shipped_configs())}")


def shipped_configs() -> list[Path]:
    return sorted((HERE / "configs").glob("*.yaml"))


def describe(path: Path) -> str:
    """The first comment line of a config file: what it is, in one sentence."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def load_file(cfg, path: str) -> Path:
    """Apply the YAML file `path` (found by `find_config`) to `cfg`."""
    found = find_config(path)
    loaded = _yaml(found.read_text(), str(found)) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{found}: the top level must be a mapping of config keys")
    apply_overrides(cfg, loaded)
    return found


def apply_cli(cfg, rest: list[str]) -> None:
    """Apply `--a.b=value` / `--a.b value` arguments, in order."""
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(rest):
            key, value, i = arg[2:], rest[i + 1], i + 1
        else:
            raise ConfigError(f"{arg} needs a value")
        node = value                                        # a.b=v -> {"a": {"b": v}}
        for part in reversed(key.split(".")):
            node = {part: node}
        apply_overrides(cfg, node)
        i += 1


def as_dict(cfg) -> dict:
    """The config as plain data (tuples as lists, as YAML writes them)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def as_yaml(cfg) -> str:
    return yaml.safe_dump(as_dict(cfg), sort_keys=False)
