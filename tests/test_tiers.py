"""Tests of the block tiers: device cache -> host memory (byte budget) -> disk (memory-mapped block files).

Oracles: the blocks as appended (gathered K/V must be bit-identical to them whichever tier served them), an
explicit re-implementation of each cache policy, the byte budget (never exceeded), and a store reopened from
its folder after a write was interrupted. An engine with a small host budget must give exactly the logits of
one without.
"""

import copy
import gc
import os
import random

import pytest
import torch

from inf_llm.config.schema import InfLLMConfig
from inf_llm.generation.engine import Engine
from inf_llm.storage.block_layout import BlockLayout
from inf_llm.storage.block_store import BlockStore
from inf_llm.storage.cache_policy import EvictionPolicy
from inf_llm.storage.disk_tier import DATA_FILE, ENTRY_BYTES, INDEX_FILE, DiskTier, DiskTierError
from inf_llm.storage.rows import put_rows
from inf_llm.storage.spill import SPILL_PREFIX, SpillDirectory
from inf_llm.storage.tier_settings import TierSettings, tier_settings
from tests.tiny_models import tiny_model

HKV, B, D = 2, 4, 8
CPU = torch.device("cpu")


def _blocks(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, HKV, B, D, generator=g), torch.randn(n, HKV, B, D, generator=g)


def _store(budget_blocks: int | None, *, dtype=torch.float32, cache_blocks=4, policy="lru", decay=None,
           spill=None) -> BlockStore:
    layout = BlockLayout(HKV, B, D, dtype)
    budget = None if budget_blocks is None else budget_blocks * layout.record_bytes
    return BlockStore(HKV, B, D, storage_dtype=dtype, compute_dtype=torch.float32, device=CPU,
                      cache_blocks=cache_blocks, policy=policy, score_decay=decay,
                      tiers=TierSettings(budget, spill or SpillDirectory()))


def _expected(k: torch.Tensor, ids, dtype=torch.float32) -> torch.Tensor:
    """What gather must return for 1-D ids: the appended blocks, in the storage dtype, concatenated in time."""
    return k[ids].to(dtype).float().transpose(0, 1).reshape(HKV, len(ids) * B, D)


def _records(layout: BlockLayout, n: int, seed: int) -> torch.Tensor:
    k, v = _blocks(n, seed)
    return layout.pack(k, v)


# --- eviction policies ---------------------------------------------------------------------------------------


class _EagerPolicy:
    """The device cache's original policy, written out directly: every request decays every lru-s score."""

    def __init__(self, name, decay):
        self.name, self.decay, self.key, self.clock, self.order = name, decay, {}, 0, []

    def start_request(self):
        self.clock += 1
        if self.name == "lru-s":
            self.key = {b: s * self.decay for b, s in self.key.items()}

    def admit(self, b):
        self.key[b] = self.clock if self.name == "fifo" else 0.0
        self.order.append(b)

    def use(self, b):
        if self.name == "lru":
            self.key[b] = self.clock
        elif self.name == "lru-s":
            self.key[b] += 1.0

    def discard(self, b):
        self.key.pop(b)
        self.order.remove(b)

    def victim_candidates(self, protected):
        live = [b for b in self.key if b not in protected]
        if not live:
            return set()
        low = min(self.key[b] for b in live)
        return {b for b in live if abs(self.key[b] - low) <= 1e-9 * max(1.0, abs(low))}


@pytest.mark.parametrize("name,decay", [("lru", None), ("lru-s", 0.5), ("lru-s", 0.97), ("fifo", None)])
def test_eviction_policy_matches_the_eager_definition(name, decay):
    rng = random.Random(0)
    policy, eager = EvictionPolicy(name, decay), _EagerPolicy(name, decay)
    cached: set[int] = set()
    for _ in range(3000):  # long enough for lru-s at 0.5 to renormalise its unit several times
        policy.start_request(), eager.start_request()
        wanted = set(rng.sample(range(40), 3))
        for b in sorted(wanted):
            if b not in cached:
                if len(cached) >= 8:
                    victim = policy.victim(wanted)
                    # Ties may be broken either way; the victim must be one of the lowest keys.
                    assert victim in eager.victim_candidates(wanted)
                    policy.discard(victim), eager.discard(victim)
                    cached.remove(victim)
                policy.admit(b), eager.admit(b)
                cached.add(b)
            policy.use(b), eager.use(b)
    assert len(policy) == len(cached) and all(b in policy for b in cached)
    assert policy.victim(cached) is None


