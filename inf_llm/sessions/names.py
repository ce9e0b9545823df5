"""Where sessions live and what they are called: `<data dir>/sessions/<name>.session`.

Sessions live in `platformdirs.user_data_dir("inf-llm")/sessions`, or `$INF_LLM_DATA_DIR/sessions`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import platformdirs

DATA_DIR_ENV = "INF_LLM_DATA_DIR"
SUFFIX = ".session"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class SessionError(ValueError):
    """A session could not be saved or resumed; the message names the file and the reason."""


def sessions_dir() -> Path:
    base = os.environ.get(DATA_DIR_ENV) or platformdirs.user_data_dir("inf-llm")
    return Path(base).expanduser() / "sessions"


def session_path(name: str) -> Path:
    """The file of session `name` (letters, digits, `.`, `_`, `-`; it cannot name a path elsewhere)."""
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(SUFFIX):
        raise SessionError(f"invalid session name {name!r}: use letters, digits, '.', '_' and '-' "
                           "(starting with a letter or digit, at most 100 characters)")
    return sessions_dir() / f"{name}{SUFFIX}"


def list_sessions() -> list[str]:
    """The names of the session folders (and version-1 files); lock files (`.NAME.session.lock`) are not."""
    folder = sessions_dir()
    return sorted(p.name[: -len(SUFFIX)] for p in folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []
