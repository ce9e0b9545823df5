"""The temporary folder of the blocks that overflow RAM (the disk tier of a store under a host budget)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

from inf_llm.storage.disk_tier import DiskTierError
from inf_llm.storage.files import pid_folder_prefix, remove_stale_folders

logger = logging.getLogger(__name__)

SPILL_PREFIX = "inf-llm-blocks-"


class SpillDirectory:
    """A temporary folder for the blocks that overflow RAM: created on first use, removed with this object.

    All layers of a model share one; each store gets a subfolder. `parent` None means the system's temporary
    folder. Folders left by a process that died (its pid is in the name) are removed when a new one is made.
    """

    def __init__(self, parent: str | os.PathLike[str] | None = None):
        self.parent = None if parent is None else Path(parent).expanduser()
        self._root: Path | None = None
        self._cleanup: weakref.finalize | None = None

    @property
    def root(self) -> Path | None:
        return self._root

    def folder(self, name: str) -> Path:
        if self._root is None:
            parent = Path(tempfile.gettempdir()) if self.parent is None else self.parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
                remove_stale_folders(parent, SPILL_PREFIX, keep_own=True, what="a process that ended")
                self._root = Path(tempfile.mkdtemp(prefix=pid_folder_prefix(SPILL_PREFIX), dir=parent))
            except OSError as error:
                raise DiskTierError(f"cannot create a folder for memory blocks in {str(parent)!r}: {error}") from error
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._root), True)
            logger.info("memory blocks beyond the host budget go to %s", self._root)
        return self._root / name

    def remove(self) -> None:
        if self._cleanup is not None:
            self._cleanup()
