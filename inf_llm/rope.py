"""Rotary position embedding at the positions InfLLM chooses (ALGORITHM.md section 2, steps 1 and 3).

The model is run with every position id set to 0, so its own RoPE leaves queries and keys unrotated (up to
the constant `attention_scaling` some rope types apply, e.g. yarn). InfLLM then rotates them itself: local
keys and queries at their true distance within the window, the global stage's query at the fixed distance
`local_window` with its keys left at position 0. The cos/sin table comes from the model's own rotary module,
so every rope scaling variant that is a pure function of position stays exact.
"""

from __future__ import annotations

import torch

# Rope types whose cos/sin depend on the sequence length seen so far, not only on the position: a bounded
# window of positions cannot reproduce them, so they are refused at load time.
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryTable:
    """cos/sin of the model's rotary embedding for positions 0..max_position-1, divided by the value at 0.

    The model already multiplied q and k by its rotary output at position 0 (cos0 = attention_scaling, sin0 = 0);
    dividing the table by cos0 makes `rotate(x, p)` equal the model's own rotation at position p.
    """

    def __init__(self, rotary_emb: torch.nn.Module, head_dim: int, max_position: int, device: torch.device):
        positions = torch.arange(max_position, device=device)[None, :]
        probe = torch.zeros(1, 1, head_dim, dtype=torch.float32, device=device)
        with torch.no_grad():
            cos, sin = rotary_emb(probe, positions)
        cos, sin = cos[0].float(), sin[0].float()  # (P, D)
        if cos.shape[-1] != head_dim:
            raise ValueError(
                f"the model's rotary embedding covers {cos.shape[-1]} of {head_dim} head dimensions; "
                "partial rotary embeddings are not supported"
            )
        scale0 = cos[0]
        if not torch.allclose(sin[0], torch.zeros_like(sin[0])) or not torch.allclose(scale0, scale0[0].expand_as(scale0)):
            raise ValueError("the model's rotary embedding is not a plain rotation scaled by a constant at position 0")
        self.attention_scaling = float(scale0[0])
        self.cos = cos / self.attention_scaling  # (P, D)
        self.sin = sin / self.attention_scaling
        self.max_position = max_position

    def rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x (..., T, D) to positions start..start+T-1, in float32."""
        t = x.shape[-2]
        if start < 0 or start + t > self.max_position:
            raise IndexError(f"positions {start}..{start + t - 1} are outside the table of {self.max_position}")
        cos, sin = self.cos[start : start + t], self.sin[start : start + t]
        x = x.float()
        return x * cos + rotate_half(x) * sin

    def rotate_at(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """Rotate every row of x (..., T, D) to the same position, in float32."""
        x = x.float()
        return x * self.cos[position] + rotate_half(x) * self.sin[position]

    def rotate_positions(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (..., T, D) to the given positions (T,), in float32."""
        x = x.float()
        return x * self.cos[positions] + rotate_half(x) * self.sin[positions]
