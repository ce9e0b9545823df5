"""One writer per session: an exclusive OS advisory lock, held by the process that saves to a session folder.

Two chats that both resume a session and save after every turn would each overwrite the other's turns (and
append to the same block files). A process that binds a session takes `SessionLock(folder)` first and holds
it while it may save there; a second process is refused at once (`SessionBusyError`, naming the holder).

Files, beside the session folder `NAME.session/` (never inside it: the folder's content is the session, and a
reader that opens it must see exactly what was saved):

- `.NAME.session.lock`: the lock, `fcntl.flock` on Linux and macOS (through the `filelock` package). The
  kernel releases it when its process ends, however it ends (a crash or `kill -9` included), so a lock can
  never be left behind. The empty file itself stays: removing a lock file while another process is opening it
  would let two processes each lock a different file of the same name.
- `.NAME.session.lock.info`: who holds it (pid, host, since when), written after the lock is taken and removed
  before it is released; only read to name the holder in a refusal. One left by a killed process blocks
  nothing, and a refusal ignores it when its pid is no longer running here.

The names are hidden and do not end in `.session`, so `list_sessions` (`inf_llm.sessions.names`) never lists them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import filelock
import psutil

from inf_llm.sessions.names import SUFFIX, SessionError
from inf_llm.storage.files import replace_file, write_text

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
INFO_SUFFIX = ".lock.info"


@dataclass(frozen=True)
class Holder:
    """The process holding a session's lock, as it recorded itself."""

    pid: int
    host: str
    since: float  # seconds since the epoch

    def describe(self) -> str:
        where = "" if self.host == socket.gethostname() else f" on host {self.host}"
        return f"pid {self.pid}{where}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}"


class SessionBusyError(SessionError):
    """Another process holds the session's lock; `holder` is who (None when it has not recorded itself yet)."""

    def __init__(self, folder: Path, holder: Holder | None):
        self.folder, self.holder = Path(folder), holder
        who = holder.describe() if holder is not None else "which has not recorded its pid yet"
        super().__init__(f"session {session_name(self.folder)!r} is open in another process ({who}); "
                         "it was left as it is")


def session_name(folder: Path) -> str:
    name = Path(folder).name
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name


def lock_path(folder: Path) -> Path:
    folder = Path(folder)
    return folder.with_name(f".{folder.name}{LOCK_SUFFIX}")


def info_path(folder: Path) -> Path:
    folder = Path(folder)
    return folder.with_name(f".{folder.name}{INFO_SUFFIX}")


def read_holder(folder: Path) -> Holder | None:
    """Who recorded holding the lock of `folder`; None if nobody did, the record is unreadable, or its process
    is no longer running on this host (a process that was killed leaves its record behind)."""
    try:
        data = json.loads(info_path(folder).read_text(encoding="utf-8"))
        holder = Holder(int(data["pid"]), str(data["host"]), float(data["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if holder.host == socket.gethostname() and not psutil.pid_exists(holder.pid):
        return None
    return holder


class SessionLock:
    """The exclusive lock of the session folder `folder` (which need not exist yet). Not reentrant: `acquire`
    on a held lock does nothing, and one `release` frees it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path, self.info_path = lock_path(self.folder), info_path(self.folder)
        self._lock = filelock.FileLock(str(self.path), timeout=0)
        self.held = False

    def acquire(self) -> None:
        """Take the lock without waiting; SessionBusyError naming the holder if another process has it."""
        if self.held:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except filelock.Timeout:
            raise SessionBusyError(self.folder, read_holder(self.folder)) from None
        except OSError as error:
            raise SessionError(f"cannot lock session {session_name(self.folder)!r} ({self.path}): {error}") from error
        self.held = True
        try:
            self._write_info()
        except OSError as error:
            # The lock is what keeps a second writer out; without the record a refusal only cannot name us.
            self.info_path.unlink(missing_ok=True)
            logger.warning("holding %s but could not record this process in %s: %s", self.path, self.info_path, error)
        logger.info("locked session %s", self.folder)

    def _write_info(self) -> None:
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        # A reader sees the previous record or this one, never half of it.
        replace_file(self.info_path, lambda fd: write_text(fd, text), prefix=f"{self.info_path.name}.tmp-", fsync=False)

    def release(self) -> None:
        if not self.held:
            return
        try:
            self.info_path.unlink(missing_ok=True)  # before unlocking: never remove the next holder's record
        except OSError as error:
            logger.warning("could not remove %s: %s", self.info_path, error)
        self._lock.release(force=True)
        self.held = False
        logger.info("unlocked session %s", self.folder)

    def __enter__(self) -> SessionLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
