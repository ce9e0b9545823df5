"""Which cached memory block to evict: the cache policies of docs/METHOD.md section 1 (`cache_policy`).

One `EvictionPolicy` orders the blocks held by one cache tier (the device cache, the host-memory tier):

- ``lru``: evict the block used longest ago;
- ``lru-s``: evict the block with the lowest decayed selection score: each request multiplies every score by
  `score_decay`, and each use adds 1;
- ``fifo``: evict the block admitted longest ago.

A policy only orders keys; the tier that owns it moves the data. Costs: O(1) per use for every policy; choosing
the victims of a request is one scan of the keys, stopped early for lru and fifo (the reference scans for lru-s).
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Container, Hashable

from inf_llm.config.schema import CACHE_POLICIES

# lru-s keeps scores multiplied by a growing unit instead of decaying every score at every request (O(1) instead
# of O(entries) per request); they are renormalised before the unit could overflow a float.
_RENORMALISE_ABOVE = 1e100


class EvictionPolicy:
    def __init__(self, name: str, score_decay: float | None = None):
        if name not in CACHE_POLICIES:
            raise ValueError(f"cache policy {name!r} is unknown: must be one of {', '.join(map(repr, CACHE_POLICIES))}")
        if name == "lru-s" and not (score_decay is not None and 0.0 < score_decay < 1.0):
            raise ValueError(f"cache policy 'lru-s' needs score_decay in (0, 1), got {score_decay!r}")
        self.name, self.score_decay = name, score_decay
        # lru / fifo: oldest first. lru-s: key -> score * unit, in admission order (ties evict the oldest).
        self._order: OrderedDict[Hashable, float] = OrderedDict()
        self._unit = 1.0

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._order

    def start_request(self) -> None:
        """A new retrieval begins: lru-s decays every score (by growing the unit a use adds)."""
        if self.name != "lru-s":
            return
        self._unit /= self.score_decay
        if self._unit > _RENORMALISE_ABOVE:
            for key in self._order:
                self._order[key] /= self._unit
            self._unit = 1.0

    def admit(self, key: Hashable) -> None:
        """Start tracking `key` (newly cached), with no use yet."""
        if key in self._order:
            raise KeyError(f"{key!r} is already cached")
        self._order[key] = 0.0

    def use(self, key: Hashable) -> None:
        """`key` was selected by the current request."""
        if self.name == "lru":
            self._order.move_to_end(key)
        elif self.name == "lru-s":
            self._order[key] += self._unit

    def use_all(self, keys: list[Hashable]) -> None:
        """`use` each key in turn."""
        if self.name == "lru":
            move = self._order.move_to_end
            for key in keys:
                move(key)
        elif self.name == "lru-s":
            for key in keys:
                self._order[key] += self._unit

    def discard(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self, protected: Container[Hashable] = ()) -> Hashable | None:
        """The key to evict next, never one in `protected`; None if every key is protected."""
        chosen = self.victims(1, protected)
        return chosen[0] if chosen else None

    def victims(self, count: int, protected: Container[Hashable] = ()) -> list[Hashable]:
        """The next `count` keys to evict (fewer if too few are unprotected), in eviction order, none in
        `protected`; nothing is removed.

        One pass over the keys for all of them: a request that brings in many blocks (a second stage's shortlist
        fills the whole device cache) would otherwise rescan the protected keys once per miss. Evicting them one
        at a time while the request uses and admits protected keys chooses the same ones: uses and admissions
        move only protected keys, and removals keep the others' order.
        """
        if count <= 0:
            return []
        if self.name == "lru-s":
            candidates = ((score, i, key) for i, (key, score) in enumerate(self._order.items()) if key not in protected)
            return [key for _, _, key in heapq.nsmallest(count, candidates)]
        return list(itertools.islice((key for key in self._order if key not in protected), count))
