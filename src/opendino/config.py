"""Configuration files: YAML presets with dotted command-line overrides (``a.b=c``)."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad key or value (exit code 2 on the command line)."""


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        keys.append(f"{prefix}{k}")
        if isinstance(v, dict):
            keys += _flat_keys(v, f"{prefix}{k}.")
    return keys


def apply_overrides(tree: dict, overrides: Iterable[str], allow_new: bool = False) -> dict:
    """A copy of ``tree`` with each ``a.b.c=value`` applied (values parsed as YAML scalars or lists).
    Unknown keys are an error naming the closest valid keys unless ``allow_new``."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = tree
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part not in node and not allow_new:
                close = difflib.get_close_matches(key, _flat_keys(tree), n=3, cutoff=0.5)
                hint = f"; closest valid keys: {', '.join(close)}" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}")
            if last:
                node[part] = yaml.safe_load(raw) if raw != "" else None
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
