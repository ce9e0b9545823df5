"""Loading a config file: strict YAML (an unknown or repeated key is an error naming it) in either format, ours
(a flat mapping of `InfLLMConfig` fields) or the reference's (`inf_llm.config.reference`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from inf_llm.config.reference import REFERENCE_KEYS, load_reference
from inf_llm.config.schema import (EXTRA_KEYS, FIELD_NAMES, ConfigError, InfLLMConfig, LoadedConfig, optional_str,
                                   suggest)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        mapping = super().construct_mapping(node, deep=deep)
        if len(mapping) < len(node.value):
            keys = [self.construct_object(key_node) for key_node, _ in node.value]
            twice = next(key for key in keys if keys.count(key) > 1)
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {twice!r}", node.start_mark)
        return mapping


def _read_mapping(path: Path) -> dict[Any, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read config file: {error}") from error
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(error)}") from error
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: values nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def _one_line(error: yaml.YAMLError) -> str:
    """PyYAML's message without its multi-line excerpt of the file: the problem and where."""
    problem = getattr(error, "problem", None)
    if problem is None:
        return " ".join(str(error).split())
    mark = getattr(error, "problem_mark", None)
    context = getattr(error, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}" + (f" ({context})" if context else "")


def load_config(path: str | Path) -> LoadedConfig:
    """Load our flat format or the reference InfLLM format (it has a top-level `model:` mapping)."""
    path = Path(path)
    data = _read_mapping(path)
    if isinstance(data.get("model"), dict):
        return load_reference(path, data)
    return _load_flat(path, data)


def _load_flat(path: Path, data: dict[Any, Any]) -> LoadedConfig:
    valid = FIELD_NAMES + EXTRA_KEYS
    reference_names = {key.split(".")[-1]: ref.to for key, ref in REFERENCE_KEYS.items() if ref.to}
    for key in data:
        if key in valid:
            continue
        if reference_names.get(key) in FIELD_NAMES:
            raise ConfigError(f"{path}: unknown key {key!r}: that is the reference InfLLM's name; ours is "
                              f"{reference_names[key]!r}")
        raise ConfigError(f"{path}: unknown key {key!r}{suggest(key, valid)} (valid keys: {', '.join(valid)})")
    try:
        config = InfLLMConfig(**{key: data[key] for key in FIELD_NAMES if key in data})
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from error
    return LoadedConfig(config, (), optional_str(path, "model_path", data.get("model_path")),
                        optional_str(path, "conv_template", data.get("conv_template")))
