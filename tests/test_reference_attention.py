"""The plain-torch attention primitives (`inf_llm.kernels.reference`) against a naive oracle and exact invariants.

The oracle is written here from the mask definitions alone (docs/METHOD.md section 2; `reference.py` docstring):
one query row at a time, in float64, with an explicit softmax over the keys that row may see and the key/value
heads repeated for grouped-query attention. The invariants are the ones InfLLM relies on: partial attentions
over disjoint key sets merge into the attention over their union; the local band plus its complement is the
causal mask; the key masses normalised by the merged lse are the final attention weights.
"""

import math

import pytest
import torch

from inf_llm.kernels import reference

ATOL = 2e-5


def _visible(i: int, j: int, mask: str, q_offset: int, window: int) -> bool:
    rel = i + q_offset - j
    return {
        "none": True,
        "causal": rel >= 0,
        "band": 0 <= rel < window,
        "complement": rel >= window,
    }[mask]


def _naive_probs(q, k, scale, mask, q_offset, window):
    """(B, Hq, Tq, Tk) float64 attention weights and (B, Hq, Tq) lse, row by row; empty rows: 0 and -inf."""
    b, hq, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    k_rep = k.double().repeat_interleave(hq // hkv, dim=1)  # (B, Hq, Tk, D)
    probs = torch.zeros(b, hq, tq, tk, dtype=torch.float64)
    lse = torch.full((b, hq, tq), -math.inf, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(tq):
                cols = [j for j in range(tk) if _visible(i, j, mask, q_offset, window)]
                if not cols:
                    continue
                logits = torch.stack([q[bi, h, i].double() @ k_rep[bi, h, j] * scale for j in cols])
                top = logits.max()
                weights = torch.exp(logits - top)
                total = weights.sum()
                probs[bi, h, i, cols] = weights / total
                lse[bi, h, i] = top + torch.log(total)
    return probs, lse


def _naive_attend(q, k, v, scale, mask, q_offset, window):
    probs, lse = _naive_probs(q, k, scale, mask, q_offset, window)
    v_rep = v.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, Hq, Tk, D)
    return probs @ v_rep, lse


def _qkv(b, hq, hkv, tq, tk, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    return q, k, v


# (Tq, Tk, q_offset, window): queries at the end of the keys, decode, and offsets that leave rows empty
# (negative offsets hide every key from the first rows under causal/band; a window past every distance
# empties the complement).
SHAPES = [
    (1, 9, 8, 3),  # decode: the query is the last key
    (5, 12, 7, 4),  # a chunk at the end of its keys
    (6, 6, -2, 3),  # first two rows see nothing under causal/band
    (4, 7, 3, 20),  # complement empty everywhere, band = causal
    (3, 5, 10, 2),  # band past the keys: empty; complement = none
]


@pytest.mark.parametrize("mask", reference.MASKS)
@pytest.mark.parametrize("hq,hkv", [(6, 2), (3, 3)], ids=["gqa3", "mha"])
@pytest.mark.parametrize("tq,tk,q_offset,window", SHAPES)
def test_attend_matches_naive_oracle(mask, hq, hkv, tq, tk, q_offset, window):
    q, k, v = _qkv(2, hq, hkv, tq, tk, 8, seed=tq * 100 + tk)
    out, lse = reference.attend(q, k, v, 0.4, mask=mask, q_offset=q_offset, window=window)
    want_out, want_lse = _naive_attend(q, k, v, 0.4, mask, q_offset, window)
    assert out.shape == (2, hq, tq, 8) and out.dtype == torch.float32
    assert lse.shape == (2, hq, tq) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(lse.double(), want_lse, atol=ATOL, rtol=ATOL)  # -inf where the oracle has -inf


def test_oracle_cases_cover_empty_and_full_rows():
    # Guards the SHAPES table: the tests above must see both empty rows and rows that see every key.
    empties = fulls = 0
    for tq, tk, q_offset, window in SHAPES:
        for mask in reference.MASKS:
            for i in range(tq):
                seen = sum(_visible(i, j, mask, q_offset, window) for j in range(tk))
                empties += seen == 0
                fulls += seen == tk
    assert empties > 0 and fulls > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attend_upcasts_half_inputs(dtype):
    q, k, v = _qkv(1, 4, 2, 3, 10, 16, seed=3, dtype=dtype)
    out, lse = reference.attend(q, k, v, 0.25, mask="causal", q_offset=7)
    want_out, want_lse = _naive_attend(q, k, v, 0.25, "causal", 7, 0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(lse.double(), want_lse, atol=ATOL, rtol=ATOL)


def test_attend_with_no_keys_is_the_empty_partial():
    q, k, v = _qkv(1, 4, 2, 3, 0, 8)
    out, lse = reference.attend(q, k, v, 0.3, mask="causal", q_offset=5)
    assert torch.equal(out, torch.zeros(1, 4, 3, 8))
    assert torch.equal(lse, torch.full((1, 4, 3), -math.inf))


def test_unknown_mask_is_rejected():
    q, k, v = _qkv(1, 2, 2, 2, 3, 8)
    with pytest.raises(ValueError, match="mask"):
        reference.attend(q, k, v, 0.3, mask="diagonal")


@pytest.mark.parametrize("hq,hkv", [(6, 2), (2, 2)])
def test_merge_of_disjoint_key_sets_equals_attention_over_union(hq, hkv):
    q, k, v = _qkv(2, hq, hkv, 5, 13, 8, seed=7)
    cut = 6
    out_a, lse_a = reference.attend(q, k[:, :, :cut], v[:, :, :cut], 0.3)
    out_b, lse_b = reference.attend(q, k[:, :, cut:], v[:, :, cut:], 0.3)
    out, lse = reference.merge(out_a, lse_a, out_b, lse_b)
    want_out, want_lse = reference.attend(q, k, v, 0.3)
    torch.testing.assert_close(out, want_out, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(lse, want_lse, atol=ATOL, rtol=ATOL)
    # Merging is symmetric.
    out_ba, lse_ba = reference.merge(out_b, lse_b, out_a, lse_a)
    torch.testing.assert_close(out_ba, out, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(lse_ba, lse, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("tq,tk,q_offset,window", [(1, 20, 19, 6), (8, 20, 12, 5), (6, 10, -2, 3), (5, 9, 4, 30)])
def test_band_plus_complement_is_causal(tq, tk, q_offset, window):
    q, k, v = _qkv(1, 6, 2, tq, tk, 8, seed=11)
    band = reference.attend(q, k, v, 0.3, mask="band", q_offset=q_offset, window=window)
    comp = reference.attend(q, k, v, 0.3, mask="complement", q_offset=q_offset, window=window)
    out, lse = reference.merge(*band, *comp)
    want_out, want_lse = reference.attend(q, k, v, 0.3, mask="causal", q_offset=q_offset)
    torch.testing.assert_close(out, want_out, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(lse, want_lse, atol=ATOL, rtol=ATOL)


def test_merge_with_an_empty_side_is_exact():
    q, k, v = _qkv(1, 4, 2, 5, 8, 8, seed=5)
    out_a, lse_a = reference.attend(q, k, v, 0.3, mask="causal", q_offset=1)  # row 0 sees keys 0..1
    empty_out, empty_lse = torch.zeros_like(out_a), torch.full_like(lse_a, -math.inf)
    merged_both_ways = (
        reference.merge(out_a, lse_a, empty_out, empty_lse),
        reference.merge(empty_out, empty_lse, out_a, lse_a),
    )
    for out, lse in merged_both_ways:
        assert torch.equal(out, out_a)
        assert torch.equal(lse, lse_a)
    # Both sides empty stays empty, without NaN.
    out, lse = reference.merge(empty_out, empty_lse, empty_out, empty_lse)
    assert torch.equal(out, empty_out)
    assert torch.equal(lse, empty_lse)


@pytest.mark.parametrize("hq,hkv", [(6, 2), (3, 3)])
def test_key_mass_matches_oracle_and_sums_to_one_per_query(hq, hkv):
    tq, tk, q_offset, window = 6, 14, 6, 4
    q, k, v = _qkv(2, hq, hkv, tq, tk, 8, seed=13)
    # The total attention of each query is local band + complement, merged.
    band = reference.attend(q, k, v, 0.3, mask="band", q_offset=q_offset, window=window)
    comp = reference.attend(q, k, v, 0.3, mask="complement", q_offset=q_offset, window=window)
    _, lse = reference.merge(*band, *comp)
    mass_band = reference.key_mass(q, k, 0.3, lse, mask="band", q_offset=q_offset, window=window)
    mass_comp = reference.key_mass(q, k, 0.3, lse, mask="complement", q_offset=q_offset, window=window)
    assert mass_band.shape == (2, hq, tk) and mass_band.dtype == torch.float32

    probs, _ = _naive_probs(q, k, 0.3, "causal", q_offset, window)  # (B, Hq, Tq, Tk)
    band_cols = torch.tensor([[_visible(i, j, "band", q_offset, window) for j in range(tk)] for i in range(tq)])
    torch.testing.assert_close(mass_band.double(), (probs * band_cols).sum(dim=2), atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(mass_comp.double(), (probs * ~band_cols).sum(dim=2), atol=ATOL, rtol=ATOL)
    # Every query sees some key here, so the masses over the union add up to one per query.
    total = (mass_band + mass_comp).sum(dim=-1)
    torch.testing.assert_close(total, torch.full((2, hq), float(tq)), atol=ATOL, rtol=ATOL)


def test_key_mass_ignores_queries_that_saw_nothing():
    q, k, v = _qkv(1, 4, 2, 5, 6, 8, seed=17)
    _, lse = reference.attend(q, k, v, 0.3, mask="causal", q_offset=-2)  # rows 0, 1 empty: lse = -inf
    assert torch.isinf(lse[..., :2]).all()
    mass = reference.key_mass(q, k, 0.3, lse, mask="causal", q_offset=-2)
    assert torch.isfinite(mass).all()
    probs, _ = _naive_probs(q, k, 0.3, "causal", -2, 0)
    torch.testing.assert_close(mass.double(), probs.sum(dim=2), atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(mass.sum(dim=-1), torch.full((1, 4), 3.0), atol=ATOL, rtol=ATOL)  # 3 non-empty rows


def test_visible_mask_matches_definition():
    for mask in reference.MASKS:
        got = reference.visible_mask(4, 9, mask, 3, 2, torch.device("cpu"))
        want = torch.tensor([[_visible(i, j, mask, 3, 2) for j in range(9)] for i in range(4)])
        if got is None:
            assert mask == "none"
            got = torch.ones(4, 9, dtype=torch.bool)
        assert torch.equal(got, want), mask


@pytest.mark.parametrize("tq,tl,tg,local_offset", [(1, 17, 0, 16), (1, 17, 40, 16), (16, 48, 30, 32), (8, 8, 0, 0), (5, 20, 9, 15)])
def test_fused_chunk_attention_equals_the_composed_primitives(tq, tl, tg, local_offset):
    """The CPU path's one-softmax chunk equals band + complement partials merged by log-sum-exp."""
    from inf_llm.kernels import TORCH_OPS
    g = torch.Generator().manual_seed(tq * 100 + tl + tg)
    q_loc, q_glob = torch.randn(2, 1, 6, tq, 16, generator=g)
    k_loc, v_loc = torch.randn(2, 1, 3, tl, 16, generator=g)
    k_glob, v_glob = torch.randn(2, 1, 3, tg, 16, generator=g)
    window = 12
    kwargs = dict(local_offset=local_offset, global_offset=local_offset + 5, window=window, with_mass=True)
    fused = reference.chunk_attention(q_loc, k_loc, v_loc, q_glob, k_glob, v_glob, 0.3, **kwargs)
    composed = reference.compose_chunk_attention(TORCH_OPS, q_loc, k_loc, v_loc, q_glob, k_glob, v_glob, 0.3, **kwargs)
    torch.testing.assert_close(fused[0], composed[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1], composed[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tq,tl,tg,local_offset", [(1, 17, 40, 16), (5, 20, 9, 15)])
def test_global_bias_scales_the_global_keys_weight_by_exp_minus_bias(tq, tl, tg, local_offset):
    """global_bias (decode_memory_bias): each row is the naive softmax over the local band's logits and the global
    complement's logits less the bias, fused and composed alike; the local keys' mass is that softmax's."""
    from inf_llm.kernels import TORCH_OPS
    g = torch.Generator().manual_seed(7 * tq + tg)
    q_loc, q_glob = torch.randn(2, 1, 6, tq, 16, generator=g)
    k_loc, v_loc = torch.randn(2, 1, 3, tl, 16, generator=g)
    k_glob, v_glob = torch.randn(2, 1, 3, tg, 16, generator=g)
    window, bias = 12, 1.7
    kwargs = dict(local_offset=local_offset, global_offset=local_offset + 5, window=window, with_mass=True)
    p_loc, lse_loc = _naive_probs(q_loc, k_loc, 0.3, "band", local_offset, window)
    p_glob, lse_glob = _naive_probs(q_glob, k_glob, 0.3, "complement", local_offset + 5, window)
    lse = torch.logaddexp(lse_loc, lse_glob - bias)
    w_loc, w_glob = torch.exp(lse_loc - lse)[..., None], torch.exp(lse_glob - bias - lse)[..., None]
    assert 0.05 < float(w_glob.mean()) < 0.95  # both stages weigh in, so that the bias shows
    rep = lambda v: v.double().repeat_interleave(2, dim=1)  # noqa: E731 (Hkv 3 -> Hq 6)
    want = w_loc * (p_loc @ rep(v_loc)) + w_glob * (p_glob @ rep(v_glob))
    want_mass = (w_loc * p_loc).sum(dim=2)
    for got, mass in (reference.chunk_attention(q_loc, k_loc, v_loc, q_glob, k_glob, v_glob, 0.3, **kwargs, global_bias=bias),
                      reference.compose_chunk_attention(TORCH_OPS, q_loc, k_loc, v_loc, q_glob, k_glob, v_glob, 0.3, **kwargs,
                                                        global_bias=bias)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mass.double(), want_mass, atol=1e-5, rtol=1e-5)
    unbiased, _ = reference.chunk_attention(q_loc, k_loc, v_loc, q_glob, k_glob, v_glob, 0.3, **kwargs)
    assert (unbiased.double() - want).abs().max() > 1e-2
