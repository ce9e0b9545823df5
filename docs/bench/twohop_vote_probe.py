"""Probe behind BENCHMARKS.md, "The lead on every task at 16K": for `twohop` cases in one message, the blocks of
the two hops (the asked word's "code is kept in the COLOUR drawer" first, then "the COLOUR drawer holds the
number"), the runs the question's vote filled with each run's summed tally over the number of layers (as
voted_memory_consensus reads it), which of them voted_memory_distance places near, and the reply, under the
given overrides of the embedded preset.

    OMP_NUM_THREADS=1 python docs/bench/twohop_vote_probe.py 16384 "2:0.1,2:0.9,0:0.9,1:0.5" local_window=512 \
        num_sink_tokens=64 sink_memory_distance=128 voted_memory_distance=128 voted_memory_consensus=0.9 \
        sink_memory_with_voted=true
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
length, cases, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
config = load_config(default_preset_for(None)).config.replace(**parse_overrides(overrides))
LAST = {}
vr = mm.voted_runs
def voted_runs(tally, *a, **k):
    runs = vr(tally, *a, **k)
    LAST.setdefault("runs", (tally, runs))
    return runs
mm.voted_runs = voted_runs
model, tok = load_model(None, device="cpu")
engine = Engine(model, tok, config)
n = model.config.num_hidden_layers
s, b = config.num_sink_tokens, config.block_size
scores = []
for case in cases.split(","):
    seed, depth = case.split(":")
    p = build_prose_prompt(tok, "twohop", length, float(depth), int(seed))
    LAST.clear()
    r = answer(engine, p, min_new_tokens=1)
    tally, runs = LAST["runs"]
    hops = [list(range((start - s) // b, (end - 1 - s) // b + 1)) for start, end in p.needles]
    near = engine.memory.layers[0].end_near
    near = "all" if near is None else near.tolist()
    listed = [(run, round(float(sum(tally.get(x, 0) for x in run)) / n, 2)) for run in runs]
    scores.append(r["score"])
    print(f"{seed} {depth} score {r['score']} hops {hops} runs {listed} near {near} reply {r['reply'][-40:]!r}",
          flush=True)
print("==", " ".join(overrides), sum(scores) / len(scores), flush=True)
