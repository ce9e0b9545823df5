"""Saving an engine's conversation into a session folder and resuming it: the session store.

The store writes and maps through the memory's persistence API (`InfLLMMemory`: `tier_layouts`, `write_all`,
`write_unsaved`, `mark_saved`, `uses_disk`, `use_disk`, `drop_disk`, `map_layer`), never into its layers. The
saved copy an engine's block stores use since its last save or resume is kept on its memory (`memory.saved`), as
is the private copy of a read-only resumed session's blocks (`memory.private_copy`): a dropped engine keeps no
session's files open. The format, and how writes stay atomic, are described in `inf_llm.sessions`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from inf_llm.memory.model_memory import InfLLMMemory, SavedBlocks
from inf_llm.sessions.convert import convert_file
from inf_llm.sessions.identity import check_identity, identity_of
from inf_llm.sessions.names import SessionError
from inf_llm.sessions.state_file import (FORMAT_NAME, FORMAT_VERSION, GENERATION, STATE_FILE, SessionFile,
                                         current_generation, read_session, write_state)
from inf_llm.storage.disk_tier import DATA_FILE, INDEX_FILE, LAYOUT_FILE, DiskTier, DiskTierError
from inf_llm.storage.spill import SpillDirectory

logger = logging.getLogger(__name__)


def _windowed(engine) -> InfLLMMemory | None:
    """The memory of a windowed engine (inf-llm, stream-llm, infinite-lm); None for full attention."""
    memory = engine.memory
    return memory if getattr(memory, "layers", None) is not None else None


# --- saving -----------------------------------------------------------------------------------------------------


def save_session(path: Path, engine, messages: list[dict], chat: dict) -> Path:
    """Save the conversation to the session folder `path` (use `session_path(name)`); returns the path.

    Only what is not on disk yet is written when the engine already uses this session's folder.
    """
    path = Path(path)
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "saved_at": time.time(),
        "identity": identity_of(engine, chat),
        "messages": [{"role": str(m["role"]), "content": str(m["content"])} for m in messages],
    }
    if path.is_file():
        return convert_file(path, engine, messages, chat, save_session)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        return _save_into(path, engine, messages, payload)
    except BaseException:
        if created and not (path / STATE_FILE).exists():
            # A first save that failed (a full disk): leave no folder that would be refused as an incomplete session.
            shutil.rmtree(path, ignore_errors=True)
        raise


def _save_into(path: Path, engine, messages: list[dict], payload: dict) -> Path:
    memory = _windowed(engine)
    if memory is None:  # full attention: its KV cache is the state
        payload["engine"], payload["blocks"] = engine.state_dict(), None
        write_state(path, payload)
        _remove_generations(path, keep=None)
        return path
    saved = memory.saved
    incremental = (saved is not None and saved.folder == path.resolve()
                   and saved.generation == current_generation(path) and memory.uses_disk(saved.kv))
    if incremental:
        # What is not on disk yet, into the generation the engine uses (synced, not yet committed).
        memory.write_unsaved(saved.kv, saved.reprs)
        _seal(saved)
    else:
        saved = _new_generation(path.resolve(), memory)
        memory.mark_saved()
    payload["engine"] = {"tokens": list(engine.tokens), "memory": {"layers": memory.saved_snapshot()},
                         **engine.regime_state()}
    payload["blocks"] = {"generation": saved.generation,
                         "layers": [{"num_blocks": num_blocks, "kv_entries": kv.entries,
                                     "repr_entries": rows.entries, "kv_index": kv.index_sha256(),
                                     "repr_index": rows.index_sha256()}
                                    for num_blocks, kv, rows in zip(memory.block_counts(), saved.kv, saved.reprs)]}
    try:
        write_state(path, payload)
    except BaseException:
        if not incremental:
            shutil.rmtree(path / saved.generation, ignore_errors=True)
        raise
    if not incremental:
        memory.use_disk(saved.kv)
        memory.saved = saved
        _remove_private_copy(memory)  # the stores use the session's tiers now
    _remove_generations(path, keep=saved.generation)  # earlier saves, and any a killed process left half-written
    logger.info("saved session %s (%d messages, %d tokens, %s)", path, len(messages), len(engine.tokens),
                "new blocks only" if incremental else "all blocks")
    return path


def _new_generation(folder: Path, memory: InfLLMMemory) -> SavedBlocks:
    """Write every block and representative into a new generation folder (synced, not yet committed)."""
    gen = Path(tempfile.mkdtemp(prefix=GENERATION, dir=folder))
    try:
        kv, reprs = [], []
        for i, (block_layout, row_layout) in enumerate(memory.tier_layouts()):
            kv.append(DiskTier(gen / f"layer-{i:03d}", block_layout, durable=False))
            reprs.append(DiskTier(gen / f"layer-{i:03d}-reprs", row_layout, durable=False))
        memory.write_all(kv, reprs)
        saved = SavedBlocks(folder, gen.name, kv, reprs)
        _seal(saved)
    except BaseException:
        shutil.rmtree(gen, ignore_errors=True)
        raise
    return saved


def _seal(saved: SavedBlocks) -> None:
    """Sync a generation's tiers and keep what they hold: the state about to be committed names it."""
    for kv_tier, row_tier in zip(saved.kv, saved.reprs):
        kv_tier.sync()
        row_tier.sync()
        kv_tier.protect()
        row_tier.protect()


