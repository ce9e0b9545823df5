"""The host-memory tier of the block store: block records in RAM, within a byte budget.

Records (`BlockLayout`) live in rows of one slab in pageable memory (loads to a GPU go through a pinned
buffer of their own, see `BlockStore._read_records`). With a budget (`host_cache_bytes`, split over the layers)
the slab never holds more than ``budget // record_bytes`` rows, so the bytes of block K/V in RAM never exceed the budget; the store decides
what leaves (to the disk tier) by this tier's `EvictionPolicy`. Without a budget every block stays here, as a
growing slab (the behaviour before tiers existed).
"""

from __future__ import annotations

from collections.abc import Container, Iterable

import torch

from inf_llm.storage.block_layout import BlockLayout
from inf_llm.storage.cache_policy import EvictionPolicy
from inf_llm.storage.rows import put_rows

_MIN_ROWS = 16


class HostTier:
    def __init__(
        self,
        layout: BlockLayout,
        *,
        budget_bytes: int | None,
        policy: str = "lru",
        score_decay: float | None = None,
    ):
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"host budget must be >= 0 bytes or None, got {budget_bytes}")
        self.layout = layout
        self.max_blocks = None if budget_bytes is None else budget_bytes // layout.record_bytes
        self.slab = layout.empty(0)  # (rows, record_bytes) uint8
        self.row_of: dict[int, int] = {}
        self.free_rows: list[int] = []
        self.policy = EvictionPolicy(policy, score_decay)

    def __len__(self) -> int:
        return len(self.row_of)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self.row_of

    def block_ids(self) -> list[int]:
        return sorted(self.row_of)

    def record(self, block_id: int) -> torch.Tensor:
        """The block's record (record_bytes,) uint8, a view of the slab (valid until the block leaves)."""
        return self.slab[self.row_of[block_id]]

    def records(self, block_ids: Iterable[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """Copies of records, (n, record_bytes) uint8 (into `out` when given: one gather, however many)."""
        rows = torch.tensor([self.row_of[b] for b in block_ids], dtype=torch.long)
        return self.slab.index_select(0, rows) if out is None else torch.index_select(self.slab, 0, rows, out=out)

    def excess(self, incoming: int) -> int:
        """How many blocks must leave before `incoming` more fit in the budget."""
        return 0 if self.max_blocks is None else max(0, len(self) + incoming - self.max_blocks)

    def victims(self, count: int, protected: Container[int] = ()) -> list[int]:
        """Up to `count` blocks to evict, in eviction order, none in `protected` (nothing is removed yet)."""
        return self.policy.victims(count, protected)

    def put(self, block_ids: list[int], records: torch.Tensor) -> None:
        """Hold new blocks: records (n, record_bytes) uint8 on the CPU; the caller has made room."""
        if self.max_blocks is not None and len(self) + len(block_ids) > self.max_blocks:
            raise RuntimeError(f"{len(block_ids)} blocks do not fit in the host tier ({len(self)} of "
                               f"{self.max_blocks} rows used): make room first")
        self._reserve(len(block_ids))
        rows = [self.free_rows.pop() for _ in block_ids]
        if rows and rows == list(range(rows[0], rows[0] + len(rows))):
            self.slab[rows[0] : rows[-1] + 1].copy_(records)  # the usual case: consecutive rows, one copy
        else:
            put_rows(self.slab, rows, records.contiguous())
        for block_id, row in zip(block_ids, rows):
            self.row_of[block_id] = row
            # A new block counts as used once: under lru-s it would otherwise be the first to leave.
            self.policy.admit(block_id)
            self.policy.use(block_id)

    def _reserve(self, n: int) -> None:
        if len(self.free_rows) >= n:
            return
        rows = self.slab.shape[0]
        capacity = max(_MIN_ROWS, 2 * rows, len(self) + n)
        if self.max_blocks is not None:
            capacity = min(capacity, self.max_blocks)  # never allocate past the budget
        slab = self.layout.empty(capacity)
        slab[:rows] = self.slab
        self.slab = slab
        # Pop from the end: lowest rows first, so a slab fills front to back.
        self.free_rows = list(range(capacity - 1, rows - 1, -1)) + self.free_rows

    def start_request(self) -> None:
        self.policy.start_request()

    def use(self, block_id: int) -> None:
        self.policy.use(block_id)

    def drop(self, block_ids: Iterable[int]) -> None:
        for block_id in block_ids:
            self.free_rows.append(self.row_of.pop(block_id))
            self.policy.discard(block_id)

    def truncate(self, n: int) -> None:
        self.drop([b for b in self.row_of if b >= n])

    def nbytes(self) -> int:
        """Bytes of the block records held (what the budget bounds)."""
        return len(self) * self.layout.record_bytes

    def allocated_bytes(self) -> int:
        """Bytes of the slab, used rows or not (never more than the budget)."""
        return self.slab.numel()
