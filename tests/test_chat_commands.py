"""Every `!!` command through the chat loop (simple front end on in-memory streams, tiny random model)."""

import io
import os
import re
import signal

import pytest

from chat.app import ChatApp
from chat.chat_format import ChatFormat
from chat.commands import COMMANDS, CommandError, parse_command
from chat.conversation import Conversation
from chat.interrupts import StopGate
from chat.simple_ui import SimpleUI
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from inf_llm.sessions.lock import SessionBusyError, SessionLock, read_holder
from inf_llm.sessions.names import DATA_DIR_ENV, session_path
from inf_llm.sessions.state_file import read_session
from tests.test_chat_conversation import VOCAB, tiny_config
from tests.test_session_lock import holding
from tests.test_sessions import _files
from tests.tiny_models import tiny_model


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))


@pytest.fixture(scope="module")
def model_and_tokenizer(embedded_model):
    return tiny_model("llama", vocab_size=VOCAB), embedded_model[1]


class Chat:
    """A ChatApp fed `lines`; `.out` / `.err` are what it printed."""

    def __init__(self, model_and_tokenizer, lines, session=None, multiline=False):
        model, tokenizer = model_and_tokenizer
        engine = Engine(model, tokenizer, tiny_config(topk_blocks=2, device_cache_blocks=4))
        self.conv = Conversation(engine, ChatFormat.create(tokenizer), SamplingParams(temperature=0, max_new_tokens=5))
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.ui = SimpleUI(stdin=io.StringIO("".join(f"{line}\n" for line in lines)), stdout=self.stdout,
                           stderr=self.stderr, multiline=multiline)
        self.app = ChatApp(self.conv, self.ui)
        if session:
            assert self.app.open_session(session)

    def run(self):
        assert self.app.run() == 0
        return self

    @property
    def out(self):
        return self.stdout.getvalue()

    @property
    def err(self):
        return self.stderr.getvalue()

    def user_messages(self):
        return [m["content"] for m in self.conv.messages if m["role"] == "user"]


def test_parse_commands():
    assert parse_command("!!file 'my doc.txt' what is it?").args == ("my doc.txt", "what", "is", "it?")
    assert parse_command("  !!SAVE  name ").args == ("name",)
    for bad, match in [("!!nope", "unknown command"), ("!!exit now", "no arguments"), ("!!file", "usage"),
                       ("!!save a b", "usage"), ("!!file 'open", "cannot parse")]:
        with pytest.raises(CommandError, match=match):
            parse_command(bad)


def test_one_reply_per_line_and_empty_lines_do_not_end_the_chat(model_and_tokenizer):
    chat = Chat(model_and_tokenizer, ["hello", "", "   ", "second", "third"]).run()
    assert chat.out.count("ASSISTANT: ") == 3 and chat.out.count("\n") >= 3
    assert chat.user_messages() == ["hello", "second", "third"]
    assert "\x1b" not in chat.out + chat.err  # no ANSI codes in simple style


def test_multiline_messages_end_with_an_empty_line(model_and_tokenizer):
    chat = Chat(model_and_tokenizer, ["line one", "line two", "", "next"], multiline=True).run()
    assert chat.user_messages() == ["line one\nline two", "next"]


def test_exit_stops_reading(model_and_tokenizer):
    chat = Chat(model_and_tokenizer, ["hello", "!!exit", "never sent"]).run()
    assert chat.user_messages() == ["hello"]


def test_help_lists_every_command_and_its_cost(model_and_tokenizer):
    chat = Chat(model_and_tokenizer, ["!!help"]).run()
    for usage, cost in COMMANDS.values():
        assert usage in chat.out and cost[:30] in chat.out


def test_stats_shows_the_memory(model_and_tokenizer):
    chat = Chat(model_and_tokenizer, ["hello", "!!stats"]).run()
    tokens = len(chat.conv.engine.tokens)
    assert "tokens in memory" in chat.out and f"  {tokens:,}\n" in chat.out
    for row in ("blocks cached on the device", "blocks in host memory", "device cache hit rate", "prefill",
                "decode", "process memory", "tokens read since start-up"):
        assert row in chat.out


