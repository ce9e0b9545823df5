"""The generation API: incremental feeding, rollback, resume, sampling, stop conditions (tiny random models)."""

import io

import pytest
import torch

from inf_llm.config import InfLLMConfig
from inf_llm.engine import Engine
from inf_llm.sampling import SamplingParams, apply_repetition_penalty, filter_logits
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


def test_generation_stops_on_eos_stop_string_and_length():
    model = tiny_model("llama")
    engine = Engine(model, ByteTokenizer(), _config())
    # Steer the model: force the output layer to emit "a", "b", "c", EOS in turn.
    lm_head = model.lm_head
    try:
        sequence = [ord("a"), ord("b"), ord("c"), 0]
        calls = {"n": 0}

        def steer(module, inputs, output):
            target = sequence[min(calls["n"], len(sequence) - 1)]
            calls["n"] += 1
            forced = torch.full_like(output, -1e4)
            forced[..., target] = 1e4
            return forced

        handle = lm_head.register_forward_hook(steer)
        steps = list(engine.generate(_ids(10), SamplingParams(temperature=0, max_new_tokens=10)))
        assert [s.token_id for s in steps] == sequence and steps[-1].finish_reason == "eos"
        assert "".join(s.text for s in steps) == "abc"
        calls["n"] = 0
        steps = list(engine.generate(_ids(3), SamplingParams(temperature=0, stop_strings=("bc",))))
        assert steps[-1].finish_reason == "stop" and "".join(s.text for s in steps) == "a"
        calls["n"] = 0
        steps = list(engine.generate(_ids(3), SamplingParams(temperature=0, max_new_tokens=2)))
        assert steps[-1].finish_reason == "length" and len(steps) == 2
    finally:
        handle.remove()
    # The last sampled token is not fed: the memory holds prompts and all but the final token of each reply.
    assert len(engine.tokens) == (10 + 3) + (3 + 2) + (3 + 1)


@pytest.mark.parametrize("method", ["inf-llm", "stream-llm", "full"])
def test_snapshot_restore_and_resume_from_state_dict(method):
    model = tiny_model("mistral")
    ids = _ids(150)
    engine = Engine(model, ByteTokenizer(), _config(method=method))
    engine.feed(ids[:100])
    snap = engine.snapshot()
    state = engine.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    continued = engine.feed(ids[100:])
    engine.restore(snap)
    assert engine.tokens == ids[:100]
    torch.testing.assert_close(engine.feed(ids[100:]), continued, atol=0, rtol=0)
    # A new engine (as after a restart) resumes from the saved state with the same next-token logits.
    resumed = Engine(model, ByteTokenizer(), _config(method=method))
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.tokens == ids[:100]
    torch.testing.assert_close(resumed.feed(ids[100:]), continued, atol=0, rtol=0)


def test_sampling_filters():
    logits = torch.tensor([3.0, 1.0, 2.0, -1.0])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [False, True, False, True]
    # top-p keeps the smallest prefix reaching p: softmax([3,2,1,-1]) ~ [.66,.24,.09,.01]
    assert torch.isinf(filter_logits(logits, 0, 0.8)).tolist() == [False, True, False, True]
    assert torch.isinf(filter_logits(logits, 0, 0.5)).tolist() == [False, True, True, True]
    penalised = apply_repetition_penalty(logits, torch.tensor([0, 3]), 2.0)
    assert penalised.tolist() == [1.5, 1.0, 2.0, -2.0]
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_seeded_sampling_is_reproducible():
    model = tiny_model("llama")
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=7)
    a = [s.token_id for s in Engine(model, ByteTokenizer(), _config()).generate(_ids(20), params)]
    b = [s.token_id for s in Engine(model, ByteTokenizer(), _config()).generate(_ids(20), params)]
    assert a == b


def test_feeding_a_prompt_releases_freed_heap_memory_and_decoding_does_not(monkeypatch):
    import inf_llm.engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module, "release_free_memory", lambda: calls.append(1) or True)
    engine = Engine(tiny_model("llama"), ByteTokenizer(), _config(), prefill_chunk=48)
    engine.feed(_ids(100))
    assert len(calls) == 1  # once per prompt, after all its model calls
    engine.feed([5])
    assert len(calls) == 1  # never per decoded token
