"""prompt_end_blocks: the chunk that ends a prompt is read for votes, then again with the most voted blocks in every
layer, which stay through the reply. Each test recomputes what the memory should do from what it stores."""

from __future__ import annotations

import io
from collections import Counter
from fractions import Fraction

import pytest
import torch

from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from inf_llm.memory.layer_memory import LayerMemory
from inf_llm.memory.ranking import peak_block_scores, tally_votes, voted_places, voted_runs
from tests.test_engine import ByteTokenizer, _config, _ids
from tests.tiny_models import tiny_model

# Top-3 of blocks of 8 tokens, two stages (a shortlist of 6), 2 blocks voted at each prompt's end.
# float32 summaries and storage: the recomputations below read the keys as the memory ranks them.
SETTINGS = dict(rerank_blocks=6, device_cache_blocks=12, prompt_end_blocks=2, repr_dtype="float32",
                storage_dtype="float32")
PARAMS = SamplingParams(temperature=0.0, max_new_tokens=6)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _engine(model, **overrides) -> Engine:
    engine = Engine(model, ByteTokenizer(), _config(**{**SETTINGS, **overrides}))
    engine.eos_token_ids = set()  # every reply is max_new_tokens long
    return engine


def _reply(engine: Engine, ids: list[int]) -> list[int]:
    return [step.token_id for step in engine.generate(ids, PARAMS)]


def _end_blocks(engine: Engine) -> list[list[int] | None]:
    return [None if layer.end_blocks is None else layer.end_blocks.tolist() for layer in engine.memory.layers]


# Slices of every block at once, of 3 blocks (the last one shorter), of one block.
@pytest.mark.parametrize("slice_floats", [2**19, 3 * 2 * 3 * 5 * 8, 1])
def test_peak_block_scores_are_each_heads_largest_logit_over_the_chunks_queries_summed(slice_floats):
    g = torch.Generator().manual_seed(0)
    hkv, group, tq, n, b, d = 2, 3, 5, 11, 8, 16
    queries = torch.randn(hkv * group, tq, d, generator=g)
    keys = torch.randn(hkv, n, b, d, generator=g).half()
    expected = torch.zeros(n, hkv * group, dtype=torch.float64)
    for block in range(n):
        for head in range(hkv * group):
            kv = head // group  # grouped-query attention: consecutive query heads share a KV head
            logits = queries[head].double() @ keys[kv, block].double().T  # (tq, b)
            expected[block, head] = logits.max()
    torch.testing.assert_close(peak_block_scores(queries, keys, slice_floats).double(), expected.sum(dim=1),
                               rtol=1e-5, atol=1e-4)
    # per_head: each query head's peak apart, (n, Hq).
    torch.testing.assert_close(peak_block_scores(queries, keys, slice_floats, per_head=True).double(), expected,
                               rtol=1e-5, atol=1e-4)


