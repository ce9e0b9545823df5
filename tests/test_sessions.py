"""Sessions: a resumed conversation continues exactly (same next-token logits, same greedy reply); damaged or
mismatched files are refused with a message naming the reason and left byte-for-byte untouched; writes are atomic.
"""

import io
import os
import shutil
from pathlib import Path

import pytest
import torch

from chat.chat_format import ChatFormat
from chat.conversation import Conversation
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from inf_llm.sessions.digest import content_sha256
from inf_llm.sessions.identity import _comparable, _differences, identity_of
from inf_llm.sessions.names import DATA_DIR_ENV, SessionError, list_sessions, session_path, sessions_dir
from inf_llm.sessions.state_file import FORMAT_NAME, STATE_FILE, read_session
from inf_llm.sessions.store import release, resume_session, save_session
from inf_llm.storage.disk_tier import DATA_FILE, DiskTierError
# model and tokenizer are the conversation tests' fixtures (a tiny random Llama with the embedded tokenizer).
from tests.test_chat_conversation import MESSAGES, VOCAB, model, tiny_config  # noqa: F401
from tests.tiny_models import tiny_model


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    return tmp_path / "data"



def session_chat(conv, lines: list[str], name: str = "s"):
    """A simple-style ChatApp over `conv`, bound to session `name`, that will read `lines`: (app, stdout, stderr)."""
    from chat.app import ChatApp
    from chat.simple_ui import SimpleUI

    stdout, stderr = io.StringIO(), io.StringIO()
    app = ChatApp(conv, SimpleUI(stdin=io.StringIO("".join(f"{line}\n" for line in lines)), stdout=stdout, stderr=stderr))
    assert app.open_session(name)
    return app, stdout, stderr


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
    save_session(path, conv.engine, conv.messages, conv.format.identity)
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
    session = resume_session(path, resumed.engine, resumed.format.identity)
    resumed.load(session.messages)
    assert resumed.counters.fed_tokens == fed  # nothing was re-read
    assert resumed.messages == original.messages
    assert resumed.engine.tokens == original.engine.tokens == resumed.format.render(resumed.messages)
    torch.testing.assert_close(probe_logits(resumed), probe_logits(original), atol=0, rtol=0)
    a = resumed.ask(MESSAGES[2])
    b = original.ask(MESSAGES[2])
    assert a.text == b.text and a.prompt_tokens == b.prompt_tokens
    original.remove()  # leave the module fixture as it was


def test_a_session_saved_under_prompt_end_blocks_resumes_with_its_votes_and_replies_the_same(model, tokenizer,
                                                                                             tmp_path):
    """The blocks the last prompt's end voted for and the chunk its next votes are measured against are part of the
    saved state: the resumed chat attends them and answers the next message as the one that kept running."""
    config = tiny_config(topk_blocks=2, device_cache_blocks=8, rerank_blocks=4, prompt_end_blocks=2)
    conv = conversation(model, tokenizer, config)
    conv.ask(MESSAGES[0])
    conv.ask(MESSAGES[1])
    path = tmp_path / "votes.session"
    save_session(path, conv.engine, conv.messages, conv.format.identity)
    resumed = conversation(model, tokenizer, config)
    resumed.load(resume_session(path, resumed.engine, resumed.format.identity).messages)
    for mine, theirs in zip(resumed.engine.memory.layers, conv.engine.memory.layers, strict=True):
        assert theirs.end_blocks is not None and torch.equal(mine.end_blocks, theirs.end_blocks)
        assert theirs.end_baseline.shape[1] > 0 and torch.equal(mine.end_baseline, theirs.end_baseline)
    torch.testing.assert_close(probe_logits(resumed), probe_logits(conv), atol=0, rtol=0)
    assert resumed.ask(MESSAGES[2]).text == conv.ask(MESSAGES[2]).text


