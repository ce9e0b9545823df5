"""The generation API: incremental feeding, rollback, resume, sampling, decoding, stop conditions (tiny random models).

Oracles: transformers' own logits processors as its `generate` builds them, `tokenizer.decode` of all reply ids,
the stock model's greedy `generate`, and a fresh feed of the whole sequence.
"""

import io
import random
from contextlib import contextmanager

import pytest
import torch
from transformers import GenerationConfig

from inf_llm.config.schema import InfLLMConfig
from inf_llm.generation.decoding import IncrementalDecoder, StopStrings
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import (CHAT_DEFAULTS, RepeatCounter, SamplingParams, generation_config_defaults, process_logits, resolve_params, sample_next)
from tests.tiny_models import stock_logits, tiny_model


class ByteTokenizer:
    """Token id = byte value (vocab 128): enough to test text handling without downloads."""

    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if not (skip_special_tokens and i == 0)).decode("utf-8", "replace")


def _config(**overrides) -> InfLLMConfig:
    base = dict(num_sink_tokens=4, local_window=32, block_size=8, repr_tokens=2, topk_blocks=3, chunk_size=16,
                device_cache_blocks=8, kernel_backend="torch")
    return InfLLMConfig(**{**base, **overrides})


def _ids(n, seed=0):
    return torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@contextmanager
def steered(engine: Engine, sequence: list[int]):
    """Force the model to emit `sequence` in turn as the reply of the next generate() call: set `.start` to the
    position of the prompt's last token first; the output at position start + n is forced to sequence[n]."""
    state = type("Steer", (), {"start": None})()

    def steer(module, inputs, output):
        last = len(engine.tokens) + inputs[0].shape[1] - 1  # feed() extends engine.tokens after the model call
        if state.start is None or last < state.start:
            return output
        forced = torch.full_like(output, -1e4)
        forced[..., sequence[min(last - state.start, len(sequence) - 1)]] = 1e4
        return forced

    handle = engine.model.lm_head.register_forward_hook(steer)
    try:
        yield state
    finally:
        handle.remove()


def _reply(engine: Engine, prompt: list[int], sequence: list[int], params: SamplingParams):
    with steered(engine, sequence) as steer:
        steer.start = len(engine.tokens) + len(prompt) - 1
        return list(engine.generate(prompt, params))


@pytest.mark.parametrize("method", ["inf-llm", "stream-llm", "full"])
def test_two_feeds_equal_one_feed_of_the_concatenation(method):
    model = tiny_model("llama")
    ids = _ids(160)
    one = Engine(model, ByteTokenizer(), _config(method=method)).feed(ids)
    engine = Engine(model, ByteTokenizer(), _config(method=method), prefill_chunk=48)
    engine.feed(ids[:64])  # split on a chunk boundary, so even top-k retrieval sees the same chunks
    two = engine.feed(ids[64:])
    assert engine.tokens == ids
    torch.testing.assert_close(two, one, atol=1e-4, rtol=1e-4)
    assert engine.stats().tokens == 160


def _reply_logits(model, config: InfLLMConfig, prompts: list[list[int]], reply: list[int]) -> torch.Tensor:
    """Each prompt read by one feed (all but its last token), then its last token and `reply` fed one at a time,
    as a chat's turns are: the logits of those one-token steps, (steps, vocab)."""
    engine = Engine(model, ByteTokenizer(), config)
    logits = []
    for prompt in prompts:
        engine.feed(prompt[:-1])
        logits += [engine.feed([token]) for token in prompt[-1:] + reply]
    return torch.stack(logits)


def test_the_engine_tells_the_memory_each_prompts_length_for_decode_memory_distance_from():
    """A reply to a prompt (a feed of several tokens) of at least decode_memory_distance_from tokens decodes as
    under decode_memory_distance alone, a reply to a shorter one as without it: bit for bit, whichever comes first."""
    model = tiny_model("llama")
    ruled = _config(decode_memory_distance=96, decode_memory_distance_from=60)
    every, never = _config(decode_memory_distance=96), _config()
    long_prompt, short_prompt, reply = _ids(80, seed=1), _ids(40, seed=2), _ids(6, seed=3)
    got = _reply_logits(model, ruled, [long_prompt, short_prompt], reply)
    far, near = _reply_logits(model, every, [long_prompt], reply), _reply_logits(model, never, [long_prompt], reply)
    assert torch.equal(got[:7], far) and not torch.equal(got[:7], near)
    got = _reply_logits(model, ruled, [short_prompt, long_prompt], reply)
    far, near = _reply_logits(model, every, [short_prompt], reply), _reply_logits(model, never, [short_prompt], reply)
    assert torch.equal(got[:7], near) and not torch.equal(got[:7], far)


