"""Where memory blocks are kept: the block store (`block_store.py`: device-slot cache and tiers), its host and disk
tiers (`host_tier.py`, `disk_tier.py`, `spill.py`, `tier_settings.py`), record formats (`block_layout.py`,
`row_layout.py`, `quantization.py`, `dtypes.py`), cache policies (`cache_policy.py`), and file helpers (`files.py`)."""
