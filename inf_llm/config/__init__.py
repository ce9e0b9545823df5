"""InfLLM settings: the schema (`schema.py`), loading YAML files (`files.py`), the reference InfLLM's format
(`reference.py`) and the shipped presets (`presets.py`)."""