def test_a_replys_first_decode_memory_distance_steps_decode_far_whatever_the_prompts():
    """decode_memory_distance_steps: N: each reply's first N steps (the first reads the prompt's last token) decode
    as under decode_memory_distance alone, its later steps as without it; the count starts again with each prompt.
    The first reply's far steps are bit for bit those of decode_memory_distance; after them the memory holds the
    attention mass of steps decoded otherwise than under either config, so each later step is only far nearer to
    the config it follows (tens of times) than to the other one."""
    model = tiny_model("llama")
    prompts, reply = [_ids(80, seed=1), _ids(40, seed=2)], _ids(6, seed=3)
    got = _reply_logits(model, _config(decode_memory_distance=96, decode_memory_distance_steps=3), prompts, reply)
    far = _reply_logits(model, _config(decode_memory_distance=96), prompts, reply)
    near = _reply_logits(model, _config(), prompts, reply)
    assert torch.equal(got[:3], far[:3])
    for step in range(3, 14):  # each reply has 7 steps: the second's first 3 (rows 7-9) are far again
        follows, other = (far, near) if step in (7, 8, 9) else (near, far)
        assert (got[step] - follows[step]).abs().max() * 10 < (got[step] - other[step]).abs().max()


def test_full_method_is_the_stock_model():
    model = tiny_model("qwen2")
    ids = _ids(50)
    got = Engine(model, ByteTokenizer(), _config(method="full")).feed(ids)
    torch.testing.assert_close(got, stock_logits(model, torch.tensor(ids))[-1], atol=1e-4, rtol=1e-4)


def test_greedy_generation_follows_the_argmax_chain():
    model = tiny_model("llama")
    prompt = _ids(40)
    steps = list(Engine(model, ByteTokenizer(), _config()).generate(prompt, SamplingParams(temperature=0, max_new_tokens=6)))
    # The oracle: re-feed the whole sequence from scratch each step and take the argmax.
    seq = list(prompt)
    for step in steps:
        expected = int(torch.argmax(Engine(model, ByteTokenizer(), _config()).feed(seq)))
        assert step.token_id == expected
        seq.append(expected)
    assert steps[-1].finish_reason in ("length", "eos")
    assert all(s.finish_reason is None for s in steps[:-1])


def test_repeat_counter_penalises_a_token_from_its_use_beyond_the_contexts_count():
    counter = RepeatCounter([5, 5, 7, 200])
    steps = []
    for token in (5, 5, 9, 5, 7, 9, 7, 5):
        counter.add(token)
        steps.append(counter.penalised().tolist())
    # 5: twice in the context, penalised from its third use; 9: never in it, from its first; 7: once, from its second.
    assert steps == [[], [], [9], [9, 5], [9, 5], [9, 5], [9, 5, 7], [9, 5, 7]]
    assert RepeatCounter([]).penalised().tolist() == []


def test_repetition_penalty_spares_what_the_context_holds():
    """Greedy decoding with the penalty == an independent oracle: re-feed the whole sequence from scratch each step,
    penalise (with transformers' processor) the tokens the reply so far uses more often than the prompt, argmax."""
    from collections import Counter

    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    model = tiny_model("llama")
    prompt = _ids(40, seed=3)
    params = SamplingParams(temperature=0, max_new_tokens=24, repetition_penalty=3.0)
    steps = list(Engine(model, ByteTokenizer(), _config()).generate(prompt, params))
    penalty = RepetitionPenaltyLogitsProcessor(3.0)
    seq, reply, spared, penalised_any = list(prompt), [], 0, False
    context = Counter(prompt)
    for step in steps:
        counts = Counter(reply)
        over = [t for t in counts if counts[t] > context[t]]
        spared += sum(1 for t in counts if 0 < counts[t] <= context[t])
        penalised_any |= bool(over)
        logits = Engine(model, ByteTokenizer(), _config()).feed(seq)[None]
        if over:
            logits = penalty(torch.tensor([over]), logits)
        expected = int(torch.argmax(logits[0]))
        assert step.token_id == expected
        seq.append(expected)
        reply.append(expected)
    # The case exercises both sides of the rule: tokens penalised, and reply tokens the prompt's count spared.
    assert penalised_any and spared


