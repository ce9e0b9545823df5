"""Small file-system helpers shared by every writer of files: whole writes, fsync of a folder, atomic
replacement of a file or a folder, and the removal of temporary folders left by processes that died.

Atomicity here means: a reader (or a process started after a crash) sees the old file or the new one, never part
of one. Durability (surviving power loss) additionally needs the fsyncs, which each caller asks for or not.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)


def write_all(fd: int, data: memoryview, offset: int | None) -> None:
    """pwrite (or append, offset None) every byte: a single call may write fewer."""
    done = 0
    while done < len(data):
        chunk = data[done:]
        done += os.pwrite(fd, chunk, offset + done) if offset is not None else os.write(fd, chunk)


def fsync_path(path: Path, *, best_effort: bool = False) -> None:
    """fsync a file or a folder (a folder: the names in it) by its path.

    best_effort: ignore a folder that cannot be opened or synced (not possible on every platform; a rename in it
    is still atomic); otherwise the OSError propagates.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if best_effort:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not best_effort:
            raise
    finally:
        os.close(fd)


def replace_file(path: Path, write: Callable[[int], None], *, prefix: str, fsync: bool) -> None:
    """Write file `path` atomically: `write(fd)` fills a temporary file `prefix*` next to it, which then replaces
    `path` (`os.replace`). fsync: sync the temporary file before the rename (the caller syncs the folder, if it
    wants the rename itself durable). On any error, also Ctrl-C, the temporary file is removed and `path` is as
    it was."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    try:
        write(fd)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(fd: int, text: str) -> None:
    """Write `text` (UTF-8) to a file descriptor: a `write` for `replace_file`."""
    write_all(fd, memoryview(text.encode("utf-8")), None)


def pid_folder_prefix(prefix: str) -> str:
    """The name prefix of a temporary folder that records the process that made it (see `remove_stale_folders`)."""
    return f"{prefix}{os.getpid()}-"


def remove_stale_folders(parent: Path, prefix: str, *, keep_own: bool, what: str) -> None:
    """Remove the folders `<parent>/<prefix><pid>-*` (made with `pid_folder_prefix`) left by a process that ended.

    keep_own: this process's folders are in use (spill folders); otherwise they are leftovers of an earlier
    attempt of this process, as are names without a pid, and are removed too (a one-at-a-time writer). A folder
    of another running process is never removed.
    """
    for folder in parent.glob(f"{prefix}*"):
        pid = folder.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit():
            alive = psutil.pid_exists(int(pid))
            stale = not alive if keep_own else not alive or int(pid) == os.getpid()
        else:
            stale = not keep_own
        if stale and (folder.is_dir() or not keep_own):
            logger.info("removing %s, left by %s", folder, what)
            shutil.rmtree(folder, ignore_errors=True)


def write_dir_atomically(target: Path, write: Callable[[Path], None], *, infix: str = ".tmp-") -> None:
    """Create folder `target` by calling `write(tmp)` on a fresh temporary sibling, then renaming it into place.

    Readers therefore see either no `target` or a complete one. If `write` raises, its temporary folder is
    removed and the error propagates. Leftovers of crashed writers (whose process is gone) are removed. If
    another process finished `target` first, its copy wins and ours is discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}{infix}"
    remove_stale_folders(target.parent, prefix, keep_own=False, what="an interrupted conversion")
    tmp = Path(tempfile.mkdtemp(prefix=pid_folder_prefix(prefix), dir=target.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # rename() onto a non-empty folder fails: a concurrent writer got there first.
            if not target.is_dir():
                raise
            logger.info("%s was written concurrently by another process; using that copy", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
