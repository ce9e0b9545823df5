"""Saved conversations: the transcript, the engine's memory, and the identity of what produced them.

A session lets a chat continue after a restart without re-reading the conversation: resuming it gives the same
next-token logits as never having stopped.

Format (version 2): a folder `<name>.session/` holding

- `state.pt`: one `torch.save` file of plain containers, strings, numbers and tensors, read back with
  `torch.load(weights_only=True)` (no pickled objects, so opening a file cannot run code): `identity` (the model:
  architecture facts, dtype, a fingerprint of the weights, the tokenizer's chat template; the InfLLM settings;
  the chat format), `messages`, the engine's state except its memory blocks (window, sinks, remainder: bounded
  in size), where the blocks are (`blocks`), and `sha256`, a digest of all of it. A session is resumed only
  where the identity agrees: another model's or config's memory would silently give different answers;
- one generation folder `g-*/` with, per layer, the memory blocks as a disk tier (`inf_llm.disk_tier`:
  `layer-NNN/`) and their representatives (`layer-NNN-reprs/`, one row per block in `repr_dtype`).

Saving writes only what is not on disk yet. After a save or a resume the engine's block stores use the
session's tiers as their disk tier, so blocks that leave RAM go there, and a later save writes the blocks still
only in RAM, the new representatives and a new `state.pt`: a 32K-token session adds a turn in milliseconds
rather than rewriting everything. `state.pt` records how many index entries each tier had at the save
(`DiskTier.entries`), and resuming opens the tiers at those counts: whatever the chat did after its last save
(a rollback, the blocks of an unsaved turn) is not part of the session. Resuming reads `state.pt` and the
representatives only; blocks are read when retrieval asks for them, each checked against its CRC32. `state.pt`
also records a digest of each tier's index at the save (`DiskTier.index_sha256`), so a layer folder swapped with
another's, or an index from another session, is refused rather than read as this one's blocks.

Hostile files: a state whose checksum matches but whose structure is not what `save_session` writes is refused;
so is a session whose `state.pt`, generation folder, layer folders or their files are symbolic links (the chat
writes to those files, never outside the session's folder), or whose state names a generation that is not a
folder in it. `python -m tests.fuzz_run` damages sessions at random and checks all of this.

Writes are atomic: `state.pt` is replaced by `os.replace` after the blocks it names are synced, and a save into
a folder the engine is not using (another session, or the first save) writes a new generation folder, commits
`state.pt`, then removes the old generation. A crash leaves the previous save or the new one; so does a save
that fails (a full disk, an I/O error: the error is the OSError itself, also from inside torch.save), and the
next save into the same folder writes everything the failed one did not. A first save that fails removes the
folder it created. Refused sessions are left untouched. Version 1 (one torch file with the blocks in it) is still
read; saving converts it.

Read-only resume (`read_only=True`: the session is open in another process, which may save to it at any
moment) copies the blocks the state names into a private temporary folder first, so that nothing the engine
does later (blocks leaving RAM, a rollback recorded in the block log) writes to the session's folder; the next
save goes to another session, as a whole new generation. Saving is never safe without the session's lock
(`inf_llm.session_lock`): the chat takes it before it binds a session.

Sessions live in `platformdirs.user_data_dir("inf-llm")/sessions`, or `$INF_LLM_DATA_DIR/sessions`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import torch

from inf_llm.config import ADDED_LATER
from inf_llm.disk_tier import (DATA_FILE, INDEX_FILE, LAYOUT_FILE, DiskTier, DiskTierError, RowLayout,
                              SpillDirectory, write_all)

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "INF_LLM_DATA_DIR"
FORMAT_NAME = "inf-llm-session"
FORMAT_VERSION = 2
SUFFIX = ".session"
STATE_FILE = "state.pt"
_GENERATION = "g-"
_GENERATION_NAME = re.compile(r"^g-[A-Za-z0-9_]{1,64}$")  # a folder in the session's (mkdtemp names)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Settings that change speed or where blocks are kept, never outputs: a session resumes under other values.
_SPEED_ONLY_SETTINGS = ("kernel_backend", "device_cache_blocks", "cache_policy", "score_decay", "host_cache_bytes", "disk_dir")
# Settings whose saved state converts: a session resumes under another value (representatives are cast to the
# engine's dtype, and its next save writes a new generation in that dtype). Sessions saved before the default
# became float16 keep working.
_CONVERTIBLE_SETTINGS = ("repr_dtype",)


class SessionError(ValueError):
    """A session could not be saved or resumed; the message names the file and the reason."""


@dataclass(frozen=True)
class SessionFile:
    path: Path
    identity: dict
    messages: list[dict]
    engine_state: dict  # version 1: Engine.state_dict(); version 2: without the blocks (see `blocks`)
    saved_at: float
    version: int = FORMAT_VERSION
    blocks: dict | None = None  # version 2, windowed methods: {"generation": name, "layers": [per-layer counts]}


@dataclass
class _Binding:
    """The session folder whose tiers an engine's block stores use since its last save or resume."""

    folder: Path
    generation: str
    kv: list[DiskTier]
    reprs: list[DiskTier]