def test_generation_stops_on_eos_stop_string_and_length():
    model = tiny_model("llama")
    engine = Engine(model, ByteTokenizer(), _config())
    sequence = [ord("a"), ord("b"), ord("c"), 0]  # "a", "b", "c", EOS
    steps = _reply(engine, _ids(10), sequence, SamplingParams(temperature=0, max_new_tokens=10))
    assert [s.token_id for s in steps] == sequence and steps[-1].finish_reason == "eos"
    assert "".join(s.text for s in steps) == "abc"
    steps = _reply(engine, _ids(3), sequence, SamplingParams(temperature=0, stop_strings=("bc",)))
    assert steps[-1].finish_reason == "stop" and "".join(s.text for s in steps) == "a"
    steps = _reply(engine, _ids(3), sequence, SamplingParams(temperature=0, max_new_tokens=2))
    assert steps[-1].finish_reason == "length" and len(steps) == 2
    # The last sampled token is not fed: the memory holds prompts and all but the final token of each reply.
    assert len(engine.tokens) == (10 + 3) + (3 + 2) + (3 + 1)


def test_generate_reads_all_but_the_last_prompt_token_as_a_prefill():
    """generate(prompt) == feed(prompt[:-1]), then feed(prompt[-1:]) alone, bit for bit; on_prefilled() comes
    between the two, and a snapshot taken there regenerates the same reply from the last prompt token."""
    model = tiny_model("llama")
    prompt = _ids(90, seed=3)
    reference = Engine(model, ByteTokenizer(), _config(), prefill_chunk=32)
    reference.feed(prompt[:-1])
    first = int(torch.argmax(reference.feed(prompt[-1:])))

    engine = Engine(model, ByteTokenizer(), _config(), prefill_chunk=32)
    seen, progress, snaps = [], [], []

    def at_prefilled():
        seen.append(list(engine.tokens))
        snaps.append(engine.snapshot())

    params = SamplingParams(temperature=0, max_new_tokens=5)
    steps = list(engine.generate(prompt, params, progress=lambda d, t: progress.append((d, t)),
                                 on_prefilled=at_prefilled))
    assert seen == [prompt[:-1]] and progress == [(32, 89), (64, 89), (89, 89)]
    assert steps[0].token_id == first
    engine.restore(snaps[0])
    again = list(engine.generate(prompt[-1:], params))  # !!regen: only the last prompt token is fed again
    assert [s.token_id for s in again] == [s.token_id for s in steps]
    with pytest.raises(ValueError, match="at least one"):
        next(engine.generate([], params))


