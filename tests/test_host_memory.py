"""Returning freed heap memory to the operating system (glibc's malloc_trim)."""

import psutil
import pytest
import torch

from inf_llm.generation import host_memory


def _rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.mark.skipif(not host_memory.AVAILABLE, reason="the C library has no malloc_trim (not glibc)")
def test_release_free_memory_returns_freed_heap_pages_to_the_system():
    # 64 KiB tensors come from the heap (below any mmap threshold); the last one is kept, so the freed ones sit
    # below the heap's top, where free() alone never gives memory back.
    chunks = [torch.ones(16 * 1024) for _ in range(3200)]  # 200 MiB, every page touched
    keep = chunks.pop()
    del chunks
    before = _rss()
    assert host_memory.release_free_memory()
    assert before - _rss() > 100 * 2**20
    assert keep.sum().item() == 16 * 1024  # what is still in use is untouched