# Engine -> binding; weak, so that a dropped engine does not keep its session's files open.
_bindings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Engine -> the private copy of a read-only resumed session's blocks that its stores use (removed once unused).
_private_copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def _layers(engine) -> list | None:
    """The per-layer memories of a windowed engine (inf-llm, stream-llm, infinite-lm); None for full attention."""
    return getattr(engine.memory, "layers", None)


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


def _write_state(folder: Path, payload: dict) -> None:
    payload["sha256"] = content_sha256(payload)
    fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.tmp-", dir=folder)
    try:
        writer = _StateWriter(fd)
        try:
            torch.save(payload, writer)
        except RuntimeError as error:
            if writer.error is not None:
                raise writer.error from error  # e.g. ENOSPC: say so, not "unexpected pos"
            raise
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, folder / STATE_FILE)
    except BaseException:
        # Also on Ctrl-C: the previous state.pt stays as it was.
        if fd is not None:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)


def _write_rows(tier: DiskTier, reprs: torch.Tensor, start: int, end: int, batch: int = 4096) -> None:
    layout = tier.layout
    for a in range(start, end, batch):
        b = min(end, a + batch)
        tier.write(range(a, b), layout.records(reprs[a:b].reshape(b - a, layout.width)))


def _new_generation(folder: Path, layers) -> _Binding:
    """Write every block and representative into a new generation folder (synced, not yet committed)."""
    gen = Path(tempfile.mkdtemp(prefix=_GENERATION, dir=folder))
    try:
        kv, reprs = [], []
        for i, layer in enumerate(layers):
            kv_tier = DiskTier(gen / f"layer-{i:03d}", layer.blocks.layout, durable=False)
            layer.blocks.copy_to(kv_tier)
            width = layer.repr_rows * layer.shape.head_dim
            row_tier = DiskTier(gen / f"layer-{i:03d}-reprs", RowLayout(width, layer.config.repr_dtype),
                                durable=False)
            _write_rows(row_tier, layer.reprs, 0, layer.blocks.num_blocks)
            kv.append(kv_tier)
            reprs.append(row_tier)
        for tier in kv + reprs:
            tier.sync()
            tier.protect()
    except BaseException:
        shutil.rmtree(gen, ignore_errors=True)
        raise
    return _Binding(folder, gen.name, kv, reprs)


def _update_generation(binding: _Binding, layers) -> None:
    """Write what is not on disk yet into the generation the engine uses (synced, not yet committed)."""
    for layer, kv_tier, row_tier in zip(layers, binding.kv, binding.reprs):
        layer.blocks.flush()  # blocks still only in RAM
        valid = min(layer.mark_blocks(), len(row_tier))  # rows of blocks that no rollback forgot
        row_tier.truncate(valid)
        _write_rows(row_tier, layer.reprs, valid, layer.blocks.num_blocks)
        kv_tier.sync()
        row_tier.sync()
        kv_tier.protect()
        row_tier.protect()


def _current_generation(folder: Path) -> str | None:
    try:
        payload = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        return (payload.get("blocks") or {}).get("generation")
    except Exception:
        return None