def test_forced_blocks_are_in_every_layers_choice_at_every_step():
    """InfLLMMemory.force_blocks (the benchmark's needle oracle): once a forced block exists, every traced chunk
    of every layer retrieved it, besides its own top-k; settings that cannot hold them are refused."""
    model = tiny_model("llama")
    engine = Engine(model, ByteTokenizer(), _config(device_cache_blocks=8))
    engine.memory.force_blocks([2, 5, 5, 400])
    trace = engine.memory.start_trace()
    engine.feed(_ids(200, seed=6), progress=None)
    for token in (1, 2, 3):
        engine.feed([token])
    checked = 0
    for chunk in trace.chunks:
        formed = 0 if chunk.scores is None else chunk.scores.shape[-1]  # blocks that existed for this chunk
        ids = set(chunk.blocks.tolist())
        assert ids >= {b for b in (2, 5) if b < formed} and 400 not in ids
        checked += len(ids) > 3  # the top-3 and forced blocks besides
    assert checked > 0
    with pytest.raises(ValueError, match="device_cache_blocks=8"):
        engine.memory.force_blocks(list(range(6)))  # 3 + 6 slots

    # From a position on: the chunks before it choose as without the oracle (the reading is the same), and
    # every chunk that holds a token at it or later has the forced blocks.
    ids = _ids(260, seed=7)
    plain = Engine(model, ByteTokenizer(), _config(device_cache_blocks=8))
    unforced = plain.memory.start_trace()
    plain.feed(ids)
    engine.reset()
    engine.memory.force_blocks([1, 3], from_position=150)
    trace = engine.memory.start_trace()
    engine.feed(ids)
    before = after = 0
    for chunk, reference in zip(trace.chunks, unforced.chunks, strict=True):
        assert (chunk.layer, chunk.start, chunk.queries) == (reference.layer, reference.start, reference.queries)
        if chunk.start + chunk.queries <= 150:
            before += 1
            assert torch.equal(chunk.blocks, reference.blocks)
        elif chunk.scores is not None:
            after += 1
            assert set(chunk.blocks.tolist()) >= {1, 3}
    assert before > 0 and after > 0
    with pytest.raises(ValueError, match="per KV head"):
        Engine(model, ByteTokenizer(), _config(per_head_ranking=True, device_cache_blocks=8)).memory.force_blocks([1])


def test_greedy_ids_equal_the_stock_models_generate():
    model = tiny_model("qwen2")
    prompt = _ids(30, seed=5)
    engine = Engine(model, ByteTokenizer(), _config(method="full"))
    engine.eos_token_ids = set()  # never stop early: compare all 12
    ours = [s.token_id for s in engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=12))]
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        stock = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == stock


def test_min_new_tokens_equals_the_stock_models_generate_when_the_end_is_the_likeliest_first_token():
    model = tiny_model("qwen2")
    prompt = _ids(30, seed=5)
    engine = Engine(model, ByteTokenizer(), _config(method="full"))
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    engine.eos_token_ids = set()
    free = [s.token_id for s in engine.generate(prompt, greedy)]
    # The greedy reply's first two tokens made the end of the sequence: the reply would end at once.
    end = {free[0], free[1]}
    model.set_attn_implementation("eager")
    for least in (0, 1, 3):
        engine.reset()
        engine.eos_token_ids = end
        ours = [s.token_id for s in engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=12,
                                                                           min_new_tokens=least))]
        with torch.inference_mode():
            stock = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=least,
                                   eos_token_id=sorted(end), pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == stock
        assert not end & set(ours[:least]) and ours[-1] in end
        if least == 0:
            assert ours == free[:1]  # the reply ends at its first token
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(min_new_tokens=-1)


# wide_window: saved while the window is wide, continued past wide_window_until, where it narrows.
@pytest.mark.parametrize("method,settings", [("inf-llm", {}), ("stream-llm", {}), ("full", {}),
                                             ("inf-llm", dict(wide_window=64, wide_window_until=120)),
                                             ("stream-llm", dict(wide_window=64, wide_window_until=120))])
def test_snapshot_restore_and_resume_from_state_dict(method, settings):
    model = tiny_model("mistral")
    ids = _ids(150)
    engine = Engine(model, ByteTokenizer(), _config(method=method, **settings))
    engine.feed(ids[:100])
    if settings:
        assert {layer.window_len for layer in engine.memory.layers} == {64}
    snap = engine.snapshot()
    state = engine.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    continued = engine.feed(ids[100:])
    engine.restore(snap)
    assert engine.tokens == ids[:100]
    torch.testing.assert_close(engine.feed(ids[100:]), continued, atol=0, rtol=0)
    # A new engine (as after a restart) resumes from the saved state with the same next-token logits.
    resumed = Engine(model, ByteTokenizer(), _config(method=method, **settings))
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.tokens == ids[:100]
    torch.testing.assert_close(resumed.feed(ids[100:]), continued, atol=0, rtol=0)
    if settings:
        assert {layer.window_len for layer in resumed.memory.layers} == {32}


