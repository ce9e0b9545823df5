"""InfLLM: training-free long-context memory for transformers models (Xiao et al., NeurIPS 2024).

Public API: `load_engine` (model + memory in one call), `Engine`, `InfLLMConfig`, `load_config`,
`SamplingParams`, `GenerationStep`, `MemoryStats`.
"""

from inf_llm.config.files import load_config
from inf_llm.config.schema import ConfigError, InfLLMConfig
from inf_llm.generation.engine import Engine, EngineSnapshot, GenerationStep
from inf_llm.generation.sampling import SamplingParams
from inf_llm.memory.stats import MemoryStats

__all__ = [
    "ConfigError",
    "Engine",
    "EngineSnapshot",
    "GenerationStep",
    "InfLLMConfig",
    "MemoryStats",
    "SamplingParams",
    "load_config",
    "load_engine",
]


def load_engine(model_path=None, config=None, *, device="cpu", dtype=None, prefill_chunk: int = 2048) -> Engine:
    """Load a checkpoint (None: the embedded SmolLM2-135M-Instruct) and attach InfLLM memory to it.

    config: an InfLLMConfig, a path to a YAML preset, or None for the model's default preset.
    """
    from inf_llm.config.presets import default_preset_for
    from inf_llm.model.loading import load_model

    model, tokenizer = load_model(model_path, device=device, dtype=dtype)
    if config is None:
        config = load_config(default_preset_for(None if model_path is None else model.config.model_type)).config
    elif not isinstance(config, InfLLMConfig):
        config = load_config(config).config
    return Engine(model, tokenizer, config, prefill_chunk=prefill_chunk)
