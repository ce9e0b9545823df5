"""Probe behind BENCHMARKS.md, "The sinks and the question's blocks near": which blocks the question voted for in the
4K single-needle cases of seed 0 (depths 10% and 50%), against the needle's blocks, under the given overrides.

    OMP_NUM_THREADS=1 python docs/bench/voted_blocks_probe.py local_window=512 voted_memory_distance=128
"""
import sys, torch
from inf_llm.bench.methods import parse_overrides
from inf_llm.bench.prose import answer
from inf_llm.bench.prose_tasks import build_prose_prompt
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.model.loading import load_model
torch.set_num_threads(1)
config = load_config(default_preset_for(None)).config.replace(**parse_overrides(sys.argv[1:]))
model, tok = load_model(None, device="cpu")
engine = Engine(model, tok, config)
for depth in (0.1, 0.5):
    p = build_prose_prompt(tok, "single", 4096, depth, 0)
    r = answer(engine, p)
    s, b = config.num_sink_tokens, config.block_size
    needle = [set(range((a - s) // b, (e - 1 - s) // b + 1)) for a, e in p.needles]
    voted = engine.memory.layers[0].end_blocks.tolist()
    print(sys.argv[1:], depth, r["score"], "needle blocks", [sorted(n) for n in needle], "voted", voted, repr(r["reply"][:50]), flush=True)
