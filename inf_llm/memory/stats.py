"""What the chat and the benchmarks show of a memory: `MemoryStats`, the same for every kind of memory."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryStats:
    """Per-model totals (summed over layers unless said otherwise)."""

    tokens: int  # tokens fed into the memory so far (positions)
    window_tokens: int  # per layer
    sink_tokens: int  # per layer
    remainder_tokens: int  # per layer
    block_tokens: int  # per layer
    blocks: int  # per layer
    device_blocks: int  # resident in the device cache, all layers
    host_blocks: int  # in the host store, all layers
    cache_hits: int
    cache_misses: int
    host_bytes: int
    device_bytes: int

    @property
    def cache_hit_rate(self) -> float | None:
        total = self.cache_hits + self.cache_misses
        return self.cache_hits / total if total else None
