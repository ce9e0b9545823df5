"""The conversation controller: token-exact memory across turns, rollback (!!regen, !!remove, Ctrl-C), snapshots.

Oracles: the memory's tokens must equal the tokenisation of a fresh rendering of the transcript, and its
next-token logits must equal the dense InfLLM reference over that rendering (all blocks retrieved, so the
reference is exact whatever the feeding schedule, rollbacks included). A tiny random llama with the embedded
model's vocabulary gives real chat templates at random-weight speed.
"""

import pytest
import torch

from chat.chat_format import ChatFormat, ChatFormatError
from chat.conversation import Conversation, StopRequested, TurnCancelled
from inf_llm.config.schema import InfLLMConfig
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from tests.tiny_models import dense_logits, tiny_model

ATOL = 2e-4
VOCAB = 49152  # the embedded tokenizer's


def tiny_config(**overrides) -> InfLLMConfig:
    # topk_blocks >= every block the tests create: all blocks retrieved, so the dense reference is exact.
    base = dict(num_sink_tokens=4, local_window=32, block_size=8, repr_tokens=2, topk_blocks=96, chunk_size=16,
                device_cache_blocks=96, storage_dtype="float32", kernel_backend="torch")
    return InfLLMConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB)


def make(model, tokenizer, template=None, system=None, seed=0, max_new_tokens=6, prefill_chunk=64, temperature=1.0,
         **config):
    engine = Engine(model, tokenizer, tiny_config(**config), prefill_chunk=prefill_chunk)
    fmt = ChatFormat.create(tokenizer, template, system)
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    return Conversation(engine, fmt, params)


def assert_exact(conv: Conversation, model, window=32, sinks=4):
    """Memory == fresh tokenisation of the transcript, and its logits == the dense reference's."""
    fmt, engine = conv.format, conv.engine
    assert engine.tokens == fmt.render(conv.messages)
    assert engine.stats().tokens == len(engine.tokens)
    probe = fmt.render(conv.messages + [{"role": "user", "content": "and?"}], add_generation_prompt=True)
    snap = engine.snapshot()
    got = engine.feed(probe[len(engine.tokens):])
    engine.restore(snap)
    expected = dense_logits(model, torch.tensor(probe), "inf-llm", window, sinks)[-1]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


MESSAGES = ["Hello! My name is Alice.", "Tell me about the sea. " * 12, "What is my name?", "ok"]


@pytest.mark.parametrize("template", [None, "vicuna_v1.1"])
def test_memory_equals_fresh_prefill_across_turns(model, tokenizer, template):
    conv = make(model, tokenizer, template, system="Be brief.")
    for text in MESSAGES:
        reply = conv.ask(text)
        assert conv.messages[-1] == {"role": "assistant", "content": reply.text}
        assert_exact(conv, model)
    assert conv.engine.stats().blocks >= 10  # blocks were formed and retrieved, not only the window
    assert len(conv.messages) == 2 * len(MESSAGES)


def test_each_turn_feeds_only_its_new_tokens(model, tokenizer):
    conv = make(model, tokenizer)
    conv.ask(MESSAGES[0])
    before_tokens, before_fed = list(conv.engine.tokens), conv.counters.fed_tokens
    reply = conv.ask(MESSAGES[1])
    prompt = conv.format.render(conv.messages[:-1], add_generation_prompt=True)
    assert prompt[: len(before_tokens)] == before_tokens
    assert reply.prompt_tokens == len(prompt) - len(before_tokens)
    # Read since: the new prompt, the generated tokens fed back, and the closing (re-read reply at most).
    fed = conv.counters.fed_tokens - before_fed
    assert fed == reply.prompt_tokens + reply.generated_tokens - 1 + reply.closing_tokens
    assert reply.closing_tokens <= reply.generated_tokens + 8


def test_regen_rolls_back_to_the_prompt_without_rereading(model, tokenizer):
    conv = make(model, tokenizer, seed=3)
    conv.ask(MESSAGES[0])
    conv.ask(MESSAGES[1])
    first = conv.messages[-1]["content"]
    fed = conv.counters.fed_tokens
    reply = conv.regen()
    assert reply.prompt_tokens == 1  # only the generation prompt's last token: nothing re-read
    assert conv.counters.fed_tokens - fed == 1 + reply.generated_tokens - 1 + reply.closing_tokens
    assert len(conv.messages) == 4 and conv.messages[2]["content"] == MESSAGES[1]
    assert conv.messages[-1]["content"] == reply.text
    assert reply.text != first  # each reply has its own seed: !!regen gives another reply
    assert_exact(conv, model)


def test_greedy_regen_reproduces_the_reply(model, tokenizer):
    # The rolled-back state is exactly the one the first reply was generated from.
    conv = make(model, tokenizer, temperature=0.0, max_new_tokens=12)
    conv.ask(MESSAGES[1])
    conv.ask(MESSAGES[2])
    first = conv.messages[-1]["content"]
    assert conv.regen().text == first
    assert_exact(conv, model)


