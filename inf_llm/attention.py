"""The pure functions of InfLLM's retrieval (ALGORITHM.md section 2, steps 2 and 5).

Attention itself (partial results, masks, merge) lives in `inf_llm.kernels`; these functions score blocks
against a chunk of queries and summarise a block by its representative keys.
"""

from __future__ import annotations

import torch


def block_scores(representatives: torch.Tensor, queries: torch.Tensor, num_kv_heads: int, per_head: bool) -> torch.Tensor:
    """Relevance of every memory block to a chunk of queries.

    representatives: (N, Hq, D), one vector per block and query head.
    queries: (Hq, Tq, D), the chunk's unrotated queries.
    Returns (N,) summed over heads, or (Hkv, N) summed over each KV head's query group when per_head.
    """
    n, hq, d = representatives.shape
    query_mean = queries.float().mean(dim=1)  # (Hq, D)
    flat = representatives.float().reshape(n, hq * d)  # a view: (N, Hq*D), no copy of the largest tensor
    if not per_head:
        # Summed over heads, the score is one matrix-vector product over the contiguous representatives.
        return torch.mv(flat, query_mean.reshape(hq * d))
    group = hq // num_kv_heads
    per_kv = flat.view(n, num_kv_heads, group * d)  # (N, Hkv, G*D)
    return torch.einsum("nkg,kg->kn", per_kv, query_mean.reshape(num_kv_heads, group * d))


def select_blocks(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best blocks along the last dim, sorted ascending (all of them when there are <= k)."""
    n = scores.shape[-1]
    if n <= k:
        return torch.arange(n, device=scores.device).expand(*scores.shape[:-1], n)
    return torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values


def representatives(keys: torch.Tensor, scores: torch.Tensor, repr_tokens: int) -> torch.Tensor:
    """One vector per block and query head: the mean of the keys that received the most attention.

    keys: (N, Hkv, B, D) unrotated; scores: (N, Hq, B) accumulated attention mass of each key.
    Returns (N, Hq, D) float32.
    """
    n, hkv, b, d = keys.shape
    hq = scores.shape[1]
    top = torch.topk(scores, repr_tokens, dim=-1).indices  # (N, Hq, r)
    # Query head h reads KV head h // group: expand keys to query heads without copying.
    keys_per_q = keys.float().repeat_interleave(hq // hkv, dim=1)  # (N, Hq, B, D)
    chosen = torch.gather(keys_per_q, 2, top.unsqueeze(-1).expand(n, hq, repr_tokens, d))
    return chosen.mean(dim=2)
