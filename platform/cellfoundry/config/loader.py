"""Load nested dataclasses from YAML with strict keys, type checks and dotted overrides."""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it where unambiguous."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}"
        )
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {
            _coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {', '.join(unknown)}; known keys: {known}"
        )
    kwargs = {}
    for name in fields:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}" if where else name)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or cls.__name__}: missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # __post_init__ checks
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. --set corpus.qc.n_sd=2.5")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:  # e.g. "{shared}/x": not YAML, so take it as a plain string
        value = raw
    node[parts[-1]] = value


def parse_config(
    cls: type[T],
    data: dict[str, Any] | None,
    overrides: typing.Sequence[str] = (),
    *,
    where: str = "",
) -> T:
    """Build ``cls`` from a plain mapping plus ``KEY=VALUE`` dotted overrides.

    ``where`` prefixes the key paths in error messages (e.g. ``catalog c.yaml: dataset 'a'``).
    """
    data = copy.deepcopy(dict(data or {}))
    for override in overrides:
        _apply_override(data, override)
    return _build(cls, data, where)


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The parsed YAML document of ``path``; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and start is not None and start is not mark:
            context += f" that starts at line {start.line + 1}, column {start.column + 1}"
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError(
            f"{what} {where}: not valid YAML: {detail}; fix the syntax there (indentation, "
            "a ': ' after each key, quotes around values holding ': ' or ' #')"
        ) from None


def load_config(cls: type[T], path: str | Path | None, overrides: typing.Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) with overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file")
        loaded = read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
        data = loaded or {}
    try:
        return parse_config(cls, data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (for manifests)."""
    return dataclasses.asdict(cfg)
