"""Memory blocks of one layer in three tiers: device cache, host memory, disk (docs/METHOD.md section 1).

Blocks are append-only and immutable; each is one `BlockLayout` record (K and V of every KV head, 16-bit by
default, or int8 with per-head scales). Where a block is:

- **device cache**: a fixed number of slots (`device_cache_blocks`) holding the blocks retrieval asked for,
  in the compute dtype (int8 blocks are dequantised on the way in);
- **host memory** (`HostTier`): every block by default; with a budget (`host_cache_bytes`, split over the
  layers) at most that many bytes of them, the others on disk;
- **disk** (`DiskTier`): created when the host budget is first exceeded, in a temporary folder
  (`disk_dir` chooses its parent) or in a folder given by `set_disk`.

New blocks go to host memory. When it is full, the blocks its cache policy picks move to disk: written once,
if they are not there already, then dropped from RAM. A block retrieval asks for is read from wherever it is
(only the selected blocks are read) and, read from disk, is cached in host memory again. Both caches evict
by the configured `cache_policy` (lru, lru-s or fifo: `inf_llm.cache_policy`).

The policies and tiers change speed and memory use only: whatever is evicted, the gathered K/V are the stored
values. Blocks asked for in the current request are never evicted from the device cache by it.

On CUDA a retrieval costs the device no idle time where it can be avoided: the chosen ids come to the host
asynchronously (`BlockIds`), so the caller can enqueue more work (the chunk's local attention) before waiting
for them, and with `side_stream` (which `LayerMemory` asks for when it stages chunks) missing blocks are copied
host-to-device and unpacked on a side stream, which the main stream waits for (on the device, not the host)
only where the gather reads them. Events order a slot's new block after the last read of its old one.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from inf_llm.storage.block_ids import BlockIds
from inf_llm.storage.block_layout import BlockLayout
from inf_llm.storage.cache_policy import EvictionPolicy
from inf_llm.storage.disk_tier import DiskTier
from inf_llm.storage.host_tier import HostTier
from inf_llm.storage.rows import put_rows
from inf_llm.storage.spill import SpillDirectory
from inf_llm.storage.tier_settings import TierSettings


class BlockStore:
    def __init__(
        self,
        num_kv_heads: int,
        block_size: int,
        head_dim: int,
        *,
        storage_dtype: torch.dtype,
        compute_dtype: torch.dtype,
        device: torch.device,
        cache_blocks: int,
        policy: str = "lru",
        score_decay: float | None = None,
        tiers: TierSettings | None = None,
        side_stream: bool = False,
    ):
        if side_stream and device.type != "cuda":
            raise ValueError(f"a side stream for block copies needs a CUDA device, not {device}")
        self.num_kv_heads, self.block_size, self.head_dim = num_kv_heads, block_size, head_dim
        self.storage_dtype, self.compute_dtype = storage_dtype, compute_dtype
        self.device = device
        self.policy, self.score_decay = policy, score_decay
        self.pin = device.type == "cuda"
        self.layout = BlockLayout(num_kv_heads, block_size, head_dim, storage_dtype)
        tiers = tiers or TierSettings()
        self.tiers = tiers
        # The host tier's rows are pageable: every load copies its records into a pinned buffer first
        # (`_read_records`), which is what the host-to-device copy reads. Pinning the rows themselves bought
        # nothing and cost cudaHostAlloc on each growth of the slab (measured on an H200: 3.6 of 6.4 s of wall time
        # reading 8K tokens into a 32K memory at Mistral-7B's shapes, BENCHMARKS.md).
        self.host = HostTier(self.layout, budget_bytes=tiers.host_budget_bytes, policy=policy,
                             score_decay=score_decay)
        self.disk: DiskTier | None = None
        self._spill: SpillDirectory | None = None  # held so that the spill folder lives as long as this store
        self.num_blocks = 0
        # Device cache: slot -> block id (-1 = free), block id -> slot, and the policy over cached block ids.
        self.cache_blocks = cache_blocks
        # Head-major, (Hkv, slots, B, D): a head's chosen blocks are one index_select along its slots, written straight
        # into the caller's buffer of global keys (`gather`), with no transposing copy on the way.
        self.dev_k = torch.zeros((num_kv_heads, cache_blocks, block_size, head_dim), dtype=compute_dtype, device=device)
        self.dev_v = torch.zeros_like(self.dev_k)
        self.slot_block = [-1] * cache_blocks
        self.block_slot: dict[int, int] = {}
        self.cache = EvictionPolicy(policy, score_decay)
        # side_stream: loads run on a CUDA side stream; `_slots_read` is recorded on the main stream after each
        # gather's reads. Without it every copy is ordered on the current stream.
        self._copy_stream = torch.cuda.Stream(device) if side_stream else None
        self._slots_read = None
        self.hits = 0
        self.misses = 0
        self.disk_reads = 0  # blocks read from disk
        self.disk_writes = 0  # blocks written to disk
        self._staging = self.layout.empty(0)  # packed records of CPU appends, before they are stored

    # --- appending and reading back ---------------------------------------------------------------------------

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store n new blocks. k, v: (n, Hkv, block_size, D) on any device."""
        if k.device.type != "cpu":
            self._append_records(self.layout.pack(k, v).cpu())  # packed (quantised) where k, v are
            return
        n = k.shape[0]
        if self._staging.shape[0] < n:
            # A reused buffer: a fresh one per block would cost an allocation and its page faults every time.
            self._staging = self.layout.empty(max(n, 2 * self._staging.shape[0]))
        self._append_records(self.layout.pack(k, v, out=self._staging[:n]))

    def _append_records(self, records: torch.Tensor) -> None:
        n = records.shape[0]
        ids = list(range(self.num_blocks, self.num_blocks + n))
        keep = n if self.host.max_blocks is None else min(n, self.host.max_blocks)
        # Each step leaves the store whole if the next one fails: room is made by moving blocks to disk (they
        # leave RAM only once written), then new blocks beyond the whole budget go straight to disk.
        self._make_room(keep)
        if keep < n:
            self._write_to_disk(ids[: n - keep], records[: n - keep])
        self.host.put(ids[n - keep :], records[n - keep :])
        self.num_blocks += n

    def _disk_tier(self) -> DiskTier:
        if self.disk is None:
            self._spill = self.tiers.spill or SpillDirectory()
            # No fsync: a spill folder is removed with its process and can never be reopened after a crash.
            self.disk = DiskTier(self._spill.folder(self.tiers.name), self.layout, durable=False)
        return self.disk

    def _write_to_disk(self, block_ids: list[int], records: torch.Tensor) -> None:
        self._disk_tier().write(block_ids, records)
        self.disk_writes += len(block_ids)

    def _make_room(self, incoming: int) -> int:
        """Move host blocks to disk until `incoming` more fit (at most the budget); returns how many fit."""
        excess = self.host.excess(incoming)
        if excess:
            victims = self.host.victims(excess)
            unwritten = [b for b in victims if self.disk is None or not self.disk.contains(b)]
            if unwritten:
                # Written (and committed) before they leave RAM: a failed write loses nothing.
                self._write_to_disk(unwritten, self.host.records(unwritten))
            self.host.drop(victims)
            return incoming - (excess - len(victims))
        return incoming

    def _read_records(self, block_ids: list[int], *, promote: bool) -> torch.Tensor:
        """Records (n, record_bytes) uint8 on the CPU, from RAM or disk (read only these blocks).

        promote: cache the blocks read from disk in host memory (by the host policy), as retrieval does.
        """
        out = self.layout.empty(len(block_ids), pin_memory=self.pin)
        host = self.host
        in_host, from_disk = [], []
        for i, block_id in enumerate(block_ids):
            (in_host if block_id in host else from_disk).append(i)
        if not from_disk:
            host.records(block_ids, out=out)  # one gather: a shortlist's misses are tens of blocks a step
        elif len(from_disk) == len(block_ids):
            read = out
            self.disk.read_many_into(block_ids, read)
        else:
            # Two gathers, scattered into their rows: at a million tokens a decoding step reads thousands of blocks
            # from both tiers, where a copy per block cost more than the copying.
            put_rows(out, in_host, host.records([block_ids[i] for i in in_host]))
            read = self.layout.empty(len(from_disk))
            self.disk.read_many_into([block_ids[i] for i in from_disk], read)
            put_rows(out, from_disk, read)
        self.disk_reads += len(from_disk)
        if promote and from_disk and self.host.max_blocks != 0:
            fits = self._make_room(len(from_disk))
            skip = len(from_disk) - fits  # `read` holds the blocks from disk, in the order of `from_disk`
            self.host.put([block_ids[i] for i in from_disk[skip:]], read[skip:])
        return out

    def host_block(self, block_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored K/V of one block, (Hkv, block_size, D) each: in the storage dtype, or dequantised to
        float32 for int8 storage. Copies, from whichever tier holds the block; no cache state changes."""
        self._check_ids([block_id])
        records = self._read_records([block_id], promote=False)
        if self.layout.quantized:
            k, v = self.layout.values(records, torch.float32)
        else:
            rec = self.layout.unpack(records)
            k, v = rec.k, rec.v
        return k[0], v[0]

    def _check_ids(self, block_ids: list[int]) -> None:
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise IndexError(f"blocks {bad} do not exist ({self.num_blocks} blocks)")

    def truncate(self, num_blocks: int) -> None:
        """Forget blocks num_blocks.. (rollback) in every tier; their device slots become free."""
        if not 0 <= num_blocks <= self.num_blocks:
            raise ValueError(f"cannot truncate {self.num_blocks} blocks to {num_blocks}")
        for block_id, slot in list(self.block_slot.items()):
            if block_id >= num_blocks:
                del self.block_slot[block_id]
                self.slot_block[slot] = -1
                self.cache.discard(block_id)
        self.host.truncate(num_blocks)
        if self.disk is not None:
            self.disk.truncate(num_blocks)
        self.num_blocks = num_blocks

    # --- accounting -------------------------------------------------------------------------------------------

    def host_bytes(self) -> int:
        """Bytes of block records held in RAM (bounded by the host budget)."""
        return self.host.nbytes()

    def disk_bytes(self) -> int:
        return 0 if self.disk is None else self.disk.nbytes()

    def device_bytes(self) -> int:
        return 2 * self.dev_k.numel() * self.dev_k.element_size()

    def resident_blocks(self) -> int:
        """Blocks in the device cache."""
        return len(self.block_slot)

    def host_blocks(self) -> int:
        return len(self.host)

    def disk_blocks(self) -> int:
        return 0 if self.disk is None else len(self.disk)

    # --- device cache -----------------------------------------------------------------------------------------

    def fetch_slots(self, block_ids: list[int]) -> list[int]:
        """Make the given (distinct) blocks resident on the device and return their slots (same order)."""
        block_slot = self.block_slot
        slots = [block_slot.get(b, -1) for b in block_ids]
        if -1 not in slots:
            # Every block resident, the usual decoding step: only the policy's books change. (Resident blocks
            # exist: truncation frees their slots.)
            self.cache.start_request()
            self.cache.use_all(block_ids)
            self.hits += len(block_ids)
            return slots
        self._check_ids(block_ids)
        wanted = set(block_ids)
        if len(wanted) > self.cache_blocks:
            # Refused before any slot changes hands: a half-done request would leave slots naming unloaded blocks.
            raise RuntimeError(f"{len(wanted)} blocks requested at once but the device cache holds {self.cache_blocks}")
        self.cache.start_request()
        # The missing blocks take free slots (lowest first), then the policy's victims. Admitting them all, then
        # using the request's blocks in order, leaves the policy's books as admitting and using them one by one.
        loads = list(dict.fromkeys(b for b, slot in zip(block_ids, slots) if slot == -1))
        spare = [s for s, b in enumerate(self.slot_block) if b == -1][: len(loads)]
        for victim in self.cache.victims(len(loads) - len(spare), wanted):
            self.cache.discard(victim)
            spare.append(self.block_slot.pop(victim))
        assert len(spare) == len(loads), "the request fits in the cache (checked above)"
        for block_id, slot in zip(loads, spare):
            self.slot_block[slot] = block_id
            self.block_slot[block_id] = slot
            self.cache.admit(block_id)
        self.cache.use_all(block_ids)
        self.misses += len(loads)
        self.hits += len(block_ids) - len(loads)
        slots = [block_slot[b] for b in block_ids]
        if loads:
            try:
                self._load(loads, spare)  # the slots just given to them, in the same order
            except BaseException:
                # Slots must never name blocks whose data did not arrive (a disk error, an interrupt).
                for block_id in loads:
                    self.slot_block[self.block_slot.pop(block_id)] = -1
                    self.cache.discard(block_id)
                raise
        return slots

    def _load(self, block_ids: list[int], slots: list[int]) -> None:
        """Copy blocks into device slots: one host-to-device copy of their records, unpacked on the device."""
        self.host.start_request()
        for block_id in block_ids:
            if block_id in self.host:
                self.host.use(block_id)
        records = self._read_records(block_ids, promote=True)
        if self._copy_stream is None:
            self._unpack_into(records, slots)
            return
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            if self._slots_read is not None:
                self._copy_stream.wait_event(self._slots_read)  # the slots' old blocks have been gathered
            self._unpack_into(records, slots)
            loaded = torch.cuda.Event()
            loaded.record(self._copy_stream)
        # Device-side: main-stream work enqueued before this point (the local attention) overlaps the copy; what
        # is enqueued next (the gather) waits for it.
        main.wait_event(loaded)

    def _unpack_into(self, records: torch.Tensor, slots: list[int]) -> None:
        # The pinned buffer is fresh per call and never written again, so the copy may run asynchronously.
        k, v = self.layout.values(records.to(self.device, non_blocking=self.pin), self.compute_dtype)
        index = self._index(slots)
        self.dev_k.index_copy_(1, index, k.transpose(0, 1))  # (n, Hkv, B, D) into their slots
        self.dev_v.index_copy_(1, index, v.transpose(0, 1))

    def _index(self, values: list) -> torch.Tensor:
        """Slot numbers as an index tensor on the device. On CUDA through pinned memory, asynchronously: a copy
        from pageable memory would make the host wait for the stream each time (several per layer and chunk)."""
        index = torch.tensor(values, dtype=torch.long)
        if self.device.type != "cuda":
            return index.to(self.device)
        return index.pin_memory().to(self.device, non_blocking=True)

    def gather(self, block_ids: torch.Tensor | BlockIds, out: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the selected blocks, concatenated along time.

        block_ids: (n,) shared by all KV heads, or (Hkv, n) per KV head; a tensor, or `BlockIds` already on
        their way to the host.
        out: where to write them, two (Hkv, n * block_size, D) tensors in the compute dtype whose rows of each
        head are contiguous (a slice along time of a contiguous buffer); by default new tensors.
        Returns k, v: (Hkv, n * block_size, D) in the compute dtype on the device (`out` when given).

        Each head's blocks are one index_select from its slots into the output: on a CPU decode step of the
        embedded model (64 blocks of 16 tokens) the gather used to be followed by a transposing copy and a
        concatenation, three passes over the retrieved keys where one suffices.
        """
        if isinstance(block_ids, torch.Tensor):
            block_ids = BlockIds(block_ids)
        ids = block_ids.tolist()
        per_head = block_ids.dim == 2
        slot_list = self._slots_of(ids, per_head)
        n = len(ids[0]) if per_head else len(ids)
        hkv, size, d = self.num_kv_heads, self.block_size, self.head_dim
        if out is None:
            out = tuple(torch.empty((hkv, n * size, d), dtype=self.compute_dtype, device=self.device) for _ in range(2))
        out_k, out_v = out
        if out_k.shape != (hkv, n * size, d) or out_v.shape != out_k.shape:
            raise ValueError(f"gather of {n} blocks needs outputs of shape {(hkv, n * size, d)}, got "
                             f"{tuple(out_k.shape)} and {tuple(out_v.shape)}")
        slots = self._index(slot_list)
        for h in range(hkv):
            index = slots[h] if per_head else slots
            # index_select, not fancy indexing: several times faster on CPU for the same copy.
            torch.index_select(self.dev_k[h], 0, index, out=out_k[h].view(n, size, d))
            torch.index_select(self.dev_v[h], 0, index, out=out_v[h].view(n, size, d))
        self._record_slots_read()
        return out_k, out_v

    def score_blocks(self, block_ids: list[int], score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Scores of the given distinct blocks computed on their keys where they lie, (n, ...).

        score: keys (Hkv, S, block_size, D) in the compute dtype -> (S, ...), one score per block. It is applied once
        to the device cache's first S slots, through the highest slot of the given blocks (no copy of the blocks'
        keys: on a CPU decode step that copy cost more than the scoring), and the given blocks' values are read
        from their slots; the other slots' values are discarded.

        For a second stage of retrieval, which scores candidate blocks by the exact logits over their keys: the
        blocks become resident (they count as used by the cache policy), so the ones then chosen are gathered
        from their slots without another load. More blocks than the cache holds (the prompt end's vote over a
        long shortlist, once per prompt) are scored a cache's worth at a time; only the last piece stays resident.
        """
        if len(block_ids) > self.cache_blocks:
            step = self.cache_blocks
            pieces = (block_ids[i : i + step] for i in range(0, len(block_ids), step))
            return torch.cat([self.score_blocks(piece, score) for piece in pieces])
        listed = self._slots_of(block_ids, per_head=False)
        # Only the slots up to the highest one asked for are scored: free slots are taken lowest first, so while
        # the memory has fewer blocks than the cache holds (a conversation under 8K tokens with the embedded
        # model's preset) the rest of the cache is empty and scoring it doubled the second stage's time.
        end = max(listed, default=-1) + 1
        per_slot = score(self.dev_k[:, :end])
        self._record_slots_read()
        return per_slot.index_select(0, self._index(listed))

    def in_ram(self, block_ids: list[int]) -> list[bool]:
        """Whether each block's K/V is in memory, in the device cache or the host tier (not only on disk)."""
        slots, host = self.block_slot, self.host
        return [b in slots or b in host for b in block_ids]

    def _slots_of(self, ids: list, per_head: bool) -> list:
        """Device slots of block ids (n,) or per KV head (Hkv, n), loading the missing blocks."""
        if not per_head and all(a < b for a, b in zip(ids, ids[1:])):
            return self.fetch_slots(ids)  # distinct and ascending already, as retrieval chooses them
        flat = sorted(set(b for row in ids for b in row)) if per_head else sorted(set(ids))
        slot_of = dict(zip(flat, self.fetch_slots(flat)))
        return [[slot_of[b] for b in row] for row in ids] if per_head else [slot_of[b] for b in ids]

    def _record_slots_read(self) -> None:
        # A slot's next block is copied in on the side stream only after these reads (see `_load`).
        if self._copy_stream is not None:
            self._slots_read = torch.cuda.Event()
            self._slots_read.record(torch.cuda.current_stream(self.device))

    # --- persistence ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every block's stored fields: k, v (n, Hkv, B, D) in the storage dtype (+ k_scale, v_scale (n, Hkv)
        for int8). Reads blocks on disk without caching them."""
        return self.layout.fields_of(self._read_records(list(range(self.num_blocks)), promote=False))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the blocks by saved ones: stored fields are taken exactly; float K/V of another storage
        dtype are cast (or quantised for int8 storage)."""
        self.truncate(0)
        if state["k"].shape[0] == 0:
            return
        if state["k"].dtype == self.storage_dtype:
            records = self.layout.pack_stored({name: t.cpu() for name, t in state.items()})
        elif state["k"].is_floating_point():
            records = self.layout.pack(state["k"].cpu(), state["v"].cpu())
        else:
            raise ValueError(f"saved blocks of dtype {state['k'].dtype} cannot be stored as {self.storage_dtype}")
        self._append_records(records)

    def flush(self) -> DiskTier:
        """Write every block that is only in RAM to the disk tier (each block is written once); return it."""
        disk = self._disk_tier()
        unwritten = [b for b in self.host.block_ids() if not disk.contains(b)]
        if unwritten:
            self._write_to_disk(unwritten, self.host.records(unwritten))
        return disk

    def copy_to(self, disk: DiskTier, batch: int = 256) -> None:
        """Write every block, from whichever tier holds it, into `disk` (which must hold none of them); reads
        from this store's own disk do not change what is cached in RAM."""
        if disk.layout != self.layout:
            raise ValueError(f"{str(disk.path)!r} has layout {disk.layout.to_dict()}, not {self.layout.to_dict()}")
        for start in range(0, self.num_blocks, batch):
            ids = list(range(start, min(start + batch, self.num_blocks)))
            disk.write(ids, self._read_records(ids, promote=False))

    def set_disk(self, disk: DiskTier | None, num_blocks: int | None = None) -> None:
        """The one way to give this store its disk tier, or to take it away.

        - `set_disk(disk)`: `disk` holds exactly this store's blocks (`copy_to`, or a saved folder the store used
          before); blocks leaving RAM are then already there, and rollbacks are recorded there. What is cached in
          RAM stays; a spill folder is let go (it is removed once no store holds it).
        - `set_disk(disk, num_blocks)`: this store holds exactly blocks 0..num_blocks-1 of `disk` (e.g. a saved
          folder), without reading them: they are read when retrieval asks. The caches are emptied, and later
          blocks in `disk` are dropped from it.
        - `set_disk(None)`: forget the disk tier without writing to it (before the store is reset: blocks held
          only there are no longer readable, and the reset must not record forgetting them in the tier).
        """
        if disk is None:
            self.disk = None
            return
        if num_blocks is None:
            if disk.layout != self.layout or not disk.has_prefix(self.num_blocks) or len(disk) != self.num_blocks:
                raise ValueError(f"{str(disk.path)!r} does not hold exactly blocks 0..{self.num_blocks - 1}")
            self.disk, self._spill = disk, None  # a spill folder is removed once no store holds it
            return
        if disk.layout != self.layout:
            raise ValueError(f"blocks in {str(disk.path)!r} have layout {disk.layout.to_dict()}, this store needs "
                             f"{self.layout.to_dict()}")
        if not disk.has_prefix(num_blocks):
            raise ValueError(f"{str(disk.path)!r} does not hold all of blocks 0..{num_blocks - 1}")
        for block_id in list(self.block_slot):
            self.cache.discard(block_id)
        self.block_slot.clear()
        self.slot_block = [-1] * self.cache_blocks
        self.host.truncate(0)
        disk.truncate(num_blocks)
        self.disk, self.num_blocks = disk, num_blocks

    @property
    def disk_path(self) -> os.PathLike[str] | None:
        return None if self.disk is None else self.disk.path
