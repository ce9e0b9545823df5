"""The context memory of a whole model: one `LayerMemory` per decoder layer, plus the full-attention baseline.

Both kinds share one small interface used by the engine: `forward_kwargs()` (what the model call needs),
`snapshot()` / `restore()` (cheap rollback to a turn boundary), `state_dict()` / `load_state_dict()`
(sessions), `stats()` (what the chat and the benchmarks show), and `num_tokens`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from inf_llm.block_store import tier_settings
from inf_llm.config import InfLLMConfig
from inf_llm.kernels import resolve_ops
from inf_llm.layer_memory import LayerMemory, LayerShape
from inf_llm.placement import layer_device
from inf_llm.retrieval_trace import RetrievalTrace
from inf_llm.rope import RotaryTable

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8}


@dataclass(frozen=True)
class MemoryStats:
    """Per-model totals (summed over layers unless said otherwise)."""

    tokens: int  # tokens fed into the memory so far (positions)
    window_tokens: int  # per layer
    sink_tokens: int  # per layer
    remainder_tokens: int  # per layer
    block_tokens: int  # per layer
    blocks: int  # per layer
    device_blocks: int  # resident in the device cache, all layers
    host_blocks: int  # in the host store, all layers
    cache_hits: int
    cache_misses: int
    host_bytes: int
    device_bytes: int

    @property
    def cache_hit_rate(self) -> float | None:
        total = self.cache_hits + self.cache_misses
        return self.cache_hits / total if total else None


def storage_dtype_for(config: InfLLMConfig, model_dtype: torch.dtype) -> torch.dtype:
    if config.storage_dtype != "auto":
        return _DTYPES[config.storage_dtype]
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.model.layers


class InfLLMMemory:
    """InfLLM (and its stream-llm / infinite-lm baselines) for every layer of a patched model."""

    def __init__(self, model: torch.nn.Module, config: InfLLMConfig):
        if config.method == "full":
            raise ValueError("method 'full' uses FullAttentionMemory, not InfLLMMemory")
        mc = model.config
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        shape = LayerShape(mc.num_attention_heads, mc.num_key_value_heads, head_dim)
        self.config, self.shape = config, shape
        # Positions used: local keys 0..window+chunk-1; stream-llm's query up to sinks+window-1; with ordered
        # memory positions, the global keys 0..G-1 and the query at window+G-1, G = every global key a chunk
        # attends (sinks, retrieved blocks, the remainder under one block, the chunk's complement keys).
        max_position = config.local_window + config.chunk_size + config.num_sink_tokens + 1
        if config.method == "inf-llm" and config.memory_positions == "ordered":
            max_position += (config.retrieved_blocks + 1) * config.block_size  # + 1: the remainder
        tables: dict[torch.device, RotaryTable] = {}
        ops_for: dict[torch.device, object] = {}
        self.layers: list[LayerMemory] = []
        layers = decoder_layers(model)
        tiers = tier_settings(config.host_cache_bytes, config.disk_dir, len(layers))
        for index, layer in enumerate(layers):
            # Each layer's memory lives with that layer's weights, so it shards with a device_map.
            weight = layer.self_attn.q_proj.weight
            device = layer_device(layer)  # not weight.device: an offloaded layer's weights sit on "meta"
            if device not in tables:
                tables[device] = RotaryTable(model.model.rotary_emb, head_dim, max_position, device)
                ops_for[device] = resolve_ops(config.kernel_backend, device)
            self.layers.append(
                LayerMemory(
                    config,
                    shape,
                    tables[device],
                    ops_for[device],
                    dtype=weight.dtype,
                    storage_dtype=storage_dtype_for(config, weight.dtype),
                    device=device,
                    tiers=tiers[index],
                )
            )
        for index, layer in enumerate(self.layers):
            layer.index = index

    @property
    def num_tokens(self) -> int:
        return self.layers[0].num_seen

    def start_trace(self) -> RetrievalTrace:
        """Record what retrieval does from now on (see retrieval_trace.py), until `stop_trace`."""
        trace = RetrievalTrace(self.config.block_size, self.config.num_sink_tokens)
        for layer in self.layers:
            layer.trace = trace
        return trace

    def stop_trace(self) -> None:
        for layer in self.layers:
            layer.trace = None

    def forward_kwargs(self, num_new: int, device: torch.device) -> dict:
        # Position ids of 0 make the model's own RoPE the identity; the layers rotate q and k themselves.
        return {
            "position_ids": torch.zeros((1, num_new), dtype=torch.long, device=device),
            "use_cache": False,
            "inf_llm_memory": self,
        }

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def snapshot(self) -> list[dict]:
        return [layer.snapshot() for layer in self.layers]

    def restore(self, snap: list[dict]) -> None:
        for layer, s in zip(self.layers, snap):
            layer.restore(s)

    def state_dict(self) -> dict:
        return {"layers": [layer.state_dict() for layer in self.layers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["layers"]) != len(self.layers):
            raise ValueError(f"saved memory has {len(state['layers'])} layers, the model has {len(self.layers)}")
        for layer, s in zip(self.layers, state["layers"]):
            layer.load_state_dict(s)

    def stats(self) -> MemoryStats:
        counts = [layer.counts() for layer in self.layers]
        first = counts[0]
        return MemoryStats(
            tokens=self.num_tokens,
            window_tokens=first["window"],
            sink_tokens=first["sinks"],
            remainder_tokens=first["remainder"],
            block_tokens=first["blocks"] * self.config.block_size,
            blocks=first["blocks"],
            device_blocks=sum(c["resident_blocks"] for c in counts),
            host_blocks=sum(c["blocks"] for c in counts),
            cache_hits=sum(c["hits"] for c in counts),
            cache_misses=sum(c["misses"] for c in counts),
            host_bytes=sum(c["host_bytes"] for c in counts),
            device_bytes=sum(c["device_bytes"] for c in counts),
        )


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
