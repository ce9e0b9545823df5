"""Saved conversations: the transcript, the engine's memory, and the identity of what produced them.

A session lets a chat continue after a restart without re-reading the conversation: resuming it gives the same
next-token logits as never having stopped.

Format (version 2): a folder `<name>.session/` holding

- `state.pt`: one `torch.save` file of plain containers, strings, numbers and tensors, read back with
  `torch.load(weights_only=True)` (no pickled objects, so opening a file cannot run code): `identity` (the model:
  architecture facts, dtype, a fingerprint of the weights, the tokenizer's chat template; the InfLLM settings;
  the chat format), `messages`, the engine's state except its memory blocks (window, sinks, remainder: bounded
  in size; with `short_conversation`, whether the memory has the short settings and the lengths of the feeds
  that read the conversation), where the blocks are (`blocks`), and `sha256`, a digest of all of it. A session is
  resumed only where the identity agrees: another model's or config's memory would silently give different
  answers (a memory saved with the config's own settings, long or saved before `short_conversation` existed,
  resumes under any short settings);
- one generation folder `g-*/` with, per layer, the memory blocks as a disk tier (`inf_llm.storage.disk_tier`:
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
(`inf_llm.sessions.lock`): the chat takes it before it binds a session.

Sessions live in `platformdirs.user_data_dir("inf-llm")/sessions`, or `$INF_LLM_DATA_DIR/sessions`.

Modules: `names` (where sessions live, what they are called, `SessionError`), `identity` (what produced a session),
`digest` (the state's checksum), `state_file` (`state.pt`: its format, reading, atomic writing), `store` (saving and
resuming an engine through its memory's persistence API), `convert` (version 1 to 2), `lock` (one writer).
"""
