"""Version-1 sessions (one torch file with the blocks in it) are still read; saving one converts it into a
version-2 folder of the same name."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from inf_llm.sessions.state_file import FORMAT_VERSION
from inf_llm.storage.files import fsync_path

logger = logging.getLogger(__name__)


def convert_file(path: Path, engine, messages: list[dict], chat: dict, save: Callable[..., Path]) -> Path:
    """Replace the version-1 session file `path` by a version-2 folder of the same name, written by
    `save(folder, engine, messages, chat)` (`save_session`) into a staging folder first."""
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = path.with_name(f".{path.name}.v1")
    try:
        save(staging, engine, messages, chat)
        os.replace(path, old)
        os.rename(staging, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.replace(old, path)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old.unlink()
    saved = getattr(engine.memory, "saved", None)
    if saved is not None and saved.folder == staging.resolve():
        # The engine's tiers were opened in the staging folder, which now has the session's name.
        for tier in saved.kv + saved.reprs:
            tier.path = path.resolve() / tier.path.relative_to(staging.resolve())
        saved.folder = path.resolve()
    fsync_path(path.parent, best_effort=True)
    logger.info("converted session %s to format %d", path, FORMAT_VERSION)
    return path