def test_a_chat_under_reply_pool_blocks_saves_and_resumes_exactly(model, tokenizer, tmp_path, monkeypatch):
    """reply_pool_blocks: a chat ends each turn with its template's tokens after the reply (a multi-token feed,
    which ends the reply's pool), so a session saved between turns holds no pool; the resumed chat forms its
    pools as the one that kept running does and answers the same. (A pool saved mid-reply in an engine's state
    is replayed exactly: tests/test_memory_invariants.py.)"""
    config = tiny_config(topk_blocks=2, device_cache_blocks=8, rerank_blocks=4, reply_pool_blocks=4,
                         reply_pool_every=3)
    from inf_llm.memory.layer_memory import LayerMemory

    formed, form = [], LayerMemory._form_pool

    def counted(layer, *args, **kwargs):
        form(layer, *args, **kwargs)
        formed.append(layer._pool is not None)

    monkeypatch.setattr(LayerMemory, "_form_pool", counted)
    conv = conversation(model, tokenizer, config)
    conv.ask(MESSAGES[0])
    conv.ask(MESSAGES[1])
    assert sum(formed) >= 2 * len(conv.engine.memory.layers)  # the replies' steps ranked pools
    assert all(layer._pool is None for layer in conv.engine.memory.layers)
    path = tmp_path / "pool.session"
    save_session(path, conv.engine, conv.messages, conv.format.identity)
    resumed = conversation(model, tokenizer, config)
    resumed.load(resume_session(path, resumed.engine, resumed.format.identity).messages)
    torch.testing.assert_close(probe_logits(resumed), probe_logits(conv), atol=0, rtol=0)
    assert resumed.ask(MESSAGES[2]).text == conv.ask(MESSAGES[2]).text


def test_session_names_and_folder(data_dir):
    assert sessions_dir() == data_dir / "sessions"
    assert session_path("my-chat_1.v2") == data_dir / "sessions" / "my-chat_1.v2.session"
    for bad in ("", "../escape", "a/b", ".hidden", "x" * 101, "name.session"):
        with pytest.raises(SessionError, match="invalid session name"):
            session_path(bad)
    assert list_sessions() == []


def test_save_by_name_lists_it(model, tokenizer, saved):
    _, conv = saved
    save_session(session_path("alpha"), conv.engine, conv.messages, conv.format.identity)
    assert list_sessions() == ["alpha"]
    assert read_session(session_path("alpha")).messages == conv.messages


def _tree(path):
    """Every file under `path` (or the file itself) with its bytes: to show that a refusal changed nothing."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _files(path):
    """Every file and folder under `path` with its bytes (None for a folder) and modification time: to show that
    nothing was written, not even the same bytes again."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


def _refused(path, engine, chat, match):
    before = _tree(path)
    tokens = list(engine.tokens)
    with pytest.raises(SessionError, match=match):
        resume_session(path, engine, chat)
    assert _tree(path) == before  # left untouched
    assert engine.tokens == tokens or engine.tokens == []  # refused before loading, or the engine was reset


def _copy(saved_path, tmp_path, name="copy.session"):
    target = tmp_path / name
    shutil.copytree(saved_path, target)
    return target