@pytest.mark.parametrize("name,decay", [("lru", None), ("lru-s", 0.5), ("fifo", None)])
def test_a_requests_victims_are_the_ones_chosen_one_at_a_time(name, decay):
    # `victims` chooses a request's evictions in one pass; the definition is one `victim` at a time, each
    # discarded before the next is chosen.
    rng = random.Random(2)
    policy = EvictionPolicy(name, decay)
    for b in range(30):
        policy.start_request()
        policy.admit(b)
        for used in rng.sample(range(b + 1), min(b + 1, 4)):
            policy.use(used)
    for _ in range(50):
        protected = set(rng.sample(range(30), rng.randrange(0, 31)))
        count = rng.randrange(0, 32)
        one_at_a_time, sequential = copy.deepcopy(policy), []
        while len(sequential) < count and (victim := one_at_a_time.victim(protected)) is not None:
            sequential.append(victim)
            one_at_a_time.discard(victim)
        assert policy.victims(count, protected) == sequential
        assert len(sequential) == min(count, 30 - len(protected))


def test_eviction_policy_refuses_bad_settings():
    with pytest.raises(ValueError, match="'lru-x'"):
        EvictionPolicy("lru-x")
    with pytest.raises(ValueError, match="score_decay"):
        EvictionPolicy("lru-s", None)


# --- the disk tier alone -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_disk_tier_round_trips_and_reopens_bit_exactly(tmp_path, dtype):
    layout = BlockLayout(HKV, B, D, dtype)
    records = _records(layout, 10, 1)
    tier = DiskTier(tmp_path / "s", layout)
    tier.write([3, 0, 7], records[:3])
    tier.write(range(100, 107), records[3:])  # sparse ids and a file that grows past its first mapping
    assert len(tier) == 10 and tier.nbytes() == 10 * layout.record_bytes
    assert tier.block_ids() == [0, 3, 7, *range(100, 107)] and tier.contains(7) and not tier.contains(1)
    reopened = DiskTier.open(tmp_path / "s")
    assert reopened.layout == layout and reopened.block_ids() == tier.block_ids()
    for i, b in enumerate([3, 0, 7, *range(100, 107)]):
        assert torch.equal(reopened.read(b), records[i])
        out = torch.empty(layout.record_bytes, dtype=torch.uint8)
        reopened.read_into(b, out)  # also releases the pages: the data must stay readable afterwards
        assert torch.equal(out, records[i]) and torch.equal(reopened.read(b), records[i])


def test_disk_tier_blocks_are_immutable_and_layouts_checked(tmp_path):
    layout = BlockLayout(HKV, B, D, torch.float32)
    tier = DiskTier(tmp_path / "s", layout)
    tier.write([0, 1], _records(layout, 2, 0))
    with pytest.raises(DiskTierError, match="already on disk"):
        tier.write([1], _records(layout, 1, 5))
    with pytest.raises(DiskTierError, match="layout"):
        DiskTier(tmp_path / "s", BlockLayout(HKV, B, D, torch.float16))
    with pytest.raises(DiskTierError, match="holds no memory blocks"):
        DiskTier.open(tmp_path / "elsewhere")


def test_disk_truncation_is_logged_and_survives_reopening(tmp_path):
    layout = BlockLayout(HKV, B, D, torch.float32)
    old, new = _records(layout, 10, 0), _records(layout, 3, 9)
    tier = DiskTier(tmp_path / "s", layout)
    tier.write(range(10), old)
    tier.truncate(5)
    assert tier.block_ids() == list(range(5))
    tier.write(range(5, 8), new)  # the ids are free again: rolled-back blocks are not "already on disk"
    assert tier._next_slot == 8  # and so are their slots: rollbacks do not grow the data file
    reopened = DiskTier.open(tmp_path / "s")
    assert reopened.block_ids() == list(range(8))
    for b in range(8):
        assert torch.equal(reopened.read(b), old[b] if b < 5 else new[b - 5])


