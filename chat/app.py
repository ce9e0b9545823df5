"""The chat loop: read a message or a `!!` command, run it on the conversation, show the result, save the session.

Front-end neutral: `simple_ui.SimpleUI` (plain text, pipes) and `rich_ui.RichUI` (prompt-toolkit + rich) both
implement the small `UI` protocol below. Nothing typed is ever lost to a mistake: an unknown command, a missing
file or a refused session prints a message and the chat goes on. Nothing is lost to a failure either: a turn that
fails (a model error, a disk error, a damaged block) is rolled back whole and not saved, and a save that fails
(a full disk, an I/O error) leaves the session at its previous save; either prints one line and the chat goes
on, still bound, so the next save writes everything the failed one did not.

One writer per session: the chat holds the lock of the session it saves to (`inf_llm.sessions.lock`) from the
moment it binds it until it binds another, `!!reset`s or ends, so a second chat on the same session is refused
instead of overwriting its turns. A session opened read-only is resumed without the lock and never saved to.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from inf_llm.generation.engine import GenerationStep
from inf_llm.sessions import store
from inf_llm.sessions.identity import check_identity
from inf_llm.sessions.lock import SessionBusyError, SessionLock
from inf_llm.sessions.names import SessionError, list_sessions, session_path, sessions_dir
from inf_llm.sessions.state_file import read_session

from chat.commands import Command, CommandError, help_rows, is_command, parse_command
from chat.conversation import Conversation, Reply, StopRequested, TurnCancelled, TurnFailed
from chat.interrupts import StopGate
from chat.stats import stats_rows

logger = logging.getLogger(__name__)


class Turn(Protocol):
    """What a front end shows during one turn: the reading of the prompt, then the streamed reply."""

    def progress(self, done: int, total: int) -> None: ...
    def step(self, step: GenerationStep) -> None: ...
    def close(self, reply: Reply | None) -> None: ...


class UI(Protocol):
    def read_message(self) -> str: ...  # raises EOFError at the end of input, KeyboardInterrupt on Ctrl-C
    def turn(self) -> Turn: ...
    def info(self, text: str) -> None: ...
    def error(self, text: str) -> None: ...
    def table(self, title: str, rows: list[tuple[str, str]]) -> None: ...


class ChatApp:
    def __init__(self, conversation: Conversation, ui: UI):
        self.conversation, self.ui = conversation, ui
        self.session: str | None = None  # bound session name: saved after every change, its lock held
        self.read_only: str | None = None  # the session this conversation was opened from read-only: never saved to
        self._lock: SessionLock | None = None  # the lock of `session`

    # --- sessions -------------------------------------------------------------------------------------------

    @property
    def chat_identity(self) -> dict:
        return self.conversation.format.identity

    def open_session(self, name: str, *, read_only: bool = False, lock: SessionLock | None = None) -> bool:
        """Resume `name` if it exists (else start it); False, with a message, if it is refused or another process
        holds it. read_only: resume it without its lock and never save to it. lock: its lock, already taken."""
        try:
            path = session_path(name)
            if read_only:
                if not path.exists():
                    raise SessionError(f"no session named {name!r} to open read-only; saved sessions: "
                                       + (", ".join(list_sessions()) or "none"))
                self._resume(path, read_only=True)
                self._unbind()  # saved to nowhere: not the session it was opened from, nor one bound before
                self.read_only = name
                self.ui.info(f"opened session {name!r} read-only: {len(self.conversation.messages)} messages, "
                             f"{len(self.conversation.engine.tokens):,} tokens in memory (nothing re-read); it is "
                             "never saved to (!!save NEW saves this conversation as session NEW)")
                return True
            lock = lock or self._lock_for(name)
        except SessionBusyError as error:
            self.ui.error(f"{error}. Close the other chat first, or open this one with --read-only")
            return False
        except SessionError as error:
            self.ui.error(str(error))
            return False
        try:
            if path.exists():
                self._resume(path)
                self.ui.info(f"resumed session {name!r}: {len(self.conversation.messages)} messages, "
                             f"{len(self.conversation.engine.tokens):,} tokens in memory (nothing re-read)")
            else:
                self.ui.info(f"new session {name!r} (saved after every turn to {path})")
        except SessionError as error:
            self._release_unless_bound(lock)
            self.ui.error(str(error))
            return False
        self._bind(name, lock)
        return True

    def close(self) -> None:
        """Release the session's lock: this chat saves nothing more (the session stays as last saved)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _lock_for(self, name: str) -> SessionLock:
        """The lock of session `name`, taken (SessionBusyError if another process holds it)."""
        if name == self.session and self._lock is not None:
            return self._lock
        lock = SessionLock(session_path(name))
        lock.acquire()
        return lock

    def _release_unless_bound(self, lock: SessionLock) -> None:
        if lock is not self._lock:
            lock.release()

    def _bind(self, name: str, lock: SessionLock) -> None:
        """Save to session `name` from now on; the lock of the session bound before is released."""
        if self._lock is not None and self._lock is not lock:
            self._lock.release()
        self.session, self._lock = name, lock

    def _unbind(self) -> None:
        """Save nowhere from now on: the conversation is no longer the bound session's."""
        self.close()
        self.session = self.read_only = None

    def _resume(self, path: Path, *, read_only: bool = False) -> None:
        # Check everything before touching the conversation: a refused file leaves the chat as it was.
        engine = self.conversation.engine
        try:
            saved = read_session(path)
            check_identity(saved, engine, self.chat_identity)
        except KeyboardInterrupt:
            raise SessionError(f"interrupted while reading {path}; nothing changed") from None
        self.conversation.reset()
        try:
            store.load_into(saved, engine, read_only=read_only)
        except KeyboardInterrupt:
            self.conversation.reset()
            self._unbind()
            raise SessionError(f"interrupted while loading {path}: the conversation is now empty") from None
        except Exception as error:
            self.conversation.reset()
            self._unbind()
            raise SessionError(f"{path}: its memory does not fit this engine ({error}); the file was left "
                               "as it is and the conversation is now empty") from error
        self.conversation.load(saved.messages)
        self.read_only = None  # the conversation is this session's now

    def save(self, name: str | None = None) -> bool:
        name = name or self.session
        if name is None:
            return True
        try:
            store.save_session(session_path(name), self.conversation.engine, self.conversation.messages,
                               self.chat_identity)
        except Exception as error:  # a full disk, an I/O error, a bug: the chat must go on either way
            logger.debug("saving session %r failed", name, exc_info=error)
            lines = str(error).strip().splitlines()
            self.ui.error(f"could not save session {name!r} ({type(error).__name__}: {lines[0] if lines else ''}); "
                          "the session on disk is its previous save, and the next save tries again")
            return False
        except KeyboardInterrupt:
            # save_session removed its temporary file: the session on disk is the previous save, whole.
            self.ui.error(f"saving session {name!r} was interrupted; the file on disk is the previous save")
            return False
        return True

    # --- the loop -------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Read and run inputs until Ctrl-D or !!exit; then release the session (`close`)."""
        try:
            while True:
                try:
                    line = self.ui.read_message()
                except EOFError:
                    return 0
                except KeyboardInterrupt:
                    continue  # Ctrl-C at the prompt clears the line, as in a shell
                if not self.handle(line):
                    return 0
        finally:
            self.close()

    def handle(self, line: str) -> bool:
        """Run one input; False when the chat should end."""
        if not line.strip():
            return True  # an empty line does not end the chat
        if not is_command(line):
            self._turn(lambda **kw: self.conversation.ask(line, **kw), "your message was dropped")
            return True
        try:
            command = parse_command(line)
        except CommandError as error:
            self.ui.error(str(error))
            return True
        return getattr(self, f"_cmd_{command.name}")(command)

    def _turn(self, run, dropped: str) -> Reply | None:
        """Run one turn; `dropped` says what a failed turn gives up ("your message was dropped")."""
        turn = self.ui.turn()
        reply = None
        with StopGate() as gate:

            def progress(done: int, total: int) -> None:
                turn.progress(done, total)
                if gate.requested:
                    raise StopRequested()

            try:
                reply = run(progress=progress, on_step=turn.step, should_stop=gate)
            except TurnCancelled:
                turn.close(None)
                self.ui.info("interrupted while reading: the message was dropped and the memory rolled back")
                return None
            except TurnFailed as error:
                # Nothing to save: the conversation is what it was at the end of the previous turn.
                turn.close(None)
                self.ui.error(f"the turn failed ({error}): {dropped}, " + (
                    "and the memory was emptied (the next turn re-reads the conversation)" if error.memory_reset else
                    "and the conversation and its memory are as they were before it"))
                return None
            except KeyboardInterrupt:
                # Landed outside the guarded feed/generation (rare): drop the unanswered message, roll back.
                turn.close(None)
                self.conversation.recover()
                self.ui.info("interrupted: the unanswered message was dropped")
                return None
            except BaseException:
                turn.close(None)
                raise
        turn.close(reply)
        self.save()
        return reply

    # --- commands -------------------------------------------------------------------------------------------

    def _cmd_exit(self, command: Command) -> bool:
        return False

    def _cmd_help(self, command: Command) -> bool:
        self.ui.table("commands", help_rows())
        return True

    def _cmd_stats(self, command: Command) -> bool:
        session = self.session or (f"- (opened from {self.read_only!r} read-only: not saved; !!save NEW)"
                                   if self.read_only else None)
        self.ui.table("memory statistics", stats_rows(self.conversation, session))
        return True

    def _cmd_sources(self, command: Command) -> bool:
        try:
            found = self.conversation.sources()
        except ValueError as error:
            self.ui.error(str(error))
            return True
        except (TurnCancelled, TurnFailed) as error:
            self.ui.error(f"!!sources stopped ({str(error) or 'interrupted'}); the memory is as it was before it")
            return True
        if not found:
            self.ui.info("the last reply attended no memory block: everything it used was in the local window "
                         "or the first tokens")
            return True
        count = self.conversation.last_reply_tokens
        rows = []
        for source, text in found:
            share = 100 * source.weight / max(count, 1)
            snippet = " ".join(text.split())
            rows.append((f"tokens {source.start:,}-{source.end:,}: {share:.1f}% of each reply token's attention",
                         snippet if len(snippet) <= 300 else snippet[:297] + "..."))
        self.ui.table("where the last reply's attention went in memory (mean over layers and heads)", rows)
        return True

    def _cmd_reset(self, command: Command) -> bool:
        store.release(self.conversation.engine)  # the saved session's files receive nothing from now on
        self.conversation.reset()
        if self.session is None:
            self.ui.info("the conversation was reset")
        else:
            # Never overwrite a saved conversation with an empty one: the new one is unsaved until !!save NAME.
            self.ui.info(f"the conversation was reset; session {self.session!r} is kept on disk as it was "
                         "(!!save NAME saves the new conversation, !!load NAME goes back)")
        self._unbind()
        return True

    def _cmd_remove(self, command: Command) -> bool:
        fed = self.conversation.counters.fed_tokens
        try:
            removed = self.conversation.remove()
        except (TurnCancelled, TurnFailed) as error:
            self.ui.error(f"!!remove stopped ({str(error) or 'interrupted'}); nothing was removed")
            return True
        if not removed:
            self.ui.error("there is nothing to remove")
            return True
        reread = self.conversation.counters.fed_tokens - fed
        self.ui.info("removed the last exchange" + (f" (re-read {reread:,} tokens)" if reread else ""))
        self.save()
        return True

    def _cmd_regen(self, command: Command) -> bool:
        if not self.conversation.messages or self.conversation.messages[-1]["role"] != "assistant":
            self.ui.error("there is no reply to regenerate")
            return True
        self._turn(lambda **kw: self.conversation.regen(**kw), "the previous reply was kept")
        return True

    def _cmd_save(self, command: Command) -> bool:
        name = command.args[0] if command.args else (self.session or self.read_only or "default")
        if name == self.read_only:
            # It may have moved on in the process that holds it: saving this conversation there would lose turns.
            self.ui.error(f"session {name!r} was opened read-only and is never saved to; !!save NEW saves this "
                          "conversation as session NEW")
            return True
        try:
            lock = self._lock_for(name)
        except SessionError as error:  # an invalid name, or another process holds it
            self.ui.error(f"{error}; nothing changed" if isinstance(error, SessionBusyError) else str(error))
            return True
        if not self.save(name):
            self._release_unless_bound(lock)
            return True
        self._bind(name, lock)
        self.ui.info(f"saved session {name!r} ({len(self.conversation.engine.tokens):,} tokens); "
                     "it is saved again after every turn")
        return True

    def _cmd_load(self, command: Command) -> bool:
        if not command.args:
            names = list_sessions()
            self.ui.info("saved sessions: " + (", ".join(names) if names else "none")
                         + f" (in {sessions_dir()})")
            return True
        name = command.args[0]
        try:
            path = session_path(name)
            if not path.exists():
                raise SessionError(f"no session named {name!r}; saved sessions: "
                                   + (", ".join(list_sessions()) or "none"))
            lock = self._lock_for(name)
        except SessionError as error:  # also when another process holds it: the chat goes on as it was
            self.ui.error(f"{error}; nothing changed" if isinstance(error, SessionBusyError) else str(error))
            return True
        try:
            self._resume(path)
        except SessionError as error:
            self._release_unless_bound(lock)
            self.ui.error(str(error))
            return True
        self._bind(name, lock)
        self.ui.info(f"loaded session {name!r}: {len(self.conversation.messages)} messages, "
                     f"{len(self.conversation.engine.tokens):,} tokens in memory (nothing re-read)")
        return True

    def _cmd_file(self, command: Command) -> bool:
        path = Path(command.args[0]).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.ui.error(f"no such file: {path}")
            return True
        except (OSError, UnicodeDecodeError) as error:
            self.ui.error(f"cannot read {path} as UTF-8 text: {error}")
            return True
        question = " ".join(command.args[1:])
        message = f"{text.rstrip()}\n\n{question}" if question else text
        self.ui.info(f"sending {path} ({len(text):,} characters)" + (" with your question" if question else ""))
        self._turn(lambda **kw: self.conversation.ask(message, **kw), "the file's message was dropped")
        return True
