"""Where each layer's block store may keep blocks beyond its device cache: its share of the host budget, and the
spill folder (shared by the layers) that takes the blocks over it."""

from __future__ import annotations

from dataclasses import dataclass

from inf_llm.storage.spill import SpillDirectory


@dataclass(frozen=True)
class TierSettings:
    """Where one store's blocks may live beyond the device cache."""

    host_budget_bytes: int | None = None  # block records in RAM; None: all of them, no disk tier
    spill: SpillDirectory | None = None  # where blocks over the budget go; None: a temporary folder of its own
    name: str = "blocks"  # this store's subfolder of `spill`


def tier_settings(host_cache_bytes: int | None, disk_dir: str | None, num_layers: int) -> list[TierSettings]:
    """One `TierSettings` per layer: the budget split evenly, one spill folder shared by the layers."""
    if host_cache_bytes is None:
        return [TierSettings() for _ in range(num_layers)]
    spill = SpillDirectory(disk_dir)
    per_layer = host_cache_bytes // num_layers
    return [TierSettings(per_layer, spill, f"layer-{i:03d}") for i in range(num_layers)]
