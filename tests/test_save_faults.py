"""Faults during a save: a full disk (ENOSPC) or an I/O error (EIO) at every write, fsync, replace and ftruncate
a save makes, and SIGKILL of the saving process at chosen points.

Oracles: afterwards the session opens at its previous save if the save had not committed (it raised, or was
killed before `state.pt` was replaced) and at the new one otherwise, with the next-token logits of a process that
never failed (atol=0); a failed save retried in the same process commits the new one; a session whose save was
killed is resumed, saved again and opens at the new save. `python -m tests.save_fault_run` runs every point of
larger saves and prints a table.
"""

import errno
import os
import shutil
import signal
import time

import pytest
import torch

from inf_llm.sessions import store
from inf_llm.sessions.names import DATA_DIR_ENV, SessionError, session_path
from inf_llm.sessions.state_file import read_session
from inf_llm.sessions.store import resume_session, save_session
# model and tokenizer: a tiny random Llama with the embedded tokenizer (the conversation tests' fixtures).
from tests.test_chat_conversation import MESSAGES, model  # noqa: F401
from tests.test_sessions import session_chat, conversation, probe_logits

SYSCALLS = ("write", "pwrite", "fsync", "replace", "ftruncate")  # what a save writes with (os.*)


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))


class Syscalls:
    """Within `with`, the calls to os.write, os.pwrite, os.fsync, os.replace and os.ftruncate are recorded in
    order (`calls`); the `at`-th runs `action(name)` first (which raises, or kills the process)."""

    def __init__(self, at=None, action=None):
        self.at, self.action, self.calls = at, action, []
        self._patch = pytest.MonkeyPatch()

    def __enter__(self):
        for name in SYSCALLS:
            self._patch.setattr(os, name, self._wrap(name, getattr(os, name)))
        return self

    def _wrap(self, name, original):
        def call(*args):
            self.calls.append(name)
            if len(self.calls) == self.at:
                self.action(name)
            return original(*args)
        return call

    def __exit__(self, *exc):
        self._patch.undo()


def fail_with(code):
    def action(name):
        raise OSError(code, f"{os.strerror(code)} (injected at os.{name})")
    return action


def kill_self(name):
    os.kill(os.getpid(), signal.SIGKILL)


# --- the saves under test: each returns a chat with unsaved work and the folder it saves to -----------------------


def base_session(model, tokenizer, folder):
    """A two-turn session saved in `folder`; returns the logits of its probe."""
    conv = conversation(model, tokenizer)
    conv.ask(MESSAGES[0])
    conv.ask(MESSAGES[1])
    save_session(folder, conv.engine, conv.messages, conv.format.identity)
    return probe_logits(conv)


def incremental(model, tokenizer, base, folder):
    """The chat bound to the session (a copy of `base`) after one more turn: the save adds the new blocks."""
    shutil.copytree(base, folder)
    conv = conversation(model, tokenizer)
    conv.load(resume_session(folder, conv.engine, conv.format.identity).messages)
    conv.ask(MESSAGES[3])
    return conv


def after_rollback(model, tokenizer, base, folder):
    """The chat bound to the session after !!remove (which re-reads from the start after a resume) and a turn: the
    save records the rollback in the block logs and rewrites the representatives."""
    conv = incremental(model, tokenizer, base, folder)
    conv.remove()
    conv.remove()
    conv.ask(MESSAGES[2])
    return conv


def new_generation(model, tokenizer, base, folder):
    """Another chat saved over the session (`!!save NAME` from a chat not bound to it): a whole new generation."""
    shutil.copytree(base, folder)
    conv = conversation(model, tokenizer)
    for text in (MESSAGES[0], MESSAGES[2], MESSAGES[3]):
        conv.ask(text)
    return conv


def first_save(model, tokenizer, base, folder):
    """A chat saved where no session is yet: its previous save is none (the folder must not be left behind)."""
    conv = conversation(model, tokenizer)
    conv.ask(MESSAGES[0])
    conv.ask(MESSAGES[3])
    return conv


KINDS = {"incremental": incremental, "after a rollback": after_rollback, "new generation": new_generation,
         "first save": first_save}


def save(conv, folder):
    save_session(folder, conv.engine, conv.messages, conv.format.identity)


def opened_logits(model, tokenizer, folder):
    """The probe's logits of the session in `folder` (read-only: nothing written), or the SessionError."""
    conv = conversation(model, tokenizer)
    try:
        conv.load(resume_session(folder, conv.engine, conv.format.identity, read_only=True).messages)
    except SessionError as error:
        return error
    return probe_logits(conv)


