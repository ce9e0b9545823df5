"""Invariants of one layer's memory (docs/METHOD.md section 4), driven directly with random q/k/v.

Values are one-hot in the token's position, so a layer's output row *is* the attention weight each token
received: weights sum to 1, no token is attended twice, and which tokens were visible can be read off.
"""

import pytest
import torch

from inf_llm.config.schema import InfLLMConfig
from inf_llm.kernels import resolve_ops
from inf_llm.memory.layer_memory import LayerMemory
from inf_llm.memory.layer_state import LayerShape
from inf_llm.model.rope import RotaryTable
from inf_llm.storage.tier_settings import TierSettings
from tests.tiny_models import tiny_model

HQ, HKV, T = 4, 2, 120
SHAPE = LayerShape(HQ, HKV, T)  # head_dim = T so that a one-hot value can name every position


def _layer(overlap: bool | None = None, tiers: TierSettings | None = None, **overrides) -> LayerMemory:
    cfg = dict(
        num_sink_tokens=4, local_window=16, block_size=8, repr_tokens=2, topk_blocks=64, chunk_size=8,
        device_cache_blocks=64, storage_dtype="float32", kernel_backend="torch",
    )
    cfg.update(overrides)
    config = InfLLMConfig(**cfg)
    model = tiny_model("llama", head_dim=T)
    rotary = RotaryTable(model.model.rotary_emb, T, config.local_window + config.chunk_size + config.num_sink_tokens + 1, torch.device("cpu"))
    return LayerMemory(config, SHAPE, rotary, resolve_ops("torch", torch.device("cpu")),
                       dtype=torch.float32, storage_dtype=torch.float32, device=torch.device("cpu"), overlap=overlap,
                       tiers=tiers)


def _qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(HQ, T, T, generator=g) * 0.5
    k = torch.randn(HKV, T, T, generator=g) * 0.5
    v = torch.eye(T).expand(HKV, T, T).clone()  # value of token j = e_j
    return q, k, v


