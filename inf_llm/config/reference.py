"""The reference InfLLM's config format (thunlp/InfLLM `config/*.yaml`, recognised by its top-level `model:`
mapping), translated into ours through the one table of its keys, `REFERENCE_KEYS`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inf_llm.config.schema import DEFAULTS, FIELD_NAMES, ConfigError, InfLLMConfig, LoadedConfig, optional_str, suggest


@dataclass(frozen=True)
class RefKey:
    """One reference key: mapped to our `to`, or not honoured because of `why` (a note, an error if `refuse`).

    A value in `honoured` is what we do anyway, so it is accepted without a note.
    """

    to: str | None = None
    why: str = ""
    refuse: bool = False
    honoured: tuple[Any, ...] = ()


def _refused(why: str, *honoured: Any) -> RefKey:
    return RefKey(why=why, refuse=True, honoured=honoured or (None, False))


_AUTO = "done automatically on CUDA devices"
_ROPE = "RoPE facts come from the checkpoint; RoPE scaling is not supported"

# The one translation of the reference's config keys ("model.x" lives under `model:`).
REFERENCE_KEYS: dict[str, RefKey] = {
    "model.type": RefKey("method"),
    "model.path": RefKey("model_path"),
    "model.n_init": RefKey("num_sink_tokens"),
    "model.n_local": RefKey("local_window"),
    "model.block_size": RefKey("block_size"),
    "model.repr_topk": RefKey("repr_tokens"),
    "model.topk": RefKey("topk_blocks"),
    "model.exc_block_size": RefKey("chunk_size"),
    "model.max_cached_block": RefKey("device_cache_blocks"),
    "model.cache_strategy": RefKey("cache_policy"),
    "model.score_decay": RefKey("score_decay"),
    "model.perhead": RefKey("per_head_ranking"),
    # A note, not kernel_backend "triton": the kernel changes speed only, and auto picks one per device.
    "model.fattn": RefKey(why="the kernel is chosen by kernel_backend (auto); outputs do not depend on it"),
    "model.base": RefKey(why="the RoPE base comes from the checkpoint (another base would be NTK scaling)"),
    "model.distance_scale": _refused("position interpolation is not supported; " + _ROPE, 1, 1.0),
    "model.rope_scaling": _refused(_ROPE),
    "model.ntk": _refused(_ROPE),
    "model.ntk_alpha": _refused(_ROPE),
    "model.async_global_stream": RefKey(why="the copy stream is " + _AUTO),
    "model.pin_memory": RefKey(why="pinning host memory is " + _AUTO),
    "model.use_buffer": RefKey(why="buffering retrieved blocks is " + _AUTO),
    "model.max_calc_block": RefKey(why="every memory block is scored; there is no cap"),
    "model.chunk_topk_calc": _refused("blocks are retrieved for every chunk; reusing a retrieval is not supported"),
    "model.faiss": _refused("faiss retrieval is not supported"),
    "model.dense_decoding": _refused("dense decoding over all memory is not supported"),
    "model.tokenizer_path": RefKey(why="the tokenizer is loaded from the model path"),
    "model.model_center": _refused("ModelCenter/BMTrain models are not supported"),
    "chunk_size": RefKey(why="the reference feeds a prompt to the model this many tokens at a time; we feed "
                             "chunk_size (the reference's model.exc_block_size) tokens at a time"),
    "max_len": RefKey(why="the reference's benchmark skips prompts longer than this; the chat has no limit"),
    "truncation": RefKey(why="the reference's benchmark cuts over-long prompts; we never truncate", honoured=(None,)),
    "conv_type": RefKey("conv_template"),
    **{key: RefKey(why="a setting of the reference's benchmark harness, not of InfLLM")
       for key in ("datasets", "output_dir_path", "rank", "world_size", "verbose")},
}
REFERENCE_METHODS = {"inf-llm": "inf-llm", "stream-llm": "stream-llm", "infinite-lm": "infinite-lm", "origin": "full"}
# Reference conv_type -> fastchat template name; None: the tokenizer's own chat template is used.
REFERENCE_CONV_TEMPLATES: dict[str, str | None] = {
    "mistral-inst": "mistral", "vicuna": "vicuna_v1.1", "llama-3-inst": None, "qwen": None, "minicpm": None}
# Keys the reference's attention functions take without a default: it fails without them, so do we.
_BASELINE_REQUIRED = ("n_init", "n_local")
_REFERENCE_REQUIRED = {"inf-llm": (*_BASELINE_REQUIRED, "topk", "block_size", "max_cached_block", "exc_block_size"),
                       "stream-llm": _BASELINE_REQUIRED, "infinite-lm": _BASELINE_REQUIRED, "full": ()}
_REFERENCE_REPR_TOPK_DEFAULT = 1  # the reference's default when repr_topk is absent (ours is 4)


def load_reference(path: Path, data: dict[Any, Any]) -> LoadedConfig:
    flat = {f"model.{key}": value for key, value in data["model"].items()}
    flat.update((key, value) for key, value in data.items() if key != "model")
    settings: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in flat.items():
        ref = REFERENCE_KEYS.get(key)
        if ref is None:
            raise ConfigError(f"{path}: unknown reference InfLLM key {key!r}"
                              f"{suggest(key, list(REFERENCE_KEYS))}")
        if ref.to in FIELD_NAMES:
            settings[ref.to] = value
        elif ref.to is not None:
            extras[ref.to] = value
        elif ref.refuse and value not in ref.honoured:
            raise ConfigError(f"{path}: {key}={value!r} is not supported: {ref.why}")
        elif value not in ref.honoured:
            notes.append(f"{key}={value!r} is not used: {ref.why}")

    kind = settings.get("method")
    if not isinstance(kind, str) or kind not in REFERENCE_METHODS:
        raise ConfigError(f"{path}: model.type={kind!r} is invalid: must be one of "
                          f"{', '.join(map(repr, REFERENCE_METHODS))}")
    method = settings["method"] = REFERENCE_METHODS[kind]
    missing = [key for key in _REFERENCE_REQUIRED[method] if f"model.{key}" not in flat]
    if missing:
        raise ConfigError(f"{path}: model.type {kind!r} needs " + ", ".join(f"model.{k}" for k in missing)
                          + " (the reference has no default for them)")
    if method == "inf-llm":
        settings.setdefault("repr_tokens", _REFERENCE_REPR_TOPK_DEFAULT)
        # The paper's representatives, ranked as this project ranked them before the ranking was a setting
        # (unrotated; the reference's code ranks with the rotated query: rank_rotated: true in our format).
        settings.setdefault("block_ranking", "representatives")
        settings.setdefault("rank_rotated", False)
    if "chunk_size" not in settings and isinstance(settings.get("local_window"), int):
        # The baselines' reference configs give no exc_block_size; keep ours within their window.
        settings["chunk_size"] = min(DEFAULTS.chunk_size, settings["local_window"])
    if settings.get("score_decay") is not None and settings.get("cache_policy", "lru") != "lru-s":
        # The reference reads score_decay only under lru-s; its shipped configs set it with plain lru.
        notes.append(f"model.score_decay={settings.pop('score_decay')!r} is not used: it applies to "
                     f"cache_strategy lru-s only, and this file's is {settings.get('cache_policy', 'lru')!r}")

    try:
        config = InfLLMConfig(**settings)
    except ValueError as error:
        named = [f"{ref.to} is {key}" for key, ref in REFERENCE_KEYS.items()
                 if ref.to in FIELD_NAMES and re.search(rf"\b{ref.to}\b", str(error))]
        raise ConfigError(f"{path}: {error} (reference names: {'; '.join(named)})") from error
    conv_template = _reference_conv_template(path, extras.get("conv_template"), notes)
    return LoadedConfig(config, tuple(notes), optional_str(path, "model.path", extras.get("model_path")),
                        conv_template)


def _reference_conv_template(path: Path, conv_type: Any, notes: list[str]) -> str | None:
    if conv_type is None:
        return None
    if not isinstance(conv_type, str) or conv_type not in REFERENCE_CONV_TEMPLATES:
        raise ConfigError(f"{path}: conv_type={conv_type!r} is not known: must be one of "
                          f"{', '.join(map(repr, REFERENCE_CONV_TEMPLATES))}")
    template = REFERENCE_CONV_TEMPLATES[conv_type]
    if template is None:
        notes.append(f"conv_type={conv_type!r} has no fastchat template: the tokenizer's chat template is used")
    return template