def _flip_in_largest_record(data: bytes) -> bytes:
    """Flip the middle byte of the largest record stored in the state file (torch.save's zip: a tensor's bytes).
    The file's exact middle may fall in the zip's alignment padding, which holds no content: a flip there changes
    nothing the session reads, so it says nothing about damage detection."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    header = data[info.header_offset : info.header_offset + 30]
    name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


DAMAGES = {
    "truncated": lambda b: b[: len(b) // 2],
    "flipped byte": _flip_in_largest_record,
    "empty": lambda b: b"",
    "garbage": lambda b: os.urandom(4096),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_state_is_refused_and_left_untouched(model, tokenizer, saved, tmp_path, damage):
    path = _copy(saved[0], tmp_path)
    state = path / STATE_FILE
    state.write_bytes(DAMAGES[damage](state.read_bytes()))
    conv = conversation(model, tokenizer)
    conv.ask(MESSAGES[3])
    _refused(path, conv.engine, conv.format.identity, "damaged|not an InfLLM session")


def test_checksum_catches_a_changed_tensor(model, tokenizer, saved, tmp_path):
    path = _copy(saved[0], tmp_path)
    payload = torch.load(path / STATE_FILE, weights_only=True)
    payload["engine"]["memory"]["layers"][0]["win_k"][0, 0, 0] += 1.0
    torch.save(payload, path / STATE_FILE)
    _refused(path, conversation(model, tokenizer).engine, saved[1].format.identity, "checksum")


def _generation(path):
    (gen,) = [p for p in path.iterdir() if p.is_dir()]
    return gen


def _flip(file, offset):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x20
    file.write_bytes(bytes(data))


def test_damaged_blocks_are_refused_when_read(model, tokenizer, saved, tmp_path):
    """Representatives are read (and checked) on resume; a block is checked when retrieval reads it."""
    path = _copy(saved[0], tmp_path)
    _flip(_generation(path) / "layer-000-reprs" / DATA_FILE, 3)
    conv = conversation(model, tokenizer)
    _refused(path, conv.engine, conv.format.identity, "damaged")

    path = _copy(saved[0], tmp_path, "blocks.session")
    conv = conversation(model, tokenizer)
    record_bytes = conv.engine.memory.layers[1].blocks.layout.record_bytes
    data = _generation(path) / "layer-001" / DATA_FILE
    for offset in range(3, data.stat().st_size, record_bytes):
        _flip(data, offset)  # every record: whichever blocks retrieval picks are damaged
    conv.load(resume_session(path, conv.engine, conv.format.identity).messages)
    with pytest.raises(DiskTierError, match=r"block \d+ .*layer-001.* is damaged"):
        probe_logits(conv)


def test_other_files_are_refused(model, tokenizer, tmp_path):
    engine = conversation(model, tokenizer).engine
    path = tmp_path / "other.session"
    torch.save({"weights": torch.zeros(3)}, path)
    _refused(path, engine, {}, "not an InfLLM session")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    torch.save({"format": FORMAT_NAME, "evil": Evil()}, path)
    _refused(path, engine, {}, "damaged or not a session")  # weights_only refuses to unpickle objects
    with pytest.raises(SessionError, match="no session file"):
        read_session(tmp_path / "missing.session")
    (tmp_path / "unfinished.session").mkdir()
    _refused(tmp_path / "unfinished.session", engine, {}, "not a complete session")


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
    resume_session(path, other_backend.engine, chat)
    # So may the second stage's settings: they choose among the stored blocks (a chat saved under the one-stage
    # preset resumes under the two-stage one), and the resumed memory answers as the second stage chooses.
    two_stage = tiny_config(topk_blocks=2, device_cache_blocks=6, rerank_blocks=4, rerank_chunks=False,
                            rerank_keep_blocks=1, rerank_reads_disk=False, decode_rank_every=3, shared_blocks=1,
                            shared_candidates=1, prompt_end_blocks=1, reply_pool_blocks=4, reply_pool_every=2)
    resumed = conversation(model, tokenizer, two_stage)
    resumed.load(resume_session(path, resumed.engine, chat).messages)
    assert resumed.engine.config.rerank_blocks == 4
    _refused(path, conversation(model, tokenizer, tiny_config(topk_blocks=3, device_cache_blocks=4)).engine, chat,
             r"config\.topk_blocks: session has 2, now 3")  # the first stage's top-k is still the session's


def test_a_session_keeps_whether_its_conversation_was_short(model, tokenizer, tmp_path):
    """short_conversation: a session saved while its conversation was short resumes short (and switches as the
    one that kept running does); one saved once it was long resumes long, under the same config or under one
    without short settings (sessions saved before they existed hold the config's own memory)."""
    config = tiny_config(topk_blocks=2, device_cache_blocks=8, rerank_blocks=4, prompt_end_blocks=2,
                         short_conversation={"local_window": 64, "num_sink_tokens": 8}, short_conversation_until=120)
    conv = conversation(model, tokenizer, config)
    chat = conv.format.identity
    conv.ask(MESSAGES[0])
    assert conv.engine.short
    short_path = save_session(tmp_path / "short.session", conv.engine, conv.messages, chat)
    resumed = conversation(model, tokenizer, config)
    resumed.load(resume_session(short_path, resumed.engine, chat).messages)
    assert resumed.engine.short and resumed.engine.feeds == conv.engine.feeds
    torch.testing.assert_close(probe_logits(resumed), probe_logits(conv), atol=0, rtol=0)
    assert resumed.ask(MESSAGES[1]).text == conv.ask(MESSAGES[1]).text  # past 120 tokens: both read again
    assert not conv.engine.short and not resumed.engine.short
    long_path = save_session(tmp_path / "long.session", conv.engine, conv.messages, chat)
    for settings in (config, config.long_config()):
        again = conversation(model, tokenizer, settings)
        again.load(resume_session(long_path, again.engine, chat).messages)
        assert not again.engine.short
        torch.testing.assert_close(probe_logits(again), probe_logits(conv), atol=0, rtol=0)
    other = config.replace(short_conversation={"local_window": 48, "num_sink_tokens": 8})
    _refused(short_path, conversation(model, tokenizer, other).engine, chat, r"config\.short_conversation")
    resume_session(long_path, conversation(model, tokenizer, other).engine, chat)  # long: its short settings differ


def _tier_entries(engine):
    return [(layer.blocks.disk.entries, layer.blocks.num_blocks) for layer in engine.memory.layers]


def test_saving_again_writes_only_new_blocks_and_resumes_exactly(model, tokenizer, tmp_path):
    conv = conversation(model, tokenizer)
    conv.ask(MESSAGES[0])
    path = tmp_path / "grow.session"
    save_session(path, conv.engine, conv.messages, conv.format.identity)
    gen = _generation(path)
    first = _tier_entries(conv.engine)
    assert all(entries == blocks > 0 for entries, blocks in first)  # one PUT per block, into the session's tiers
    binding = conv.engine.memory.saved
    tiers = binding.kv + binding.reprs
    assert len(tiers) == len(list(gen.rglob(DATA_FILE)))
    # The records written by the first save: slots 0..n-1 of each tier.
    data_before = {t.path / DATA_FILE: (t.path / DATA_FILE).read_bytes()[: len(t) * t.record_bytes] for t in tiers}
    conv.ask(MESSAGES[1])
    save_session(path, conv.engine, conv.messages, conv.format.identity)
    assert _generation(path) == gen  # the same generation, extended
    second = _tier_entries(conv.engine)
    assert all(e2 - e1 == b2 - b1 > 0 for (e1, b1), (e2, b2) in zip(first, second))  # only the new blocks
    for file, before in data_before.items():
        assert file.read_bytes()[: len(before)] == before  # earlier records unchanged
    resumed = conversation(model, tokenizer)
    session = resume_session(path, resumed.engine, resumed.format.identity)
    resumed.load(session.messages)
    assert all(layer.blocks.disk_reads == 0 for layer in resumed.engine.memory.layers)  # nothing read yet
    torch.testing.assert_close(probe_logits(resumed), probe_logits(conv), atol=0, rtol=0)


def test_what_happens_after_a_save_is_not_part_of_the_session(model, tokenizer, tmp_path):
    """A rollback and an unsaved turn write to the session's tiers (blocks leaving RAM go there); resuming still
    gives the state of the save."""
    conv = conversation(model, tokenizer)
    conv.ask(MESSAGES[0])
    conv.ask(MESSAGES[1])
    path = tmp_path / "crash.session"
    save_session(path, conv.engine, conv.messages, conv.format.identity)
    expected = probe_logits(conv)
    conv.remove()  # roll back the last exchange: forgets blocks
    conv.ask(MESSAGES[3])  # new blocks with the forgotten ids
    for layer in conv.engine.memory.layers:
        layer.blocks.flush()  # as if they had left RAM under a budget: written into the session's tiers
    # The process dies here, without saving.
    resumed = conversation(model, tokenizer)
    session = resume_session(path, resumed.engine, resumed.format.identity)
    resumed.load(session.messages)
    torch.testing.assert_close(probe_logits(resumed), expected, atol=0, rtol=0)
    # And the resumed chat saves and resumes again from there.
    resumed.ask(MESSAGES[2])
    save_session(path, resumed.engine, resumed.messages, resumed.format.identity)
    again = conversation(model, tokenizer)
    again.load(resume_session(path, again.engine, again.format.identity).messages)
    torch.testing.assert_close(probe_logits(again), probe_logits(resumed), atol=0, rtol=0)


def test_blocks_beyond_the_ram_budget_are_saved_and_resumed(model, tokenizer, tmp_path):
    config = tiny_config(topk_blocks=2, device_cache_blocks=4, host_cache_bytes=4096, disk_dir=str(tmp_path / "spill"))
    conv = conversation(model, tokenizer, config)
    conv.ask(MESSAGES[0])
    conv.ask(MESSAGES[1])
    assert sum(layer.blocks.disk_blocks() for layer in conv.engine.memory.layers) > 0  # some spilled to disk
    path = tmp_path / "budget.session"
    save_session(path, conv.engine, conv.messages, conv.format.identity)
    resumed = conversation(model, tokenizer, config)
    resumed.load(resume_session(path, resumed.engine, resumed.format.identity).messages)
    torch.testing.assert_close(probe_logits(resumed), probe_logits(conv), atol=0, rtol=0)


def test_interrupted_save_leaves_the_previous_session(model, tokenizer, saved, tmp_path, monkeypatch):
    _, conv = saved
    expected = probe_logits(conv)
    other = tmp_path / "other.session"  # saved first, then no longer the engine's folder
    used = tmp_path / "used.session"  # the engine's folder: saving into it is incremental
    save_session(other, conv.engine, conv.messages, conv.format.identity)
    save_session(used, conv.engine, conv.messages, conv.format.identity)
    before = _tree(other)
    conv.ask(MESSAGES[3])

    def failing_save(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    for target in (other, used):
        with monkeypatch.context() as patch:
            patch.setattr(torch, "save", failing_save)
            with pytest.raises(KeyboardInterrupt):
                save_session(target, conv.engine, conv.messages, conv.format.identity)
        assert not [p.name for p in target.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert _tree(other) == before  # a new generation was written there, then removed
    conv.remove()
    for target in (other, used):
        resumed = conversation(model, tokenizer)
        resumed.load(resume_session(target, resumed.engine, resumed.format.identity).messages)
        torch.testing.assert_close(probe_logits(resumed), expected, atol=0, rtol=0)


def test_a_version_1_file_resumes_and_is_converted_when_saved(model, tokenizer, saved, tmp_path):
    _, conv = saved
    path = tmp_path / "old.session"
    payload = {"format": FORMAT_NAME, "version": 1, "saved_at": 0.0,
               "identity": identity_of(conv.engine, conv.format.identity), "messages": conv.messages,
               "engine": conv.engine.state_dict()}
    payload["sha256"] = content_sha256(payload)
    torch.save(payload, path)
    resumed = conversation(model, tokenizer)
    resumed.load(resume_session(path, resumed.engine, resumed.format.identity).messages)
    torch.testing.assert_close(probe_logits(resumed), probe_logits(conv), atol=0, rtol=0)
    save_session(path, resumed.engine, resumed.messages, resumed.format.identity)
    assert path.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["old.session"]
    resumed.ask(MESSAGES[2])
    save_session(path, resumed.engine, resumed.messages, resumed.format.identity)  # incremental, renamed
    again = conversation(model, tokenizer)
    again.load(resume_session(path, again.engine, again.format.identity).messages)
    torch.testing.assert_close(probe_logits(again), probe_logits(resumed), atol=0, rtol=0)


def test_resume_benchmark_resumes_exactly_and_a_turn_writes_little(tmp_path):
    """The benchmark's own check (same next-token logits) at a small size, on SmolLM2's shape with random weights."""
    import json

    from chat.resume_benchmark import main

    out = tmp_path / "resume.json"
    assert main(["--tokens", "1500", "--turn-tokens", "160", "--random-weights", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["same_logits"]
    # A 160-token turn writes its blocks, summaries and the state (whose remainder may shrink): a fraction of the
    # first save.
    assert 0 < results["turn_save_mb"] < results["save_mb"] / 3


def _save_then_resume(model, tokenizer, path, saved_config, config):
    """A conversation of one turn saved under `saved_config` at `path`, and one resumed from it under `config`."""
    conv = conversation(model, tokenizer, saved_config)
    conv.ask(MESSAGES[0])
    save_session(path, conv.engine, conv.messages, conv.format.identity)
    resumed = conversation(model, tokenizer, config)
    resumed.load(resume_session(path, resumed.engine, resumed.format.identity).messages)
    return conv, resumed


def test_float16_representatives_are_saved_as_they_are(model, tokenizer, tmp_path):
    config = tiny_config(topk_blocks=2, device_cache_blocks=4, repr_dtype="float16")
    conv, resumed = _save_then_resume(model, tokenizer, tmp_path / "half.session", config, config)
    for a, b in zip(resumed.engine.memory.layers, conv.engine.memory.layers):
        assert a.reprs.dtype == torch.float16 and torch.equal(a.reprs, b.reprs)
    # The resumed summaries are read into a buffer with room for as many blocks again: the blocks formed next
    # are written in place (no copy of every summary), and the memory goes on as the one never saved.
    layers = resumed.engine.memory.layers
    buffers = [(layer._reprs.data_ptr(), layer._reprs.shape[0]) for layer in layers]
    assert all(rows == 2 * layer.blocks.num_blocks > 0 for (_, rows), layer in zip(buffers, layers))
    start = layers[0].blocks.num_blocks
    for token in tokenizer.encode(MESSAGES[2] * 4):
        resumed.engine.feed([token])
        conv.engine.feed([token])
        if layers[0].blocks.num_blocks == buffers[0][1]:
            break
    assert layers[0].blocks.num_blocks > start
    for a, b, buffer in zip(layers, conv.engine.memory.layers, buffers):
        assert (a._reprs.data_ptr(), a._reprs.shape[0]) == buffer and torch.equal(a.reprs, b.reprs)
    torch.testing.assert_close(probe_logits(resumed), probe_logits(conv), atol=0, rtol=0)


@pytest.mark.parametrize("repr_dtype", ["float16", "float32"])
def test_key_bound_sessions_resume_exactly(model, tokenizer, tmp_path, repr_dtype):
    """Blocks ranked by key bounds save their (max, min) rows, 2 x KV heads wide, and resume to the same logits."""
    config = tiny_config(topk_blocks=2, device_cache_blocks=4, repr_dtype=repr_dtype, block_ranking="bounds")
    conv, resumed = _save_then_resume(model, tokenizer, tmp_path / "bounds.session", config, config)
    for a, b in zip(resumed.engine.memory.layers, conv.engine.memory.layers):
        assert a.reprs.shape[1] == 2 * a.shape.num_kv_heads and torch.equal(a.reprs, b.reprs)
    torch.testing.assert_close(probe_logits(resumed), probe_logits(conv), atol=0, rtol=0)
    other = conversation(model, tokenizer, tiny_config(topk_blocks=2, device_cache_blocks=4, repr_dtype=repr_dtype,
                                                       block_ranking="representatives"))
    _refused(tmp_path / "bounds.session", other.engine, other.format.identity,
             r"config\.block_ranking: session has 'bounds', now 'representatives'")


@pytest.mark.parametrize("saved_with_codes", [True, False])
def test_ranking_codes_are_saved_and_resumed_or_computed(model, tokenizer, tmp_path, saved_with_codes):
    """A session saved with ranking codes keeps them (float16 values) with their basis: the resumed memory has the
    same codes, bit for bit, and gives the same logits. One saved without them resumes under the setting with the
    codes its summaries give (basis from the first ranking_code_blocks, as a memory built under it computes)."""
    from inf_llm.memory.ranking import code_basis, summary_codes

    small = dict(topk_blocks=2, device_cache_blocks=4, local_window=16, block_size=4)  # blocks enough for codes
    codes = tiny_config(**small, ranking_code_rank=2, ranking_code_blocks=3)
    plain = tiny_config(**small)
    path = tmp_path / "codes.session"
    conv, resumed = _save_then_resume(model, tokenizer, path, codes if saved_with_codes else plain, codes)
    layers = read_session(path).engine_state["memory"]["layers"]
    for saved, a, b in zip(layers, resumed.engine.memory.layers, conv.engine.memory.layers):
        assert a.blocks.num_blocks > 3 and a.codes is not None and a.codes.shape == (a.blocks.num_blocks, 2)
        if saved_with_codes:
            assert saved["codes"].dtype == torch.float16 and torch.equal(saved["codes"].float(), b.codes)
            assert torch.equal(a.codes, b.codes) and torch.equal(a._code_basis, b._code_basis)
        else:
            assert "codes" not in saved and b.codes is None
            basis = code_basis(a.reprs[:3], 2)
            assert torch.equal(a._code_basis, basis) and torch.equal(a.codes, summary_codes(a.reprs, basis))
    if saved_with_codes:
        torch.testing.assert_close(probe_logits(resumed), probe_logits(conv), atol=0, rtol=0)


def test_sessions_saved_before_a_setting_existed_count_it_at_its_old_behaviour():
    old = {"config": {"method": "inf-llm", "topk_blocks": 8}}
    now = {"config": {"method": "inf-llm", "topk_blocks": 8, "block_ranking": "representatives", "rank_rotated": False}}
    assert _differences(_comparable(old), _comparable(now)) == []
    bounds = {"config": {**now["config"], "block_ranking": "bounds"}}
    assert _differences(_comparable(old), _comparable(bounds)) == [
        "config.block_ranking: session has 'representatives', now 'bounds'"]


def test_a_session_resumes_under_another_representative_dtype_and_is_rewritten_in_it(model, tokenizer, tmp_path):
    """Sessions saved before the default became float16 keep working: representatives are cast on resume."""
    path = tmp_path / "old.session"
    config = tiny_config(topk_blocks=2, device_cache_blocks=4, repr_dtype="float16")
    conv, resumed = _save_then_resume(model, tokenizer, path, config.replace(repr_dtype="float32"), config)
    for a, b in zip(resumed.engine.memory.layers, conv.engine.memory.layers):
        assert a.reprs.dtype == torch.float16 and torch.equal(a.reprs, b.reprs.half())
    expected = probe_logits(resumed)
    old_generation = _generation(path)
    # The next save cannot append float16 rows to float32 files: it writes a new generation, in float16.
    save_session(path, resumed.engine, resumed.messages, resumed.format.identity)
    assert _generation(path) != old_generation and not old_generation.exists()
    again = conversation(model, tokenizer, config)
    again.load(resume_session(path, again.engine, again.format.identity).messages)
    for a, b in zip(again.engine.memory.layers, resumed.engine.memory.layers):
        assert torch.equal(a.reprs, b.reprs)
    torch.testing.assert_close(probe_logits(again), expected, atol=0, rtol=0)


def test_a_reset_conversation_writes_nothing_into_the_session_it_left(model, tokenizer, tmp_path):
    config = tiny_config(topk_blocks=2, device_cache_blocks=4, host_cache_bytes=4096)
    conv = conversation(model, tokenizer, config)
    conv.ask(MESSAGES[0])
    path = tmp_path / "left.session"
    save_session(path, conv.engine, conv.messages, conv.format.identity)
    before = _tree(path)
    release(conv.engine)
    conv.reset()
    conv.ask(MESSAGES[1])  # blocks beyond the budget go to a spill folder, not into the session
    assert sum(layer.blocks.disk_blocks() for layer in conv.engine.memory.layers) > 0
    assert _tree(path) == before


def test_a_read_only_resume_writes_nothing_into_the_session(model, tokenizer, tmp_path):
    # Another process holds the session and may save to it: whatever this chat does (blocks leaving RAM, a
    # rollback past the resumed blocks, new turns) must stay out of its folder.
    writer = conversation(model, tokenizer, tiny_config(topk_blocks=2, device_cache_blocks=4, host_cache_bytes=4096))
    writer.ask(MESSAGES[0])
    writer.ask(MESSAGES[1])
    path = tmp_path / "held.session"
    save_session(path, writer.engine, writer.messages, writer.format.identity)
    expected = probe_logits(writer)  # (the writer's probe rolls back in its own block logs: before the snapshot)
    before = _files(path)
    spill = tmp_path / "reader-spill"
    config = tiny_config(topk_blocks=2, device_cache_blocks=4, host_cache_bytes=4096, disk_dir=str(spill))
    reader = conversation(model, tokenizer, config)
    fed = reader.counters.fed_tokens
    reader.load(resume_session(path, reader.engine, reader.format.identity, read_only=True).messages)
    assert reader.counters.fed_tokens == fed  # nothing re-read by the model
    torch.testing.assert_close(probe_logits(reader), expected, atol=0, rtol=0)
    reader.ask(MESSAGES[2])
    stores = [layer.blocks for layer in reader.engine.memory.layers]
    assert sum(store.disk_writes for store in stores) > 0  # blocks left RAM...
    assert all(Path(store.disk_path).is_relative_to(spill) for store in stores)  # ...into the private copy
    assert reader.remove() and reader.remove()  # back before the resumed turn: the block logs roll back
    reader.ask(MESSAGES[3])
    assert _files(path) == before

    # Saving it elsewhere (the chat's !!save NEW) writes every block there and removes the private copy.
    fork = tmp_path / "fork.session"
    assert len(list(spill.iterdir())) == 1
    save_session(fork, reader.engine, reader.messages, reader.format.identity)
    assert list(spill.iterdir()) == []
    again = conversation(model, tokenizer, config)
    again.load(resume_session(fork, again.engine, again.format.identity).messages)
    torch.testing.assert_close(probe_logits(again), probe_logits(reader), atol=0, rtol=0)
    assert _files(path) == before


@pytest.mark.parametrize("method", ["full", "stream-llm"])
def test_baseline_sessions_resume_exactly(model, tokenizer, tmp_path, method):
    config = tiny_config(method=method, topk_blocks=0 if method != "full" else 2, device_cache_blocks=4)
    conv = conversation(model, tokenizer, config)
    conv.ask(MESSAGES[0])
    path = tmp_path / f"{method}.session"
    save_session(path, conv.engine, conv.messages, conv.format.identity)
    conv.ask(MESSAGES[1])
    save_session(path, conv.engine, conv.messages, conv.format.identity)
    resumed = conversation(model, tokenizer, config)
    resumed.load(resume_session(path, resumed.engine, resumed.format.identity).messages)
    torch.testing.assert_close(probe_logits(resumed), probe_logits(conv), atol=0, rtol=0)


@pytest.mark.parametrize("items", [[], [5, -2, 0, 10**20], [True, 1, 2], [1, 2.5], [[1, 2], 3]])
def test_the_state_digest_of_a_list_is_its_canonical_encoding(items):
    """Oracle: the encoding written out item by item ("L<n>" then each item's own encoding). Lists of plain ints
    (token ids) are encoded at once; a bool (an int subclass, encoded as a bool) or any other item takes the loop.
    Sessions saved before the fast path must keep their checksums."""
    import hashlib
    import struct

    def encoding(value) -> bytes:
        if isinstance(value, list):
            return f"L{len(value)}".encode() + b"".join(encoding(v) for v in value)
        if isinstance(value, float):
            return b"F" + struct.pack("<d", value)
        return f"{type(value).__name__}:{value!r}".encode()

    payload = {"tokens": items}
    expected = hashlib.sha256(b"D1" + encoding("tokens") + encoding(items)).hexdigest()
    assert content_sha256(payload) == expected