def _bounds_rise(layer: LayerMemory, q: torch.Tensor, before: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The first stage's rise, from the keys: each head's upper bound on its logits over a block (the mean query
    against the block's per-channel key max and min), summed over heads, for this chunk minus the chunk before (if
    any)."""
    group = layer.shape.num_heads // layer.shape.num_kv_heads
    rise = torch.zeros(num_blocks, dtype=torch.float64)
    for block in range(num_blocks):
        k = layer.blocks.host_block(block)[0].double()  # (Hkv, B, D)
        high, low = k.amax(dim=1), k.amin(dim=1)
        for head in range(layer.shape.num_heads):
            for chunk, sign in ((q, 1.0), (before, -1.0))[: 2 if before.shape[1] else 1]:
                mean = chunk[head].double().mean(dim=0)
                bound = mean.clamp(min=0) @ high[head // group] + mean.clamp(max=0) @ low[head // group]
                rise[block] += sign * bound
    return rise


def _peak_rise(layer: LayerMemory, q: torch.Tensor, before: torch.Tensor, block: int, rise: str = "sum") -> float:
    """A block's rise: per query head, the largest logit of the chunk's queries over its keys less the chunk
    before's (none where the baseline is empty); summed over the heads (sum), their positive parts summed (positive),
    or the largest (max)."""
    k = layer.blocks.host_block(block)[0].double()
    group = layer.shape.num_heads // layer.shape.num_kv_heads
    heads = [float((q[head].double() @ k[head // group].T).max())
             - (float((before[head].double() @ k[head // group].T).max()) if before.shape[1] else 0.0)
             for head in range(layer.shape.num_heads)]
    if rise == "positive":
        return sum(max(h, 0.0) for h in heads)
    return max(heads) if rise == "max" else sum(heads)


def _best_first(scores: dict[int, float], count: int) -> list[int]:
    """The `count` highest-scored ids, best first, ties to the lower id."""
    return sorted(scores, key=lambda i: (-scores[i], i))[:count]


def _best(scores: dict[int, float], count: int) -> list[int]:
    """The `count` highest-scored ids in id order."""
    return sorted(_best_first(scores, count))


# Then a shortlist of 20 (more than the device cache's 12: scored in two loads), and of every block; then each
# head's rise by its positive part, and the best head's; last, the baseline without the chunk before (with the
# chunk's earlier queries, and with none: then the rise is the voting queries' peaks).
@pytest.mark.parametrize("asked, following, tally, skip, run, shortlist, rise, baseline", [
    (None, 0, "count", 0, 1, None, "sum", "previous"), (5, 1, "count", 0, 1, None, "sum", "previous"),
    (5, 0, "rank", 3, 1, None, "sum", "previous"), (None, 0, "rank", 0, 1, None, "sum", "previous"),
    (5, 0, "rank", 3, 2, None, "sum", "previous"), (None, 0, "count", 0, 3, None, "sum", "previous"),
    (5, 0, "rank", 3, 2, 20, "sum", "previous"), (5, 0, "rank", 3, 2, 1000, "sum", "previous"),
    (5, 0, "rank", 3, 2, None, "positive", "previous"), (5, 0, "rank", 3, 2, None, "max", "previous"),
    (5, 0, "rank", 3, 2, None, "sum", "own"), (None, 0, "rank", 0, 2, None, "sum", "own")])
def test_votes_and_the_voted_blocks_equal_an_independent_recomputation_from_the_stored_keys(model, monkeypatch, asked,
                                                                                           following, tally, skip, run,
                                                                                           shortlist, rise, baseline):
    """Each layer's votes: among the rerank_blocks blocks whose key bounds rise most from the chunk before to the
    prompt's last chunk, the prompt_end_blocks whose peak logits rise most, best first; the memory's blocks: the
    most voted over layers (ties: the lower id), in every layer. With prompt_end_queries: N, the last chunk's last N
    queries are the chunk that votes, and its earlier queries are part of the chunk before; with
    prompt_end_skip: S, the last S queries are left out of both, and the N before them vote; with
    prompt_end_following: 1, each voted block comes with the block after it. prompt_end_tally: count adds one per
    vote, rank adds 1/i for a layer's i-th best. prompt_end_run: R, the places are filled by the most voted blocks,
    each grown into a run of up to R adjacent blocks towards its more voted side. prompt_end_shortlist: L, the
    shortlist has L blocks instead of rerank_blocks (all of them when L is at least their number).
    prompt_end_rise: positive sums each head's rise where it is positive, max takes the best head's.
    prompt_end_baseline: own leaves the chunk before out of the baseline."""
    seen = []
    vote = LayerMemory._vote_prompt_end

    def recording(layer, q):
        already = len(layer.end_votes)
        seen.append((layer, q.clone(), layer.end_baseline.clone(), layer.blocks.num_blocks))
        vote(layer, q)
        assert len(layer.end_votes) == already + 1
        seen[-1] += (layer.end_votes[-1],)
    monkeypatch.setattr(LayerMemory, "_vote_prompt_end", recording)
    places = 2 if run == 1 else 4
    engine = _engine(model, prompt_end_queries=asked, prompt_end_following=following, prompt_end_tally=tally,
                     prompt_end_skip=skip, prompt_end_blocks=places, prompt_end_run=run,
                     prompt_end_shortlist=shortlist, prompt_end_rise=rise, prompt_end_baseline=baseline)
    ids = _ids(300, seed=3)
    engine.feed(ids)
    layers = engine.memory.layers
    assert len(seen) == len(layers)  # one vote per layer: the last chunk alone, read once for votes
    weights, differ = Counter(), 0
    for layer, q, before, num_blocks, votes in seen:
        # The last chunk_size tokens are read by themselves; the chunk before ends the piece read before them.
        assert q.shape[1] == engine.config.chunk_size and 0 < before.shape[1] <= engine.config.chunk_size
        assert num_blocks > engine.config.rerank_blocks  # a real shortlist (blocks formed later change nothing)
        q = q_all = q[:, : q.shape[1] - skip]
        previous = before
        if baseline == "own":
            before = before[:, :0]
        if asked is not None:
            assert asked < q.shape[1]
            before, q = torch.cat((before, q[:, :-asked]), dim=1), q[:, -asked:]
        first = _bounds_rise(layer, q, before, num_blocks)
        size = shortlist or engine.config.rerank_blocks
        if shortlist is not None:
            assert shortlist > engine.config.device_cache_blocks  # scored a cache's worth at a time
        listed = _best(dict(enumerate(first.tolist())), size)
        assert len(listed) == min(size, num_blocks)
        peaks = {block: _peak_rise(layer, q, before, block, rise) for block in listed}
        assert votes == _best_first(peaks, engine.config.prompt_end_blocks)
        if rise != "sum":
            summed = {block: _peak_rise(layer, q, before, block) for block in listed}
            differ += votes != _best_first(summed, engine.config.prompt_end_blocks)
        if baseline != "previous":
            if asked is not None:
                previous = torch.cat((previous, q_all[:, :-asked]), dim=1)
            listed_then = _best(dict(enumerate(_bounds_rise(layer, q, previous, num_blocks).tolist())), size)
            then = {block: _peak_rise(layer, q, previous, block) for block in listed_then}
            differ += votes != _best_first(then, engine.config.prompt_end_blocks)
        for i, block in enumerate(votes, start=1):
            weights[block] += 1.0 if tally == "count" else 1.0 / i
    num_blocks = seen[0][3]
    if run == 1:
        expected = _best(weights, places)
    else:  # runs around the most voted, each grown block by block towards the side with more votes (ties: after)
        expected = []
        for block in _best_first(weights, len(weights)):
            if len(expected) < places and block not in expected:
                low = high = block
                expected.append(block)
                while high - low < run - 1 and len(expected) < places:
                    after, before_ = high + 1, low - 1
                    options = {b: weights.get(b, 0.0) for b in (after, before_)
                               if 0 <= b < num_blocks and b not in expected}
                    if not options:
                        break
                    grown = after if after in options and options[after] >= options.get(before_, -1.0) else before_
                    expected.append(grown)
                    low, high = min(low, grown), max(high, grown)
        assert len(expected) == places and expected != _best_first(weights, places)  # the runs changed the choice
        expected = sorted(expected)
    expected = sorted({b + step for b in expected for step in range(following + 1) if b + step < num_blocks})
    assert len(expected) > places or not following  # the followers are there
    assert _end_blocks(engine) == [expected] * len(layers)
    # The other rises and baselines change some layer's votes: the setting is not ignored.
    assert (rise == "sum" and baseline == "previous") or differ


def test_the_rank_tally_lets_a_few_layers_first_votes_outweigh_many_layers_last_ones():
    """Three layers give block 7 their last of four votes, one layer puts block 2 first: counted, 7 is the most
    voted; by reciprocal rank 7 has 3/4 and 2 has 1. Equal sums tie exactly whatever order they were added in."""
    votes = [[1, 5, 6, 7], [3, 8, 9, 7], [4, 10, 11, 7], [2, 12, 13, 14]]
    counted = tally_votes(votes, "count")
    assert counted.most_common(1) == [(7, 3)] and counted[2] == 1
    ranked = tally_votes(votes, "rank")
    assert ranked[7] == Fraction(3, 4) and ranked[2] == 1 and ranked[14] == Fraction(1, 4)
    assert sorted(ranked, key=lambda b: (-ranked[b], b))[:5] == [1, 2, 3, 4, 7]
    mirrored = tally_votes([[1, 2, 3], [3, 2, 1]], "rank")
    assert mirrored[1] == mirrored[3] == Fraction(4, 3)


def test_voted_places_grow_runs_towards_the_more_voted_side_and_fill_the_places_in_the_tallys_order():
    """Hand-worked: block 10 leads and neither neighbour has a vote, so its run grows after it (11); 20's run grows
    before it (19 has more votes than 21); 19 is then taken, so the next best, 30, starts a run at the memory's last
    block and can only grow before it (29). With runs of 3, 10's run grows after it twice (ties go to the side
    after), 20's to 19 and then 21 (more votes than 18), and the places cut 30's run to 30 alone."""
    tally = Counter({10: 6, 20: 5, 19: 4, 30: 3, 21: 1, 2: Fraction(1, 2)})
    assert voted_places(tally, 4, 1, 31) == [10, 20, 19, 30]
    assert voted_places(tally, 6, 2, 31) == [10, 11, 20, 19, 30, 29]
    assert voted_places(tally, 8, 2, 31) == [10, 11, 20, 19, 30, 29, 21, 22]
    assert voted_places(tally, 7, 3, 31) == [10, 11, 12, 20, 19, 21, 30]
    # An earlier round's blocks are neither chosen again nor grown into: 11 taken, 10's run grows before it.
    assert voted_places(tally, 4, 2, 31, {11, 19}) == [10, 9, 20, 21]
    # Runs stop at the memory's first block and where both sides are taken.
    assert voted_places(Counter({0: 2, 2: 1}), 4, 2, 3) == [0, 1, 2]
    # The same places as runs, each led by its voted block (voted_memory_consensus reads the lead's tally).
    assert voted_runs(tally, 7, 3, 31) == [[10, 11, 12], [20, 19, 21], [30]]
    assert voted_runs(tally, 4, 2, 31, {11, 19}) == [[10, 9], [20, 21]]


def test_skipped_queries_change_the_vote_and_a_chunk_of_skipped_queries_alone_votes_for_nothing(model):
    """prompt_end_skip: the reply header's queries out of the vote change what is voted (the recomputation above
    pins how); a prompt end no longer than the skipped queries has no query to vote and chooses nothing."""
    ids = _ids(300, seed=3)
    with_header = _engine(model, prompt_end_queries=5)
    with_header.feed(ids)
    skipping = _engine(model, prompt_end_queries=5, prompt_end_skip=3)
    skipping.feed(ids)
    assert _end_blocks(skipping) != _end_blocks(with_header)
    skipping.feed(_ids(3, seed=4))  # a feed of 3 tokens: all of them skipped
    assert _end_blocks(skipping) == [[]] * len(skipping.memory.layers)


@pytest.mark.parametrize("rounds", [1, 2])
def test_the_second_reading_is_the_reading_with_the_voted_blocks_forced_and_so_is_the_reply(model, rounds):
    """The reads for votes are rolled back exactly: the prompt's logits and the reply equal those of an engine
    without the setting that reads the same pieces with the voted blocks forced from the last chunk on."""
    ids = _ids(300, seed=4)
    voting = _engine(model, prompt_end_rounds=rounds)
    logits = voting.feed(ids[:-1])
    blocks = _end_blocks(voting)[0]
    reply = _reply(voting, ids[-1:])
    plain = _engine(model, prompt_end_blocks=0)
    end = len(ids) - 1 - plain.config.chunk_size
    plain.feed(ids[:end])
    plain.memory.force_blocks(blocks, from_position=end)
    torch.testing.assert_close(plain.feed(ids[end:-1]), logits, rtol=0, atol=0)
    assert _reply(plain, ids[-1:]) == reply
    plain.memory.force_blocks(None)
    unforced = _engine(model, prompt_end_blocks=0)
    unforced.feed(ids[:end])
    assert not torch.equal(unforced.feed(ids[end:-1]), logits)  # the voted blocks changed the reading


def test_the_blocks_formed_after_the_vote_join_the_voted_ones_as_they_form(model):
    """prompt_end_recent: 3. The memory's choice is the vote's and the ids of the next 3 blocks to form: the prompt's
    logits and the reply equal those of an engine without the setting that forces those blocks from the last chunk
    on (each attended once it has formed), and a decoding step reads otherwise than under the vote alone."""
    ids = _ids(300, seed=4)
    recent = _engine(model, prompt_end_recent=3)
    logits = recent.feed(ids[:-1])
    voting = _engine(model)
    voting.feed(ids[:-1])
    voted = _end_blocks(voting)[0]
    plain = _engine(model, prompt_end_blocks=0)
    end = len(ids) - 1 - plain.config.chunk_size
    plain.feed(ids[:end])
    n = plain.memory.layers[0].blocks.num_blocks  # the memory the question voted over
    assert _end_blocks(recent) == [voted + [n, n + 1, n + 2]] * len(recent.memory.layers)
    assert recent.memory.layers[0].blocks.num_blocks > n  # some of them formed while the chunk was read
    plain.memory.force_blocks(voted + [n, n + 1, n + 2], from_position=end)
    torch.testing.assert_close(plain.feed(ids[end:-1]), logits, rtol=0, atol=0)
    assert _reply(plain, ids[-1:]) == _reply(recent, ids[-1:])
    again = _engine(model, prompt_end_recent=3)  # a decoding step after the same prompt, with and without them
    again.feed(ids[:-1])
    assert not torch.equal(again.feed(ids[-1:]), voting.feed(ids[-1:]))


def test_each_round_reads_with_the_blocks_chosen_before_and_adds_its_best_new_ones(model, monkeypatch):
    """prompt_end_rounds: 2. The first round is the one-round vote; the second reads the chunk again with the first
    round's blocks attended in every layer, and adds the prompt_end_blocks blocks it voted most for that the first
    did not choose (ties: the lower id)."""
    seen = []
    vote = LayerMemory._vote_prompt_end

    def recording(layer, q):
        attended = None if layer.end_blocks is None else layer.end_blocks.tolist()
        vote(layer, q)
        seen.append((attended, Counter(layer.end_votes[-1])))
    monkeypatch.setattr(LayerMemory, "_vote_prompt_end", recording)
    ids = _ids(300, seed=3)
    one = _engine(model)
    one.feed(ids)
    one_round = list(seen)
    seen.clear()
    two = _engine(model, prompt_end_rounds=2)
    two.feed(ids)
    n = len(two.memory.layers)
    assert len(seen) == 2 * n and seen[:n] == one_round  # the first round is the one-round vote
    first = _end_blocks(one)[0]
    assert all(attended == first for attended, _ in seen[n:])  # read with the first round's blocks
    assert seen[n:] != seen[:n]  # which changed the queries, and so the votes
    tally = sum((votes for _, votes in seen[n:]), Counter())
    new = {block: count for block, count in tally.items() if block not in first}
    added = sorted(sorted(new, key=lambda block: (-new[block], block))[: two.config.prompt_end_blocks])
    assert len(added) == two.config.prompt_end_blocks  # the second round found blocks of its own
    assert _end_blocks(two) == [sorted(set(first) | set(added))] * n


def test_a_rollback_or_a_saved_state_replays_the_votes_and_the_reply(model):
    """The voted blocks and the baseline of the next votes (the last chunk read) are part of the state: a replay
    from a snapshot or from a saved state votes and replies as the first run; a new prompt votes afresh."""
    engine = _engine(model)
    engine.feed(_ids(300, seed=5))
    snap = engine.snapshot()
    baselines = [layer.end_baseline.clone() for layer in engine.memory.layers]
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)
    question = _ids(20, seed=6)  # shorter than a chunk: its votes are measured against the document's last chunk
    first = (_reply(engine, question), _end_blocks(engine))
    engine.restore(snap)
    assert all(torch.equal(layer.end_baseline, base) for layer, base in zip(engine.memory.layers, baselines))
    assert (_reply(engine, question), _end_blocks(engine)) == first
    buffer.seek(0)
    resumed = _engine(model)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert all(torch.equal(layer.end_baseline, base) for layer, base in zip(resumed.memory.layers, baselines))
    assert (_reply(resumed, question), _end_blocks(resumed)) == first
    after_reply = engine.snapshot()
    replay = _reply(engine, _ids(1, seed=7))  # one token: a decoding step, which keeps the blocks
    assert _end_blocks(engine) == first[1]
    engine.restore(after_reply)
    assert _reply(engine, _ids(1, seed=7)) == replay
    engine.restore(snap)
    engine.feed(_ids(150, seed=8))
    again = _end_blocks(engine)
    engine.restore(snap)
    baseline = engine.memory.layers[0].end_baseline
    assert baseline.shape[1] == engine.config.chunk_size
    engine.feed(_ids(150, seed=8))
    assert _end_blocks(engine) == again


def test_without_the_setting_nothing_is_voted_and_a_short_feed_votes_against_nothing_before_it(model):
    plain = _engine(model, prompt_end_blocks=0)
    plain.feed(_ids(300, seed=9))
    assert _end_blocks(plain) == [None] * len(plain.memory.layers)
    assert plain.memory.layers[0].end_baseline.shape[1] == 0  # nothing kept
    engine = _engine(model)
    engine.feed(_ids(100, seed=9))  # one chunk, no chunk before it: votes by peak logits alone
    assert all(blocks is not None and len(blocks) <= 2 for blocks in _end_blocks(engine))


@pytest.mark.parametrize("narrowed,seed,count", [(dict(voted_memory_places=2), 5, 2),
                                                  (dict(voted_memory_consensus=1.0), 5, 2),
                                                  (dict(voted_memory_consensus=1.0), 7, 0)])
def test_the_voted_blocks_placed_near_are_part_of_the_state(model, narrowed, seed, count):
    """voted_memory_places, voted_memory_consensus: which voted blocks voted_memory_distance places near (the first
    places of the vote; the runs whose tally adds up to that of a block every layer votes for, one or none) are
    restored with a snapshot and with a saved state
    (without them every voted block would come near), and a new prompt clears them before its own vote."""
    settings = dict(prompt_end_blocks=4, prompt_end_run=2, voted_memory_distance=8, **narrowed)
    engine = _engine(model, **settings)
    engine.feed(_ids(300, seed=seed))
    near = [layer.end_near.tolist() for layer in engine.memory.layers]
    assert all(len(n) == count and set(n) < set(layer.end_blocks.tolist())
               for n, layer in zip(near, engine.memory.layers))
    snap = engine.snapshot()
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)
    question = _ids(1, seed=6)
    first = _reply(engine, question)
    engine.restore(snap)
    assert [layer.end_near.tolist() for layer in engine.memory.layers] == near
    assert _reply(engine, question) == first
    buffer.seek(0)
    resumed = _engine(model, **settings)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert [layer.end_near.tolist() for layer in resumed.memory.layers] == near
    assert _reply(resumed, question) == first
    engine.memory.clear_prompt_end()
    assert all(layer.end_near is None for layer in engine.memory.layers)