def test_bad_input_is_reported_and_nothing_is_lost(model_and_tokenizer, tmp_path):
    chat = Chat(model_and_tokenizer, ["hello", "!!bogus", f"!!file {tmp_path}/missing.txt", "!!regen x",
                                      "!!load nosuch", "!!save ../bad", "after"]).run()
    assert chat.user_messages() == ["hello", "after"]
    for text in ("unknown command !!bogus", "no such file", "takes no arguments", "no session named 'nosuch'",
                 "invalid session name"):
        assert text in chat.err
    assert chat.conv.engine.tokens == chat.conv.format.render(chat.conv.messages)


def test_reset_remove_regen(model_and_tokenizer):
    chat = Chat(model_and_tokenizer, ["!!remove", "!!regen", "one", "two", "!!regen", "!!remove", "three",
                                      "!!reset", "four"]).run()
    assert "nothing to remove" in chat.err and "no reply to regenerate" in chat.err
    assert chat.user_messages() == ["four"]
    assert chat.out.count("ASSISTANT: ") == 5  # one, two, two again, three, four
    assert chat.conv.engine.tokens == chat.conv.format.render(chat.conv.messages)


def test_file_as_message_or_as_context_for_a_question(model_and_tokenizer, tmp_path):
    doc = tmp_path / "my notes.txt"
    doc.write_text("The launch code is 4417.\nKeep it safe.\n", encoding="utf-8")
    chat = Chat(model_and_tokenizer, [f"!!file '{doc}'", f"!!file '{doc}' What is the launch code?"]).run()
    assert chat.user_messages() == [doc.read_text(),
                                    "The launch code is 4417.\nKeep it safe.\n\nWhat is the launch code?"]
    assert chat.out.count("ASSISTANT: ") == 2


def test_save_load_and_autosave(model_and_tokenizer):
    chat = Chat(model_and_tokenizer, ["hello", "!!save first", "more", "!!load", "!!reset", "!!load first"]).run()
    assert "saved sessions: first" in chat.err
    # Bound by !!save, saved again after "more"; !!reset unbinds without overwriting it.
    assert chat.user_messages() == ["hello", "more"] and chat.app.session == "first"
    assert chat.conv.engine.tokens == chat.conv.format.render(chat.conv.messages)
    assert "kept on disk" in chat.err
    chat = Chat(model_and_tokenizer, ["one", "!!save", "!!reset", "two"]).run()
    assert read_session(session_path("default")).messages[0]["content"] == "one"
    assert chat.app.session is None


def test_session_resumes_without_rereading(model_and_tokenizer):
    first = Chat(model_and_tokenizer, ["one", "two"], session="s").run()
    again = Chat(model_and_tokenizer, ["!!stats"], session="s").run()
    assert again.user_messages() == ["one", "two"]
    assert again.conv.engine.tokens == first.conv.engine.tokens
    assert again.conv.counters.fed_tokens == 0
    assert "tokens read since start-up" in again.out and "resumed session 's'" in again.err


def test_refused_session_is_not_opened(model_and_tokenizer):
    path = session_path("broken")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a session")
    chat = Chat(model_and_tokenizer, [])
    assert not chat.app.open_session("broken") and chat.app.session is None
    assert "damaged or not a session" in chat.err
    assert path.read_bytes() == b"not a session"


def held(name):
    """Whether some chat holds session `name`'s lock (a second lock on it is refused, even in this process)."""
    try:
        with SessionLock(session_path(name)):
            return False
    except SessionBusyError:
        return True


def test_a_session_another_process_holds_is_refused_and_nothing_changes(model_and_tokenizer):
    Chat(model_and_tokenizer, ["theirs"], session="theirs").run()
    theirs = session_path("theirs")
    chat = Chat(model_and_tokenizer, [], session="mine")
    assert chat.app.handle("hello")
    with holding(theirs) as holder:
        before = _files(theirs)
        state = ([dict(m) for m in chat.conv.messages], list(chat.conv.engine.tokens))
        for command in ("!!load theirs", "!!save theirs"):
            assert chat.app.handle(command)
            assert re.fullmatch(rf"error: session 'theirs' is open in another process \(pid {holder.pid}, since "
                                r"[\d: -]+\); it was left as it is; nothing changed", chat.err.splitlines()[-1])
            assert (chat.conv.messages, chat.conv.engine.tokens, chat.app.session) == (*state, "mine")
        assert chat.app.handle("after")  # still saved to the session it had
        assert _files(theirs) == before
        # At start-up (--session) too, and a refused chat stays unbound.
        other = Chat(model_and_tokenizer, [])
        assert not other.app.open_session("theirs") and other.app.session is None
        assert f"(pid {holder.pid}, since " in other.err and "or open this one with --read-only" in other.err
    assert [m["content"] for m in read_session(session_path("mine")).messages[::2]] == \
        ["hello", "after"]
    assert held("mine")
    chat.run()  # the end of input ends the chat
    assert not held("mine")


