"""memory_positions: runs. Each run of global keys that are next to each other in the text keeps its order, and
every run's last key sits at distance local_window (inf_llm/memory/layer_memory.py: run_positions, _run_starts)."""

from types import SimpleNamespace

import pytest
import torch

from inf_llm.memory.layer_memory import LayerMemory, run_positions


def _text_positions(ids: list[int], sinks: int, block: int, num_blocks: int, tail: int) -> list[int]:
    """Each global key's token position in the text: sinks, the chosen blocks, then the remainder and window."""
    out = list(range(sinks))
    for b in ids:
        out += range(sinks + b * block, sinks + (b + 1) * block)
    return out + list(range(sinks + num_blocks * block, sinks + num_blocks * block + tail))


def _runs(text: list[int]) -> list[list[int]]:
    """By a walk: a run of keys continues while the text position grows by one."""
    runs, current = [], [0]
    for i in range(1, len(text)):
        if text[i] == text[i - 1] + 1:
            current.append(i)
        else:
            runs.append(current)
            current = [i]
    return runs + [current]


@pytest.mark.parametrize("seed", range(12))
def test_run_positions_follow_the_text(seed):
    gen = torch.Generator().manual_seed(seed)
    sinks = int(torch.randint(0, 3, (1,), generator=gen)) * 2  # 0, 2 or 4 sink tokens
    block, num_blocks = 4, int(torch.randint(0, 12, (1,), generator=gen))
    tail = int(torch.randint(1, 6, (1,), generator=gen))  # the remainder and the window's keys
    heads = 3 if seed % 2 else 1
    k = int(torch.randint(0, num_blocks + 1, (1,), generator=gen))
    ids = torch.stack([torch.randperm(num_blocks, generator=gen)[:k].sort().values for _ in range(heads)])
    fake = SimpleNamespace(config=SimpleNamespace(block_size=block), sink_k=torch.empty(1, sinks, 1),
                           blocks=SimpleNamespace(num_blocks=num_blocks), device=torch.device("cpu"))
    chosen = None if k == 0 and seed % 3 == 0 else SimpleNamespace(tensor=lambda: ids if heads > 1 else ids[0])
    g = sinks + k * block + tail
    positions, longest = run_positions(LayerMemory._run_starts(fake, chosen, g))
    runs = [_runs(_text_positions(ids[h].tolist() if chosen else [], sinks, block, num_blocks, tail))
            for h in range(heads)]
    assert longest == max(len(r) for head in runs for r in head)
    for h in range(heads):
        want = [0] * g
        for r in runs[h]:
            for j, i in enumerate(r):
                want[i] = longest - len(r) + j  # every run's last key at longest - 1
        assert positions[h].tolist() == want


def test_run_positions_of_one_run_are_the_ordered_positions():
    starts = torch.zeros(1, 9, dtype=torch.bool)
    starts[0, 0] = True
    positions, longest = run_positions(starts)
    assert longest == 9 and positions[0].tolist() == list(range(9))
    starts[0, 5] = True  # runs of 5 and 4: both end at 4
    positions, longest = run_positions(starts)
    assert longest == 5 and positions[0].tolist() == [0, 1, 2, 3, 4, 1, 2, 3, 4]
