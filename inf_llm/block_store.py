"""Memory blocks of one layer: a host store and a bounded cache on the compute device (ALGORITHM.md section 1).

Blocks are append-only in the host store (16-bit by default). Retrieval asks for a few of them per chunk;
they are copied into a fixed number of device slots (`device_cache_blocks`) chosen by the cache policy:

- ``lru``: evict the slot used longest ago;
- ``lru-s``: evict the slot with the lowest decayed selection score (each retrieval multiplies every score by
  `score_decay` and adds 1 to the selected blocks);
- ``fifo``: evict the slot loaded longest ago.

The policy changes speed only: whatever is evicted, the gathered K/V are the stored values. Blocks asked for in
the current request are never evicted by it.
"""

from __future__ import annotations

import torch


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
    ):
        self.num_kv_heads, self.block_size, self.head_dim = num_kv_heads, block_size, head_dim
        self.storage_dtype, self.compute_dtype = storage_dtype, compute_dtype
        self.device = device
        self.policy, self.score_decay = policy, score_decay
        self.pin = device.type == "cuda"
        shape = (0, num_kv_heads, block_size, head_dim)
        self._host_k = self._host_empty(shape)
        self._host_v = self._host_empty(shape)
        self.num_blocks = 0
        # Device cache: slot -> block id (-1 = free), per-slot policy key; block id -> slot.
        self.cache_blocks = cache_blocks
        self.dev_k = torch.zeros((cache_blocks, num_kv_heads, block_size, head_dim), dtype=compute_dtype, device=device)
        self.dev_v = torch.zeros_like(self.dev_k)
        self.slot_block = [-1] * cache_blocks
        self.slot_key = [0.0] * cache_blocks
        self.block_slot: dict[int, int] = {}
        self.clock = 0
        self.hits = 0
        self.misses = 0

    def _host_empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=self.storage_dtype, pin_memory=self.pin)

    # --- host store -------------------------------------------------------------------------------------------

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store n new blocks. k, v: (n, Hkv, block_size, D) on any device."""
        n = k.shape[0]
        if self.num_blocks + n > self._host_k.shape[0]:
            # Grow geometrically so that appending stays amortised O(1) per block.
            capacity = max(16, 2 * self._host_k.shape[0], self.num_blocks + n)
            for name in ("_host_k", "_host_v"):
                old = getattr(self, name)
                new = self._host_empty((capacity, *old.shape[1:]))
                new[: self.num_blocks] = old[: self.num_blocks]
                setattr(self, name, new)
        self._host_k[self.num_blocks : self.num_blocks + n].copy_(k, non_blocking=self.pin)
        self._host_v[self.num_blocks : self.num_blocks + n].copy_(v, non_blocking=self.pin)
        self.num_blocks += n

    def host_block(self, block_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored K/V of one block, (Hkv, block_size, D) each, in the storage dtype."""
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block {block_id} does not exist ({self.num_blocks} blocks)")
        return self._host_k[block_id], self._host_v[block_id]

    def truncate(self, num_blocks: int) -> None:
        """Forget blocks num_blocks.. (rollback); their device slots become free."""
        if num_blocks > self.num_blocks:
            raise ValueError(f"cannot truncate {self.num_blocks} blocks to {num_blocks}")
        self.num_blocks = num_blocks
        for block_id, slot in list(self.block_slot.items()):
            if block_id >= num_blocks:
                del self.block_slot[block_id]
                self.slot_block[slot] = -1

    def host_bytes(self) -> int:
        per_block = self.num_kv_heads * self.block_size * self.head_dim * self._host_k.element_size()
        return 2 * self.num_blocks * per_block

    def device_bytes(self) -> int:
        return 2 * self.dev_k.numel() * self.dev_k.element_size()

    # --- device cache -----------------------------------------------------------------------------------------

    def _victim(self, protected: set[int]) -> int:
        free = [s for s, b in enumerate(self.slot_block) if b == -1]
        if free:
            return free[0]
        candidates = [s for s, b in enumerate(self.slot_block) if b not in protected]
        if not candidates:
            raise RuntimeError(
                f"{len(protected)} blocks requested at once but the device cache holds {self.cache_blocks}"
            )
        return min(candidates, key=lambda s: self.slot_key[s])

    def fetch_slots(self, block_ids: list[int]) -> list[int]:
        """Make the given blocks resident on the device and return their slots (same order)."""
        self.clock += 1
        if self.policy == "lru-s":
            self.slot_key = [key * self.score_decay for key in self.slot_key]
        wanted = set(block_ids)
        slots = []
        for block_id in block_ids:
            slot = self.block_slot.get(block_id)
            if slot is None:
                self.misses += 1
                slot = self._victim(wanted)
                old = self.slot_block[slot]
                if old != -1:
                    del self.block_slot[old]
                self.dev_k[slot].copy_(self._host_k[block_id], non_blocking=self.pin)
                self.dev_v[slot].copy_(self._host_v[block_id], non_blocking=self.pin)
                self.slot_block[slot] = block_id
                self.block_slot[block_id] = slot
                self.slot_key[slot] = self.clock if self.policy == "fifo" else 0.0
            else:
                self.hits += 1
            if self.policy == "lru":
                self.slot_key[slot] = self.clock
            elif self.policy == "lru-s":
                self.slot_key[slot] += 1.0
            slots.append(slot)
        return slots

    def gather(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the selected blocks, concatenated along time.

        block_ids: (n,) shared by all KV heads, or (Hkv, n) per KV head.
        Returns k, v: (Hkv, n * block_size, D) in the compute dtype on the device.
        """
        ids = block_ids.tolist()
        flat = sorted(set(ids if block_ids.dim() == 1 else [b for row in ids for b in row]))
        slot_of = dict(zip(flat, self.fetch_slots(flat)))
        if block_ids.dim() == 1:
            slots = torch.tensor([slot_of[b] for b in ids], device=self.device)
            k = self.dev_k[slots].transpose(0, 1)  # (Hkv, n, B, D)
            v = self.dev_v[slots].transpose(0, 1)
        else:
            slots = torch.tensor([[slot_of[b] for b in row] for row in ids], device=self.device)  # (Hkv, n)
            heads = torch.arange(self.num_kv_heads, device=self.device)[:, None]
            k = self.dev_k[slots, heads]  # (Hkv, n, B, D)
            v = self.dev_v[slots, heads]
        hkv, n = k.shape[0], k.shape[1]
        return k.reshape(hkv, n * self.block_size, self.head_dim), v.reshape(hkv, n * self.block_size, self.head_dim)

    def resident_blocks(self) -> int:
        return len(self.block_slot)

    # --- persistence ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"k": self._host_k[: self.num_blocks].clone(), "v": self._host_v[: self.num_blocks].clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.truncate(0)
        self.append(state["k"].to(self.storage_dtype), state["v"].to(self.storage_dtype))