def test_regen_without_reply_is_refused(model, tokenizer):
    conv = make(model, tokenizer)
    with pytest.raises(ValueError, match="no reply"):
        conv.regen()


def test_remove_rolls_back_to_the_previous_turn_without_rereading(model, tokenizer):
    conv = make(model, tokenizer)
    conv.ask(MESSAGES[0])
    after_first = list(conv.engine.tokens)
    conv.ask(MESSAGES[1])
    conv.ask(MESSAGES[2])
    fed = conv.counters.fed_tokens
    assert conv.remove() and conv.remove()
    assert conv.counters.fed_tokens == fed  # restored from snapshots, nothing read
    assert conv.engine.tokens == after_first
    assert [m["content"] for m in conv.messages if m["role"] == "user"] == [MESSAGES[0]]
    assert_exact(conv, model)
    conv.ask(MESSAGES[3])  # and the conversation goes on from there
    assert_exact(conv, model)
    assert conv.remove() and conv.remove()
    assert conv.messages == [] and conv.engine.tokens == []
    assert not conv.remove()


def test_remove_past_the_kept_snapshots_rereads_from_the_oldest(model, tokenizer):
    conv = make(model, tokenizer)
    conv.max_snapshots = 2
    for text in MESSAGES:
        conv.ask(text)
    assert len(conv.snapshot_points) == 2
    fed = conv.counters.fed_tokens
    for _ in range(3):
        conv.remove()
    assert conv.counters.fed_tokens > fed  # had to re-read: the snapshots of those turns were dropped
    assert_exact(conv, model)


def test_reset_empties_memory_and_transcript(model, tokenizer):
    conv = make(model, tokenizer)
    conv.ask(MESSAGES[0])
    conv.reset()
    assert conv.messages == [] and conv.engine.tokens == [] and conv.engine.stats().tokens == 0
    conv.ask(MESSAGES[2])
    assert_exact(conv, model)


def test_stop_while_reading_rolls_the_turn_back(model, tokenizer):
    conv = make(model, tokenizer, prefill_chunk=32)
    conv.ask(MESSAGES[0])
    messages, tokens = list(conv.messages), list(conv.engine.tokens)
    calls = []

    def progress(done, total):
        calls.append((done, total))
        if len(calls) == 3:  # part of the document is in the memory
            raise StopRequested()

    with pytest.raises(TurnCancelled):
        conv.ask("A long document. " * 60, progress=progress)
    assert calls[0][0] == 0 and len(calls) == 3
    assert conv.messages == messages and conv.engine.tokens == tokens
    assert_exact(conv, model)
    conv.ask(MESSAGES[2])
    assert_exact(conv, model)


def test_hard_interrupt_while_reading_rolls_the_turn_back(model, tokenizer):
    conv = make(model, tokenizer, prefill_chunk=32)
    conv.ask(MESSAGES[0])
    messages = list(conv.messages)

    def progress(done, total):
        if done >= 64:
            raise KeyboardInterrupt

    with pytest.raises(TurnCancelled):
        conv.ask("A long document. " * 60, progress=progress)
    assert conv.messages == messages
    assert_exact(conv, model)


def test_stop_while_generating_keeps_the_turn_whole(model, tokenizer):
    conv = make(model, tokenizer, max_new_tokens=40)
    steps = []
    reply = conv.ask(MESSAGES[0], on_step=steps.append, should_stop=lambda: len(steps) >= 3)
    assert reply.finish_reason == "interrupted" and reply.generated_tokens == 3
    assert conv.messages[-1] == {"role": "assistant", "content": "".join(s.text for s in steps)}
    assert_exact(conv, model)


def test_hard_interrupt_while_generating_keeps_the_turn_whole(model, tokenizer):
    conv = make(model, tokenizer, max_new_tokens=40)
    steps = []

    def on_step(step):
        steps.append(step)
        if len(steps) == 4:
            raise KeyboardInterrupt

    reply = conv.ask(MESSAGES[1], on_step=on_step)
    assert reply.finish_reason == "interrupted"
    assert conv.messages[-1]["content"] == "".join(s.text for s in steps)
    assert_exact(conv, model)
    conv.ask(MESSAGES[2])
    assert_exact(conv, model)


def test_unknown_template_and_missing_chat_template_are_refused(tokenizer):
    with pytest.raises(ChatFormatError, match="vicuna_v1.1"):
        ChatFormat.create(tokenizer, "vicuna_v1")

    class NoTemplate:
        chat_template = None

    with pytest.raises(ChatFormatError, match="--conv-template"):
        ChatFormat.create(NoTemplate())


