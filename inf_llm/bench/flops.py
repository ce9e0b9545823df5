"""Compute bounds for the speed benchmark: the machine's matmul peak and the model's FLOPs for a prefill.

Prefill efficiency (issue 5) = model FLOPs / prefill time / matmul peak, all from the same run:

- the peak is the best rate of a torch.matmul loop of the model's MLP shape (a prefill chunk of tokens times
  hidden x intermediate), in the model's dtype, on the same device;
- the model FLOPs are those a perfect implementation must do: 2 per weight per token for the decoder layers'
  linear maps (2 x params), the vocabulary projection for the last position of each model call only (what
  `logits_to_keep=1` computes), and attention: 4 x head_dim x query heads per attended key per layer
  (QK^T and PV). Masked-out work is not counted, so an implementation that computes and discards pays for it.
  For the windowed methods the attended keys per query follow docs/METHOD.md section 2 (window, then sinks,
  retrieved blocks and the remainder); the remainder is approximated by its mean, half a block.
"""

from __future__ import annotations

import math
import time

import torch

from inf_llm.config.schema import InfLLMConfig


def matmul_peak(m: int, k: int, n: int, *, seconds: float = 2.0, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", repeats: int = 3) -> dict:
    """Best GFLOP/s of `(m, k) @ (k, n)` over `repeats` timed loops of about seconds/repeats each."""
    device = torch.device(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn((m, k), generator=generator).to(device, dtype)
    b = torch.randn((k, n), generator=generator).to(device, dtype)
    out = torch.empty((m, n), dtype=dtype, device=device)
    flop = 2.0 * m * k * n
    torch.matmul(a, b, out=out)  # warm-up: thread pools, kernel selection
    _sync(device)
    start = time.perf_counter()
    torch.matmul(a, b, out=out)
    _sync(device)
    one = max(time.perf_counter() - start, 1e-9)
    iters = max(1, int(seconds / repeats / one))
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        _sync(device)
        best = max(best, flop * iters / (time.perf_counter() - start))
    return {"gflops": best / 1e9, "m": m, "k": k, "n": n, "iters": iters, "repeats": repeats,
            "dtype": str(dtype).removeprefix("torch."), "device": str(device)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mlp_shape(model_config, prefill_chunk: int) -> tuple[int, int, int]:
    """(m, k, n) of the model's up-projection over one prefill chunk."""
    return prefill_chunk, model_config.hidden_size, model_config.intermediate_size


def decoder_params(model: torch.nn.Module) -> int:
    """Weights of the decoder layers' linear maps (norms and embeddings excluded)."""
    return sum(module.weight.numel() for module in model.model.layers.modules()
               if isinstance(module, torch.nn.Linear))


def attended_keys(config: InfLLMConfig, length: int) -> int:
    """Keys attended in total by the queries at positions 0..length-1 (one layer, one head)."""
    p = torch.arange(length, dtype=torch.float64)
    seen = p + 1  # keys at or before the query
    if config.method == "full":
        return int(seen.sum().item())
    window = torch.full_like(p, config.local_window)
    if config.wide_window is not None:  # the wide window for the first wide_window_until tokens (chunks ignored)
        window = torch.where(seen <= config.wide_window_until, float(config.wide_window), window)
    local = torch.minimum(seen, window)
    evicted = torch.clamp(seen - window, min=0)
    if config.method in ("stream-llm", "infinite-lm"):
        far = torch.clamp(evicted, max=config.num_sink_tokens)
    else:
        beyond_sinks = torch.clamp(evicted - config.num_sink_tokens, min=0)
        blocks = torch.floor(beyond_sinks / config.block_size)
        retrieved = torch.clamp(blocks, max=config.topk_blocks) * config.block_size
        remainder = torch.clamp(beyond_sinks - blocks * config.block_size, max=config.block_size / 2)
        far = torch.clamp(evicted, max=config.num_sink_tokens) + retrieved + remainder
    return int((local + far).sum().item())


def prefill_flops(model: torch.nn.Module, config: InfLLMConfig, length: int, prefill_chunk: int) -> dict:
    """Model FLOPs of prefilling `length` tokens with `config`, split into linear, vocabulary and attention."""
    mc = model.config
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    linear = 2 * decoder_params(model) * length
    vocab = 2 * mc.hidden_size * mc.vocab_size * math.ceil(length / prefill_chunk)
    attention = 4 * head_dim * mc.num_attention_heads * mc.num_hidden_layers * attended_keys(config, length)
    return {"linear": linear, "vocab": vocab, "attention": attention, "total": linear + vocab + attention}


def kv_bytes_per_token(model_config, bytes_per_value: int = 2) -> int:
    """K and V of one token over all layers (default 16-bit): the yardstick of memory growth."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return 2 * model_config.num_hidden_layers * model_config.num_key_value_heads * head_dim * bytes_per_value
