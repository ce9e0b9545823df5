"""Attaching a memory to a model: the model switched to the configured method (`inf_llm.model.hf`), and its empty
memory built (`InfLLMMemory`, or the full-attention baseline)."""

from __future__ import annotations

import logging

import torch

from inf_llm.config.schema import InfLLMConfig
from inf_llm.memory.full_attention import FullAttentionMemory
from inf_llm.memory.model_memory import InfLLMMemory
from inf_llm.model.hf import ATTN_NAME, check_config_for_model, check_supported, check_transformers_version

logger = logging.getLogger(__name__)


def attach(model: torch.nn.Module, config: InfLLMConfig) -> InfLLMMemory | FullAttentionMemory:
    """Switch the model to the configured method and build its (empty) memory."""
    try:
        check_transformers_version()
    except RuntimeError as err:
        # setup.py pins the range; someone who installed around it gets told, once per model, not stopped.
        logger.warning("%s: InfLLM may not plug in correctly", err)
    check_supported(model.config)
    check_config_for_model(config, model.config)
    if config.method == "full":
        model.set_attn_implementation("sdpa")
        return FullAttentionMemory(model, config)
    model.set_attn_implementation(ATTN_NAME)
    return InfLLMMemory(model, config)
