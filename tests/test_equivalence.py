"""InfLLM against the stock model and the dense reference (docs/METHOD.md section 4), on tiny random models."""

import functools

import pytest
import torch

from inf_llm.config.schema import InfLLMConfig
from inf_llm.generation.engine import Engine
from inf_llm.kernels import reference
from inf_llm.memory import model_memory
from inf_llm.memory.attach import attach
from inf_llm.memory.ranking import tally_votes, voted_runs
from tests.test_engine import ByteTokenizer
from tests.tiny_models import FAMILIES, chunk_last_positions, dense_logits, run_schedule, stock_logits, tiny_model

ATOL = 2e-4


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def _memory_config(**overrides) -> InfLLMConfig:
    base = dict(
        num_sink_tokens=4, local_window=32, block_size=8, repr_tokens=2, topk_blocks=32,
        chunk_size=16, device_cache_blocks=32, storage_dtype="float32", kernel_backend="torch",
    )
    return InfLLMConfig(**{**base, **overrides})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["inf-llm", "stream-llm", "infinite-lm"])
def test_window_covering_input_equals_stock_model(family, method):
    model = tiny_model(family)
    ids = _ids(96)
    expected = stock_logits(model, ids)
    memory = attach(model, _memory_config(method=method, local_window=128, chunk_size=32))
    got = run_schedule(model, memory, ids, [96])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


SCHEDULES = {
    "one call": [200],
    "uneven pieces": [7, 50, 1, 64, 33, 45],
    "token by token": [1] * 200,
}


# Token by token makes every chunk one token, whatever chunk_size says: one chunk size is enough there.
SCHEDULE_CHUNKS = [(s, c) for s in SCHEDULES for c in ([1] if s == "token by token" else [1, 5, 16, 32])]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("schedule,chunk_size", SCHEDULE_CHUNKS)
def test_all_blocks_retrieved_equals_dense_reference(family, schedule, chunk_size):
    _check_all_blocks_retrieved(family, schedule, chunk_size)


@pytest.mark.parametrize("schedule", ["one call", "token by token"])
def test_float16_representatives_change_ranking_only(schedule):
    """With every block retrieved the ranking does not matter: 16-bit representatives give the dense result."""
    _check_all_blocks_retrieved("llama", schedule, 16 if schedule == "one call" else 1, repr_dtype="float16")


@pytest.mark.parametrize("schedule", ["one call", "token by token"])
@pytest.mark.parametrize("ranking", [dict(block_ranking="bounds"), dict(block_ranking="bounds", rank_rotated=True),
                                     dict(rank_rotated=True), dict(block_ranking="bounds", per_head_ranking=True, device_cache_blocks=128),
                                     dict(following_blocks=1, device_cache_blocks=64),
                                     dict(block_ranking="bounds", rank_rotated=True, rank_distance=0),
                                     dict(block_ranking="bounds", rank_rotated=True, memory_distance=96,
                                          rank_distance=32)])
def test_every_ranking_variant_changes_the_choice_only(schedule, ranking):
    """With every block retrieved the ranking does not matter: key bounds, ranking with the query rotated for the
    global stage or to rank_distance (memory still attended at the global distance), their combinations, and the
    blocks that follow the chosen ones give the dense result."""
    _check_all_blocks_retrieved("llama", schedule, 16 if schedule == "one call" else 1, **ranking)


def _check_all_blocks_retrieved(family, schedule, chunk_size, **settings):
    model = tiny_model(family)
    ids = _ids(200)
    cfg = _memory_config(chunk_size=chunk_size, **settings)
    expected = dense_logits(model, ids, "inf-llm", cfg.local_window, cfg.num_sink_tokens, distance=cfg.memory_distance)
    memory = attach(model, cfg)
    got = run_schedule(model, memory, ids, SCHEDULES[schedule])
    assert memory.stats().blocks >= 15  # the memory really held blocks: retrieval was exercised
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("schedule,chunk_size", [("one call", 16), ("token by token", 1), ("uneven pieces", 5)])
def test_memory_distance_places_memory_farther(schedule, chunk_size):
    """memory_distance: D: every far key at distance D instead of local_window, in the ranking and the global
    stage alike; with every block retrieved that is the dense reference with far keys at D, which the window's
    distance would not match."""
    model, ids = _check_memory_distance(schedule, chunk_size, 96)
    last = chunk_last_positions(SCHEDULES["one call"], 16)
    cfg = _memory_config(memory_positions="ordered", chunk_size=16, memory_distance=96)
    memory = attach(model, cfg)
    got = run_schedule(model, memory, ids, SCHEDULES["one call"])
    expected = dense_logits(model, ids, "inf-llm", 32, 4, chunk_last=last, distance=96)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("schedule,chunk_size", [("one call", 16), ("token by token", 1), ("uneven pieces", 5)])
