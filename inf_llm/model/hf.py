"""The one place InfLLM meets transformers: its public attention registry (`AttentionInterface`).

transformers 5 looks the attention function up by `config._attn_implementation` and passes extra keyword
arguments of the model's forward through to it. We register ``"inf_llm"``, switch the model to it
(`inf_llm.memory.attach`), and hand each call the model's `InfLLMMemory` as ``inf_llm_memory=``; with no mask function registered for that name,
transformers builds no mask (our layers mask by position themselves). No `forward` is replaced.

Tested with transformers 5.17-5.24 (`TRANSFORMERS_RANGE`); `tests/test_hf_surface.py` fails the day this
surface moves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import transformers
from transformers import AttentionInterface

from inf_llm.config.schema import InfLLMConfig
from inf_llm.model.rope import LENGTH_DEPENDENT_ROPE_TYPES, SUPPORTED_ROPE_TYPES

if TYPE_CHECKING:  # the memory builds on this module (inf_llm/memory/attach.py), not the other way
    from inf_llm.memory.model_memory import InfLLMMemory

ATTN_NAME = "inf_llm"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TRANSFORMERS_RANGE = ("5.17", "6")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or rope type cannot run with InfLLM."""


def inf_llm_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    inf_llm_memory: InfLLMMemory | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query: (1, Hq, T, D), key/value: (1, Hkv, T, D), unrotated. Returns (1, T, Hq, D) as transformers expects."""
    if inf_llm_memory is None:
        raise RuntimeError(
            "the model is patched for InfLLM but was called without `inf_llm_memory=`; "
            "drive it through inf_llm.Engine (or pass memory.forward_kwargs(...))"
        )
    if query.shape[0] != 1:
        raise ValueError(f"InfLLM keeps one conversation per memory: batch size must be 1, got {query.shape[0]}")
    out = inf_llm_memory.layers[module.layer_idx].forward(query[0], key[0], value[0], scaling)  # (Hq, T, D)
    return out.transpose(0, 1).unsqueeze(0).to(query.dtype), None


AttentionInterface.register(ATTN_NAME, inf_llm_attention)


def check_supported(model_config) -> None:
    """Refuse, with a clear message, what InfLLM cannot run exactly."""
    model_type = getattr(model_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; InfLLM chat runs {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    rope = getattr(model_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        why = (
            "its rotation depends on the sequence length, which InfLLM's bounded positions cannot reproduce"
            if rope_type in LENGTH_DEPENDENT_ROPE_TYPES
            else "it has not been validated with InfLLM"
        )
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported ({why}); supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )


def check_transformers_version() -> None:
    from packaging.version import Version

    low, high = TRANSFORMERS_RANGE
    if not Version(low) <= Version(transformers.__version__) < Version(high):
        raise RuntimeError(f"transformers {transformers.__version__} is outside the tested range [{low}, {high})")


def check_config_for_model(config: InfLLMConfig, model_config) -> None:
    """Settings that are only impossible for a given model's shape."""
    if config.method == "inf-llm" and config.per_head_ranking:
        needed = config.topk_blocks * model_config.num_key_value_heads
        if needed > config.device_cache_blocks:
            raise ValueError(
                f"per_head_ranking retrieves up to topk_blocks x num_key_value_heads = {needed} blocks per chunk, "
                f"more than device_cache_blocks={config.device_cache_blocks}; raise device_cache_blocks to at least {needed}"
            )
