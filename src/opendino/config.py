"""Configuration files: YAML presets with dotted command-line overrides (``a.b=c``)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad key or value (exit code 2 on the command line)."""


def check_minima(section: str, obj: Any, minima: dict[str, float]) -> None:
    """Counts and periods below their smallest valid value are configuration errors."""
    for name, minimum in minima.items():
        value = getattr(obj, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{section}.{name}={value}: must be {minimum:g} or more")


def check_choice(key: str, value: Any, valid: Iterable[Any]) -> None:
    valid = tuple(valid)
    if value not in valid:
        raise ConfigError(f"{key}={value!r}; valid: {', '.join(map(str, valid))}")


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        keys.append(f"{prefix}{k}")
        if isinstance(v, dict):
            keys += _flat_keys(v, f"{prefix}{k}.")
    return keys


def apply_overrides(
    tree: dict, overrides: Iterable[str], allow_new: bool = False, values: frozenset[str] = frozenset()
) -> dict:
    """A copy of ``tree`` with each ``a.b.c=value`` applied (values parsed as YAML, else taken as text; a
    mapping is merged into the section it names, so ``model={arch: ..., kwargs: {...}}`` keeps the preset's
    other model keys; mappings at the paths in ``values`` are replaced whole). Unknown keys are an error
    naming the closest valid keys unless ``allow_new``."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = tree
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            # below a free-form mapping (``values``, e.g. constructor arguments) any key may be added
            free = allow_new or ".".join(parts[:i]) in values
            if part not in node and not free:
                close = difflib.get_close_matches(key, _flat_keys(tree), n=3, cutoff=0.5)
                hint = f"; closest valid keys: {', '.join(close)}" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}")
            if last:
                try:
                    value = yaml.safe_load(raw) if raw != "" else None
                except yaml.YAMLError:
                    value = raw  # not YAML (a glob `*.tar`, a stray bracket): the text itself, type-checked below
                section = isinstance(node.get(part), dict) and key not in values
                if section and not isinstance(value, dict) and not free:
                    raise ConfigError(f"{key} is a section, not a value (in {item!r}); set its keys: {key}.KEY=...")
                # a mapping updates a section (as a preset over its base does); anything else replaces
                both = isinstance(value, dict) and section
                node[part] = merge(node[part], value, values, f"{key}.") if both else value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section (in {item!r})")
    return tree


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    return data


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Light type checking / coercion for YAML values (ints for floats, lists for tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return build(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        item = args[1] if len(args) == 2 else Any
        return {k: _check_type(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def build(cls: type, data: dict, where: str = "") -> Any:
    """A dataclass instance from a mapping; unknown keys are errors naming the closest valid keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        close = difflib.get_close_matches(unknown[0], names, n=3, cutoff=0.4)
        valid = ", ".join(f"{where}.{n}" if where else n for n in (close or names))
        raise ConfigError(f"unknown config key {key!r}; {'closest' if close else 'valid'} keys: {valid}")
    values = {}
    for name in names:
        if name in data:
            values[name] = _check_type(data[name], hints[name], f"{where}.{name}" if where else name)
    return cls(**values)


def to_dict(obj: Any) -> Any:
    """A plain (YAML-serialisable) copy of a config."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def merge(base: dict, update: dict, values: frozenset[str] = frozenset(), _at: str = "") -> dict:
    """Deep merge of two mappings (``update`` wins). Mappings at the dotted paths in ``values`` are values,
    not sections: an update replaces them whole."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{_at}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict) and path not in values:
            out[key] = merge(out[key], value, values, f"{path}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _field_comments(cls: type) -> dict[str, str]:
    """The comments written beside (or on the lines just above) each field of a dataclass's source."""
    import inspect
    import re

    comments, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# "))
            continue
        m = re.match(r"\s+(\w+):[^#]*?(?:#\s*(.*))?$", line)
        if m and not stripped.startswith(("def ", "return", '"""')):
            text = " ".join([*pending, m.group(2) or ""]).strip()
            if text:
                comments[m.group(1)] = text
        pending = []
    return comments


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def reference(cls: type, title: str, intro: str = "") -> str:
    """A Markdown reference of a nested config dataclass: one table per section with every key, its type,
    its default and the comment beside it in the source."""
    out = [f"# {title}", "", intro, ""] if intro else [f"# {title}", ""]
    root = cls()
    for f in dataclasses.fields(cls):
        section = getattr(root, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        sub = type(section)
        doc = (sub.__doc__ or "").strip()
        out += [f"## `{f.name}`", ""]
        if doc and not doc.startswith(sub.__name__ + "("):
            out += [" ".join(doc.split()), ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        hints, comments = typing.get_type_hints(sub), _field_comments(sub)
        for g in dataclasses.fields(sub):
            default = yaml.safe_dump(to_dict(getattr(section, g.name)), default_flow_style=True).strip()
            default = default.removesuffix("\n...").removesuffix("...").strip()
            meaning = comments.get(g.name, "").replace("|", "\\|")
            kind = _type_name(hints[g.name]).replace("|", "\\|")
            out.append(f"| `{f.name}.{g.name}` | `{kind}` | `{default}` | {meaning} |")
        out.append("")
    return "\n".join(out)