def _feed(layer: LayerMemory, q, k, v, pieces) -> torch.Tensor:
    outs, s = [], 0
    for n in pieces:
        outs.append(layer.forward(q[:, s : s + n], k[:, s : s + n], v[:, s : s + n], 0.125))
        s += n
    return torch.cat(outs, dim=1)  # (Hq, T, T): weights[h, query, key position]


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("pieces", [[T], [1] * T, [13, 40, 67]])
def test_weights_sum_to_one_and_each_token_counts_once(pieces, per_head):
    layer = _layer(per_head_ranking=per_head, device_cache_blocks=128)
    q, k, v = _qkv()
    weights = _feed(layer, q, k, v, pieces)
    torch.testing.assert_close(weights.sum(-1), torch.ones(HQ, T), atol=1e-5, rtol=0)
    assert (weights >= -1e-7).all()
    # Causality: no query sees a later token.
    assert weights.triu(diagonal=1).abs().max() < 1e-7
    # Every earlier token is visible exactly once: with all blocks retrieved, the weights equal one softmax
    # over the position rule (a token attended twice would carry twice its share).
    cfg, rotary = layer.config, layer.rotary
    kk = k.repeat_interleave(HQ // HKV, 0)  # (Hq, T, D)
    pos = torch.arange(T)
    rel = pos[:, None] - pos[None, :]
    # R(a)q . R(b)k = R(a-b)q . k: a local logit is the query rotated by the distance, against the plain key.
    logits = rotary.rotate_at(q, cfg.local_window) @ kk.transpose(-1, -2)  # far tokens: distance local_window
    for r in range(cfg.local_window):
        logits = torch.where(rel == r, rotary.rotate_at(q, r) @ kk.transpose(-1, -2), logits)
    logits = (logits * 0.125).masked_fill(rel < 0, -torch.inf)
    torch.testing.assert_close(weights, torch.softmax(logits, -1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ranking", [dict(), dict(block_ranking="bounds"), dict(rank_rotated=True),
                                     dict(repr_tokens=1), dict(block_ranking="bounds", rank_rotated=True),
                                     dict(following_blocks=1),
                                     dict(block_ranking="bounds", rank_rotated=True, rerank_blocks=6),
                                     dict(rank_rotated=True, rerank_blocks=5, following_blocks=1),
                                     dict(block_ranking="bounds", rank_rotated=True, rerank_blocks=6,
                                          rerank_keep_blocks=1),
                                     dict(block_ranking="bounds", rank_rotated=True, ranking_code_rank=2,
                                          ranking_code_blocks=5),
                                     dict(ranking_code_rank=3, ranking_code_blocks=6, rerank_blocks=6,
                                          rerank_keep_blocks=1),
                                     dict(block_ranking="bounds", rank_rotated=True, rank_distance=3),
                                     dict(block_ranking="bounds", rank_rotated=True, memory_distance=24,
                                          rank_distance=16, rerank_blocks=6)])
def test_chosen_blocks_equal_an_independent_recomputation_from_keys_and_attention(ranking):
    """Fed token by token with top-k below the number of blocks, each query attends exactly the blocks that a
    recomputation outside the memory chooses: block summaries from the keys fed and the attention mass each key
    received while in the window (read off the outputs, which are the attention weights), ranked by the query.
    This pins representatives (their layout through the buffer's growth), key bounds and the ranking; with
    rerank_blocks, the shortlist and its re-ranking by each head's largest exact logit in a block (with
    rerank_keep_blocks, after the summaries' best); with ranking_code_rank, beyond ranking_code_blocks blocks,
    the summaries rank only the blocks best by their projection on the principal subspace of the first
    ranking_code_blocks summaries (computed here by an eigendecomposition of their covariance); with rank_rotated,
    the query rotated to the global distance (memory_distance, else the window), or to rank_distance when set."""
    topk = 3
    layer = _layer(topk_blocks=topk, device_cache_blocks=8, repr_dtype="float32", **ranking)  # float16 rounds near-ties
    cfg, sinks, size, window = layer.config, layer.config.num_sink_tokens, layer.config.block_size, layer.config.local_window
    q, k, v = _qkv(3)
    weights = _feed(layer, q, k, v, [1] * T)  # (Hq, T queries, T keys)
    assert layer.blocks.num_blocks >= 4 * topk and layer._reprs.shape[0] > layer.blocks.num_blocks  # grown, with spare
    group = HQ // HKV
    # Mass of key j: the weight every query whose local band held it (0 <= P - j < window) gave it.
    rel = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    mass = (weights * ((rel >= 0) & (rel < window))).sum(1)  # (Hq, T)
    distance = cfg.rank_distance if cfg.rank_distance is not None else cfg.global_distance
    query = layer.rotary.rotate_at(q, distance) if cfg.rank_rotated else q  # (Hq, T, D)

    def summary(b: int) -> torch.Tensor:
        span = slice(sinks + b * size, sinks + (b + 1) * size)
        if cfg.block_ranking == "bounds":
            return torch.stack([torch.stack((k[g, span].amax(0), k[g, span].amin(0))) for g in range(HKV)])
        top = [mass[h, span].topk(cfg.repr_tokens).indices + span.start for h in range(HQ)]
        return torch.stack([k[h // group, top[h]].mean(0) for h in range(HQ)])

    def score(b: int, qp: torch.Tensor) -> float:
        s = summary(b)
        if cfg.block_ranking == "bounds":
            grouped = qp.view(HKV, group, -1)
            return sum(grouped[g].clamp(min=0).sum(0) @ s[g, 0] + grouped[g].clamp(max=0).sum(0) @ s[g, 1]
                       for g in range(HKV)).item()
        return sum(qp[h] @ s[h] for h in range(HQ)).item()

    def exact(b: int, qp: torch.Tensor) -> float:
        span = slice(sinks + b * size, sinks + (b + 1) * size)
        return sum((k[h // group, span] @ qp[h]).max() for h in range(HQ)).item()

    def clear_top(scored: list[tuple[float, int]], n: int, tolerance: float = 1e-4) -> set[int] | None:
        """The n best blocks, or None at a near-tie (rounding may pick either; the clear cases are pinned)."""
        ranked = sorted(scored, reverse=True)
        if len(ranked) > n and ranked[n - 1][0] - ranked[n][0] < tolerance * abs(ranked[0][0]):
            return None
        return {b for _, b in ranked[:n]}

    def flat_query(qp: torch.Tensor) -> torch.Tensor:
        """The query in the layout of a flattened summary (its dot with one is the block's score)."""
        if cfg.block_ranking == "bounds":
            grouped = qp.view(HKV, group, -1)
            return torch.stack([torch.stack((grouped[g].clamp(min=0).sum(0), grouped[g].clamp(max=0).sum(0)))
                                for g in range(HKV)]).flatten()
        return qp.flatten()

    calibration, projector, mean = cfg.ranking_code_blocks, None, None
    if cfg.ranking_code_rank:
        first = torch.stack([summary(b).flatten() for b in range(calibration)]).double()
        mean = first.mean(0)
        _, vectors = torch.linalg.eigh((first - mean).T @ (first - mean))  # ascending eigenvalues
        directions = vectors[:, -cfg.ranking_code_rank :]
        projector = directions @ directions.T

    def pool(formed: list[int], qp: torch.Tensor) -> list[int] | None:
        """The blocks the summaries rank: every formed one, or the codes' clear best (None at a near-tie)."""
        if projector is None or len(formed) <= calibration:
            return formed
        estimate = [(((summary(b).flatten().double() - mean) @ projector @ flat_query(qp).double()).item(), b)
                    for b in formed]
        best = clear_top(estimate, calibration, tolerance=1e-2)  # codes are rounded to float16
        return None if best is None else sorted(best)

    checked, coded = 0, 0
    for p in range(T):
        formed = [b for b in range(T) if sinks + (b + 1) * size <= p - window]  # evicted before query p
        if len(formed) <= topk:
            continue
        ranked = pool(formed, query[:, p])
        if ranked is None:
            continue
        coded += ranked != formed and clear_top([(score(b, query[:, p]), b) for b in formed], topk) != \
            clear_top([(score(b, query[:, p]), b) for b in ranked], topk)
        chosen = clear_top([(score(b, query[:, p]), b) for b in ranked], cfg.rerank_blocks or topk)
        if chosen is not None and cfg.rerank_blocks:
            # The summaries' best rerank_keep_blocks stay, the exact logits choose the rest of the shortlist.
            kept = clear_top([(score(b, query[:, p]), b) for b in ranked], cfg.rerank_keep_blocks) or set()
            others = clear_top([(exact(b, query[:, p]), b) for b in chosen - kept], topk - len(kept))
            chosen = None if others is None or (cfg.rerank_keep_blocks and not kept) else kept | others
        if chosen is None:
            continue
        chosen |= {b + 1 for b in chosen if b + 1 in formed and cfg.following_blocks}  # and the next block
        for b in formed:
            seen = weights[:, p, sinks + b * size : sinks + (b + 1) * size]
            assert (seen > 0).all() if b in chosen else (seen == 0).all(), (p, b, sorted(chosen))
        checked += 1
    assert checked >= 40
    if projector is not None:
        assert layer.codes is not None
        assert coded > 0  # the codes' shortlist changed what the summaries alone would choose


@pytest.mark.parametrize("per_head,bias", [(False, 0.0), (True, 0.0), (False, 1.5)])
@pytest.mark.parametrize("pieces", [[T], [1] * T])
def test_trace_records_the_blocks_and_the_weights_the_layer_attended(per_head, bias, pieces):
    """The trace's chosen blocks and per-token weights are those of the attention itself (one-hot values make
    the outputs the weights); with the sinks, remainder and window its weights sum to one per query and head.
    decode_memory_bias too: the decoding steps' weights are the biased attention's."""
    from inf_llm.memory.retrieval_trace import RetrievalTrace, sources

    layer = _layer(topk_blocks=3, device_cache_blocks=16, per_head_ranking=per_head, repr_dtype="float32",
                   decode_memory_bias=bias)
    trace = layer.trace = RetrievalTrace(layer.config.block_size, layer.config.num_sink_tokens)
    q, k, v = _qkv(4)
    weights = _feed(layer, q, k, v, pieces)  # (Hq, T, T)
    step = layer.config.chunk_size
    assert len(trace.chunks) == sum(-(-n // step) for n in pieces)  # one record per chunk the layer attended
    group = HQ // HKV
    for chunk in trace.chunks:
        rows = weights[:, chunk.start : chunk.start + chunk.queries]  # (Hq, c, T)
        total = chunk.sink_weight + chunk.remainder_weight + chunk.window_weight + float(chunk.token_weight.sum())
        assert abs(total - 1.0) < 1e-4
        ids = chunk.blocks if chunk.blocks.dim() == 2 else chunk.blocks[None].expand(HKV, -1)
        token_weight = chunk.token_weight if chunk.token_weight.dim() == 3 else None
        for g in range(HKV):
            heads = rows[g * group : (g + 1) * group]
            for index, block in enumerate(ids[g].tolist()):
                a, b = trace.block_span(block)
                seen = heads[:, :, a:b].sum(dim=(0, 1)) / (HQ * chunk.queries)
                if token_weight is not None:
                    torch.testing.assert_close(token_weight[g, index], seen, atol=1e-5, rtol=1e-4)
                elif g == 0:
                    expected = rows[:, :, a:b].sum(dim=(0, 1)) / (HQ * chunk.queries)
                    torch.testing.assert_close(chunk.token_weight[index], expected, atol=1e-5, rtol=1e-4)
            if chunk.scores is not None and not per_head:
                best = int(chunk.scores.argmax())
                assert chunk.rank_of(best) == 0 and best in chunk.blocks.tolist()
    # Sources: the retrieved passages of the last queries, most attended first, weights from the same records.
    found = sources(trace, since=T - 10, limit=3)
    assert found and all(s.end - s.start >= layer.config.block_size for s in found)
    assert [s.weight for s in found] == sorted((s.weight for s in found), reverse=True)


@pytest.mark.parametrize("per_head", [False, True])
def test_top_k_retrieval_attends_whole_blocks_and_the_always_visible_groups(per_head):
    layer = _layer(topk_blocks=2, device_cache_blocks=4, per_head_ranking=per_head)
    q, k, v = _qkv(1)
    weights = _feed(layer, q, k, v, [1] * T)
    cfg = layer.config
    p = T - 1  # the last query: sinks, 2 blocks, remainder and its window must be exactly what it saw
    # Per-head ranking lets each KV head retrieve its own blocks; look at one KV head's query group.
    seen = (weights[: HQ // HKV, p] > 0).any(0).nonzero().flatten().tolist()
    evicted_end = p - cfg.local_window + 1  # tokens before this left the window
    n_blocks_before = (evicted_end - 1 - cfg.num_sink_tokens) // cfg.block_size  # blocks formed before the last token
    sinks = set(range(cfg.num_sink_tokens))
    window = set(range(evicted_end, p + 1))
    blocks_end = cfg.num_sink_tokens + n_blocks_before * cfg.block_size
    remainder = set(range(blocks_end, evicted_end))
    from_blocks = set(seen) - sinks - window - remainder
    assert sinks | window | remainder <= set(seen)
    assert len(from_blocks) == 2 * cfg.block_size
    starts = {(j - cfg.num_sink_tokens) // cfg.block_size for j in from_blocks}
    assert len(starts) == 2  # two whole blocks, nothing else


@pytest.mark.parametrize("pieces", [[T], [13, 40, 67], [1] * T, [60] + [1] * (T - 60)])
def test_prefill_top_k_applies_to_chunks_of_a_prompt_and_top_k_to_decoding_steps(pieces):
    """A chunk of more than one query retrieves prefill_topk_blocks, a one-token step topk_blocks: the outputs
    equal those of a layer whose topk_blocks is the one that applies, chunk by chunk, exactly."""
    q, k, v = _qkv(7)
    # Key bounds: a block's summary is its keys alone, so the three layers hold the same memory whatever each
    # retrieved (representatives would depend on the attention each key received).
    same = dict(device_cache_blocks=8, chunk_size=8, block_ranking="bounds")
    both = _feed(_layer(topk_blocks=2, prefill_topk_blocks=5, **same), q, k, v, pieces)
    prompt_like = _feed(_layer(topk_blocks=5, **same), q, k, v, pieces)
    step_like = _feed(_layer(topk_blocks=2, **same), q, k, v, pieces)
    s = 0
    for n in pieces:
        # A call of n tokens runs in chunks of chunk_size; a last chunk of one token is a decoding step too.
        for c in range(s, s + n, 8):
            size = min(8, s + n - c)
            want = prompt_like if size > 1 else step_like
            assert torch.equal(both[:, c : c + size], want[:, c : c + size]), (c, size)
        s += n
    assert not torch.equal(prompt_like, step_like)  # the two budgets do choose differently here


@pytest.mark.parametrize("pieces", [[T], [13, 40, 67], [1] * T])
def test_a_shortlist_of_top_k_blocks_gives_the_one_stage_outputs(pieces):
    """With rerank_blocks = topk_blocks the second stage keeps the whole shortlist: the outputs are those of the
    summaries alone, bit for bit, although its keys were read through the cache first; a longer shortlist does
    change the choice here (so the second stage runs)."""
    q, k, v = _qkv(5)
    same = dict(topk_blocks=3, device_cache_blocks=8, block_ranking="bounds", rank_rotated=True)
    one_stage = _feed(_layer(**same), q, k, v, pieces)
    assert torch.equal(_feed(_layer(rerank_blocks=3, **same), q, k, v, pieces), one_stage)
    assert not torch.equal(_feed(_layer(rerank_blocks=8, **same), q, k, v, pieces), one_stage)
    # Keeping the summaries' whole top-k leaves the exact logits nothing to choose: the one-stage outputs again.
    assert torch.equal(_feed(_layer(rerank_blocks=8, rerank_keep_blocks=3, **same), q, k, v, pieces), one_stage)


def test_rerank_chunks_false_re_ranks_decoding_steps_only():
    """With rerank_chunks: false, a prompt's chunks (more than one query) choose as the summaries alone do and
    each decoding step (one query) as the two stages do: the outputs are theirs, bit for bit, query by query.
    Key bounds depend only on the keys, so the two reference layers hold the same summaries."""
    q, k, v = _qkv(6)
    pieces = [40, 24, 16] + [1] * 40  # 80 prompt queries read in chunks, then 40 decoding steps
    same = dict(topk_blocks=3, device_cache_blocks=8, block_ranking="bounds", rank_rotated=True)
    one_stage = _feed(_layer(**same), q, k, v, pieces)
    two_stages = _feed(_layer(rerank_blocks=8, **same), q, k, v, pieces)
    decoding_only = _feed(_layer(rerank_blocks=8, rerank_chunks=False, **same), q, k, v, pieces)
    prompt = slice(0, 80)
    steps = slice(80, T)
    assert torch.equal(decoding_only[:, prompt], one_stage[:, prompt])
    assert torch.equal(decoding_only[:, steps], two_stages[:, steps])
    # Both parts differ between the references, so each equality above says which stage chose.
    assert not torch.equal(one_stage[:, prompt], two_stages[:, prompt])
    assert not torch.equal(one_stage[:, steps], two_stages[:, steps])


_TWO_STAGES = dict(topk_blocks=3, device_cache_blocks=8, block_ranking="bounds", rank_rotated=True, rerank_blocks=8,
                   rerank_chunks=False, rerank_keep_blocks=1)


def test_a_second_stage_that_reads_no_disk_is_the_same_while_every_block_is_in_ram():
    """rerank_reads_disk: false scores only the candidates held in RAM: with every block in RAM (no host budget)
    that is every candidate, and the outputs are those of the second stage that reads every candidate, bit for
    bit; they differ from the first stage alone, so the second stage did choose."""
    q, k, v = _qkv(6)
    pieces = [40, 24, 16] + [1] * 40
    reads_all = _feed(_layer(**_TWO_STAGES), q, k, v, pieces)
    ram_only = _feed(_layer(rerank_reads_disk=False, **_TWO_STAGES), q, k, v, pieces)
    assert torch.equal(ram_only, reads_all)
    one_stage = {**_TWO_STAGES, "rerank_blocks": None, "rerank_chunks": True, "rerank_keep_blocks": 0}
    assert not torch.equal(_feed(_layer(**one_stage), q, k, v, pieces)[:, 80:], reads_all[:, 80:])


@pytest.mark.parametrize("reads_disk", [False, True])
def test_a_second_stage_that_reads_no_disk_reads_only_the_chosen_blocks_from_disk(reads_disk):
    """With room in RAM for two blocks' records (the rest on disk), each decoding step of rerank_reads_disk: false
    reads from disk exactly the blocks it attends that were only on disk when the step began (values are one-hot,
    so the output row names the attended tokens); reading every candidate reads more."""
    q, k, v = _qkv(8)
    record = 2 * HKV * 8 * T * 4  # K and V of one block of 8 tokens, float32
    small = {**_TWO_STAGES, "rerank_blocks": 5, "device_cache_blocks": 5}  # RAM: 5 slots + 2 records, of 7-12 blocks
    layer = _layer(tiers=TierSettings(host_budget_bytes=2 * record), rerank_reads_disk=reads_disk, **small)
    _feed(layer, q, k, v, [40, 24, 16])
    cfg, extra, only_on_disk = layer.config, [], []
    for t in range(80, T):
        n = layer.blocks.num_blocks
        in_ram = layer.blocks.in_ram(list(range(n)))
        only_on_disk.append(in_ram.count(False))
        before = layer.blocks.disk_reads
        out = layer.forward(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], 0.125)
        start = lambda b: cfg.num_sink_tokens + b * cfg.block_size  # noqa: E731
        attended = [b for b in range(n) if (out[:, 0, start(b) : start(b) + cfg.block_size] > 0).any()]
        assert len(attended) == cfg.topk_blocks
        from_disk = sum(not in_ram[b] for b in attended)
        extra.append(layer.blocks.disk_reads - before - from_disk)
    assert min(only_on_disk) > 0  # at every step some blocks were only on disk
    if reads_disk:
        assert min(extra) >= 0 and sum(extra) > 0
    else:
        assert extra == [0] * len(extra)


@pytest.mark.parametrize("seed", range(6))
def test_second_stage_choice_follows_its_rule(seed):
    """Oracle, by sorting: the m best not-excluded scored candidates by exact score, or, when fewer are scored, all
    of them and then the best of the others by first-stage score; ties to the earlier candidate."""
    from inf_llm.memory.ranking import second_stage_choice

    g = torch.Generator().manual_seed(seed)
    n = 24
    exact = torch.randint(0, 5, (n,), generator=g).float()
    first = torch.randint(0, 5, (n,), generator=g).float()
    excluded = torch.rand(n, generator=g) < 0.2
    in_ram = torch.rand(n, generator=g) < (0.15 if seed % 2 else 0.8)
    for m in (0, 1, 4, 10):
        scored = [i for i in range(n) if in_ram[i] and not excluded[i]]
        others = [i for i in range(n) if not in_ram[i] and not excluded[i]]
        by_exact = sorted(scored, key=lambda i: (-exact[i].item(), i))
        by_first = sorted(others, key=lambda i: (-first[i].item(), i))
        want = sorted(by_exact[:m] if len(scored) >= m else scored + by_first[: m - len(scored)])
        got = second_stage_choice(exact.masked_fill(~in_ram, -torch.inf), excluded, in_ram, first, m)
        assert got.tolist() == want
        every = sorted(sorted((i for i in range(n) if not excluded[i]), key=lambda i: (-exact[i].item(), i))[:m])
        assert second_stage_choice(exact, excluded, None, first, m).tolist() == every


@pytest.mark.parametrize("pieces", [[T], [13, 40, 67], [1] * T])
def test_forcing_every_block_is_retrieving_every_block(pieces):
    """The benchmark's oracle adds blocks to each choice: forcing ids that cover every block (most of them not
    formed yet, which are skipped) gives a top-2 layer the outputs of a layer whose top-k takes every block, bit for
    bit; forcing nothing (None) leaves the top-2 outputs."""
    q, k, v = _qkv(7)
    same = dict(device_cache_blocks=64, block_ranking="bounds", rank_rotated=True)
    every = _feed(_layer(topk_blocks=64, **same), q, k, v, pieces)
    top2 = _feed(_layer(topk_blocks=2, **same), q, k, v, pieces)
    forced = _layer(topk_blocks=2, **same)
    forced.forced_blocks = torch.arange(1000)
    assert torch.equal(_feed(forced, q, k, v, pieces), every)
    forced.reset()
    forced.forced_blocks = None
    assert torch.equal(_feed(forced, q, k, v, pieces), top2)
    assert not torch.equal(top2, every)


def test_sinks_are_kept_and_blocks_form_every_block_size_evicted_tokens():
    layer = _layer()
    q, k, v = _qkv(2)
    cfg = layer.config
    sinks_seen = None
    for t in range(T):
        layer.forward(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], 0.125)
        evicted = max(0, layer.num_seen - cfg.local_window)
        n_sinks = min(evicted, cfg.num_sink_tokens)
        assert layer.sink_k.shape[1] == n_sinks
        assert layer.window_len == min(layer.num_seen, cfg.local_window)
        rest = evicted - n_sinks
        assert layer.blocks.num_blocks == rest // cfg.block_size
        assert layer.rem_k.shape[1] == rest % cfg.block_size
        if n_sinks == cfg.num_sink_tokens:
            if sinks_seen is None:
                sinks_seen = layer.sink_k.clone()
            assert torch.equal(layer.sink_k, sinks_seen)  # never evicted, never changed
    torch.testing.assert_close(sinks_seen, k[:, : cfg.num_sink_tokens])
    # Blocks hold exactly the evicted tokens after the sinks, in order.
    for b in range(layer.blocks.num_blocks):
        start = cfg.num_sink_tokens + b * cfg.block_size
        bk, bv = layer.blocks.host_block(b)
        assert torch.equal(bk, k[:, start : start + cfg.block_size])


@pytest.mark.parametrize("policy,decay", [("lru", None), ("lru-s", 0.9), ("fifo", None)])
def test_cache_policy_changes_nothing_but_hits(policy, decay):
    q, k, v = _qkv(3)
    reference = _feed(_layer(topk_blocks=3, device_cache_blocks=64), q, k, v, [5] * 24)
    layer = _layer(topk_blocks=3, device_cache_blocks=4, cache_policy=policy, score_decay=decay)
    torch.testing.assert_close(_feed(layer, q, k, v, [5] * 24), reference, atol=0, rtol=0)
    assert layer.blocks.resident_blocks() <= 4
    assert layer.blocks.misses > 0


def test_snapshot_restore_rolls_back_exactly():
    layer = _layer(topk_blocks=3, device_cache_blocks=8)
    q, k, v = _qkv(4)
    _feed(layer, q[:, :50], k[:, :50], v[:, :50], [50])
    snap = layer.snapshot()
    first = _feed(layer, q[:, 50:], k[:, 50:], v[:, 50:], [70])
    layer.restore(snap)
    again = _feed(layer, q[:, 50:], k[:, 50:], v[:, 50:], [70])
    torch.testing.assert_close(again, first, atol=0, rtol=0)


@pytest.mark.parametrize("per_head", [False, True])
def test_block_scores_are_the_chunk_mean_query_against_each_representative(per_head):
    from inf_llm.memory.ranking import block_scores, ranking_query

    g = torch.Generator().manual_seed(5)
    reprs, queries = torch.randn(7, 6, 8, generator=g), torch.randn(6, 5, 8, generator=g)
    per_query_head = torch.stack([(reprs[:, h] * queries[h].mean(0)).sum(-1) for h in range(6)])  # (Hq, N)
    expected = per_query_head.view(2, 3, 7).sum(1) if per_head else per_query_head.sum(0)
    query = ranking_query(queries, "representatives", 2)
    torch.testing.assert_close(block_scores(reprs, query, 2, per_head), expected)


@pytest.mark.parametrize("per_head", [False, True])
def test_bound_scores_bound_every_keys_logit_and_are_tight_for_one_key(per_head):
    """Key bounds score a block by sum over a group's heads of the channel-wise bound of q . k: never below the
    sum of the heads' largest logits over the block's keys, and equal to it when the block holds one key."""
    from inf_llm.memory.ranking import block_scores, key_bounds, ranking_query

    g = torch.Generator().manual_seed(7)
    n, hq, hkv, b, d = 9, 6, 2, 5, 8
    keys, queries = torch.randn(n, hkv, b, d, generator=g), torch.randn(hq, 3, d, generator=g)
    q = queries.mean(1).view(hkv, hq // hkv, d)  # (Hkv, G, D)
    best = torch.einsum("kgd,nkbd->nkgb", q, keys).amax(-1).sum(-1)  # (N, Hkv): each head's largest logit, summed
    exact = best.T if per_head else best.sum(-1)
    got = block_scores(key_bounds(keys), ranking_query(queries, "bounds", hkv), hkv, per_head)
    assert (got >= exact - 1e-5).all() and (got > exact + 1e-3).any()
    one = keys[:, :, :1]
    best1 = torch.einsum("kgd,nkbd->nkgb", q, one).amax(-1).sum(-1)
    got1 = block_scores(key_bounds(one), ranking_query(queries, "bounds", hkv), hkv, per_head)
    torch.testing.assert_close(got1, best1.T if per_head else best1.sum(-1))


def test_exact_block_scores_are_each_heads_largest_logit_summed_and_under_the_key_bounds():
    """The second stage's score, against a loop over blocks and heads in float64: for each query head the largest
    logit of the chunk's mean query over the block's keys (its KV head's), summed over heads; the key bounds'
    score is never below it."""
    from inf_llm.memory.ranking import block_scores, exact_block_scores, key_bounds, ranking_query

    g = torch.Generator().manual_seed(8)
    n, hq, hkv, b, d = 11, 6, 2, 5, 8
    keys, queries = torch.randn(hkv, n, b, d, generator=g), torch.randn(hq, 3, d, generator=g)
    mean = queries.double().mean(1)
    expected = torch.tensor([sum(float((keys[h // 3, i].double() @ mean[h]).max()) for h in range(hq))
                             for i in range(n)], dtype=torch.float64)
    got = exact_block_scores(queries, keys)
    assert got.shape == (n,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    bounds = block_scores(key_bounds(keys.transpose(0, 1)), ranking_query(queries, "bounds", hkv), hkv, False)
    assert (bounds >= got - 1e-5).all()


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("magnitude", [1.0, 3000.0])
def test_float16_block_scores_rank_like_float64_and_never_overflow(per_head, magnitude):
    """16-bit scoring reads half the bytes; scores are rounded to 16 bits (a positive factor aside), so well
    separated blocks rank exactly as in float64, and keys of any magnitude give finite scores."""
    from inf_llm.memory.ranking import block_scores, ranking_query, select_blocks

    g = torch.Generator().manual_seed(6)
    n, hq, hkv, d = 300, 6, 2, 16
    reprs, queries = magnitude * torch.randn(n, hq, d, generator=g), magnitude * torch.randn(hq, 4, d, generator=g)
    per_query_head = torch.einsum("nhd,hd->hn", reprs.double(), queries.double().mean(1))  # (Hq, N)
    exact = per_query_head.view(hkv, hq // hkv, n).sum(1) if per_head else per_query_head.sum(0)
    half = reprs.half()
    query = ranking_query(queries, "representatives", hkv)
    got = block_scores(half, query, hkv, per_head, half.abs().amax().float())
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # Up to the power-of-two factor that kept the sums in range, the same scores (to 16-bit rounding).
    factor = (exact.abs().amax(-1, keepdim=True) / got.abs().amax(-1, keepdim=True)).double()
    assert torch.allclose(torch.log2(factor), torch.log2(factor).round(), atol=0.01)
    torch.testing.assert_close(got.double() * factor, exact, rtol=0, atol=3e-3 * exact.abs().max().item())
    # The 8 best blocks, where the 8th is well ahead of the 9th, are the same.
    order = exact.sort(dim=-1, descending=True).values
    separated = (order[..., 7] - order[..., 8]) > 1e-2 * exact.abs().amax(-1)
    same = (select_blocks(got, 8) == select_blocks(exact, 8)).all(-1)
    assert same[separated].all() and separated.any()
    with pytest.raises(ValueError, match="summary_absmax"):
        block_scores(half, query, hkv, per_head)


@pytest.mark.parametrize("absmax", [0.0, 1e-3, 1.0, 2.0**14, 3.0 * 2.0**14, 65504.0, float("inf")])
def test_float16_ranking_query_scales_alike_from_host_floats_and_on_the_device(absmax):
    """The CPU computes the float16 query's power-of-two scale from host floats, a GPU with tensor ops (no stall):
    the two are the same function, at bounds right on a power of two and for an infinite bound."""
    from inf_llm.memory.ranking import fp16_ranking_query

    g = torch.Generator().manual_seed(11)
    for query in (torch.randn(6, 16, generator=g), torch.full((6, 16), 1.0 / 96), torch.zeros(6, 16)):
        bound = torch.tensor(absmax)
        host = fp16_ranking_query(query, bound, on_host=True)
        device = fp16_ranking_query(query, bound, on_host=False)
        assert host.dtype == device.dtype == torch.float16
        assert torch.equal(host, device)
        if absmax == float("inf"):
            assert not host.any()
        else:
            assert host.float().abs().sum().item() * absmax <= 2.0**14 * 1.001  # the bound the scale exists for


def test_representatives_keep_their_values_in_either_layout_through_buffer_growth():
    """float32 representatives are stored column-major, float16 as rows (the layouts ranking is fast on); both
    hold the same values through the buffer's doublings, and state_dict gives them as plain rows."""
    q, k, v = _qkv(3)
    layers = {dtype: _layer(repr_dtype=dtype) for dtype in ("float32", "float16")}
    for layer in layers.values():
        for start in range(0, T, 7):  # odd pieces: blocks form at every point of a chunk
            layer.forward(q[:, start : start + 7], k[:, start : start + 7], v[:, start : start + 7], 0.125)
    wide, half = layers["float32"], layers["float16"]
    assert wide.blocks.num_blocks >= 12  # grown from 0 through 1, 2, 4, 8, 16 rows
    assert wide.reprs.dtype == torch.float32 and wide.reprs.stride(0) == 1  # column-major
    assert half.reprs.dtype == torch.float16 and half.reprs.is_contiguous()
    # Every block is retrieved (topk_blocks >= blocks), so ranking cannot differ: the same keys and masses.
    assert torch.equal(half.reprs, wide.reprs.half())
    saved = wide.state_dict()["reprs"]
    assert saved.is_contiguous() and torch.equal(saved, wide.reprs)
    assert saved.untyped_storage().nbytes() == saved.numel() * 4  # without the buffer's spare capacity


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("pieces", [[T], [1] * T, [13, 40, 67]])
def test_staged_chunks_equal_the_fused_ones(pieces, per_head):
    """The staged schedule (CUDA's: local partial first, retrieval, then the global partial merged by log-sum-exp)
    computes what the fused chunk attention does: the same outputs, blocks, representatives and key masses, with
    top-k retrieval through a device cache small enough to evict."""
    cache = 3 * HKV if per_head else 4  # per-head ranking may ask for top-k blocks per KV head at once
    fused = _layer(overlap=False, topk_blocks=3, device_cache_blocks=cache, per_head_ranking=per_head)
    staged = _layer(overlap=True, topk_blocks=3, device_cache_blocks=cache, per_head_ranking=per_head)
    assert not fused.overlap and staged.overlap
    q, k, v = _qkv(4)
    torch.testing.assert_close(_feed(staged, q, k, v, pieces), _feed(fused, q, k, v, pieces), atol=1e-5, rtol=1e-4)
    assert staged.blocks.num_blocks == fused.blocks.num_blocks >= 10
    assert staged.blocks.misses == fused.blocks.misses > 0  # the same blocks were chosen, evictions included
    torch.testing.assert_close(staged.reprs, fused.reprs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(staged.win_score[:, staged.win_start : staged.win_end],
                               fused.win_score[:, fused.win_start : fused.win_end], atol=1e-5, rtol=1e-4)


def test_keys_beyond_float16_fail_with_a_clear_error_under_float16_representatives():
    q, k, v = _qkv(5)
    k = k * 1e6  # |key| ~ 5e5 > 65504: a float16 representative would be infinite
    wide = _layer(repr_dtype="float32")
    wide.forward(q, k, v, 1e-7)  # float32 representatives hold them
    assert torch.isfinite(wide.reprs).all()
    with pytest.raises(ValueError, match="float16's range.*repr_dtype: float32"):
        _layer(repr_dtype="float16").forward(q, k, v, 1e-7)


@pytest.mark.parametrize("shape", [(40,), (3, 40)])
@pytest.mark.parametrize("k", [1, 5, 39])
@pytest.mark.parametrize("levels", [3, 12, 10**6])  # few distinct scores: ties everywhere; many: almost none
def test_block_selection_breaks_ties_toward_the_earlier_block(shape, k, levels):
    """Oracle: order by (score descending, index ascending), take k. Both the CPU path and the one without a
    host read-back (the CUDA path) must give it, on scores with many ties and with none."""
    from inf_llm.memory.ranking import select_blocks, select_blocks_earliest_on_ties

    g = torch.Generator().manual_seed(levels + k)
    scores = torch.randint(0, levels, shape, generator=g).float() / 7
    rows = scores.view(-1, shape[-1]).tolist()
    expected = torch.tensor([sorted(sorted(range(len(r)), key=lambda i: (-r[i], i))[:k]) for r in rows]).view(*shape[:-1], k)
    assert torch.equal(select_blocks(scores, k), expected)
    assert torch.equal(select_blocks_earliest_on_ties(scores, k), expected)


@pytest.mark.parametrize("stages", [dict(), dict(rerank_blocks=8, rerank_chunks=False)])
def test_decode_rank_every_reuses_the_last_ranked_steps_blocks(stages):
    """With decode_rank_every = 3, a prompt's chunks and every third decoding step (the first after a prompt,
    then each third) choose as a layer that ranks every step does, bit for bit; the two steps after each attend
    exactly the memory blocks that step chose. Key bounds depend only on the keys, so both layers hold the same
    memory whatever they attended."""
    q, k, v = _qkv(6)
    pieces = [40, 24, 16] + [1] * 20 + [8] + [1] * 12  # a prompt, 20 steps, a second prompt, 12 steps
    same = dict(topk_blocks=3, device_cache_blocks=8, block_ranking="bounds", rank_rotated=True, **stages)
    every = _feed(_layer(**same), q, k, v, pieces)
    reused = _feed(_layer(decode_rank_every=3, **same), q, k, v, pieces)
    cfg = _layer(**same).config
    sinks, size, window = cfg.num_sink_tokens, cfg.block_size, cfg.local_window

    def attended_blocks(p: int) -> set[int]:
        formed = [b for b in range(T) if sinks + (b + 1) * size <= p - window]
        return {b for b in formed if (reused[:, p, sinks + b * size : sinks + (b + 1) * size] > 0).all()}

    ranked_at, differs = None, 0
    for p, prompt in [(p, False) for p in range(80, 100)] + [(p, True) for p in range(100, 108)] \
            + [(p, False) for p in range(108, T)]:
        if prompt:
            ranked_at = None
            assert torch.equal(reused[:, p], every[:, p]), p
            continue
        first = 80 if p < 100 else 108
        if (p - first) % 3 == 0:
            ranked_at = p
            assert torch.equal(reused[:, p], every[:, p]), p
        else:
            assert attended_blocks(p) == attended_blocks(ranked_at), (p, ranked_at)
            differs += not torch.equal(reused[:, p], every[:, p])
    assert torch.equal(reused[:, :80], every[:, :80])
    assert differs >= 5  # the reused choice is not what ranking at those steps would have chosen


def test_decode_rank_every_rolls_back_and_resumes_mid_reuse():
    """A snapshot taken between two ranked decoding steps holds the choice being reused: restored (or loaded
    into a new layer from the state dict), the layer attends what it attended the first time."""
    q, k, v = _qkv(7)
    cfg = dict(topk_blocks=3, device_cache_blocks=8, block_ranking="bounds", decode_rank_every=4)
    layer = _layer(**cfg)
    _feed(layer, q[:, :70], k[:, :70], v[:, :70], [64] + [1] * 6)  # ranked at steps 1 and 5, so two steps still reuse
    assert layer._reuse_left == 2
    snap, state = layer.snapshot(), layer.state_dict()
    rest = [1] * 20 + [10] + [1] * 20
    first = _feed(layer, q[:, 70:], k[:, 70:], v[:, 70:], rest)
    layer.restore(snap)
    torch.testing.assert_close(_feed(layer, q[:, 70:], k[:, 70:], v[:, 70:], rest), first, atol=0, rtol=0)
    resumed = _layer(**cfg)
    resumed.load_state_dict(state)
    torch.testing.assert_close(_feed(resumed, q[:, 70:], k[:, 70:], v[:, 70:], rest), first, atol=0, rtol=0)
    # Without the saved reuse (a session saved before the setting existed), the next step ranks afresh.
    legacy = _layer(**cfg)
    legacy.load_state_dict({key: value for key, value in state.items() if not key.startswith("reuse_")})
    assert legacy._reused is None and legacy._reuse_left == 0
    assert not torch.equal(_feed(legacy, q[:, 70:], k[:, 70:], v[:, 70:], rest), first)  # so the saved reuse mattered
    # Resumed under a smaller setting (every step ranks), nothing saved is reused.
    ranking = _layer(**{**cfg, "decode_rank_every": 1})
    ranking.load_state_dict(state)
    assert ranking._reused is None and ranking._reuse_left == 0


_POOL_PIECES = [64] + [1] * 40 + [8] + [1] * 8  # a prompt, 40 steps, a second prompt, 8 steps


@pytest.mark.parametrize("stages", [dict(), dict(rerank_blocks=4, rerank_keep_blocks=1)])
def test_reply_pool_ranks_the_pool_and_the_blocks_formed_since(stages):
    """reply_pool_blocks = 5, reply_pool_every = 3: a decoding step that ranks every block (the first of a reply
    whose layer holds more than 5 blocks, then every third) keeps its 5 best by the key bounds as the pool, and
    the next two steps choose among the pool and the blocks formed since, by the bounds (and, with
    rerank_blocks, the exact logits over the shortlist they give). Recomputed here from the keys fed; a prompt
    ends the pool. With a pool larger than the memory nothing changes, bit for bit."""
    q, k, v = _qkv(11)
    same = dict(topk_blocks=3, device_cache_blocks=8, block_ranking="bounds", rank_rotated=True,
                repr_dtype="float32", **stages)
    pooled_layer = _layer(reply_pool_blocks=5, reply_pool_every=3, **same)
    weights = _feed(pooled_layer, q, k, v, _POOL_PIECES)
    everything = _feed(_layer(**same), q, k, v, _POOL_PIECES)
    assert torch.equal(_feed(_layer(reply_pool_blocks=64, **same), q, k, v, _POOL_PIECES), everything)
    cfg = pooled_layer.config
    sinks, size, window, group = cfg.num_sink_tokens, cfg.block_size, cfg.local_window, HQ // HKV
    query = pooled_layer.rotary.rotate_at(q, window)

    def score(b: int, qp: torch.Tensor) -> float:
        span = slice(sinks + b * size, sinks + (b + 1) * size)
        grouped = qp.view(HKV, group, -1)
        return sum(grouped[g].clamp(min=0).sum(0) @ k[g, span].amax(0) + grouped[g].clamp(max=0).sum(0)
                   @ k[g, span].amin(0) for g in range(HKV)).item()

    def exact(b: int, qp: torch.Tensor) -> float:
        span = slice(sinks + b * size, sinks + (b + 1) * size)
        return sum((k[h // group, span] @ qp[h]).max() for h in range(HQ)).item()

    def clear_top(scored: list[tuple[float, int]], n: int) -> set[int] | None:
        ranked = sorted(scored, reverse=True)
        if len(ranked) > n and ranked[n - 1][0] - ranked[n][0] < 1e-4 * abs(ranked[0][0]):
            return None
        return {b for _, b in ranked[:n]}

    def choose(ranked: list[int], qp: torch.Tensor) -> set[int] | None:
        chosen = clear_top([(score(b, qp), b) for b in ranked], cfg.rerank_blocks or cfg.topk_blocks)
        if chosen is not None and cfg.rerank_blocks:
            kept = clear_top([(score(b, qp), b) for b in ranked], cfg.rerank_keep_blocks)
            others = clear_top([(exact(b, qp), b) for b in chosen - kept], cfg.topk_blocks - len(kept))
            chosen = None if kept is None or others is None else kept | others
        return chosen

    pool, pool_end, left, checked, differs, fresh = None, 0, 0, 0, 0, 0
    position = 0
    for piece in _POOL_PIECES:
        steps = range(position, position + piece)
        position += piece
        if piece > 1:
            pool, left = None, 0  # a prompt ends the pool
            continue
        p = steps[0]
        formed = [b for b in range(T) if sinks + (b + 1) * size <= p - window]
        if not formed:
            continue
        since = set()
        if left:
            left -= 1
            since = set(range(pool_end, len(formed)))
            ranked = sorted(pool | since)
        else:
            ranked = formed
            if len(formed) > 5:
                pool, pool_end, left = clear_top([(score(b, query[:, p]), b) for b in formed], 5), len(formed), 2
                if pool is None:
                    pytest.fail("a near-tie at the pool's edge: choose another seed")
        chosen = choose(ranked, query[:, p])
        if chosen is None:
            continue
        for b in formed:
            seen = weights[:, p, sinks + b * size : sinks + (b + 1) * size]
            assert (seen > 0).all() if b in chosen else (seen == 0).all(), (p, b, sorted(chosen), ranked)
        checked += 1
        differs += not torch.equal(weights[:, p], everything[:, p])
        fresh += bool(chosen & since)
    assert checked >= 40
    assert differs >= 3  # the pool changed what ranking every block chooses
    assert fresh >= 1  # and a block formed after its pool was chosen


def test_reply_pool_rolls_back_and_resumes_mid_term():
    """A snapshot taken while a pool serves holds it: restored, or loaded into a new layer, the layer attends what
    it attended the first time; a state saved without a pool (before the setting), or under a larger pool than
    the layer's setting, ranks every block at the next step."""
    q, k, v = _qkv(12)
    cfg = dict(topk_blocks=3, device_cache_blocks=8, block_ranking="bounds", reply_pool_blocks=5, reply_pool_every=6)
    layer = _layer(**cfg)
    _feed(layer, q[:, :78], k[:, :78], v[:, :78], [64] + [1] * 14)  # pools formed at 68 and 74
    assert layer._pool is not None and layer._pool_left == 2
    snap, state = layer.snapshot(), layer.state_dict()
    rest = [1] * 20 + [10] + [1] * 12
    first = _feed(layer, q[:, 78:], k[:, 78:], v[:, 78:], rest)
    layer.restore(snap)
    torch.testing.assert_close(_feed(layer, q[:, 78:], k[:, 78:], v[:, 78:], rest), first, atol=0, rtol=0)
    resumed = _layer(**cfg)
    resumed.load_state_dict(state)
    torch.testing.assert_close(_feed(resumed, q[:, 78:], k[:, 78:], v[:, 78:], rest), first, atol=0, rtol=0)
    legacy = _layer(**cfg)
    legacy.load_state_dict({key: value for key, value in state.items() if not key.startswith("pool_")})
    assert legacy._pool is None and legacy._pool_left == 0
    assert not torch.equal(_feed(legacy, q[:, 78:], k[:, 78:], v[:, 78:], rest), first)  # the saved pool mattered
    smaller = _layer(**{**cfg, "reply_pool_blocks": 4})
    smaller.load_state_dict(state)
    assert smaller._pool is None and smaller._pool_left == 0


def test_ranking_codes_roll_back_with_the_memory():
    """The codes' basis comes from the first ranking_code_blocks summaries: a rollback to before it existed and a
    different continuation give the codes, basis and outputs of a fresh layer fed that continuation; a rollback
    after it keeps them, and replaying gives the first run's outputs again."""
    same = dict(topk_blocks=2, device_cache_blocks=8, ranking_code_rank=2, ranking_code_blocks=4)
    q, k, v = _qkv(9)
    q2, k2, v2 = _qkv(10)
    other = [torch.cat((a[:, :40], b[:, 40:]), dim=1) for a, b in ((q, q2), (k, k2), (v, v2))]
    layer = _layer(**same)
    _feed(layer, q[:, :40], k[:, :40], v[:, :40], [8] * 5)
    early = layer.snapshot()
    assert layer.codes is None and layer.blocks.num_blocks < 4
    first = torch.cat([layer.forward(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], 0.125) for t in range(40, 90)], 1)
    late = layer.snapshot()
    assert layer.codes is not None and layer.blocks.num_blocks > 4
    rest = torch.cat([layer.forward(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], 0.125) for t in range(90, T)], 1)
    layer.restore(late)
    again = torch.cat([layer.forward(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], 0.125) for t in range(90, T)], 1)
    assert torch.equal(again, rest)
    layer.restore(early)
    assert layer.codes is None
    changed = torch.cat([layer.forward(*(x[:, t : t + 1] for x in other), 0.125) for t in range(40, T)], 1)
    fresh = _layer(**same)
    _feed(fresh, *(x[:, :40] for x in other), [8] * 5)
    expected = torch.cat([fresh.forward(*(x[:, t : t + 1] for x in other), 0.125) for t in range(40, T)], 1)
    assert torch.equal(changed, expected) and not torch.equal(changed[:, :50], first)
    assert torch.equal(layer._code_basis, fresh._code_basis) and torch.equal(layer.codes, fresh.codes)


_SHARED_PIECES = [40, 24, 16] + [1] * 20 + [8] + [1] * 12  # a prompt, 20 steps, a second prompt, 12 steps


def _feed_model(groups: list[list[LayerMemory]], inputs, pieces) -> dict[int, torch.Tensor]:
    """Feed each group of layers as the layers of one model (each piece goes through every layer in turn, group
    after group): the weights of each layer, by id(layer)."""
    outs = {id(layer): [] for group in groups for layer in group}
    s = 0
    for n in pieces:
        for group in groups:
            for layer, (q, k, v) in zip(group, inputs):
                outs[id(layer)].append(layer.forward(q[:, s : s + n], k[:, s : s + n], v[:, s : s + n], 0.125))
        s += n
    return {key: torch.cat(out, dim=1) for key, out in outs.items()}


def _attended(weights: torch.Tensor, p: int, cfg: InfLLMConfig) -> set[int]:
    """The blocks (ids) whose every token the query at position p attended, from one-hot values' weights."""
    sinks, size = cfg.num_sink_tokens, cfg.block_size
    formed = [b for b in range(T) if sinks + (b + 1) * size <= p - cfg.local_window]
    return {b for b in formed if (weights[:, p, sinks + b * size : sinks + (b + 1) * size] > 0).all()}


@pytest.mark.parametrize("decay", [0.0, 0.5, 1.0])
def test_shared_blocks_add_the_blocks_most_layers_second_stages_chose_at_the_previous_step(decay):
    """Three layers share their second stages' choices (shared_blocks = 2, every top-k block chosen by exact
    logits: rerank_keep_blocks = 0). Against the same layers without sharing, fed the same queries and keys (key
    bounds depend only on the keys, so both hold the same memory): a prompt's chunks and the first decoding step
    after a prompt attend the same; every later step attends its own choice and the 2 blocks chosen by the most
    layers at the step before (ties: the lower block id), counted from what the layers without sharing attended.
    With shared_decay, the steps before it since the prompt count too, each weighed by decay per step since."""
    from collections import Counter

    from inf_llm.memory.shared_picks import SharedPicks

    same = dict(topk_blocks=3, device_cache_blocks=8, block_ranking="bounds", rank_rotated=True, rerank_blocks=8,
                rerank_chunks=False)
    inputs = [_qkv(seed) for seed in (7, 8, 9)]
    alone = [_layer(**same) for _ in inputs]
    shared = [_layer(shared_blocks=2, shared_decay=decay, **same) for _ in inputs]
    picks = SharedPicks(2, decay=decay)
    for layer in shared:
        layer.shared_picks = picks
    weights = _feed_model([alone, shared], inputs, _SHARED_PIECES)
    alone_w = [weights[id(layer)] for layer in alone]
    shared_w = [weights[id(layer)] for layer in shared]
    cfg = alone[0].config

    def attended(w: torch.Tensor, p: int) -> set[int]:
        return _attended(w, p, cfg)

    steps = [p for p in range(80, T) if not 100 <= p < 108]
    added = 0
    for p in steps:
        for a, w in zip(alone_w, shared_w):
            if p in (80, 108):  # the first step after a prompt: nothing is shared yet
                assert torch.equal(w[:, p], a[:, p]), p
                continue
            answer_start = 80 if p < 100 else 108
            votes = Counter()
            for j in range(answer_start, p):  # the steps since the prompt, the last one at weight 1
                weight = decay ** (p - 1 - j) if j < p - 1 else 1.0
                if weight == 0:
                    continue
                for other in alone_w:
                    for b in attended(other, j):
                        votes[b] += weight
            top = {b for b, _ in sorted(votes.items(), key=lambda item: (-item[1], item[0]))[:2]}
            assert attended(w, p) == attended(a, p) | top, p
            added += not top <= attended(a, p)
    for a, w in zip(alone_w, shared_w):
        assert torch.equal(w[:, :80], a[:, :80]) and torch.equal(w[:, 100:108], a[:, 100:108])
    assert added >= 10  # the shared blocks are often ones a layer would not have chosen


def _record_exact_scores(layer: LayerMemory, scored: dict) -> None:
    """Record every second stage's exact scores of a layer: scored[id(layer)][step position][block id]."""
    original = layer.blocks.score_blocks

    def score_blocks(ids, score):
        values = original(ids, score)
        scored.setdefault(id(layer), {})[layer.num_seen] = dict(zip(ids, values.tolist()))
        return values
    layer.blocks.score_blocks = score_blocks


def test_shared_candidates_join_each_shortlist_and_the_exact_logits_choose_among_them():
    """Three layers share their second stages' choices as candidates (shared_candidates = 3, rerank_blocks = 5 of
    up to 12 blocks, every top-k block chosen by exact logits). Each decoding step's choice is recomputed
    independently: the best 3 by exact score among the layer's own shortlist (what the same layer without
    sharing scored at that step) and the 3 blocks the sharing layers chose most at the step before (ties: the
    lower id), with each block's exact score read from a layer whose shortlist is every block. Prompts and the
    first step after a prompt choose as without sharing."""
    from collections import Counter

    from inf_llm.memory.shared_picks import SharedPicks

    same = dict(topk_blocks=3, block_ranking="bounds", rank_rotated=True, rerank_chunks=False)
    inputs = [_qkv(seed) for seed in (7, 8, 9)]
    alone = [_layer(rerank_blocks=5, device_cache_blocks=8, **same) for _ in inputs]
    every = [_layer(rerank_blocks=16, device_cache_blocks=16, **same) for _ in inputs]
    shared = [_layer(rerank_blocks=5, device_cache_blocks=8, shared_candidates=3, **same) for _ in inputs]
    picks = SharedPicks(0, 3)
    for layer in shared:
        layer.shared_picks = picks
    scored: dict[int, dict[int, dict[int, float]]] = {}  # layer -> step position -> block id -> exact score
    for layer in alone + every:
        _record_exact_scores(layer, scored)
    weights = _feed_model([alone, every, shared], inputs, _SHARED_PIECES)

    def attended(layer, p: int) -> set[int]:
        return _attended(weights[id(layer)], p, alone[0].config)

    steps = [p for p in range(80, T) if not 100 <= p < 108]
    widened = 0
    for p in steps:
        for a, e, w in zip(alone, every, shared):
            if p in (80, 108) or p not in scored[id(a)]:  # nothing shared yet, or too few blocks to rank
                assert attended(w, p) == attended(a, p), p
                continue
            votes = Counter(b for other in shared for b in attended(other, p - 1))
            candidates = {b for b, _ in sorted(votes.items(), key=lambda item: (-item[1], item[0]))[:3]}
            pool = set(scored[id(a)][p]) | candidates
            exact = scored[id(e)][p]
            best = sorted(pool, key=lambda b: (-exact[b], b))[:3]
            assert attended(w, p) == set(best), p
            widened += set(best) != attended(a, p)
    assert widened >= 5  # the candidates often change a layer's choice


def test_shared_votes_exact_counts_each_layers_best_candidates_by_exact_logits_kept_ones_included():
    """shared_votes: exact, with 1 of the top 3 kept from the summaries: each layer votes for the 2 candidates its
    exact logits rank best, whether the summaries kept them or not. The shared layers attend what the same
    layers without sharing attend plus the 2 most voted blocks of the step before, the votes recomputed from the
    exact scores those layers' second stages computed (ties: the lower id)."""
    from collections import Counter

    from inf_llm.memory.shared_picks import SharedPicks

    same = dict(topk_blocks=3, device_cache_blocks=8, block_ranking="bounds", rank_rotated=True, rerank_blocks=6,
                rerank_chunks=False, rerank_keep_blocks=1)
    inputs = [_qkv(seed) for seed in (7, 8, 9)]
    alone = [_layer(**same) for _ in inputs]
    shared = [_layer(shared_blocks=2, shared_votes="exact", **same) for _ in inputs]
    picks = SharedPicks(2)
    for layer in shared:
        layer.shared_picks = picks
    scored: dict = {}
    for layer in alone:
        _record_exact_scores(layer, scored)
    weights = _feed_model([alone, shared], inputs, _SHARED_PIECES)

    def attended(layer, p: int) -> set[int]:
        return _attended(weights[id(layer)], p, alone[0].config)

    added = 0
    for p in [p for p in range(81, T) if not 100 <= p <= 108]:
        votes = Counter()
        for a in alone:
            exact = scored[id(a)].get(p - 1, {})
            votes.update(sorted(exact, key=lambda b: (-exact[b], b))[:2])
        top = {b for b, _ in sorted(votes.items(), key=lambda item: (-item[1], item[0]))[:2]}
        for a, w in zip(alone, shared):
            assert attended(w, p) == attended(a, p) | top, p
            added += not top <= attended(a, p)
    assert added >= 5
