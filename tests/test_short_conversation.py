"""short_conversation: other settings while a conversation is short, and the conversation read again under the
config's own once a prompt ends past short_conversation_until (tiny random models).

Oracles: an engine under the short settings alone and one under the config's own settings alone, each fed the same
tokens in the same feeds: the switching engine equals the first while the conversation is short, and the second
(bit for bit) from the prompt that ends past the limit on, as if those settings had held throughout.
"""

import pytest
import torch

from inf_llm.config.schema import InfLLMConfig
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from tests.test_engine import ByteTokenizer, _config, _ids
from tests.tiny_models import tiny_model

SHORT = {"local_window": 64, "num_sink_tokens": 8, "voted_memory_distance": 32}
GREEDY = SamplingParams(temperature=0, max_new_tokens=5)


def _switching(until: int = 200, **overrides) -> InfLLMConfig:
    # Retrieval with top-k below the blocks, the second stage and the prompt end's votes: what a replay must redo.
    return _config(rerank_blocks=4, prompt_end_blocks=2, short_conversation=dict(SHORT),
                   short_conversation_until=until, **overrides)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _turn(engine: Engine, prompt: list[int]) -> list[int]:
    return [step.token_id for step in engine.generate(prompt, GREEDY)]


def _replayed(model, config: InfLLMConfig, engine: Engine) -> Engine:
    """An engine under `config` alone, fed what `engine` was fed, feed by feed."""
    other = Engine(model, ByteTokenizer(), config)
    start = 0
    for length in engine.feeds:
        other.feed(engine.tokens[start : start + length])
        start += length
    assert other.tokens == engine.tokens
    return other


def _probe(engine: Engine) -> torch.Tensor:
    snap = engine.snapshot()
    logits = engine.feed(_ids(40, seed=9))
    engine.restore(snap)
    return logits


def test_the_short_settings_hold_until_a_prompt_ends_past_the_limit_then_the_config_own_as_if_throughout(model):
    config = _switching()
    engine = Engine(model, ByteTokenizer(), config)
    assert engine.short and engine.memory.config == config.short_config()
    _turn(engine, _ids(90, seed=1))
    _turn(engine, _ids(60, seed=2))  # 155 tokens and the last reply's: within 200
    assert engine.short
    short_alone = _replayed(model, config.short_config(), engine)
    long_alone = _replayed(model, config.long_config(), engine)
    torch.testing.assert_close(_probe(engine), _probe(short_alone), atol=0, rtol=0)
    assert not torch.equal(_probe(short_alone), _probe(long_alone))  # the two settings read differently
    reply = _turn(engine, _ids(70, seed=3))  # ends past 200: the conversation is read again, then this prompt
    assert not engine.short and engine.memory.config == config.long_config()
    assert reply == _turn(long_alone, _ids(70, seed=3))
    assert engine.tokens == long_alone.tokens and sum(engine.feeds) < len(engine.tokens)  # feeds: the short part
    torch.testing.assert_close(_probe(engine), _probe(long_alone), atol=0, rtol=0)
    for mine, theirs in zip(engine.memory.layers, long_alone.memory.layers, strict=True):
        assert mine.blocks.num_blocks == theirs.blocks.num_blocks and torch.equal(mine.reprs, theirs.reprs)
        assert torch.equal(mine.end_blocks, theirs.end_blocks)


def test_a_reply_that_crosses_the_limit_ends_short_and_the_next_prompt_switches(model):
    """Only a prompt (a feed of more than one token) switches: a reply's tokens are read one by one under the
    settings its prompt was read under, whatever the length."""
    engine = Engine(model, ByteTokenizer(), _switching(until=92))
    _turn(engine, _ids(90, seed=1))  # 90 + 5 reply tokens, 4 of them fed: past 92
    assert engine.short and len(engine.tokens) > 92
    assert engine.expect(1) and not engine.short  # the next prompt, of any length
    assert not engine.expect(1000)  # once long, always long


def test_a_snapshot_of_the_short_conversation_restores_after_the_switch(model):
    config = _switching()
    engine = Engine(model, ByteTokenizer(), config)
    _turn(engine, _ids(90, seed=1))
    snap = engine.snapshot()
    tokens = list(engine.tokens)
    _turn(engine, _ids(150, seed=4))
    assert not engine.short
    engine.restore(snap)
    assert engine.short and engine.tokens == tokens
    torch.testing.assert_close(_probe(engine), _probe(_replayed(model, config.short_config(), engine)), atol=0,
                               rtol=0)
    engine.reset()
    assert engine.short and not engine.tokens and not engine.feeds


