"""Plain-torch attention primitives: the reference for the Triton kernels and the CPU path.

InfLLM (ALGORITHM.md section 2) computes each chunk as partial attentions over key sets with position masks,
merged exactly by log-sum-exp. Every primitive here has a Triton twin in `triton_attention.py` with the same
signature; `inf_llm.kernels.resolve_ops` picks one explicitly.

Masks are defined on the relative distance ``rel = (i + q_offset) - j`` between query row ``i`` and key
column ``j``:

- ``"none"``: every key is visible;
- ``"causal"``: ``rel >= 0``;
- ``"band"``: ``0 <= rel < window`` (the local window, the query itself included);
- ``"complement"``: ``rel >= window`` (what the band leaves out, attended in the global stage).

Grouped-query attention: query head ``h`` reads key/value head ``h // (Hq // Hkv)``.
"""

from __future__ import annotations

import functools

import torch

MASKS = ("none", "causal", "band", "complement")


@functools.lru_cache(maxsize=64)
def visible_mask(tq: int, tk: int, mask: str, q_offset: int, window: int, device: torch.device) -> torch.Tensor | None:
    """Boolean (Tq, Tk) matrix of visible (query, key) pairs, or None when all are visible.

    Cached: prefill and decode repeat the same few shapes, and building the mask costs as much as applying it.
    The result is shared, so callers must not modify it.
    """
    if mask == "none":
        return None
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    rel = (torch.arange(tq, device=device)[:, None] + q_offset) - torch.arange(tk, device=device)[None, :]
    if mask == "causal":
        return rel >= 0
    if mask == "band":
        return (rel >= 0) & (rel < window)
    return rel >= window


def _grouped_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    # q: (B, Hq, Tq, D), k: (B, Hkv, Tk, D) -> logits (B, Hkv, G, Tq, Tk) in float32, without repeating k.
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    # Scale the (smaller) queries rather than the logits: one pass over Tq x D instead of Tq x Tk.
    qg = (q.float() * scale).reshape(b, hkv, (hq // hkv) * tq, d)
    logits = torch.matmul(qg, k.float().transpose(-1, -2))
    return logits.view(b, hkv, hq // hkv, tq, k.shape[2])


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    mask: str = "none",
    q_offset: int = 0,
    window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over ``k``/``v`` under ``mask``, as a mergeable partial result.

    q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D).
    Returns ``out`` (B, Hq, Tq, D) float32 and ``lse`` (B, Hq, Tq) float32 (natural log). A query that sees no
    key gets ``out = 0`` and ``lse = -inf``, so that merging it with another partial result is a no-op.
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if tk == 0:
        return q.new_zeros((b, hq, tq, v.shape[-1]), dtype=torch.float32), q.new_full((b, hq, tq), -torch.inf, dtype=torch.float32)
    logits = _grouped_logits(q, k, scale)  # (B, Hkv, G, Tq, Tk)
    visible = visible_mask(tq, tk, mask, q_offset, window, q.device)
    if visible is not None:
        logits.masked_fill_(~visible, -torch.inf)
    lse = torch.logsumexp(logits, dim=-1)  # (B, Hkv, G, Tq)
    # Rows with no visible key have lse = -inf; subtracting a finite stand-in keeps them at probability 0.
    probs = logits.sub_(torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1)).exp_()  # in place: no new Tq x Tk buffer
    out = torch.matmul(probs.view(b, hkv, -1, tk), v.float()).view(b, hq, tq, v.shape[-1])
    return out, lse.reshape(b, hq, tq)


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets (out: (B, H, T, D), lse: (B, H, T))."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return out_a * w_a + out_b * w_b, lse


def key_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    lse: torch.Tensor,
    *,
    mask: str = "none",
    q_offset: int = 0,
    window: int = 0,
) -> torch.Tensor:
    """Attention probability mass each key receives, summed over the queries.

    q: (B, Hq, Tq, D); k: (B, Hkv, Tk, D); lse: (B, Hq, Tq), the log-normaliser of the *whole* attention the
    queries took part in (after merging), so that the masses are the final attention weights.
    Returns (B, Hq, Tk) float32.
    """
    b, hq, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    logits = _grouped_logits(q, k, scale)  # (B, Hkv, G, Tq, Tk)
    safe = torch.where(torch.isinf(lse), torch.inf, lse).view(b, hkv, hq // hkv, tq, 1)
    probs = logits.sub_(safe).exp_()
    visible = visible_mask(tq, tk, mask, q_offset, window, q.device)
    if visible is not None:
        probs.masked_fill_(~visible, 0.0)
    return probs.sum(dim=-2).reshape(b, hq, tk)
