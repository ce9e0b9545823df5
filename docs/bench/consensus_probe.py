"""Probe behind BENCHMARKS.md, "Near only what the layers agree on": of the runs the question's vote filled, only
those whose most voted block has at least F of the tally a block every layer ranks first would get (the number
of layers, by rank) are placed at voted_memory_distance; the others stay at the global distance (a code change
for the probe only). mode: passkey (the chat path, 4K and 8K, seed 0), or a prose task in one message (4K, seeds
0-2; the chat's --min-new-tokens 1); `gated-` before the mode: the sinks at sink_memory_distance only while
such a run is near, else at the global distance. A run here is a lead block and the voted blocks beside it.

    OMP_NUM_THREADS=1 python docs/bench/consensus_probe.py passkey 0.5 local_window=512 num_sink_tokens=64 \
        sink_memory_distance=128 voted_memory_distance=128 voted_memory_places=16
"""
import sys, torch
import inf_llm.memory.model_memory as mm
from inf_llm.bench.methods import parse_overrides
from inf_llm.bench.prompt import build_passkey_prompt, needle_line
from inf_llm.bench.prose import answer
from inf_llm.bench.prose_tasks import ProsePrompt, build_prose_prompt
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.model.loading import load_model
torch.set_num_threads(1)
mode, F, overrides = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
config = load_config(default_preset_for(None)).config.replace(**parse_overrides(overrides))
LAST = {}
tv = mm.tally_votes
def tally_votes(*a, **k):
    t = tv(*a, **k); LAST.setdefault("tally", t); return t
mm.tally_votes = tally_votes
vote = mm.InfLLMMemory.vote_prompt_end
def vote_prompt_end(self, read):
    LAST.clear()
    vote(self, read)
    t, n = LAST["tally"], len(self.layers)
    ranked = self.layers[0].end_near.tolist()  # voted_memory_places = prompt_end_blocks: every place, ascending
    leads = [b for b in ranked if t.get(b, 0) >= F * n]
    near = sorted({x for b in leads for x in ranked if abs(x - b) < config.prompt_end_run})
    LAST["near"] = near
    LAST["best"] = [(b, round(float(t[b]) / n, 2)) for b in sorted(t, key=lambda x: (-t[x], x))[:3]]
    for layer in self.layers:
        layer.end_near = torch.tensor(near, dtype=torch.long)
mm.InfLLMMemory.vote_prompt_end = vote_prompt_end
GATED = "gated" in mode  # the sinks at sink_memory_distance only while a run the layers agree on is near
if GATED:
    from inf_llm.memory.layer_memory import LayerMemory
    place = LayerMemory._place_near
    FAR = config.replace(sink_memory_distance=None)
    def place_near(self, *a):
        if self.end_near is not None and self.end_near.numel():
            return place(self, *a)
        saved, self.config = self.config, FAR
        try:
            return place(self, *a)
        finally:
            self.config = saved
    LayerMemory._place_near = place_near
    mode = mode.replace("gated-", "")
model, tok = load_model(None, device="cpu")
engine = Engine(model, tok, config)
label = f"{sys.argv[1]} consensus {F}, {' '.join(overrides)}"
scores = []
def run(name, p):
    r = answer(engine, p, min_new_tokens=0 if mode == "passkey" else 1)
    scores.append(r["score"]); print(label, name, r["score"], "near", LAST["near"], "best/layers", LAST["best"], repr(r["reply"][-30:]), flush=True)
if mode == "passkey":
    for length in (4096, 8192):
        for depth in (0.1, 0.5, 0.9):
            p = build_passkey_prompt(tok, length, depth, 0, answer_prefix="")
            run(f"{length} {depth}", ProsePrompt("single", p.ids, "", (str(p.key),), ((p.needle_token, p.needle_end),),
                                                (needle_line(p.key),), 0, (p.context_start, p.context_end), ""))
else:
    for seed in (0, 1, 2):
        for depth in (0.1, 0.5, 0.9):
            run(f"{seed} {depth}", build_prose_prompt(tok, mode, 4096, depth, seed))
print("==", label, sum(scores) / len(scores), flush=True)
