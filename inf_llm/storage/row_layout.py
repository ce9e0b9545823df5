"""The records of a block's summary rows on disk (its representatives or key bounds), and reading any layout back.

A session saves each layer's block summaries as a disk tier (`inf_llm.storage.disk_tier`) of `RowLayout` records,
next to the tier of its K/V blocks (`BlockLayout` records); `layout_from_dict` reads either from a tier's
`layout.json`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inf_llm.storage.block_layout import BlockLayout
from inf_llm.storage.dtypes import DTYPES


@dataclass(frozen=True)
class RowLayout:
    """Records of `width` values each, float32 or float16: the representatives of one block (all query heads)."""

    width: int
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def record_bytes(self) -> int:
        return self.torch_dtype.itemsize * self.width

    def to_dict(self) -> dict:
        return {"kind": "rows", "width": self.width, "dtype": self.dtype, "record_bytes": self.record_bytes}

    @classmethod
    def from_dict(cls, data: dict) -> RowLayout:
        if data.get("kind") != "rows" or data.get("dtype") not in ("float32", "float16") \
                or not isinstance(data.get("width"), int):
            raise ValueError(f"not a row layout: {data!r}")
        return cls(data["width"], data["dtype"])

    def rows(self, records: torch.Tensor) -> torch.Tensor:
        """(n, record_bytes) uint8 -> (n, width), a view."""
        return records.view(self.torch_dtype)

    def records(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, width) -> (n, record_bytes) uint8 on the CPU."""
        return rows.detach().to("cpu", self.torch_dtype).contiguous().view(torch.uint8)


def layout_from_dict(data: dict) -> BlockLayout | RowLayout:
    return RowLayout.from_dict(data) if data.get("kind") == "rows" else BlockLayout.from_dict(data)