def test_engine_must_start_empty(model, tokenizer):
    engine = Engine(model, tokenizer, tiny_config())
    engine.feed([1, 2, 3])
    with pytest.raises(ValueError, match="empty"):
        Conversation(engine, ChatFormat.create(tokenizer), SamplingParams())


@pytest.mark.parametrize("ranking", ["representatives", "bounds"])
def test_sources_replay_the_last_reply_and_leave_the_memory_as_it_was(model, tokenizer, ranking):
    """!!sources: the passages and weights equal those a trace attached during the reply itself records, and the
    memory after the replay gives the same next-token logits, bit for bit. Key bounds of blocks of repeated text
    tie exactly (a block's bounds ignore order): the replay breaks those ties as the reply did."""
    from inf_llm.memory.retrieval_trace import sources

    def conversation():
        return make(model, tokenizer, temperature=0.0, max_new_tokens=10, topk_blocks=2, device_cache_blocks=4,
                    block_ranking=ranking)

    live = conversation()
    live.ask(MESSAGES[1])
    start = len(live.engine.tokens) + len(live.format.render(
        live.messages + [{"role": "user", "content": MESSAGES[2]}], add_generation_prompt=True)) \
        - len(live.format.render(live.messages)) - 1
    trace = live.engine.memory.start_trace()

    def stop_at_the_last_sample(step):
        # Not later: when the reply's text re-tokenises differently, the closing sync re-reads those positions.
        if step.finish_reason is not None:
            live.engine.memory.stop_trace()

    live.ask(MESSAGES[2], on_step=stop_at_the_last_sample)
    assert live.engine.memory.layers[0].trace is None  # stopped by the reply's last step
    expected = sources(trace, since=start, until=start + live.last_reply_tokens)  # the reply's queries only

    conv = conversation()
    conv.ask(MESSAGES[1])
    conv.ask(MESSAGES[2])
    assert conv.messages == live.messages and conv.last_reply_tokens == live.last_reply_tokens > 0
    probe = conv.format.render(conv.messages + [{"role": "user", "content": "and?"}], add_generation_prompt=True)
    tokens, snap = list(conv.engine.tokens), conv.engine.snapshot()
    before = conv.engine.feed(probe[len(tokens):])
    conv.engine.restore(snap)
    found = conv.sources()
    assert found and len(found) == len(expected)
    for (got, text), want in zip(found, expected):
        assert (got.start, got.end) == (want.start, want.end) and got.weight == pytest.approx(want.weight, rel=1e-5)
        assert text == tokenizer.decode(tokens[got.start : got.end])
    assert conv.engine.tokens == tokens
    torch.testing.assert_close(conv.engine.feed(probe[len(tokens):]), before, atol=0, rtol=0)


def test_sources_are_refused_without_a_reply_or_a_memory_that_retrieves(model, tokenizer):
    conv = make(model, tokenizer, temperature=0.0)
    with pytest.raises(ValueError, match="no reply"):
        conv.sources()
    conv.ask(MESSAGES[0])
    conv.remove()
    with pytest.raises(ValueError, match="no reply"):
        conv.sources()
    full = make(model, tokenizer, temperature=0.0, method="full")
    full.ask(MESSAGES[0])
    with pytest.raises(ValueError, match="retrieves nothing"):
        full.sources()


def test_a_chat_past_its_short_settings_reads_again_and_back_before_the_switch_is_short_again(model, tokenizer):
    """short_conversation in the chat: the message that takes the conversation past the limit is answered from the
    conversation read again under the config's own settings; removing it goes back to the short settings' memory,
    which equals that of a chat that never went past."""
    short = dict(short_conversation={"local_window": 64, "num_sink_tokens": 8}, short_conversation_until=120)
    conv, ref = (make(model, tokenizer, temperature=0.0, **short) for _ in range(2))
    conv.ask(MESSAGES[0])
    ref.ask(MESSAGES[0])
    from chat.stats import stats_rows

    assert ("conversation settings", "short: its own settings until 120 tokens") in stats_rows(conv, None)
    conv.ask(MESSAGES[1])
    assert not conv.engine.short and len(conv.engine.tokens) > 120
    assert ("conversation settings", "long: read again past 120 tokens") in stats_rows(conv, None)
    assert conv.remove() and conv.engine.short
    assert ("conversation settings", "short: its own settings until 120 tokens") in stats_rows(conv, None)
    assert conv.engine.tokens == ref.engine.tokens and conv.engine.feeds == ref.engine.feeds

    def probe(c):
        snap = c.engine.snapshot()
        logits = c.engine.feed(c.format.render([{"role": "user", "content": MESSAGES[2]}], add_generation_prompt=True))
        c.engine.restore(snap)
        return logits

    torch.testing.assert_close(probe(conv), probe(ref), atol=0, rtol=0)
    assert conv.ask(MESSAGES[1]).text == ref.ask(MESSAGES[1]).text
    assert not ref.engine.short
