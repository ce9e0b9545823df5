"""Which settings each benchmarked method runs, and how a run of them is named and identified.

One base config (a preset, or the model's default one) plus `--set key=value` overrides gives every method its
settings: `inf-llm` as configured, `stream-llm` and `infinite-lm` with the same sinks, window and chunk (they
keep no memory blocks), and `full` the model's own attention. A method's *label* names it in tables and plots:
the method plus the overrides that matter to it (and an optional tag). Its *identity* (part of a result's case)
holds only the settings that can change its results, so that sweeping `topk_blocks` does not re-run the
baselines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from inf_llm.config.schema import ADDED_LATER, METHODS, InfLLMConfig

# The settings each method's results depend on (speed included).
_WINDOWED = ("num_sink_tokens", "local_window", "wide_window", "wide_window_until", "short_conversation",
             "short_conversation_until", "chunk_size", "kernel_backend")
# Where blocks are kept (RAM budget, disk folder) changes neither results nor compute: not part of an identity.
_PLACEMENT_FIELDS = ("host_cache_bytes", "disk_dir")
# Settings added after results were recorded (`ADDED_LATER`) are left out of the identity at the value that
# reproduces those results, so that recorded cases still count as done.
_ADDED_LATER = ADDED_LATER
RELEVANT_FIELDS: dict[str, tuple[str, ...] | None] = {
    "inf-llm": None,  # all of them
    "stream-llm": _WINDOWED,
    "infinite-lm": _WINDOWED,
    "full": (),
}


@dataclass(frozen=True)
class MethodRun:
    label: str  # e.g. "inf-llm", "inf-llm topk_blocks=4", "stream-llm (tag)"
    config: InfLLMConfig

    @property
    def method(self) -> str:
        return self.config.method

    def identity(self) -> dict[str, Any]:
        """The settings that determine this method's results (JSON-ready)."""
        fields = RELEVANT_FIELDS[self.method]
        settings = {k: v for k, v in self.config.to_dict().items()
                    if k not in _PLACEMENT_FIELDS and not (k in _ADDED_LATER and v == _ADDED_LATER[k])}
        keep = settings if fields is None else {k: settings[k] for k in fields if k in settings}
        return {"method": self.method, **{k: v for k, v in keep.items() if k != "method"}}


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["topk_blocks=4", "cache_policy=lru-s", "score_decay=0.9"]` -> typed values (YAML scalars)."""
    overrides: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r} is invalid: expected KEY=VALUE, e.g. --set topk_blocks=4")
        if key == "method":
            raise ValueError("--set method=... is not allowed: choose the methods with --methods")
        if key in overrides:
            raise ValueError(f"--set {key} is given twice")
        overrides[key] = yaml.safe_load(text) if text.strip() else None
    return overrides


def parse_methods(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise ValueError(f"--methods {text!r} is invalid: give a comma-separated list of {', '.join(METHODS)}")
    return names


def method_runs(base: InfLLMConfig, methods: tuple[str, ...], overrides: dict[str, Any],
                tag: str | None = None) -> list[MethodRun]:
    """One MethodRun per method; invalid overrides raise ValueError naming the field (from InfLLMConfig)."""
    runs = []
    for method in methods:
        config = _base_for(base, method).replace(method=method, **overrides)
        fields = RELEVANT_FIELDS[method]
        shown = [f"{k}={v}" for k, v in overrides.items() if fields is None or k in fields]
        label = " ".join([method, *shown, *([f"({tag})"] if tag else [])])
        runs.append(MethodRun(label, config))
    return runs


def _base_for(base: InfLLMConfig, method: str) -> InfLLMConfig:
    """The base a method starts from: a baseline keeps, of a short_conversation mapping, only what it has too (the
    sinks, the window, the chunk): the mapping's memory settings (where the sinks and the voted blocks sit in
    memory) mean nothing to a method that keeps no memory blocks, and stream-llm refuses sinks placed in memory."""
    short = base.short_conversation
    if RELEVANT_FIELDS[method] is None or short is None:
        return base
    kept = {k: v for k, v in short.items() if k in _WINDOWED}
    if kept == short:
        return base
    return base.replace(short_conversation=kept or None,
                        short_conversation_until=base.short_conversation_until if kept else None)


def variant_runs(base: InfLLMConfig, overrides: dict[str, Any], variants: list[str] | None,
                 tag: str | None = None) -> list[MethodRun]:
    """Extra inf-llm runs, one per `--compare KEY=VALUE[,KEY=VALUE]` (e.g. storage_dtype=int8), measured in
    the same run as the methods so that their results compare under the same conditions."""
    runs = []
    for text in variants or ():
        extra = parse_overrides([part for part in text.split(",") if part.strip()])
        clash = sorted(set(extra) & set(overrides))
        if clash:
            raise ValueError(f"--compare {text!r} sets {', '.join(clash)}, which --set already sets for every method")
        (run,) = method_runs(base, ("inf-llm",), {**overrides, **extra}, tag)
        runs.append(run)
    return runs