def _remove_generations(folder: Path, keep: str | None) -> None:
    """Remove generation folders other than `keep` (earlier saves, or a save that did not commit)."""
    for child in folder.iterdir():
        if child.is_dir() and child.name.startswith(GENERATION) and child.name != keep:
            shutil.rmtree(child, ignore_errors=True)


def release(engine) -> None:
    """Forget the engine's memory (as `engine.reset()`) without writing to the session folder it uses: a reset
    conversation is not that session any more, and the saved session must stay exactly as it was."""
    memory = _windowed(engine)
    if memory is not None:
        memory.forget_saved()  # forgetting every block needs nothing from (or written to) its tier
    engine.reset()
    if memory is not None:
        _remove_private_copy(memory)


# --- resuming ---------------------------------------------------------------------------------------------------


def load_into(session: SessionFile, engine, *, read_only: bool = False) -> None:
    """Give `engine` the session's memory (after `check_identity`). Blocks are not read: the engine's stores use
    the session's tiers. On error the engine is reset and the session left as it is.

    read_only: never write to the session's folder from now on (another process may hold it): the blocks are
    copied into a private temporary folder, which the stores use instead, and the engine is bound to no session.
    """
    engine.enter_regime(session.engine_state)  # short_conversation: the memory of the settings it was saved under
    memory = _windowed(engine)
    previous_copy = None
    if memory is not None:
        previous_copy, memory.private_copy = memory.private_copy, None
    kv: list[DiskTier] = []
    try:
        if session.version == 1 or session.blocks is None:
            engine.load_state_dict(session.engine_state)
            _check_tokens(engine)
            if memory is not None:
                memory.saved = None
            return
        saved = session.blocks["layers"]
        if memory is None or len(saved) != len(memory.layers):
            raise ValueError(f"the session has {len(saved)} layers of blocks, this engine "
                             f"{'none' if memory is None else len(memory.layers)}")
        gen = session.path.resolve() / session.blocks["generation"]
        copy = SpillDirectory(engine.config.disk_dir) if read_only else None
        if copy is not None:
            memory.private_copy = copy
        reprs = []
        for i, counts in enumerate(saved):
            n = counts["num_blocks"]
            kv_tier = _open_tier(gen, f"layer-{i:03d}", counts["kv_entries"], counts.get("kv_index"))
            row_tier = _open_tier(gen, f"layer-{i:03d}-reprs", counts["repr_entries"], counts.get("repr_index"))
            if not kv_tier.has_prefix(n) or not row_tier.has_prefix(n):
                raise DiskTierError(f"{gen} does not hold all {n} blocks of layer {i}")
            if len(kv_tier) != n or len(row_tier) != n:  # a save names every block its tiers hold at that state
                raise DiskTierError(f"{gen} holds more than the {n} blocks of layer {i} its state names")
            layout = row_tier.layout
            # Room for as many blocks again: the summaries grow in place as the chat goes on (as they would
            # double in any case at the first new block, which then copied them all).
            rows = layout.rows(row_tier.read_prefix(n, spare=n))
            if copy is not None:
                kv_tier = _private_tier(kv_tier, n, copy.folder(f"layer-{i:03d}"))
            kv.append(kv_tier)
            reprs.append(row_tier)
            memory.map_layer(i, kv_tier, n, rows, session.engine_state["memory"]["layers"][i])
        engine.tokens = list(session.engine_state["tokens"])
        engine.feeds = list(session.engine_state.get("feeds", []))
        _check_tokens(engine)
        if copy is None and all(tier.layout.torch_dtype == memory.summary_dtype for tier in reprs):
            memory.saved = SavedBlocks(session.path.resolve(), session.blocks["generation"], kv, reprs)
        else:
            # Read-only, or converted representatives: the next save writes a whole new generation.
            memory.saved = None
    except BaseException:
        if memory is not None:
            # The reset must not record forgetting its blocks in the session's log.
            memory.drop_disk(lambda tier: any(tier is opened for opened in kv))
        engine.reset()
        if memory is not None:
            memory.saved = None
            _remove_private_copy(memory)
        raise
    finally:
        _remove_copy(memory, previous_copy)  # its blocks were forgotten (reset) or replaced by the session's


