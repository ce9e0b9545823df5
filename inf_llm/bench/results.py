"""The result log of a benchmark: one JSON object per line, appended as each case finishes.

A long run can be stopped (Ctrl-C, a crash, a lost session) and started again with the same command: the cases
already in the file are skipped. A case is identified by its `case` mapping (everything that determines the
measurement: model, settings, length, ...), compared as canonical JSON. `fresh=True` moves an old file aside
(`<name>.jsonl.bak`) and starts a new one.

Every line is written whole and flushed to disk before the next case starts; a line cut short by a kill is
ignored on reading (and logged), so the file stays usable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def case_id(case: dict[str, Any]) -> str:
    """Canonical text of a case mapping: equal cases give equal ids whatever the key order."""
    return json.dumps(case, sort_keys=True, separators=(",", ":"))


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a JSONL file (none if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # Only the last line can be cut by a kill mid-write; anything else is a damaged file.
                logger.warning("%s:%d is not valid JSON (a write cut short?); ignoring it", path, number)
                continue
            if not isinstance(record, dict):
                logger.warning("%s:%d is not a JSON object; ignoring it", path, number)
                continue
            records.append(record)
    return records


def machine_info() -> dict[str, Any]:
    """Where a measurement was taken: enough to tell two machines (or a GPU run) apart."""
    import torch

    info = {"host": platform.node(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


class ResultLog:
    """Append-only JSONL file of records `{"kind": ..., "case": {...}, ...}`."""

    def __init__(self, path: str | Path, *, fresh: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            backup = self.path.with_name(self.path.name + ".bak")
            os.replace(self.path, backup)
            logger.info("moved the old results %s to %s", self.path, backup)
        self.records = read_records(self.path)
        self._done = {(r.get("kind"), case_id(r["case"])) for r in self.records if isinstance(r.get("case"), dict)}
        self._terminate_last_line()

    def _terminate_last_line(self) -> None:
        # A record cut short by a kill has no newline; the next record must start on a line of its own.
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb") as handle:
                handle.seek(-1, os.SEEK_END)
                last = handle.read(1)
            if last != b"\n":
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.write("\n")

    def done(self, kind: str, case: dict[str, Any]) -> bool:
        return (kind, case_id(case)) in self._done

    def records_of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]

    def append(self, kind: str, case: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """Write one record (kind, case, a timestamp, then fields) and make it durable before returning it."""
        record = {"kind": kind, "case": case, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
        line = json.dumps(record, sort_keys=False, default=_jsonable)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        record = json.loads(line)  # what a later read will see (tuples as lists, ...)
        self.records.append(record)
        self._done.add((kind, case_id(case)))
        return record


def series_names(records: list[dict[str, Any]]) -> dict[str, str]:
    """Map each record's series (model + settings + label) to a display name.

    The name is the record's label; when one label covers several models or settings (e.g. results of an
    older default preset in the same file), a short hash of the series tells them apart.
    """
    series: dict[str, str] = {}
    for record in records:
        series.setdefault(series_key(record), record.get("label", "?"))
    counts: dict[str, int] = {}
    for label in series.values():
        counts[label] = counts.get(label, 0) + 1
    return {key: label if counts[label] == 1 else f"{label} #{hashlib.sha1(key.encode()).hexdigest()[:6]}"
            for key, label in series.items()}


def series_key(record: dict[str, Any]) -> str:
    case = record.get("case", {})
    return case_id({"model": case.get("model"), "settings": case.get("settings"), "label": record.get("label")})


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
