"""Probe behind BENCHMARKS.md, "The sinks and the question's blocks near": only the first N places the vote filled
(the most voted first, with its run) at voted_memory_distance; the other voted blocks are still attended, at the
global distance (a code change for the probe only). mode: single (4K, seed 0, depths 10% and 50%), passkey (the
chat path, 4K and 8K), multiquery (asked in turns, 4K, seeds 3-5).

    OMP_NUM_THREADS=1 python docs/bench/top_voted_probe.py passkey 2 local_window=512 sink_memory_distance=128 \
        voted_memory_distance=128 num_sink_tokens=64
"""
import sys, torch
import inf_llm.memory.model_memory as mm
from inf_llm.bench.methods import parse_overrides
from inf_llm.bench.prompt import build_passkey_prompt, needle_line
from inf_llm.bench.prose import answer, converse
from inf_llm.bench.prose_tasks import ProsePrompt, build_prose_prompt
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.memory.layer_memory import LayerMemory
from inf_llm.model.loading import load_model
torch.set_num_threads(1)
mode, N = sys.argv[1], int(sys.argv[2])
overrides = sys.argv[3:]
config = load_config(default_preset_for(None)).config.replace(**parse_overrides(overrides))
LAST = {}
vp = mm.voted_places
def voted_places(*a, **k):
    r = vp(*a, **k); LAST["ranked"] = list(r); return r
mm.voted_places = voted_places
place = LayerMemory._place_near
def place_near(self, glob_k, chosen, far, num_memory, first_pos):
    saved = self.end_blocks
    if saved is not None and "ranked" in LAST:
        self.end_blocks = torch.tensor(sorted(LAST["ranked"][:N]), dtype=torch.long)
    try:
        return place(self, glob_k, chosen, far, num_memory, first_pos)
    finally:
        self.end_blocks = saved
LayerMemory._place_near = place_near
model, tok = load_model(None, device="cpu")
engine = Engine(model, tok, config)
label = f"{mode} first {N} places near, {' '.join(overrides)}"
scores = []
if mode == "single":
    for depth in (0.1, 0.5):
        r = answer(engine, build_prose_prompt(tok, "single", 4096, depth, 0))
        scores.append(r["score"]); print(label, depth, r["score"], LAST["ranked"][:N], repr(r["reply"][:60]), flush=True)
elif mode == "passkey":
    for length in (4096, 8192):
        for depth in (0.1, 0.5, 0.9):
            p = build_passkey_prompt(tok, length, depth, 0, answer_prefix="")
            prompt = ProsePrompt("single", p.ids, "", (str(p.key),), ((p.needle_token, p.needle_end),),
                                 (needle_line(p.key),), 0, (p.context_start, p.context_end), "")
            r = answer(engine, prompt)
            scores.append(r["score"]); print(label, length, depth, r["score"], LAST["ranked"][:N], repr(r["reply"][:60]), flush=True)
else:
    for seed in (3, 4, 5):
        for depth in (0.1, 0.5, 0.9):
            r = converse(engine, build_prose_prompt(tok, mode, 4096, depth, seed))
            scores.append(r["score"]); print(label, seed, depth, r["score"], [t["reply"][-9:] for t in r["turns"]], flush=True)
print("==", label, sum(scores) / len(scores), flush=True)
