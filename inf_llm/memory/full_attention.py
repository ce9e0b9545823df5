"""The full-attention baseline (method `full`): the model's own attention over a growing KV cache, behind the
interface every memory has (see `inf_llm.memory.model_memory`)."""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import DynamicCache

from inf_llm.config.schema import InfLLMConfig
from inf_llm.memory.stats import MemoryStats


def cache_keyword(model: torch.nn.Module) -> str:
    """The name under which the model's forward takes its KV cache.

    transformers renamed `past_key_values` to `cache` within 5.x; an unknown keyword would vanish into the
    forward's ``**kwargs`` and leave the cache empty, so the name is read off the signature, not assumed.
    """
    parameters = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`")


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """Where the model's own attention (`sdpa`) runs: on CUDA, any of torch's kernels but cuDNN's.

    torch 2.11 prefers cuDNN's attention on an H200, and cuDNN builds a graph for each new shape: a decoding step
    never repeats its key length, so every layer paid about 2 ms of host time per token (the full-attention
    baseline decoded at 132 ms per token at 32K tokens, for under 20 ms of kernels). Flash attention has no such
    set-up. Elsewhere nothing changes.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class FullAttentionMemory:
    """The baseline: the model's own attention over a growing KV cache (transformers' DynamicCache)."""

    def __init__(self, model: torch.nn.Module, config: InfLLMConfig):
        self.config = config
        self.model_config = model.config
        self.cache_keyword = cache_keyword(model)
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model_config)

    @property
    def num_tokens(self) -> int:
        return self.cache.get_seq_length()

    def forward_kwargs(self, num_new: int, device: torch.device) -> dict:
        start = self.num_tokens
        return {
            "position_ids": torch.arange(start, start + num_new, device=device)[None],
            self.cache_keyword: self.cache,
            "use_cache": True,
        }

    def snapshot(self) -> int:
        return self.num_tokens

    def restore(self, length: int) -> None:
        # Slice the layers directly: DynamicCache.crop's argument changed meaning within transformers 5.x.
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            if getattr(layer, "sliding_window", None):
                raise NotImplementedError("rolling back a sliding-window KV cache is not supported")
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]

    def _tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers if getattr(layer, "keys", None) is not None]

    def state_dict(self) -> dict:
        return {"layers": [{"k": k.cpu(), "v": v.cpu()} for k, v in self._tensors()]}

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        layers = state["layers"]
        if not isinstance(layers, list) or len(layers) != self.model_config.num_hidden_layers:
            raise ValueError(f"saved memory has {len(layers) if isinstance(layers, list) else 'no list of'} layers, "
                             f"the model has {self.model_config.num_hidden_layers}")
        first = layers[0]["k"] if layers else None
        for layer in layers:
            k, v = layer["k"], layer["v"]
            # (batch 1, KV heads, tokens, head dim), alike in every layer: anything else fails in the model's forward.
            if not all(isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 4 and t.shape[0] == 1
                       and t.shape == first.shape and t.dtype == first.dtype for t in (k, v)):
                raise ValueError("saved memory holds a KV cache of another shape or type in some layer")
        for idx, layer in enumerate(layers):
            self.cache.update(layer["k"], layer["v"], idx)

    def stats(self) -> MemoryStats:
        n = self.num_tokens
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._tensors())
        return MemoryStats(
            tokens=n, window_tokens=n, sink_tokens=0, remainder_tokens=0, block_tokens=0, blocks=0,
            device_blocks=0, host_blocks=0, cache_hits=0, cache_misses=0, host_bytes=0, device_bytes=nbytes,
        )
