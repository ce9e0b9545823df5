"""Tests of multi-device placement: each layer's memory lives where that layer computes (runs on CPU).

Several devices are faked on a CPU-only machine: the "meta" device stands for a second accelerator (its
tensors have devices but no data), accelerate's hooks name an execution device, and accelerate's disk
offload really moves a layer's weights away. Oracles: the device each memory records and allocates on, and
the logits of the same model undispatched.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from accelerate import dispatch_model
from transformers import AutoModelForCausalLM

from inf_llm.config.schema import InfLLMConfig
from inf_llm.generation.engine import Engine
from inf_llm.memory import model_memory as memory_module
from inf_llm.memory.attach import attach
from inf_llm.model import loading
from inf_llm.model.loading import load_model
from inf_llm.model.placement import execution_device, layer_device
from inf_llm.model.rope import RotaryTable
from tests.test_loading import _tiny_tokenizer
from tests.tiny_models import tiny_model

CPU, META = torch.device("cpu"), torch.device("meta")
CONFIG = InfLLMConfig(num_sink_tokens=4, local_window=32, block_size=8, repr_tokens=2, topk_blocks=3, chunk_size=16,
                      device_cache_blocks=4, storage_dtype="float32", kernel_backend="torch")


def _memory_devices(layer_memory) -> set[torch.device]:
    """Every device a layer's memory allocated on."""
    tensors = [layer_memory.win_k, layer_memory.win_score, layer_memory.sink_k, layer_memory.reprs,
               layer_memory.blocks.dev_k, layer_memory.rotary.cos]
    return {t.device for t in tensors if isinstance(t, torch.Tensor)}


class _TableMovedTo(RotaryTable):
    """Test double: the table is computed on the CPU (its checks read values, which "meta" has none of) and
    then moved to the device asked for, so the device InfLLMMemory passed is what the table records."""

    def __init__(self, rotary_emb, head_dim, max_position, device):
        super().__init__(rotary_emb, head_dim, max_position, CPU)
        self.cos, self.sin_signed = self.cos.to(device), self.sin_signed.to(device)


def test_each_layer_memory_is_created_on_its_layers_device(monkeypatch):
    monkeypatch.setattr(memory_module, "RotaryTable", _TableMovedTo)
    model = tiny_model("llama", num_hidden_layers=4)
    # Layers 1 and 2 on a second "device": meta has no data, so the memory must be built without running it.
    model.model.layers[1].to(META)
    model.model.layers[2].to(META)
    memory = attach(model, CONFIG)
    expected = [CPU, META, META, CPU]
    assert [layer.device for layer in memory.layers] == expected
    assert [layer.blocks.device for layer in memory.layers] == expected
    for layer, device in zip(memory.layers, expected):
        assert _memory_devices(layer) == {device}
    # Layers on one device share its rotary table; each device has its own.
    assert memory.layers[0].rotary is memory.layers[3].rotary is not memory.layers[1].rotary


def test_an_accelerate_hook_names_the_device_a_layer_computes_on(monkeypatch):
    monkeypatch.setattr(memory_module, "RotaryTable", _TableMovedTo)
    model = tiny_model("llama", num_hidden_layers=3)
    layers = model.model.layers
    # Weights stay on the CPU; the hooks say where each layer runs (accelerate moves weights in per call).
    layers[0]._hf_hook = SimpleNamespace(execution_device=META)
    layers[2].self_attn.q_proj._hf_hook = SimpleNamespace(  # a SequentialHook wrapping an AlignDevicesHook
        hooks=[SimpleNamespace(), SimpleNamespace(execution_device="meta")])
    assert [layer_device(layer) for layer in layers] == [META, CPU, META]
    assert execution_device(layers[0]) == META and execution_device(layers[1]) == CPU
    memory = attach(model, CONFIG)
    assert [layer.device for layer in memory.layers] == [META, CPU, META]


def test_a_disk_offloaded_layer_gets_its_memory_on_its_execution_device(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = dispatch_model(copy.deepcopy(model), device_map=device_map, offload_dir=str(tmp_path))
    assert offloaded.model.layers[1].self_attn.q_proj.weight.device == META  # its weights live on disk
    engine = Engine(offloaded, None, CONFIG)
    assert [layer.device for layer in engine.memory.layers] == [CPU, CPU, CPU]
    ids = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    torch.testing.assert_close(engine.feed(ids), Engine(model, None, CONFIG).feed(ids), atol=0, rtol=0)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    folder = tmp_path / "tiny"
    model = tiny_model("llama", vocab_size=10)
    model.save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder, model


def test_load_model_passes_the_device_map_to_transformers(tiny_checkpoint, monkeypatch):
    folder, model = tiny_checkpoint
    seen = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return original(*args, **kwargs)

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", spy)
    loaded, _ = load_model(folder, device_map="auto")  # this machine: no GPU, so everything on the CPU
    assert seen == ["auto"]
    assert loaded.dtype == torch.float32 and loaded.model.layers[0].self_attn.q_proj.weight.device == CPU
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    load_model(folder)
    assert seen[-1] is None  # without one, transformers gets none and the model is moved to `device`


def test_load_model_refuses_a_device_with_a_device_map(tiny_checkpoint):
    with pytest.raises(ValueError, match="device.*device_map"):
        load_model(tiny_checkpoint[0], device="cpu", device_map="auto")
