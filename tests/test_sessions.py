"""Sessions: a resumed conversation continues exactly (same next-token logits, same greedy reply); damaged or
mismatched files are refused with a message naming the reason and left byte-for-byte untouched; writes are atomic.
"""

import os

import pytest
import torch

from chat.chat_format import ChatFormat
from chat.conversation import Conversation
from inf_llm import sessions
from inf_llm.engine import Engine
from inf_llm.sampling import SamplingParams
# model and tokenizer are the conversation tests' fixtures (a tiny random Llama with the embedded tokenizer).
from tests.test_chat_conversation import MESSAGES, VOCAB, model, tokenizer, tiny_config  # noqa: F401
from tests.tiny_models import tiny_model


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(sessions.DATA_DIR_ENV, str(tmp_path / "data"))
    return tmp_path / "data"


def conversation(model, tokenizer, config=None, template=None):
    engine = Engine(model, tokenizer, config or tiny_config(topk_blocks=2, device_cache_blocks=4))
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    return Conversation(engine, ChatFormat.create(tokenizer, template), params)


@pytest.fixture(scope="module")
def saved(model, tokenizer, tmp_path_factory):
    """A two-turn conversation saved to a file, and that conversation (kept running)."""
    conv = conversation(model, tokenizer)
    conv.ask(MESSAGES[0])
    conv.ask(MESSAGES[1])
    path = tmp_path_factory.mktemp("saved") / "two-turns.session"
    sessions.save_session(path, conv.engine, conv.messages, conv.format.identity)
    return path, conv


def probe_logits(conv):
    ids = conv.format.render(conv.messages + [{"role": "user", "content": MESSAGES[2]}], add_generation_prompt=True)
    snap = conv.engine.snapshot()
    logits = conv.engine.feed(ids[len(conv.engine.tokens):])
    conv.engine.restore(snap)
    return logits


def test_resumed_session_gives_the_same_logits_and_reply(model, tokenizer, saved):
    path, original = saved
    assert original.engine.stats().blocks > 4  # blocks in the host store and the device cache are part of it
    resumed = conversation(model, tokenizer)
    fed = resumed.counters.fed_tokens
    session = sessions.resume_session(path, resumed.engine, resumed.format.identity)
    resumed.load(session.messages)
    assert resumed.counters.fed_tokens == fed  # nothing was re-read
    assert resumed.messages == original.messages
    assert resumed.engine.tokens == original.engine.tokens == resumed.format.render(resumed.messages)
    torch.testing.assert_close(probe_logits(resumed), probe_logits(original), atol=0, rtol=0)
    a = resumed.ask(MESSAGES[2])
    b = original.ask(MESSAGES[2])
    assert a.text == b.text and a.prompt_tokens == b.prompt_tokens
    original.remove()  # leave the module fixture as it was


def test_session_names_and_folder(data_dir):
    assert sessions.sessions_dir() == data_dir / "sessions"
    assert sessions.session_path("my-chat_1.v2") == data_dir / "sessions" / "my-chat_1.v2.session"
    for bad in ("", "../escape", "a/b", ".hidden", "x" * 101, "name.session"):
        with pytest.raises(sessions.SessionError, match="invalid session name"):
            sessions.session_path(bad)
    assert sessions.list_sessions() == []


def test_save_by_name_lists_it(model, tokenizer, saved):
    _, conv = saved
    sessions.save_session(sessions.session_path("alpha"), conv.engine, conv.messages, conv.format.identity)
    assert sessions.list_sessions() == ["alpha"]
    assert sessions.read_session(sessions.session_path("alpha")).messages == conv.messages


def _refused(path, engine, chat, match):
    before = path.read_bytes()
    tokens = list(engine.tokens)
    with pytest.raises(sessions.SessionError, match=match):
        sessions.resume_session(path, engine, chat)
    assert path.read_bytes() == before  # left untouched
    assert engine.tokens == tokens  # and the engine too


DAMAGES = {
    "truncated": lambda b: b[: len(b) // 2],
    "flipped byte": lambda b: b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 0xFF]) + b[len(b) // 2 + 1:],
    "empty": lambda b: b"",
    "garbage": lambda b: os.urandom(4096),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_file_is_refused_and_left_untouched(model, tokenizer, saved, tmp_path, damage):
    path = tmp_path / "damaged.session"
    path.write_bytes(DAMAGES[damage](saved[0].read_bytes()))
    conv = conversation(model, tokenizer)
    conv.ask(MESSAGES[3])
    _refused(path, conv.engine, conv.format.identity, "damaged|not an InfLLM session")


def test_checksum_catches_a_changed_tensor(model, tokenizer, saved, tmp_path):
    payload = torch.load(saved[0], weights_only=True)
    payload["engine"]["memory"]["layers"][0]["blocks_k"][0, 0, 0, 0] += 1.0
    path = tmp_path / "edited.session"
    torch.save(payload, path)
    _refused(path, conversation(model, tokenizer).engine, saved[1].format.identity, "checksum")


def test_other_files_are_refused(model, tokenizer, tmp_path):
    engine = conversation(model, tokenizer).engine
    path = tmp_path / "other.session"
    torch.save({"weights": torch.zeros(3)}, path)
    _refused(path, engine, {}, "not an InfLLM session")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    torch.save({"format": sessions.FORMAT_NAME, "evil": Evil()}, path)
    _refused(path, engine, {}, "damaged or not a session")  # weights_only refuses to unpickle objects
    with pytest.raises(sessions.SessionError, match="no session file"):
        sessions.read_session(tmp_path / "missing.session")


def test_session_of_another_config_model_or_format_is_refused(model, tokenizer, saved):
    path, conv = saved
    chat = conv.format.identity
    other_config = conversation(model, tokenizer, tiny_config(local_window=64, topk_blocks=2, device_cache_blocks=4))
    _refused(path, other_config.engine, chat, r"config\.local_window: session has 32, now 64")
    other_model = conversation(tiny_model("llama", seed=1, vocab_size=VOCAB), tokenizer)
    _refused(path, other_model.engine, chat, r"model\.weights")
    _refused(path, conversation(model, tokenizer).engine, {**chat, "template": "vicuna_v1.1"}, r"chat\.template")
    # A speed-only setting may differ.
    other_backend = conversation(model, tokenizer, tiny_config(topk_blocks=2, device_cache_blocks=4,
                                                               kernel_backend="auto"))
    sessions.resume_session(path, other_backend.engine, chat)


def test_interrupted_save_leaves_the_previous_file(model, tokenizer, saved, tmp_path, monkeypatch):
    path, conv = saved
    target = tmp_path / "keep.session"
    target.write_bytes(path.read_bytes())
    before = target.read_bytes()

    def failing_save(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(sessions.torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        sessions.save_session(target, conv.engine, conv.messages, conv.format.identity)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.session"]  # no temporary file left
