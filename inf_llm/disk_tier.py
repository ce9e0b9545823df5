"""The disk tier of the block store: memory blocks in memory-mapped files, for histories larger than RAM.

One layer's store is one folder:

    layout.json   the `BlockLayout` of every record (written once: temporary file, then `os.replace`)
    blocks.data   records, one per slot, `record_bytes` each; append-only: a record is never rewritten
    blocks.index  an append-only log of fixed-size entries, each ending in a CRC32 of itself:
                  PUT (block, slot): the block's record is at that slot; TRUNCATE (n): blocks n.. are gone

Blocks are immutable once created, so a block is written at most once; the index maps block ids to slots.

Crash safety. A write puts the records into blocks.data first and only then appends their PUT entries to the
index, so an index entry never points at data that was not written: a process that dies between the two
leaves records that no entry names (ignored, overwritten later). Opening replays the index up to its first
incomplete or corrupt entry and cuts it there. With `durable=True` both files are fsynced at each step, which
extends this to power loss; a throw-away spill folder (`SpillDirectory`) skips the fsyncs, since nothing can
reopen it after its process is gone.

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

import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
import weakref
import zlib
from array import array
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch

from inf_llm.block_layout import BlockLayout

logger = logging.getLogger(__name__)

LAYOUT_FILE, DATA_FILE, INDEX_FILE = "layout.json", "blocks.data", "blocks.index"
FORMAT = "inf-llm-blocks"
FORMAT_VERSION = 1
_ENTRY = struct.Struct("<4sIqq")  # magic, kind, a, b (PUT: block, slot; TRUNCATE: n, 0)
_CRC = struct.Struct("<I")
ENTRY_BYTES = _ENTRY.size + _CRC.size
_MAGIC = b"IBLK"
_PUT, _TRUNCATE = 1, 2
_MIN_CAPACITY = 64  # records; the data file grows geometrically from here, so remapping is rare
SPILL_PREFIX = "inf-llm-blocks-"


class DiskTierError(OSError):
    """A block folder could not be created, opened or written; the message names the folder."""


def _entry(kind: int, a: int, b: int) -> bytes:
    body = _ENTRY.pack(_MAGIC, kind, a, b)
    return body + _CRC.pack(zlib.crc32(body))


def _write_all(fd: int, data: memoryview, offset: int | None) -> None:
    """pwrite (or append, offset None) every byte: a single call may write fewer."""
    done = 0
    while done < len(data):
        chunk = data[done:]
        done += os.pwrite(fd, chunk, offset + done) if offset is not None else os.write(fd, chunk)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskTier:
    """The blocks of one store in `path`; created there when `layout` is given and the folder holds none."""

    def __init__(self, path: str | os.PathLike[str], layout: BlockLayout | None = None, *, durable: bool = True):
        self.path, self.durable = Path(path), durable
        self.layout = self._open_layout(layout)
        self.record_bytes = self.layout.record_bytes
        try:
            self._data_fd = os.open(self.path / DATA_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            self._index_fd = os.open(self.path / INDEX_FILE, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as error:
            raise DiskTierError(f"cannot open the block files in {str(self.path)!r}: {error}") from error
        self._closer = weakref.finalize(self, _close_fds, self._data_fd, self._index_fd)
        self._slots = array("q")  # block id -> slot, -1 when the block is not on disk
        self._count = 0
        self._next_slot = 0
        self._replay()
        self._map: mmap.mmap | None = None
        self._map_tensor: torch.Tensor | None = None
        self._capacity = 0  # records covered by the mapping
        self._remap(os.fstat(self._data_fd).st_size // self.record_bytes)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, durable: bool = True) -> DiskTier:
        """Open an existing block folder (its layout is read from it)."""
        return cls(path, None, durable=durable)

    # --- opening ----------------------------------------------------------------------------------------------

    def _open_layout(self, layout: BlockLayout | None) -> BlockLayout:
        meta = self.path / LAYOUT_FILE
        if meta.is_file():
            try:
                data = json.loads(meta.read_text(encoding="utf-8"))
                if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
                    raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}, expected "
                                     f"{FORMAT!r} version {FORMAT_VERSION}")
                stored = BlockLayout.from_dict(data["layout"])
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
            fd, tmp = tempfile.mkstemp(prefix=f".{LAYOUT_FILE}.", dir=self.path)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                if self.durable:
                    os.fsync(handle.fileno())
            os.replace(tmp, meta)
            if self.durable:
                _fsync_dir(self.path)
        except OSError as error:
            raise DiskTierError(f"cannot create a block folder at {str(self.path)!r}: {error}") from error
        return layout

    def _replay(self) -> None:
        """Rebuild block -> slot from the index, up to its first incomplete or corrupt entry (cut there)."""
        size = os.fstat(self._index_fd).st_size
        log = os.pread(self._index_fd, size, 0) if size else b""
        data_records = os.fstat(self._data_fd).st_size // self.record_bytes
        valid = 0
        for start in range(0, len(log) - ENTRY_BYTES + 1, ENTRY_BYTES):
            entry = log[start : start + ENTRY_BYTES]
            body, (crc,) = entry[: _ENTRY.size], _CRC.unpack(entry[_ENTRY.size :])
            magic, kind, a, b = _ENTRY.unpack(body)
            if magic != _MAGIC or crc != zlib.crc32(body) or a < 0:
                break
            if kind == _PUT and 0 <= b < data_records:  # a slot past the data's end was never written
                self._set(a, b)
            elif kind == _TRUNCATE:
                self._drop_from(a)
            else:
                break
            valid = start + ENTRY_BYTES
        if valid < len(log):
            logger.warning("%s: ignoring %d bytes after the last complete index entry (an interrupted write)",
                           self.path / INDEX_FILE, len(log) - valid)
            os.ftruncate(self._index_fd, valid)
        self._reclaim()

    def _set(self, block_id: int, slot: int) -> None:
        if block_id >= len(self._slots):
            self._slots.extend([-1] * (block_id + 1 - len(self._slots)))
        self._count += self._slots[block_id] < 0
        self._slots[block_id] = slot

    def _drop_from(self, n: int) -> None:
        if n < len(self._slots):
            self._count -= sum(1 for s in self._slots[n:] if s >= 0)
            del self._slots[n:]

    def _reclaim(self) -> None:
        """Write new records after the last slot a live block uses: slots past it hold only forgotten blocks.

        Safe against crashes: such a slot is overwritten only after the TRUNCATE entry that forgot its block
        was committed, so replaying the index never pairs a live block with data written for another.
        """
        self._next_slot = max(self._slots, default=-1) + 1

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
        return n <= len(self._slots) and all(slot >= 0 for slot in self._slots[:n])

    def nbytes(self) -> int:
        """Bytes of the blocks on disk (records that no entry names are not counted)."""
        return self._count * self.record_bytes

    # --- reading ----------------------------------------------------------------------------------------------

    def _slot(self, block_id: int) -> int:
        if not self.contains(block_id):
            raise KeyError(f"block {block_id} is not on disk in {str(self.path)!r}")
        return self._slots[block_id]

    def read(self, block_id: int) -> torch.Tensor:
        """The record of a block, (record_bytes,) uint8: a view of the mapping (read-only by contract)."""
        return self._map_tensor[self._slot(block_id)]

    def read_into(self, block_id: int, out: torch.Tensor) -> None:
        """Copy a block's record into `out` (record_bytes,) uint8, then release its pages from this process."""
        slot = self._slot(block_id)
        out.copy_(self._map_tensor[slot])
        if hasattr(mmap, "MADV_DONTNEED"):  # not on every platform; without it pages stay mapped (RSS only)
            start = slot * self.record_bytes
            page = start - start % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, page, start + self.record_bytes - page)

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
        try:
            _write_all(self._data_fd, memoryview(records.contiguous().numpy()).cast("B"), first * self.record_bytes)
            if self.durable:
                os.fsync(self._data_fd)
            self._commit_index(b"".join(_entry(_PUT, b, first + i) for i, b in enumerate(block_ids)))
        except OSError as error:
            raise DiskTierError(f"cannot write blocks to {str(self.path)!r}: {error}") from error
        # Only now, with the index entries written, do the blocks exist (in this process and after a reopen).
        self._next_slot = end
        for i, b in enumerate(block_ids):
            self._set(b, first + i)

    def _commit_index(self, entries: bytes) -> None:
        """Append index entries (the commit point of a write or a truncation)."""
        _write_all(self._index_fd, memoryview(entries), None)
        if self.durable:
            os.fsync(self._index_fd)

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
                _remove_stale_spill_folders(parent)
                self._root = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=parent))
            except OSError as error:
                raise DiskTierError(f"cannot create a folder for memory blocks in {str(parent)!r}: {error}") from error
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._root), True)
            logger.info("memory blocks beyond the host budget go to %s", self._root)
        return self._root / name

    def remove(self) -> None:
        if self._cleanup is not None:
            self._cleanup()


def _remove_stale_spill_folders(parent: Path) -> None:
    for folder in parent.glob(f"{SPILL_PREFIX}*"):
        pid = folder.name[len(SPILL_PREFIX) :].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            logger.info("removing %s, left by a process that ended", folder)
            shutil.rmtree(folder, ignore_errors=True)
