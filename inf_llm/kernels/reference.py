"""Plain-torch attention primitives: the reference for the Triton kernels and the CPU path.

InfLLM (docs/METHOD.md section 2) computes each chunk as partial attentions over key sets with position masks,
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

# Exponentials are taken in base 2, with log2(e) folded into the logits' scale (free inside the matrix product):
# torch's CPU `exp_` falls back to a slow path for any vector holding -inf or an underflowing value, which masked
# and far-from-the-maximum logits always do (1.1 vs 2.1 G/s for a chunk's logits, 2 cores); `exp2_` does not
# (4.8 G/s either way).
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


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


@functools.lru_cache(maxsize=32)
def mask_bias(groups: int, tq: int, tk: int, mask: str, q_offset: int, window: int,
              device: torch.device) -> torch.Tensor | None:
    """`visible_mask` as an additive float32 bias (groups * Tq, Tk): 0 where visible, -inf elsewhere, repeated for
    the `groups` query heads that share a KV head (rows g * Tq + i), or None when all are visible.

    Added inside the logits' matrix product (`baddbmm`), it replaces a scale pass over the queries and a
    masked_fill pass over the logits: 1.9-2.6x faster for a prefill chunk's logits on CPU. Cached like
    `visible_mask`; a steady stream repeats a handful of shapes (chunk at window, chunk at memory + window).
    """
    visible = visible_mask(tq, tk, mask, q_offset, window, device)
    if visible is None:
        return None
    bias = torch.zeros((tq, tk), dtype=torch.float32, device=device).masked_fill_(~visible, -torch.inf)
    return bias.repeat(groups, 1)


def _masked_logits(q: torch.Tensor, k: torch.Tensor, scale: float, mask: str, q_offset: int,
                   window: int) -> torch.Tensor:
    """Scaled logits with the mask's invisible entries at -inf: q (B, Hq, Tq, D), k (B, Hkv, Tk, D) ->
    (B, Hkv, G, Tq, Tk) float32, each KV head's query group in one product (k is not repeated)."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    qg = q.float().reshape(b * hkv, (hq // hkv) * tq, d)
    kt = k.float().reshape(b * hkv, tk, d).transpose(1, 2)
    bias = mask_bias(hq // hkv, tq, tk, mask, q_offset, window, q.device)
    if bias is None:
        # Scale the (smaller) queries rather than the logits: one pass over Tq x D instead of Tq x Tk.
        logits = torch.bmm(qg * scale, kt)
    else:
        logits = torch.baddbmm(bias, qg, kt, alpha=scale)
    return logits.view(b, hkv, hq // hkv, tq, tk)


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
    logits = _masked_logits(q, k, scale * LOG2E, mask, q_offset, window)  # (B, Hkv, G, Tq, Tk), log2 units
    row_max = logits.amax(dim=-1, keepdim=True)
    # Rows with no visible key have max = -inf; subtracting a finite stand-in keeps them at probability 0.
    row_max = torch.where(torch.isinf(row_max), 0.0, row_max)
    probs = logits.sub_(row_max).exp2_()  # in place: no new Tq x Tk buffer
    denom = probs.sum(dim=-1, keepdim=True)
    inv = torch.where(denom > 0, 1.0 / denom, 0.0)
    out = torch.matmul(probs.view(b, hkv, -1, tk), v.float()).view(b, hkv, hq // hkv, tq, v.shape[-1]) * inv
    lse = (row_max + torch.log2(denom)) * LN2  # natural log; -inf where no key is visible
    return out.view(b, hq, tq, v.shape[-1]), lse.reshape(b, hq, tq)


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
    logits = _masked_logits(q, k, scale * LOG2E, mask, q_offset, window)  # (B, Hkv, G, Tq, Tk), log2 units
    safe = torch.where(torch.isinf(lse), torch.inf, lse * LOG2E).view(b, hkv, hq // hkv, tq, 1)
    return logits.sub_(safe).exp2_().sum(dim=-2).reshape(b, hq, tk)


def chunk_attention(
    q_local: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    q_global: torch.Tensor,
    k_global: torch.Tensor,
    v_global: torch.Tensor,
    scale: float,
    *,
    local_offset: int,
    global_offset: int,
    window: int,
    with_mass: bool,
    global_bias: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One InfLLM chunk in one softmax: local keys under the band mask, global keys under its complement, their
    logits lowered by `global_bias` (natural log units: decode_memory_bias).

    q_local/q_global: (B, Hq, Tq, D), the same queries rotated for each stage; k/v_local: (B, Hkv, Tl, D);
    k/v_global: (B, Hkv, Tg, D). Returns out (B, Hq, Tq, D) float32 and, with `with_mass`, the attention mass
    each local key received (B, Hq, Tl). Equal to `compose_chunk_attention` over the primitives (tested); on CPU
    the concatenated-logits form is cheaper: one exponential per logit, no log-sum-exp, no second pass for the
    mass.
    """
    b, hq, tq, _ = q_local.shape
    hkv, tl, tg, dv = k_local.shape[1], k_local.shape[2], k_global.shape[2], v_local.shape[-1]
    scale2 = scale * LOG2E  # log2 units: see LOG2E
    loc = _masked_logits(q_local, k_local, scale2, "band", local_offset, window)  # (B, Hkv, G, Tq, Tl)
    row_max = loc.amax(dim=-1, keepdim=True)
    if tg:
        glob = _masked_logits(q_global, k_global, scale2, "complement", global_offset, window)  # (B, Hkv, G, Tq, Tg)
        if global_bias:
            glob.sub_(global_bias * LOG2E)  # (masked logits stay -inf)
        row_max = torch.maximum(row_max, glob.amax(dim=-1, keepdim=True))
    row_max = torch.where(torch.isinf(row_max), 0.0, row_max)
    p_loc = loc.sub_(row_max).exp2_()
    denom = p_loc.sum(dim=-1, keepdim=True)
    out = torch.bmm(p_loc.view(b * hkv, -1, tl), v_local.float().reshape(b * hkv, tl, dv))
    if tg:
        p_glob = glob.sub_(row_max).exp2_()
        denom = denom + p_glob.sum(dim=-1, keepdim=True)
        out = torch.baddbmm(out, p_glob.view(b * hkv, -1, tg), v_global.float().reshape(b * hkv, tg, dv))
    inv = torch.where(denom > 0, 1.0 / denom, 0.0)  # (B, Hkv, G, Tq, 1)
    out = (out.view(b, hkv, -1, tq, dv) * inv).view(b, hq, tq, dv)
    # Each key's mass, summed over the queries: a product with the normalisers, no Tq x Tl temporary.
    mass = torch.matmul(inv.transpose(-1, -2), p_loc).reshape(b, hq, tl) if with_mass else None
    return out, mass


def compose_chunk_attention(ops, q_local, k_local, v_local, q_global, k_global, v_global, scale, *,
                            local_offset: int, global_offset: int, window: int, with_mass: bool,
                            global_bias: float = 0.0):
    """`chunk_attention` built from a backend's primitives: two partials merged by log-sum-exp (what kernels do)."""
    local = ops.attend(q_local, k_local, v_local, scale, mask="band", q_offset=local_offset, window=window)
    return finish_chunk_attention(ops, local, q_local, k_local, q_global, k_global, v_global, scale,
                                  local_offset=local_offset, global_offset=global_offset, window=window,
                                  with_mass=with_mass, global_bias=global_bias)


def finish_chunk_attention(ops, local, q_local, k_local, q_global, k_global, v_global, scale, *,
                           local_offset: int, global_offset: int, window: int, with_mass: bool,
                           global_bias: float = 0.0):
    """`compose_chunk_attention` once its local partial ``local = (out, lse)`` is computed: the global partial,
    the merge and the local keys' mass. Split so that a caller can start the local stage before the global keys
    exist (on CUDA, while the retrieved blocks are copied in)."""
    out, lse = local
    if k_global.shape[2]:
        g_out, g_lse = ops.attend(q_global, k_global, v_global, scale, mask="complement", q_offset=global_offset, window=window)
        # A bias on every global logit divides the global partial's normaliser by exp(bias) and leaves its output.
        out, lse = ops.merge(out, lse, g_out, g_lse - global_bias if global_bias else g_lse)
    mass = None
    if with_mass:
        mass = ops.key_mass(q_local, k_local, scale, lse, mask="band", q_offset=local_offset, window=window)
    return out, mass
