"""The state of one decoder layer's context memory (`LayerState`): what a chunk's attention reads and the memory
update writes (`inf_llm.memory.layer_memory.LayerMemory` adds both), its snapshots and its persistence.

Per layer InfLLM keeps, with keys unrotated: the window (the most recent `local_window` tokens, plus the chunk being
processed, in buffers that grow by doubling), the sinks, the remainder (evicted tokens that do not yet fill a
block), and the blocks, in a `BlockStore`, each with a summary for ranking (its representatives or key bounds:
`reprs`, the first rows of a buffer that doubles when full).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inf_llm.config.schema import InfLLMConfig
from inf_llm.kernels import AttentionOps
from inf_llm.memory.ranking import code_basis, summary_codes
from inf_llm.model.rope import RotaryTable
from inf_llm.storage.block_ids import BlockIds
from inf_llm.storage.block_store import BlockStore
from inf_llm.storage.dtypes import DTYPES
from inf_llm.storage.tier_settings import TierSettings


@dataclass(frozen=True)
class LayerShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int


# Snapshot entries added after sessions were saved: a saved state without one restores as before it existed.
STATE_ADDED_LATER = ("repr_absmax", "reuse_blocks", "reuse_left", "code_basis", "code_blocks", "end_blocks",
                     "end_baseline", "pool_blocks", "pool_end", "pool_left", "end_near")


def _empty(heads: int, dim: int, like_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty((heads, 0, dim), dtype=like_dtype, device=device)


class LayerState:
    """One layer's memory without its attention: buffers, block summaries, snapshots, persistence, counts."""

    def __init__(
        self,
        config: InfLLMConfig,
        shape: LayerShape,
        rotary: RotaryTable,
        ops: AttentionOps,
        *,
        dtype: torch.dtype,
        storage_dtype: torch.dtype,
        device: torch.device,
        tiers: TierSettings | None = None,
        overlap: bool | None = None,
    ):
        self.config, self.shape, self.rotary, self.ops = config, shape, rotary, ops
        self.dtype, self.device = dtype, device
        self.index = 0  # the decoder layer this memory belongs to (set by InfLLMMemory; names it in traces)
        self.trace = None  # a RetrievalTrace while one is attached (retrieval_trace.py); None costs nothing
        self.shared_picks = None  # shared_blocks: the memory's SharedPicks (shared_picks.py), set by InfLLMMemory
        self._scores = None  # the last chunk's block scores, kept for the trace only
        # Block ids added to every choice while set (`InfLLMMemory.force_blocks`: an oracle for the benchmark's
        # analysis, never set by the chat), to the chunks that reach position `forced_from`; None costs nothing.
        self.forced_blocks: torch.Tensor | None = None
        self.forced_from = 0
        # prompt_end_blocks: while the chunk that ends a prompt is read for votes, the memory's list of each layer's
        # votes, best first (set by `InfLLMMemory.vote_prompt_end`), else None.
        self.end_votes = None
        # Staged chunks (see `_chunk`) with block copies on a side stream: the default on CUDA, where they let
        # retrieval overlap the local stage. Without: one stream, everything in program order.
        self.overlap = device.type == "cuda" if overlap is None else overlap
        hq, hkv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.blocks = BlockStore(
            hkv,
            config.block_size,
            d,
            storage_dtype=storage_dtype,
            compute_dtype=dtype,
            device=device,
            cache_blocks=config.device_cache_blocks,
            policy=config.cache_policy,
            score_decay=config.score_decay,
            tiers=tiers,
            side_stream=self.overlap and device.type == "cuda",
        )
        self.reset()

    # --- state ------------------------------------------------------------------------------------------------

    def reset(self) -> None:
        hq, hkv, d = self.shape.num_heads, self.shape.num_kv_heads, self.shape.head_dim
        self.num_seen = 0  # absolute position of the next token
        capacity = 2 * (self.config.widest_window + self.config.chunk_size)
        self.win_k = torch.zeros((hkv, capacity, d), dtype=self.dtype, device=self.device)
        self.win_v = torch.zeros_like(self.win_k)
        self.win_score = torch.zeros((hq, capacity), dtype=torch.float32, device=self.device)
        self.win_start = self.win_end = 0
        self.sink_k = _empty(hkv, d, self.dtype, self.device)
        self.sink_v = _empty(hkv, d, self.dtype, self.device)
        self.rem_k = _empty(hkv, d, self.dtype, self.device)
        self.rem_v = _empty(hkv, d, self.dtype, self.device)
        self.rem_score = torch.empty((hq, 0), dtype=torch.float32, device=self.device)
        # Representatives of blocks 0..num_blocks-1 are the first rows of a buffer that doubles when full:
        # concatenating per new block would copy all of them every chunk (quadratic in the stream's length).
        self._reprs = self._new_reprs(0)
        # float16 scoring bounds its sums with the largest |representative| (never lowered: a bound, not a max).
        self._repr_absmax = torch.zeros((), dtype=torch.float32, device=self.device)
        # ranking_code_rank: each block's code (rows of a buffer that doubles when full) and the basis they are
        # coordinates in, computed from the first ranking_code_blocks summaries (None before that many exist).
        self._codes = torch.empty((0, self.config.ranking_code_rank or 0), dtype=torch.float32, device=self.device)
        self._code_basis: torch.Tensor | None = None
        self.blocks.truncate(0)
        self.blocks.hits = self.blocks.misses = 0
        # reply_start_distance: whether the last chunk had several queries (a prompt's), so that a one-query chunk
        # now is a reply's first step.
        self._after_prompt = False
        # decode_memory_distance_from: the length of the last prompt read (set by `InfLLMMemory.begin_prompt`).
        self.prompt_tokens = 0
        # decode_memory_distance_steps: the decoding steps (one-query chunks) since the last chunk of several.
        self.reply_steps = 0
        # decode_rank_every > 1: the last ranked decoding step's choice and how many more steps attend it.
        self._reused: BlockIds | None = None
        self._reuse_left = 0
        # reply_pool_blocks: the pool a reply's decoding steps rank (ascending block ids; None when every block is
        # ranked), the blocks there were when it was formed (those formed since are ranked too), and how many more
        # ranked steps it serves.
        self._pool: torch.Tensor | None = None
        self._pool_end = 0
        self._pool_left = 0
        self._pool_reprs: torch.Tensor | None = None  # the pool's summaries, copied at its first step (not saved)
        # prompt_end_blocks: the blocks every chunk and step attends since the last prompt's end was read (ascending
        # ids, int64 on the CPU; None before), and the last chunk of several queries' ranking queries (Hq, c, D)
        # float32, the baseline its successor's votes are measured against (c = 0: none yet).
        self.end_blocks: torch.Tensor | None = None
        # voted_memory_places, voted_memory_consensus: those of end_blocks placed at voted_memory_distance (ascending
        # ids, maybe none; None: all of them).
        self.end_near: torch.Tensor | None = None
        self.end_baseline = torch.empty((self.shape.num_heads, 0, self.shape.head_dim), device=self.device)
        if self.shared_picks is not None:  # (the memory's: a rollback or reset of any layer starts it afresh)
            self.shared_picks.clear()
        self._fewest_blocks = 0  # fewest blocks held since `mark_blocks` (rollbacks forget blocks)

    @property
    def repr_dtype(self) -> torch.dtype:
        return DTYPES[self.config.repr_dtype]

    @property
    def repr_rows(self) -> int:
        """Rows of a block's summary: Hq representatives, or a (max, min) pair of key bounds per KV head."""
        if self.config.block_ranking == "bounds":
            return 2 * self.shape.num_kv_heads
        return self.shape.num_heads

    @property
    def reprs(self) -> torch.Tensor:
        """(num_blocks, repr_rows, D) in `repr_dtype`: each block's summary for ranking, its representatives or
        its key bounds (a view, not contiguous for float32: see `_new_reprs`)."""
        return self._reprs[: self.blocks.num_blocks]

    def _new_reprs(self, rows: int) -> torch.Tensor:
        """An empty (rows, repr_rows, D) buffer laid out for ranking, which multiplies it by one vector per token.

        float32: column-major, each of the Hq*D coordinates contiguous over the blocks. torch's CPU
        matrix-vector product streams that layout about 1.7x faster than rows (7.7 vs 12.5-14 ms for the 141 MB
        of representatives at 64K tokens, 2 cores): ranking reads every representative once per decoded token.
        float16: rows, the layout torch's 16-bit product is fast on (a column-major one is 6x slower).
        """
        r, d = self.repr_rows, self.shape.head_dim
        if self.repr_dtype == torch.float16:
            return torch.empty((rows, r, d), dtype=self.repr_dtype, device=self.device)
        return torch.empty((r, d, rows), dtype=self.repr_dtype, device=self.device).permute(2, 0, 1)

    def _append_reprs(self, new: torch.Tensor) -> None:
        n, end = self.blocks.num_blocks, self.blocks.num_blocks + new.shape[0]
        if end > self._reprs.shape[0]:
            grown = self._new_reprs(max(end, 2 * self._reprs.shape[0]))
            grown[:n] = self._reprs[:n]
            self._reprs = grown
        self._reprs[n:end] = new
        self._note_absmax(self._reprs[n:end])
        self._extend_codes(n, end)

    @property
    def codes(self) -> torch.Tensor | None:
        """(num_blocks, ranking_code_rank) float32, each block's code; None until the basis exists."""
        return None if self._code_basis is None else self._codes[: self.blocks.num_blocks]

    def _extend_codes(self, start: int, end: int) -> None:
        """Codes for summaries start..end-1 (rows below `start` already have theirs); the basis is computed when
        the layer first holds ranking_code_blocks summaries, and then every code so far."""
        rank, calibration = self.config.ranking_code_rank, self.config.ranking_code_blocks
        if rank is None or (end <= start and self._code_basis is not None):
            return
        if self._code_basis is None:
            if end < calibration:
                return
            self._code_basis = code_basis(self._reprs[:calibration], rank).to(self.device)
            start = 0
        if end > self._codes.shape[0]:
            grown = torch.empty((max(end, 2 * self._codes.shape[0]), rank), dtype=torch.float32, device=self.device)
            grown[:start] = self._codes[:start]
            self._codes = grown
        self._codes[start:end] = summary_codes(self._reprs[start:end], self._code_basis)

    def _note_absmax(self, reprs: torch.Tensor) -> None:
        # Only 16-bit scoring needs the bound; float32 representatives skip the reduction (and its check).
        if reprs.numel() and reprs.dtype == torch.float16:
            self._repr_absmax = torch.maximum(self._repr_absmax, reprs.abs().amax().float())

    def _check_absmax(self) -> None:
        if self.repr_dtype == torch.float16 and not torch.isfinite(self._repr_absmax):
            raise ValueError("a representative exceeds float16's range (keys of this model are that large): "
                             "use repr_dtype: float32")

    def set_reprs(self, reprs: torch.Tensor, *, absmax: torch.Tensor | None = None, owned: bool = False,
                  count: int | None = None) -> None:
        """Replace the block summaries (N, repr_rows, D), any float dtype (loading a session).

        absmax: their float16 bound when known (a saved state's `repr_absmax`), which spares a pass over them.
        owned: `reprs` is the caller's fresh copy, nothing else refers to it: in the layout ranking reads
        (float16 rows on this device) it becomes the buffer itself, without a copy (1.4 GiB at 1M tokens).
        count: the summaries are `reprs[:count]`; with owned, the rows after them are room to grow (a resumed
        session's buffer: without it, the first block formed after the resume copied every summary into a
        buffer twice the size, 2.3 s at 1M tokens).
        """
        self._code_basis = None  # (codes follow from the restored state: `restore`)
        count = reprs.shape[0] if count is None else count
        if owned and reprs.dtype == self.repr_dtype == torch.float16 and reprs.device == self.device \
                and reprs.is_contiguous():
            self._reprs = reprs
        else:
            self._reprs = self._new_reprs(count)
            self._reprs.copy_(reprs[:count])
        self._repr_absmax = torch.zeros((), dtype=torch.float32, device=self.device)
        if absmax is None:
            self._note_absmax(self._reprs[:count])
        elif self.repr_dtype == torch.float16:
            self._repr_absmax = absmax.to(device=self.device, dtype=torch.float32)
        self._check_absmax()

    @property
    def window_len(self) -> int:
        return self.win_end - self.win_start

    def _window_append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        c = k.shape[1]
        if self.win_end + c > self.win_k.shape[1]:
            # Move the live window to the front of a (possibly larger) buffer: amortised O(1) per token.
            live = self.window_len
            capacity = max(self.win_k.shape[1], 2 * (live + c))
            for name in ("win_k", "win_v", "win_score"):
                old = getattr(self, name)
                new = torch.zeros((old.shape[0], capacity, *old.shape[2:]), dtype=old.dtype, device=old.device)
                new[:, :live] = old[:, self.win_start : self.win_end]
                setattr(self, name, new)
            self.win_start, self.win_end = 0, live
        end = self.win_end + c
        self.win_k[:, self.win_end : end] = k
        self.win_v[:, self.win_end : end] = v
        self.win_score[:, self.win_end : end] = 0.0
        self.win_end = end

    # --- snapshots and persistence (the layer side of InfLLMMemory's persistence API) ------------------------

    def snapshot(self) -> dict:
        """Everything but the append-only blocks, which are kept by count (cheap rollback, O(window))."""
        return {
            "num_seen": self.num_seen,
            "win_k": self.win_k[:, self.win_start : self.win_end].clone(),
            "win_v": self.win_v[:, self.win_start : self.win_end].clone(),
            "win_score": self.win_score[:, self.win_start : self.win_end].clone(),
            "sink_k": self.sink_k,
            "sink_v": self.sink_v,
            "rem_k": self.rem_k,
            "rem_v": self.rem_v,
            "rem_score": self.rem_score,
            "num_blocks": self.blocks.num_blocks,
            # float16 ranking scales the query by this bound: restoring it makes a replay rank exactly as before.
            "repr_absmax": self._repr_absmax,
            # decode_rank_every: the choice the next decoding steps reuse (plain ints: it is short, and the host
            # keeps the cache's books by them anyway), so that a replay chooses as the first run did.
            "reuse_blocks": [] if self._reused is None else self._reused.tolist(),
            "reuse_left": self._reuse_left,
            # reply_start_distance: a snapshot taken between a prompt and its reply (the chat's !!regen) replays the
            # reply's first step as such.
            "after_prompt": self._after_prompt,
            # decode_memory_distance_from: the length of the prompt the next decoding steps reply to.
            "prompt_tokens": self.prompt_tokens,
            # decode_memory_distance_steps: how many steps of the reply were decoded (a snapshot taken mid-reply).
            "reply_steps": self.reply_steps,
            # reply_pool_blocks: the pool the next decoding steps rank (plain ints, as the reuse: a chat's turn ends
            # its pool, so this is empty but in a snapshot taken mid-reply).
            "pool_blocks": [] if self._pool is None else self._pool.tolist(),
            "pool_end": self._pool_end,
            "pool_left": self._pool_left,
            # ranking_code_rank: the basis (never changed in place; kept by reference) and the blocks it was computed
            # from; the codes themselves are kept by count, as the blocks are (see `saved_snapshot` for sessions).
            "code_basis": self._code_basis if self._code_basis is not None else torch.empty(
                (self.repr_rows * self.shape.head_dim, 0), dtype=torch.float32, device=self.device),
            "code_blocks": self.config.ranking_code_blocks if self._code_basis is not None else 0,
            # prompt_end_blocks: what the reply's steps attend besides their choice, and the baseline of the next
            # prompt end's votes (never changed in place; kept by reference), so that a replay votes as before.
            "end_blocks": [] if self.end_blocks is None else self.end_blocks.tolist(),
            "end_near": [] if self.end_near is None else self.end_near.tolist(),
            "end_baseline": self.end_baseline,
        }

    def saved_snapshot(self) -> dict:
        """`snapshot` with the blocks' codes (float16: they are float16 values), for a saved session."""
        snap = self.snapshot()
        if self._code_basis is not None:
            snap["codes"] = self.codes.half()
        return snap

    def restore(self, snap: dict) -> None:
        if snap["num_blocks"] > self.blocks.num_blocks:
            raise ValueError("a snapshot can only roll the memory back, not forward")
        if self.shared_picks is not None:
            self.shared_picks.clear()
        self.num_seen = snap["num_seen"]
        live = snap["win_k"].shape[1]
        self.win_start, self.win_end = 0, 0
        if live + self.config.chunk_size > self.win_k.shape[1]:
            self.reset_window_buffers(live)
        self.win_k[:, :live] = snap["win_k"]
        self.win_v[:, :live] = snap["win_v"]
        self.win_score[:, :live] = snap["win_score"]
        self.win_end = live
        # Sinks and remainder are replaced, never mutated in place, so the snapshot's tensors are safe to share.
        for name in ("sink_k", "sink_v", "rem_k", "rem_v", "rem_score"):
            setattr(self, name, snap[name])
        self.blocks.truncate(snap["num_blocks"])  # and so the representatives (rows past it are overwritten)
        if "repr_absmax" in snap:  # sessions saved before it was part of the state recompute it (set_reprs)
            self._repr_absmax = snap["repr_absmax"].to(self.device)
        self._fewest_blocks = min(self._fewest_blocks, snap["num_blocks"])
        # Sessions saved before decode_rank_every had no reuse (every step ranked); one saved under a larger
        # setting reuses at most as long as this one's.
        self._reuse_left = min(snap.get("reuse_left", 0), self.config.decode_rank_every - 1)
        self._after_prompt = bool(snap.get("after_prompt", False))  # sessions saved before it: a reply had ended
        self.prompt_tokens = int(snap.get("prompt_tokens", 0))  # sessions saved before it: the next prompt sets it
        self.reply_steps = int(snap.get("reply_steps", 0))  # sessions saved before it: a reply's first step is next
        reused = snap.get("reuse_blocks", [])
        self._reused = BlockIds(torch.tensor(reused, dtype=torch.long, device=self.device)) if self._reuse_left else None
        # Sessions saved before reply_pool_blocks, or under a larger pool than this engine's setting, rank every block
        # at their next step; one saved under a larger reply_pool_every serves at most this one's steps.
        pool = snap.get("pool_blocks", [])
        usable = self.config.reply_pool_blocks is not None and 0 < len(pool) <= self.config.reply_pool_blocks
        self._pool_left = min(snap.get("pool_left", 0), self.config.reply_pool_every - 1) if usable else 0
        self._pool = torch.tensor(pool, dtype=torch.long, device=self.device) if self._pool_left else None
        self._pool_end = snap.get("pool_end", 0) if self._pool_left else 0
        self._pool_reprs = None
        # Sessions saved before prompt_end_blocks: nothing attended besides, no baseline. One saved under the setting
        # and resumed without it attends nothing besides.
        end = snap.get("end_blocks", [])
        self.end_blocks = torch.tensor(end, dtype=torch.long) if end and self.config.prompt_end_blocks else None
        near = snap.get("end_near", [])
        consensus = self.config.voted_memory_consensus is not None  # (its near set may be empty)
        placed = self.end_blocks is not None and (consensus or (near and self.config.voted_memory_places is not None))
        self.end_near = torch.tensor(near, dtype=torch.long) if placed else None
        baseline = snap.get("end_baseline")
        self.end_baseline = baseline.to(self.device) if baseline is not None else torch.empty(
            (self.shape.num_heads, 0, self.shape.head_dim), device=self.device)
        self._restore_codes(snap)

    def _restore_codes(self, snap: dict) -> None:
        """The codes after `restore`: kept (rows below the count are unchanged) when the snapshot's basis is the
        current one; taken from a saved session's; otherwise computed again from the summaries."""
        n, rank = snap["num_blocks"], self.config.ranking_code_rank
        basis = snap.get("code_basis")
        usable = (rank is not None and basis is not None and basis.shape[1] == rank + 1
                  and snap.get("code_blocks") == self.config.ranking_code_blocks and n >= self.config.ranking_code_blocks)
        if usable and basis is self._code_basis:
            return
        if not usable:
            self._code_basis = None
            self._extend_codes(0, n)
            return
        self._code_basis = basis.to(device=self.device, dtype=torch.float32)
        saved = snap.get("codes")
        if saved is None or tuple(saved.shape) != (n, rank):
            self._extend_codes(0, n)
            return
        self._codes = saved.to(device=self.device, dtype=torch.float32)

    def mark_blocks(self) -> int:
        """The fewest blocks this memory held since the last call (or its reset): blocks below that count are
        unchanged since then, so a copy of them made then is still good (`InfLLMMemory.write_unsaved` writes only
        the rest)."""
        fewest, self._fewest_blocks = self._fewest_blocks, self.blocks.num_blocks
        return fewest

    def load_blocks(self, disk, num_blocks: int, reprs: torch.Tensor, snap: dict) -> None:
        """Take blocks 0..num_blocks-1 from `disk` (read when retrieval asks), their representatives
        (the first num_blocks rows of `reprs`, (N >= num_blocks, repr_rows, D): a fresh copy, which may become the
        layer's buffer, the rows after them its room to grow), and the rest of the state from a snapshot (a saved
        session: `InfLLMMemory.map_layer`)."""
        self.reset()
        self.blocks.set_disk(disk, num_blocks)
        # A saved bound is the one the saved memory ranked with (restored below in any case).
        self.set_reprs(reprs, absmax=snap.get("repr_absmax"), owned=True, count=num_blocks)
        self.restore({k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in snap.items()})
        self._fewest_blocks = num_blocks

    def reset_window_buffers(self, live: int) -> None:
        capacity = 2 * (live + self.config.chunk_size)
        hq, hkv, d = self.shape.num_heads, self.shape.num_kv_heads, self.shape.head_dim
        self.win_k = torch.zeros((hkv, capacity, d), dtype=self.dtype, device=self.device)
        self.win_v = torch.zeros_like(self.win_k)
        self.win_score = torch.zeros((hq, capacity), dtype=torch.float32, device=self.device)

    def state_dict(self) -> dict:
        state = self.snapshot()
        state.update({f"blocks_{k}": v for k, v in self.blocks.state_dict().items()})
        state["reprs"] = self.reprs.clone(memory_format=torch.contiguous_format)  # rows, without the spare capacity
        return state

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        self.blocks.load_state_dict({k.removeprefix("blocks_"): v for k, v in state.items() if k.startswith("blocks_")})
        self.set_reprs(state["reprs"])
        snap = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
        self.restore(snap)

    # --- statistics -------------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return {
            "window": self.window_len,
            "sinks": self.sink_k.shape[1],
            "remainder": self.rem_k.shape[1],
            "blocks": self.blocks.num_blocks,
            "resident_blocks": self.blocks.resident_blocks(),
            "hits": self.blocks.hits,
            "misses": self.blocks.misses,
            "host_bytes": self.blocks.host_bytes() + self.reprs.numel() * self.reprs.element_size()
            + (0 if self.codes is None else self.codes.numel() * 4)
            + (0 if self._pool_reprs is None else self._pool_reprs.numel() * self._pool_reprs.element_size()),
            "device_bytes": self.blocks.device_bytes()
            + sum(t.numel() * t.element_size() for t in (self.win_k, self.win_v, self.win_score, self.sink_k, self.sink_v, self.rem_k, self.rem_v)),
        }
