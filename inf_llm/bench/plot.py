"""Small PNG plots of benchmark records (matplotlib, Agg backend: no display needed), about 800 x 500 pixels.

Each plot is drawn from the records of a JSONL result file, so `python -m inf_llm.bench plot FILE` redraws one
at any time (e.g. for a GPU run's file copied back from a machine without matplotlib).
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: never try to open a window

import matplotlib.pyplot as plt  # noqa: E402

from inf_llm.bench.results import series_key, series_names  # noqa: E402
from inf_llm.bench.table_data import format_length  # noqa: E402

FIGSIZE = (8, 5)  # inches; x DPI = pixels
DPI = 100
MIB = 1024 * 1024
# Distinct markers, so that series with equal values (e.g. two methods at 100%) stay visible.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _style(index: int) -> dict:
    return {"marker": MARKERS[index % len(MARKERS)], "markersize": 7 - (index % 3), "alpha": 0.85}


def _length_axis(ax, lengths: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(lengths))
    ax.set_xticks(ticks)
    ax.set_xticklabels([format_length(t) for t in ticks], fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.grid(True, alpha=0.3)


def _figure(panels: int):
    # Constrained layout places a figure legend outside the axes, where long labels cannot hide the data.
    fig, axes = plt.subplots(1, panels, figsize=FIGSIZE, layout="constrained")
    return fig, axes


def _legend(fig, handles: list, labels: list[str]) -> None:
    labels = ["\n".join(textwrap.wrap(label, 70)) for label in labels]
    fig.legend(handles, labels, loc="outside lower center", ncol=2 if len(labels) > 1 else 1, fontsize=7)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_passkey(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy (all depths and seeds pooled) vs length, one line per method."""
    names = series_names(records)
    hits: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        hits[names[series_key(record)]][record["case"]["length"]].append(bool(record["correct"]))
    fig, ax = _figure(1)
    for index, name in enumerate(sorted(hits)):
        lengths = sorted(hits[name])
        ax.plot(lengths, [100 * sum(hits[name][n]) / len(hits[name][n]) for n in lengths], label=name, **_style(index))
    _length_axis(ax, [r["case"]["length"] for r in records])
    ax.set_ylim(-5, 105)
    ax.set_ylabel("passkey accuracy (%)")
    ax.set_title("passkey retrieval (all depths and keys)")
    _legend(fig, *ax.get_legend_handles_labels())
    return _save(fig, path)