def save_session(path: Path, engine, messages: list[dict], chat: dict) -> Path:
    """Save the conversation to the session folder `path` (use `session_path(name)`); returns the path.

    Only what is not on disk yet is written when the engine already uses this session's folder.
    """
    path = Path(path)
    layers = _layers(engine)
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "saved_at": time.time(),
        "identity": identity_of(engine, chat),
        "messages": [{"role": str(m["role"]), "content": str(m["content"])} for m in messages],
    }
    if path.is_file():
        return _convert_file(path, engine, messages, chat)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        return _save_into(path, engine, messages, payload, layers)
    except BaseException:
        if created and not (path / STATE_FILE).exists():
            # A first save that failed (a full disk): leave no folder that would be refused as an incomplete session.
            shutil.rmtree(path, ignore_errors=True)
        raise


def _save_into(path: Path, engine, messages: list[dict], payload: dict, layers) -> Path:
    if layers is None:  # full attention: its KV cache is the state
        payload["engine"], payload["blocks"] = engine.state_dict(), None
        _write_state(path, payload)
        _remove_generations(path, keep=None)
        return path
    binding = _bindings.get(engine)
    incremental = (binding is not None and binding.folder == path.resolve()
                   and binding.generation == _current_generation(path)
                   and all(layer.blocks.disk is tier for layer, tier in zip(layers, binding.kv)))
    if incremental:
        _update_generation(binding, layers)
    else:
        binding = _new_generation(path.resolve(), layers)
        for layer in layers:
            layer.mark_blocks()
    payload["engine"] = {"tokens": list(engine.tokens), "memory": {"layers": [layer.snapshot() for layer in layers]}}
    payload["blocks"] = {"generation": binding.generation,
                         "layers": [{"num_blocks": layer.blocks.num_blocks, "kv_entries": kv.entries,
                                     "repr_entries": rows.entries, "kv_index": kv.index_sha256(),
                                     "repr_index": rows.index_sha256()}
                                    for layer, kv, rows in zip(layers, binding.kv, binding.reprs)]}
    try:
        _write_state(path, payload)
    except BaseException:
        if not incremental:
            shutil.rmtree(path / binding.generation, ignore_errors=True)
        raise
    if not incremental:
        for layer, tier in zip(layers, binding.kv):
            layer.blocks.use_disk(tier)
        _bindings[engine] = binding
        _remove_copy(engine, _private_copies.pop(engine, None))  # the stores use the session's tiers now
    _remove_generations(path, keep=binding.generation)  # earlier saves, and any a killed process left half-written
    logger.info("saved session %s (%d messages, %d tokens, %s)", path, len(messages), len(engine.tokens),
                "new blocks only" if incremental else "all blocks")
    return path


def release(engine) -> None:
    """Forget the engine's memory (as `engine.reset()`) without writing to the session folder it uses: a reset
    conversation is not that session any more, and the saved session must stay exactly as it was."""
    binding = _bindings.pop(engine, None)
    if binding is not None:
        for layer, tier in zip(_layers(engine), binding.kv):
            if layer.blocks.disk is tier:
                layer.blocks.disk = None  # forgetting every block needs nothing from (or written to) its tier
    engine.reset()
    _remove_copy(engine, _private_copies.pop(engine, None))


def _remove_copy(engine, copy: SpillDirectory | None) -> None:
    """Remove the private copy of a read-only resumed session's blocks; the engine's stores left it or were reset."""
    if copy is None:
        return
    for layer in _layers(engine) or []:
        disk = layer.blocks.disk
        if disk is not None and copy.root is not None and disk.path.is_relative_to(copy.root):
            layer.blocks.disk = None  # a reset store holds no block of it; the next to leave RAM goes elsewhere
    copy.remove()


def _private_tier(source: DiskTier, num_blocks: int, folder: Path) -> DiskTier:
    """A copy of blocks 0..num_blocks-1 of `source` in `folder` (each checked against its CRC32 on the way);
    `source` is closed. Blocks a saved state names are never rewritten, so a concurrent save cannot change them."""
    tier = DiskTier(folder, source.layout, durable=False)
    for start in range(0, num_blocks, 64):  # 32 MB at a time for a 7B model's 128-token blocks
        ids = range(start, min(start + 64, num_blocks))
        tier.write(ids, torch.stack([source.read(b) for b in ids]))
    source.close()
    return tier


