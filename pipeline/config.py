"""Typed stage configs: frozen dataclasses, loaded from YAML, overridden by dotted CLI arguments.

Every problem is reported before any work starts, naming the file, the key and what is allowed.
Relative paths are resolved against the current directory (the repo root for `make`/launch scripts).
"""
from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used: the message names the source, the key and the fix."""


class InputPath(type(Path())):
    """A path that must exist when the config is loaded (model folders, data, indexes)."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build `cls` from a YAML file plus `key.sub=value` overrides (values parsed as YAML)."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: top level must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item, source)
    return _build(cls, raw, prefix="", source=source)


def parse_args(cls: type[T], argv: list[str] | None = None, usage: str = "") -> T:
    """`--config FILE [key.sub=value ...]` → config; errors exit with the message (no traceback).

    `--help` lists every key with its type and default; `--print-config` prints the resolved
    config as YAML; both exit 0 without running anything. `usage`: the entry's own flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(f"usage: --config FILE [key.sub=value ...] [--print-config] {usage}".rstrip()
              + f"\n\n{cls.__name__} keys:")
        print("\n".join(f"  {line}" for line in describe_keys(cls)))
        raise SystemExit(0)
    print_config = "--print-config" in argv
    argv = [a for a in argv if a != "--print-config"]
    path = None
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise SystemExit("--config needs a YAML file")
        path = argv[at + 1]
        del argv[at : at + 2]
    try:
        cfg = load_config(cls, path, argv)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    if print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        raise SystemExit(0)
    return cfg


def describe_keys(cls, prefix: str = "") -> list[str]:
    """`key.sub: type = default` for every leaf key of a config dataclass (sections recursed)."""
    lines = []
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        section = next((a for a in (tp, *get_args(tp)) if dataclasses.is_dataclass(a)), None)
        if section is not None:
            optional = " (optional section: omit for none)" if tp is not section else ""
            lines.append(f"{prefix}{field.name}:{optional}")
            lines += describe_keys(section, f"{prefix}{field.name}.")
            continue
        if field.default is not dataclasses.MISSING:
            default = f" = {to_dict(field.default)!r}"
        elif field.default_factory is not dataclasses.MISSING:
            default = f" = {to_dict(field.default_factory())!r}"
        else:
            default = " (required)"
        lines.append(f"{prefix}{field.name}: {_describe(tp)}{default}")
    return lines


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-safe dict of a config (paths as strings): what is logged and checkpointed."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(cfg)


def flatten(cfg: Any) -> dict[str, Any]:
    """`{"train.lr": 1e-3, ...}`: the resolved config as tracker params."""
    out: dict[str, Any] = {}
    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
    walk(to_dict(cfg), "")
    return out


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _apply_override(raw: dict, item: str, source: str) -> None:
    key, sep, text = item.partition("=")
    key = key.removeprefix("--")
    if not sep or not key:
        raise ConfigError(f"override '{item}': expected key.sub=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is a value in {source}, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls, raw: Any, prefix: str, source: str):
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}'; allowed in {where}: {', '.join(fields)}"
        )
    values = {}
    for name, field in fields.items():
        key = prefix + name
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], key, source)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                values[name] = _build(hints[name], {}, key + ".", source)
            else:
                raise ConfigError(f"{source}: missing required key '{key}' ({_describe(hints[name])})")
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:  # __post_init__ cross-field checks
        raise ConfigError(f"{source}: {where}: {err}") from None


def _coerce(tp, value, key: str, source: str):
    origin, args = get_origin(tp), get_args(tp)
    bad = ConfigError(f"{source}: key '{key}' must be {_describe(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key, source)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{source}: key '{key}' must be one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", source)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {str(k): _coerce(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(tp, type) and issubclass(tp, Path):
        if not isinstance(value, (str, Path)) or str(value) == "":
            raise bad
        path = Path(value).expanduser()
        if tp is InputPath and not path.exists():
            raise ConfigError(f"{source}: key '{key}': path does not exist: {path}")
        return path
    raise ConfigError(f"{source}: key '{key}': unsupported config type {tp!r}")


def _describe(tp) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if tp is InputPath:
        return "an existing path"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))