def test_the_lock_follows_the_bound_session(model_and_tokenizer):
    chat = Chat(model_and_tokenizer, [], session="a")
    assert (held("a"), held("b")) == (True, False)
    chat.app.handle("hello")
    chat.app.handle("!!save b")
    assert (held("a"), held("b")) == (False, True) and chat.app.session == "b"
    chat.app.handle("!!load a")
    assert (held("a"), held("b")) == (True, False) and chat.app.session == "a"
    chat.app.handle("!!reset")
    assert (held("a"), held("b")) == (False, False) and chat.app.session is None
    chat.app.handle("!!save")  # an unbound chat saves to "default" and binds it
    assert held("default")
    chat.app.handle("!!exit")
    assert held("default")  # !!exit only asks the loop to stop; the loop releases the session
    chat.ui.stdin = io.StringIO("!!exit\n")
    chat.run()
    assert not held("default")


def test_read_only_resumes_never_saves_and_forks(model_and_tokenizer):
    Chat(model_and_tokenizer, ["hello"], session="work").run()
    work = session_path("work")
    before = _files(work)
    chat = Chat(model_and_tokenizer, ["bye", "!!save", "!!save work", "!!stats", "!!save fork", "more"])
    assert not chat.app.open_session("nope", read_only=True)
    assert "no session named 'nope' to open read-only; saved sessions: work" in chat.err
    assert chat.app.open_session("work", read_only=True)
    assert "opened session 'work' read-only: 2 messages" in chat.err
    assert not held("work")  # it takes no lock: the session may be open in another chat
    chat.run()
    assert chat.user_messages() == ["hello", "bye", "more"]
    assert chat.err.count("session 'work' was opened read-only and is never saved to") == 2
    assert "- (opened from 'work' read-only: not saved; !!save NEW)" in chat.out  # !!stats
    assert _files(work) == before
    fork = read_session(session_path("fork")).messages
    assert [m["content"] for m in fork[::2]] == ["hello", "bye", "more"] and chat.app.session == "fork"
    assert not held("fork")


def test_the_session_of_a_killed_holder_opens(model_and_tokenizer):
    Chat(model_and_tokenizer, ["hello"], session="s").run()
    with holding(session_path("s")) as holder:
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait(timeout=60) == -signal.SIGKILL
    chat = Chat(model_and_tokenizer, ["again"], session="s")
    assert "resumed session 's': 2 messages" in chat.err
    assert read_holder(session_path("s")).pid == os.getpid()
    chat.run()
    assert [m["content"] for m in read_session(session_path("s")).messages[::2]] == \
        ["hello", "again"]


def test_ctrl_c_at_the_prompt_does_not_end_the_chat(model_and_tokenizer):
    chat = Chat(model_and_tokenizer, ["hello"])
    inputs = iter([KeyboardInterrupt, "hi", EOFError])

    def read():
        item = next(inputs)
        if isinstance(item, type):
            raise item()
        return item

    chat.ui.read_message = read
    chat.run()
    assert chat.user_messages() == ["hi"]


def test_stop_gate_first_press_asks_second_press_interrupts():
    # The handler before is Python's default, or SIG_IGN in a process started in the background by a shell.
    before = signal.getsignal(signal.SIGINT)
    with StopGate() as gate:
        os.kill(os.getpid(), signal.SIGINT)
        assert gate()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_sources_lists_the_passages_of_the_last_reply(model_and_tokenizer):
    long_message = "Tell me about the sea and the ships that sail on it. " * 12
    chat = Chat(model_and_tokenizer, ["!!sources", long_message, "what about boats?", "!!sources", "!!sources x",
                                      "after"]).run()
    assert "no reply of this run to trace" in chat.err and "takes no arguments" in chat.err
    table = chat.out[chat.out.index("where the last reply's attention went"):]
    assert "of each reply token's attention" in table and "tokens " in table
    assert chat.user_messages() == [long_message, "what about boats?", "after"]
    assert chat.conv.engine.tokens == chat.conv.format.render(chat.conv.messages)