def test_sampling_filters():
    logits = torch.tensor([3.0, 1.0, 2.0, -1.0])
    previous = torch.empty(0, dtype=torch.long)

    def masked(**params):
        return torch.isinf(process_logits(logits, SamplingParams(temperature=1.0, **params), previous)).tolist()

    assert masked(top_k=2) == [False, True, False, True]
    # top-p keeps the smallest prefix reaching p: softmax([3,2,1,-1]) ~ [.66,.24,.09,.01]
    assert masked(top_p=0.8) == [False, True, False, True]
    assert masked(top_p=0.5) == [False, True, True, True]
    # The penalty divides positive logits and multiplies negative ones, once per token however often it came.
    penalised = process_logits(logits, SamplingParams(temperature=0, repetition_penalty=2.0), torch.tensor([0, 3, 3]))
    assert penalised.tolist() == [1.5, 1.0, 2.0, -2.0]
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


SAMPLING_CASES = [
    dict(temperature=0.0),
    dict(temperature=0.0, repetition_penalty=1.3),
    dict(temperature=1.0),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=0.7, top_k=40),
    dict(temperature=0.5, top_k=5, top_p=0.8, repetition_penalty=1.2),
    dict(temperature=1.3, top_k=1000, top_p=0.95, repetition_penalty=0.8),  # top-k above the vocabulary
    dict(temperature=0.2, top_p=0.3, repetition_penalty=1.1),
]


@pytest.mark.parametrize("case", SAMPLING_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_processed_distribution_equals_transformers_processors(case):
    """Our scores, distribution and draws == the processors transformers' generate builds for the same
    GenerationConfig, on random logits (with ties), the reply's tokens as its input ids."""
    model = tiny_model("llama")
    params = SamplingParams(**case)
    config = GenerationConfig(do_sample=params.temperature > 0, temperature=params.temperature or None,
                              top_k=params.top_k, top_p=params.top_p, repetition_penalty=params.repetition_penalty)
    transformers_processors = model._get_logits_processor(config, input_ids_seq_length=1, device="cpu", model_kwargs={})
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(128, generator=g) * 4
        logits[10:14] = logits[9]  # ties
        previous = torch.randint(0, 128, (int(torch.randint(0, 40, (1,), generator=g)),), generator=g)
        expected = transformers_processors(previous[None], logits[None].clone())[0]
        got = process_logits(logits, params, previous)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        token = sample_next(logits, params, previous, torch.Generator().manual_seed(seed))
        if params.temperature == 0:
            assert token == int(torch.argmax(expected))
        else:
            draw = torch.multinomial(torch.softmax(expected, -1), 1, generator=torch.Generator().manual_seed(seed))
            assert token == int(draw)


def test_sampling_defaults_come_from_the_generation_config_and_flags_override():
    assert generation_config_defaults(None) == {}
    assert generation_config_defaults(GenerationConfig(bos_token_id=1, eos_token_id=2)) == {}  # sets no sampling
    qwen = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    assert generation_config_defaults(qwen) == dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    assert generation_config_defaults(GenerationConfig(do_sample=False, top_p=0.9))["temperature"] == 0.0
    # do_sample without the rest: transformers' generate fills in its own defaults (top-k 50), and so do we
    llama3 = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9)
    assert generation_config_defaults(llama3) == dict(temperature=0.6, top_p=0.9, top_k=50, repetition_penalty=1.0)
    model = tiny_model("llama")
    model.generation_config = llama3
    built = model._get_logits_processor(model._prepare_generation_config(None)[0], input_ids_seq_length=1,
                                        device="cpu", model_kwargs={})
    assert [type(p).__name__ for p in built] == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]
    assert built[1].top_k == 50
    assert generation_config_defaults(GenerationConfig(temperature=0.4)) == dict(temperature=0.4)
    params, origin = resolve_params(qwen, temperature=0.2, top_k=None, max_new_tokens=64)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.2, 0.8, 20, 1.05)
    assert params.max_new_tokens == 64
    assert origin == dict(temperature="flag", top_p="model", top_k="model", repetition_penalty="model")
    params, origin = resolve_params(None)
    assert params == SamplingParams(**CHAT_DEFAULTS) and set(origin.values()) == {"default"}
    # The library's own defaults are not the chat's: SamplingParams(temperature=0) is plain greedy decoding.
    assert SamplingParams(temperature=0).repetition_penalty == 1.0
    assert SamplingParams(temperature=0).min_new_tokens == 0 and params.min_new_tokens == 1  # the chat's: never empty


