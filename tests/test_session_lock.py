"""One writer per session: the lock is exclusive across processes, names its holder, lives beside the session
folder (never listed as a session), and a holder killed with SIGKILL leaves nothing that blocks the next one."""

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from inf_llm.sessions.lock import SessionBusyError, SessionLock, info_path, lock_path, read_holder
from inf_llm.sessions.names import DATA_DIR_ENV, list_sessions, session_path

REPO = Path(__file__).resolve().parent.parent

# Takes the lock as the chat does, says so, and holds it until its stdin closes (or it is killed).
_HOLDER = """
import sys
from pathlib import Path
from inf_llm.sessions.lock import SessionLock
lock = SessionLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
sys.stdin.read()
lock.release()
"""


@contextmanager
def holding(folder: Path):
    """Another process holding the lock of session folder `folder`; yields its Popen."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=str(REPO),
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_held_lock_refuses_other_processes_and_names_the_holder(tmp_path):
    folder = tmp_path / "work.session"
    with holding(folder) as holder:
        message = (rf"^session 'work' is open in another process \(pid {holder.pid}, "
                   r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\); it was left as it is$")
        with pytest.raises(SessionBusyError, match=message) as refused:
            SessionLock(folder).acquire()
        assert refused.value.holder.pid == holder.pid
        holder.stdin.close()  # it releases the lock and exits
        assert holder.wait(timeout=60) == 0
    assert not info_path(folder).exists()  # a released lock leaves no record of a holder
    with SessionLock(folder) as lock:
        assert lock.held and read_holder(folder).pid == os.getpid()
    assert not folder.exists()  # taking a session's lock creates nothing in (or as) the session folder


def test_a_killed_holder_leaves_nothing_that_blocks(tmp_path):
    folder = tmp_path / "work.session"
    with holding(folder) as holder:
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait(timeout=60) == -signal.SIGKILL
    # Its record stays behind, naming a process that no longer runs: ignored, and the kernel released the lock.
    assert json.loads(info_path(folder).read_text())["pid"] == holder.pid
    assert read_holder(folder) is None
    lock = SessionLock(folder)
    lock.acquire()
    assert read_holder(folder).pid == os.getpid()
    lock.release()
    assert not lock.held and not info_path(folder).exists()


def test_the_lock_lives_beside_the_session_and_is_not_a_session(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    folder = session_path("work")
    folder.mkdir(parents=True)
    with SessionLock(folder) as lock:
        assert lock.path == lock_path(folder) == tmp_path / "sessions" / ".work.session.lock"
        assert sorted(p.name for p in folder.parent.iterdir()) == [".work.session.lock", ".work.session.lock.info",
                                                                   "work.session"]
        assert list(folder.iterdir()) == []
        assert list_sessions() == ["work"]
        lock.acquire()  # held already: nothing happens, and one release frees it
    with SessionLock(folder) as again:
        assert again.held


def test_one_process_two_locks_of_one_session_exclude_each_other(tmp_path):
    # flock belongs to an open file, not to a process: a chat that tried to bind a session twice would be refused
    # too, which is what lets the chat's tests check locks without a second process.
    folder = tmp_path / "work.session"
    with SessionLock(folder):
        with pytest.raises(SessionBusyError, match=rf"\(pid {os.getpid()}, since "):
            SessionLock(folder).acquire()