def plot_speed(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Three panels vs length: prefill tokens/s, decode ms/token, RSS growth (with the 16-bit KV line)."""
    names = series_names(records)
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        series[names[series_key(record)]].append(record)
    fig, axes = _figure(3)
    panels = [("prefill tokens/s", lambda r: r["prefill_tokens_per_s"]),
              ("decode ms/token", lambda r: r["decode_ms_per_token"]),
              ("RSS growth (MiB)", lambda r: r["rss_growth_bytes"] / MIB)]
    for ax, (title, value) in zip(axes, panels):
        for index, name in enumerate(sorted(series)):
            points = sorted(series[name], key=lambda r: r["case"]["length"])
            ax.plot([r["case"]["length"] for r in points], [value(r) for r in points], label=name, **_style(index))
        _length_axis(ax, [r["case"]["length"] for r in records])
        ax.set_title(title, fontsize=10)
    lengths = sorted({r["case"]["length"] for r in records})
    kv16 = records[0]["kv16_bytes_per_token"] if records else 0
    axes[2].plot(lengths, [n * kv16 / MIB for n in lengths], "k--", linewidth=1, label="16-bit KV size")
    handles, labels = axes[0].get_legend_handles_labels()
    kv_handles, kv_labels = axes[2].get_legend_handles_labels()
    _legend(fig, handles + kv_handles[-1:], labels + kv_labels[-1:])
    return _save(fig, path)


def plot_prose(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Mean score (%) vs length, one panel per task (depths and seeds pooled), one line per method."""
    names = series_names(records)
    tasks = list(dict.fromkeys(r["case"]["task"] for r in records))
    scores: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        scores[(record["case"]["task"], names[series_key(record)])][record["case"]["length"]].append(record["score"])
    fig, axes = _figure(len(tasks))
    axes = axes if len(tasks) > 1 else [axes]
    for ax, task in zip(axes, tasks):
        for index, name in enumerate(sorted(set(names.values()))):
            points = scores.get((task, name))
            if not points:
                continue
            lengths = sorted(points)
            # One colour per series in every panel (the axes' own cycle would shift where a series is missing).
            ax.plot(lengths, [100 * sum(points[n]) / len(points[n]) for n in lengths], label=name,
                    color=f"C{index % 10}", **_style(index))
        _length_axis(ax, [r["case"]["length"] for r in records])
        ax.set_ylim(-5, 105)
        ax.set_title(task, fontsize=10)
    axes[0].set_ylabel("mean score %")
    handles = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    _legend(fig, list(handles.values()), list(handles))
    return _save(fig, path)


def plot_gpu(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Three panels vs length: prefill seconds, decode ms/token, peak GPU memory; failed steps are marked."""
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        series[record["label"]].append(record)
    fig, axes = _figure(3)
    on_gpu = any(r.get("peak_gpu_bytes") is not None for r in records)
    memory = ("peak GPU memory (GiB)", "peak_gpu_bytes") if on_gpu else ("process RSS (GiB)", "rss_bytes")
    panels = [("prefill (s)", "prefill_s"), ("decode ms/token", "decode_ms_per_token"), memory]
    for ax, (title, field) in zip(axes, panels):
        for index, name in enumerate(sorted(series)):
            points = sorted((r for r in series[name] if r["status"] == "ok"), key=lambda r: r["case"]["length"])
            scale = 1 / 2**30 if field.endswith("_bytes") else 1
            values = [None if r[field] is None else r[field] * scale for r in points]
            line = ax.plot([r["case"]["length"] for r in points], values, label=name, **_style(index))
            for failed in (r for r in series[name] if r["status"] != "ok"):
                ax.axvline(failed["case"]["length"], color=line[0].get_color(), linestyle=":", linewidth=1)
        _length_axis(ax, [r["case"]["length"] for r in records])
        ax.set_title(title, fontsize=10)
    _legend(fig, *axes[0].get_legend_handles_labels())
    fig.suptitle("dotted: first length that ran out of memory or time", fontsize=8)
    return _save(fig, path)


def prefill_rates(points: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """Prefill tokens/s along a read: for each checkpoint (sorted by tokens, each once), the tokens read since the
    one before over the prefill seconds they took (the first: since the start)."""
    rates, tokens, seconds = [], 0, 0.0
    for point in points:
        if point["tokens"] <= tokens:
            continue  # a checkpoint recorded again (a stopped read resumed before it)
        span = point["seconds"] - seconds
        if span > 0:
            rates.append((point["tokens"], (point["tokens"] - tokens) / span))
        tokens, seconds = point["tokens"], point["seconds"]
    return rates


def plot_long_read(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Reading the longest document (the first of that length), vs tokens read: memory (process RSS and its parts,
    blocks in RAM and representatives, and bytes on disk, with the RAM budget for blocks as a line), and the
    prefill rate between checkpoints."""
    longest = max(r["case"]["length"] for r in records)
    first = next(r["case"] for r in records if r["case"]["length"] == longest)
    points = sorted((r for r in records if r["case"] == first), key=lambda r: r["tokens"])
    fig, (ax, rate_ax) = _figure(2)
    tokens = [r["tokens"] for r in points]
    for index, (label, field) in enumerate([("process RSS", "rss_bytes"), ("blocks in RAM", "host_block_bytes"),
                                            ("representatives (RAM)", "repr_bytes"), ("blocks on disk", "disk_bytes")]):
        ax.plot(tokens, [r[field] / 2**30 for r in points], label=label, **_style(index))
    budget = points[0]["case"]["settings"].get("host_cache_bytes") if points else None
    if budget is not None:
        ax.axhline(budget / 2**30, color="k", linestyle="--", linewidth=1, label="RAM budget for blocks")
    ax.set_xlabel("tokens read")
    ax.set_ylabel("GiB")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"reading {format_length(longest)} tokens: memory", fontsize=10)
    rates = prefill_rates(points)
    rate_ax.plot([t for t, _ in rates], [r for _, r in rates], color="tab:purple", **_style(0))
    rate_ax.set_xlabel("tokens read")
    rate_ax.set_ylabel("prefill tokens/s since the checkpoint before")
    rate_ax.set_ylim(bottom=0)
    rate_ax.grid(True, alpha=0.3)
    rate_ax.set_title("prefill rate", fontsize=10)
    _legend(fig, *ax.get_legend_handles_labels())
    return _save(fig, path)


PLOTTERS = {"passkey": plot_passkey, "prose": plot_prose, "speed": plot_speed, "gpu": plot_gpu, "long_read_progress": plot_long_read}


def plot_records(records: list[dict[str, Any]], path: str | Path) -> list[Path]:
    """Draw one PNG per record kind present (`<path stem>.png`, or `<stem>-<kind>.png` when several)."""
    path = Path(path)
    kinds = [kind for kind in PLOTTERS if any(r.get("kind") == kind for r in records)]
    written = []
    for kind in kinds:
        target = path if len(kinds) == 1 else path.with_name(f"{path.stem}-{kind}{path.suffix}")
        written.append(PLOTTERS[kind]([r for r in records if r.get("kind") == kind], target))
    return written
