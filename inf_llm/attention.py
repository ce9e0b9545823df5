"""The pure functions of InfLLM's retrieval (ALGORITHM.md section 2, steps 2 and 5).

Attention itself (partial results, masks, merge) lives in `inf_llm.kernels`; these functions score blocks
against a chunk of queries and summarise a block by its representative keys.
"""

from __future__ import annotations

import torch


# 16-bit scoring keeps every partial sum below this (float16's largest finite value is 65504).
_FP16_SCORE_BOUND = 2.0**14


def block_scores(representatives: torch.Tensor, queries: torch.Tensor, num_kv_heads: int, per_head: bool,
                 repr_absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Relevance of every memory block to a chunk of queries.

    representatives: (N, Hq, D), one vector per block and query head, float32 or float16.
    queries: (Hq, Tq, D), the chunk's unrotated queries.
    repr_absmax: float16 representatives only, a () tensor >= their largest absolute value.
    Returns (N,) summed over heads, or (Hkv, N) summed over each KV head's query group when per_head; float32,
    up to a positive factor for float16 representatives (rankings are all that scores are used for).

    float16: the product reads half the bytes (retrieval reads every representative once per chunk: at 64K
    tokens this is most of what decoding a token reads); the scores come back rounded to 16 bits. Any partial sum
    is bounded by sum|q| * max|r|; the query is scaled by a power of two so that bound stays under 2**14, so no
    score overflows whatever the model's key magnitudes (scaling by a power of two is exact).

    Speed on CPU (2 cores, 2043 blocks x 9 heads x 64 x 30 layers, as at 64K tokens): float32 7.7 ms in the
    column-major layout `LayerMemory` keeps (12.5 ms for rows); float16 rows 2.7 ms with `mv`, but 17 ms with
    `mm` and 17 ms column-major, so the layouts are the callers' business and these products fit them.
    """
    n, hq, d = representatives.shape
    query_mean = queries.float().mean(dim=1)  # (Hq, D)
    if representatives.dtype == torch.float16:
        if repr_absmax is None:
            raise ValueError("float16 representatives need repr_absmax to bound the scores")
        bound = query_mean.abs().sum() * repr_absmax.float()
        exponent = torch.ceil(torch.log2(torch.clamp(bound / _FP16_SCORE_BOUND, min=1.0)))
        query_mean = (query_mean * torch.exp2(-exponent)).half()
        flat = representatives.reshape(n, hq * d)
        if not per_head:
            return torch.mv(flat, query_mean.reshape(hq * d)).float()
        group = hq // num_kv_heads
        per_kv = flat.view(n, num_kv_heads, group * d)
        return torch.einsum("nkg,kg->kn", per_kv, query_mean.reshape(num_kv_heads, group * d)).float()
    flat = representatives.float().reshape(n, hq * d)  # a view (rows or column-major), no copy of the largest tensor
    if not per_head:
        # Summed over heads, the score is one matrix-vector product over all the representatives at once.
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
    # Query head h reads KV head h // group: gather each group's chosen keys from its KV head directly (the keys
    # are not repeated per query head).
    per_kv = top.reshape(n, hkv, (hq // hkv) * repr_tokens)
    chosen = torch.gather(keys, 2, per_kv.unsqueeze(-1).expand(-1, -1, -1, d))  # (N, Hkv, G*r, D)
    return chosen.float().view(n, hq, repr_tokens, d).mean(dim=2)
