"""The pure functions of InfLLM's retrieval (docs/METHOD.md section 2, steps 2 and 5).

Attention itself (partial results, masks, merge) lives in `inf_llm.kernels`; these functions score blocks
against a chunk of queries and summarise a block by its representative keys.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import torch


# 16-bit scoring keeps every partial sum below this (float16's largest finite value is 65504).
_FP16_SCORE_BOUND = 2.0**14


def ranking_query(queries: torch.Tensor, block_ranking: str, num_kv_heads: int) -> torch.Tensor:
    """The vector a chunk's queries rank the blocks with: (R, D) float32, matching the rows of a block's summary.

    queries: (Hq, Tq, D), rotated or not as the caller ranks. The chunk is summarised by its mean query.
    representatives: R = Hq, the mean query of each head (its dot with a head's representative is that head's
    score). bounds: R = 2 * Hkv, rows (max, min) per KV head: for each head h of KV head g's group,
    q_h . k <= relu(q_h) . max_g + min(q_h, 0) . min_g for every key k of the block (channel by channel), and the
    group's sum of these bounds is (sum_h relu(q_h)) . max_g + (sum_h min(q_h, 0)) . min_g: linear, so the
    scores are one matrix-vector product as for representatives.
    """
    query_mean = queries.float().mean(dim=1)  # (Hq, D)
    if block_ranking == "representatives":
        return query_mean
    hq, d = query_mean.shape
    grouped = query_mean.view(num_kv_heads, hq // num_kv_heads, d)
    return torch.stack((grouped.clamp(min=0).sum(1), grouped.clamp(max=0).sum(1)), dim=1).reshape(2 * num_kv_heads, d)


def block_scores(summaries: torch.Tensor, query: torch.Tensor, num_kv_heads: int, per_head: bool,
                 summary_absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Relevance of every memory block to a chunk of queries.

    summaries: (N, R, D), one summary per block (`representatives` or `key_bounds`), float32 or float16.
    query: (R, D) float32 from `ranking_query`.
    summary_absmax: float16 summaries only, a () tensor >= their largest absolute value.
    Returns (N,) summed over heads, or (Hkv, N) summed over each KV head's rows when per_head; float32,
    up to a positive factor for float16 summaries (rankings are all that scores are used for).

    float16: the product reads half the bytes (retrieval reads every summary once per chunk: at 64K
    tokens this is most of what decoding a token reads); the scores come back rounded to 16 bits. Any partial sum
    is bounded by sum|q| * max|r|; the query is scaled by a power of two so that bound stays under 2**14, so no
    score overflows whatever the model's key magnitudes (scaling by a power of two is exact).

    Speed on CPU (2 cores, 2043 blocks x 9 heads x 64 x 30 layers, as at 64K tokens): float32 7.7 ms in the
    column-major layout `LayerMemory` keeps (12.5 ms for rows); float16 rows 2.7 ms with `mv`, but 17 ms with
    `mm` and 17 ms column-major, so the layouts are the callers' business and these products fit them.
    """
    n, rows, d = summaries.shape
    if summaries.dtype == torch.float16:
        if summary_absmax is None:
            raise ValueError("float16 summaries need summary_absmax to bound the scores")
        query = fp16_ranking_query(query, summary_absmax, on_host=query.device.type == "cpu")
        flat = summaries.reshape(n, rows * d)
    else:
        flat = summaries.float().reshape(n, rows * d)  # a view (rows or column-major), no copy of the largest tensor
    if not per_head:
        # Summed over heads, the score is one matrix-vector product over all the summaries at once.
        return torch.mv(flat, query.reshape(rows * d)).float()
    # Each KV head's rows are contiguous (its query group's representatives, or its max and min).
    per_kv = flat.view(n, num_kv_heads, (rows // num_kv_heads) * d)
    return torch.einsum("nkg,kg->kn", per_kv, query.reshape(num_kv_heads, (rows // num_kv_heads) * d)).float()


def exact_block_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The second stage's score of candidate blocks: the exact logits of a chunk's mean query over their keys.

    queries: (Hq, Tq, D), as the chunk is ranked (rotated or not); keys: (Hkv, n, B, D) of the n candidates, as
    the global stage attends them. For each query head, the largest logit over a block's keys, summed over the
    heads: (n,) float32. A block is worth retrieving when some key of it stands out for some head, which is what
    the summaries of the first stage bound (key bounds are an upper bound of each head's largest logit).
    """
    hq, _, d = queries.shape
    hkv, n, b, _ = keys.shape
    query = queries.float().mean(dim=1).view(hkv, hq // hkv, d)  # (Hkv, G, D)
    # The logits as (Hkv, G, n * B): a block's keys are contiguous in each row, so the max over them reads
    # memory in order. The transposed product, (Hkv, n * B, G), took 2.4 ms per layer for 512 blocks of 16
    # keys on the CPU against 0.9 ms for this one (one thread, 3 KV heads of 3 queries, head dim 64).
    logits = torch.bmm(query, keys.reshape(hkv, n * b, d).float().transpose(1, 2))  # (Hkv, G, n * B)
    return logits.view(hkv, -1, n, b).amax(dim=3).sum(dim=(0, 1))


def peak_block_scores(queries: torch.Tensor, keys: torch.Tensor, slice_floats: int = 2**19, *,
                      per_head: bool = False) -> torch.Tensor:
    """Each block's peak logit for a chunk: for each query head, the largest logit of any of the chunk's queries over
    the block's keys, summed over the heads, (n,) float32 (`prompt_end_blocks`' votes: one query of a question
    looking for a passage stands out where the chunk's mean query does not); per_head: each head's, (n, Hq).

    queries: (Hq, Tq, D), as the chunk is ranked; keys: (Hkv, n, B, D) as the global stage attends them. The
    logits are formed a slice of blocks at a time, about `slice_floats` of them (2 MiB) per slice, reduced while
    they are still in the CPU's cache: for 512 blocks of 16 keys and 128 queries (a prompt's vote, once per layer)
    the whole product at once, 37 MB, took 47 ms against 16-24 ms in slices (one thread). Maxima and the per-block
    sum over heads do not depend on the slicing.
    """
    hq, tq, d = queries.shape
    hkv, n, b, _ = keys.shape
    group = hq // hkv
    grouped = queries.float().reshape(hkv, group * tq, d)  # a KV head's query heads are consecutive
    step = max(1, slice_floats // (hkv * group * tq * b))
    peaks = torch.empty((n, hq) if per_head else n, dtype=torch.float32, device=keys.device)
    for start in range(0, n, step):
        part = keys[:, start : start + step]
        width = part.shape[1]
        logits = torch.bmm(grouped, part.reshape(hkv, width * b, d).float().transpose(1, 2))  # (Hkv, G * Tq, w * B)
        # The largest over the queries first (along contiguous rows), then over each block's keys: half the time
        # of one reduction over both dimensions.
        rows = logits.view(hkv, group, tq, width * b).amax(dim=2)
        heads = rows.view(hkv, group, width, b).amax(dim=3)  # (Hkv, G, w): query head h is (h // G, h % G)
        peaks[start : start + width] = heads.reshape(hq, width).T if per_head else heads.sum(dim=(0, 1))
    return peaks


def code_basis(summaries: torch.Tensor, rank: int) -> torch.Tensor:
    """The basis of the approximate first stage, from summaries (n, R, D): (R*D, rank + 1) float32, column 0
    their mean, then their `rank` principal directions (computed in float64: once per layer, and the codes of a
    resumed session are the saved ones, so it is never computed twice for one memory)."""
    flat = summaries.reshape(summaries.shape[0], -1).double()
    mean = flat.mean(dim=0)
    _, _, vt = torch.linalg.svd(flat - mean, full_matrices=False)
    if vt.shape[0] < rank:
        raise ValueError(f"ranking_code_rank={rank} exceeds the {vt.shape[0]} directions of summaries of "
                         f"{flat.shape[1]} numbers from {flat.shape[0]} blocks; lower ranking_code_rank")
    return torch.cat((mean[:, None], vt[:rank].T), dim=1).float()


def summary_codes(summaries: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Each summary's code (n, rank) float32: its coordinates along the basis's directions, rounded to float16
    (saturated at its largest finite value), so that saving them as 16-bit numbers loses nothing."""
    flat = summaries.reshape(summaries.shape[0], -1).float()
    codes = (flat - basis[:, 0]) @ basis[:, 1:]
    return codes.clamp(-65504.0, 65504.0).half().float()


def summary_rows(summaries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The summaries (N, R, D) of blocks `ids`, (n, R, D). Contiguous rows are gathered as flat rows: on the CPU,
    4,096 of 65,536 float16 summaries took 0.2 ms that way and 2.7 ms by indexing the 3-d tensor."""
    n, rows, d = summaries.shape
    if summaries.is_contiguous():
        return summaries.view(n, rows * d).index_select(0, ids).view(-1, rows, d)
    return summaries.index_select(0, ids)  # float32's column-major layout: no flat view without a copy


def code_shortlist(codes: torch.Tensor, basis: torch.Tensor, query: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` blocks (ascending ids) whose codes estimate the best scores against `query` (R, D) float32.

    A block's score is linear in its summary s: q . s = q . mean + (V q) . code + (what the directions miss), so
    the codes rank blocks by (V q) . code, r numbers read per block instead of R * D.
    """
    return select_blocks(torch.mv(codes, basis[:, 1:].T @ query.reshape(-1).float()), count)


def fp16_ranking_query(query: torch.Tensor, summary_absmax: torch.Tensor, *, on_host: bool) -> torch.Tensor:
    """`query` (float32) scaled by a power of two so that sum|q| * max|summary| stays under 2**14, as float16.

    on_host: compute the power of two from host floats (on the CPU, where a dozen tiny tensor ops cost more than a
    decoding step's ranking product and reading values back is free); otherwise with tensor ops, which a GPU runs
    without a stall. Both give the same factor; a bound that is not finite gives 0, and the layer then refuses
    the summaries.
    """
    if on_host:
        bound = query.abs().sum().item() * summary_absmax.item()
        factor = 2.0 ** -math.ceil(math.log2(max(bound / _FP16_SCORE_BOUND, 1.0))) if math.isfinite(bound) else 0.0
        return (query * factor).half()
    bound = query.abs().sum() * summary_absmax.float()
    exponent = torch.ceil(torch.log2(torch.clamp(bound / _FP16_SCORE_BOUND, min=1.0)))
    return (query * torch.where(torch.isfinite(bound), torch.exp2(-exponent), 0.0)).half()


def select_blocks(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best blocks along the last dim, sorted ascending (all of them when there are <= k).

    Equal scores go to the earlier block. `torch.topk` leaves ties unspecified, and they are common: blocks of
    repeated text have equal summaries, and 16-bit summaries round near-ties to ties. Left to topk, the choice
    differed between CPU and CUDA (seen on an H200); here it is a function of the scores alone.
    """
    n = scores.shape[-1]
    if n <= k:
        return torch.arange(n, device=scores.device).expand(*scores.shape[:-1], n)
    if scores.device.type == "cpu":
        # Where the k-th best is strictly ahead of the next, the set is unambiguous: topk's own answer. The check
        # reads a value back to the host, free on the CPU and a stall on a GPU, which takes the general path.
        top = torch.topk(scores, k + 1, dim=-1)
        bounds = top.values.view(-1, k + 1)[:, k - 1 :].tolist()
        if all(kth > next_ for kth, next_ in bounds):
            return top.indices[..., :k].sort(dim=-1).values
        if all(kth == kth for kth, _ in bounds):  # (a NaN k-th score: the stable sort orders it)
            return _select_with_ties(scores, k, [kth for kth, _ in bounds])
    return select_blocks_earliest_on_ties(scores, k)


def _select_with_ties(scores: torch.Tensor, k: int, kth: list[float]) -> torch.Tensor:
    """`select_blocks` on the CPU when the k-th best score is tied: every block strictly above it, then the
    earliest blocks equal to it. Two passes over the scores, where a stable sort of 65,536 scores (a layer's
    blocks at 1M tokens) cost ~3 ms, twice per layer and decoding step."""
    rows = scores.view(-1, scores.shape[-1])
    chosen = []
    for row, value in zip(rows, kth):
        above = torch.nonzero(row > value).view(-1)
        equal = torch.nonzero(row == value).view(-1)[: k - above.shape[0]]
        chosen.append(torch.cat((above, equal)).sort().values)
    return torch.stack(chosen).view(*scores.shape[:-1], k)


def select_blocks_earliest_on_ties(scores: torch.Tensor, k: int) -> torch.Tensor:
    """`select_blocks` without reading anything back: a stable sort keeps equal scores in block order. Three
    kernels on a GPU, where decoding is bound by kernel launches; on the CPU it runs only when a tie straddles
    the k-th place (a stable sort of 8K scores costs ~20x topk there)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k].sort(dim=-1).values


def second_stage_choice(exact: torch.Tensor, excluded: torch.Tensor, in_ram: torch.Tensor | None, first: torch.Tensor,
                        m: int) -> torch.Tensor:
    """Places (ascending) of the m shortlist candidates the second stage adds to the kept ones.

    exact: (n,) the candidates' exact scores (-inf where not computed); excluded: (n,) bool, the kept ones;
    in_ram: (n,) bool, the candidates that were scored exactly (None: all of them); first: (n,) their first-stage
    scores. The best m by exact score among the scored, not excluded candidates; when there are fewer, all of them
    and then the others (not scored, not excluded) in the first stage's order. Equal scores go to the earlier
    candidate. Needs at least m candidates that are not excluded.
    """
    if m == 0:
        return torch.zeros(0, dtype=torch.long, device=exact.device)
    if in_ram is None:
        return select_blocks(exact.masked_fill(excluded, -torch.inf), m)
    eligible = in_ram & ~excluded
    scored = int(eligible.sum())
    if scored >= m:
        return select_blocks(exact.masked_fill(~eligible, -torch.inf), m)
    rest = select_blocks(first.float().masked_fill(eligible | excluded, -torch.inf), m - scored)
    return torch.cat((torch.nonzero(eligible).view(-1), rest)).sort().values


def with_following(ids: torch.Tensor, following: int, num_blocks: int) -> torch.Tensor:
    """Chosen block ids (n,) and the `following` blocks after each that exist: sorted, each once.

    A passage cut by a block boundary (a sentence whose start ranks high and whose end sits in the next block)
    comes back whole. Blocks are consecutive in the stream, so block b + 1 holds the tokens right after b's.
    """
    if following == 0:
        return ids
    extended = (ids[:, None] + torch.arange(following + 1, device=ids.device)).flatten()
    return torch.unique(extended[extended < num_blocks])


def tally_votes(votes: list[list[int]], weights: str) -> Counter:
    """The prompt end's tally (`prompt_end_tally`): each layer's voted block ids, best first, summed over layers.

    count: every vote counts one (a block voted by many layers wins). rank: a layer's i-th vote counts 1/i, the
    sum of reciprocal ranks (a block that a few layers put first outweighs one that many put last: on long prose
    the question's passage is singled out by a few layers, while many give their last votes to the document's
    first blocks). Exact fractions, so that equal sums tie exactly whatever the order they were added in.
    """
    tally: Counter = Counter()
    for layer_votes in votes:
        for rank, block in enumerate(layer_votes):
            tally[block] += 1 if weights == "count" else Fraction(1, rank + 1)
    return tally


def voted_places(tally: Counter, places: int, run: int, num_blocks: int, taken: set[int] | frozenset = frozenset()
                 ) -> list[int]:
    """The prompt end's chosen blocks: `voted_runs` one after the other, in the order filled."""
    return [block for chosen in voted_runs(tally, places, run, num_blocks, taken) for block in chosen]


def voted_runs(tally: Counter, places: int, run: int, num_blocks: int, taken: set[int] | frozenset = frozenset()
               ) -> list[list[int]]:
    """`places` blocks filled in the tally's order (most votes first, ties: the lower id), each voted block bringing
    up to `run` - 1 neighbours (`prompt_end_run`): one list per voted block, itself first, then its neighbours in
    the order filled.

    A run grows one block at a time, on the side whose next block has more votes (ties: the block after the run),
    and stops early where both sides are taken or past the memory's ends. On prose a fact's sentence spans two
    16-token blocks, and the question's queries single out the one with its key words: run 2 brings the other
    (often the value's digits) in the same places, where the next best votes would be other passages. Blocks in
    `taken` (chosen by an earlier round) are neither chosen again nor part of a run. run 1: the most voted alone.
    """
    runs: list[list[int]] = []
    filled = 0
    have = set(taken)
    for block in sorted(tally, key=lambda b: (-tally[b], b)):
        if filled == places:
            break
        if block in have:
            continue
        chosen = [block]
        have.add(block)
        low = high = block
        while high - low + 1 < run and filled + len(chosen) < places:
            sides = [b for b in (high + 1, low - 1) if 0 <= b < num_blocks and b not in have]
            if not sides:
                break
            grown = max(sides, key=lambda b: (tally.get(b, 0), b))
            chosen.append(grown)
            have.add(grown)
            low, high = min(low, grown), max(high, grown)
        runs.append(chosen)
        filled += len(chosen)
    return runs


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


def key_bounds(keys: torch.Tensor) -> torch.Tensor:
    """Per-channel max and min of each block's keys, per KV head (Quest's page summary, Tang et al. 2024).

    keys: (N, Hkv, B, D) unrotated. Returns (N, 2 * Hkv, D) float32, rows (max, min) for each KV head in turn.
    """
    n, hkv, _, d = keys.shape
    k = keys.float()
    return torch.stack((k.amax(dim=2), k.amin(dim=2)), dim=2).reshape(n, 2 * hkv, d)