def _open_tier(gen: Path, name: str, entries: int, index_sha256: str | None) -> DiskTier:
    """A layer's tier of a saved generation, at its saved state; refused if it or a file of it is a symbolic link
    (the chat writes to these files: never outside the session's folder) or its index is not the one saved
    (another layer's or session's blocks; sessions saved before the digest was recorded are not checked)."""
    folder = gen / name
    for path in (gen, folder, *(folder / f for f in (LAYOUT_FILE, DATA_FILE, INDEX_FILE))):
        if path.is_symlink():
            raise DiskTierError(f"{path} is a symbolic link (to {os.readlink(path)}); a session's files must be in "
                                "its folder")
    # A digest that differs is refused as the folder is opened (sessions saved before it was recorded have none).
    return DiskTier.open(folder, durable=False, entries=entries, index_sha256=index_sha256)


def _private_tier(source: DiskTier, num_blocks: int, folder: Path) -> DiskTier:
    """A copy of blocks 0..num_blocks-1 of `source` in `folder` (each checked against its CRC32 on the way);
    `source` is closed. Blocks a saved state names are never rewritten, so a concurrent save cannot change them."""
    tier = DiskTier(folder, source.layout, durable=False)
    for start in range(0, num_blocks, 64):  # 32 MB at a time for a 7B model's 128-token blocks
        ids = range(start, min(start + 64, num_blocks))
        tier.write(ids, torch.stack([source.read(b) for b in ids]))
    source.close()
    return tier


def _remove_private_copy(memory: InfLLMMemory) -> None:
    copy, memory.private_copy = memory.private_copy, None
    _remove_copy(memory, copy)


def _remove_copy(memory: InfLLMMemory | None, copy: SpillDirectory | None) -> None:
    """Remove the private copy of a read-only resumed session's blocks; the engine's stores left it or were reset."""
    if copy is not None:
        memory.remove_copy(copy)


def _check_tokens(engine) -> None:
    if engine.stats().tokens != len(engine.tokens):
        raise ValueError(f"the memory holds {engine.stats().tokens} tokens, the state names {len(engine.tokens)}")


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