TRICKY = [
    "Bonjour ! Ça va ? Très bien, merci. Crème brûlée à la française, naïve café, Ångström, ñandú.",
    "Emoji: 👋🏽 hello 🇫🇷 flags, 👩‍👩‍👧 a family (ZWJ), ❤️ with a selector, 🤖🤖🤖 in a row.",
    "中文字符和日本語のテキスト、한국어 문장. 「引用」と（括弧）。",
    "  leading spaces,   runs   of spaces,\ttabs,\n\nnew lines and trailing spaces   ",
    "Mixed: naïve 👍 日本 x² ≤ π√2 — “quotes” … ‘end’",
]


class ChunkTokenizer:
    """A tiny tokenizer whose tokens are random 1-4 byte pieces of UTF-8, so they cut characters anywhere; id 0 is
    a special token."""

    def __init__(self, seed: int):
        self.rng, self.pieces, self.ids = random.Random(seed), [b""], {}

    def encode(self, text: str) -> list[int]:
        data, out, i = text.encode(), [], 0
        while i < len(data):
            piece = data[i : i + self.rng.randint(1, 4)]
            i += len(piece)
            if piece not in self.ids:
                self.ids[piece] = len(self.pieces)
                self.pieces.append(piece)
            out.append(self.ids[piece])
            if self.rng.random() < 0.1:
                out.append(0)
        return out

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 0)).decode("utf-8", "replace")


def _stream(tokenizer, ids) -> tuple[list[str], int]:
    """The pieces an IncrementalDecoder gives for ids, one token at a time, and the most tokens one decode() read."""
    widest = 0
    decode = tokenizer.decode

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            nonlocal widest
            widest = max(widest, len(ids))
            return decode(ids, skip_special_tokens=skip_special_tokens)

    decoder = IncrementalDecoder(Counting())
    pieces = [decoder.push(i) for i in ids]
    widest_streaming = widest
    pieces.append(decoder.finish())
    return pieces, widest_streaming


@pytest.mark.parametrize("text", TRICKY)
def test_incremental_decoding_equals_decoding_the_whole_reply(text, embedded_model):
    tokenizer = embedded_model[1]
    ids = tokenizer.encode(text, add_special_tokens=False) + [2]  # and the EOS, skipped
    pieces, widest = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert widest <= 8  # a bounded tail per token, not the whole reply
    assert pieces[-1] == "" and not any("\ufffd" in p for p in pieces)  # no half characters shown on the way
    for seed in range(3):
        tiny = ChunkTokenizer(seed)
        ids = tiny.encode(text)
        pieces, widest = _stream(tiny, ids)
        assert "".join(pieces) == tiny.decode(ids) == text
        # the tail: the last piece given out and a character still incomplete, each up to 4 one-byte tokens and
        # the special tokens among them
        assert widest <= 16 and not any("\ufffd" in p for p in pieces)


def test_incremental_decoding_of_random_ids_equals_decoding_them_all(embedded_model):
    """Token sequences no text gives: broken UTF-8 pieces, special tokens. The stream still adds up exactly."""
    tokenizer = embedded_model[1]
    for seed in range(20):
        rng = random.Random(seed)
        ids = [rng.randrange(len(tokenizer)) if rng.random() < 0.7 else rng.randrange(3)
               for _ in range(rng.randint(1, 120))]
        assert "".join(_stream(tokenizer, ids)[0]) == tokenizer.decode(ids, skip_special_tokens=True)
    ids = [rng.randrange(128, 256) for _ in range(300)]
    assert "".join(_stream(ByteTokenizer(), ids)[0]) == ByteTokenizer().decode(ids)


def _stop_stream(stops, pieces):
    shown, stopped = [], False
    filt = StopStrings(stops)
    for piece in pieces:
        text, stopped = filt.push(piece)
        shown.append(text)
        if stopped:
            break
    if not stopped:
        shown.append(filt.flush())
    return shown, stopped