def _remove_generations(folder: Path, keep: str | None) -> None:
    """Remove generation folders other than `keep` (earlier saves, or a save that did not commit)."""
    for child in folder.iterdir():
        if child.is_dir() and child.name.startswith(_GENERATION) and child.name != keep:
            shutil.rmtree(child, ignore_errors=True)


def _convert_file(path: Path, engine, messages: list[dict], chat: dict) -> Path:
    """Replace a version-1 session file by a version-2 folder of the same name."""
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = path.with_name(f".{path.name}.v1")
    try:
        save_session(staging, engine, messages, chat)
        os.replace(path, old)
        os.rename(staging, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.replace(old, path)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old.unlink()
    binding = _bindings.get(engine)
    if binding is not None and binding.folder == staging.resolve():
        # The engine's tiers were opened in the staging folder, which now has the session's name.
        for tier in binding.kv + binding.reprs:
            tier.path = path.resolve() / tier.path.relative_to(staging.resolve())
        binding.folder = path.resolve()
    _fsync_dir(path.parent)
    logger.info("converted session %s to format %d", path, FORMAT_VERSION)
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


def load_into(session: SessionFile, engine, *, read_only: bool = False) -> None:
    """Give `engine` the session's memory (after `check_identity`). Blocks are not read: the engine's stores use
    the session's tiers. On error the engine is reset and the session left as it is.

    read_only: never write to the session's folder from now on (another process may hold it): the blocks are
    copied into a private temporary folder, which the stores use instead, and the engine is bound to no session.
    """
    previous_copy = _private_copies.pop(engine, None)
    kv: list[DiskTier] = []
    try:
        if session.version == 1 or session.blocks is None:
            engine.load_state_dict(session.engine_state)
            _check_tokens(engine)
            _bindings.pop(engine, None)
            return
        layers = _layers(engine)
        saved = session.blocks["layers"]
        if layers is None or len(saved) != len(layers):
            raise ValueError(f"the session has {len(saved)} layers of blocks, this engine "
                             f"{'none' if layers is None else len(layers)}")
        gen = session.path.resolve() / session.blocks["generation"]
        copy = SpillDirectory(engine.config.disk_dir) if read_only else None
        if copy is not None:
            _private_copies[engine] = copy
        reprs = []
        for i, (layer, counts) in enumerate(zip(layers, saved)):
            n = counts["num_blocks"]
            kv_tier = _open_tier(gen, f"layer-{i:03d}", counts["kv_entries"], counts.get("kv_index"))
            row_tier = _open_tier(gen, f"layer-{i:03d}-reprs", counts["repr_entries"], counts.get("repr_index"))
            if not kv_tier.has_prefix(n) or not row_tier.has_prefix(n):
                raise DiskTierError(f"{gen} does not hold all {n} blocks of layer {i}")
            if len(kv_tier) != n or len(row_tier) != n:  # a save names every block its tiers hold at that state
                raise DiskTierError(f"{gen} holds more than the {n} blocks of layer {i} its state names")
            r, d = layer.repr_rows, layer.shape.head_dim
            rows = torch.stack([row_tier.layout.rows(row_tier.read(b)[None])[0] for b in range(n)]) if n else \
                torch.empty((0, r * d), dtype=row_tier.layout.torch_dtype)
            if copy is not None:
                kv_tier = _private_tier(kv_tier, n, copy.folder(f"layer-{i:03d}"))
            kv.append(kv_tier)
            reprs.append(row_tier)
            state = session.engine_state["memory"]["layers"][i]
            _check_layer_state(layer, state)
            layer.load_blocks(kv_tier, n, rows.reshape(n, r, d), state)
        engine.tokens = list(session.engine_state["tokens"])
        _check_tokens(engine)
        if copy is None and all(tier.layout.torch_dtype == layer.repr_dtype for tier, layer in zip(reprs, layers)):
            _bindings[engine] = _Binding(session.path.resolve(), session.blocks["generation"], kv, reprs)
        else:
            # Read-only, or converted representatives: the next save writes a whole new generation.
            _bindings.pop(engine, None)
    except BaseException:
        for layer in _layers(engine) or []:
            if any(layer.blocks.disk is tier for tier in kv):
                layer.blocks.disk = None  # the reset must not record forgetting its blocks in the session's log
        engine.reset()
        _bindings.pop(engine, None)
        _remove_copy(engine, _private_copies.pop(engine, None))
        raise
    finally:
        _remove_copy(engine, previous_copy)  # its blocks were forgotten (reset) or replaced by the session's


def _open_tier(gen: Path, name: str, entries: int, index_sha256: str | None) -> DiskTier:
    """A layer's tier of a saved generation, at its saved state; refused if it or a file of it is a symbolic link
    (the chat writes to these files: never outside the session's folder) or its index is not the one saved
    (another layer's or session's blocks; sessions saved before the digest was recorded are not checked)."""
    folder = gen / name
    for path in (gen, folder, *(folder / f for f in (LAYOUT_FILE, DATA_FILE, INDEX_FILE))):
        if path.is_symlink():
            raise DiskTierError(f"{path} is a symbolic link (to {os.readlink(path)}); a session's files must be in "
                                "its folder")
    tier = DiskTier.open(folder, durable=False, entries=entries)
    if index_sha256 is not None and tier.index_sha256() != index_sha256:
        tier.close()
        raise DiskTierError(f"{folder / INDEX_FILE} is not the index this session saved (another layer's or "
                            "session's blocks)")
    return tier


def _check_layer_state(layer, saved: dict) -> None:
    """ValueError unless a layer's saved state has the entries of this engine's, each of its type, and tensors of
    its dtype and shape but for the token dimension (1)."""
    for key, mine in layer.snapshot().items():
        if key == "repr_absmax" and key not in saved:
            continue  # sessions saved before it was part of the state (recomputed)
        value = saved.get(key)
        if isinstance(mine, torch.Tensor):
            fits = isinstance(value, torch.Tensor) and value.dtype == mine.dtype and value.dim() == mine.dim() \
                and all(a == b for i, (a, b) in enumerate(zip(value.shape, mine.shape)) if i != 1)
        else:
            fits = type(value) is type(mine)
        if not fits:
            raise ValueError(f"the saved layer state's {key!r} is not of this engine's type or shape")


def _check_tokens(engine) -> None:
    if engine.stats().tokens != len(engine.tokens):
        raise ValueError(f"the memory holds {engine.stats().tokens} tokens, the state names {len(engine.tokens)}")


def _comparable(identity: dict) -> dict:
    """An identity without the settings a resume converts (`_CONVERTIBLE_SETTINGS`); a setting added after the
    session was saved counts as the value that reproduces its behaviour (`ADDED_LATER`)."""
    config = {**ADDED_LATER, **identity.get("config", {})}
    config = {k: v for k, v in config.items() if k not in _CONVERTIBLE_SETTINGS}
    return {**identity, "config": config}


def check_identity(session: SessionFile, engine, chat: dict) -> None:
    """SessionError naming every difference if the session was made by another model, config or chat format."""
    differences = _differences(_comparable(session.identity), _comparable(identity_of(engine, chat)))
    if differences:
        raise SessionError(f"{session.path} was saved with another model, config or chat format and cannot be "
                           f"resumed here ({'; '.join(differences)}); it was left as it is. Start the chat with the "
                           "same --model-path, --inf-llm-config-path, --conv-template and --conv-system-msg, or "
                           "use another session name")


def resume_session(path: Path, engine, chat: dict, *, read_only: bool = False) -> SessionFile:
    """Read, verify and check a session, then load its memory into `engine` (nothing is re-read by the model;
    read_only: see `load_into`)."""
    session = read_session(path)
    check_identity(session, engine, chat)
    try:
        load_into(session, engine, read_only=read_only)
    except Exception as error:
        raise SessionError(f"{path}: its memory does not fit this engine or is damaged ({error}); it was left as "
                           "it is") from error
    logger.info("resumed session %s (%d messages, %d tokens)", path, len(session.messages), len(engine.tokens))
    return session
