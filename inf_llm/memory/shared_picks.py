"""`shared_blocks`: what one layer's exact second stage finds while decoding, every layer attends at the next step.

Blocks are aligned across layers (block b of every layer holds the same tokens), but each layer ranks its own
summaries, and on long prose a needle's block ranks high in a few layers only: at 64K tokens the trace of a case
the needle oracle answers shows the needle within the bounds' best 56 in 4-6 of 30 layers, and beyond the
shortlist of 512 in about half. The needle oracle (the needle forced into every layer) answers it. So each decoding
step counts, over layers, the blocks that the second stages chose by exact logits (not the first stage's kept
blocks: those are each layer's own summaries' view), and at the next ranked step every layer also attends the
`size` blocks chosen by the most layers (ties: the lower block id). A prompt chunk starts the count afresh, as do
a reset and a rollback; the first step after a prompt has nothing shared.

`shared_candidates` shares the count differently: the most chosen blocks of the step before join each layer's
shortlist as candidates, and the layer's own exact logits decide whether they are among its picks. At 64K tokens a
needle that ranks beyond the shortlist in most layers is still found by the second stages of a few; as candidates it
is judged by every layer's exact logits, which put it first in the layers that read it (the issue's measurements at
4K), without forcing a block into layers whose queries do not look for it.
"""

from __future__ import annotations

from collections import Counter

import torch


class SharedPicks:
    """The second stages' choices of the last ranked decoding step, counted over layers (one per memory)."""

    def __init__(self, size: int, candidates: int = 0, decay: float = 0.0):
        self.size, self.num_candidates, self.decay = size, candidates, decay
        self.clear()

    def clear(self) -> None:
        self._position: int | None = None  # the decoding step (its query's position) being counted
        self._votes: Counter[int] = Counter()
        self._tally: dict[int, float] = {}  # shared_decay: the earlier steps' votes, each step's weighed by decay
        # The previous ranked step's most chosen blocks, made a tensor once per step rather than once per layer.
        self._shared = torch.empty(0, dtype=torch.long)
        self._candidates = torch.empty(0, dtype=torch.long)

    def shared(self, position: int) -> torch.Tensor:
        """The blocks every layer also attends at the step of `position` (ascending ids, int64 on the CPU)."""
        self._advance(position)
        return self._shared

    def candidates(self, position: int) -> torch.Tensor:
        """The blocks that join every layer's shortlist at the step of `position` (ascending ids, int64 on the
        CPU): the `num_candidates` chosen by the most layers at the step before."""
        self._advance(position)
        return self._candidates

    def vote(self, position: int, block_ids: list[int]) -> None:
        """A layer's second stage chose `block_ids` at the step of `position`."""
        self._advance(position)
        self._votes.update(block_ids)

    def _advance(self, position: int) -> None:
        if position != self._position:
            tally = self._votes
            if self.decay:
                # Earlier steps count, each step's votes weighed down by `decay` per step since (powers of one
                # half are exact in floating point; any decay orders the same way on every machine).
                carried = {block: count * self.decay for block, count in self._tally.items()}
                for block, count in self._votes.items():
                    carried[block] = carried.get(block, 0.0) + count
                self._tally = tally = carried
            ranked = [block for block, _ in sorted(tally.items(), key=lambda item: (-item[1], item[0]))]
            self._shared = torch.tensor(sorted(ranked[: self.size]), dtype=torch.long)
            self._candidates = torch.tensor(sorted(ranked[: self.num_candidates]), dtype=torch.long)
            self._votes = Counter()
            self._position = position
