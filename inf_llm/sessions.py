"""Saved conversations: the transcript, the engine's memory, and the identity of what produced them.

A session file lets a chat continue after a restart without re-reading the conversation: loading it gives the
same next-token logits as never having stopped (`Engine.state_dict()` / `load_state_dict()`).

Format: one `torch.save` file holding only plain containers, strings, numbers and tensors, read back with
`torch.load(weights_only=True)` (no pickled objects, so opening a file cannot run code). It records

- `identity`: the model (architecture facts, dtype, a fingerprint of the weights, the tokenizer's chat template),
  the InfLLM settings, and the chat format (template, system message). A session is resumed only where all
  agree: another model's or config's memory would silently give different answers;
- `messages`: the transcript; `engine`: the memory's state;
- `sha256`: a digest of everything above (tensors by their bytes), so a damaged file is refused rather than
  resumed with wrong memory.

Writes are atomic (a temporary file in the same folder, then `os.replace`): a crash leaves the old session or
the new one, never half of one. Refused files are left untouched.

Sessions live in `platformdirs.user_data_dir("inf-llm")/sessions`, or `$INF_LLM_DATA_DIR/sessions`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import torch

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "INF_LLM_DATA_DIR"
FORMAT_NAME = "inf-llm-session"
FORMAT_VERSION = 1
SUFFIX = ".session"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Settings that change speed only, never what the model computes: a session may resume under other values.
# Settings that change speed or where blocks are kept, never outputs: a session resumes under other values.
_SPEED_ONLY_SETTINGS = ("kernel_backend", "device_cache_blocks", "cache_policy", "score_decay", "host_cache_bytes", "disk_dir")


class SessionError(ValueError):
    """A session could not be saved or resumed; the message names the file and the reason."""


@dataclass(frozen=True)
class SessionFile:
    path: Path
    identity: dict
    messages: list[dict]
    engine_state: dict
    saved_at: float


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
    folder = sessions_dir()
    return sorted(p.name[: -len(SUFFIX)] for p in folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []


# --- identity ---------------------------------------------------------------------------------------------------


def model_identity(model: torch.nn.Module, tokenizer) -> dict:
    """Facts that must match for a saved memory to mean the same thing: architecture, dtype, weights, template."""
    mc = model.config
    facts = {key: getattr(mc, key, None) for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                                      "num_attention_heads", "num_key_value_heads")}
    facts["dtype"] = str(next(model.parameters()).dtype)
    facts["weights"] = weights_fingerprint(model)
    if tokenizer is not None:
        template = getattr(tokenizer, "chat_template", None) or ""
        facts["tokenizer"] = hashlib.sha256(f"{len(tokenizer)}\n{template}".encode()).hexdigest()[:16]
    return facts


@torch.inference_mode()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """A digest of every parameter's name, shape and about 1,000 evenly spaced values (milliseconds, not a full hash)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step].float().cpu()
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def identity_of(engine, chat: dict) -> dict:
    """The identity recorded in (and required of) a session: model, InfLLM settings, chat format."""
    settings = {k: v for k, v in engine.config.to_dict().items() if k not in _SPEED_ONLY_SETTINGS}
    return {"model": model_identity(engine.model, engine.tokenizer), "config": settings, "chat": dict(chat)}


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: session has {a!r}, now {b!r}")
    return out


# --- digest -----------------------------------------------------------------------------------------------------


def _digest(value: Any, h) -> None:
    """Feed a canonical encoding of value (nested dicts, lists, scalars, tensors) into hash h."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key in sorted(value, key=str):
            _digest(key, h)
            _digest(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for item in value:
            _digest(item, h)
    elif isinstance(value, float):
        h.update(b"F" + struct.pack("<d", value))
    elif value is None or isinstance(value, (bool, int, str)):
        h.update(f"{type(value).__name__}:{value!r}".encode())
    else:
        raise SessionError(f"cannot store a {type(value).__name__} in a session")


def content_sha256(payload: dict) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in payload.items() if k != "sha256"}, h)
    return h.hexdigest()


# --- save / read / resume ---------------------------------------------------------------------------------------


def save_session(path: Path, engine, messages: list[dict], chat: dict) -> Path:
    """Write the session atomically to `path` (use `session_path(name)`); returns the path."""
    path = Path(path)
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "saved_at": time.time(),
        "identity": identity_of(engine, chat),
        "messages": [{"role": str(m["role"]), "content": str(m["content"])} for m in messages],
        "engine": engine.state_dict(),
    }
    payload["sha256"] = content_sha256(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on Ctrl-C: the previous session file stays as it was.
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    logger.info("saved session %s (%d messages, %d tokens)", path, len(messages), len(engine.tokens))
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_session(path: Path) -> SessionFile:
    """Read and verify a session file; SessionError if it is missing, damaged or not a session."""
    path = Path(path)
    if not path.is_file():
        raise SessionError(f"no session file {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged zip, a truncated record, a file of something else
        raise SessionError(f"{path} is damaged or not a session file ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}); it was left as it is") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise SessionError(f"{path} is not an InfLLM session file; it was left as it is")
    if payload.get("version") != FORMAT_VERSION:
        raise SessionError(f"{path} is a session of format version {payload.get('version')!r}; this program reads "
                           f"version {FORMAT_VERSION}; it was left as it is")
    try:
        intact = payload.get("sha256") == content_sha256(payload)
    except SessionError:
        intact = False
    if not intact:
        raise SessionError(f"{path} is damaged (its checksum does not match its content); it was left as it is")
    messages = payload["messages"]
    if not all(isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
               for m in messages):
        raise SessionError(f"{path} has a malformed transcript; it was left as it is")
    return SessionFile(path, payload["identity"], messages, payload["engine"], float(payload["saved_at"]))


def check_identity(session: SessionFile, engine, chat: dict) -> None:
    """SessionError naming every difference if the session was made by another model, config or chat format."""
    differences = _differences(session.identity, identity_of(engine, chat))
    if differences:
        raise SessionError(f"{session.path} was saved with another model, config or chat format and cannot be "
                           f"resumed here ({'; '.join(differences)}); it was left as it is. Start the chat with the "
                           "same --model-path, --inf-llm-config-path, --conv-template and --conv-system-msg, or "
                           "use another session name")


def resume_session(path: Path, engine, chat: dict) -> SessionFile:
    """Read, verify and check a session, then load its memory into `engine` (nothing is re-read)."""
    session = read_session(path)
    check_identity(session, engine, chat)
    try:
        engine.load_state_dict(session.engine_state)
    except Exception as error:
        engine.reset()
        raise SessionError(f"{path}: its memory does not fit this engine ({error}); it was left as it is") from error
    logger.info("resumed session %s (%d messages, %d tokens)", path, len(session.messages), len(engine.tokens))
    return session
