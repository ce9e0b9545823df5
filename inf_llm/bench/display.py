"""What the benchmarks show in the terminal: rich tables of the result records, and progress bars.

Tables are drawn from the records (the JSONL file), never from in-memory state, so a resumed run shows the
cases of earlier runs too. Ratios against full attention pair records of the same model and length. Each table is
built once as `TableData` (cells may hold rich markup) and rendered here for the terminal (`to_rich`), or as
Markdown for BENCHMARKS.md (`table_data.to_markdown`).
"""

from __future__ import annotations

import json

from collections import defaultdict
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from inf_llm.bench.results import series_key, series_names
from inf_llm.bench.table_data import TableData, format_length

MIB = 1024 * 1024
GIB = 1024 * MIB


def to_rich(data: TableData) -> Table:
    table = Table(title=data.title, title_justify="left")
    for index, name in enumerate(data.columns):
        text = index < data.left_columns
        # Numbers never wrap; a long method label folds instead.
        table.add_column(name, justify="left" if text else "right", no_wrap=not text, overflow="fold")
    for index, row in enumerate(data.rows):
        style = data.row_styles[index] if index < len(data.row_styles) else None
        table.add_row(*row, style=style)
    return table


def make_progress(console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def passkey_table(records: list[dict[str, Any]]) -> TableData:
    """Correct / total per series (rows, with one row per depth under it) and length (columns)."""
    names = series_names(records)
    cells: dict[tuple[str, Any, int], list[bool]] = defaultdict(list)
    lengths, depths = set(), set()
    for record in records:
        case = record["case"]
        name = names[series_key(record)]
        lengths.add(case["length"])
        depths.add(case["depth"])
        cells[(name, "all", case["length"])].append(bool(record["correct"]))
        cells[(name, case["depth"], case["length"])].append(bool(record["correct"]))
    rows, styles = [], []
    for name in sorted(set(names.values())):
        for depth in ["all", *sorted(depths)]:
            row = [_accuracy_cell(cells.get((name, depth, length))) for length in sorted(lengths)]
            if depth != "all" and all(cell == "" for cell in row):
                continue
            rows.append((name if depth == "all" else "", "all" if depth == "all" else f"{depth:.0%}", *row))
            styles.append(None if depth == "all" else "dim")
    return TableData("passkey: correct / cases (greedy)", ("method", "depth", *map(format_length, sorted(lengths))),
                     tuple(rows), left_columns=2, row_styles=tuple(styles))


def prose_table(records: list[dict[str, Any]]) -> TableData:
    """Mean score (percent) per series and task (rows, with one row per depth under "all") and length (columns);
    each cell shows its number of cases."""
    names = series_names(records)
    cells: dict[tuple[str, str, Any, int], list[float]] = defaultdict(list)
    lengths, depths, tasks = set(), set(), {}
    for record in records:
        case = record["case"]
        name = names[series_key(record)]
        lengths.add(case["length"])
        depths.add(case["depth"])
        tasks.setdefault(case["task"], None)
        for depth in ("all", case["depth"]):
            cells[(name, case["task"], depth, case["length"])].append(float(record["score"]))
            cells[(name, "every task", depth, case["length"])].append(float(record["score"]))
    rows, styles = [], []
    for name in sorted(set(names.values())):
        for task in [*tasks, "every task"]:
            if task == "every task" and len(tasks) == 1:
                continue
            for depth in ["all", *sorted(depths)]:
                row = [_score_cell(cells.get((name, task, depth, length))) for length in sorted(lengths)]
                if all(cell == "" for cell in row):
                    continue
                rows.append((name, task, "all" if depth == "all" else f"{depth:.0%}", *row))
                styles.append(None if depth == "all" else "dim")
    return TableData("long documents of prose: mean score % (cases), greedy, free answer",
                     ("method", "task", "depth", *map(format_length, sorted(lengths))), tuple(rows),
                     left_columns=3, row_styles=tuple(styles))


def _score_cell(scores: list[float] | None) -> str:
    if not scores:
        return ""
    mean = 100 * sum(scores) / len(scores)
    color = "green" if mean >= 99.5 else "red" if mean < 0.5 else "yellow"
    return f"[{color}]{mean:.0f}[/{color}] ({len(scores)})"


def _accuracy_cell(hits: list[bool] | None) -> str:
    if not hits:
        return ""
    good, total = sum(hits), len(hits)
    color = "green" if good == total else "red" if good == 0 else "yellow"
    return f"[{color}]{good}/{total}[/{color}]"


def speed_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per speed record with its ratios: vs full attention at the same length, vs its own shortest."""
    names = series_names(records)
    full = {(r["case"]["model"], r["case"]["length"]): r for r in records if r["case"]["settings"]["method"] == "full"}
    shortest: dict[str, dict[str, Any]] = {}
    latest: dict[str, dict[str, Any]] = {}
    previous: dict[int, dict[str, Any]] = {}  # id(record) -> the same series' record at the next shorter length
    for record in sorted(records, key=lambda r: r["case"]["length"]):
        key = series_key(record)
        if key in latest:
            previous[id(record)] = latest[key]
        shortest.setdefault(key, record)
        latest[key] = record
    # The best matmul peak of each run (records measured later in a run may have seen a higher one).
    run_peak: dict[str, float] = {}
    for record in records:
        if "run" in record:
            run_peak[record["run"]] = max(run_peak.get(record["run"], 0.0), record["peak_gflops"])
    rows = []
    for record in sorted(records, key=lambda r: (names[series_key(r)], r["case"]["length"])):
        case = record["case"]
        base = full.get((case["model"], case["length"]))
        first = shortest[series_key(record)]
        before = previous.get(id(record))
        # Memory per token from the growth between two lengths: the allocator's constant overhead cancels.
        marginal = record["rss_growth_per_token"] if before is None else (
            (record["rss_growth_bytes"] - before["rss_growth_bytes"]) / (case["length"] - before["case"]["length"]))
        rows.append({
            "name": names[series_key(record)],
            "method": case["settings"]["method"],
            "record": record,
            "prefill_speedup_vs_full": _ratio(base and base["prefill_s"], record["prefill_s"]),
            "decode_vs_full": _ratio(record["decode_ms_per_token"], base and base["decode_ms_per_token"]),
            "decode_vs_shortest": _ratio(record["decode_ms_per_token"], first["decode_ms_per_token"]),
            "shortest_length": first["case"]["length"],
            "rss_marginal_per_token": marginal,
            "efficiency": record["flops"]["total"] / record["prefill_s"]
            / (run_peak.get(record.get("run"), record["peak_gflops"]) * 1e9),
        })
    return rows


def speed_table(records: list[dict[str, Any]]) -> TableData:
    columns = ("method", "tokens", "prefill s", "tok/s", "x full", "decode ms", "/ full", "/ shortest",
               "ranking ms", "RSS +MiB", "KiB/tok", "marginal", "/ KV16", "host MiB", "dev MiB", "efficiency")
    rows = []
    for row in speed_rows(records):
        r = row["record"]
        rows.append((
            row["name"], format_length(r["case"]["length"]), _fmt(r["prefill_s"], ".1f"),
            _fmt(r["prefill_tokens_per_s"], ".0f"), _fmt(row["prefill_speedup_vs_full"], ".2f"),
            _fmt(r["decode_ms_per_token"], ".1f"), _fmt(row["decode_vs_full"], ".2f"),
            _fmt(row["decode_vs_shortest"], ".2f"), _fmt(r.get("decode_scoring_ms"), ".1f"),
            _fmt(r["rss_growth_bytes"] / MIB, ".0f"),
            _fmt(r["rss_growth_per_token"] / 1024, ".1f"), _fmt(row["rss_marginal_per_token"] / 1024, ".1f"),
            _fmt(_ratio(row["rss_marginal_per_token"], r["kv16_bytes_per_token"]), ".2f"),
            _fmt(r["memory"]["host_bytes"] / MIB, ".0f"), _fmt(r["memory"]["device_bytes"] / MIB, ".0f"),
            _fmt(row["efficiency"] * 100, ".0f") + "%",
        ))
    return TableData("speed and memory: x full = prefill speed-up over full attention; decode / full and / shortest "
                     "(its own shortest length); ranking ms = of decode ms, ranking the blocks (reading every representative); KiB/tok = RSS growth / tokens; marginal = KiB per token between this "
                     "length and the previous one; / KV16 = marginal / 16-bit KV bytes per token; efficiency = model "
                     "FLOPs / prefill time / the best matmul peak measured in the run", columns, tuple(rows))


def peak_table(records: list[dict[str, Any]]) -> TableData:
    rows = tuple((f"{r['time']} ({r['case']['when']})", f"{r['m']} x {r['k']} x {r['n']}", f"{r['dtype']}",
                  f"{r['gflops']:.1f}") for r in records)
    return TableData("matmul peak of this machine (the efficiency's denominator)",
                     ("when", "shape (m x k x n)", "dtype", "GFLOP/s"), rows, left_columns=3)


def long_read_table(records: list[dict[str, Any]]) -> TableData:
    """One row per document read: its needles found, speeds, memory and the saved session's save and resume."""
    columns = ("tokens", "depths", "found", "prefill tok/s", "decode ms", "/ shortest", "peak RSS GiB",
               "blocks in RAM GiB", "summaries GiB", "disk GiB", "last save s", "resume s", "same after resume")
    def settings(r: dict[str, Any]) -> str:
        return json.dumps(r["case"]["settings"], sort_keys=True)

    # The shortest documents read under the same settings (the control of that run).
    base_ms = {}
    for key in {settings(r) for r in records}:
        same = [r for r in records if settings(r) == key]
        shortest = min(r["case"]["length"] for r in same)
        base = [r["decode_ms_per_token"] for r in same if r["case"]["length"] == shortest]
        base_ms[key] = sum(base) / len(base)
    rows = tuple((
        f"{r['tokens']:,}", " ".join(f"{d:.0%}" for d in r["case"]["depths"]), f"{r['correct']}/{r['asked']}",
        _fmt(r["prefill_tokens_per_s"], ".0f"), _fmt(r["decode_ms_per_token"], ".1f"),
        _fmt(_ratio(r["decode_ms_per_token"], base_ms[settings(r)]), ".2f"), _fmt(r["rss_peak_bytes"] / GIB, ".2f"),
        _fmt(r["host_block_bytes"] / GIB, ".2f"), _fmt(r["repr_bytes"] / GIB, ".2f"), _fmt(r["disk_bytes"] / GIB, ".2f"),
        _fmt(r["last_save_s"], ".1f"), _fmt(r["resume_s"], ".1f"), "yes" if r["same_after_resume"] else "NO",
    ) for r in records)
    return TableData("long read: needles found (each asked alone, free answer), decode / shortest = against the mean "
                     "of the shortest documents read under the same settings; last save = the checkpoint after the last tokens (new blocks only); "
                     "resume = the saved session into a new engine", columns, rows, left_columns=3)
