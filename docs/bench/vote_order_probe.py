"""Probe behind BENCHMARKS.md, "Which voted run comes near": for one-message cases at 4K, the order in which the
question's vote filled its places (the most voted first, each with its run), against the blocks of every needle
(the asked one first; for `multikey` the others are distractors), under the given overrides.

    OMP_NUM_THREADS=1 python docs/bench/vote_order_probe.py multikey 0,1,2 local_window=512 num_sink_tokens=64 \
        sink_memory_distance=128 voted_memory_distance=128 voted_memory_places=2
"""
import sys, torch
import inf_llm.memory.model_memory as mm
from inf_llm.bench.methods import parse_overrides
from inf_llm.bench.prose import answer
from inf_llm.bench.prose_tasks import build_prose_prompt
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.model.loading import load_model
torch.set_num_threads(1)
task, seeds, overrides = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], sys.argv[3:]
config = load_config(default_preset_for(None)).config.replace(**parse_overrides(overrides))
LAST = {}
vp = mm.voted_places
def voted_places(*a, **k):
    r = vp(*a, **k); LAST["order"] = list(r); return r
mm.voted_places = voted_places
model, tok = load_model(None, device="cpu")
engine = Engine(model, tok, config)
s, b = config.num_sink_tokens, config.block_size
for seed in seeds:
    for depth in (0.1, 0.5, 0.9):
        p = build_prose_prompt(tok, task, 4096, depth, seed)
        r = answer(engine, p)
        order = [(i, p.needle_texts[i][-9:-1]) for i in [p.target] + [j for j in range(len(p.needles)) if j != p.target]]
        blocks = [sorted(range((p.needles[i][0] - s) // b, (p.needles[i][1] - 1 - s) // b + 1)) for i, _ in order]
        print(task, seed, depth, r["score"], "needles (asked first)", list(zip([t for _, t in order], blocks)),
              "vote order", LAST["order"], repr(r["reply"][-20:]), flush=True)