def test_a_crash_while_reusing_a_forgotten_slot_keeps_live_blocks_intact(tmp_path, monkeypatch):
    layout = BlockLayout(HKV, B, D, torch.float32)
    old, new = _records(layout, 8, 0), _records(layout, 2, 1)
    tier = DiskTier(tmp_path / "s", layout)
    tier.write(range(8), old)
    tier.truncate(6)  # slots 6 and 7 now hold forgotten blocks
    monkeypatch.setattr(tier, "_commit_index", lambda entries: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(DiskTierError):
        tier.write([6, 7], new)  # overwrites the data of the forgotten blocks 6 and 7, then crashes
    reopened = DiskTier.open(tmp_path / "s")  # replays PUT 6, PUT 7, TRUNCATE 6: both stay forgotten
    assert reopened.block_ids() == list(range(6))
    assert all(torch.equal(reopened.read(b), old[b]) for b in range(6))


def test_a_crash_between_data_and_index_leaves_the_folder_readable(tmp_path, monkeypatch):
    layout = BlockLayout(HKV, B, D, torch.bfloat16)
    records = _records(layout, 6, 2)
    tier = DiskTier(tmp_path / "s", layout)
    tier.write([0, 1, 2], records[:3])

    def crash(entries):
        raise OSError("simulated crash after the data write, before the index update")

    monkeypatch.setattr(tier, "_commit_index", crash)
    with pytest.raises(DiskTierError, match="simulated crash"):
        tier.write([3, 4], records[3:5])
    assert tier.block_ids() == [0, 1, 2]  # the interrupted write never took effect in this process either
    # The data of blocks 3 and 4 is in the data file, but no index entry names it: reopening ignores it.
    reopened = DiskTier.open(tmp_path / "s")
    assert reopened.block_ids() == [0, 1, 2]
    for b in range(3):
        assert torch.equal(reopened.read(b), records[b])
    reopened.write([3, 4, 5], records[3:])  # writing goes on where the crash left off
    again = DiskTier.open(tmp_path / "s")
    assert again.block_ids() == list(range(6))
    assert all(torch.equal(again.read(b), records[b]) for b in range(6))


@pytest.mark.parametrize("tail", [b"\x01" * (ENTRY_BYTES // 2), b"IBLK" + b"\x00" * (ENTRY_BYTES - 4)])
def test_a_torn_or_corrupt_index_entry_is_cut_at_the_next_write(tmp_path, tail):
    layout = BlockLayout(HKV, B, D, torch.float32)
    records = _records(layout, 3, 3)
    DiskTier(tmp_path / "s", layout).write([0, 1], records[:2])
    with open(tmp_path / "s" / INDEX_FILE, "ab") as index:
        index.write(tail)  # a half-written entry, or one whose checksum does not match
    reopened = DiskTier.open(tmp_path / "s")
    assert reopened.block_ids() == [0, 1] and reopened.entries == 2
    assert os.path.getsize(tmp_path / "s" / INDEX_FILE) == 2 * ENTRY_BYTES + len(tail)  # opening wrote nothing
    reopened.write([2], records[2:])
    assert os.path.getsize(tmp_path / "s" / INDEX_FILE) == 3 * ENTRY_BYTES
    assert DiskTier.open(tmp_path / "s").block_ids() == [0, 1, 2]


def test_an_append_that_fails_half_written_is_cut_before_the_next(tmp_path, monkeypatch):
    """A full disk in a running process: the index append writes half an entry and fails. The blocks written
    after it must survive a reopening (replay stops at a torn entry, so it must not stay in the middle)."""
    layout = BlockLayout(HKV, B, D, torch.float32)
    records = _records(layout, 4, 4)
    tier = DiskTier(tmp_path / "s", layout, durable=False)
    tier.write([0, 1], records[:2])
    write = os.write

    def half_then_full(fd, data):
        write(fd, bytes(data)[: ENTRY_BYTES // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskTierError, match="No space left"):
        tier.write([2], records[2:3])
    monkeypatch.undo()
    assert tier.block_ids() == [0, 1]
    tier.write([2, 3], records[2:])
    assert os.path.getsize(tmp_path / "s" / INDEX_FILE) == 4 * ENTRY_BYTES
    reopened = DiskTier.open(tmp_path / "s")
    assert reopened.block_ids() == [0, 1, 2, 3]
    assert all(torch.equal(reopened.read(b), records[b]) for b in range(4))


def test_reopening_at_a_saved_entry_count_gives_that_state_even_after_rollback_and_rewrites(tmp_path):
    """A session saves `entries`; what happens after (rollback, new blocks in the freed slots) is not seen."""
    layout = BlockLayout(HKV, B, D, torch.float32)
    old, new = _records(layout, 4, 1), _records(layout, 4, 2)
    tier = DiskTier(tmp_path / "s", layout, durable=False)
    tier.write([0, 1, 2, 3], old)
    tier.sync()
    tier.protect()
    saved = tier.entries
    tier.truncate(1)  # a rollback after the save
    tier.write([1, 2, 3], new[1:])  # new blocks with the ids of the forgotten ones
    assert all(torch.equal(tier.read(b), new[b]) for b in (1, 2, 3))
    at_save = DiskTier.open(tmp_path / "s", entries=saved)
    assert at_save.block_ids() == [0, 1, 2, 3]
    assert all(torch.equal(at_save.read(b), old[b]) for b in range(4))  # protected slots were not reused
    latest = DiskTier.open(tmp_path / "s")
    assert all(torch.equal(latest.read(b), new[b]) for b in (1, 2, 3))
    with pytest.raises(DiskTierError, match="saved state needs"):
        DiskTier.open(tmp_path / "s", entries=latest.entries + 1)
    # Writing from the saved state drops the later entries from the index.
    at_save.write([4], new[:1])
    assert DiskTier.open(tmp_path / "s").block_ids() == [0, 1, 2, 3, 4]
    assert torch.equal(DiskTier.open(tmp_path / "s").read(1), old[1])


def _tier_state(tier: DiskTier) -> tuple:
    return (list(tier._slots), list(tier._crcs), len(tier), tier.entries, tier._next_slot, tier._kept_slots,
            tier._cut_at)


@pytest.mark.parametrize("history", ["puts", "puts out of order", "rollback", "rewritten block id", "torn tail"])
def test_reopening_with_the_saved_digest_gives_the_state_the_entry_by_entry_replay_gives(tmp_path, history,
                                                                                          monkeypatch):
    """Oracle: the same folder reopened at the same entry count without the digest (every entry replayed and
    checked one by one). With the digest, a log of distinct PUTs is replayed in array operations, any other log
    one by one; both must give the same state, reads and later writes. A digest that differs is refused."""
    layout = BlockLayout(HKV, B, D, torch.float32)
    records = _records(layout, 8, 3)
    tier = DiskTier(tmp_path / "s", layout, durable=False)
    if history == "puts out of order":
        tier.write([3, 0, 2], records[:3])
        tier.write([1, 4], records[3:5])
    else:
        tier.write(range(5), records[:5])
    if history == "rollback":
        tier.truncate(2)
        tier.write([2, 3], records[5:7])
    if history == "rewritten block id":  # no TRUNCATE entry in between: the same block id put twice
        tier._set(1, -1, 0)
        tier._count -= 1
        tier.write([1], records[7:8])
    tier.sync()
    tier.protect()
    saved, digest = tier.entries, tier.index_sha256()
    if history == "torn tail":
        tier.write([5], records[5:6])
        with open(tmp_path / "s" / INDEX_FILE, "r+b") as index:
            index.truncate(os.path.getsize(tmp_path / "s" / INDEX_FILE) - 3)
    del tier
    gc.collect()
    one_by_one = DiskTier.open(tmp_path / "s", entries=saved)
    in_arrays, replay = [], DiskTier._replay_distinct_puts
    monkeypatch.setattr(DiskTier, "_replay_distinct_puts", lambda self, *a: in_arrays.append(replay(self, *a)) or in_arrays[-1])
    fast = DiskTier.open(tmp_path / "s", entries=saved, index_sha256=digest)
    assert in_arrays == [history in ("puts", "puts out of order", "torn tail")]
    assert _tier_state(fast) == _tier_state(one_by_one)
    assert all(torch.equal(fast.read(b), one_by_one.read(b)) for b in fast.block_ids())
    fast.write([9], records[:1])
    one_by_one.write([9], records[:1])
    assert _tier_state(fast)[:5] == _tier_state(one_by_one)[:5]
    with pytest.raises(DiskTierError, match="is not the index this session saved"):
        DiskTier.open(tmp_path / "s", entries=saved, index_sha256="0" * 64)


def test_a_damaged_record_is_refused_when_read(tmp_path):
    layout = BlockLayout(HKV, B, D, torch.float32)
    records = _records(layout, 2, 4)
    DiskTier(tmp_path / "s", layout).write([0, 1], records)
    with open(tmp_path / "s" / DATA_FILE, "r+b") as data:
        data.seek(layout.record_bytes + 5)
        byte = data.read(1)
        data.seek(layout.record_bytes + 5)
        data.write(bytes([byte[0] ^ 0x40]))
    reopened = DiskTier.open(tmp_path / "s")
    assert torch.equal(reopened.read(0), records[0])
    with pytest.raises(DiskTierError, match="block 1 .* is damaged"):
        reopened.read(1)
    with pytest.raises(DiskTierError, match="block 1 .* is damaged"):
        reopened.read_into(1, layout.empty(1)[0])
    with pytest.raises(DiskTierError, match="block 1 .* is damaged"):
        reopened.read_prefix(2)
    assert torch.equal(reopened.read_prefix(1), records[:1])


def test_read_prefix_equals_one_read_per_block_in_and_out_of_slot_order(tmp_path):
    layout = BlockLayout(HKV, B, D, torch.float32)
    old, new = _records(layout, 6, 1), _records(layout, 3, 2)
    tier = DiskTier(tmp_path / "s", layout, durable=False)
    tier.write(range(6), old)
    assert torch.equal(tier.read_prefix(6), old) and tier.read_prefix(0).shape == (0, layout.record_bytes)
    tier.write([7], new[:1])  # block 6 missing: no prefix of 8
    with pytest.raises(KeyError, match="not all on disk"):
        tier.read_prefix(8)
    tier.truncate(2)
    tier.sync()
    tier.protect()
    tier.write([4, 2, 3], new)  # slots out of block order (the forgotten ones are kept: protected)
    assert list(tier._slots[:5]) != list(range(5))
    expected = torch.stack([tier.read(b) for b in range(5)])
    got = tier.read_prefix(5)
    assert torch.equal(got, expected) and torch.equal(got, torch.cat([old[:2], new[1:], new[:1]]))
    got[0] += 1  # a copy, not a view of the mapping
    assert torch.equal(tier.read(0), old[0])
    roomy = tier.read_prefix(5, spare=3)  # rows to grow into after the records
    assert roomy.shape == (8, layout.record_bytes) and torch.equal(roomy[:5], expected)


def test_read_many_into_equals_one_read_per_block_and_checks_each(tmp_path):
    layout = BlockLayout(HKV, B, D, torch.float32)
    records = _records(layout, 6, 5)
    tier = DiskTier(tmp_path / "s", layout, durable=False)
    tier.write(range(6), records)
    ids = [4, 0, 5, 2]
    outs = layout.empty(len(ids))
    tier.read_many_into(ids, outs)
    assert all(torch.equal(out, records[b]) for b, out in zip(ids, outs))
    with pytest.raises(KeyError, match="block 7 is not on disk"):
        tier.read_many_into([1, 7], layout.empty(2))
    with pytest.raises(ValueError, match="uint8 tensor to read into"):
        tier.read_many_into(ids, layout.empty(len(ids) + 1))
    with open(tmp_path / "s" / DATA_FILE, "r+b") as data:  # damage block 5's record
        data.seek(5 * layout.record_bytes + 9)
        byte = data.read(1)
        data.seek(5 * layout.record_bytes + 9)
        data.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(DiskTierError, match="block 5 .* is damaged"):
        tier.read_many_into(ids, layout.empty(len(ids)))


# --- the store across tiers ----------------------------------------------------------------------------------

def test_scoring_reads_the_cache_only_through_the_highest_slot_asked_for():
    # Free slots are taken lowest first, so a memory smaller than the device cache fills its first slots; a
    # second stage then scores those, not the empty rest of the cache (half of a 4K conversation's scoring
    # went to empty slots), and every block's score still comes from exactly its own keys.
    store = _store(None, cache_blocks=12)
    k, v = _blocks(5, 3)
    store.append(k, v)
    seen = []

    def score(keys):
        seen.append(keys.shape[1])
        return keys.transpose(0, 1)

    for ids in ([3, 1], [0, 4, 2], [2]):
        scored = store.score_blocks(ids, score)
        assert torch.equal(scored.transpose(0, 1), _expected(k, ids).view(HKV, len(ids), B, D))
        assert seen[-1] == max(store.block_slot[b] for b in ids) + 1 <= 5
    assert seen == [2, 5, 4]  # loaded in id order: blocks 1 and 3 took slots 0 and 1, then 0, 2, 4 took 2, 3, 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget_blocks", [0, 3])
def test_budget_holds_and_every_gather_is_bit_exact(dtype, budget_blocks):
    store = _store(budget_blocks, dtype=dtype)
    budget = budget_blocks * store.layout.record_bytes
    k, v = _blocks(30, 4)
    rng = random.Random(1)
    appended = 0
    for n in [1, 2, 5, 1, 4, 7, 1, 1, 8]:  # batches smaller and larger than the budget
        store.append(k[appended : appended + n], v[appended : appended + n])
        appended += n
        assert store.host_bytes() <= budget and store.host.allocated_bytes() <= budget
        assert store.host_blocks() + store.disk_blocks() >= store.num_blocks == appended
        for _ in range(3):
            ids = rng.sample(range(appended), min(3, appended))
            gk, gv = store.gather(torch.tensor(ids))
            assert torch.equal(gk, _expected(k, ids, dtype)) and torch.equal(gv, _expected(v, ids, dtype))
            assert store.host_bytes() <= budget and store.host.allocated_bytes() <= budget
        # A second stage scores candidates on their keys in place: a "score" that is the keys themselves
        # shows that each candidate's value is computed from exactly its own keys.
        ids = rng.sample(range(appended), min(4, appended))
        scored = store.score_blocks(ids, lambda keys: keys.transpose(0, 1))  # (n, Hkv, B, D)
        assert torch.equal(scored.transpose(0, 1), _expected(k, ids, dtype).view(HKV, len(ids), -1, k.shape[-1]))
        per_head = torch.tensor([rng.sample(range(appended), min(2, appended)) for _ in range(HKV)])
        gk, _ = store.gather(per_head)
        for h in range(HKV):
            assert torch.equal(gk[h], _expected(k, per_head[h].tolist(), dtype)[h])
    assert store.disk_reads > 0 and store.disk_writes > 0
    for b in range(appended):  # host_block reads from either tier too
        assert torch.equal(store.host_block(b)[0], k[b].to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_one_load_from_both_tiers_puts_each_block_in_its_place(dtype):
    # A load whose blocks interleave between RAM and disk is read as two gathers scattered into their rows, and
    # the blocks from disk are promoted into the free rows the evictions leave, which are not consecutive. Every
    # gathered block must still be the one appended, in the order asked, and exactly the disk's blocks read there.
    store = _store(6, dtype=dtype, cache_blocks=12)
    k, v = _blocks(16, 9)
    store.append(k, v)  # blocks 10..15 in RAM, 0..9 on disk
    assert [b in store.host for b in range(16)] == [False] * 10 + [True] * 6
    store.gather(torch.tensor([11, 13, 15]))  # used lately: the others in RAM leave first
    for ids in ([0, 10, 2, 12, 4, 14, 6], [1, 11, 3, 9, 13, 5, 15], [7, 8, 10, 12]):
        before = store.disk_reads
        store.block_slot.clear()  # every block loads again: from RAM or disk, in one request
        store.slot_block[:] = [-1] * store.cache_blocks
        store.cache = EvictionPolicy(store.policy, store.score_decay)
        on_disk = [b for b in ids if b not in store.host]
        gk, gv = store.gather(torch.tensor(ids))
        assert store.disk_reads - before == len(on_disk)
        want_k, want_v = store.layout.values(store.layout.pack(k[ids], v[ids]), torch.float32)
        assert torch.equal(gk, want_k.transpose(0, 1).reshape(HKV, -1, D))
        assert torch.equal(gv, want_v.transpose(0, 1).reshape(HKV, -1, D))
        for b in range(16):  # every block in RAM still holds its own record
            if b in store.host:
                assert torch.equal(store.host.record(b), store.layout.pack(k[b : b + 1], v[b : b + 1])[0])


@pytest.mark.parametrize("width", [24, 13])
def test_put_rows_writes_each_record_into_its_row(width):
    # Both paths: records as 8-byte words, and records of a size that is not a multiple of 8.
    table = torch.randint(0, 256, (9, width), dtype=torch.uint8)
    records = torch.randint(0, 256, (4, width), dtype=torch.uint8)
    rows = [7, 0, 4, 2]
    expected = table.clone()
    for i, row in enumerate(rows):
        expected[row] = records[i]
    put_rows(table, rows, records)
    assert torch.equal(table, expected)
    put_rows(table, [], records[:0])
    assert torch.equal(table, expected)


@pytest.mark.parametrize("policy,decay", [("lru", None), ("lru-s", 0.5), ("fifo", None)])
def test_the_device_cache_holds_what_one_block_at_a_time_would(policy, decay):
    # The definition of a request: its blocks in order, each missing one taking a free slot (lowest first) or the
    # slot of the policy's victim among the blocks not requested, then used. `fetch_slots` does the evictions of
    # a request in one pass; requests as large as the cache (a second stage's shortlist) included.
    cache = 6
    store = _store(None, cache_blocks=cache, policy=policy, decay=decay)
    k, v = _blocks(20, 3)
    store.append(k, v)
    books, slot_of, free = EvictionPolicy(policy, decay), {}, list(range(cache))
    hits = misses = 0
    rng = random.Random(4)
    for _ in range(300):
        ids = rng.sample(range(20), rng.choice([1, 2, 3, cache - 1, cache]))
        books.start_request()
        for b in ids:
            if b in slot_of:
                hits += 1
            else:
                misses += 1
                if free:
                    slot = free.pop(0)
                else:
                    victim = books.victim(set(ids))
                    books.discard(victim)
                    slot = slot_of.pop(victim)
                slot_of[b] = slot
                books.admit(b)
            books.use(b)
        assert store.fetch_slots(ids) == [slot_of[b] for b in ids]
        assert store.block_slot == slot_of and (store.hits, store.misses) == (hits, misses)
    assert torch.equal(store.gather(torch.tensor(ids))[0], _expected(k, ids))


def test_unbounded_store_never_touches_disk():
    store = _store(None)
    k, v = _blocks(20, 5)
    store.append(k, v)
    store.gather(torch.arange(4))
    assert store.disk is None and store.disk_blocks() == 0 and store.host_blocks() == 20
    assert store.host_bytes() == 20 * 2 * HKV * B * D * 4  # K and V in float32, nothing else


def test_blocks_are_written_once_and_retrieval_reads_only_selected_blocks(monkeypatch):
    written, read = [], []
    write, read_many_into = DiskTier.write, DiskTier.read_many_into
    monkeypatch.setattr(DiskTier, "write", lambda self, ids, rec: (written.extend(ids), write(self, ids, rec))[1])
    monkeypatch.setattr(DiskTier, "read_many_into",
                        lambda self, ids, outs: (read.extend(ids), read_many_into(self, ids, outs))[1])
    store = _store(2, cache_blocks=3)
    k, v = _blocks(16, 6)
    for i in range(16):
        store.append(k[i : i + 1], v[i : i + 1])
    assert sorted(written) == list(range(14))  # all but the 2 newest, each exactly once
    rng = random.Random(2)
    for _ in range(40):
        ids = rng.sample(range(16), 3)
        on_device = {b for b in ids if b in store.block_slot}
        in_ram = {b for b in ids if b in store.host}
        read.clear()
        gk, _ = store.gather(torch.tensor(ids))
        assert torch.equal(gk, _expected(k, ids))
        # Only selected blocks that were in neither the device cache nor RAM were read from disk, once each.
        assert sorted(read) == sorted(set(ids) - on_device - in_ram)
    assert len(written) == len(set(written)), "a block already on disk was written again"


def test_truncate_rolls_back_every_tier():
    store = _store(3)
    k, v = _blocks(12, 7)
    store.append(k, v)
    store.gather(torch.tensor([0, 6, 11]))  # some blocks in the device cache, some promoted to RAM
    store.truncate(5)
    assert store.num_blocks == 5 and store.disk_blocks() <= 5 and store.host_blocks() <= 3
    assert all(b < 5 for b in store.block_slot) and all(b < 5 for b in store.host.block_ids())
    k2, v2 = _blocks(4, 8)  # new, different blocks 5..8
    store.append(k2, v2)
    both = torch.cat((k[:5], k2))
    for ids in ([0, 5, 8], [4, 6, 7], [1, 2, 3]):
        assert torch.equal(store.gather(torch.tensor(ids))[0], _expected(both, ids))
    with pytest.raises(ValueError):
        store.truncate(10)


def test_a_failed_spill_loses_nothing(monkeypatch):
    store = _store(3)
    k, v = _blocks(8, 9)
    store.append(k[:5], v[:5])  # blocks 0, 1 already spilled; the disk tier exists
    commit = DiskTier._commit_index

    def crash(self, entries):
        raise OSError("simulated crash")

    monkeypatch.setattr(DiskTier, "_commit_index", crash)
    with pytest.raises(DiskTierError):
        store.append(k[5:6], v[5:6])  # needs to move block 2 to disk first
    assert store.num_blocks == 5 and store.host_blocks() == 3  # the append did not happen, nothing was lost
    assert all(torch.equal(store.host_block(b)[0], k[b]) for b in range(5))  # (reads without moving blocks)
    monkeypatch.setattr(DiskTier, "_commit_index", commit)
    assert torch.equal(store.gather(torch.arange(4))[0], _expected(k, [0, 1, 2, 3]))
    store.append(k[5:], v[5:])
    assert torch.equal(store.gather(torch.tensor([2, 5, 7]))[0], _expected(k, [2, 5, 7]))
    # The spill folder reopens with exactly the blocks that were committed.
    reopened = DiskTier.open(store.disk_path)
    assert reopened.block_ids() == store.disk.block_ids()


def test_an_append_larger_than_the_budget_that_fails_can_be_retried(monkeypatch):
    store = _store(2)
    k, v = _blocks(9, 12)
    store.append(k[:3], v[:3])
    commit = DiskTier._commit_index
    calls = []

    def crash_second(self, entries):  # the room-making spill succeeds, the direct write of new blocks fails
        calls.append(1)
        if len(calls) == 2:
            raise OSError("simulated crash")
        commit(self, entries)

    monkeypatch.setattr(DiskTier, "_commit_index", crash_second)
    with pytest.raises(DiskTierError):
        store.append(k[3:9], v[3:9])
    assert store.num_blocks == 3 and store.disk.block_ids() == [0, 1, 2]
    monkeypatch.setattr(DiskTier, "_commit_index", commit)
    store.append(k[3:9], v[3:9])
    for ids in ([0, 4, 8], [1, 2, 3], [5, 6, 7]):
        assert torch.equal(store.gather(torch.tensor(ids))[0], _expected(k, ids))


def test_a_failed_read_leaves_no_device_slot_naming_a_block_it_did_not_load(monkeypatch):
    store = _store(1, cache_blocks=3)
    k, v = _blocks(6, 13)
    store.append(k, v)
    store.gather(torch.tensor([0, 1, 2]))
    read_many_into = DiskTier.read_many_into

    def fail(self, block_ids, outs):
        raise OSError("simulated read error")

    monkeypatch.setattr(DiskTier, "read_many_into", fail)
    with pytest.raises(OSError):
        store.gather(torch.tensor([3, 4]))
    monkeypatch.setattr(DiskTier, "read_many_into", read_many_into)
    for ids in ([3, 4], [0, 3, 4], [1, 2, 5]):
        assert torch.equal(store.gather(torch.tensor(ids))[0], _expected(k, ids))


def test_state_dict_round_trips_across_tiers():
    store = _store(2)
    k, v = _blocks(9, 10)
    store.append(k, v)
    state = store.state_dict()
    assert torch.equal(state["k"], k) and torch.equal(state["v"], v)
    other = _store(3)
    other.load_state_dict(state)
    assert other.num_blocks == 9 and other.host_bytes() <= 3 * other.layout.record_bytes
    assert torch.equal(other.gather(torch.tensor([0, 4, 8]))[0], _expected(k, [0, 4, 8]))


def test_a_store_reopens_from_its_folder_without_reading_it(tmp_path):
    """What saved sessions build on: flush writes only what is missing; attach maps a folder, reads nothing."""
    layout = BlockLayout(HKV, B, D, torch.float32)
    first = _store(2)
    first.set_disk(DiskTier(tmp_path / "blocks", layout), 0)
    k, v = _blocks(7, 11)
    first.append(k, v)
    spilled = first.disk_writes
    first.flush()
    assert first.disk_writes == spilled + 2  # only the two blocks that were only in RAM
    assert first.disk.has_prefix(7)
    second = _store(2)
    second.set_disk(DiskTier.open(tmp_path / "blocks"), 6)  # reopened, rolled back to 6 blocks
    assert second.num_blocks == 6 and second.host_blocks() == 0 and second.disk_reads == 0
    assert torch.equal(second.gather(torch.tensor([0, 3, 5]))[0], _expected(k, [0, 3, 5]))
    assert second.disk_reads == 3
    with pytest.raises(ValueError, match="does not hold"):
        _store(2).set_disk(DiskTier.open(tmp_path / "blocks"), 9)


# --- settings and the whole engine ---------------------------------------------------------------------------


@pytest.mark.parametrize("changes,words", [
    (dict(host_cache_bytes=-1), ["host_cache_bytes", "-1"]),
    (dict(host_cache_bytes=True), ["host_cache_bytes", "True"]),
    (dict(host_cache_bytes=1.5), ["host_cache_bytes", "1.5"]),
    (dict(disk_dir="/tmp/x"), ["disk_dir", "host_cache_bytes"]),
    (dict(host_cache_bytes=0, disk_dir=""), ["disk_dir", "''"]),
])
def test_tier_settings_are_validated(changes, words):
    with pytest.raises(ValueError) as error:
        InfLLMConfig(**changes)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_budget_is_split_over_layers_and_spill_folders_are_temporary(tmp_path):
    settings = tier_settings(1000, str(tmp_path), 3)
    assert [s.host_budget_bytes for s in settings] == [333] * 3
    assert settings[0].spill is settings[2].spill and len({s.name for s in settings}) == 3
    assert all(s.host_budget_bytes is None for s in tier_settings(None, None, 2))
    stale = tmp_path / f"{SPILL_PREFIX}999999999-x"  # left by a process that no longer exists
    stale.mkdir()
    spill = settings[0].spill
    folder = spill.folder("layer-000")
    assert folder.parent.parent == tmp_path and folder.parent.name.startswith(f"{SPILL_PREFIX}{os.getpid()}-")
    assert not stale.exists()
    root = spill.root
    del settings, spill
    gc.collect()
    assert not root.exists()


@pytest.mark.parametrize("policy,decay", [("lru", None), ("lru-s", 0.9), ("fifo", None)])
def test_engine_with_a_tiny_host_budget_gives_the_same_logits(tmp_path, policy, decay):
    model = tiny_model("llama")
    base = InfLLMConfig(num_sink_tokens=4, local_window=32, block_size=8, repr_tokens=2, topk_blocks=3,
                        chunk_size=16, device_cache_blocks=4, storage_dtype="float32", kernel_backend="torch",
                        cache_policy=policy, score_decay=decay)
    layout = BlockLayout(2, 8, 16, torch.float32)  # tiny llama: 2 KV heads of 16 dims
    budget = 2 * layout.record_bytes * 2  # two blocks per layer, two layers
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    reference = Engine(model, None, base)
    tiered = Engine(model, None, base.replace(host_cache_bytes=budget, disk_dir=str(tmp_path)))
    for engine in (reference, tiered):
        engine.feed(ids[:200])
    snap = tiered.snapshot()
    ref_snap = reference.snapshot()
    for start in range(200, 300, 25):
        expected = reference.feed(ids[start : start + 25])
        torch.testing.assert_close(tiered.feed(ids[start : start + 25]), expected, atol=0, rtol=0)
    layers = tiered.memory.layers
    assert all(layer.blocks.host_bytes() <= budget // 2 for layer in layers)
    assert sum(layer.blocks.disk_reads for layer in layers) > 0
    assert any(tmp_path.glob(f"{SPILL_PREFIX}*/layer-001/blocks.data"))
    # Rollback across tiers, then the same continuation again.
    tiered.restore(snap), reference.restore(ref_snap)
    torch.testing.assert_close(tiered.feed(ids[200:260]), reference.feed(ids[200:260]), atol=0, rtol=0)
    # A saved state restores into an engine with another budget, with the same next logits.
    fresh = Engine(model, None, base.replace(host_cache_bytes=3 * layout.record_bytes * 2))
    fresh.load_state_dict(tiered.state_dict())
    torch.testing.assert_close(fresh.feed(ids[260:270]), reference.feed(ids[260:270]), atol=0, rtol=0)


def test_a_side_stream_for_block_copies_is_refused_off_cuda():
    with pytest.raises(ValueError, match="side stream .* CUDA device"):
        BlockStore(HKV, B, D, storage_dtype=torch.float16, compute_dtype=torch.float32, device=CPU, cache_blocks=4,
                   side_stream=True)
