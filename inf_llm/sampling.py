"""Next-token sampling: greedy, temperature, top-k, top-p, repetition penalty (pure functions on logits)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already generated: positive logits divided, negative multiplied. logits: (V,)."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    logits = logits.clone()
    seen = logits[previous]
    logits[previous] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and the top-p nucleus. logits: (V,)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        logits = logits.clone()
        logits[order[drop]] = -torch.inf
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, previous: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token id from the last position's logits (V,)."""
    logits = apply_repetition_penalty(logits.float(), previous, params.repetition_penalty)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
