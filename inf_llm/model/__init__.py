"""The transformers side: loading checkpoints (`loading.py`), the attention registry and what is refused (`hf.py`),
rotary tables (`rope.py`), devices under a device_map (`placement.py`). Nothing here imports the memory."""
