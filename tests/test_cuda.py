"""The CUDA path against the same oracles as the CPU path: runs on a machine with a CUDA GPU, skipped elsewhere.

CI machines have no GPU, so these run where one is lent: `python -m pytest -q tests/test_cuda.py`. They cover what
the CPU suite cannot: the memory's blocks offloaded to host memory and copied back to the GPU (on a side stream),
the compiled Triton kernels inside the whole model, the embedded model's preset's features (two-stage ranking,
shared blocks, the question's vote, blocks spilled to disk) through a conversation's prompt and reply, and the
full-attention baseline's cache on CUDA.
"""

import pytest
import torch

from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from inf_llm.memory.attach import attach
from tests.test_engine import ByteTokenizer, _config
from tests.test_engine import _ids as _token_ids
from tests.test_equivalence import ATOL, SCHEDULES, _ids, _memory_config
from tests.tiny_models import dense_logits, run_schedule, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("ranking", ["representatives", "bounds"])
def test_all_blocks_retrieved_on_cuda_equals_dense_reference(backend, family, schedule, ranking):
    model = tiny_model(family).to(CUDA)
    ids = _ids(200).to(CUDA)
    cfg = _memory_config(kernel_backend=backend, block_ranking=ranking, rank_rotated=ranking == "bounds")
    expected = dense_logits(model, ids, "inf-llm", cfg.local_window, cfg.num_sink_tokens)
    memory = attach(model, cfg)
    got = run_schedule(model, memory, ids, SCHEDULES[schedule])
    assert memory.stats().blocks >= 15 and memory.stats().host_blocks > 0  # blocks went to host memory and back
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("schedule", ["one call", "token by token"])
def test_evicting_device_cache_on_cuda_equals_the_cpu_run(backend, schedule):
    """A few blocks retrieved through a cache smaller than the memory: the CUDA run chooses and reads the same
    blocks as the CPU run (float32 both, the torch kernels on CPU)."""
    settings = dict(topk_blocks=4, device_cache_blocks=6, block_ranking="bounds", rank_rotated=True)
    ids = _ids(200)
    cpu_model = tiny_model("mistral")
    cpu_memory = attach(cpu_model, _memory_config(kernel_backend="torch", **settings))
    expected = run_schedule(cpu_model, cpu_memory, ids, SCHEDULES[schedule])
    model = tiny_model("mistral").to(CUDA)
    memory = attach(model, _memory_config(kernel_backend=backend, **settings))
    got = run_schedule(model, memory, ids.to(CUDA), SCHEDULES[schedule])
    assert memory.stats().cache_misses > memory.stats().device_blocks  # the cache evicted
    torch.testing.assert_close(got.cpu(), expected, atol=ATOL, rtol=1e-4)


# The embedded model's preset at a tiny scale: bounds against the rotated query, a second stage over a shortlist of 6
# that keeps 1 of the 3 first-stage places, 2 shared blocks while decoding, and the prompt's end voting for 4 places
# (runs of 2, rank tally, the last 5 queries less 3 of a reply header). float32 storage and summaries, so that
# near-ties are not rounded into ties that the two devices may break differently.
PRESET_FEATURES = dict(block_ranking="bounds", rank_rotated=True, rerank_blocks=6, rerank_keep_blocks=2,
                       device_cache_blocks=12, shared_blocks=2, prompt_end_blocks=4, prompt_end_queries=5,
                       prompt_end_skip=3, prompt_end_tally="rank", prompt_end_run=2, repr_dtype="float32",
                       storage_dtype="float32")


def _conversation(model, config) -> tuple[list[int], list[torch.Tensor], list, int]:
    """Two turns (a prompt, a reply of 6 greedy tokens, a second prompt and reply): the tokens, each model call's
    last logits, each layer's voted blocks after the second prompt, and the blocks on disk."""
    engine = Engine(model, ByteTokenizer(), config)
    engine.eos_token_ids = set()  # every reply is max_new_tokens long
    logits = []
    hook = model.register_forward_hook(lambda module, inputs, output: logits.append(output.logits[0, -1].float().cpu()))
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=6)
        reply = [step.token_id for step in engine.generate(_token_ids(300, seed=3), params)]
        reply += [step.token_id for step in engine.generate(_token_ids(90, seed=4), params)]
    finally:
        hook.remove()
    voted = [None if layer.end_blocks is None else layer.end_blocks.tolist() for layer in engine.memory.layers]
    return reply, logits, voted, sum(layer.blocks.disk_blocks() for layer in engine.memory.layers)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_the_presets_features_on_cuda_equal_the_cpu_run(backend, tier, tmp_path):
    """The same conversation on CPU (torch kernels) and on CUDA: the same replies, the same blocks voted by the
    question in every layer, and each model call's logits alike. With `disk`, the host keeps 4 KiB of blocks and
    the rest are read back from files."""
    spill = dict(host_cache_bytes=4096, disk_dir=str(tmp_path / "spill")) if tier == "disk" else {}
    expected = _conversation(tiny_model("llama"), _config(kernel_backend="torch", **PRESET_FEATURES, **spill))
    model = tiny_model("llama").to(CUDA)
    if spill:
        spill["disk_dir"] = str(tmp_path / "spill-cuda")
    reply, logits, voted, on_disk = _conversation(model, _config(kernel_backend=backend, **PRESET_FEATURES, **spill))
    assert any(v is not None for v in expected[2])  # the question voted
    assert (on_disk > 0) == (tier == "disk") and on_disk == expected[3]
    assert reply == expected[0] and voted == expected[2]
    assert len(logits) == len(expected[1])
    for got, want in zip(logits, expected[1]):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


def test_the_models_own_attention_on_cuda_runs_without_cudnn():
    """cuDNN's attention builds a graph per key length, which a decoding step never repeats: the engine's model
    calls leave it out (and the setting is torch's again after the call)."""
    model = tiny_model("mistral").to(CUDA)
    engine = Engine(model, ByteTokenizer(), _config(method="full"))
    seen = []
    hook = model.register_forward_hook(lambda module, inputs, output: seen.append(
        (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        engine.feed(_token_ids(40))
        engine.feed(_token_ids(1))
    finally:
        hook.remove()
    assert seen == [(False, True), (False, True)]
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_full_attention_on_cuda_keeps_its_cache_between_calls():
    model = tiny_model("mistral").to(CUDA)
    ids = _ids(120).to(CUDA)
    whole = run_schedule(model, attach(model, _memory_config(method="full")), ids, [120])
    memory = attach(model, _memory_config(method="full"))
    pieces = run_schedule(model, memory, ids, [50, 1, 69])
    assert memory.num_tokens == 120
    torch.testing.assert_close(pieces, whole, atol=ATOL, rtol=1e-4)
