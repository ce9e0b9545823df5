"""A session's `state.pt`: the format, reading and verifying it, and writing it atomically.

`state.pt` is one `torch.save` file of plain containers, strings, numbers and tensors, read back with
`torch.load(weights_only=True)` (no pickled objects, so opening a file cannot run code): `format`, `version`,
`saved_at`, `identity` (`inf_llm.sessions.identity`), `messages`, `engine` (the engine's state except its memory
blocks), `blocks` (which generation folder holds them, and each layer's counts and index digests) and `sha256`,
a digest of all of it (`inf_llm.sessions.digest`). A state whose checksum matches but whose structure is not what
`save_session` writes is refused.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inf_llm.sessions.digest import content_sha256
from inf_llm.sessions.names import SessionError
from inf_llm.storage.files import fsync_path, replace_file, write_all

FORMAT_NAME = "inf-llm-session"
FORMAT_VERSION = 2
STATE_FILE = "state.pt"
GENERATION = "g-"
_GENERATION_NAME = re.compile(r"^g-[A-Za-z0-9_]{1,64}$")  # a folder in the session's (mkdtemp names)


@dataclass(frozen=True)
class SessionFile:
    path: Path
    identity: dict
    messages: list[dict]
    engine_state: dict  # version 1: Engine.state_dict(); version 2: without the blocks (see `blocks`)
    saved_at: float
    version: int = FORMAT_VERSION
    blocks: dict | None = None  # version 2, windowed methods: {"generation": name, "layers": [per-layer counts]}


class _StateWriter:
    """The file torch.save writes `state.pt` through: each write goes to the descriptor whole (`write_all`), and a
    failed one is kept, since torch reports it only as a RuntimeError about the stream's position."""

    def __init__(self, fd: int):
        self.fd, self.error = fd, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            write_all(self.fd, view, None)
        except OSError as error:
            self.error = error
            raise
        return len(view)

    def flush(self) -> None:
        pass


def write_state(folder: Path, payload: dict) -> None:
    """Replace `folder/state.pt` by `payload` with its checksum, atomically and durably: on any error, also Ctrl-C,
    the previous state.pt stays as it was."""
    payload["sha256"] = content_sha256(payload)

    def write(fd: int) -> None:
        writer = _StateWriter(fd)
        try:
            torch.save(payload, writer)
        except RuntimeError as error:
            if writer.error is not None:
                raise writer.error from error  # e.g. ENOSPC: say so, not "unexpected pos"
            raise

    replace_file(folder / STATE_FILE, write, prefix=f".{STATE_FILE}.tmp-", fsync=True)
    fsync_path(folder, best_effort=True)


def current_generation(folder: Path) -> str | None:
    try:
        payload = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        return (payload.get("blocks") or {}).get("generation")
    except Exception:
        return None


def read_session(path: Path) -> SessionFile:
    """Read and verify a session (its state; blocks are checked when read); SessionError if it is missing,
    damaged or not a session."""
    path = Path(path)
    if path.is_dir():
        state, expected = path / STATE_FILE, FORMAT_VERSION
    elif path.is_file():
        state, expected = path, 1
    else:
        raise SessionError(f"no session file {path}")
    if state.is_symlink():
        raise SessionError(f"{state} is a symbolic link (to {os.readlink(state)}); a session's files must be in its "
                           "folder; it was left as it is")
    if not state.is_file():
        raise SessionError(f"{path} is not a complete session (no {STATE_FILE}: a first save that did not finish?); "
                           "it was left as it is")
    try:
        payload = torch.load(state, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged zip, a truncated record, a file of something else
        raise SessionError(f"{state} is damaged or not a session file ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}); it was left as it is") from error
    if not isinstance(payload, dict) or not isinstance(payload.get("format"), str) \
            or payload["format"] != FORMAT_NAME:
        raise SessionError(f"{state} is not an InfLLM session file; it was left as it is")
    version = payload.get("version")
    if type(version) is not int or version != expected:
        shown = repr(version) if version is None or isinstance(version, (int, float, str)) else type(version).__name__
        raise SessionError(f"{state} is a session of format version {shown[:40]}; this program reads "
                           f"version {FORMAT_VERSION} folders and version 1 files; it was left as it is")
    try:
        intact = payload.get("sha256") == content_sha256(payload)
    except SessionError:
        intact = False
    if not intact:
        raise SessionError(f"{state} is damaged (its checksum does not match its content); it was left as it is")
    problem = _malformed(payload, expected)
    if problem:
        raise SessionError(f"{state} is not a session this program wrote ({problem}); it was left as it is")
    return SessionFile(path, payload["identity"], payload["messages"], payload["engine"], float(payload["saved_at"]),
                       version=expected, blocks=payload.get("blocks"))


def _plain(value: Any) -> bool:
    """Whether value is made of dicts with string keys, lists, strings, numbers, booleans and None (an identity)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float))


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _malformed(payload: dict, version: int) -> str | None:
    """What in an intact payload (its checksum matches) is not the structure `save_session` writes; None if all is.
    The checksum catches damage; this catches a file written by something else (or by hand) that recomputed it."""
    identity = payload.get("identity")
    if not isinstance(identity, dict) or not _plain(identity) \
            or not all(isinstance(identity.get(key, {}), dict) for key in ("model", "config", "chat")):
        return "its identity is not a mapping of model, config and chat facts"
    messages = payload.get("messages")
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
            for m in messages):
        return "its transcript is malformed"
    saved_at = payload.get("saved_at")
    if isinstance(saved_at, bool) or not isinstance(saved_at, (int, float)) or not math.isfinite(saved_at):
        return "saved_at is not a time"
    engine = payload.get("engine")
    if not isinstance(engine, dict) or not isinstance(engine.get("tokens"), list) \
            or not all(type(t) is int for t in engine["tokens"]):
        return "its engine state has no list of token ids"
    blocks = payload.get("blocks")
    if version == 1 or blocks is None:
        return None
    if not isinstance(blocks, dict) or not isinstance(blocks.get("generation"), str) \
            or not _GENERATION_NAME.match(blocks["generation"]):
        return "its blocks do not name a generation folder inside the session"
    layers = blocks.get("layers")
    if not isinstance(layers, list) or not all(
            isinstance(layer, dict) and all(_count(layer.get(key)) for key in ("num_blocks", "kv_entries", "repr_entries"))
            and all(isinstance(layer.get(key, ""), str) for key in ("kv_index", "repr_index")) for layer in layers):
        return "its block counts are malformed"
    memory = engine.get("memory")
    if not isinstance(memory, dict) or not isinstance(memory.get("layers"), list) \
            or len(memory["layers"]) != len(layers) or not all(isinstance(layer, dict) for layer in memory["layers"]):
        return "its engine state does not match its blocks"
    return None
