"""Tests of 8-bit block storage (`storage_dtype: int8`): the rounding bound, exact storage, memory, layer output.

Oracles: the absmax rounding bound |x - q * scale| <= scale / 2, the dequantised values themselves (gathered
K/V must equal them bit for bit, from any tier), the 16-bit store's byte count, and a bound on a layer's
output derived from the quantisation error (below) against the same layer storing float32 blocks.
"""

import math

import pytest
import torch

from inf_llm.config.schema import InfLLMConfig
from inf_llm.kernels import resolve_ops
from inf_llm.memory.layer_memory import LayerMemory
from inf_llm.memory.layer_state import LayerShape
from inf_llm.model.rope import RotaryTable
from inf_llm.storage.block_layout import BlockLayout
from inf_llm.storage.block_store import BlockStore
from inf_llm.storage.quantization import QMAX, dequantize_int8, quantize_int8
from inf_llm.storage.tier_settings import TierSettings
from tests.tiny_models import tiny_model

CPU = torch.device("cpu")


def _varied(n=6, hkv=3, b=32, d=64, seed=0) -> torch.Tensor:
    """Blocks whose heads differ in magnitude by orders, with a few outliers and one all-zero (block, head)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hkv, b, d, generator=g) * torch.logspace(-3, 2, n * hkv).view(n, hkv, 1, 1)
    x[0, 0, 3, 5] = 40.0  # an outlier sets its (block, head) scale
    x[1, 2] = 0.0
    return x


def test_round_trip_error_is_at_most_half_a_step():
    x = _varied()
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == x.shape[:2] and scale.dtype == torch.float32
    assert int(q.abs().max()) == QMAX and int(q.min()) >= -QMAX
    back = dequantize_int8(q, scale, torch.float32)
    step = scale[..., None, None]
    # Half a step, plus float32 rounding of the division and the product (a few ulps of |x|).
    assert ((back - x).abs() <= step / 2 + 4e-7 * x.abs()).all()
    assert torch.equal(back[1, 2], torch.zeros_like(back[1, 2]))  # an all-zero head stays exactly zero
    # The scale is per (block, head): a head's error does not grow with another head's magnitude.
    small = (0, 1)
    assert (back[small] - x[small]).abs().max() <= x[small].abs().max() / (2 * QMAX) * (1 + 1e-5)


def test_16_bit_inputs_quantise_like_their_float32_values():
    x = _varied().to(torch.bfloat16)
    q, scale = quantize_int8(x)
    q32, scale32 = quantize_int8(x.float())
    assert torch.equal(q, q32) and torch.equal(scale, scale32)


def _store(dtype, budget_blocks=None):
    layout = BlockLayout(3, 32, 64, dtype)
    budget = None if budget_blocks is None else budget_blocks * layout.record_bytes
    return BlockStore(3, 32, 64, storage_dtype=dtype, compute_dtype=torch.float32, device=CPU, cache_blocks=4,
                      tiers=TierSettings(budget))


def test_int8_blocks_take_half_the_bytes_of_16_bit():
    k, v = _varied(seed=1), _varied(seed=2)
    int8, half = _store(torch.int8), _store(torch.float16)
    int8.append(k, v), half.append(k, v)
    # Per block: K and V as int8 (half of 16-bit) plus one float32 scale per KV head for each, padded to 16 B.
    scales = 2 * 3 * 4
    assert int8.host_bytes() == 6 * (-(-(2 * 3 * 32 * 64 + scales) // 16) * 16)
    assert half.host_bytes() == 6 * 2 * 3 * 32 * 64 * 2
    assert half.host_bytes() / 2 <= int8.host_bytes() <= half.host_bytes() / 2 * 1.003


@pytest.mark.parametrize("budget_blocks", [None, 2])
def test_gathered_int8_blocks_are_exactly_the_dequantised_stored_values(budget_blocks):
    k, v = _varied(seed=3), _varied(seed=4)
    store = _store(torch.int8, budget_blocks)
    store.append(k[:2], v[:2]), store.append(k[2:], v[2:])
    (qk, sk), (qv, sv) = quantize_int8(k), quantize_int8(v)
    want_k, want_v = dequantize_int8(qk, sk, torch.float32), dequantize_int8(qv, sv, torch.float32)
    for ids in ([0, 5], [1, 2, 3], [4, 0]):
        gk, gv = store.gather(torch.tensor(ids))
        assert torch.equal(gk, want_k[ids].transpose(0, 1).reshape(3, -1, 64))
        assert torch.equal(gv, want_v[ids].transpose(0, 1).reshape(3, -1, 64))
    state = store.state_dict()  # the stored bytes, not re-quantised values
    assert torch.equal(state["k"], qk) and torch.equal(state["k_scale"], sk) and torch.equal(state["v_scale"], sv)
    other = _store(torch.int8)
    other.load_state_dict(state)
    assert torch.equal(other.gather(torch.tensor([3]))[1], want_v[3])
    if budget_blocks:
        assert store.disk_reads > 0 and store.host_bytes() <= budget_blocks * store.layout.record_bytes


# --- the layer output ------------------------------------------------------------------------------------------

HQ, HKV, D, T = 4, 2, 16, 160


def _layer(storage: str) -> LayerMemory:
    # Every block retrieved: the selection cannot depend on the storage, so only the stored values differ.
    config = InfLLMConfig(num_sink_tokens=4, local_window=16, block_size=8, repr_tokens=2, topk_blocks=32,
                          chunk_size=8, device_cache_blocks=32, storage_dtype=storage, kernel_backend="torch")
    model = tiny_model("llama")  # head_dim 16, as D
    rotary = RotaryTable(model.model.rotary_emb, D, config.local_window + config.chunk_size + config.num_sink_tokens + 1, CPU)
    dtype = {"int8": torch.int8, "float32": torch.float32}[storage]
    return LayerMemory(config, LayerShape(HQ, HKV, D), rotary, resolve_ops("torch", CPU),
                       dtype=torch.float32, storage_dtype=dtype, device=CPU)


def _feed(layer: LayerMemory, q, k, v, scaling) -> torch.Tensor:
    return torch.cat([layer.forward(q[:, s : s + 8], k[:, s : s + 8], v[:, s : s + 8], scaling)
                      for s in range(0, T, 8)], dim=1)  # (Hq, T, D)


def _qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(HQ, T, D, generator=g), torch.randn(HKV, T, D, generator=g), torch.randn(HKV, T, D, generator=g)


def test_int8_layer_is_the_float_layer_on_the_rounded_blocks():
    """The only effect of int8 storage: block K/V replaced by their dequantised values (nothing else moves)."""
    q, k, v = _qkv(1)
    rounded = _layer("float32")
    append = rounded.blocks.append

    def append_rounded(bk, bv):  # (n, Hkv, B, D): what the int8 store keeps, dequantised
        append(dequantize_int8(*quantize_int8(bk), bk.dtype), dequantize_int8(*quantize_int8(bv), bv.dtype))

    rounded.blocks.append = append_rounded
    int8 = _layer("int8")
    out = _feed(int8, q, k, v, D**-0.5)
    torch.testing.assert_close(out, _feed(rounded, q, k, v, D**-0.5), atol=0, rtol=0)
    assert not torch.equal(out, _feed(_layer("float32"), q, k, v, D**-0.5))  # and the rounding did change it


def test_layer_output_with_int8_blocks_stays_within_the_derived_bound():
    """The tolerance, derived. out = sum_j w_j v_j over the union of keys; only block keys/values change.
    A stored value moves by at most e_v = max s_v / 2 (the rounding). A logit moves by at most
    delta = scaling * max ||q||_2 * max_j ||dk_j||_2 (RoPE rotates q, which keeps its norm; Cauchy-Schwarz),
    with dk_j the rounding error of key j. Logits moving by <= delta change the softmax weights by
    sum_j |w'_j - w_j| <= e^(2 delta) - 1, hence
        |out' - out| <= e_v + (e^(2 delta) - 1) * max |v|.
    The bound is worst-case (every logit shifted its maximum, in the worst direction); the test asserts it,
    and that the error is not zero (int8 was used).
    """
    q, k, v = _qkv(0)
    scaling = D**-0.5
    float_out, int8_layer = _feed(_layer("float32"), q, k, v, scaling), _layer("int8")
    int8_out = _feed(int8_layer, q, k, v, scaling)
    n = int8_layer.blocks.num_blocks
    assert n >= 10

    def block_tokens(x):  # (Hkv, T, D) -> the tokens that became blocks, (n, Hkv, B, D): after the 4 sinks
        return x[:, 4 : 4 + 8 * n].reshape(HKV, n, 8, D).transpose(0, 1)

    dk = dequantize_int8(*quantize_int8(block_tokens(k)), torch.float32) - block_tokens(k)
    dv = dequantize_int8(*quantize_int8(block_tokens(v)), torch.float32) - block_tokens(v)
    delta = scaling * q.norm(dim=-1).max().item() * dk.norm(dim=-1).max().item()
    bound = dv.abs().max().item() + math.expm1(2 * delta) * v.abs().max().item()
    error = (int8_out - float_out).abs().max().item()
    assert 0 < error <= bound + 1e-6, (error, bound)


def test_an_int8_engine_resumes_from_its_state_exactly():
    """storage_dtype: int8 end to end: the scales travel with the saved state, so resuming changes nothing."""
    from inf_llm.generation.engine import Engine

    model = tiny_model("llama")
    config = InfLLMConfig(num_sink_tokens=4, local_window=32, block_size=8, repr_tokens=2, topk_blocks=3,
                          chunk_size=16, device_cache_blocks=4, storage_dtype="int8", kernel_backend="torch")
    ids = torch.randint(0, 128, (220,), generator=torch.Generator().manual_seed(0)).tolist()
    engine = Engine(model, None, config)
    engine.feed(ids[:200])
    assert engine.memory.layers[0].blocks.layout.quantized and engine.stats().blocks > 10
    resumed = Engine(model, None, config.replace(host_cache_bytes=0))  # and every block on disk
    resumed.load_state_dict(engine.state_dict())
    torch.testing.assert_close(resumed.feed(ids[200:]), engine.feed(ids[200:]), atol=0, rtol=0)
