"""Triton twins of the attention primitives in `reference.py`: same signatures, same mask semantics.

InfLLM (docs/METHOD.md section 2) computes each chunk as partial attentions over key sets (local window, then
sinks + retrieved blocks + remainder) merged by log-sum-exp, and accumulates the attention mass each local key
receives. These kernels do the three steps on the GPU:

- `attend`: flash-attention style forward. One program owns a tile of query rows of one KV head group and
  streams key/value tiles through an online softmax held in float32. The `G = Hq // Hkv` query heads that share
  a KV head are packed into the row dimension (row ``r`` is head ``r // Tq``, query ``r % Tq``), so a decode
  step (Tq = 1) still fills a tile and each key tile is loaded once per group. Before the loop the program
  computes the key range its rows can see under the mask and skips every tile outside it: for the causal band
  of the local stage that is what makes the cost O(Tq * window) instead of O(Tq * Tk). When there are fewer
  programs than the GPU has multiprocessors (decoding), the key range is also split across programs whose
  partial results are combined by a small log-sum-exp kernel (flash-decoding).
- `merge`: elementwise log-sum-exp merge of two partial attentions over disjoint key sets.
- `key_mass`: one program per (key tile, query head); it loops over the query tiles that can see its keys and
  sums their final attention probabilities (normalised by the merged lse), so no atomics are needed.

Numerics: inputs may be float32, float16 or bfloat16 (loaded tiles are cast to the common dtype of q/k/v for the
tensor-core dots; softmax statistics and accumulators are float32). float32 inputs use "tf32x3" dots (three TF32
products, about 1e-6 relative error), not plain TF32, so that they match the float32 reference closely; in
16-bit types the probabilities are rounded to the input dtype before P @ V, as in flash attention.
Exponentials use ``exp2`` with the scale folded in by log2(e).

Running on CPU: only in triton's interpreter, enabled by ``TRITON_INTERPRET=1`` *before this module is
imported* (the ``@triton.jit`` decorator reads it). `INTERPRETED` records whether that was the case; the
dispatcher in `inf_llm.kernels` refuses CPU tensors otherwise. The interpreter upcasts bfloat16 after every
load, so bfloat16 results on CPU are not representative (float32 and float16 are).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from inf_llm.kernels.reference import LOG2E, MASKS

# Read once, like @triton.jit does when the kernels below are defined.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

_MASK_CODES = {"none": 0, "causal": 1, "band": 2, "complement": 3}
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["tq", "tk", "q_offset", "window", "split_start", "split_len"])
def _attend_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_os, stride_ob, stride_oh, stride_ot, stride_od,
    stride_ls, stride_lb, stride_lh, stride_lt,
    n_kv_heads, group, tq, tk, dk, dv,
    q_offset, window, qk_scale,
    split_start, split_len,
    MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    # grid: (row tiles of the packed G * Tq rows, B * Hkv, key splits)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    hk = (pid_bh % n_kv_heads).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group * tq
    i = rows % tq  # query index within its head
    hq = hk * group + (rows // tq)  # query head of each packed row
    pos = i + q_offset  # rel = pos - j

    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    # Head dims that fill their tiles need no mask along D: fewer predicates, and loads stay vectorised.
    if EVEN_D:
        dk_ok = offs_dk < BLOCK_DK
        dv_ok = offs_dv < BLOCK_DV
    else:
        dk_ok = offs_dk < dk
        dv_ok = offs_dv < dv
    offs_n = tl.arange(0, BLOCK_N)

    # q tile: (BLOCK_M, BLOCK_DK); padded rows and dims load as 0 and are never stored.
    q_rows = b * stride_qb + hq * stride_qh + i.to(tl.int64) * stride_qt
    q = tl.load(Q + q_rows[:, None] + offs_dk[None, :] * stride_qd, mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
    q = q.to(DOT_DTYPE)

    # The key range [lo, hi) any row of this tile can see; tiles outside it are never loaded.
    big = 1 << 30
    pmin = tl.min(tl.where(row_ok, pos, big), axis=0)
    pmax = tl.max(tl.where(row_ok, pos, -big), axis=0)
    lo = split_start + pid_s * split_len
    hi = tl.minimum(lo + split_len, tk)
    if MASK == 1:
        hi = tl.minimum(hi, pmax + 1)
    if MASK == 2:
        lo = tl.maximum(lo, pmin - window + 1)
        hi = tl.minimum(hi, pmax + 1)
    if MASK == 3:
        hi = tl.minimum(hi, pmax - window + 1)
    lo = tl.maximum(lo, 0)
    # Split boundaries are multiples of BLOCK_N, so aligned tiles never straddle two splits.
    start = (lo // BLOCK_N) * BLOCK_N

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(start, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < tk
        cols64 = cols.to(tl.int64)
        # k tile loaded transposed: (BLOCK_DK, BLOCK_N)
        kt = tl.load(
            k_base + cols64[None, :] * stride_kt + offs_dk[:, None] * stride_kd,
            mask=col_ok[None, :] & dk_ok[:, None],
            other=0.0,
        ).to(DOT_DTYPE)
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)

        rel = pos[:, None] - cols[None, :]
        visible = col_ok[None, :]
        if MASK == 1:
            visible = visible & (rel >= 0)
        if MASK == 2:
            visible = visible & (rel >= 0) & (rel < window)
        if MASK == 3:
            visible = visible & (rel >= window)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v = tl.load(
            v_base + cols64[:, None] * stride_vt + offs_dv[None, :] * stride_vd,
            mask=col_ok[:, None] & dv_ok[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    # Rows that saw no key: out = 0, lse = -inf (a no-op under merge).
    seen = l_i > 0.0
    l_div = tl.where(seen, l_i, 1.0)
    out = acc / l_div[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_div)) * 0.6931471805599453, float("-inf"))

    o_rows = pid_s.to(tl.int64) * stride_os + b * stride_ob + hq * stride_oh + i.to(tl.int64) * stride_ot
    tl.store(Out + o_rows[:, None] + offs_dv[None, :] * stride_od, out, mask=row_ok[:, None] & dv_ok[None, :])
    l_rows = pid_s.to(tl.int64) * stride_ls + b * stride_lb + hq * stride_lh + i.to(tl.int64) * stride_lt
    tl.store(Lse + l_rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["n_splits", "n_rows"])
def _combine_splits_kernel(
    PartOut, PartLse, Out, Lse, n_splits, n_rows, dv, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr
):
    # One program per BLOCK_R output rows; partials are contiguous (S, n_rows, dv) and (S, n_rows). The splits
    # are folded in with the same online rescaling as the key tiles of `_attend_kernel`.
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n_rows
    offs_d = tl.arange(0, BLOCK_DV)
    mask2 = row_ok[:, None] & (offs_d[None, :] < dv)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    for s in range(0, n_splits):
        lse_s = tl.load(PartLse + s * n_rows + rows, mask=row_ok, other=float("-inf"))
        m_new = tl.maximum(m, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse_s - m_safe)  # 0 for a split whose keys this row cannot see
        o = tl.load(PartOut + (s * n_rows + rows)[:, None] * dv + offs_d[None, :], mask=mask2, other=0.0)
        acc = acc * alpha[:, None] + o * w[:, None]
        total = total * alpha + w
        m = m_new
    seen = total > 0.0
    denom = tl.where(seen, total, 1.0)
    tl.store(Out + rows[:, None] * dv + offs_d[None, :], acc / denom[:, None], mask=mask2)
    tl.store(Lse + rows, tl.where(seen, m + tl.log(denom), float("-inf")), mask=row_ok)


@triton.jit
def _merge_kernel(
    OutA, LseA, OutB, LseB, Out, Lse,
    stride_oab, stride_oah, stride_oat, stride_oad,
    stride_obb, stride_obh, stride_obt, stride_obd,
    stride_lab, stride_lah, stride_lat,
    stride_lbb, stride_lbh, stride_lbt,
    n_heads, t, d, n_rows,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per BLOCK_R (b, h, t) rows; the outputs are contiguous (B, H, T, D) and (B, H, T).
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n_rows
    bi = rows // (n_heads * t)
    hi = (rows // t) % n_heads
    ti = rows % t
    offs_d = tl.arange(0, BLOCK_D)
    mask2 = row_ok[:, None] & (offs_d[None, :] < d)

    lse_a = tl.load(LseA + bi * stride_lab + hi * stride_lah + ti * stride_lat, mask=row_ok, other=float("-inf"))
    lse_b = tl.load(LseB + bi * stride_lbb + hi * stride_lbh + ti * stride_lbt, mask=row_ok, other=float("-inf"))
    lse_a = lse_a.to(tl.float32)
    lse_b = lse_b.to(tl.float32)
    m = tl.maximum(lse_a, lse_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    ea = tl.exp(lse_a - m_safe)
    eb = tl.exp(lse_b - m_safe)
    total = ea + eb
    seen = total > 0.0
    lse = tl.where(seen, m_safe + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    # Weights as in the reference: exp(lse_x - lse), both 0 when neither side saw a key.
    lse_safe = tl.where(seen, lse, 0.0)
    w_a = tl.exp(lse_a - lse_safe)
    w_b = tl.exp(lse_b - lse_safe)

    oa = tl.load(
        OutA + (bi * stride_oab + hi * stride_oah + ti * stride_oat)[:, None] + offs_d[None, :] * stride_oad,
        mask=mask2, other=0.0,
    ).to(tl.float32)
    ob = tl.load(
        OutB + (bi * stride_obb + hi * stride_obh + ti * stride_obt)[:, None] + offs_d[None, :] * stride_obd,
        mask=mask2, other=0.0,
    ).to(tl.float32)
    out = oa * w_a[:, None] + ob * w_b[:, None]
    tl.store(Out + rows[:, None] * d + offs_d[None, :], out, mask=mask2)
    tl.store(Lse + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["tq", "tk", "q_offset", "window"])
def _key_mass_kernel(
    Q, K, Lse, Out,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_lb, stride_lh, stride_lt,
    n_q_heads, group, tq, tk, dk,
    q_offset, window, qk_scale,
    MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    # grid: (key tiles, B * Hq); each program owns its keys' output, so no atomics.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = (pid_bh % n_q_heads).to(tl.int64)
    hk = h // group

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < tk
    offs_dk = tl.arange(0, BLOCK_DK)
    if EVEN_D:
        dk_ok = offs_dk < BLOCK_DK
    else:
        dk_ok = offs_dk < dk
    kt = tl.load(
        K + b * stride_kb + hk * stride_kh + cols.to(tl.int64)[None, :] * stride_kt + offs_dk[:, None] * stride_kd,
        mask=col_ok[None, :] & dk_ok[:, None],
        other=0.0,
    ).to(DOT_DTYPE)  # (BLOCK_DK, BLOCK_N)

    # Query rows that can see some key of this tile (i + q_offset - j against the mask).
    c0 = pid_n * BLOCK_N
    c1 = tl.minimum(c0 + BLOCK_N, tk) - 1
    start = 0
    i_hi = tq
    if MASK == 1:
        start = (tl.maximum(c0 - q_offset, 0) // BLOCK_M) * BLOCK_M
    if MASK == 2:
        start = (tl.maximum(c0 - q_offset, 0) // BLOCK_M) * BLOCK_M
        i_hi = tl.minimum(i_hi, c1 + window - q_offset)
    if MASK == 3:
        start = (tl.maximum(c0 + window - q_offset, 0) // BLOCK_M) * BLOCK_M

    offs_m = tl.arange(0, BLOCK_M)
    q_base = Q + b * stride_qb + h * stride_qh
    l_base = Lse + b * stride_lb + h * stride_lh
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(start, i_hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < tq
        rows64 = rows.to(tl.int64)
        q = tl.load(
            q_base + rows64[:, None] * stride_qt + offs_dk[None, :] * stride_qd,
            mask=row_ok[:, None] & dk_ok[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        lse = tl.load(l_base + rows64 * stride_lt, mask=row_ok, other=float("-inf")).to(tl.float32)
        # As in the reference, a row whose normaliser is infinite contributes nothing.
        lse_ok = (lse > float("-inf")) & (lse < float("inf"))
        lse2 = tl.where(lse_ok, lse * 1.4426950408889634, 0.0)
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units

        rel = (rows + q_offset)[:, None] - cols[None, :]
        visible = (row_ok & lse_ok)[:, None] & col_ok[None, :]
        if MASK == 1:
            visible = visible & (rel >= 0)
        if MASK == 2:
            visible = visible & (rel >= 0) & (rel < window)
        if MASK == 3:
            visible = visible & (rel >= window)
        p = tl.exp2(tl.where(visible, s - lse2[:, None], float("-inf")))
        acc += tl.sum(p, axis=0)

    tl.store(Out + pid_bh.to(tl.int64) * tk + cols, acc, mask=col_ok)


# --------------------------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------------------------


def _pow2_at_least(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"all inputs must be on one device, got {device} and {t.device}")
    if device.type == "cuda":
        return
    if device.type == "cpu" and INTERPRETED:
        return
    if device.type == "cpu":
        raise RuntimeError(
            "the Triton kernels got CPU tensors but triton's interpreter is off: set TRITON_INTERPRET=1 before "
            "importing inf_llm.kernels.triton_attention, or use the 'torch' backend on CPU"
        )
    raise RuntimeError(f"the Triton kernels run on CUDA devices only, got {device}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _TL_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_mask(mask: str) -> int:
    if mask not in _MASK_CODES:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    return _MASK_CODES[mask]


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, H, T, D), got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def _visible_key_range(tq: int, tk: int, mask: str, q_offset: int, window: int) -> tuple[int, int]:
    """[lo, hi) of the keys some query can see; host-side twin of the per-tile bounds in `_attend_kernel`."""
    pmin, pmax = q_offset, q_offset + tq - 1
    lo, hi = 0, tk
    if mask == "causal":
        hi = min(hi, pmax + 1)
    elif mask == "band":
        lo, hi = max(lo, pmin - window + 1), min(hi, pmax + 1)
    elif mask == "complement":
        hi = min(hi, pmax - window + 1)
    return lo, hi


def _input_precision(dtype: torch.dtype) -> str:
    # float32: three TF32 products per dot ("tf32x3") stay within about 1e-6 of IEEE float32 on tensor cores;
    # plain "ieee" runs on FMA units and spills registers at head_dim 128. Half types ignore the setting.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _attend_config(rows: int, d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for `_attend_kernel`, without autotuning (deterministic).

    Checked by compiling ahead of time for sm_90 with triton's bundled ptxas: no register spills in 16-bit types
    up to head_dim 256; float32 (three dots per product) spills under 200 bytes at head_dim 128-256.
    """
    if dtype == torch.float32:
        block_m = 64 if d <= 64 else 32 if d <= 128 else 16
        return min(block_m, _pow2_at_least(rows)), 32, 4, 2
    if d <= 128:
        block_m = min(128, _pow2_at_least(rows))
        return block_m, 64, 8 if block_m >= 128 else 4, 3
    return min(64, _pow2_at_least(rows)), 32, 4, 2


