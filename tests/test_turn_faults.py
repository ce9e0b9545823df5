"""Every error inside a turn rolls it back: a model layer that fails, the float16 representative bound, a disk
tier that cannot read or write, a damaged block.

Faults are injected at a chosen call, armed at a chosen phase of the turn (reading the message, writing the reply,
closing the turn). Oracles: afterwards the next-token logits of a probe equal (atol=0) those of a twin
conversation that never had the failed turn, the transcript is unchanged, the session folder is byte-for-byte
and mtime-for-mtime as it was (or, where blocks leaving RAM go to it, it still opens at its last save), and the
next turn gives the twin's reply.
"""

import errno
import re
import shutil

import pytest
import torch

from chat.conversation import TurnFailed
from inf_llm.memory.layer_memory import LayerMemory
from inf_llm.sessions import store
from inf_llm.sessions.names import DATA_DIR_ENV, session_path
from inf_llm.sessions.state_file import STATE_FILE, read_session
from inf_llm.sessions.store import resume_session, save_session
from inf_llm.storage.disk_tier import DiskTier
# model and tokenizer: a tiny random Llama with the embedded tokenizer (the conversation tests' fixtures).
from tests.test_chat_conversation import MESSAGES, model, tiny_config  # noqa: F401
from tests.test_sessions import session_chat, _files, conversation, probe_logits

DOCUMENT = "A long document about the sea, its tides and its ships. " * 40  # several blocks per layer


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))


class Fault:
    """Within `with`, `owner.name` is wrapped so that, once armed, its `at`-th call raises (via
    `fail(original, *args)`). Records the blocks each layer held when it fired, to show that the memory had
    changed by then."""

    def __init__(self, owner, name, at, fail, engine=None):
        self.at, self.fail, self.engine = at, fail, engine
        self.patch = pytest.MonkeyPatch()
        self.armed, self.calls, self.fired, self.blocks_when_fired = False, 0, False, None
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if self.armed and not self.fired:
                self.calls += 1
                if self.calls == self.at:
                    self.fired = True
                    if self.engine is not None:
                        self.blocks_when_fired = [layer.blocks.num_blocks for layer in self.engine.memory.layers]
                    return self.fail(original, *args, **kwargs)
            return original(*args, **kwargs)

        self.patch.setattr(owner, name, wrapper)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.patch.undo()

    def arm(self, *_):
        self.armed = True


def _raise(error):
    def fail(original, *args, **kwargs):
        raise error
    return fail


def _infinite_bound(original, self, reprs):
    # As if a key were too large for float16: the real check (`_check_absmax`) then raises its ValueError.
    original(self, reprs)
    self._repr_absmax = torch.tensor(float("inf"), device=self._repr_absmax.device)


def _damaged(original, self, block_ids, records):
    flipped = records.clone()
    flipped[0, 0] ^= 0xFF
    original(self, block_ids, flipped)  # the real CRC check, on records with one byte changed


def _blocks(conv):
    return [layer.blocks.num_blocks for layer in conv.engine.memory.layers]


def saved_pair(model, tokenizer, path, config=None):
    """Two conversations resumed from one saved two-turn session: the one that will fail, from `path`, and its
    twin, from a copy (each writes into its session's folder: blocks leaving RAM, rollbacks)."""
    first = conversation(model, tokenizer, config)
    first.ask(MESSAGES[0])
    first.ask(MESSAGES[1])
    save_session(path, first.engine, first.messages, first.format.identity)
    copy = shutil.copytree(path, path.with_name(f"twin-{path.name}"))
    pair = []
    for folder in (path, copy):
        conv = conversation(model, tokenizer, config)
        conv.load(resume_session(folder, conv.engine, conv.format.identity).messages)
        pair.append(conv)
    return pair


def ask_armed(conv, fault, phase, text=DOCUMENT):
    """Ask `text` with `fault` armed at `phase`: "reading" (before the first chunk is fed), "writing" (after the
    second reply token), "closing" (after the last reply token, before the turn's end is fed)."""
    steps = []

    def on_step(step):
        steps.append(step)
        if (phase == "writing" and len(steps) == 2) or (phase == "closing" and step.finish_reason is not None):
            fault.arm()

    progress = fault.arm if phase == "reading" else None
    return conv.ask(text, progress=progress, on_step=on_step)


def assert_as_twin(conv, twin, messages, expected_logits):
    assert conv.messages == messages
    assert conv.engine.tokens == twin.engine.tokens == conv.format.render(messages)
    torch.testing.assert_close(probe_logits(conv), expected_logits, atol=0, rtol=0)
    torch.testing.assert_close(probe_logits(conv), probe_logits(twin), atol=0, rtol=0)
    # The next turn works, and is the twin's.
    a, b = conv.ask(MESSAGES[3]), twin.ask(MESSAGES[3])
    assert a.text == b.text and a.prompt_tokens == b.prompt_tokens
    torch.testing.assert_close(probe_logits(conv), probe_logits(twin), atol=0, rtol=0)


FAULTS = {
    # The second layer's forward fails: the first has stored the chunk already.
    "layer forward": lambda conv: Fault(LayerMemory, "forward", 2, _raise(RuntimeError("layer failed")),
                                            conv.engine),
    # The bound is checked after the layer stored its blocks; the second layer's check fails.
    "float16 bound": lambda conv: Fault(LayerMemory, "_note_absmax", 2, _infinite_bound, conv.engine),
    "disk read (EIO)": lambda conv: Fault(DiskTier, "read_many_into", 2,
                                              _raise(OSError(errno.EIO, "Input/output error")), conv.engine),
    "damaged block (CRC)": lambda conv: Fault(DiskTier, "_check_records", 2, _damaged, conv.engine),
}
EXPECTED_ERROR = {"layer forward": "RuntimeError: layer failed", "float16 bound": "ValueError: a representative "
                  "exceeds float16's range", "disk read (EIO)": "OSError: [Errno 5] Input/output error",
                  "damaged block (CRC)": "DiskTierError: block"}