def test_memory_distance_below_the_window_places_memory_nearer(schedule, chunk_size):
    """memory_distance: D below local_window: the far keys at distance D, nearer than the window's oldest keys
    (positions only: the window still attends its band at exact distances). With every block retrieved that is
    the dense reference with far keys at D, which the window's distance does not match."""
    _check_memory_distance(schedule, chunk_size, 8)


def _check_memory_distance(schedule, chunk_size, distance):
    """memory_distance: `distance` with every block retrieved is the dense reference with far keys there, and that
    reference differs from the one at the window's distance (so the check can fail); returns the model and ids."""
    _check_all_blocks_retrieved("llama", schedule, chunk_size, memory_distance=distance)
    model = tiny_model("llama")
    ids = _ids(200)
    at_window = dense_logits(model, ids, "inf-llm", 32, 4)
    assert (dense_logits(model, ids, "inf-llm", 32, 4, distance=distance) - at_window).abs().max() > 20 * ATOL
    return model, ids


@pytest.mark.parametrize("schedule,chunk_size", [("one call", 16), ("token by token", 1), ("uneven pieces", 5)])
@pytest.mark.parametrize("method", ["inf-llm", "infinite-lm"])
@pytest.mark.parametrize("memory_distance,sink_distance", [(None, 8), (96, 8)])
def test_sink_memory_distance_places_the_sinks_apart_from_the_rest_of_memory(schedule, chunk_size, method,
                                                                            memory_distance, sink_distance):
    """sink_memory_distance: D: the sinks at distance D from every query whose window they have left, the rest of
    memory at the global distance. With every block retrieved that is the dense reference with those keys at D,
    which the reference with every far key at the global distance does not match."""
    model = tiny_model("llama")
    ids = _ids(200)
    cfg = _memory_config(chunk_size=chunk_size, memory_distance=memory_distance, sink_memory_distance=sink_distance,
                         method=method)
    sinks = torch.zeros(len(ids), len(ids), dtype=torch.bool)
    sinks[:, : cfg.num_sink_tokens] = True
    reference = functools.partial(dense_logits, model, ids, method, cfg.local_window, cfg.num_sink_tokens,
                                  distance=cfg.global_distance)
    expected = reference(near=(sink_distance, sinks))
    memory = attach(model, cfg)
    got = run_schedule(model, memory, ids, SCHEDULES[schedule])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    assert (expected - reference()).abs().max() > 20 * ATOL


@pytest.mark.parametrize("seed,places,consensus,with_sinks", [
    (4, None, None, False), (4, 1, None, False), (4, 3, None, False),
    (4, None, 0.75, False), (4, None, 0.75, True), (6, None, 1.0, True), (4, 3, 0.75, False)])
