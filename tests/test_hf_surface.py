"""The transformers surface InfLLM stands on. If transformers moves it, these fail first and say where."""

import pytest
import torch
import transformers
from transformers import AttentionInterface, GPT2Config, LlamaConfig

from inf_llm.config.schema import InfLLMConfig
from inf_llm.memory.attach import attach
from inf_llm.memory.full_attention import FullAttentionMemory, cache_keyword
from inf_llm.model import hf
from tests.tiny_models import tiny_config, tiny_model


def test_transformers_version_is_in_the_tested_range():
    hf.check_transformers_version()


def test_attention_registry_passes_extra_kwargs_and_builds_no_mask():
    seen = {}

    def probe(module, query, key, value, attention_mask, scaling, dropout=0.0, probe_token=None, **kwargs):
        seen.setdefault("layers", []).append(module.layer_idx)
        seen["mask"] = attention_mask
        seen["token"] = probe_token
        seen["shapes"] = (tuple(query.shape), tuple(key.shape))
        return torch.zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None

    AttentionInterface.register("inf_llm_probe", probe)
    model = tiny_model("llama")
    model.set_attn_implementation("inf_llm_probe")
    out = model(input_ids=torch.tensor([[1, 2, 3]]), position_ids=torch.zeros((1, 3), dtype=torch.long),
                use_cache=False, logits_to_keep=1, probe_token="here")
    assert seen["token"] == "here"  # extra forward kwargs reach the attention function
    assert seen["mask"] is None  # no mask function registered -> no mask built
    assert seen["layers"] == [0, 1]
    assert seen["shapes"] == ((1, 4, 3, 16), (1, 2, 3, 16))  # (B, H, T, D), grouped KV heads
    assert out.logits.shape == (1, 1, 128)  # logits_to_keep=1 projects the last position only


def test_position_zero_makes_the_models_rope_the_identity():
    model = tiny_model("llama")
    cos, sin = model.model.rotary_emb(torch.zeros(1), torch.zeros((1, 4), dtype=torch.long))
    assert torch.equal(cos, torch.ones_like(cos)) and torch.equal(sin, torch.zeros_like(sin))


def test_unsupported_architecture_is_refused_at_attach():
    with pytest.raises(hf.UnsupportedModelError, match="gpt2"):
        hf.check_supported(GPT2Config())


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_rope_is_refused(rope_type):
    params = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0}
    if rope_type == "longrope":
        params.update(short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=2048)
    config = tiny_config("llama", rope_parameters=params)
    with pytest.raises(hf.UnsupportedModelError, match=rope_type):
        hf.check_supported(config)


def test_yarn_scaling_stays_exact():
    """yarn multiplies cos/sin by a constant: the rotary table must divide it out, or logits drift."""
    from tests.tiny_models import stock_logits, run_schedule

    params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024}
    model = tiny_model("qwen2", rope_parameters=params)
    ids = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(0))
    expected = stock_logits(model, ids)
    memory = attach(model, InfLLMConfig(local_window=128, chunk_size=32, kernel_backend="torch", storage_dtype="float32"))
    torch.testing.assert_close(run_schedule(model, memory, ids, [64]), expected, atol=2e-4, rtol=1e-4)


def test_per_head_ranking_needs_room_in_the_device_cache():
    config = InfLLMConfig(per_head_ranking=True, topk_blocks=8, device_cache_blocks=8)
    with pytest.raises(ValueError, match="device_cache_blocks"):
        hf.check_config_for_model(config, LlamaConfig(num_attention_heads=4, num_key_value_heads=2))


def test_the_full_attention_cache_reaches_the_model():
    """An unknown cache keyword would vanish into the forward's **kwargs and leave the cache empty."""
    model = tiny_model("llama")
    memory = FullAttentionMemory(model, InfLLMConfig(method="full"))
    model(input_ids=torch.tensor([[1, 2, 3]]), logits_to_keep=1, **memory.forward_kwargs(3, torch.device("cpu")))
    assert memory.num_tokens == 3


def test_the_cache_keyword_is_read_off_the_forward_signature():
    class Renamed(torch.nn.Module):  # the name before transformers' rename
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return None

    class Neither(torch.nn.Module):
        def forward(self, input_ids=None, **kwargs):
            return None

    assert cache_keyword(Renamed()) == "past_key_values"
    with pytest.raises(TypeError, match="neither `cache` nor `past_key_values`"):
        cache_keyword(Neither())