# Closing a turn feeds a few tokens, for which retrieval reads no block from disk: disk faults cannot land there.
CASES = [(fault, phase) for fault in FAULTS for phase in ("reading", "writing", "closing")
         if phase != "closing" or fault in ("layer forward", "float16 bound")]


@pytest.mark.parametrize("fault, phase", CASES)
def test_a_failed_turn_leaves_conversation_memory_and_session_as_they_were(model, tokenizer, tmp_path, fault, phase):
    path = tmp_path / "s.session"
    conv, twin = saved_pair(model, tokenizer, path)
    messages, expected, blocks, folder = list(conv.messages), probe_logits(conv), _blocks(conv), _files(path)
    with FAULTS[fault](conv) as injected, pytest.raises(TurnFailed, match=re.escape(EXPECTED_ERROR[fault])) as failure:
        ask_armed(conv, injected, phase)
    assert injected.fired and not failure.value.memory_reset
    if phase == "reading" and fault in ("layer forward", "float16 bound"):
        # The first layer had stored blocks of the message, the second had not: a memory half-way through a chunk.
        assert injected.blocks_when_fired[0] > blocks[0]
    assert _blocks(conv) == blocks
    assert _files(path) == folder  # nothing written, not even the same bytes again
    assert_as_twin(conv, twin, messages, expected)


def test_a_failed_disk_write_rolls_back_and_the_session_opens_at_its_last_save(model, tokenizer, tmp_path):
    """Blocks beyond the RAM budget go to the session's folder (its disk tier); a write that fails there with a
    full disk rolls the turn back, and the session still opens at its last save."""
    config = tiny_config(topk_blocks=2, device_cache_blocks=4, host_cache_bytes=4096, disk_dir=str(tmp_path / "spill"))
    path = tmp_path / "budget.session"
    conv, twin = saved_pair(model, tokenizer, path, config)
    messages, expected, state = list(conv.messages), probe_logits(conv), (path / STATE_FILE).read_bytes()
    full = _raise(OSError(errno.ENOSPC, "No space left on device"))
    with Fault(DiskTier, "write", 3, full, conv.engine) as injected, pytest.raises(TurnFailed, match="No space left"):
        ask_armed(conv, injected, "reading")
    assert injected.fired
    assert (path / STATE_FILE).read_bytes() == state
    # Read-only: `conv` still writes into the folder (a second writer there would cut its block logs).
    reopened = conversation(model, tokenizer, config)
    reopened.load(resume_session(path, reopened.engine, reopened.format.identity, read_only=True).messages)
    torch.testing.assert_close(probe_logits(reopened), expected, atol=0, rtol=0)
    assert_as_twin(conv, twin, messages, expected)
    # The next save holds the new turn.
    save_session(path, conv.engine, conv.messages, conv.format.identity)
    again = conversation(model, tokenizer, config)
    again.load(resume_session(path, again.engine, again.format.identity, read_only=True).messages)
    torch.testing.assert_close(probe_logits(again), probe_logits(conv), atol=0, rtol=0)


@pytest.mark.parametrize("phase", ["writing", "closing"])
def test_a_failed_regen_keeps_the_previous_reply_and_its_memory_bit_for_bit(model, tokenizer, phase):
    conv = conversation(model, tokenizer)
    twin = conversation(model, tokenizer)
    for c in (conv, twin):
        c.ask(MESSAGES[0])
        c.ask(MESSAGES[1])
    messages, expected = list(conv.messages), probe_logits(conv)
    injected = Fault(LayerMemory, "forward", 2, _raise(RuntimeError("layer failed")), conv.engine)
    steps = []

    def on_step(step):
        steps.append(step)
        if (phase == "writing" and len(steps) == 2) or (phase == "closing" and step.finish_reason is not None):
            injected.arm()

    with injected, pytest.raises(TurnFailed, match="layer failed"):
        conv.regen(on_step=on_step)
    assert injected.fired
    # The old reply was fed again as its generation fed it: the same bits, not merely the same tokens.
    assert_as_twin(conv, twin, messages, expected)


def test_the_chat_reports_a_failed_turn_in_one_line_saves_nothing_and_goes_on(model, tokenizer, monkeypatch):
    conv = conversation(model, tokenizer)
    app, stdout, stderr = session_chat(conv, [MESSAGES[0], DOCUMENT, MESSAGES[2]])
    injected = Fault(LayerMemory, "forward", 2, _raise(RuntimeError("layer failed")), conv.engine)
    saves = []
    original_save = store.save_session

    def counting_save(path, engine, messages, chat):
        saves.append([m["content"] for m in messages])
        if len(saves) == 1:
            injected.arm()  # the next turn, the document, fails
        return original_save(path, engine, messages, chat)

    monkeypatch.setattr(store, "save_session", counting_save)
    with injected:
        assert app.run() == 0
    assert injected.fired
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error:")]
    assert errors == ["error: the turn failed (RuntimeError: layer failed): your message was dropped, and the "
                      "conversation and its memory are as they were before it"]
    assert stdout.getvalue().count("ASSISTANT:") == 2  # the first and the third message were answered
    users = [m["content"] for m in conv.messages if m["role"] == "user"]
    assert users == [MESSAGES[0], MESSAGES[2]]
    assert [s[::2] for s in saves] == [[MESSAGES[0]], users]  # saved after each turn that was answered, only
    assert read_session(session_path("s")).messages == conv.messages