def test_voted_memory_distance_places_the_voted_blocks_apart_from_the_prompts_last_chunk_on(
        monkeypatch, seed, places, consensus, with_sinks):
    """voted_memory_distance: D: from the prompt's last chunk (read again after its vote) through the reply, the
    blocks the prompt's end voted for sit at distance D, the rest of memory at the window's; voted_memory_places: N,
    only the first N places the vote filled (the others attended at the window's distance); voted_memory_consensus:
    F, only the runs whose blocks' tally adds up to at least F times that of a block every layer ranks first (2
    layers, by count: 1.5 leaves one of seed 4's two runs, 2 none of seed 6's); sink_memory_with_voted, the sinks at
    their distance (D here too) from the same chunk on, and only if some voted block is near. With every block retrieved
    that is the dense reference with those keys at D for those queries (none for the queries before: nothing was
    voted yet), which the reference with every far key at the window's distance does not match, nor (where a
    setting narrows them) the one with every voted block near."""
    filled, tallies = [], []
    monkeypatch.setattr(model_memory, "voted_runs", lambda *a, **k: filled.append(voted_runs(*a, **k)) or filled[-1])
    monkeypatch.setattr(model_memory, "tally_votes",
                        lambda *a, **k: tallies.append(tally_votes(*a, **k)) or tallies[-1])
    model = tiny_model("llama")
    ids = _ids(230, seed=seed)
    cfg = _memory_config(prompt_end_blocks=4, prompt_end_run=2, rerank_blocks=32, device_cache_blocks=40,
                         voted_memory_distance=8, voted_memory_places=places, voted_memory_consensus=consensus,
                         sink_memory_distance=8 if with_sinks else None, sink_memory_with_voted=with_sinks)
    engine = Engine(model, ByteTokenizer(), cfg)
    prompt = 200
    pieces = []
    engine.feed(ids[:prompt].tolist(), on_logits=lambda start, logits: pieces.append(logits.float()))
    steps = [engine.feed([token]) for token in ids[prompt:].tolist()]
    got = torch.cat(pieces + [torch.stack(steps)])
    voted = engine.memory.layers[0].end_blocks.tolist()
    assert len(voted) == 4 and all(layer.end_blocks.tolist() == voted for layer in engine.memory.layers)
    assert len(filled) == len(tallies) == 1 and sorted(b for run in filled[0] for b in run) == voted
    first = [b for run in filled[0] for b in run][:places]
    agreed = [run for run in filled[0]
              if consensus is None or sum(tallies[0].get(block, 0) for block in run) >= consensus * 2]
    nearer = sorted(b for run in agreed for b in run if b in first)
    assert len(nearer) == {(None, None): 4, (1, None): 1, (3, None): 3, (None, 0.75): 2, (None, 1.0): 0,
                           (3, 0.75): 2}[places, consensus]
    assert engine.memory.stats().blocks >= 20

    def near_from_the_last_chunk(blocks, sinks):
        near = torch.zeros(len(ids), len(ids), dtype=torch.bool)
        for block in blocks:
            start = cfg.num_sink_tokens + block * cfg.block_size
            near[prompt - cfg.chunk_size :, start : start + cfg.block_size] = True
        if sinks and blocks:
            near[prompt - cfg.chunk_size :, : cfg.num_sink_tokens] = True
        return near

    reference = functools.partial(dense_logits, model, ids, "inf-llm", cfg.local_window, cfg.num_sink_tokens)
    expected = reference(near=(8, near_from_the_last_chunk(nearer, with_sinks)))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    # Not every far key at the window's distance, nor (with places or consensus) every voted block near, nor (with
    # the sinks) the voted blocks alone: one block of 8 keys moves the tiny model's logits by about 10 x ATOL,
    # which assert_close would catch.
    others = [reference(near=(8, near_from_the_last_chunk(voted, False)))] if nearer != voted or with_sinks else []
    if nearer:
        others += [reference()] + ([reference(near=(8, near_from_the_last_chunk(nearer, False)))] if with_sinks else [])
    for other in others:
        assert (expected - other).abs().max() > 5 * ATOL


