"""What retrieval did, chunk by chunk and layer by layer: the blocks chosen, how they ranked, the attention they got.

A diagnostic of InfLLM's memory (the retrieval step of arXiv 2402.04617, section 3): with a `RetrievalTrace` attached
(`InfLLMMemory.start_trace()`), every layer reports each chunk it attends, including each decoded token (a chunk
of one). Per chunk it keeps the chosen block ids, the score of every block (the ranking), and the attention weight
each token of the chosen blocks received (the union softmax of the local and global stages, recomputed here from
the same keys, so it equals what the layer attended), plus the weight left on sinks, remainder and window. With no
trace attached the layers do one attribute check per chunk and nothing else.

Tracing costs about one more attention computation per chunk and keeps the scores of every block: it is for the
`trace` benchmark command and for the chat's `!!sources`, not for everyday generation.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from inf_llm.kernels import reference as ref


@dataclass(frozen=True)
class ChunkTrace:
    layer: int
    start: int  # position of the chunk's first query
    queries: int
    blocks: torch.Tensor  # (n,) chosen block ids, or (Hkv, n) with per-head ranking
    scores: torch.Tensor | None  # (N,) or (Hkv, N) float32: every block's ranking score; None without blocks
    token_weight: torch.Tensor  # (n, B) or (Hkv, n, B): weight on each chosen token, mean over heads and queries
    sink_weight: float  # the same, summed over the sinks
    remainder_weight: float
    window_weight: float  # the local window and the chunk itself (complement keys included)

    def rank_of(self, block: int) -> int | None:
        """0 = the best-scored block (shared ranking: summed over heads; per-head: the best of the KV heads)."""
        if self.scores is None or block >= self.scores.shape[-1]:
            return None
        scores = self.scores if self.scores.dim() == 2 else self.scores[None]
        better = (scores > scores[:, block : block + 1]).sum(-1)
        return int(better.min())


@dataclass
class RetrievalTrace:
    """Records of every traced chunk, in the order the layers attended them."""

    block_size: int
    num_sink_tokens: int
    chunks: list[ChunkTrace] = field(default_factory=list)

    def block_span(self, block: int) -> tuple[int, int]:
        """Token positions [start, end) of memory block `block` (blocks are cut from the tokens after the sinks)."""
        start = self.num_sink_tokens + block * self.block_size
        return start, start + self.block_size

    def blocks_of(self, start: int, end: int) -> list[int]:
        """The blocks that hold any of the positions [start, end) (none for sink positions)."""
        first = max(start, self.num_sink_tokens)
        if end <= first:
            return []
        return list(range((first - self.num_sink_tokens) // self.block_size,
                          (end - 1 - self.num_sink_tokens) // self.block_size + 1))

    def blocks_of_spans(self, spans) -> list[int]:
        """The blocks that hold any position of any span [start, end), ascending."""
        return sorted({b for start, end in spans for b in self.blocks_of(start, end)})

    def record(self, layer: int, start: int, q_local: torch.Tensor, k_local: torch.Tensor, q_global: torch.Tensor,
               k_global: torch.Tensor, scale: float, *, local_offset: int, num_memory: int, window: int,
               parts: tuple[int, int, int], blocks: torch.Tensor | None, scores: torch.Tensor | None,
               global_bias: float = 0.0) -> None:
        """One chunk of one layer. q_local/q_global: (1, Hq, c, D) as attended; k_local: (1, Hkv, w + c, D);
        k_global: (1, Hkv, M + n_comp, D), the memory keys (sinks, blocks, remainder: `parts` tokens each) then
        the complement keys; offsets and global_bias as `chunk_attention` takes them."""
        hq, c = q_local.shape[1], q_local.shape[2]
        global_offset = local_offset + num_memory
        _, lse_local = ref.attend(q_local, k_local, k_local, scale, mask="band", q_offset=local_offset, window=window)
        _, lse_global = ref.attend(q_global, k_global, k_global, scale, mask="complement", q_offset=global_offset,
                                   window=window)
        lse = torch.logaddexp(lse_local, lse_global - global_bias)
        local = ref.key_mass(q_local, k_local, scale, lse, mask="band", q_offset=local_offset, window=window)
        # a global key's weight is exp(logit - bias - lse)
        glob = ref.key_mass(q_global, k_global, scale, lse + global_bias, mask="complement", q_offset=global_offset,
                            window=window)
        norm = hq * c  # weights sum to 1 per head and query
        n_sink, n_block, n_rem = parts
        memory = glob[0, :, :num_memory] / norm  # (Hq, M)
        block_part = memory[:, n_sink : n_sink + n_block]
        if blocks is None:
            blocks = torch.empty(0, dtype=torch.long)
            token_weight = torch.empty(0, self.block_size)
        elif blocks.dim() == 1:
            token_weight = block_part.sum(0).view(-1, self.block_size)
        else:  # per KV head: each head group's own blocks
            hkv = blocks.shape[0]
            token_weight = block_part.view(hkv, hq // hkv, -1).sum(1).view(hkv, -1, self.block_size)
        self.chunks.append(ChunkTrace(
            layer=layer, start=start, queries=c, blocks=blocks.cpu(), scores=None if scores is None else scores.float().cpu(),
            token_weight=token_weight.cpu(), sink_weight=float(memory[:, :n_sink].sum()),
            remainder_weight=float(memory[:, n_sink + n_block :].sum()),
            window_weight=float(local.sum() / norm + glob[0, :, num_memory:].sum() / norm)))

    def weight_on(self, chunk: ChunkTrace, start: int, end: int) -> float:
        """The weight `chunk`'s queries gave the positions [start, end) through retrieved blocks (mean over heads)."""
        total = 0.0
        ids = chunk.blocks if chunk.blocks.dim() == 2 else chunk.blocks[None]
        weights = chunk.token_weight if chunk.token_weight.dim() == 3 else chunk.token_weight[None]
        for head_ids, head_weights in zip(ids.tolist(), weights):
            for index, block in enumerate(head_ids):
                a, b = self.block_span(block)
                lo, hi = max(a, start), min(b, end)
                if lo < hi:
                    total += float(head_weights[index, lo - a : hi - a].sum())
        return total

    def block_weights(self, since: int, until: int | None = None) -> dict[int, float]:
        """Weight each retrieved block received from the queries at positions [since, until), summed over those
        queries and averaged over layers (so 1.0 = all of one query's attention in every layer)."""
        layers = {chunk.layer for chunk in self.chunks} or {0}
        totals: dict[int, float] = defaultdict(float)
        for chunk in self.chunks:
            if chunk.start < since or (until is not None and chunk.start >= until):
                continue
            ids = chunk.blocks if chunk.blocks.dim() == 2 else chunk.blocks[None]
            weights = chunk.token_weight if chunk.token_weight.dim() == 3 else chunk.token_weight[None]
            for head_ids, head_weights in zip(ids.tolist(), weights):
                for index, block in enumerate(head_ids):
                    totals[block] += float(head_weights[index].sum()) / len(layers)
        return dict(totals)


@dataclass(frozen=True)
class Source:
    start: int  # token positions [start, end) of a passage of contiguous retrieved blocks
    end: int
    weight: float  # attention it received, summed over the traced queries, averaged over layers


def sources(trace: RetrievalTrace, since: int, until: int | None = None, limit: int = 5) -> list[Source]:
    """The passages that retrieval brought back for the queries at positions [since, until), most attended
    first: contiguous retrieved blocks merged into one passage."""
    weights = trace.block_weights(since, until)
    passages: list[Source] = []
    for block in sorted(weights):
        start, end = trace.block_span(block)
        if passages and passages[-1].end == start:
            last = passages.pop()
            passages.append(Source(last.start, end, last.weight + weights[block]))
        else:
            passages.append(Source(start, end, weights[block]))
    return sorted(passages, key=lambda s: -s.weight)[:limit]
