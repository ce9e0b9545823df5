"""The context memory: a model's (`model_memory.py`, built by `attach.py`; the full-attention baseline in
`full_attention.py`), one layer's state (`layer_state.py`) and attention (`layer_memory.py`), block ranking
(`ranking.py`), retrieval traces (`retrieval_trace.py`) and statistics (`stats.py`)."""