def test_stop_strings_cut_before_the_first_and_never_show_part_of_one():
    def check(stops, pieces):
        shown, stopped = _stop_stream(stops, pieces)
        whole = "".join(pieces)
        hits = [whole.find(s) for s in stops if s and s in whole]
        assert "".join(shown) == (whole[: min(hits)] if hits else whole) and stopped == bool(hits)
        for i in range(len(shown)):  # what was shown so far never ends with the start of a stop string ...
            so_far = "".join(shown[: i + 1])
            if i < len(shown) - 1 or stopped:
                assert not any(so_far.endswith(s[:n]) and whole[len(so_far):].startswith(s[n:])
                               for s in stops if s for n in range(1, len(s)))
        return shown

    assert check(["</s>"], ["Hello", " wor", "ld</", "s>", " more"]) == ["Hello", " wor", "ld", ""]  # split
    assert check(["STOP"], ["STOP", "after"]) == [""]  # at the very start
    assert check(["\nUser:", "###"], ["a\nUs", "er", ": b"]) == ["a", "", ""]  # several stops, across 3 pieces
    assert check(["\nUser:", "###"], ["a#", "#", "#b"]) == ["a", "", ""]
    assert check(["ab", "b"], ["xa", "b"]) == ["x", ""]  # the earliest in the text wins, not the first listed
    assert check(["</s>"], ["a</", "b"]) == ["a", "</b", ""]  # held back, then shown: it was not a stop
    assert check(["</s>"], ["a</"]) == ["a", "</"]  # the reply ended: what was held back is shown
    assert check([], ["a", "b"]) == ["a", "b", ""]
    rng = random.Random(0)
    for _ in range(300):  # random splits of random texts over a small alphabet
        whole = "".join(rng.choice("ab\n<>") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(whole) + 1), min(len(whole) + 1, rng.randint(0, 6))))
        pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)])]
        check([rng.choice(["<>", "a\nb", "bb", "<a"]) for _ in range(rng.randint(1, 3))], pieces)


def test_stop_strings_in_generation(embedded_model):
    """Through generate(): a stop split across tokens, one at the very start, several; the text never shows a part
    of a stop string, and eos or length give out what was held back."""
    model = tiny_model("llama")
    engine = Engine(model, ByteTokenizer(), _config())
    reply = [ord(c) for c in "Hi</s>x"]
    steps = _reply(engine, _ids(5), reply, SamplingParams(temperature=0, stop_strings=("</s>",)))
    assert [s.text for s in steps] == ["H", "i", "", "", "", ""] and steps[-1].finish_reason == "stop"
    steps = _reply(engine, _ids(5), reply, SamplingParams(temperature=0, stop_strings=("H",)))
    assert [s.text for s in steps] == [""] and steps[-1].finish_reason == "stop"
    steps = _reply(engine, _ids(5), reply, SamplingParams(temperature=0, stop_strings=("x", "i<", "zz")))
    assert "".join(s.text for s in steps) == "H" and len(steps) == 3
    steps = _reply(engine, _ids(5), [ord("a"), ord("<"), ord("/"), 0], SamplingParams(temperature=0, stop_strings=("</s>",)))
    assert [s.text for s in steps] == ["a", "", "", "</"] and steps[-1].finish_reason == "eos"
    steps = _reply(engine, _ids(5), [ord("a"), ord("<")], SamplingParams(temperature=0, max_new_tokens=2, stop_strings=("</s>",)))
    assert [s.text for s in steps] == ["a", "<"] and steps[-1].finish_reason == "length"


def test_seeded_sampling_is_reproducible():
    model = tiny_model("llama")
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=7)
    a = [s.token_id for s in Engine(model, ByteTokenizer(), _config()).generate(_ids(20), params)]
    b = [s.token_id for s in Engine(model, ByteTokenizer(), _config()).generate(_ids(20), params)]
    assert a == b


def test_feeding_a_prompt_releases_freed_heap_memory_and_decoding_does_not(monkeypatch):
    import inf_llm.generation.engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module, "release_free_memory", lambda: calls.append(1) or True)
    engine = Engine(tiny_model("llama"), ByteTokenizer(), _config(), prefill_chunk=48)
    engine.feed(_ids(100))
    assert len(calls) == 1  # once per prompt, after all its model calls
    engine.feed([5])
    assert len(calls) == 1  # never per decoded token
