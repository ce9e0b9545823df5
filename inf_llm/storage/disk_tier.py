"""The disk tier of the block store: memory blocks in memory-mapped files, for histories larger than RAM.

One layer's store is one folder:

    layout.json   the `BlockLayout` of every record (written once: temporary file, then `os.replace`)
    blocks.data   records, one per slot, `record_bytes` each; append-only: a record is never rewritten
    blocks.index  an append-only log of fixed-size entries, each ending in a CRC32 of itself:
                  PUT (block, slot, CRC32 of the record): the block's record is at that slot;
                  TRUNCATE (n): blocks n.. are gone

Blocks are immutable once created, so a block is written at most once; the index maps block ids to slots.

Crash safety. A write puts the records into blocks.data first and only then appends their PUT entries to the
index, so an index entry never points at data that was not written: a process that dies between the two
leaves records that no entry names (ignored, overwritten later). Opening replays the index up to its first
incomplete or corrupt entry and cuts it there; an append that fails in a running process (a full disk) is cut
before the next one, so a partial entry never hides the entries written after it. With `durable=True` both
files are fsynced at each step, which extends this to power loss; a throw-away spill folder (`SpillDirectory`)
skips the fsyncs, since nothing can reopen it after its process is gone, and a session's folder fsyncs once per
save (`sync`).

Saved states. The index is a log, so the state after its first `entries` entries is the state at that moment.
A session records that count at each save and reopens the folder at it (`open(..., entries=n)`): what was
written after the save (a rollback, blocks of an unsaved turn) is ignored, and cut from the index at the next
write. For this to hold, slots named by the saved state are never written again: `protect` marks every slot in
use so far as kept, where otherwise a rollback lets later blocks reuse the slots of the blocks it forgot. A save
protects what it wrote, and reopening at a saved state protects that state's slots (a resumed chat that rolls
back to its start and writes new blocks must not overwrite the save it would otherwise fall back to).

Damage. Each record's CRC32 is kept in its PUT entry and checked when the record is read, so a damaged block
file gives an error naming the block instead of silently wrong keys and values.

Mapping. Reads go through one `mmap` of blocks.data viewed as a uint8 tensor (`torch.frombuffer`), so retrieval
reads only the pages of the selected blocks. We use Python's `mmap` rather than `numpy.memmap` (numpy has no
bfloat16) or `torch.from_file` (it cannot release pages): after a block is copied out, `madvise(MADV_DONTNEED)`
drops its pages from this process's mapping, so mapped pages do not accumulate in the process's resident memory
(they stay in the OS page cache, which the kernel reclaims as needed). Writes use `os.pwrite`, which the shared
mapping sees at once (one page cache).

Opening an existing folder (`DiskTier.open`) maps it and reads only the small index: a saved store can be
reused without reading its blocks, and `contains` says which blocks are already on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
import weakref
import zlib
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from inf_llm.storage.block_layout import BlockLayout
from inf_llm.storage.files import fsync_path, replace_file, write_all, write_text
from inf_llm.storage.row_layout import RowLayout, layout_from_dict

logger = logging.getLogger(__name__)

LAYOUT_FILE, DATA_FILE, INDEX_FILE = "layout.json", "blocks.data", "blocks.index"
FORMAT = "inf-llm-blocks"
FORMAT_VERSION = 2
_ENTRY = struct.Struct("<4sIqqI")  # magic, kind, a, b, c (PUT: block, slot, record CRC32; TRUNCATE: n, 0, 0)
_CRC = struct.Struct("<I")
ENTRY_BYTES = _ENTRY.size + _CRC.size
_MAGIC = b"IBLK"
_PUT, _TRUNCATE = 1, 2
# The same entry as a numpy record (packed, little-endian): PUT's block, slot and record CRC32, then its own CRC32.
_ENTRY_DTYPE = np.dtype([("magic", "S4"), ("kind", "<u4"), ("block", "<i8"), ("slot", "<i8"), ("crc", "<u4"),
                         ("entry_crc", "<u4")])
assert _ENTRY_DTYPE.itemsize == ENTRY_BYTES
_MIN_CAPACITY = 64  # records; the data file grows geometrically from here, so remapping is rare


class DiskTierError(OSError):
    """A block folder could not be created, opened or written; the message names the folder."""


def _entry(kind: int, a: int, b: int, c: int = 0) -> bytes:
    body = _ENTRY.pack(_MAGIC, kind, a, b, c)
    return body + _CRC.pack(zlib.crc32(body))


class DiskTier:
    """The blocks of one store in `path`; created there when `layout` is given and the folder holds none."""

    def __init__(self, path: str | os.PathLike[str], layout: BlockLayout | RowLayout | None = None, *,
                 durable: bool = True, entries: int | None = None, index_sha256: str | None = None):
        self.path, self.durable = Path(path), durable
        # layout.json is written once; a durable tier fsyncs it when it creates it, any other at its first sync().
        self._layout_synced = durable
        self.layout = self._open_layout(layout)
        self.record_bytes = self.layout.record_bytes
        # Opening an existing folder creates nothing in it: a folder that lacks a file is refused as it is.
        create = os.O_CREAT if layout is not None else 0
        try:
            self._data_fd = os.open(self.path / DATA_FILE, os.O_RDWR | create, 0o644)
            try:
                self._index_fd = os.open(self.path / INDEX_FILE, os.O_RDWR | create | os.O_APPEND, 0o644)
            except OSError:
                os.close(self._data_fd)
                raise
        except OSError as error:
            raise DiskTierError(f"cannot open the block files in {str(self.path)!r}: {error}") from error
        self._closer = weakref.finalize(self, _close_fds, self._data_fd, self._index_fd)
        self._slots = array("q")  # block id -> slot, -1 when the block is not on disk
        self._crcs = array("L")  # block id -> CRC32 of its record
        self._count = 0
        self._next_slot = 0
        self._kept_slots = 0  # slots below this are never written again (`protect`)
        self._entries = 0  # index entries that make the current state
        self._cut_at: int | None = None  # index bytes to keep at the next write (state reopened at a saved point)
        self._replay(entries, index_sha256)
        if entries is not None:
            # Reopened at a saved state: its slots stay readable until the next save commits, whatever this
            # process forgets (a rollback) and writes in the meantime.
            self.protect()
        self._map: mmap.mmap | None = None
        self._map_tensor: torch.Tensor | None = None
        self._capacity = 0  # records covered by the mapping
        self._remap(os.fstat(self._data_fd).st_size // self.record_bytes)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, durable: bool = True, entries: int | None = None,
             index_sha256: str | None = None) -> DiskTier:
        """Open an existing block folder (its layout is read from it).

        entries: the state after that many index entries (a saved state); DiskTierError if the index holds
        fewer. Later entries are ignored, and removed from the index only at the next write.
        index_sha256: with entries, the digest those entries must have (`index_sha256` at the save);
        DiskTierError if they differ. Entries that match it are the ones written, so their own checksums need no
        check, and a log of distinct PUT entries (a read that was never rolled back) is replayed in a few array
        operations: a million-token session's 2M entries took seconds one by one.
        """
        return cls(path, None, durable=durable, entries=entries, index_sha256=index_sha256)

    # --- opening ----------------------------------------------------------------------------------------------

    def _open_layout(self, layout: BlockLayout | None) -> BlockLayout:
        meta = self.path / LAYOUT_FILE
        if meta.is_file():
            try:
                data = json.loads(meta.read_text(encoding="utf-8"))
                if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
                    raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}, expected "
                                     f"{FORMAT!r} version {FORMAT_VERSION}")
                stored = layout_from_dict(data["layout"])
            except (OSError, ValueError, KeyError, AttributeError) as error:
                raise DiskTierError(f"{str(meta)!r} is not a readable block layout: {error}") from error
            if layout is not None and layout != stored:
                raise DiskTierError(f"{str(self.path)!r} holds blocks of layout {stored.to_dict()}, not "
                                    f"{layout.to_dict()}; use another folder")
            return stored
        if layout is None:
            raise DiskTierError(f"{str(self.path)!r} holds no memory blocks ({LAYOUT_FILE} is missing)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "layout": layout.to_dict()}, indent=1)
            replace_file(meta, lambda fd: write_text(fd, text), prefix=f".{LAYOUT_FILE}.", fsync=self.durable)
            if self.durable:
                fsync_path(self.path)
        except OSError as error:
            raise DiskTierError(f"cannot create a block folder at {str(self.path)!r}: {error}") from error
        return layout

    def _replay(self, entries: int | None, index_sha256: str | None = None) -> None:
        """Rebuild block -> slot from the index, up to its first incomplete or corrupt entry (cut there), or
        up to `entries` entries (whose digest must be `index_sha256` when given)."""
        size = os.fstat(self._index_fd).st_size
        log = os.pread(self._index_fd, size, 0) if size else b""
        data_records = os.fstat(self._data_fd).st_size // self.record_bytes
        if index_sha256 is not None and entries is None:
            raise ValueError("index_sha256 names the digest of a saved state: give its entries too")
        if index_sha256 is not None and len(log) >= entries * ENTRY_BYTES:  # (fewer: refused by the loop below)
            saved = log[: entries * ENTRY_BYTES]
            if hashlib.sha256(saved).hexdigest() != index_sha256:
                raise DiskTierError(f"{self.path / INDEX_FILE} is not the index this session saved (another layer's "
                                    "or session's blocks)")
            if self._replay_distinct_puts(saved, data_records):
                self._entries = entries
                if len(saved) < len(log):
                    self._cut_at = len(saved)
                self._reclaim()
                return
        valid = 0
        for start in range(0, len(log) - ENTRY_BYTES + 1, ENTRY_BYTES):
            if entries is not None and start // ENTRY_BYTES == entries:
                break
            entry = log[start : start + ENTRY_BYTES]
            body, (crc,) = entry[: _ENTRY.size], _CRC.unpack(entry[_ENTRY.size :])
            magic, kind, a, b, c = _ENTRY.unpack(body)
            if magic != _MAGIC or crc != zlib.crc32(body) or a < 0:
                break
            if kind == _PUT and 0 <= b < data_records:  # a slot past the data's end was never written
                self._set(a, b, c)
            elif kind == _TRUNCATE:
                self._drop_from(a)
            elif kind != _PUT:
                break
            valid = start + ENTRY_BYTES
        self._entries = valid // ENTRY_BYTES
        if entries is not None and self._entries < entries:
            raise DiskTierError(f"{str(self.path / INDEX_FILE)!r} holds {self._entries} complete entries, the saved "
                                f"state needs {entries}: the folder is damaged or not the one saved")
        if valid < len(log):
            if entries is None:
                logger.warning("%s: ignoring %d bytes after the last complete index entry (an interrupted write)",
                               self.path / INDEX_FILE, len(log) - valid)
            self._cut_at = valid  # cut when this store first writes: opening changes nothing on disk
        self._reclaim()

    def _replay_distinct_puts(self, log: bytes, data_records: int) -> bool:
        """Replay a verified log in array operations when it is only PUT entries of distinct blocks whose slots
        exist (otherwise the order of entries matters, and False leaves the state untouched for the loop)."""
        entries = np.frombuffer(log, dtype=_ENTRY_DTYPE)
        blocks, slots = entries["block"], entries["slot"]
        if len(entries) and (np.any(entries["magic"] != _MAGIC) or np.any(entries["kind"] != _PUT)
                             or blocks.min() < 0 or slots.min() < 0 or slots.max() >= data_records
                             or len(np.unique(blocks)) != len(blocks)):
            return False
        n = int(blocks.max()) + 1 if len(entries) else 0
        block_slot = np.full(n, -1, dtype=np.int64)
        block_slot[blocks] = slots
        crcs = np.zeros(n, dtype=np.uint64 if self._crcs.itemsize == 8 else np.uint32)
        crcs[blocks] = entries["crc"]
        self._slots, self._crcs = array("q", block_slot.tobytes()), array("L", crcs.tobytes())
        self._count = len(entries)
        return True

    def _set(self, block_id: int, slot: int, crc: int) -> None:
        if block_id >= len(self._slots):
            self._slots.extend([-1] * (block_id + 1 - len(self._slots)))
            self._crcs.extend([0] * (block_id + 1 - len(self._crcs)))
        self._count += self._slots[block_id] < 0
        self._slots[block_id] = slot
        self._crcs[block_id] = crc

    def _drop_from(self, n: int) -> None:
        if n < len(self._slots):
            self._count -= sum(1 for s in self._slots[n:] if s >= 0)
            del self._slots[n:]
            del self._crcs[n:]

    def _reclaim(self) -> None:
        """Write new records after the last slot a live block uses: slots past it hold only forgotten blocks.

        Safe against crashes: such a slot is overwritten only after the TRUNCATE entry that forgot its block
        was committed, so replaying the index never pairs a live block with data written for another. Slots a
        saved state names (`protect`) are never reused.
        """
        self._next_slot = max(max(self._slots, default=-1) + 1, self._kept_slots)

    def protect(self) -> None:
        """Never write again any slot used so far: the current state stays readable at `entries` (a save)."""
        self._kept_slots = max(self._kept_slots, self._next_slot)

    @property
    def entries(self) -> int:
        """Index entries making the current state; `open(path, entries=...)` returns to it."""
        return self._entries

    def index_sha256(self) -> str:
        """A digest of the index entries making the current state (each PUT carries its record's CRC32): the
        same at a save and when the folder is reopened at that save, and another for another layer's or
        session's blocks."""
        try:
            return hashlib.sha256(os.pread(self._index_fd, self._entries * ENTRY_BYTES, 0)).hexdigest()
        except OSError as error:
            raise DiskTierError(f"cannot read the index in {str(self.path)!r}: {error}") from error

    def sync(self) -> None:
        """Make everything written so far durable (the layout and both files fsynced)."""
        try:
            os.fsync(self._data_fd)
            os.fsync(self._index_fd)
            if not self._layout_synced:
                fsync_path(self.path / LAYOUT_FILE)
                self._layout_synced = True
            fsync_path(self.path)
        except OSError as error:
            raise DiskTierError(f"cannot sync the blocks in {str(self.path)!r}: {error}") from error

    def _remap(self, capacity: int) -> None:
        """Map the first `capacity` records of the data file (which must be at least that long)."""
        if capacity <= self._capacity:
            return
        # Views handed out earlier keep the old mapping alive until they are dropped.
        self._map = mmap.mmap(self._data_fd, capacity * self.record_bytes, access=mmap.ACCESS_WRITE)
        self._map_tensor = torch.frombuffer(self._map, dtype=torch.uint8).view(capacity, self.record_bytes)
        self._capacity = capacity

    # --- queries ----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def contains(self, block_id: int) -> bool:
        return 0 <= block_id < len(self._slots) and self._slots[block_id] >= 0

    def block_ids(self) -> list[int]:
        return [b for b, slot in enumerate(self._slots) if slot >= 0]

    def has_prefix(self, n: int) -> bool:
        """Whether blocks 0..n-1 are all on disk."""
        if n > len(self._slots):
            return False
        return n == 0 or int(np.frombuffer(self._slots, dtype=np.int64, count=n).min()) >= 0

    def nbytes(self) -> int:
        """Bytes of the blocks on disk (records that no entry names are not counted)."""
        return self._count * self.record_bytes

    # --- reading ----------------------------------------------------------------------------------------------

    def _slot(self, block_id: int) -> int:
        if not self.contains(block_id):
            raise KeyError(f"block {block_id} is not on disk in {str(self.path)!r}")
        return self._slots[block_id]

    def _check_records(self, block_ids: Sequence[int], records: torch.Tensor) -> None:
        """Each row of `records` (n, record_bytes) uint8 against the CRC32 of the block it was read for."""
        view = memoryview(records.numpy()).cast("B")
        size, crcs = self.record_bytes, self._crcs
        for i, block_id in enumerate(block_ids):
            if zlib.crc32(view[i * size : (i + 1) * size]) != crcs[block_id]:
                raise DiskTierError(f"block {block_id} in {str(self.path)!r} is damaged (its checksum does not match)")

    def read(self, block_id: int) -> torch.Tensor:
        """The record of a block, (record_bytes,) uint8: a view of the mapping (read-only by contract)."""
        record = self._map_tensor[self._slot(block_id)]
        self._check_records([block_id], record[None])
        return record

    def read_prefix(self, n: int, spare: int = 0) -> torch.Tensor:
        """A copy of the records of blocks 0..n-1, (n + spare, record_bytes) uint8, each checked against its CRC32.

        One gather from the mapping instead of n reads: resuming a million-token session reads 65,536 summary
        rows per layer, which one `read` each takes seconds over 30 layers.
        spare: that many more rows after them, not written (room for the caller to grow into; the pages of rows
        never written take no memory).
        """
        if not self.has_prefix(n):
            raise KeyError(f"blocks 0..{n - 1} are not all on disk in {str(self.path)!r}")
        out = torch.empty((n + spare, self.record_bytes), dtype=torch.uint8)
        if n == 0:
            return out
        records = out[:n]
        torch.index_select(self._map_tensor, 0, torch.frombuffer(self._slots[:n], dtype=torch.int64), out=records)
        self._check_records(range(n), records)
        return out

    def read_into(self, block_id: int, out: torch.Tensor) -> None:
        """Copy a block's record into `out` (record_bytes,) uint8, then release its pages from this process."""
        self.read_many_into([block_id], out[None])

    def read_many_into(self, block_ids: Sequence[int], out: torch.Tensor) -> None:
        """`read_into` for several blocks: their records into the rows of `out` (n, record_bytes) uint8, in order.

        The kernel is told of every record's pages first (`MADV_WILLNEED`, which starts their reads), so that the
        reads of blocks not in the page cache overlap: one at a time, a decoding step that needs hundreds of them
        waited ~1 ms for each. Then one gather copies them all, each is checked against its CRC32, and one
        `MADV_DONTNEED` over the span they lie in releases their pages from this process (with any other page of
        that span it had mapped, which a later access faults in again from the page cache). A copy and two system
        calls per block cost ~30 us of overhead each time: at a million tokens a decoding step reads thousands.
        """
        n = len(block_ids)
        if out.dtype != torch.uint8 or tuple(out.shape) != (n, self.record_bytes) or not out.is_contiguous():
            raise ValueError(f"expected a contiguous ({n}, {self.record_bytes}) uint8 tensor to read into, got "
                             f"{tuple(out.shape)} {out.dtype}")
        slots = [self._slot(block_id) for block_id in block_ids]
        if not slots:
            return
        size, page_size = self.record_bytes, mmap.PAGESIZE
        if n > 1 and hasattr(mmap, "MADV_WILLNEED"):
            for slot in slots:
                start = slot * size
                page = start - start % page_size
                self._map.madvise(mmap.MADV_WILLNEED, page, start + size - page)
        torch.index_select(self._map_tensor, 0, torch.tensor(slots, dtype=torch.long), out=out)
        if hasattr(mmap, "MADV_DONTNEED"):  # not on every platform; without it pages stay mapped (RSS only)
            first = min(slots) * size
            first -= first % page_size
            self._map.madvise(mmap.MADV_DONTNEED, first, (max(slots) + 1) * size - first)
        self._check_records(block_ids, out)

    # --- writing ----------------------------------------------------------------------------------------------

    def write(self, block_ids: Sequence[int], records: torch.Tensor) -> None:
        """Add new blocks: records (n, record_bytes) uint8 on the CPU. A block already on disk is refused."""
        block_ids = list(block_ids)
        if records.dtype != torch.uint8 or records.device.type != "cpu" or tuple(records.shape) != (
                len(block_ids), self.record_bytes):
            raise ValueError(f"expected ({len(block_ids)}, {self.record_bytes}) uint8 CPU records, got "
                             f"{tuple(records.shape)} {records.dtype} on {records.device}")
        if len(set(block_ids)) != len(block_ids) or any(b < 0 for b in block_ids):
            raise ValueError(f"block ids must be distinct and >= 0, got {block_ids}")
        present = [b for b in block_ids if self.contains(b)]
        if present:
            raise DiskTierError(f"blocks {present} are already on disk in {str(self.path)!r}: blocks are immutable")
        if not block_ids:
            return
        first = self._next_slot
        end = first + len(block_ids)
        if end > self._capacity:
            # Grow the file (sparse) geometrically so the mapping is renewed O(log n) times, not at every write.
            capacity = max(_MIN_CAPACITY, 2 * self._capacity, end)
            os.ftruncate(self._data_fd, max(os.fstat(self._data_fd).st_size, capacity * self.record_bytes))
            self._remap(capacity)
        data = records.contiguous().numpy()
        crcs = [zlib.crc32(memoryview(row)) for row in data]
        try:
            write_all(self._data_fd, memoryview(data).cast("B"), first * self.record_bytes)
            if self.durable:
                os.fsync(self._data_fd)
            self._commit_index(b"".join(_entry(_PUT, b, first + i, crc) for i, (b, crc) in enumerate(zip(block_ids, crcs))))
        except OSError as error:
            raise DiskTierError(f"cannot write blocks to {str(self.path)!r}: {error}") from error
        # Only now, with the index entries written, do the blocks exist (in this process and after a reopen).
        self._next_slot = end
        for i, (b, crc) in enumerate(zip(block_ids, crcs)):
            self._set(b, first + i, crc)

    def _commit_index(self, entries: bytes) -> None:
        """Append index entries (the commit point of a write or a truncation)."""
        if self._cut_at is not None:
            os.ftruncate(self._index_fd, self._cut_at)  # entries past the state this folder was opened at
            self._cut_at = None
        end = os.fstat(self._index_fd).st_size
        try:
            write_all(self._index_fd, memoryview(entries), None)
            if self.durable:
                os.fsync(self._index_fd)
        except BaseException:
            # A failed append (a full disk) may leave part of an entry, where replay would stop and lose every entry
            # appended after it: the next commit cuts the log back here first.
            self._cut_at = end
            raise
        self._entries += len(entries) // ENTRY_BYTES

    def truncate(self, n: int) -> None:
        """Forget blocks n.. (rollback). Their records stay in the data file, unreferenced, and the slots after
        the last one still in use are written again by later blocks."""
        if any(slot >= 0 for slot in self._slots[n:]):
            try:
                self._commit_index(_entry(_TRUNCATE, n, 0))
            except OSError as error:
                raise DiskTierError(f"cannot truncate the blocks in {str(self.path)!r}: {error}") from error
            self._drop_from(n)
            self._reclaim()

    def close(self) -> None:
        """Close the files; views from `read` keep their mapping until they are dropped."""
        self._map_tensor = self._map = None
        self._closer()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