@pytest.mark.parametrize("positions", ["ordered", "runs"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_ordered_positions_token_by_token_with_every_block_retrieved_are_the_stock_model(family, positions):
    """Ordered memory positions put each global key at its distance from the chunk's last query: with one-token
    chunks and every block retrieved, that is every key's true distance, so InfLLM is the model itself. So do
    runs: every block retrieved makes the whole memory one run of adjacent keys."""
    model = tiny_model(family)
    ids = _ids(200)
    memory = attach(model, _memory_config(memory_positions=positions, chunk_size=1))
    got = run_schedule(model, memory, ids, SCHEDULES["token by token"])
    assert memory.stats().blocks >= 15
    torch.testing.assert_close(got, stock_logits(model, ids), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("schedule,chunk_size", [("one call", 16), ("one call", 5), ("uneven pieces", 16), ("uneven pieces", 32)])
@pytest.mark.parametrize("settings", [dict(), dict(following_blocks=1, device_cache_blocks=64),
                                      dict(memory_positions="runs")])
def test_ordered_positions_with_every_block_retrieved_equal_the_dense_reference(schedule, chunk_size, settings):
    """Chunks of several queries: each far key at its distance from the last query of the chunk."""
    model = tiny_model("llama")
    ids = _ids(200)
    cfg = _memory_config(**{"memory_positions": "ordered", **settings}, chunk_size=chunk_size)
    last = chunk_last_positions(SCHEDULES[schedule], chunk_size)
    expected = dense_logits(model, ids, "inf-llm", cfg.local_window, cfg.num_sink_tokens, chunk_last=last)
    memory = attach(model, cfg)
    got = run_schedule(model, memory, ids, SCHEDULES[schedule])
    assert memory.stats().blocks >= 15
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    # Not the shared-position rule: the comparison can tell them apart.
    shared = dense_logits(model, ids, "inf-llm", cfg.local_window, cfg.num_sink_tokens)
    assert (shared - expected).abs().max() > 20 * ATOL


@pytest.mark.parametrize("positions", ["shared", "ordered"])
@pytest.mark.parametrize("schedule,chunk_size", [("one call", 16), ("uneven pieces", 5), ("token by token", 1)])
def test_decode_memory_distance_moves_decoding_steps_only(positions, schedule, chunk_size):
    """decode_memory_distance: D: a decoding step (a chunk of one query) places memory at D, in the ranking and
    the global stage alike, a chunk of several queries at local_window. With every block retrieved that is the
    dense reference with each one-token chunk's queries at D and the others at the window's distance."""
    model = tiny_model("llama")
    ids = _ids(200)
    cfg = _memory_config(memory_positions=positions, decode_memory_distance=96, chunk_size=chunk_size)
    pieces = SCHEDULES[schedule]
    last = chunk_last_positions(pieces, chunk_size)
    one_query = torch.tensor([n == 1 for n in pieces for _ in range(n)])  # the rows fed as one-token chunks
    distance = torch.where(one_query, 96, 32)
    chunk_last = last if positions == "ordered" else None
    expected = dense_logits(model, ids, "inf-llm", 32, 4, chunk_last=chunk_last, distance=distance)
    memory = attach(model, cfg)
    got = run_schedule(model, memory, ids, pieces)
    assert memory.stats().blocks >= 15
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    at_window = dense_logits(model, ids, "inf-llm", 32, 4, chunk_last=chunk_last)
    if one_query.any():  # the rows after the first one-token chunk differ from the window's rule
        first = one_query.nonzero()[0, 0]
        assert (got[first:] - at_window[first:]).abs().max() > 20 * ATOL
    else:
        torch.testing.assert_close(got, at_window, atol=ATOL, rtol=1e-4)


# Two prompts, each followed by decoding steps; the second prompt's last chunk (14 of 30) has several queries too.
_REPLIES = [50, 1, 1, 1, 30, 1, 1] + [40] + [1] * 75


@pytest.mark.parametrize("positions", ["shared", "ordered"])
def test_reply_start_distance_moves_the_first_step_after_a_prompt_only(positions):
    """reply_start_distance: D: the first decoding step after a prompt (a one-query chunk after a chunk of several)
    places memory at D; every other chunk, decoding steps included, at local_window. With every block retrieved
    that is the dense reference with those rows at D."""
    model = tiny_model("llama")
    ids = _ids(200)
    cfg = _memory_config(memory_positions=positions, reply_start_distance=96, chunk_size=16)
    chunks = [min(16, n - o) for n in _REPLIES for o in range(0, n, 16)]
    starts = [c == 1 and prev > 1 for prev, c in zip([0] + chunks, chunks)]
    rows = torch.tensor([start for c, start in zip(chunks, starts) for _ in range(c)])
    assert int(rows.sum()) == 3  # one first step per prompt
    chunk_last = chunk_last_positions(_REPLIES, 16) if positions == "ordered" else None
    expected = dense_logits(model, ids, "inf-llm", 32, 4, chunk_last=chunk_last, distance=torch.where(rows, 96, 32))
    memory = attach(model, cfg)
    got = run_schedule(model, memory, ids, _REPLIES)
    assert memory.stats().blocks >= 15
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    at_window = dense_logits(model, ids, "inf-llm", 32, 4, chunk_last=chunk_last)
    first = rows.nonzero()[0, 0]
    torch.testing.assert_close(got[:first], at_window[:first], atol=ATOL, rtol=1e-4)
    assert (got[first] - at_window[first]).abs().max() > 20 * ATOL


def test_reply_start_distance_replays_from_a_snapshot_between_prompt_and_reply():
    """A snapshot taken after a prompt (the chat's !!regen point) or a state dict saved there: the next step is
    still the reply's first, at reply_start_distance, bit for bit as the first time."""
    cfg = _memory_config(reply_start_distance=96, chunk_size=16, topk_blocks=2, device_cache_blocks=8)
    # Saved without the flag (before the setting existed), the next step is an ordinary one: it differs.
    _check_reply_replays(cfg, run_schedule, "after_prompt")


def _check_reply_replays(cfg: InfLLMConfig, read, saved_later: str) -> None:
    """After a 100-token prompt read by read(model, memory, ids, pieces), a snapshot and a saved state replay the
    reply's 20 steps bit for bit; a state without the field `saved_later` (saved before its setting) does not."""
    model = tiny_model("llama")
    ids = _ids(120)
    memory = attach(model, cfg)
    read(model, memory, ids[:100], [100])
    snap, state = memory.snapshot(), memory.state_dict()
    first = run_schedule(model, memory, ids[100:], [1] * 20)
    resumed, legacy = attach(model, cfg), attach(model, cfg)
    with torch.inference_mode():  # the memory's tensors were made by run_schedule's inference mode
        memory.restore(snap)
        resumed.load_state_dict(state)
        legacy.load_state_dict({**state, "layers": [{k: v for k, v in layer.items() if k != saved_later}
                                                    for layer in state["layers"]]})
    torch.testing.assert_close(run_schedule(model, memory, ids[100:], [1] * 20), first, atol=0, rtol=0)
    torch.testing.assert_close(run_schedule(model, resumed, ids[100:], [1] * 20), first, atol=0, rtol=0)
    assert not torch.equal(run_schedule(model, legacy, ids[100:], [1] * 20), first)


def _prompted_schedule(model, memory, ids: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """run_schedule, telling the memory each prompt's length before it is read, as the engine's feed does."""
    outs, start = [], 0
    for n in pieces:
        if n > 1:
            memory.begin_prompt(n)
        outs.append(run_schedule(model, memory, ids[start : start + n], [n]))
        start += n
    return torch.cat(outs)


def _check_far_rows(cfg: InfLLMConfig, far_rows: list[bool], unlike_every_step: slice, unlike_window: slice) -> None:
    """Memory under cfg (decode_memory_distance=96), fed _REPLIES as the engine feeds them, equals the dense
    reference with `far_rows` at distance 96 and every other row at the window's 32 (every block retrieved); and
    it differs from decoding every step at 96 on the rows `unlike_every_step`, and from the window alone on
    `unlike_window`."""
    model = tiny_model("llama")
    ids = _ids(200)
    expected = dense_logits(model, ids, "inf-llm", 32, 4, distance=torch.where(torch.tensor(far_rows), 96, 32))
    memory = attach(model, cfg)
    got = _prompted_schedule(model, memory, ids, _REPLIES)
    assert memory.stats().blocks >= 15
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    every_step = dense_logits(model, ids, "inf-llm", 32, 4, distance=torch.where(torch.tensor(
        [n == 1 for n in _REPLIES for _ in range(n)]), 96, 32))
    at_window = dense_logits(model, ids, "inf-llm", 32, 4)
    assert (got[unlike_every_step] - every_step[unlike_every_step]).abs().max() > 20 * ATOL
    assert (got[unlike_window] - at_window[unlike_window]).abs().max() > 20 * ATOL


def test_decode_memory_distance_from_decodes_far_after_long_prompts_only():
    """decode_memory_distance_from: N: the decoding steps that reply to a prompt of at least N tokens place memory
    at decode_memory_distance, those that reply to a shorter one at the window's distance, as every prompt's chunks
    do. _REPLIES has prompts of 50, 30 and 40 tokens: with N = 45 the first reply's rows are at D. With every block
    retrieved that is the dense reference with those rows at D, bit for bit as the rule is computed, and neither
    decode_memory_distance alone nor the window alone."""
    cfg = _memory_config(decode_memory_distance=96, decode_memory_distance_from=45, chunk_size=16)
    prompts, far_rows, long_prompt = 0, [], False
    for n in _REPLIES:
        if n > 1:
            long_prompt = n >= 45
            prompts += 1
        far_rows += [n == 1 and long_prompt] * n
    assert prompts == 3 and sum(far_rows) == 3  # the first reply's three steps
    first_short_reply = 50 + 3 + 30  # the second reply's first step
    _check_far_rows(cfg, far_rows, slice(first_short_reply, None), slice(50, 53))


def test_decode_memory_distance_from_replays_the_prompt_length_from_a_snapshot():
    """A snapshot or a saved state taken after a long prompt: the reply's steps still decode far, bit for bit; a
    state saved before the setting existed (no prompt length) replies as after a short prompt."""
    cfg = _memory_config(decode_memory_distance=96, decode_memory_distance_from=64, chunk_size=16, topk_blocks=2,
                         device_cache_blocks=8)
    _check_reply_replays(cfg, _prompted_schedule, "prompt_tokens")


def test_decode_memory_distance_steps_decodes_far_for_a_replys_first_steps_only():
    """decode_memory_distance_steps: N: a reply's first N decoding steps (from the one that reads the prompt's last
    token) place memory at decode_memory_distance, its later steps at the window's distance, as every prompt's
    chunks do. _REPLIES replies with 3, 2 and 75 steps: with N = 2 the far rows are 2, 2 and 2 of them. With every
    block retrieved that is the dense reference with those rows at D, bit for bit as the rule is computed, and
    neither decode_memory_distance alone nor the window alone."""
    cfg = _memory_config(decode_memory_distance=96, decode_memory_distance_steps=2, chunk_size=16)
    far_rows, step = [], 0
    for n in _REPLIES:
        step = 0 if n > 1 else step + 1  # the step this one-token piece is, counted from 1
        far_rows += [n == 1 and step <= 2] * n
    assert sum(far_rows) == 6
    third_step = 50 + 2  # the first reply's third step: near
    _check_far_rows(cfg, far_rows, slice(third_step, third_step + 1), slice(50, 52))


def test_decode_memory_distance_steps_replays_a_reply_from_a_snapshot_taken_mid_reply():
    """A snapshot or a saved state taken after a reply's 3 steps of 5 far: the rest of the reply replays bit for
    bit (2 more far steps, then near); a state saved before the setting existed (no step count) starts the count
    again, so its next 5 steps are far, and it replies otherwise."""
    cfg = _memory_config(decode_memory_distance=96, decode_memory_distance_steps=5, chunk_size=16, topk_blocks=2,
                         device_cache_blocks=8)
    model = tiny_model("llama")
    ids = _ids(123)
    memory = attach(model, cfg)
    run_schedule(model, memory, ids[:103], [100, 1, 1, 1])
    snap, state = memory.snapshot(), memory.state_dict()
    assert all(layer["reply_steps"] == 3 for layer in state["layers"])
    first = run_schedule(model, memory, ids[103:], [1] * 20)
    resumed, legacy = attach(model, cfg), attach(model, cfg)
    with torch.inference_mode():  # the memory's tensors were made by run_schedule's inference mode
        memory.restore(snap)
        resumed.load_state_dict(state)
        legacy.load_state_dict({**state, "layers": [{k: v for k, v in layer.items() if k != "reply_steps"}
                                                    for layer in state["layers"]]})
    torch.testing.assert_close(run_schedule(model, memory, ids[103:], [1] * 20), first, atol=0, rtol=0)
    torch.testing.assert_close(run_schedule(model, resumed, ids[103:], [1] * 20), first, atol=0, rtol=0)
    assert not torch.equal(run_schedule(model, legacy, ids[103:], [1] * 20), first)


@pytest.mark.parametrize("positions", ["ordered", "runs"])
@pytest.mark.parametrize("schedule,chunk_size", [("one call", 16), ("uneven pieces", 5), ("token by token", 1)])
def test_positions_until_switches_to_shared_positions_after_n_tokens(positions, schedule, chunk_size):
    """memory_positions_until: N: the chunks that end within the first N tokens place memory by the ordered rule,
    every chunk after by the shared one. With every block retrieved (one run: runs is ordered) that is the dense
    reference with the rule switched at N, which neither rule alone matches."""
    model = tiny_model("llama")
    ids = _ids(200)
    cfg = _memory_config(memory_positions=positions, memory_positions_until=120, chunk_size=chunk_size)
    last = chunk_last_positions(SCHEDULES[schedule], chunk_size)
    expected = dense_logits(model, ids, "inf-llm", 32, 4, chunk_last=last, ordered_until=120)
    memory = attach(model, cfg)
    got = run_schedule(model, memory, ids, SCHEDULES[schedule])
    assert memory.stats().blocks >= 15
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    ordered = dense_logits(model, ids, "inf-llm", 32, 4, chunk_last=last)
    shared = dense_logits(model, ids, "inf-llm", 32, 4)
    switched = (last + 1 > 120).nonzero()[0, 0]  # the first query whose chunk reaches past 120
    # The same as the ordered rule until the switch; from it, as far from the ordered rule as the shared one is.
    torch.testing.assert_close(got[:switched], ordered[:switched], atol=ATOL, rtol=1e-4)
    assert (got[switched:] - ordered[switched:]).abs().max() > 20 * ATOL
    assert (got[:switched] - shared[:switched]).abs().max() > 20 * ATOL


def _decoding_rows(pieces: list[int], chunk_size: int) -> torch.Tensor:
    """(T,) bool: the positions the memory reads as decoding steps (chunks of one query) when fed in these pieces."""
    chunks = [min(chunk_size, n - o) for n in pieces for o in range(0, n, chunk_size)]
    return torch.tensor([c == 1 for c in chunks for _ in range(c)])


@pytest.mark.parametrize("positions", ["ordered", "runs"])
def test_decode_memory_positions_order_memory_for_decoding_steps_only(positions):
    """decode_memory_positions: ordered (or runs): decoding steps (one-query chunks) place memory by that rule,
    prompts' chunks by memory_positions (shared). With every block retrieved (one run: runs is ordered) that is the
    dense reference with the ordered rule for those rows only, which neither rule alone matches."""
    model = tiny_model("llama")
    ids = _ids(200)
    cfg = _memory_config(decode_memory_positions=positions, chunk_size=16)
    rows = _decoding_rows(_REPLIES, 16)
    assert 0 < int(rows.sum()) < len(ids)
    last = chunk_last_positions(_REPLIES, 16)
    expected = dense_logits(model, ids, "inf-llm", 32, 4, chunk_last=last, ordered_rows=rows)
    memory = attach(model, cfg)
    got = run_schedule(model, memory, ids, _REPLIES)
    assert memory.stats().blocks >= 15
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    ordered = dense_logits(model, ids, "inf-llm", 32, 4, chunk_last=last)
    shared = dense_logits(model, ids, "inf-llm", 32, 4)
    decoding = rows & (torch.arange(len(ids)) >= 4 + 32 + 16)  # steps that attend some memory
    assert decoding.any()
    first = rows.nonzero()[0, 0]  # (later prompt rows read the reply's keys, which the decoding rule made)
    torch.testing.assert_close(got[:first], shared[:first], atol=ATOL, rtol=1e-4)
    assert (got[decoding] - shared[decoding]).abs().max() > 20 * ATOL
    assert (got[~rows] - ordered[~rows]).abs().max() > 20 * ATOL


def test_decode_memory_bias_lowers_the_far_logits_of_decoding_steps_only():
    """decode_memory_bias: B: with every block retrieved, decoding steps (one-query chunks) are the dense reference
    with B subtracted from the logits of the keys outside their window, prompts' chunks the plain shared rule's."""
    model = tiny_model("llama")
    ids = _ids(200)
    bias = 1.5
    cfg = _memory_config(decode_memory_bias=bias, chunk_size=16)
    rows = _decoding_rows(_REPLIES, 16)
    expected = dense_logits(model, ids, "inf-llm", 32, 4, far_bias=rows.float() * bias)
    memory = attach(model, cfg)
    got = run_schedule(model, memory, ids, _REPLIES)
    assert memory.stats().blocks >= 15
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    shared = dense_logits(model, ids, "inf-llm", 32, 4)
    decoding = rows & (torch.arange(len(ids)) >= 32)  # steps with keys outside their window
    first = rows.nonzero()[0, 0]
    torch.testing.assert_close(got[:first], shared[:first], atol=ATOL, rtol=1e-4)
    assert (got[decoding] - shared[decoding]).abs().max() > 20 * ATOL
    biased_everywhere = dense_logits(model, ids, "inf-llm", 32, 4, far_bias=torch.full((len(ids),), bias))
    prompt_rows = ~rows & (torch.arange(len(ids)) >= 32)
    assert (got[prompt_rows] - biased_everywhere[prompt_rows]).abs().max() > 20 * ATOL


@pytest.mark.parametrize("method", ["stream-llm", "infinite-lm"])
@pytest.mark.parametrize("pieces", [[150], [1] * 150, [9, 70, 71]])
def test_baselines_equal_dense_reference(method, pieces):
    model = tiny_model("mistral")
    ids = _ids(150)
    cfg = _memory_config(method=method, chunk_size=16)
    expected = dense_logits(model, ids, method, cfg.local_window, cfg.num_sink_tokens)
    memory = attach(model, cfg)
    torch.testing.assert_close(run_schedule(model, memory, ids, pieces), expected, atol=ATOL, rtol=1e-4)


def _reference_code_prefill_bug(tq, tk, mask, q_offset, window, device):
    """The public reference's global-stage mask: every query of a chunk masked as if it were the chunk's last."""
    if mask == "complement":
        rel = (tq - 1 + q_offset) - torch.arange(tk, device=device)[None, :]
        return (rel >= window).expand(tq, tk)
    return _correct_visible_mask(tq, tk, mask, q_offset, window, device)


_correct_visible_mask = reference.visible_mask


def test_dense_reference_comparison_catches_the_reference_prefill_bug(monkeypatch):
    """The oracle must be able to fail: with the reference code's mask, chunked prefill attends keys twice."""
    model = tiny_model("llama")
    ids = _ids(120)
    cfg = _memory_config(chunk_size=16)
    expected = dense_logits(model, ids, "inf-llm", cfg.local_window, cfg.num_sink_tokens)
    monkeypatch.setattr(reference, "visible_mask", _reference_code_prefill_bug)
    # The additive masks are cached: a fresh cache for this test, so they are built from the buggy mask.
    monkeypatch.setattr(reference, "mask_bias", functools.lru_cache(maxsize=32)(reference.mask_bias.__wrapped__))
    chunked = run_schedule(model, attach(model, cfg), ids, [120])
    assert (chunked - expected).abs().max() > 1e-2
    # Decoding token by token is unaffected by that bug, as docs/METHOD.md section 2 says.
    stepwise = run_schedule(model, attach(model, cfg.replace(chunk_size=1)), ids, [1] * 120)
    torch.testing.assert_close(stepwise, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("schedule,chunk_size", [("one call", 16), ("token by token", 1), ("uneven pieces", 5)])
@pytest.mark.parametrize("method", ["inf-llm", "stream-llm", "infinite-lm"])
@pytest.mark.parametrize("memory_distance", [None, 96])
def test_wide_window_for_the_first_tokens_then_the_local_window(schedule, chunk_size, method, memory_distance):
    """wide_window: W, wide_window_until: N: a chunk that ends within the first N tokens has a W-token window (and,
    without memory_distance, memory at distance W), every later chunk local_window's; the keys a narrowing window
    leaves go to memory at once. With every block retrieved that is the dense reference with each query's own
    window, which neither window alone matches."""
    model = tiny_model("llama")
    ids = _ids(200)
    until = 100
    cfg = _memory_config(chunk_size=chunk_size, method=method, memory_distance=memory_distance, wide_window=64,
                         wide_window_until=until)
    last = chunk_last_positions(SCHEDULES[schedule], chunk_size)
    windows = torch.where(last + 1 <= until, 64, 32)
    reference = functools.partial(dense_logits, model, ids, method, sinks=cfg.num_sink_tokens, distance=memory_distance)
    expected = reference(window=windows)
    memory = attach(model, cfg)
    got = run_schedule(model, memory, ids, SCHEDULES[schedule])
    if method == "inf-llm":
        assert memory.stats().blocks >= 15
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    for window in (32, 64):
        assert (expected - reference(window=window)).abs().max() > 20 * ATOL


def test_wide_window_until_beyond_the_input_is_the_wide_window_itself():
    """Within wide_window_until the memory is, bit for bit, the one whose local_window is the wide window, with top-k
    smaller than the number of blocks (real retrieval, two stages, the prompt end's vote and its placing near):
    measurements of a W-token window hold for the conversations that end within wide_window_until."""
    model = tiny_model("llama")
    ids = _ids(230, seed=4)
    settings = dict(topk_blocks=3, rerank_blocks=6, device_cache_blocks=12, prompt_end_blocks=2, prompt_end_run=2,
                    sink_memory_distance=8, voted_memory_distance=8, sink_memory_with_voted=True)

    def logits(**window):
        engine = Engine(model, ByteTokenizer(), _memory_config(**settings, **window))
        pieces = []
        engine.feed(ids[:200].tolist(), on_logits=lambda start, logits: pieces.append(logits.float()))
        steps = [engine.feed([token]) for token in ids[200:].tolist()]
        assert all(layer.end_blocks is not None for layer in engine.memory.layers)  # the prompt's end voted
        return torch.cat(pieces + [torch.stack(steps)])

    scheduled = logits(wide_window=64, wide_window_until=230)
    torch.testing.assert_close(scheduled, logits(local_window=64), atol=0, rtol=0)
    assert (scheduled - logits()).abs().max() > 20 * ATOL
