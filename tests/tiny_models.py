"""Tiny random checkpoints of every supported family (no downloads) and a dense InfLLM reference.

The dense reference is the oracle of docs/METHOD.md section 4: for each query at position p and each key at
position j <= p it applies the position rule directly, over the whole sequence at once:

- ``p - j < window``: the true relative distance (RoPE at p and j);
- otherwise, for inf-llm (all blocks retrieved): the query at distance `window`, the key at position 0;
  for infinite-lm: the same, sinks (j < num_sink_tokens) only; for stream-llm: sinks only, at their true
  positions, the query at min(p, sinks + window - 1).

It uses the model's rotary module directly, not `inf_llm.model.rope`, and one softmax over all visible keys.
"""

from __future__ import annotations

import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def tiny_config(family: str, **overrides):
    kwargs = dict(_COMMON, **overrides)
    if family == "llama":
        return LlamaConfig(**kwargs)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **kwargs)
    if family == "qwen2":
        return Qwen2Config(**kwargs)
    if family == "qwen3":
        return Qwen3Config(head_dim=16, **kwargs)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    model.eval().requires_grad_(False)
    # Random init gives near-uniform attention; sharpen queries so that positions and retrieval matter.
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.mul_(4.0)
    return model


def stock_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The unpatched model's logits (T, V) with its own eager attention and true positions."""
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        return model(input_ids=ids[None], use_cache=False).logits[0].float()


_DENSE = {}


def _dense_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, dense_rule=None, **kwargs):
    method, window, sinks, rotary_emb, chunk_last, distance, ordered_until, ordered_rows, far_bias, near = dense_rule
    _, hq, t, d = query.shape
    group = hq // key.shape[1]
    q = query[0].float()  # (Hq, T, D) unrotated (position ids were 0)
    k = key[0].float().repeat_interleave(group, dim=0)
    v = value[0].float().repeat_interleave(group, dim=0)
    pos = torch.arange(t, device=q.device)
    if isinstance(distance, torch.Tensor):  # a distance per query
        distance = distance.to(q.device)
    farthest = int(distance.max()) if isinstance(distance, torch.Tensor) else distance
    if isinstance(window, torch.Tensor):  # a window per query (wide_window)
        window = window.to(q.device)
    widest = int(window.max()) if isinstance(window, torch.Tensor) else window
    band = window[:, None] if isinstance(window, torch.Tensor) else window  # against rel (T, T)
    cos, sin = rotary_emb(q, torch.arange(max(t, widest + sinks + 1, farthest + t), device=q.device)[None])  # (P, D)
    scale0 = cos[0, 0, 0]
    cos, sin = cos[0] / scale0, sin[0] / scale0  # the model already applied its position-0 factor

    def rot(x, p):
        half = x.shape[-1] // 2
        return x * cos[p] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[p]

    local = rot(q, pos) @ rot(k, pos).transpose(-1, -2)  # (Hq, T, T): true relative distance
    rel = pos[:, None] - pos[None, :]
    if method == "stream-llm":
        q_pos = torch.minimum(pos, torch.as_tensor(sinks + window - 1, device=q.device))
        far = rot(q, q_pos) @ rot(k, pos).transpose(-1, -2)
    else:
        far = rot(q, distance if isinstance(distance, torch.Tensor) else torch.full_like(pos, distance)) @ k.transpose(-1, -2)
        if chunk_last is not None:
            # distance chunk_last - j, moved by what memory_distance adds to the window; with ordered_until, only
            # for the queries of chunks that end within the first ordered_until positions
            last = chunk_last.to(q.device)
            ordered = rot(q, last + (distance - window)) @ rot(k, pos).transpose(-1, -2)
            rows = torch.ones_like(pos, dtype=torch.bool) if ordered_until is None else last + 1 <= ordered_until
            if ordered_rows is not None:
                rows = rows & ordered_rows.to(q.device)
            far = torch.where(rows[:, None], ordered, far)
    if near is not None:  # these far keys at their own distance
        near_distance, near_keys = near
        far = torch.where(near_keys.to(q.device), rot(q, torch.full_like(pos, near_distance)) @ k.transpose(-1, -2), far)
    logits = torch.where(rel < band, local, far) * scaling
    if far_bias is not None:
        logits = logits - torch.where(rel < band, 0.0, far_bias.to(q.device)[:, None])
    visible = rel >= 0
    if method != "inf-llm":
        visible &= (rel < band) | (pos[None, :] < sinks)
    logits = logits.masked_fill(~visible, -torch.inf)
    out = torch.softmax(logits, dim=-1) @ v  # (Hq, T, D)
    return out.transpose(0, 1)[None].to(query.dtype), None


AttentionInterface.register("inf_llm_dense_reference", _dense_attention)


def dense_logits(model, ids: torch.Tensor, method: str, window: int | torch.Tensor, sinks: int,
                 chunk_last: torch.Tensor | None = None, distance: int | torch.Tensor | None = None,
                 ordered_until: int | None = None, ordered_rows: torch.Tensor | None = None,
                 far_bias: torch.Tensor | None = None, near: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits (T, V) of the dense reference for the given rule.

    window: the local window, or a tensor (T,) giving each query its own (`wide_window`); InfLLM's far keys at
    the query's window's distance unless `distance` says otherwise.

    chunk_last (T,): with it, InfLLM's far keys sit at their distance from the last query of the query's chunk
    (`memory_positions: ordered` with every block retrieved) instead of at distance `window`.
    distance: InfLLM's far keys at this distance instead of `window` (`memory_distance`; with chunk_last, the
    nearest far key of a chunk at it and the others beyond); a tensor (T,) gives each query its own.
    ordered_until: with chunk_last, the chunk_last rule only for chunks that end within the first ordered_until
    positions, the shared one after (`memory_positions_until`).
    ordered_rows (T,) bool: with chunk_last, the chunk_last rule only for these queries (`decode_memory_positions`).
    far_bias (T,): subtracted from each query's logits of the keys outside its window (`decode_memory_bias`).
    near (distance, (T, T) bool): the far keys marked for each query (row) at that distance instead
    (`sink_memory_distance`, `voted_memory_distance`; shared positions only).
    """
    model.set_attn_implementation("inf_llm_dense_reference")
    rule = (method, window, sinks, model.model.rotary_emb, chunk_last, window if distance is None else distance,
            ordered_until, ordered_rows, far_bias, near)
    with torch.inference_mode():
        out = model(
            input_ids=ids[None],
            position_ids=torch.zeros((1, len(ids)), dtype=torch.long, device=ids.device),
            use_cache=False,
            dense_rule=rule,
        )
    return out.logits[0].float()


def chunk_last_positions(pieces: list[int], chunk_size: int) -> torch.Tensor:
    """(T,): for each position, the last position of the memory chunk it is attended in, when the input is fed
    in these pieces and each piece is cut into chunks of chunk_size."""
    last, start = [], 0
    for n in pieces:
        for offset in range(0, n, chunk_size):
            end = start + min(offset + chunk_size, n)
            last += [end - 1] * (end - start - offset)
        start += n
    return torch.tensor(last)


def run_schedule(model, memory, ids: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Feed ids through an attached memory in pieces of the given sizes; return all logits (T, V)."""
    assert sum(pieces) == len(ids)
    outs, start = [], 0
    with torch.inference_mode():
        for n in pieces:
            chunk = ids[start : start + n][None]
            out = model(input_ids=chunk, logits_to_keep=0, **memory.forward_kwargs(n, chunk.device))
            outs.append(out.logits[0].float())
            start += n
    return torch.cat(outs)