def commit_point(calls):
    """The call that commits a save: the replacement of state.pt, its last os.replace."""
    return max(i for i, name in enumerate(calls, 1) if name == "replace")


def boundaries(calls):
    """The first and the last call of each run of equal calls (a save's steps; 124 writes of state.pt are one)."""
    ends = [i for i in range(1, len(calls) + 1) if i == 1 or i == len(calls) or calls[i - 1] != calls[i - 2]
            or calls[i - 1] != calls[i]]
    return sorted(set(ends))


def firsts(calls):
    """The first call of each kind, the last write of state.pt (inside torch.save), the commit and the call after it."""
    commit = commit_point(calls)
    assert calls[commit - 3 : commit] == ["write", "fsync", "replace"]
    return sorted({calls.index(name) + 1 for name in set(calls)} | {commit - 2, commit, commit + 1})


def same(a, b):
    return isinstance(a, torch.Tensor) and torch.equal(a, b)


# --- the tests ----------------------------------------------------------------------------------------------------


def assert_opens(model, tokenizer, folder, want):
    """`want`: the logits it must open with, or None: it must not exist (a first save that did not commit)."""
    if want is None:
        assert not folder.exists()
        return
    got = opened_logits(model, tokenizer, folder)
    assert isinstance(got, torch.Tensor), got
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def run_failing_save(model, tokenizer, kind, base, previous, folder, at, code):
    """One case: the `at`-th call of the save fails with `code`; returns whether the save raised."""
    conv = KINDS[kind](model, tokenizer, base, folder)
    new = probe_logits(conv)
    with Syscalls(at, fail_with(code)) as calls:
        try:
            save(conv, folder)
            raised = False
        except OSError as error:
            assert os.strerror(code) in str(error)
            raised = True
    assert len(calls.calls) >= at
    assert_opens(model, tokenizer, folder, previous if raised else new)
    torch.testing.assert_close(probe_logits(conv), new, atol=0, rtol=0)  # the chat's memory is untouched
    save(conv, folder)  # the retry commits everything
    assert_opens(model, tokenizer, folder, new)
    return raised


def dry_run(model, tokenizer, kind, base, folder):
    """The calls a save of this kind makes, in order."""
    conv = KINDS[kind](model, tokenizer, base, folder)
    with Syscalls() as dry:
        save(conv, folder)
    return dry.calls


@pytest.mark.parametrize("kind", ["incremental", "new generation"])
def test_a_save_that_fails_at_each_kind_of_call_leaves_the_previous_save(model, tokenizer, tmp_path, kind):
    """The first write, pwrite, fsync, replace (and ftruncate) of a save, its commit and the call after it; the
    slow test below and `python -m tests.save_fault_run` try every call."""
    _fail_saves_at(model, tokenizer, tmp_path, kind, firsts)


def _fail_saves_at(model, tokenizer, tmp_path, kind, points) -> None:
    """Fail a save of `kind` at each call `points(calls)` names (ENOSPC and EIO in turn): a save that raised opens
    at the previous save, one that failed after its commit at the new one."""
    base = tmp_path / "base.session"
    previous = base_session(model, tokenizer, base)
    calls = dry_run(model, tokenizer, kind, base, tmp_path / "dry.session")
    commit = commit_point(calls)
    assert {"write", "pwrite", "fsync", "replace"} <= set(calls)
    for at in points(calls):
        code = (errno.ENOSPC, errno.EIO)[at % 2]
        raised = run_failing_save(model, tokenizer, kind, base, previous, tmp_path / f"{at}.session", at, code)
        assert raised == (at <= commit), (at, calls[at - 1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["incremental", "new generation"])
def test_a_save_that_fails_at_any_call_leaves_the_previous_save(model, tokenizer, tmp_path, kind):
    _fail_saves_at(model, tokenizer, tmp_path, kind, lambda calls: range(1, len(calls) + 1))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["after a rollback", "first save"])
def test_the_other_saves_fail_cleanly_at_each_step(model, tokenizer, tmp_path, kind):
    base = tmp_path / "base.session"
    previous = base_session(model, tokenizer, base) if kind != "first save" else None
    calls = dry_run(model, tokenizer, kind, base, tmp_path / "dry.session")
    commit = commit_point(calls)
    for at in boundaries(calls):
        code = (errno.ENOSPC, errno.EIO)[at % 2]
        raised = run_failing_save(model, tokenizer, kind, base, previous, tmp_path / f"{at}.session", at, code)
        assert raised == (at <= commit), (at, calls[at - 1])