def _key_mass_config(tq: int, d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for `_key_mass_kernel` (4 warps, 2 stages); no spills on sm_90, as above."""
    if dtype == torch.float32:
        return min(32 if d <= 64 else 16, _pow2_at_least(tq)), 32
    return min(64 if d <= 128 else 32, _pow2_at_least(tq)), 64 if d <= 128 else 32


def _default_splits(programs: int, key_tiles: int, device: torch.device) -> int:
    # Split the key range only when the grid would leave multiprocessors idle (decoding), and keep at least
    # four key tiles per split so the combine step stays negligible.
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), key_tiles // 4, 128))


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: str,
    q_offset: int,
    window: int,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend` with the key-split count exposed (None: chosen from the GPU's size) so tests can force it."""
    _check_qk(q, k)
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)} in (B, H, T)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
    _check_device(q, k, v)
    mask_code = _check_mask(mask)
    q_offset, window = int(q_offset), int(window)

    b, hq, tq, dk = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    lo, hi = _visible_key_range(tq, tk, mask, q_offset, window)
    if b * hq * tq == 0 or hi <= lo:
        # Nothing visible anywhere: the empty partial result.
        out = torch.zeros((b, hq, tq, dv), device=q.device, dtype=torch.float32)
        return out, torch.full((b, hq, tq), -torch.inf, device=q.device, dtype=torch.float32)
    # Every row is written by the kernel (rows that see nothing get 0 and -inf), so no fill is needed.
    out = torch.empty((b, hq, tq, dv), device=q.device, dtype=torch.float32)
    lse = torch.empty((b, hq, tq), device=q.device, dtype=torch.float32)

    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    rows = group * tq
    block_m, block_n, num_warps, num_stages = _attend_config(rows, max(dk, dv), dtype)
    start = (lo // block_n) * block_n
    key_tiles = triton.cdiv(hi - start, block_n)
    programs = triton.cdiv(rows, block_m) * b * hkv
    splits = _default_splits(programs, key_tiles, q.device) if num_splits is None else int(num_splits)
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {splits}")
    splits = min(splits, key_tiles)
    split_len = triton.cdiv(key_tiles, splits) * block_n
    splits = triton.cdiv(hi - start, split_len)  # no trailing empty split

    if splits == 1:
        part_out, part_lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        part_out = torch.empty((splits, b, hq, tq, dv), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((splits, b, hq, tq), device=q.device, dtype=torch.float32)

    grid = (triton.cdiv(rows, block_m), b * hkv, splits)
    _attend_kernel[grid](
        q, k, v, part_out, part_lse,
        *q.stride(), *k.stride(), *v.stride(), *part_out.stride(), *part_lse.stride(),
        hkv, group, tq, tk, dk, dv,
        q_offset, window, float(scale) * LOG2E,
        start, split_len,
        MASK=mask_code,
        BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_DK=_pow2_at_least(dk), BLOCK_DV=_pow2_at_least(dv),
        DOT_DTYPE=_TL_DTYPES[dtype], INPUT_PRECISION=_input_precision(dtype),
        EVEN_D=dk == _pow2_at_least(dk) and dv == _pow2_at_least(dv),
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        n_rows = b * hq * tq
        block_dv = _pow2_at_least(dv)
        block_r = max(16, min(128, 4096 // block_dv))
        _combine_splits_kernel[(triton.cdiv(n_rows, block_r),)](
            part_out, part_lse, out, lse, splits, n_rows, dv, BLOCK_R=block_r, BLOCK_DV=block_dv
        )
    return out, lse


# --------------------------------------------------------------------------------------------------------------
# Public API: the signatures of `reference.py`
# --------------------------------------------------------------------------------------------------------------


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

    q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D), any strides. Returns ``out`` (B, Hq, Tq, D) float32 and ``lse``
    (B, Hq, Tq) float32 (natural log); a query that sees no key gets ``out = 0``, ``lse = -inf``.
    """
    return _attend(q, k, v, scale, mask, q_offset, window)


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets (out: (B, H, T, D), lse: (B, H, T)).

    Returns float32 ``out`` (B, H, T, D) and ``lse`` (B, H, T), both contiguous.
    """
    if out_a.dim() != 4 or out_a.shape != out_b.shape:
        raise ValueError(f"out_a {tuple(out_a.shape)} and out_b {tuple(out_b.shape)} must be equal (B, H, T, D)")
    if lse_a.shape != out_a.shape[:3] or lse_b.shape != out_a.shape[:3]:
        raise ValueError(
            f"lse_a {tuple(lse_a.shape)} and lse_b {tuple(lse_b.shape)} must be {tuple(out_a.shape[:3])}"
        )
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        _check_float(name, t)
    _check_device(out_a, lse_a, out_b, lse_b)

    b, h, t, d = out_a.shape
    out = torch.empty((b, h, t, d), device=out_a.device, dtype=torch.float32)
    lse = torch.empty((b, h, t), device=out_a.device, dtype=torch.float32)
    n_rows = b * h * t
    if n_rows == 0:
        return out, lse
    block_d = _pow2_at_least(d)
    block_r = max(16, min(128, 4096 // block_d))
    _merge_kernel[(triton.cdiv(n_rows, block_r),)](
        out_a, lse_a, out_b, lse_b, out, lse,
        *out_a.stride(), *out_b.stride(), *lse_a.stride(), *lse_b.stride(),
        h, t, d, n_rows,
        BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return out, lse


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

    q: (B, Hq, Tq, D); k: (B, Hkv, Tk, D); lse: (B, Hq, Tq), the log-normaliser of the whole (merged) attention.
    Returns (B, Hq, Tk) float32.
    """
    _check_qk(q, k)
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse {tuple(lse.shape)} must be {tuple(q.shape[:3])}")
    for name, t in (("q", q), ("k", k), ("lse", lse)):
        _check_float(name, t)
    _check_device(q, k, lse)
    mask_code = _check_mask(mask)
    q_offset, window = int(q_offset), int(window)

    b, hq, tq, dk = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    out = torch.zeros((b, hq, tk), device=q.device, dtype=torch.float32)
    if out.numel() == 0 or tq == 0:
        return out
    dtype = torch.promote_types(q.dtype, k.dtype)
    block_m, block_n = _key_mass_config(tq, dk, dtype)
    _key_mass_kernel[(triton.cdiv(tk, block_n), b * hq)](
        q, k, lse, out,
        *q.stride(), *k.stride(), *lse.stride(),
        hq, hq // hkv, tq, tk, dk,
        q_offset, window, float(scale) * LOG2E,
        MASK=mask_code,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DK=_pow2_at_least(dk),
        DOT_DTYPE=_TL_DTYPES[dtype], INPUT_PRECISION=_input_precision(dtype), EVEN_D=dk == _pow2_at_least(dk),
        num_warps=4, num_stages=2,
    )
    return out


__all__ = ["INTERPRETED", "attend", "merge", "key_mass"]
