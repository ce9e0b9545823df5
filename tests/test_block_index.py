"""BlockIndex (inf_llm/block_index.py) selects exactly what brute-force ranking selects: random summaries in both
dtypes and layouts, both ranking forms, per head or not, with ties, partial groups, appends and truncations; and the
embedded model's real summaries and ranking queries (slow)."""

import pytest
import torch

from inf_llm.memory.ranking import block_scores, key_bounds, ranking_query, select_blocks
from inf_llm.memory.block_index import BlockIndex

HKV, HQ, D = 3, 9, 64


def _layout(x: torch.Tensor, dtype: torch.dtype, column_major: bool) -> torch.Tensor:
    """x (N, R, D) in dtype, rows or LayerMemory's column-major view of an (R, D, N) buffer."""
    if not column_major:
        return x.to(dtype).contiguous()
    n, r, d = x.shape
    out = torch.empty((r, d, n), dtype=dtype).permute(2, 0, 1)
    out.copy_(x)
    return out


def _summaries(n: int, ranking: str, gen: torch.Generator, duplicates: bool = True) -> torch.Tensor:
    if ranking == "bounds":
        keys = torch.randn(n, HKV, 4, D, generator=gen) * 2
        x = key_bounds(keys)
    else:
        x = torch.randn(n, HQ, D, generator=gen)
    if duplicates and n > 8:
        # Repeated text: equal summaries, hence exact ties, across and inside groups.
        src = torch.randint(0, n, (n // 3,), generator=gen)
        dst = torch.randint(0, n, (n // 3,), generator=gen)
        x[dst] = x[src]
    return x


def _query(ranking: str, gen: torch.Generator, tokens: int = 3) -> torch.Tensor:
    q = torch.randn(HQ, tokens, D, generator=gen)
    return ranking_query(q, ranking, HKV)


def _check(index: BlockIndex, s: torch.Tensor, query: torch.Tensor, k: int, per_head: bool) -> None:
    """float16 (every preset's summaries): the index's choice is brute force's, bit for bit. float32: MKL scores
    a gathered subset with other kernels than the full product (which kernel depends on the row's position, the
    CPU's vector width and how the rows are split between threads), so two blocks whose scores lie within
    float32's error bound of each other may trade places at the k-th rank; any other difference fails."""
    absmax = s.abs().amax().float() if s.dtype == torch.float16 else None
    full = block_scores(s, query, HKV, per_head, absmax)
    want = select_blocks(full, k)
    got = index.select(s, query, k, per_head=per_head, summary_absmax=absmax)
    if s.dtype == torch.float16 or torch.equal(got, want):
        assert torch.equal(got, want), (got, want)
        return
    assert got.shape == want.shape
    heads = HKV if per_head else 1
    scores = full.view(heads, -1)
    # Error bound of a float32 dot product of n terms in any order: n * eps * sum |s_j q_j| (twice: both sides).
    magnitude = block_scores(s.float().abs(), query.abs(), HKV, per_head).view(heads, -1)
    tol = s.shape[1] * s.shape[2] * torch.finfo(torch.float32).eps * magnitude
    for h in range(heads):
        g, w = set(got.view(heads, -1)[h].tolist()), set(want.view(heads, -1)[h].tolist())
        for i in g - w:  # chosen by the index only: within the bounds of every block that brute force chose
            for j in w - g:
                assert scores[h, j] - scores[h, i] <= tol[h, i] + tol[h, j], (h, i, j, scores[h, i], scores[h, j])


CASES = [(dtype, col, ranking, per_head)
         for dtype in (torch.float16, torch.float32) for col in (False, True)
         for ranking in ("bounds", "representatives") for per_head in (False, True)]


@pytest.mark.parametrize("dtype,column_major,ranking,per_head", CASES)
def test_select_equals_brute_force(dtype, column_major, ranking, per_head):
    # Seeds every run repeats (hash() of a str changes with each interpreter's PYTHONHASHSEED); several per case,
    # since float32's near ties (duplicated summaries) show in a few seeds of ten.
    for seed in range(6):
        gen = torch.Generator().manual_seed(100 * seed + CASES.index((dtype, column_major, ranking, per_head)))
        # k >= N, k < N, N not a multiple of G, G = 1, a lone partial group, k just below N.
        for n, k, group in ((1, 4, 4), (37, 37, 8), (37, 50, 8), (203, 16, 16), (90, 5, 1), (300, 64, 32),
                            (64, 63, 16), (99, 1, 3)):
            s = _layout(_summaries(n, ranking, gen), dtype, column_major)
            index = BlockIndex.build(s, HKV, block_ranking=ranking, group_size=group)
            _check(index, s, _query(ranking, gen, 1 + n % 5), k, per_head)


def test_all_equal_summaries_tie_to_the_earliest():
    gen = torch.Generator().manual_seed(1)
    s = key_bounds(torch.randn(1, HKV, 4, D, generator=gen)).expand(300, -1, -1).to(torch.float16).contiguous()
    index = BlockIndex.build(s, HKV, group_size=16)
    for per_head in (False, True):
        _check(index, s, _query("bounds", gen), 20, per_head)


def test_near_ties_of_float16_scores():
    # Small perturbations that float16 scoring rounds to equal scores: ties that only the rounded values show.
    gen = torch.Generator().manual_seed(2)
    base = key_bounds(torch.randn(1, HKV, 4, D, generator=gen))
    x = base + 1e-4 * torch.randn(400, 2 * HKV, D, generator=gen)
    s = x.to(torch.float16)
    index = BlockIndex.build(s, HKV, group_size=8)
    for _ in range(5):
        _check(index, s, _query("bounds", gen), 32, False)


@pytest.mark.parametrize("dtype,column_major", [(torch.float16, False), (torch.float32, True), (torch.float32, False)])
def test_append_and_truncate_match_a_fresh_build(dtype, column_major):
    gen = torch.Generator().manual_seed(3)
    full = _layout(_summaries(300, "bounds", gen), dtype, column_major)
    index = BlockIndex(2 * HKV, D, HKV, group_size=16, dtype=dtype)
    n = 0
    for step in (1, 3, 15, 16, 17, 40, 1, 2, 60):  # crosses group boundaries in every way
        index.append(full[n : n + step])
        n += step
        fresh = BlockIndex.build(full[:n], HKV, group_size=16)
        assert torch.equal(index._bounds[: index.num_groups], fresh._bounds[: fresh.num_groups])
        _check(index, full[:n], _query("bounds", gen, 1), 8, False)
    for cut in (150, 149, 128, 5, 0):
        index.truncate(cut, full)
        fresh = BlockIndex.build(full[:cut], HKV, group_size=16)
        assert index.num_blocks == cut and torch.equal(index._bounds[: index.num_groups], fresh._bounds[: fresh.num_groups])
        if cut:
            _check(index, full[:cut], _query("bounds", gen, 1), 8, True)
    index.append(full[:70])  # after a rollback the blocks that follow are new ones
    fresh = BlockIndex.build(full[:70], HKV, group_size=16)
    assert torch.equal(index._bounds[: index.num_groups], fresh._bounds[: fresh.num_groups])


@pytest.mark.parametrize("dtype,column_major", [(torch.float16, False), (torch.float16, True), (torch.float32, True),
                                                (torch.float32, False)])
def test_gathered_rows_score_as_in_the_full_product(dtype, column_major):
    """The premise of exactness: `block_scores` of gathered rows (as the index gathers them) equals the full
    product's values bit for bit, whatever the subset's size, for float16 summaries (every preset's). For float32
    it holds where MKL's kernels allow (AVX2, with `_ROW_BLOCK` care), not on AVX-512, where the gathered rows'
    scores differ by up to 8 ulps (measured): there both must lie within the error bound of a float32 dot
    product summed in any order, n * eps * sum |s| |q| (the module's docstring says what that leaves)."""
    gen = torch.Generator().manual_seed(4)
    for n in (6, 7, 97, 403):
        s = _layout(_summaries(n, "bounds", gen, duplicates=False), dtype, column_major)
        index = BlockIndex.build(s, HKV, group_size=4)
        absmax = s.abs().amax().float() if dtype == torch.float16 else None
        q = _query("bounds", gen)
        for per_head in (False, True):
            full = block_scores(s, q, HKV, per_head, absmax)
            for size in (1, 2, 3, 5, n):
                ids = torch.randperm(n, generator=gen)[:size].sort().values
                sub, where = index._gather(s, ids, per_head)
                heads = HKV if per_head else 1
                got = block_scores(sub, q, HKV, per_head, absmax).view(heads, sub.shape[0])
                if dtype == torch.float16:
                    assert torch.equal(got[:, where], full.view(heads, n)[:, ids])
                    continue
                magnitude = block_scores(s.abs(), q.abs(), HKV, per_head).view(heads, n)[:, ids]
                bound = 2 * s.shape[1] * s.shape[2] * torch.finfo(torch.float32).eps * magnitude
                assert bool(((got[:, where] - full.view(heads, n)[:, ids]).abs() <= bound).all())


def test_bounds_are_upper_bounds_of_the_computed_scores():
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float16, torch.float32):
        for ranking in ("bounds", "representatives"):
            s = _summaries(256, ranking, gen).to(dtype)
            index = BlockIndex.build(s, HKV, block_ranking=ranking, group_size=8)
            absmax = s.abs().amax().float() if dtype == torch.float16 else None
            for per_head in (False, True):
                q = _query(ranking, gen)
                scores = block_scores(s, q, HKV, per_head, absmax).view(HKV if per_head else 1, 32, 8)
                upper = index.group_bounds(q, per_head, absmax, s)
                assert (upper >= scores.amax(dim=2).double()).all()


def test_rejects_mismatches():
    gen = torch.Generator().manual_seed(6)
    s = _summaries(40, "bounds", gen).half()
    index = BlockIndex.build(s, HKV)
    with pytest.raises(ValueError):
        index.select(s[:30], _query("bounds", gen), 4, summary_absmax=s.abs().amax().float())
    wrong_signs = -_query("bounds", gen)
    with pytest.raises(ValueError):
        index.select(s, wrong_signs, 4, summary_absmax=s.abs().amax().float())
    with pytest.raises(ValueError):
        index.truncate(41, s)
    assert index.nbytes() == 3 * (2 * HKV * D * 2 + 4)


@pytest.mark.slow
def test_real_model_summaries(embedded_model):
    """The embedded model's memory of ~3K tokens of text (default preset): for every layer, the index selects what
    brute force selects for the real ranking queries of the next chunk and of single decoded tokens."""
    from inf_llm import load_engine

    engine = load_engine()
    cfg = engine.config
    text = " ".join(f"Paragraph {i}: the keeper of the lighthouse wrote that the tide came in at {i % 7} past the hour, "
                    f"and that the gulls, numbering {i * 13 % 97}, left before the fog." for i in range(120))
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"][:3200]
    checked = []

    def hook(layer):
        select = layer._select

        def checking_select(q):
            if layer.blocks.num_blocks:
                s, hkv = layer.reprs, layer.shape.num_kv_heads
                query = ranking_query(q, cfg.block_ranking, hkv)
                k = cfg.topk_blocks if q.shape[1] == 1 else cfg.chunk_topk_blocks
                for group in (4, 16):
                    index = BlockIndex.build(s, hkv, block_ranking=cfg.block_ranking, group_size=group)
                    for per_head in (False, True):
                        want = select_blocks(block_scores(s, query, hkv, per_head, layer._repr_absmax), k)
                        got = index.select(s, query, k, per_head=per_head, summary_absmax=layer._repr_absmax)
                        assert torch.equal(got, want)
                checked.append(layer.index)
            return select(q)

        layer._select = checking_select

    engine.feed(ids[:3000])  # builds ~170 blocks per layer
    for layer in engine.memory.layers:
        hook(layer)
    engine.feed(ids[3000:3128])
    engine.feed(ids[3128:3129])
    assert len(set(checked)) == len(engine.memory.layers)


# --- the approximate first stage's recall study (inf_llm.bench.ranking_recall) ---------------------------------


def test_projection_codes_with_every_candidate_select_as_brute_force():
    from inf_llm.bench.ranking_recall import approximate_select, recall
    from inf_llm.memory.ranking import code_basis, summary_codes

    gen = torch.Generator().manual_seed(5)
    summaries = _summaries(300, "bounds", gen, duplicates=False).half()
    absmax = summaries.abs().max().float()
    basis = code_basis(summaries[:200], 8)
    directions = basis[:, 1:].T
    assert basis.shape == (2 * HKV * D, 9)
    torch.testing.assert_close(basis[:, 0], summaries[:200].reshape(200, -1).float().mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(directions @ directions.T, torch.eye(8), atol=1e-5, rtol=0)  # orthonormal
    block_codes = summary_codes(summaries, basis)
    for _ in range(4):
        query = _query("bounds", gen)
        want = select_blocks(block_scores(summaries, query, HKV, False, absmax), 20)
        # Every block a candidate: the estimate chooses nothing, the exact scores choose all.
        got = approximate_select(summaries, query, HKV, absmax, block_codes, basis, 300, 20)
        assert torch.equal(got, want)
    rows = recall(summaries, [_query("bounds", gen) for _ in range(3)], HKV, [4], [300], ks=(5, 20), calibration=200)
    assert len(rows) == 3 and all(r["recall_5"] == r["recall_20"] == 1.0 for r in rows)


def test_projection_codes_rank_summaries_of_a_low_rank_memory_as_brute_force():
    """Summaries that vary along 4 directions only: 4-dim codes carry their scores up to float16 rounding, so the
    best 60 candidates by the codes hold brute force's top 20."""
    from inf_llm.bench.ranking_recall import recall

    gen = torch.Generator().manual_seed(6)
    basis = torch.linalg.qr(torch.randn(2 * HKV * D, 4, generator=gen)).Q.T  # (4, R*D) orthonormal
    summaries = (torch.randn(400, 4, generator=gen) * 3 @ basis + torch.randn(2 * HKV * D, generator=gen))
    summaries = summaries.view(400, 2 * HKV, D).half()
    rows = recall(summaries, [_query("bounds", gen) for _ in range(5)], HKV, [4], [60], ks=(20,), calibration=400)
    assert all(r["recall_20"] == 1.0 for r in rows)
    # One direction too few loses some of them: the recall measures something.
    rows = recall(summaries, [_query("bounds", gen) for _ in range(5)], HKV, [1], [60], ks=(20,), calibration=400)
    assert min(r["recall_20"] for r in rows) < 1.0


def test_reply_pool_recall_counts_the_pooled_steps_and_what_their_pools_hold():
    """pool_recall: steps that form a pool (the first, then every E-th) are not counted; a pool of every block
    holds everything; a step's pool is the C best of the step that formed it, so the same query at every step
    finds its top k whenever C >= k, and queries that differ lose some of it in a pool of exactly k."""
    from inf_llm.bench.ranking_recall import pool_recall

    gen = torch.Generator().manual_seed(7)
    summaries = _summaries(300, "bounds", gen, duplicates=False).half()
    steps = [_query("bounds", gen) for _ in range(7)]
    out = pool_recall(summaries, steps, HKV, [20, 300], [1, 3], ks=(20,))
    assert out[(300, 1, 20)] == [] and len(out[(300, 3, 20)]) == 4  # steps 1, 2, 4, 5; 0, 3, 6 form pools
    assert all(r == 1.0 for r in out[(300, 3, 20)])
    assert min(out[(20, 3, 20)]) < 1.0
    same = pool_recall(summaries, [steps[0]] * 7, HKV, [20], [3], ks=(20,))
    assert all(r == 1.0 for r in same[(20, 3, 20)])


def test_reply_pool_read_share_and_no_pool_up_to_its_size():
    """pool_read: every block at the renewing step, the pool at the E - 1 others; up to C blocks no pool is formed
    (as `LayerMemory._form_pool`), so every step reads everything; pool_ms then times brute force's path alone."""
    from inf_llm.bench.ranking_recall import pool_ms, pool_read

    assert pool_read(8192, 8, 65536) == (7 * 8192 / 65536 + 1) / 8
    assert pool_read(8192, 8, 16384) == (7 * 0.5 + 1) / 8
    assert pool_read(8192, 8, 8192) == pool_read(8192, 8, 256) == 1.0
    assert pool_read(100, 1, 1000) == 1.0  # renewed at every step: every block each time
    gen = torch.Generator().manual_seed(8)
    summaries = _summaries(300, "bounds", gen, duplicates=False).half()
    steps = [_query("bounds", gen) for _ in range(5)]
    brute, pooled = pool_ms(summaries, steps, HKV, 300, 3)
    assert pooled == brute