def killed_save(conv, folder, at=None, delay=None):
    """Save `conv` into `folder` in a forked child that SIGKILLs itself at its `at`-th call (or is killed by this
    process after `delay` seconds); returns how the child ended ("killed" or "finished")."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller
        try:
            if at is not None:
                with Syscalls(at, kill_self):
                    save(conv, folder)
            else:
                save(conv, folder)
        finally:
            os._exit(0)
    if delay is not None:
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    return "killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else "finished"


def run_killed_save(model, tokenizer, kind, base, previous, folder, at=None, delay=None, commit=None):
    """One case: the save is killed; the session opens at its previous save or its new one, and a new process
    resumes it, redoes the work and saves it. Returns "previous", "new" or the SessionError it was refused with."""
    conv = KINDS[kind](model, tokenizer, base, folder)
    new = probe_logits(conv)
    ended = killed_save(conv, folder, at=at, delay=delay)
    got = opened_logits(model, tokenizer, folder)
    if isinstance(got, SessionError):
        # Only a first save killed before it committed: a folder without state.pt, refused as incomplete.
        assert previous is None and "not a complete session" in str(got), got
        outcome = got
    else:
        outcome = "new" if same(got, new) else "previous" if same(got, previous) else "lost"
    if at is not None:
        assert ended == "killed"
        if at > commit:
            assert outcome == "new"
        else:  # the previous save, or for a first save none: its folder is refused as incomplete
            assert outcome == "previous" or (previous is None and isinstance(outcome, SessionError)), outcome
    assert outcome != "lost"
    return outcome


@pytest.mark.parametrize("kind", ["incremental", pytest.param("new generation", marks=pytest.mark.slow)])
def test_a_save_killed_at_any_point_leaves_the_previous_or_the_new_save(model, tokenizer, tmp_path, kind):
    """Killed at a seeded random call, at the commit and just after it (the table of
    `python -m tests.save_fault_run` kills at every step)."""
    base = tmp_path / "base.session"
    previous = base_session(model, tokenizer, base)
    calls = dry_run(model, tokenizer, kind, base, tmp_path / "dry.session")
    commit = commit_point(calls)
    seeded = torch.randint(1, len(calls) + 1, (1,), generator=torch.Generator().manual_seed(7)).item()
    for at in sorted({seeded, commit, commit + 1}):
        folder = tmp_path / f"{at}.session"
        run_killed_save(model, tokenizer, kind, base, previous, folder, at=at, commit=commit)
        # The next process resumes what the crash left, chats and saves there: the session opens at that save.
        conv = conversation(model, tokenizer)
        conv.load(resume_session(folder, conv.engine, conv.format.identity).messages)
        conv.ask(MESSAGES[2])
        save(conv, folder)
        assert_opens(model, tokenizer, folder, probe_logits(conv))


def test_a_resumed_session_is_not_overwritten_before_its_next_save_commits(model, tokenizer, tmp_path):
    """A resumed chat that rolls back to its start (!!remove re-reads from there) and writes new blocks into the
    session's block logs (blocks leaving RAM, a save that fails before its commit) must leave the last save
    readable: the slots it names are never reused until a new save commits."""
    base = tmp_path / "base.session"
    previous = base_session(model, tokenizer, base)
    conv = after_rollback(model, tokenizer, base, tmp_path / "s.session")
    for layer in conv.engine.memory.layers:
        layer.blocks.flush()  # as if its blocks had left RAM under a budget: into the session's block logs
    assert_opens(model, tokenizer, tmp_path / "s.session", previous)


def test_the_chat_reports_a_failed_save_stays_bound_and_the_next_save_retries(model, tokenizer, monkeypatch):
    conv = conversation(model, tokenizer)
    app, stdout, stderr = session_chat(conv, [MESSAGES[0], MESSAGES[2], MESSAGES[3]])
    attempts = []
    original = store.save_session

    def full_disk_on_the_second_save(*args):
        attempts.append(len(conv.messages))
        if len(attempts) == 2:
            with Syscalls(3, fail_with(errno.ENOSPC)):
                return original(*args)
        return original(*args)

    monkeypatch.setattr(store, "save_session", full_disk_on_the_second_save)
    assert app.run() == 0
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: could not save session 's' (")
    assert "No space left on device" in errors[0] and errors[0].endswith(
        "the session on disk is its previous save, and the next save tries again")
    assert attempts == [2, 4, 6] and app.session == "s"
    assert stdout.getvalue().count("ASSISTANT:") == 3
    assert read_session(session_path("s")).messages == conv.messages
    torch.testing.assert_close(opened_logits(model, tokenizer, session_path("s")), probe_logits(conv),
                               atol=0, rtol=0)
