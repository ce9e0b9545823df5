"""The CUDA path against the same oracles as the CPU path: runs on a machine with a CUDA GPU, skipped elsewhere.

CI machines have no GPU, so these run where one is lent: `python -m pytest -q tests/test_cuda.py`. They cover what
the CPU suite cannot: the memory's blocks offloaded to host memory and copied back to the GPU (on a side stream),
the compiled Triton kernels inside the whole model, and the full-attention baseline's cache on CUDA.
"""

import pytest
import torch

from inf_llm.memory.attach import attach
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


def test_full_attention_on_cuda_keeps_its_cache_between_calls():
    model = tiny_model("mistral").to(CUDA)
    ids = _ids(120).to(CUDA)
    whole = run_schedule(model, attach(model, _memory_config(method="full")), ids, [120])
    memory = attach(model, _memory_config(method="full"))
    pieces = run_schedule(model, memory, ids, [50, 1, 69])
    assert memory.num_tokens == 120
    torch.testing.assert_close(pieces, whole, atol=ATOL, rtol=1e-4)
