"""Generation: the `Engine` (`engine.py`), sampling (`sampling.py`), the reply's text (`decoding.py`), and handing
freed heap memory back after a long read (`host_memory.py`)."""