def test_saved_states_hold_which_settings_the_memory_has(model):
    config = _switching()
    engine = Engine(model, ByteTokenizer(), config)
    _turn(engine, _ids(90, seed=1))
    short_state, short_probe = engine.state_dict(), _probe(engine)
    _turn(engine, _ids(150, seed=4))
    long_state, long_probe = engine.state_dict(), _probe(engine)
    assert short_state["short"] and sum(short_state["feeds"]) == len(short_state["tokens"])
    assert not long_state["short"] and long_state["feeds"] == short_state["feeds"]  # the short part's alone
    for state, short, probe in ((long_state, False, long_probe), (short_state, True, short_probe)):
        loaded = Engine(model, ByteTokenizer(), config)
        loaded.load_state_dict(state)
        assert loaded.short is short and loaded.feeds == state["feeds"]
        torch.testing.assert_close(_probe(loaded), probe, atol=0, rtol=0)
    # A long conversation's memory has the config's own settings: it loads without short_conversation too.
    without = Engine(model, ByteTokenizer(), config.long_config())
    without.load_state_dict(long_state)
    torch.testing.assert_close(_probe(without), long_probe, atol=0, rtol=0)
    with pytest.raises(ValueError, match="short_conversation settings, which this config does not have"):
        Engine(model, ByteTokenizer(), config.long_config()).load_state_dict(short_state)


def test_short_conversation_settings_are_checked():
    assert _switching().short_config().local_window == 64 and _switching().long_config().local_window == 32
    assert InfLLMConfig().short_config() is None and InfLLMConfig().long_config() == InfLLMConfig()
    cases = [
        (dict(short_conversation={"local_windw": 64}, short_conversation_until=9), "did you mean 'local_window'"),
        (dict(short_conversation={"method": "full"}, short_conversation_until=9), "may not set 'method'"),
        (dict(short_conversation=[64], short_conversation_until=9), "must be a mapping"),
        (dict(short_conversation={}, short_conversation_until=9), "must be a mapping"),
        (dict(short_conversation={"local_window": 64}), "needs short_conversation_until"),
        (dict(short_conversation_until=9), "no effect without short_conversation"),
        (dict(short_conversation={"local_window": 64}, short_conversation_until=0), "short_conversation_until"),
        # The short settings are validated as a config of their own.
        (dict(short_conversation={"local_window": 8}, short_conversation_until=9),
         "short_conversation: chunk_size=16 exceeds local_window=8"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            _config(**overrides)


def test_reading_again_reports_progress_and_an_interruption_leaves_the_engine_as_it_was(model):
    config = _switching()
    engine = Engine(model, ByteTokenizer(), config)
    _turn(engine, _ids(90, seed=1))
    tokens, feeds, memory = list(engine.tokens), list(engine.feeds), engine.memory
    before = _probe(engine)
    seen = []

    def stop(done, total):
        seen.append((done, total))
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(engine.generate(_ids(150, seed=4), GREEDY, reread=stop))
    assert seen == [(89, 94), (90, 94), (91, 94)]  # the prompt but its last token, its last token, a reply token
    assert engine.short and engine.memory is memory and engine.tokens == tokens and engine.feeds == feeds
    torch.testing.assert_close(_probe(engine), before, atol=0, rtol=0)
    seen.clear()
    list(engine.generate(_ids(150, seed=4), GREEDY, reread=lambda done, total: seen.append(done)))
    assert not engine.short and seen[-1] == len(tokens) and len(seen) == len(feeds)


def test_short_conversation_round_trips_through_yaml(tmp_path):
    from inf_llm.config.files import load_config

    config = _switching()
    config.to_yaml(tmp_path / "preset.yaml")
    loaded = load_config(tmp_path / "preset.yaml").config
    assert loaded == config and hash(loaded) == hash(config) and loaded.short_config() == config.short_config()
    (tmp_path / "typo.yaml").write_text("short_conversation:\n  local_windw: 64\nshort_conversation_until: 9\n")
    with pytest.raises(ValueError, match="typo.yaml: short_conversation: 'local_windw' is not a setting"):
        load_config(tmp_path / "typo.yaml")
